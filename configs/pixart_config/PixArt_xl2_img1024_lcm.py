# LCM distillation of PixArtMS-XL/2 at 1024 px (PIXART-delta): a 4-step student distilled from the --load-from
# model (PixArt-XL-2-1024-MS.pth), every weight trained; the values of the reference's
# configs/pixart_config/PixArt_xl2_img1024_lcm.py.
#   python scripts/train.py configs/pixart_config/PixArt_xl2_img1024_lcm.py --work-dir output/lcm_1024 \
#       --load-from output/pretrained_models/PixArt-XL-2-1024-MS.pth
# Left out, as read by nothing here: valid_num = 0, eval_sampling_steps = 200 (INERT_KEYS). The reference's
# lora_rank = 32 is the LCM-LoRA config's lora.rank (PixArt_xl2_img1024_lcm_lora.py).
_base_ = ['../PixArt_xl2_internal.py']

# data
data_root = 'data'
image_list_json = ['data_info.json']
data = dict(type='InternalDataMS', root='InternData', image_list_json=image_list_json,
            transform='default_train', load_vae_feat=True)
image_size = 1024
aspect_ratio_type = 'ASPECT_RATIO_1024'
multi_scale = True

# model
model = 'PixArtMS_XL_2'
fp32_attention = False  # the reference's note: set to True if the loss turns NaN
load_from = None
vae_pretrained = 'output/pretrained_models/sd-vae-ft-ema'
window_block_indexes = []
window_size = 0
use_rel_pos = False
lewei_scale = 2.0

# training
num_workers = 4
train_batch_size = 16  # the reference's note: at most 12 for PixArt-XL/2 with gradient checkpointing, 16 for LCM-LoRA
num_epochs = 10
gradient_accumulation_steps = 1
grad_checkpointing = True
gradient_clip = 0.01
optimizer = dict(type='AdamW', lr=2e-5, weight_decay=0.0, eps=1e-10)
lr_schedule_args = dict(num_warmup_steps=100)
save_model_epochs = 1
save_model_steps = 200
log_interval = 10
work_dir = 'output/debug'

# LCM
lcm = True
loss_type = 'huber'
huber_c = 0.001
num_ddim_timesteps = 50
w_max = 15.0  # unused, as in the reference
w_min = 3.0   # unused, as in the reference
ema_decay = 0.95  # the target network
cfg_scale = 4.5  # the teacher's guidance w in the LCM form cond + w (cond - uncond)
class_dropout_prob = 0.0

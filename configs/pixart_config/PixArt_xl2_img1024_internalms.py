# PixArtMS-XL/2 at 1024 px, multi-scale (aspect-ratio buckets), internal dataset (released recipe).
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
fp32_attention = True
window_block_indexes = []
window_size = 0
use_rel_pos = False
lewei_scale = 2.0
load_from = None
vae_pretrained = 'output/pretrained_models/sd-vae-ft-ema'

# training
num_workers = 10
train_batch_size = 12
num_epochs = 10
gradient_accumulation_steps = 1
grad_checkpointing = True
gradient_clip = 0.01
optimizer = dict(type='AdamW', lr=2e-5, weight_decay=3e-2, eps=1e-10)
lr_schedule_args = dict(num_warmup_steps=1000)

# evaluation, logging, checkpoints
log_interval = 20
save_model_epochs = 1
save_model_steps = 2000
work_dir = 'output/debug'

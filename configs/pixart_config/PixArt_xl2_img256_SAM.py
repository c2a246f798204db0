# PixArt-XL/2 at 256 px on SA-1B (released recipe).
_base_ = ['../PixArt_xl2_internal.py']

# data
data_root = 'data'
image_list_txt = [f'part{i}.txt' for i in range(32)]  # part0.txt ... part31.txt
data = dict(type='SAM', root='SA1B', image_list_txt=image_list_txt, transform='default_train',
            load_vae_feat=True)
image_size = 256

# model
model = 'PixArt_XL_2'
fp32_attention = True
window_block_indexes = []
window_size = 0
use_rel_pos = False
load_from = None
vae_pretrained = 'output/pretrained_models/sd-vae-ft-ema'

# training
use_fsdp = False
num_workers = 10
train_batch_size = 176
num_epochs = 200
gradient_accumulation_steps = 1
grad_checkpointing = True
gradient_clip = 0.01
optimizer = dict(type='AdamW', lr=2e-5, weight_decay=3e-2, eps=1e-10)
lr_schedule_args = dict(num_warmup_steps=1000)

# evaluation, logging, checkpoints
log_interval = 20
save_model_epochs = 2
save_model_steps = 20000
work_dir = 'output/debug'

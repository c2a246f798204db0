# DreamBooth of PixArt-XL-2-1024-MS (every weight) on a folder of instance images, with the reference's values
# (configs/pixart_app_config/PixArt_xl2_img1024_dreambooth.py of the release). The reference's data dict
# (type='DreamBooth', root='dog6', prompt=['a photo of sks dog']) is the `dreambooth` dict here: the folder is
# data_root/dog6, the prompt is repeated for every sample of a batch, so any train_batch_size works.
# python scripts/train.py configs/pixart_app_config/PixArt_xl2_img1024_dreambooth.py --work-dir output/dog6
_base_ = ['../PixArt_xl2_internal.py']
data_root = 'data/dreambooth/dataset'
dreambooth = dict(
    instance_data_dir='dog6',
    instance_prompt='a photo of sks dog',
    # prior preservation (off in the reference): 100 class images made by the base model at the start of the run
    with_prior_preservation=False,
    class_prompt='a photo of dog',
    num_class_images=100,
    prior_loss_weight=1.0,
)
image_size = 1024

# model setting
model = 'PixArtMS_XL_2'  # model for multi-scale training: the instance images go to their aspect-ratio buckets
fp32_attention = True
load_from = 'output/pretrained_models/PixArt-XL-2-1024-MS.pth'  # the reference: 'Path/to/PixArt-XL-2-1024-MS.pth'
vae_pretrained = 'output/pretrained_models/sd-vae-ft-ema'
window_block_indexes = []
window_size = 0
use_rel_pos = False
aspect_ratio_type = 'ASPECT_RATIO_1024'
multi_scale = True
lewei_scale = 2.0

# training setting
num_workers = 1
train_batch_size = 1
num_epochs = 200
gradient_accumulation_steps = 1
grad_checkpointing = True
gradient_clip = 0.01
optimizer = dict(type='AdamW', lr=5e-6, weight_decay=3e-2, eps=1e-10)
lr_schedule_args = dict(num_warmup_steps=0)
auto_lr = None

log_interval = 1
save_model_epochs = 10000
save_model_steps = 100
work_dir = 'output/debug'

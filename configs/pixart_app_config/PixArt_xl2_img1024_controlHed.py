# ControlNet (PIXART-delta) on HED edges over the 1024 px multi-scale model, with the reference's values.
# Extract its condition features first: python tools/extract_features.py THIS_CONFIG \
#     --hed-checkpoint output/pretrained_models/ControlNetHED.pth
_base_ = ['../PixArt_xl2_internal.py']
data_root = 'data'
image_list_json = ['data_info.json']
# the reference's InternalDataHed is InternalData reading <control_condition>_feature_<S>/ (controlnet=True below)
data = dict(type='InternalData', root='InternData', image_list_json=image_list_json, transform='default_train',
            load_vae_feat=True)
image_size = 1024

# model setting
model = 'PixArtMS_XL_2'
fp32_attention = False  # set to True if you get NaN losses
load_from = 'output/pretrained_models/PixArt-XL-2-1024-MS.pth'  # the base; the reference: 'path-to-pixart-checkpoints'
vae_pretrained = 'output/pretrained_models/sd-vae-ft-ema'
lewei_scale = 2.0

# training setting
num_workers = 10
train_batch_size = 3
num_epochs = 10
gradient_accumulation_steps = 4
grad_checkpointing = True  # the base blocks and, unlike the reference, the ControlNet copies
gradient_clip = 0.01
optimizer = dict(type='AdamW', lr=2e-5, weight_decay=3e-2, eps=1e-10)
lr_schedule_args = dict(num_warmup_steps=0)
save_model_epochs = 5
save_model_steps = 1000
log_interval = 20
work_dir = 'output/controlnet_hed_1024'
# The reference's eval_sampling_steps = 200 is inert here; its train_ratio = 1 (every record) is the default.

# ControlNet
controlnet = True
copy_blocks_num = 13
control_condition = 'hed'
class_dropout_prob = 0.5  # reaches the model and the loss here (the reference's never did)

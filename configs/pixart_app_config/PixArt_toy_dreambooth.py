# DreamBooth on the toy model (configs/pixart_config/PixArt_toy_shapes.py: 64 px, tiny T5 and VAE in pretrained/toy)
# for a CPU: a handful of 64 px instance images in data/toy_dreambooth/instance under one prompt, with class images
# made by the toy model itself. Give the trained toy model: --load-from output/toy_shapes/checkpoints/<last>.pth
_base_ = ['../pixart_config/PixArt_toy_shapes.py']
dreambooth = dict(
    instance_data_dir='toy_dreambooth/instance',  # under data_root ('data')
    instance_prompt='a large red sks square in the center, on a gray background',
    with_prior_preservation=True,
    class_prompt='a large red square in the center, on a gray background',
    num_class_images=32,
    prior_loss_weight=1.0,
    sample_batch_size=16,
    # how the quickstart samples the toy model (IDDPM, 100 steps, guidance 3)
    class_sampler='iddpm',
    class_sampling_steps=100,
    class_cfg_scale=3.0,
)
train_batch_size = 4
max_steps = 400
optimizer = dict(type='AdamW', lr=2e-4, weight_decay=0.0, eps=1e-8)
lr_schedule = 'constant'
lr_schedule_args = dict(num_warmup_steps=0)
save_model_epochs = 0
save_model_steps = 100
log_interval = 10
work_dir = 'output/toy_dreambooth'

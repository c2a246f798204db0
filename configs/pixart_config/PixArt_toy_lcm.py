# LCM distillation of the toy model (configs/pixart_config/PixArt_toy_shapes.py, trained by scripts/quickstart.py)
# on the CPU: the toy data, a 4-step student. scripts/lcm_toy.py runs it and scores the student against the teacher.
#   python scripts/train.py configs/pixart_config/PixArt_toy_lcm.py --work-dir output/toy_lcm \
#       --load-from output/quickstart/train/checkpoints/epoch_40_step_5000.pth
_base_ = ['PixArt_toy_shapes.py']
lcm = True
cfg_scale = 2.0  # the LCM form's w: the usual guidance 3 of the quickstart's samples
class_dropout_prob = 0.0
optimizer = dict(type='AdamW', lr=2e-4, weight_decay=0.0, eps=1e-8)
lr_schedule = 'cosine'
lr_schedule_args = dict(num_warmup_steps=50)
max_steps = 500  # 1000 scored no better on the held-out prompts (README, LCM distillation)
ema_decay = 0.95
save_model_epochs = 0
save_model_steps = 500
log_interval = 50
work_dir = 'output/toy_lcm'

# ControlNet (PIXART-delta) on Canny edges of the toy-shapes scenes, over the quickstart's toy model: the proof on the
# toy (scripts/toy_controlnet.py runs it end to end; README "ControlNet", "The proof on the toy").
#   python tools/extract_features.py configs/pixart_app_config/PixArt_toy_controlCanny.py --skip-t5   # canny_feature_64/
#   python scripts/train.py configs/pixart_app_config/PixArt_toy_controlCanny.py \
#       --load-from output/quickstart/train/checkpoints/epoch_40_step_5000.pth
_base_ = ['../pixart_config/PixArt_toy_shapes.py']

controlnet = True
copy_blocks_num = 3  # the toy model has 4 blocks; copy j feeds base block j+1, so 3 is the most
control_condition = 'canny'
class_dropout_prob = 0.5  # the reference's ControlNet value: half the steps see the edges without the caption

max_steps = 1000
optimizer = dict(type='AdamW', lr=1e-3, weight_decay=0.0, eps=1e-8)
lr_schedule = 'cosine'
lr_schedule_args = dict(num_warmup_steps=50)
save_model_epochs = 1000  # no checkpoint per epoch: the training core saves the last step (and on a stop signal)
work_dir = 'output/toy_controlnet'

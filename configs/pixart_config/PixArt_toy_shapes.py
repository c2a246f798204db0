# A small PixArt on the toy-shapes dataset, for a CPU: the recipe in README "Toy recipe" builds the data
# (tools/make_toy_dataset.py), the tiny encoders (tools/build_toy_encoders.py) and the features
# (tools/extract_features.py) this config reads. 64 px images -> 8 x 8 latents -> 16 tokens of patch 2.
_base_ = ['../PixArt_xl2_internal.py']

# data: data/toy_shapes/partition/data_info.json; val_info.json and unseen_info.json hold evaluation prompts
data_root = 'data'
image_list_json = ['data_info.json']
# cache_items: the 4000 items (70 MB) stay in memory after the first epoch; reading their feature files was 30%
# of a training step here
data = dict(type='InternalData', root='toy_shapes', image_list_json=image_list_json, transform='default_train',
            load_vae_feat=True, load_t5_feat=True, cache_items=True)
image_size = 64
num_workers = 0  # items are two small files each: worker processes would cost more than they save

# model: 4 blocks of width 128 (4 heads of 32) on 128-wide toy T5 features of 32 tokens: 1.2M parameters,
# 11-13 steps/s on two CPU cores (depth 6 / width 192 ran half as fast and was no better after as many minutes)
model = 'PixArt'
model_kwargs = dict(depth=4, hidden_size=128, num_heads=4, patch_size=2)
caption_channels = 128  # width of the toy T5 (tools/build_toy_encoders.py --t5-width)
model_max_length = 32  # toy captions need at most 25 tokens; fewer tokens make cross-attention cheaper
fp32_attention = False
grad_checkpointing = False
mixed_precision = 'no'

# encoders: shipped in pretrained/toy (safetensors, like t5-v1_1-xxl and sd-vae-ft-ema); tools/build_toy_encoders.py
# rebuilds them (into output/pretrained_models/toy) and reports the scale factor of the VAE it trained
vae_pretrained = 'pretrained/toy/vae'
t5_pretrained = 'pretrained/toy/t5'
# 3 / std of the shipped VAE's latents (its vae_report.json; --latent-gain 3): latents of 3x unit variance keep
# enough of so small an image's layout at mid timesteps to learn it in minutes
scale_factor = 5.042129158973694

# training
train_batch_size = 32
gradient_accumulation_steps = 1
gradient_clip = 1.0
optimizer = dict(type='AdamW', lr=2e-3, weight_decay=0.0, eps=1e-8)  # 1e-3: colour 0.65 / 0.64 (gamma 0.07)
auto_lr = None  # the lr above is meant for this batch
# decaying to 0 is what made samples clean: at a constant lr the eps prediction stays too noisy for the
# x0 estimates of the high-noise steps (errors there are multiplied by up to 50 at this latent scale)
lr_schedule = 'cosine'
lr_schedule_args = dict(num_warmup_steps=100)
max_steps = 5000  # scripts/quickstart.py's budget (5-6.5 min on two cores); the cosine schedule ends here
# min-SNR weighting: with plain eps-MSE most of the gradient went to low-noise steps, where layout and colours
# are already decided. Colour accuracy on 64 + 64 held-out prompts after 2500 steps (val / unseen): gamma 0.07
# 0.91 / 0.85; 0.03 0.81 / 0.82; 0.15 0.84 / 0.84; 0.3 about 0.75 / 0.65; unweighted about 0.1 (positions 0.4)
min_snr_gamma = 0.07
ema_rate = 0.99  # the lr decays to 0, so a short EMA suffices; 0.998 lagged (position 0.71 vs 0.78 live, measured)
seed = 0

# evaluation, logging, checkpoints (the quickstart samples with IDDPM, 100 steps, at this guidance scale: 3 scored
# colour 0.98 / 0.84 and count 1.00 / 0.97 on val / unseen prompts, against 0.96 / 0.80 and 1.00 / 0.92 at 4.5)
cfg_scale = 3.0
log_interval = 50
save_model_epochs = 5
work_dir = 'output/toy_shapes'

# Base config for PixArt-alpha training and sampling. Every released config inherits it through
# `_base_`, and it is also the schema: a config may only set the keys defined here, with the same type
# (a key whose default is None accepts any type), and the dicts may only hold the keys `_dict_keys_` (at
# the end) lists. Values are the released ones unless a comment says so. load_config also checks each
# value's range (diffusion/utils/config.py, VALUE_RULES): e.g. gradient_clip >= 0, probabilities in [0, 1].

# ---------------------------------------------------------------- data
data_root = '/data/data'  # directory that dataset roots below are relative to
image_list_json = ['data_info.json']  # annotation files (SPEC section 7) read by InternalData/InternalDataMS
image_list_txt = None  # SA-1B partition lists (partition/part*.txt) read by the SAM dataset
data = dict(
    type='InternalData',  # dataset class name: InternalData, InternalDataMS or SAM (keys: _dict_keys_ below)
    root='images',  # dataset folder under data_root
    image_list_json=image_list_json,  # annotation files of this dataset
    transform='default_train',  # image transform name
    load_vae_feat=True,  # read pre-extracted VAE features instead of encoding images
    load_t5_feat=True,  # read pre-extracted T5 features (False: the dataset encodes captions with a text encoder)
)
image_size = 256  # training resolution in pixels (256, 512 or 1024)
train_batch_size = 32  # images per GPU per step
eval_batch_size = 16  # inert, read by nothing (INERT_KEYS): images per GPU when sampling for evaluation
use_fsdp = False  # shard the model with FSDP instead of DDP
valid_num = 2000  # inert, read by nothing (INERT_KEYS): number of validation samples
num_workers = 4  # DataLoader worker processes per GPU

# ---------------------------------------------------------------- model
model = 'PixArt_XL_2'  # model name in the registry: PixArt_XL_2 or PixArtMS_XL_2 (multi-scale)
model_kwargs = dict()  # extra model constructor arguments, e.g. depth/hidden_size/num_heads for small models
aspect_ratio_type = None  # bucket table for multi-scale training, e.g. 'ASPECT_RATIO_1024'
multi_scale = False  # train on aspect-ratio buckets (needs a PixArtMS model and an MS dataset)
lewei_scale = 1.0  # position-embedding scale: 1.0 at 256 and 512 px, 2.0 at 1024 px
fp32_attention = False  # compute attention in fp32 under mixed precision
compile = False  # torch.compile every transformer block (CUDA; the CPU runs them eagerly): bench/README.md
window_block_indexes = []  # released key, never applied by the reference: accepted, unused
window_size = 0  # released key, never applied by the reference: accepted, unused
use_rel_pos = False  # released key, never applied by the reference: accepted, unused
class_dropout_prob = 0.1  # probability of replacing a caption by the null caption during training
model_max_length = 120  # T5 tokens per caption
caption_channels = 4096  # width of the T5 caption features
pred_sigma = True  # the model predicts the variance as well as the noise (8 output channels)
learn_sigma = True  # train the variance with the variational-bound loss term

# ---------------------------------------------------------------- ControlNet (PIXART-delta), not in the reference base
controlnet = False  # train a ControlNet over the load_from model: the base frozen, copies of its first blocks trained
copy_blocks_num = 13  # base blocks the ControlNet copies (the released ControlNets: 13 of 28)
control_condition = 'canny'  # condition features the dataset reads (<condition>_feature_<S>/): 'canny' or 'hed'

# ---------------------------------------------------------------- LCM distillation (diffusion/train/lcm.py)
# lcm = True distils the --load-from model (the teacher, frozen) into a latent consistency model sampled in 1-8 steps
# without guidance (sampler 'lcm'): every weight, or a LoRA adapter (LCM-LoRA) when `lora` is set too. The teacher is
# guided with w = cfg_scale in the LCM paper's form cond + w (cond - uncond) (usual scale w + 1). The values below
# are those of the reference's configs/pixart_config/PixArt_xl2_img1024_lcm.py.
lcm = False  # train a latent consistency model distilled from the load_from model (needs train_sampling_steps 1000)
loss_type = 'huber'  # LCM: distance of student and target, 'huber' (pseudo-Huber with huber_c) or 'l2'
huber_c = 0.001  # LCM: the pseudo-Huber constant c of mean(sqrt((p - t)^2 + c^2) - c)
num_ddim_timesteps = 50  # LCM: steps of the DDIM grid the teacher is solved on ((1..N) * 1000 // N - 1)
ema_decay = 0.95  # LCM: EMA rate of the target network; 0: the student itself (the reference's LCM-LoRA)
w_min = 3.0  # inert, read by nothing (INERT_KEYS), as in the reference: low end of a guidance-scale range
w_max = 15.0  # inert, read by nothing (INERT_KEYS), as in the reference: high end of a guidance-scale range

# ---------------------------------------------------------------- diffusion
train_sampling_steps = 1000  # diffusion steps used in training
eval_sampling_steps = 250  # inert, read by nothing (INERT_KEYS): sampler steps used for evaluation images
snr_loss = False  # the reference snr_loss: x0-space MSE for timesteps <= 249, eps MSE above
min_snr_gamma = None  # e.g. 5.0: min-SNR-gamma loss weighting (Hang et al. 2023); None: the paper's plain MSE
cfg_scale = 4.0  # guidance scale for evaluation images (released as 4; a float so 4.5 validates)
mask_type = 'null'  # inert, read by nothing (INERT_KEYS): token masking strategy ('null' = no masking)
num_group_tokens = 0  # inert, read by nothing (INERT_KEYS): grouped mask tokens (0 = off)
mask_loss_coef = 0.  # inert, read by nothing (INERT_KEYS): weight of the masked-token loss
load_mask_index = False  # inert, read by nothing (INERT_KEYS): read precomputed mask indices from the dataset

# ---------------------------------------------------------------- optimisation
num_epochs = 80  # training epochs
gradient_accumulation_steps = 1  # micro-batches per optimiser step
grad_checkpointing = False  # recompute block activations in the backward pass to save memory
gradient_clip = 1.0  # maximum global gradient norm (0 or None: no clipping)
gc_step = 1  # transformer blocks per gradient-checkpointing segment (with grad_checkpointing)
auto_lr = dict(rule='sqrt')  # lr scaling: 'sqrt' = lr * sqrt(effective batch / 256), 'linear'; None = no scaling
optimizer = dict(type='AdamW', lr=1e-4, weight_decay=3e-2, eps=1e-10)  # optimiser class and arguments
lr_schedule = 'constant'  # learning-rate schedule after warm-up
lr_schedule_args = dict(num_warmup_steps=500)  # schedule arguments
mixed_precision = 'fp16'  # accelerate mixed precision: 'no', 'fp16' or 'bf16'
ema_rate = 0.9999  # exponential moving average decay of the EMA weights
seed = 43  # base random seed (offset per rank)

# ---------------------------------------------------------------- LoRA fine-tuning (diffusion/train/lora.py)
# lora = dict(rank=16, alpha=None, dropout=0.0, target_modules=None, use_dora=False, use_rslora=False) trains one
# peft LoRA adapter on the --load-from weights, which stay frozen; a key left out takes the value shown. The update
# is scaled by alpha / rank (alpha / sqrt(rank) with use_rslora; alpha None = rank); use_dora: DoRA. target_modules:
# None = ['self_attention', 'cross_attention', 'mlp'] (attn.qkv, attn.proj, cross_attn.q_linear/kv_linear/proj,
# mlp.fc1/fc2 of every block); also 't_block' (adaLN-single), 'caption_projection', or module names ('t_block.1').
lora = None  # LoRA adapter settings (dict, see above); None = train every weight

# ---------------------------------------------------------------- DreamBooth (diffusion/train/dreambooth.py)
# dreambooth = dict(instance_data_dir='dog6', instance_prompt='a photo of sks dog') fine-tunes the --load-from weights
# (every weight, or a LoRA adapter when `lora` is set too) on a folder of instance images (relative to data_root
# unless absolute) under one prompt. Prior preservation (with_prior_preservation=True, class_prompt='a photo of
# dog') adds num_class_images images of the class, generated once by the base model with class_sampler /
# class_sampling_steps / class_cfg_scale, sample_batch_size at a time, into class_data_dir (images already there are
# used; None: a folder of the cache keyed by prompt, weights and sampler); each batch pairs instance and class
# images and the loss is instance loss + prior_loss_weight x class loss. VAE and T5 features are computed at start-up
# and cached in cache_dir (None: work_dir/dreambooth_cache), keyed by image bytes, size, prompt and encoder.
# Keys left out: with_prior_preservation=False, class_prompt=None, class_data_dir=None, num_class_images=100,
# prior_loss_weight=1.0, sample_batch_size=4, class_sampler='dpm-solver', class_sampling_steps=20,
# class_cfg_scale=4.5, cache_dir=None.
dreambooth = dict()  # DreamBooth settings (see above); empty or None = train on `data`

# ---------------------------------------------------------------- pretrained parts
vae_pretrained = '/cache/pretrained_models/sd-vae-ft-ema'  # diffusers AutoencoderKL folder
scale_factor = 0.18215  # VAE latent scale factor
sample_posterior = True  # sample VAE latents (mean + std * noise) instead of using the mean
t5_pretrained = 'output/pretrained_models/t5_ckpts/t5-v1_1-xxl'  # T5 encoder folder; scripts may override

# ---------------------------------------------------------------- checkpoints and logging
load_from = None  # checkpoint whose weights initialise the model (weights only)
resume_from = dict(  # checkpoint to resume a run from (weights, optimiser, schedule, position)
    checkpoint=None,  # path, or None to start fresh
    load_ema=False,  # initialise the model from the EMA weights
    resume_optimizer=True,  # restore the optimiser state
    resume_lr_scheduler=True,  # restore the lr scheduler state
)
save_image_epochs = 1  # inert, read by nothing (INERT_KEYS): epochs between evaluation image dumps
save_model_epochs = 1  # epochs between checkpoints
save_model_steps = 1000000  # steps between checkpoints
max_steps = None  # run exactly this many optimizer steps (however many epochs), then checkpoint; None = num_epochs
keep_last_n = None  # keep only the run's newest N checkpoints (its run dir's checkpoints/; None or 0 = keep all)
max_nonfinite_steps = 20  # consecutive steps with a non-finite loss/gradients before the run stops
eval_interval = 0  # steps between validation grids of validation_prompts in work_dir/vis (0 = never)
validation_prompts = []  # prompts sampled with the EMA weights every eval_interval steps
validation_steps = 20  # DPM-Solver++ steps for the validation grids (an LCM run's: lcm sampler, 4 steps)
log_interval = 50  # steps between log lines
tensorboard_mox_interval = 50  # inert, read by nothing (INERT_KEYS): steps between tensorboard syncs to remote storage
work_dir = '/cache/exps/'  # output directory for checkpoints and logs
s3_work_dir = None  # inert, read by nothing (INERT_KEYS): remote copy of work_dir (None = none)

# ---------------------------------------------------------------- schema of the dicts
# Keys that may be None, which switches them off (a child's `auto_lr = dict()` would merge into the base's dict,
# not clear it); every other key with a non-None default must keep its type.
_may_be_none_ = ['auto_lr', 'gradient_clip', 'dreambooth']
# The keys each dict may hold: exactly what the code reads. Where they depend on a choice, `per` names it (the
# dict's own `type`, or a top-level key) and each choice lists its keys; the choices listed are the only ones
# accepted. A dict not listed here (resume_from) may hold the keys of its default above.
_net_arguments = ['patch_size', 'in_channels', 'hidden_size', 'depth', 'num_heads', 'mlp_ratio', 'drop_path',
                  'trim_captions', 'pack_captions', 'fused_modulation']  # PixArt(...) arguments without a config key
_dataset_arguments = ['root', 'transform', 'load_vae_feat', 'load_t5_feat', 'cache_items']
_dict_keys_ = dict(
    # dataset constructor arguments (resolution, max_length, caption_channels and the buckets come from
    # image_size, model_max_length, caption_channels and aspect_ratio_type)
    data=dict(per='data.type',
              InternalData=_dataset_arguments + ['image_list_json'],
              InternalDataMS=_dataset_arguments + ['image_list_json'],
              SAM=_dataset_arguments + ['image_list_txt', 'image_list_json']),  # image_list_json: inherited, unread
    optimizer=dict(per='optimizer.type',
                   AdamW=['lr', 'weight_decay', 'eps', 'betas', 'amsgrad'],  # torch.optim.AdamW
                   CAME=['lr', 'weight_decay', 'eps', 'betas', 'clip_threshold']),  # came_pytorch.CAME
    lr_schedule_args=dict(per='lr_schedule', constant=['num_warmup_steps'], cosine=['num_warmup_steps']),
    # the XL_2 presets fix depth, hidden_size, patch_size and num_heads: they may only be restated
    model_kwargs=dict(per='model', PixArt=_net_arguments, PixArtMS=_net_arguments, PixArt_XL_2=_net_arguments,
                      PixArtMS_XL_2=_net_arguments),
    auto_lr=['rule', 'base_batch_size'],
    dreambooth=['instance_data_dir', 'instance_prompt', 'with_prior_preservation', 'class_prompt', 'class_data_dir',
                'num_class_images', 'prior_loss_weight', 'sample_batch_size', 'class_sampler', 'class_sampling_steps',
                'class_cfg_scale', 'cache_dir'],
)

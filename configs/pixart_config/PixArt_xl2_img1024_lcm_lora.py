# LCM-LoRA of PixArtMS-XL/2 at 1024 px (PIXART-delta): the LCM distillation of PixArt_xl2_img1024_lcm.py training a
# LoRA adapter on the frozen --load-from model; the reference's train_scripts/train_pixart_lcm_lora.py settings.
#   python scripts/train.py configs/pixart_config/PixArt_xl2_img1024_lcm_lora.py --work-dir output/lcm_lora_1024 \
#       --load-from output/pretrained_models/PixArt-XL-2-1024-MS.pth
# Checkpoints hold the adapter; tools/export_lora.py writes it as a peft folder in diffusers' names (the released
# PixArt-LCM-LoRA-XL-2-1024-MS layout), scripts/inference.py --lora reads either.
_base_ = ['PixArt_xl2_img1024_lcm.py']
# rank 32: the config's lora_rank (the reference's --lora_rank flag was ignored); alpha 8: peft's default, which the
# reference's LoraConfig kept; the targets of the released PixArt-LCM-LoRA (model/lora.py TARGET_GROUPS['lcm_lora'])
# _delete_: the base config's lora is None, which a dict cannot be merged into
lora = dict(_delete_=True, rank=32, alpha=8, dropout=0.0, target_modules=['lcm_lora'])
ema_decay = 0.0  # the reference's LCM-LoRA takes its targets from the student itself, not from an EMA of it
work_dir = 'output/debug_lora'

# DreamBooth of a LoRA adapter on the frozen PixArt-XL-2-1024-MS: the data, buckets and schedule of
# PixArt_xl2_img1024_dreambooth.py; checkpoints hold the adapter only (scripts/inference.py --lora reads them).
_base_ = ['PixArt_xl2_img1024_dreambooth.py']
# _delete_: the base config's lora is None, which a dict cannot be merged into
lora = dict(_delete_=True, rank=16, alpha=16, dropout=0.0, target_modules=None)
grad_checkpointing = False  # the frozen base keeps no optimizer state: memory enough without it
# an adapter starts at zero and learns at LoRA's usual rate; 5e-6 (full fine-tuning's) would barely move it
optimizer = dict(type='AdamW', lr=1e-4, weight_decay=0.0, eps=1e-10)
gradient_clip = 1.0
work_dir = 'output/debug_lora'

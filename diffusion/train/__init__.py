"""The training core shared by every training flavour (full training now; LoRA, DreamBooth, ControlNet, LCM
reuse it by supplying a `TrainingFlavour`)."""

"""HED soft-edge detector of the ControlNet annotators (`ControlNetHED_Apache2`, lllyasviel/Annotators
`ControlNetHED.pth`): the condition the released PixArt ControlNets were trained on.

Five VGG-like stages of 3x3 convolutions + ReLU (max-pool 2x2 before stages 2-5), each with a 1x1 projection to
one channel. Input: RGB in [0, 255] minus the learned `norm` (1, 3, 1, 1). The edge map is the sigmoid of the mean
of the five projections, each resized (bilinear) to the input size. State-dict names are the released file's.
"""
from pathlib import Path

import torch
import torch.nn as nn
import torchvision.transforms.functional as TF

from diffusion.model_zoo import MODEL_ZOO, fetch_conventional
from diffusion.utils.checkpoint import load_state_dict_into, read_state_dict

# The file name and place the released PixArt demo reads the annotator from (downloaded there when missing).
DEFAULT_HED_CHECKPOINT = Path(MODEL_ZOO["ControlNetHED"].path)


class HEDCheckpointNotFound(FileNotFoundError):
    """HED edges were asked for but the annotator's weights are not on disk (only its conventional place,
    DEFAULT_HED_CHECKPOINT, downloads itself)."""


class DoubleConvBlock(nn.Module):
    """`layer_number` 3x3 convolutions with ReLU, optionally after a 2x2 max-pool, and a 1x1 edge projection."""

    def __init__(self, input_channel, output_channel, layer_number):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(input_channel if i == 0 else output_channel, output_channel, 3,
                                               padding=1) for i in range(layer_number)])
        self.projection = nn.Conv2d(output_channel, 1, 1)

    def forward(self, x, down_sampling=False):
        if down_sampling:
            x = torch.nn.functional.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x, self.projection(x)


class ControlNetHED_Apache2(nn.Module):
    """The HED network: image (B, 3, H, W) RGB in [0, 255] -> five edge logits at 1, 1/2, 1/4, 1/8, 1/16 size."""

    def __init__(self):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.block1 = DoubleConvBlock(3, 64, 2)
        self.block2 = DoubleConvBlock(64, 128, 2)
        self.block3 = DoubleConvBlock(128, 256, 3)
        self.block4 = DoubleConvBlock(256, 512, 3)
        self.block5 = DoubleConvBlock(512, 512, 3)

    def forward(self, x):
        h, p1 = self.block1(x - self.norm)
        h, p2 = self.block2(h, down_sampling=True)
        h, p3 = self.block3(h, down_sampling=True)
        h, p4 = self.block4(h, down_sampling=True)
        _, p5 = self.block5(h, down_sampling=True)
        return p1, p2, p3, p4, p5


@torch.no_grad()
def hed_edges(network, images):
    """Soft edges (B, 1, H, W) in [0, 1] of RGB images (B, 3, H, W) in [0, 1], as the released demo computes them."""
    H, W = images.shape[-2:]
    projections = network(images * 255.0)
    edges = torch.cat([TF.resize(p, [H, W]) for p in projections], dim=1)
    return torch.sigmoid(edges.mean(dim=1, keepdim=True)).clamp(0, 1)


def load_hed(path=DEFAULT_HED_CHECKPOINT, device="cpu"):
    """The HED network in eval mode from a local `ControlNetHED.pth` (loaded strictly, without running code);
    DEFAULT_HED_CHECKPOINT is downloaded when it is missing (diffusion.model_zoo)."""
    path = Path(fetch_conventional(path))
    if not path.is_file():
        raise HEDCheckpointNotFound(
            f"HED edges need the ControlNet annotators' HED network, expected at {path}: the file ControlNetHED.pth "
            "of lllyasviel/Annotators (class ControlNetHED_Apache2: norm, block1-5.convs.*, block1-5.projection.*); "
            "download it there (python tools/download.py ControlNetHED puts it in "
            f"{DEFAULT_HED_CHECKPOINT}), or use Canny edges or a ready condition image instead")
    network = ControlNetHED_Apache2()
    load_state_dict_into(network, read_state_dict(path), strict=True, source=str(path))
    return network.to(device).eval().requires_grad_(False)


class HEDdetector(nn.Module):
    """The reference's detector as a module: `HEDdetector(checkpoint=...)(images)`, RGB (B, 3, H, W) in [0, 1] ->
    soft edges (B, 1, H, W) in [0, 1]. The reference's `feature=True` (VAE-encode the edges) is
    `diffusion.data.conditions.control_latent` here."""

    def __init__(self, feature=False, checkpoint=DEFAULT_HED_CHECKPOINT):
        super().__init__()
        if feature:
            raise ValueError("HEDdetector(feature=True) is not kept: encode the edges with "
                             "diffusion.data.conditions.edges_to_condition and control_latent")
        self.model = load_hed(checkpoint)

    def forward(self, images):
        return hed_edges(self.model, images)

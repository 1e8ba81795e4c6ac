"""UPerNet on a tuned Swin: the semantic-segmentation model of both papers' ADE20K experiments.

The heads are Hugging Face transformers' ``UperNetHead`` (pyramid pooling at scales 1, 2, 3, 6 on the
stride-32 map, FPN fusion of all four maps, 512 channels) and ``UperNetFCNHead`` (the auxiliary head:
one 3x3 convolution of 256 channels on the stride-16 map, loss weight 0.4), which port
mmsegmentation's ``UPerHead`` and ``FCNHead`` as the Swin semantic-segmentation recipe configures
them; mmsegmentation itself does not install on current torch. One difference: the recipe drops 10% of
the fused features before each classifier, transformers' heads do not.

Whatever tunes the backbone, the heads read its four NCHW outputs: E3VA's come from its highway through
its trainable norms, exactly as they feed the detectors' FPN.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from detectors.models import MODELS, ModelSpec

IGNORE_INDEX = 255  # pixels with this label count in no loss and no score


class UPerNet(nn.Module):
    """Images (B, 3, H, W) -> per-pixel class logits (B, K, H, W); with ``targets`` (B, H, W), the losses."""

    def __init__(self, backbone: nn.Module, num_classes: int, channels: int = 512, pool_scales=(1, 2, 3, 6),
                 auxiliary_channels: int = 256, auxiliary_weight: float = 0.4, ignore_index: int = IGNORE_INDEX):
        """
        Args:
            backbone: maps images to ``{res2..res5}`` NCHW features and has ``out_channels``.
            num_classes: classes scored (ignored pixels carry ``ignore_index``, not a class).
            channels: width of the pyramid pooling and FPN fusion (512 in the recipe).
            pool_scales: output sizes of the pyramid pooling module.
            auxiliary_channels: width of the auxiliary FCN head on the stride-16 map.
            auxiliary_weight: its loss weight (0 drops the head).
        """
        super().__init__()
        from transformers import UperNetConfig
        from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead
        config = UperNetConfig(num_labels=num_classes, hidden_size=channels, pool_scales=list(pool_scales),
                               auxiliary_channels=auxiliary_channels, auxiliary_num_convs=1,
                               auxiliary_concat_input=False, loss_ignore_index=ignore_index)
        in_channels = list(backbone.out_channels)
        self.backbone = backbone
        self.decode_head = UperNetHead(config, in_channels=in_channels)
        self.auxiliary_head = UperNetFCNHead(config, in_channels=in_channels, in_index=2) if auxiliary_weight else None
        heads = nn.ModuleList([self.decode_head, *([self.auxiliary_head] if self.auxiliary_head else [])])
        for module in heads.modules():  # each ReLU follows a BatchNorm, whose backward does not read its output:
            if isinstance(module, nn.ReLU):  # rectified in place, as mmsegmentation's ConvModule does, a step
                module.inplace = True  # holds one map of the head's width less at a time
        self.num_classes, self.auxiliary_weight, self.ignore_index = num_classes, auxiliary_weight, ignore_index

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        features = list(self.backbone(images).values())
        if targets is None:
            return _resize(self.decode_head(features), images.shape[-2:])
        losses = {"loss_seg": self._pixel_loss(self.decode_head(features), targets)}
        if self.auxiliary_head is not None:
            losses["loss_aux"] = self.auxiliary_weight * self._pixel_loss(self.auxiliary_head(features), targets)
        return losses

    def _pixel_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the logits resized to the labels (the recipe's loss). Autograd would keep the
        full-size log-probabilities (K x H x W per image, 150 MiB for 150 classes at 512x512) until
        backward; recomputing them there from the stride-4 logits keeps 1/16 of that, for the same gradients."""
        def loss(low: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(_resize(low, targets.shape[-2:]), targets, ignore_index=self.ignore_index)
        if not torch.is_grad_enabled() or not logits.requires_grad:
            return loss(logits)
        return checkpoint(loss, logits, use_reentrant=False)


def _resize(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def slide_inference(model: UPerNet, image: torch.Tensor, crop: tuple[int, int],
                    stride: tuple[int, int]) -> torch.Tensor:
    """Logits (1, K, H, W) of one image (1, 3, H, W) from overlapping ``crop`` windows every ``stride``
    pixels, averaged where they overlap (mmsegmentation's ``slide`` mode; the recipe: 512 windows every 341)."""
    _, _, height, width = image.shape
    crop_h, crop_w = crop
    rows = max(height - crop_h + stride[0] - 1, 0) // stride[0] + 1
    cols = max(width - crop_w + stride[1] - 1, 0) // stride[1] + 1
    logits = image.new_zeros((1, model.num_classes, height, width))
    counts = image.new_zeros((1, 1, height, width))
    for row in range(rows):
        for col in range(cols):
            bottom, right = min(row * stride[0] + crop_h, height), min(col * stride[1] + crop_w, width)
            top, left = max(bottom - crop_h, 0), max(right - crop_w, 0)
            logits[:, :, top:bottom, left:right] += model(image[:, :, top:bottom, left:right])
            counts[:, :, top:bottom, left:right] += 1
    return logits / counts


def _synthetic_loss(model: UPerNet, images: torch.Tensor, num_classes: int):
    """Both losses on fixed random labels."""
    if images.shape[0] == 1:  # the planner's batch-1 point: BatchNorm cannot take batch statistics of one
        for module in model.modules():  # 1x1 map; with running ones it saves the same tensors for backward
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (images.shape[0], *images.shape[-2:]), generator=generator)
    labels = labels.to(images.device)
    return lambda: sum(model(images, labels).values())


ADE20K_CLASSES = 150
MODELS.register("upernet")(ModelSpec("segmentation", UPerNet, _synthetic_loss, bench_classes=ADE20K_CLASSES))

"""Map predictions back to the original image, where COCO ground truth lives.

Models predict in the resized frame that ``ResizeShortestEdge`` produced; COCOeval compares in
the frame of the annotation file. Masks are resized as probabilities before thresholding, so their
edges are as smooth as the model made them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F


def rescale_prediction(prediction: Mapping[str, Any], from_size: tuple[int, int],
                       to_size: tuple[int, int]) -> dict[str, Any]:
    """Scale boxes and resize masks of one prediction from ``from_size`` to ``to_size`` (H, W).

    ``from_size`` is the image size the model saw before padding (``pad_to_divisible`` returns
    it), ``to_size`` the target's ``orig_size``. Other keys are passed through.
    """
    (from_h, from_w), (to_h, to_w) = from_size, to_size
    out = dict(prediction)
    if "boxes" in prediction:
        boxes = prediction["boxes"]
        factors = torch.tensor([to_w / from_w, to_h / from_h] * 2, dtype=boxes.dtype,
                               device=boxes.device)
        out["boxes"] = boxes * factors
    if "masks" in prediction:
        masks = prediction["masks"]
        squeeze = masks.dim() == 3
        batch = masks[:, None] if squeeze else masks
        if batch.shape[0] == 0:
            resized = batch.new_zeros((0, batch.shape[1], to_h, to_w))
        elif batch.is_floating_point():
            resized = F.interpolate(batch, size=(to_h, to_w), mode="bilinear",
                                    align_corners=False)
        else:
            resized = F.interpolate(batch.float(), size=(to_h, to_w), mode="nearest") \
                .to(batch.dtype)
        out["masks"] = resized[:, 0] if squeeze else resized
    return out

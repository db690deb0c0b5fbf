"""A small semantic segmenter trained with the package's dense ops.

Logits come out at 1/4 of the image resolution. The loss is cross-entropy on the
logits upsampled to the mask (``upsample_cross_entropy``: the full-resolution logits
are never built) plus, optionally, the Lovasz-softmax of the upsampled probabilities
(``interpolate_bilinear`` + ``lovasz_softmax``), which optimises mean IoU directly.
"""

from __future__ import annotations

import torch
from torch import nn

import pyvision_ops

from . import metrics
from .common import Backbone, bind_ops
from .data import IGNORE_INDEX, Batch


class Segmenter(nn.Module):
    """``num_classes`` object classes plus background (mask value 0).

    ``ops``: where the loss functions come from: ``pyvision_ops`` by default; anything with
    ``upsample_cross_entropy``, ``interpolate_bilinear`` and ``lovasz_softmax`` of the
    same signatures (benchmarks/bench_models.py passes torch compositions).
    """

    metric = "mIoU"
    OPS = ("upsample_cross_entropy", "interpolate_bilinear", "lovasz_softmax")

    def __init__(self, num_classes: int = 3, width: int = 16, lovasz_weight: float = 0.5, ops=pyvision_ops):
        super().__init__()
        self.num_classes, self.lovasz_weight, self.ops = num_classes, lovasz_weight, bind_ops(ops, self.OPS)
        self.backbone = Backbone(width)
        self.classifier = nn.Conv2d(self.backbone.out_channels, num_classes + 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> logits ``[N, num_classes + 1, H / 4, W / 4]``."""
        return self.classifier(self.backbone(images))

    def loss(self, batch: Batch) -> torch.Tensor:
        logits = self(batch.images)
        loss = self.ops.upsample_cross_entropy(logits, batch.masks, ignore_index=IGNORE_INDEX)
        if self.lovasz_weight:
            probas = self.ops.interpolate_bilinear(logits, size=batch.masks.shape[-2:]).softmax(1)
            loss = loss + self.lovasz_weight * self.ops.lovasz_softmax(probas, batch.masks, ignore_index=IGNORE_INDEX)
        return loss

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class per pixel, ``[N, H, W]`` int64."""
        return self.ops.interpolate_bilinear(self(images), size=images.shape[-2:]).argmax(1)

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, float]:
        return {"mIoU": metrics.mean_iou(self.predict(batch.images), batch.masks, self.num_classes + 1,
                                         IGNORE_INDEX)}

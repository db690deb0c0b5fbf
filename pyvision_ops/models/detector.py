"""A one-stage anchor-free detector (FCOS-like, one feature level) trained with the package's box ops.

Every location of the stride-4 feature map predicts class scores (sigmoid, trained with
``sigmoid_focal_loss``) and the distances to the four sides of its box (trained with
``generalized_box_iou_loss`` on the decoded boxes). A location is a positive for a
ground-truth box when it lies inside the box and within 1.5 strides of its centre (the
smallest such box wins). Inference keeps the top scores and runs ``batched_nms``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import pyvision_ops

from . import metrics
from .common import STRIDE, Backbone, bind_ops
from .data import Batch


class Detector(nn.Module):
    """``ops``: where the box ops come from: ``pyvision_ops`` by default; anything with
    ``sigmoid_focal_loss``, ``generalized_box_iou_loss`` and ``batched_nms`` of the same
    signatures (torchvision.ops has them; benchmarks/bench_models.py compares the two)."""

    metric = "AP50"
    OPS = ("sigmoid_focal_loss", "generalized_box_iou_loss", "batched_nms")

    def __init__(self, num_classes: int = 3, width: int = 16, ops=pyvision_ops):
        super().__init__()
        self.num_classes, self.ops = num_classes, bind_ops(ops, self.OPS)
        self.backbone = Backbone(width)
        c = self.backbone.out_channels
        self.tower = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True))
        self.cls = nn.Conv2d(c, num_classes, 3, padding=1)
        self.reg = nn.Conv2d(c, 4, 3, padding=1)
        nn.init.constant_(self.cls.bias, -math.log(99.0))  # every score starts near 0.01
        nn.init.constant_(self.reg.bias, 1.0)  # and every box about 2 strides from its location

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Class logits ``[N, L, num_classes]``, boxes ``[N, L, 4]`` (x1, y1, x2, y2 in pixels)
        and the centres ``[L, 2]`` of the ``L = (H / 4) * (W / 4)`` locations, row-major."""
        return self.head(self.backbone(images))

    def head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.tower(features)
        n, _, h, w = f.shape
        centers = _centers(h, w, f.device)
        dist = torch.relu(self.reg(f)).flatten(2).transpose(1, 2) * STRIDE  # left, top, right, bottom
        boxes = torch.cat([centers - dist[..., :2], centers + dist[..., 2:]], -1)
        return self.cls(f).flatten(2).transpose(1, 2), boxes, centers

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.head_loss(*self(batch.images), batch.boxes, batch.labels)

    def head_loss(self, logits: torch.Tensor, boxes: torch.Tensor, centers: torch.Tensor,
                  gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor]) -> torch.Tensor:
        cls_target = torch.zeros_like(logits)
        pred, target = [], []
        for i, (gt, labels) in enumerate(zip(gt_boxes, gt_labels)):
            match = _assign(centers, gt)
            pos = match >= 0
            cls_target[i, pos, labels[match[pos]]] = 1.0
            pred.append(boxes[i, pos])
            target.append(gt[match[pos]])
        num_pos = cls_target.sum().clamp(min=1)  # a tensor: no host sync on a GPU
        loss = self.ops.sigmoid_focal_loss(logits, cls_target, reduction="sum") / num_pos
        return loss + self.ops.generalized_box_iou_loss(torch.cat(pred), torch.cat(target), reduction="sum") / num_pos

    @torch.no_grad()
    def predict(self, images: torch.Tensor, score_threshold: float = 0.05, iou_threshold: float = 0.5,
                candidates: int = 100, detections: int = 20) -> list[dict[str, torch.Tensor]]:
        """Per image ``{"boxes" [k, 4], "scores" [k], "labels" [k]}``, by decreasing score."""
        logits, boxes, _ = self(images)
        out = []
        for scores, image_boxes in zip(logits.sigmoid(), boxes):
            b, s, cls = top_candidates(image_boxes, scores, score_threshold, candidates)
            kept = self.ops.batched_nms(b, s, cls, iou_threshold)[:detections]
            out.append({"boxes": b[kept], "scores": s[kept], "labels": cls[kept]})
        return out

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> dict[str, float]:
        return {"AP50": metrics.average_precision(self.predict(batch.images), batch.boxes, batch.labels,
                                                  self.num_classes)}


def top_candidates(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float, k: int):
    """The ``k`` best (box, score, class) triples above ``score_threshold`` of one image's
    ``boxes [L, 4]`` and class ``scores [L, K]``, by decreasing score."""
    flat = scores.flatten()  # location-major: index = location * K + class
    keep = (flat > score_threshold).nonzero().squeeze(1)
    keep = keep[flat[keep].topk(min(k, len(keep))).indices]
    return boxes[keep // scores.shape[1]], flat[keep], keep % scores.shape[1]


def _centers(h: int, w: int, device) -> torch.Tensor:
    """Pixel coordinates ``[h * w, 2]`` (x, y) of the feature locations' centres, row-major."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return (torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5) * STRIDE


def _assign(centers: torch.Tensor, gt: torch.Tensor, radius: float = 1.5 * STRIDE) -> torch.Tensor:
    """For each location, the index of its ground-truth box, or -1."""
    if len(gt) == 0:
        return torch.full((len(centers),), -1, dtype=torch.int64, device=centers.device)
    x, y = centers[:, None, 0], centers[:, None, 1]
    inside = (x > gt[:, 0]) & (x < gt[:, 2]) & (y > gt[:, 1]) & (y < gt[:, 3])
    near = ((x - (gt[:, 0] + gt[:, 2]) / 2).abs() < radius) & ((y - (gt[:, 1] + gt[:, 3]) / 2).abs() < radius)
    area = ((gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])).expand(len(centers), -1)
    area = area.masked_fill(~(inside & near), float("inf"))
    best, idx = area.min(1)
    return idx.masked_fill(best.isinf(), -1)

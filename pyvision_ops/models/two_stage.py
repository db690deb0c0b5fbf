"""A two-stage detector: class-agnostic proposals, then a RoI head on RoI Align features.

The first stage is the one-stage ``Detector`` with a single "object" class; its top
boxes after ``nms`` are the proposals (plus the ground truth while training). The
second stage pools each proposal from the shared stride-4 features with ``roi_align``,
classifies it over the classes and background (``softmax_cross_entropy``) and refines
its box (``complete_box_iou_loss`` on the foreground proposals: IoU >= 0.5 with a
ground-truth box, by ``box_iou``). Inference ranks class scores with ``batched_soft_nms``.
"""

from __future__ import annotations

import torch
from torch import nn

import pyvision_ops

from .common import STRIDE, bind_ops
from .data import Batch
from .detector import Detector, top_candidates

POOL = 7  # RoI Align output size


class TwoStageDetector(nn.Module):
    """``ops``: where the ops come from (``pyvision_ops`` by default): the first stage's and
    ``nms``, ``roi_align``, ``box_iou``, ``softmax_cross_entropy`` (with
    ``F.cross_entropy``'s signature), ``complete_box_iou_loss`` and ``batched_soft_nms``."""

    metric = "AP50"
    OPS = ("nms", "roi_align", "box_iou", "softmax_cross_entropy", "complete_box_iou_loss", "batched_soft_nms")

    def __init__(self, num_classes: int = 3, width: int = 16, proposals: int = 32, ops=pyvision_ops):
        super().__init__()
        self.num_classes, self.proposals, self.ops = num_classes, proposals, bind_ops(ops, self.OPS)
        self.rpn = Detector(1, width, ops)
        c = self.rpn.backbone.out_channels
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c * POOL * POOL, 128), nn.ReLU(inplace=True),
                                nn.Linear(128, 128), nn.ReLU(inplace=True))
        self.cls = nn.Linear(128, num_classes + 1)  # the last class is background
        self.reg = nn.Linear(128, 4)
        nn.init.zeros_(self.reg.weight)  # refined boxes start as the proposals
        nn.init.zeros_(self.reg.bias)

    def _proposals(self, logits: torch.Tensor, boxes: torch.Tensor, size) -> list[torch.Tensor]:
        out = []
        for scores, image_boxes in zip(logits.detach().sigmoid(), boxes.detach()):
            b, s, _ = top_candidates(image_boxes, scores, 0.0, 4 * self.proposals)
            b = torch.minimum(b.clamp(min=0), b.new_tensor([size[1], size[0]] * 2))  # inside the image
            out.append(b[self.ops.nms(b, s, 0.7)[:self.proposals]])
        return out

    def _roi_head(self, features: torch.Tensor, proposals: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits ``[R, num_classes + 1]`` and refined boxes ``[R, 4]`` of all proposals."""
        x = self.fc(self.ops.roi_align(features, proposals, POOL, 1.0 / STRIDE, sampling_ratio=2, aligned=True))
        rois = torch.cat(proposals)
        wh = (rois[:, 2:] - rois[:, :2]).clamp(min=1.0).repeat(1, 2)
        return self.cls(x), rois + 0.5 * self.reg(x) * wh

    def loss(self, batch: Batch) -> torch.Tensor:
        features = self.rpn.backbone(batch.images)
        logits, boxes, centers = self.rpn.head(features)
        objects = [torch.zeros_like(lb) for lb in batch.labels]  # one class for the first stage
        rpn_loss = self.rpn.head_loss(logits, boxes, centers, batch.boxes, objects)
        proposals = [torch.cat([p, gt]) for p, gt in zip(self._proposals(logits, boxes, batch.images.shape[-2:]),
                                                         batch.boxes)]
        cls_logits, refined = self._roi_head(features, proposals)
        targets, matched = [], []
        for p, gt, labels in zip(proposals, batch.boxes, batch.labels):
            if len(gt) == 0:
                targets.append(torch.full_like(p[:, 0], self.num_classes, dtype=torch.int64))
                matched.append(p)
                continue
            iou, idx = self.ops.box_iou(p, gt).max(1)
            targets.append(torch.where(iou >= 0.5, labels[idx], self.num_classes))
            matched.append(gt[idx])
        targets, matched = torch.cat(targets), torch.cat(matched)
        fg = targets < self.num_classes
        box_loss = self.ops.complete_box_iou_loss(refined[fg], matched[fg], reduction="sum") / fg.sum().clamp(min=1)
        return rpn_loss + self.ops.softmax_cross_entropy(cls_logits, targets) + box_loss

    @torch.no_grad()
    def predict(self, images: torch.Tensor, score_threshold: float = 0.05,
                detections: int = 20) -> list[dict[str, torch.Tensor]]:
        """Per image ``{"boxes" [k, 4], "scores" [k], "labels" [k]}``, by decreasing score."""
        features = self.rpn.backbone(images)
        logits, boxes, _ = self.rpn.head(features)
        proposals = self._proposals(logits, boxes, images.shape[-2:])
        cls_logits, refined = self._roi_head(features, proposals)
        out, counts = [], [len(p) for p in proposals]
        for scores, b in zip(cls_logits.softmax(1)[:, :-1].split(counts), refined.split(counts)):
            b, s, cls = top_candidates(b, scores, score_threshold, 4 * self.proposals)
            keep, decayed = self.ops.batched_soft_nms(b, s, cls, score_threshold=score_threshold)
            keep, decayed = keep[:detections], decayed[:detections]
            out.append({"boxes": b[keep], "scores": decayed, "labels": cls[keep]})
        return out

    evaluate = Detector.evaluate

"""Evaluation metrics of the zoo: mean IoU for segmentation, AP at an IoU threshold for detection."""

from __future__ import annotations

import torch

import pyvision_ops


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> float:
    """Mean over classes of TP / (TP + FP + FN), pixels counted over the whole batch; a class
    that is neither predicted nor present (at the valid pixels) is left out of the mean.
    NaN when no class counts (every pixel ignored). Every non-ignored value of ``pred`` and
    ``target`` must be a class in ``[0, num_classes)``."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape, got {list(pred.shape)} and {list(target.shape)}")
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    p, t = pred[valid].long(), target[valid].long()
    for name, v in (("pred", p), ("target", t)):
        if len(v) and not (0 <= int(v.min()) and int(v.max()) < num_classes):
            raise ValueError(f"{name} must hold classes in [0, {num_classes}) where target is not ignore_index, "
                             f"got values in [{int(v.min())}, {int(v.max())}]")
    confusion = torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)
    tp = confusion.diagonal().double()
    union = confusion.sum(0) + confusion.sum(1) - confusion.diagonal()
    counted = union > 0
    return float((tp[counted] / union[counted]).mean()) if counted.any() else float("nan")


def average_precision(detections: list[dict[str, torch.Tensor]], boxes: list[torch.Tensor],
                      labels: list[torch.Tensor], num_classes: int, iou_threshold: float = 0.5) -> float:
    """Mean over classes with ground truth of the area under the precision-recall curve
    (all points, precision made monotone from the right, as PASCAL VOC since 2010).

    ``detections[i]``: ``{"boxes" [k, 4], "scores" [k], "labels" [k]}`` for image i.
    Detections of a class are taken by decreasing score over all images; each is a true
    positive if its best-IoU ground truth of that class in its image has IoU >=
    ``iou_threshold`` and is not matched yet. NaN when no image has ground truth.
    """
    if not len(detections) == len(boxes) == len(labels):
        raise ValueError(f"detections, boxes and labels must have one entry per image, got {len(detections)}, "
                         f"{len(boxes)} and {len(labels)}")
    aps = []
    for c in range(num_classes):
        scores, hits, n_gt = [], [], 0
        for det, gt_boxes, gt_labels in zip(detections, boxes, labels):
            gt = gt_boxes[gt_labels == c]
            n_gt += len(gt)
            mine = det["labels"] == c
            d_boxes, d_scores = det["boxes"][mine], det["scores"][mine]
            order = d_scores.argsort(descending=True, stable=True)
            d_boxes, d_scores = d_boxes[order], d_scores[order]
            hit = torch.zeros(len(d_boxes), dtype=torch.bool)
            if len(gt) and len(d_boxes):
                iou = pyvision_ops.box_iou(d_boxes.float(), gt.float()).cpu()
                taken = torch.zeros(len(gt), dtype=torch.bool)
                for k in range(len(d_boxes)):  # greedy by score within the image
                    best = int(iou[k].argmax())
                    if iou[k, best] >= iou_threshold and not taken[best]:
                        taken[best] = hit[k] = True
            scores.append(d_scores.cpu())
            hits.append(hit)
        if n_gt == 0:
            continue
        order = torch.cat(scores).argsort(descending=True, stable=True)
        tp = torch.cat(hits)[order].double().cumsum(0)
        precision = tp / torch.arange(1, len(tp) + 1, dtype=torch.float64)
        recall = tp / n_gt
        # Precision envelope: the best precision at any recall at least this one.
        precision = precision.flip(0).cummax(0).values.flip(0)
        steps = torch.diff(recall, prepend=recall.new_zeros(1))
        aps.append(float((steps * precision).sum()))
    return sum(aps) / len(aps) if aps else float("nan")

"""Float64 pure-torch references, written from the definitions. Never calls the kernels under test."""

import math

import torch


def _split(boxes):
    b = boxes.to(torch.float64)
    return b[..., 0], b[..., 1], b[..., 2], b[..., 3]


def box_pair_metric(a, b, kind: str, loss: bool = False, eps: float = 1e-7):
    """IoU-family metric of boxes a and b (broadcasting), float64.

    loss=False: the pairwise definitions (IoU = I / U; enclosing box clamped at 0;
    GIoU = IoU - (C - U) / C). loss=True: the regression-loss definitions
    (IoU = I / (U + eps); unclamped enclosing box; GIoU = IoU - (C - U) / (C + eps))
    and the result is 1 - metric.
    """
    ax1, ay1, ax2, ay2 = _split(a)
    bx1, by1, bx2, by2 = _split(b)
    iw = torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)
    ih = torch.minimum(ay2, by2) - torch.maximum(ay1, by1)
    inter = iw.clamp(min=0) * ih.clamp(min=0)
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    iou = inter / (union + eps) if loss else inter / union
    val = iou
    if kind != "iou":
        ew = torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)
        eh = torch.maximum(ay2, by2) - torch.minimum(ay1, by1)
        if not loss:
            ew, eh = ew.clamp(min=0), eh.clamp(min=0)
        if kind == "giou":
            c = ew * eh
            val = iou - (c - union) / ((c + eps) if loss else c)
        else:
            dx = (ax1 + ax2) / 2 - (bx1 + bx2) / 2
            dy = (ay1 + ay2) / 2 - (by1 + by2) / 2
            val = iou - (dx**2 + dy**2) / (ew**2 + eh**2 + eps)
            if kind == "ciou":
                t = torch.atan((ax2 - ax1) / (ay2 - ay1)) - torch.atan((bx2 - bx1) / (by2 - by1))
                v = 4 / math.pi**2 * t**2
                with torch.no_grad():
                    alpha = v / (1 - iou + v + eps)
                val = val - alpha * v
    return 1 - val if loss else val


def pairwise(boxes1, boxes2, kind: str, eps: float = 1e-7):
    """[..., N, 4] x [..., M, 4] -> [..., N, M], float64."""
    return box_pair_metric(boxes1[..., :, None, :], boxes2[..., None, :, :], kind, False, eps)

"""Box IoU family workloads: pairwise metrics and the box regression losses, vs torchvision."""

import torch
import torchvision.ops as tv

import pyvision_ops as P
from pyvision_ops.testing import clustered_boxes, random_boxes

from .common import Workload, fwd_bwd

PAIRWISE = [
    ("box_iou", P.box_iou, tv.box_iou),
    ("generalized_box_iou", P.generalized_box_iou, tv.generalized_box_iou),
    ("distance_box_iou", P.distance_box_iou, tv.distance_box_iou),
    ("complete_box_iou", P.complete_box_iou, tv.complete_box_iou),
]
LOSSES = [
    ("generalized_box_iou_loss", P.generalized_box_iou_loss, tv.generalized_box_iou_loss),
    ("distance_box_iou_loss", P.distance_box_iou_loss, tv.distance_box_iou_loss),
    ("complete_box_iou_loss", P.complete_box_iou_loss, tv.complete_box_iou_loss),
]


def _pairwise(ours, theirs, n):
    def make(device):
        g = torch.Generator().manual_seed(0)
        a = random_boxes(n, scale=1000.0, max_size=200.0, generator=g).to(device)
        b = random_boxes(n, scale=1000.0, max_size=200.0, generator=g).to(device)
        return (lambda: theirs(a, b)), (lambda: ours(a, b))

    return make


def _loss(ours, theirs, k):
    def make(device):
        g = torch.Generator().manual_seed(0)
        gt = clustered_boxes(k, objects=1000, generator=g)
        pred = (gt + torch.randn(k, 4, generator=g) * 3).to(device)
        gt = gt.to(device)
        return (fwd_bwd(pred, lambda x: theirs(x, gt, reduction="mean")),
                fwd_bwd(pred, lambda x: ours(x, gt, reduction="mean")))

    return make


WORKLOADS = []
for name, ours, theirs in PAIRWISE:
    WORKLOADS.append(Workload("box_iou", f"{name} 2000x2000 fp32", "torchvision", _pairwise(ours, theirs, 2000),
                              devices=("cpu",)))
    WORKLOADS.append(Workload("box_iou", f"{name} 4096x4096 fp32", "torchvision", _pairwise(ours, theirs, 4096),
                              devices=("cuda",)))
    # The same call replayed from a CUDA graph: kernel time, for the bandwidth figure.
    WORKLOADS.append(Workload("box_iou", f"{name} 4096x4096 fp32 (graph)", "torchvision",
                              _pairwise(ours, theirs, 4096), devices=("cuda",), graph=True,
                              bytes_moved=lambda: 4096 * 4096 * 4 + 2 * 4096 * 16))
for name, ours, theirs in LOSSES:
    WORKLOADS.append(Workload("box_iou", f"{name} fwd+bwd 100k pairs", "torchvision", _loss(ours, theirs, 100_000)))

"""RoI Align workloads vs torchvision: features (2, 256, 200, 200), 1000 RoIs, 7x7, sampling 2, scale 1/4."""

from collections import OrderedDict

import torch
import torchvision.ops as tv

import pyvision_ops as P

from .common import Workload, fwd_bwd


def _inputs(device, channels_last=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 200, 200, generator=g)
    xy = torch.rand(1000, 2, generator=g) * 700
    wh = torch.rand(1000, 2, generator=g) * 200 + 8
    rois = torch.cat([torch.randint(0, 2, (1000, 1), generator=g).float(), xy, xy + wh], 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device), rois.to(device)


def _forward(channels_last=False):
    def make(device):
        x, rois = _inputs(device, channels_last)
        return (lambda: tv.roi_align(x, rois, 7, 0.25, 2, True)), (lambda: P.roi_align(x, rois, 7, 0.25, 2, True))

    return make


def _fwd_bwd(device):
    x, rois = _inputs(device)
    return (fwd_bwd(x, lambda t: tv.roi_align(t, rois, 7, 0.25, 2, True)),
            fwd_bwd(x, lambda t: P.roi_align(t, rois, 7, 0.25, 2, True)))


def _multi_scale(device):
    g = torch.Generator().manual_seed(1)
    feats = OrderedDict((f"p{i}", torch.randn(2, 256, s, s, generator=g).to(device))
                        for i, s in zip(range(2, 6), (200, 100, 50, 25)))
    boxes = []
    for _ in range(2):
        xy = torch.rand(500, 2, generator=g) * 600
        wh = torch.rand(500, 2, generator=g) * 300 + 8
        boxes.append(torch.cat([xy, xy + wh], 1).to(device))
    shapes = [(800, 800), (800, 800)]
    theirs = tv.MultiScaleRoIAlign(list(feats), 7, 2)
    ours = P.MultiScaleRoIAlign(list(feats), 7, 2)
    return (lambda: theirs(feats, boxes, shapes)), (lambda: ours(feats, boxes, shapes))


CPU = ("cpu",)  # no CUDA kernel yet
WORKLOADS = [
    Workload("roi_align", "roi_align forward 1000 RoIs", "torchvision", _forward(), devices=CPU),
    Workload("roi_align", "roi_align forward 1000 RoIs, channels_last", "torchvision", _forward(True), devices=CPU,
             quick=False),
    Workload("roi_align", "roi_align forward+backward 1000 RoIs", "torchvision", _fwd_bwd, devices=CPU),
    Workload("roi_align", "MultiScaleRoIAlign 4 levels, 1000 RoIs", "torchvision", _multi_scale, devices=CPU),
]

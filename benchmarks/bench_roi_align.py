"""RoI Align workloads vs torchvision: features (2, 256, 200, 200), 1000 RoIs, 7x7, sampling 2, scale 1/4.

On CUDA also the backward alone vs torchvision, and our deterministic (gather) backward
vs our default atomic backward as the anchor: the deterministic one should stay within 2x.
"""

import contextlib
from collections import OrderedDict

import torch
import torchvision.ops as tv

import pyvision_ops as P

from .common import Workload, fwd_bwd

ops = torch.ops.pyvision_ops
CUDA = ("cuda",)


def _inputs(device, channels_last=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 256, 200, 200, generator=g)
    xy = torch.rand(1000, 2, generator=g) * 700
    wh = torch.rand(1000, 2, generator=g) * 200 + 8
    rois = torch.cat([torch.randint(0, 2, (1000, 1), generator=g).float(), xy, xy + wh], 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(device), rois.to(device)


@contextlib.contextmanager
def _deterministic():
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)


def _forward(channels_last=False):
    def make(device):
        x, rois = _inputs(device, channels_last)
        if channels_last:
            # ours keeps the input's layout; torchvision's output is NCHW-contiguous, which a
            # flatten + fc head needs: ours pays that copy here too
            return (lambda: tv.roi_align(x, rois, 7, 0.25, 2, True)), (
                lambda: P.roi_align(x, rois, 7, 0.25, 2, True).contiguous())
        return (lambda: tv.roi_align(x, rois, 7, 0.25, 2, True)), (lambda: P.roi_align(x, rois, 7, 0.25, 2, True))

    return make


def _fwd_bwd(device):
    x, rois = _inputs(device)
    return (fwd_bwd(x, lambda t: tv.roi_align(t, rois, 7, 0.25, 2, True)),
            fwd_bwd(x, lambda t: P.roi_align(t, rois, 7, 0.25, 2, True)))


def _backward(device):
    """The backward alone: one forward graph per implementation, replayed with retain_graph."""
    x, rois = _inputs(device)

    def make(fn):
        xr = x.detach().requires_grad_()
        out = fn(xr)
        g = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, xr, g, retain_graph=True)

    return (make(lambda t: tv.roi_align(t, rois, 7, 0.25, 2, True)),
            make(lambda t: P.roi_align(t, rois, 7, 0.25, 2, True)))


def _deterministic_backward(channels_last=False):
    def make(device):
        x, rois = _inputs(device, channels_last)
        g = torch.randn_like(P.roi_align(x, rois, 7, 0.25, 2, True))
        args = (g, rois, 0.25, 7, 7, *x.shape, 2, True)

        def det():
            with _deterministic():
                return ops.roi_align_backward(*args)

        return (lambda: ops.roi_align_backward(*args)), det

    return make


def _multi_scale_inputs(device):
    g = torch.Generator().manual_seed(1)
    feats = OrderedDict((f"p{i}", torch.randn(2, 256, s, s, generator=g).to(device))
                        for i, s in zip(range(2, 6), (200, 100, 50, 25)))
    boxes = []
    for _ in range(2):
        xy = torch.rand(500, 2, generator=g) * 600
        wh = torch.rand(500, 2, generator=g) * 300 + 8
        boxes.append(torch.cat([xy, xy + wh], 1).to(device))
    return feats, boxes, [(800, 800), (800, 800)]


def _multi_scale(device):
    feats, boxes, shapes = _multi_scale_inputs(device)
    theirs = tv.MultiScaleRoIAlign(list(feats), 7, 2)
    ours = P.MultiScaleRoIAlign(list(feats), 7, 2)
    return (lambda: theirs(feats, boxes, shapes)), (lambda: ours(feats, boxes, shapes))


def _multi_scale_fwd_bwd(device):
    feats, boxes, shapes = _multi_scale_inputs(device)

    def make(module):
        def run():
            leaves = OrderedDict((k, v.detach().requires_grad_()) for k, v in feats.items())
            module(leaves, boxes, shapes).sum().backward()
            return [v.grad for v in leaves.values()]

        return run

    return make(tv.MultiScaleRoIAlign(list(feats), 7, 2)), make(P.MultiScaleRoIAlign(list(feats), 7, 2))


WORKLOADS = [
    Workload("roi_align", "roi_align forward 1000 RoIs", "torchvision", _forward()),
    Workload("roi_align", "roi_align forward 1000 RoIs, channels_last in, NCHW out", "torchvision", _forward(True),
             quick=False),
    Workload("roi_align", "roi_align forward+backward 1000 RoIs", "torchvision", _fwd_bwd),
    Workload("roi_align", "roi_align backward 1000 RoIs", "torchvision", _backward, devices=CUDA),
    Workload("roi_align", "roi_align deterministic backward 1000 RoIs", "our atomic backward",
             _deterministic_backward(), devices=CUDA),
    Workload("roi_align", "roi_align deterministic backward 1000 RoIs, channels_last", "our atomic backward",
             _deterministic_backward(True), devices=CUDA, quick=False),
    Workload("roi_align", "MultiScaleRoIAlign 4 levels, 1000 RoIs", "torchvision", _multi_scale),
    Workload("roi_align", "MultiScaleRoIAlign 4 levels fwd+bwd, 1000 RoIs", "torchvision", _multi_scale_fwd_bwd,
             devices=CUDA),
]

"""NMS family workloads on clustered detections (a detector's raw output), vs torchvision."""

import contextlib
import os

import torch
import torchvision.ops as tv

import pyvision_ops as P
from pyvision_ops.testing import clustered_boxes

from .common import Workload


def _detections(n, categories=None, objects=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes = clustered_boxes(n, objects=objects or max(1, n // 40), generator=g)
    scores = torch.rand(n, generator=g)
    idxs = torch.randint(0, categories, (n,), generator=g) if categories else None
    return boxes, scores, idxs


def _nms(n):
    def make(device):
        b, s, _ = (t.to(device) if t is not None else None for t in _detections(n))
        return (lambda: tv.nms(b, s, 0.5)), (lambda: P.nms(b, s, 0.5))

    return make


def _batched(n, categories):
    def make(device):
        b, s, i = (t.to(device) for t in _detections(n, categories))
        return (lambda: tv.batched_nms(b, s, i, 0.5)), (lambda: P.batched_nms(b, s, i, 0.5))

    return make


KERNEL_ENV = "PYVISION_OPS_SOFT_NMS_KERNEL"


@contextlib.contextmanager
def soft_nms_kernel(variant):
    """PYVISION_OPS_SOFT_NMS_KERNEL set to `variant` (None: left as it is), then restored."""
    before = os.environ.get(KERNEL_ENV)
    if variant is not None:
        os.environ[KERNEL_ENV] = variant
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(KERNEL_ENV, None)
        else:
            os.environ[KERNEL_ENV] = before


def _soft(n, variant=None):
    """Anchor: our own nms on the same input (torchvision has no Soft-NMS); `variant`: the
    CUDA kernel (PYVISION_OPS_SOFT_NMS_KERNEL) for each call."""
    def make(device):
        b, s, _ = (t.to(device) if t is not None else None for t in _detections(n))

        def ours():
            with soft_nms_kernel(variant):
                return P.soft_nms(b, s, method="gaussian")

        return (lambda: P.nms(b, s, 0.5)), ours

    return make


WORKLOADS = [
    Workload("nms", "nms N=1000", "torchvision", _nms(1000)),
    Workload("nms", "nms N=20000", "torchvision", _nms(20000)),
    Workload("nms", "batched_nms N=20000, 80 categories", "torchvision", _batched(20000, 80)),
    Workload("nms", "soft_nms gaussian N=2000", "our nms", _soft(2000), devices=("cpu",)),
    Workload("nms", "soft_nms gaussian N=5000", "our nms", _soft(5000), devices=("cuda",)),
    Workload("nms", "soft_nms gaussian N=5000, spread kernel", "our nms", _soft(5000, "spread"), devices=("cuda",)),
]

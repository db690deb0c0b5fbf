"""The model zoo end to end: one training step (forward, loss, backward) and one inference
call of each model, with pyvision_ops against the same weights on torch/torchvision ops.

The convolutions are the same on both sides, so these rows show how much of a real step
the ops are, not the ops alone (their own rows are in the other families).
"""

import copy
import types

import torch
import torch.nn.functional as F
import torchvision.ops as tv

import pyvision_ops as P
from pyvision_ops.models import MODELS, SyntheticShapes
from pyvision_ops.models.common import bind_ops

from .bench_losses import _lovasz_per_class
from .common import Workload

# What each model calls, from torch and torchvision (torchvision has no Soft-NMS).
TORCH_OPS = types.SimpleNamespace(
    upsample_cross_entropy=lambda x, y, ignore_index: F.cross_entropy(
        F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=False), y, ignore_index=ignore_index),
    interpolate_bilinear=lambda x, size: F.interpolate(x, size=size, mode="bilinear", align_corners=False),
    lovasz_softmax=_lovasz_per_class,
    sigmoid_focal_loss=tv.sigmoid_focal_loss, generalized_box_iou_loss=tv.generalized_box_iou_loss,
    complete_box_iou_loss=tv.complete_box_iou_loss, batched_nms=tv.batched_nms, nms=tv.nms,
    roi_align=tv.roi_align, box_iou=tv.box_iou, softmax_cross_entropy=F.cross_entropy,
    batched_soft_nms=P.batched_soft_nms)


def with_ops(model: torch.nn.Module, ops) -> torch.nn.Module:
    """A copy of ``model`` (same weights) whose modules call ``ops``."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if hasattr(m, "OPS"):
            m.ops = bind_ops(ops, m.OPS)
    return model


def _step(name, n, size, classes=6, train=True):
    def make(device):
        torch.manual_seed(0)
        ours = MODELS[name](classes).to(device)
        theirs = with_ops(ours, TORCH_OPS)
        batch = SyntheticShapes(classes, size, max_objects=5, seed=0).batch(n).to(device)

        def run(model):
            if not train:
                model.eval()
                return lambda: model.predict(batch.images)

            def step():
                model.zero_grad(set_to_none=True)
                model.loss(batch).backward()

            return step

        return run(theirs), run(ours)

    return make


WORKLOADS = [
    Workload("models", "segmenter train step (8, 3, 256, 256), 7 classes", "torch ops", _step("segmenter", 8, 256),
             quick=False),
    Workload("models", "detector train step (8, 3, 256, 256)", "torchvision ops", _step("detector", 8, 256),
             quick=False),
    Workload("models", "two_stage train step (8, 3, 256, 256)", "torchvision ops", _step("two_stage", 8, 256),
             quick=False),
    Workload("models", "detector inference (8, 3, 256, 256)", "torchvision ops",
             _step("detector", 8, 256, train=False), quick=False),
]

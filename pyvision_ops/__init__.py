"""pyvision_ops: fast, correct detection and segmentation ops for PyTorch.

Every op is a torch custom op (``torch.ops.pyvision_ops.*``) with a C++ CPU
kernel, a CUDA kernel (CUDA C++ or Triton), a fake kernel and autograd, so it
works in eager mode, under ``torch.compile`` and ``torch.export``.
"""

from . import _library  # noqa: F401  (loads _C, registers kernels)
from ._info import build_info, op_table
from .box_iou import (
    box_iou,
    complete_box_iou,
    complete_box_iou_loss,
    distance_box_iou,
    distance_box_iou_loss,
    generalized_box_iou,
    generalized_box_iou_loss,
    matched_box_iou,
)
from .cross_entropy import softmax_cross_entropy, upsample_cross_entropy
from .interpolate import interpolate_bilinear
from .losses import dice_loss, lovasz_hinge, lovasz_softmax, sigmoid_focal_loss
from .nms import batched_nms, batched_soft_nms, nms, soft_nms
from .roi_align import MultiScaleRoIAlign, RoIAlign, multi_scale_roi_align, roi_align

__version__ = build_info()["version"]

__all__ = [
    "MultiScaleRoIAlign",
    "RoIAlign",
    "batched_nms",
    "batched_soft_nms",
    "box_iou",
    "build_info",
    "complete_box_iou",
    "complete_box_iou_loss",
    "distance_box_iou",
    "dice_loss",
    "distance_box_iou_loss",
    "generalized_box_iou",
    "generalized_box_iou_loss",
    "interpolate_bilinear",
    "lovasz_hinge",
    "lovasz_softmax",
    "matched_box_iou",
    "multi_scale_roi_align",
    "nms",
    "op_table",
    "roi_align",
    "sigmoid_focal_loss",
    "softmax_cross_entropy",
    "upsample_cross_entropy",
    "soft_nms",
]

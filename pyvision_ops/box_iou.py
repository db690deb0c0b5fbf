"""Box IoU family: pairwise and matched IoU / GIoU / DIoU / CIoU and the box regression losses.

Boxes are ``(x1, y1, x2, y2)``. Every function is one fused kernel: C++ on the
CPU, Triton on CUDA (kernels/box_iou.py), with the same math (csrc/common/box_iou.h).

Dtypes, as torchvision: float32 and float64 stay as they are; float16, bfloat16
and integer boxes give float32 results (computed in float32; integer boxes alone
in float64, so their areas are exact); mixed inputs promote (an integer box
against a float64 one gives float64; against a half one, float32, never half).
The losses compute integer and half boxes in float32, as torchvision's do.
Gradients come back in the dtype of the boxes.

Degenerate boxes follow torchvision's formulas exactly, with no hidden epsilon:
the pairwise IoU of two boxes whose union is 0 (two zero-area boxes) is
``0 / 0 = NaN``; a zero-area box against a box of positive area has IoU 0;
GIoU is NaN when the enclosing box has zero area. The losses add ``eps`` to
their denominators, as torchvision's do. NaN coordinates give NaN. Inverted
boxes (x2 < x1), infinite and huge coordinates go through the same formulas as
torchvision's and give the same results (the tests compare them): an inverted
box has a negative area, an infinite side gives IoU 0 or NaN, and fp32 areas
overflow from sides of about 1.8e19. Gradients match torchvision's autograd,
including no gradient through an overlap of exactly 0 (touching boxes), except
CIoU's at a box of zero height that meets a box of positive area: torchvision's
autograd gives NaN there (its atan(w / h) at h = 0), these the finite one-sided
derivative; the ops
are differentiable once (double backward raises). Pairwise functions broadcast
their leading dims; a 0-d tensor ``eps`` works in eager mode, but under
``torch.compile(fullgraph=True)`` pass a Python float.
"""

import functools
import math

import torch

from . import _utils
from ._library import ops

_KINDS = {"iou": 0, "giou": 1, "diou": 2, "ciou": 3}
_AXIS_ALIGNED_FMTS = ("xyxy", "xywh", "cxcywh")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # Integers alone go through float64 (exact products), then come back as float32. Against
    # float boxes they take the float dtype, as in torchvision, but at least float32: int
    # and fp16 promote to fp16, which would round the integer box (70000 to inf).
    floats = [t.dtype for t in tensors if t.dtype.is_floating_point]
    if not floats:
        return torch.float64
    dtype = functools.reduce(torch.promote_types, floats)
    if len(floats) < len(tensors) and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _out_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # torchvision: fp16/bf16 boxes are upcast to fp32, integer ones stay integer, and the
    # result is their promotion (an int box against an fp64 one gives fp64), or fp32
    # when both are integer (true division).
    dtype = None
    for t in tensors:
        d = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
        dtype = d if dtype is None else torch.promote_types(dtype, d)
    return dtype if dtype.is_floating_point else torch.float32


def _to_xyxy(boxes: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "xyxy":
        return boxes
    if fmt == "xywh":
        xy, wh = boxes[..., :2], boxes[..., 2:]
        return torch.cat([xy, xy + wh], dim=-1)
    cxy, half = boxes[..., :2], boxes[..., 2:] / 2
    return torch.cat([cxy - half, cxy + half], dim=-1)


def _pairwise(boxes1, boxes2, kind: str, eps: float = 1e-7, fmt: str = "xyxy") -> torch.Tensor:
    if fmt not in _AXIS_ALIGNED_FMTS:  # first: a rotated format's 5 or 8 coordinates fail the shape check
        rotated = " (rotated boxes are not supported)" if fmt in ("cxcywhr", "xywhr", "xyxyxyxy") else ""
        raise ValueError(f"fmt must be one of {_AXIS_ALIGNED_FMTS}{rotated}, got {fmt!r}")
    _utils.check_boxes("boxes1", boxes1, min_dim=2)
    _utils.check_boxes("boxes2", boxes2, min_dim=2)
    _utils.check_same_device(boxes1=boxes1, boxes2=boxes2)
    eps = _utils.check_float("eps", eps)
    same = boxes1.shape[:-2] == boxes2.shape[:-2]  # mostly: torch.broadcast_shapes costs ~10 us
    try:
        batch = boxes1.shape[:-2] if same else torch.broadcast_shapes(boxes1.shape[:-2], boxes2.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the batch dimensions of boxes1 {list(boxes1.shape[:-2])} and boxes2 {list(boxes2.shape[:-2])} "
            "do not broadcast"
        ) from None
    n, m = boxes1.shape[-2], boxes2.shape[-2]
    dtype = _compute_dtype(boxes1, boxes2)
    out_dtype = _out_dtype(boxes1, boxes2)
    nb = math.prod(batch)
    if fmt != "xyxy" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32  # corners in half would round away a side below the spacing at x
    b1, b2 = _to_xyxy(boxes1.to(dtype), fmt), _to_xyxy(boxes2.to(dtype), fmt)
    if not same:
        b1, b2 = b1.expand(*batch, n, 4), b2.expand(*batch, m, 4)
    b1, b2 = b1.reshape(nb, n, 4), b2.reshape(nb, m, 4)
    out = ops.pairwise_box_iou(b1, b2, _KINDS[kind], eps)
    return out.view(*batch, n, m).to(out_dtype)


@_utils.fx_leaf
def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, fmt: str = "xyxy") -> torch.Tensor:
    """Pairwise IoU, ``[..., N, 4] x [..., M, 4] -> [..., N, M]`` (leading dims broadcast).

    Drop-in for ``torchvision.ops.box_iou`` (axis-aligned formats ``xyxy``,
    ``xywh``, ``cxcywh``). ``inter / union``; two zero-area boxes give NaN.
    ``xywh`` and ``cxcywh`` boxes are converted to corners first (fp16/bf16 ones in
    fp32), so an infinite x or y, or an x + w that overflows, gives NaN where
    torchvision, which takes the area as ``w * h``, may give 0.
    """
    return _pairwise(boxes1, boxes2, "iou", fmt=fmt)


@_utils.fx_leaf
def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU, ``[..., N, 4] x [..., M, 4] -> [..., N, M]``; drop-in for torchvision's.

    ``IoU - (C - union) / C`` with ``C`` the enclosing box's area; NaN when ``C`` is 0.
    """
    return _pairwise(boxes1, boxes2, "giou")


@_utils.fx_leaf
def distance_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Pairwise DIoU, ``[..., N, 4] x [..., M, 4] -> [..., N, M]``; drop-in for torchvision's.

    ``IoU - d^2 / (c^2 + eps)`` with ``d`` the distance between centres and ``c``
    the enclosing box's diagonal.
    """
    return _pairwise(boxes1, boxes2, "diou", eps=eps)


@_utils.fx_leaf
def complete_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Pairwise CIoU, ``[..., N, 4] x [..., M, 4] -> [..., N, M]``; drop-in for torchvision's.

    ``DIoU - alpha * v`` with ``v = 4 / pi^2 (atan(w1/h1) - atan(w2/h2))^2`` and
    ``alpha = v / (1 - IoU + v + eps)``. Gradients treat ``alpha`` as a constant.
    """
    return _pairwise(boxes1, boxes2, "ciou", eps=eps)


def _matched(boxes1, boxes2, kind: str, loss: bool, eps: float) -> torch.Tensor:
    _utils.check_boxes("boxes1", boxes1)
    _utils.check_boxes("boxes2", boxes2)
    _utils.check_same_device(boxes1=boxes1, boxes2=boxes2)
    eps = _utils.check_float("eps", eps)
    if not isinstance(kind, str) or kind not in _KINDS:
        raise ValueError(f"kind must be one of {tuple(_KINDS)}, got {kind!r}")
    same = boxes1.shape == boxes2.shape  # mostly: torch.broadcast_shapes costs ~10 us
    try:
        shape = boxes1.shape if same else torch.broadcast_shapes(boxes1.shape, boxes2.shape)
    except RuntimeError:
        raise ValueError(
            f"boxes1 {list(boxes1.shape)} and boxes2 {list(boxes2.shape)} do not broadcast"
        ) from None
    dtype = _compute_dtype(boxes1, boxes2)
    out_dtype = _out_dtype(boxes1, boxes2)
    if loss:  # torchvision's losses cast every box that is not fp32/fp64 to fp32 first
        dtype = out_dtype = torch.promote_types(*(t.dtype if t.dtype in (torch.float32, torch.float64)
                                                  else torch.float32 for t in (boxes1, boxes2)))
    b1, b2 = boxes1.to(dtype), boxes2.to(dtype)
    if not same:
        b1, b2 = b1.expand(shape), b2.expand(shape)
    b1, b2 = b1.reshape(-1, 4), b2.reshape(-1, 4)
    out = ops.matched_box_iou(b1, b2, _KINDS[kind], loss, eps)
    return out.view(shape[:-1]).to(out_dtype)


@_utils.fx_leaf
def matched_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, kind: str = "iou", eps: float = 1e-7) -> torch.Tensor:
    """Elementwise IoU-family metric of matched pairs, ``[..., 4] x [..., 4] -> [...]`` (shapes broadcast).

    ``kind`` is ``"iou"``, ``"giou"``, ``"diou"`` or ``"ciou"``; the value of pair
    ``i`` equals the diagonal of the pairwise function (``box_iou`` etc.), without
    computing the ``N x M`` matrix. Differentiable (one fused backward kernel);
    for CIoU ``alpha`` is a constant of the gradient, as in the CIoU paper.
    """
    return _matched(boxes1, boxes2, kind, False, eps)


def _loss(boxes1, boxes2, kind: str, reduction: str, eps: float) -> torch.Tensor:
    _utils.check_reduction(reduction)
    return _utils.reduce(_matched(boxes1, boxes2, kind, True, eps), reduction)


@_utils.fx_leaf
def generalized_box_iou_loss(
    boxes1: torch.Tensor, boxes2: torch.Tensor, reduction: str = "none", eps: float = 1e-7
) -> torch.Tensor:
    """GIoU loss ``1 - GIoU`` of matched boxes; drop-in for torchvision's.

    ``IoU = inter / (union + eps)``, ``GIoU = IoU - (C - union) / (C + eps)``.
    ``reduction``: ``"none"`` | ``"mean"`` | ``"sum"``; the mean of no boxes is 0.
    Forward and backward are one fused kernel each.
    """
    return _loss(boxes1, boxes2, "giou", reduction, eps)


@_utils.fx_leaf
def distance_box_iou_loss(
    boxes1: torch.Tensor, boxes2: torch.Tensor, reduction: str = "none", eps: float = 1e-7
) -> torch.Tensor:
    """DIoU loss ``1 - IoU + d^2 / (c^2 + eps)`` of matched boxes, with ``IoU = inter / (union + eps)``;
    drop-in for torchvision's."""
    return _loss(boxes1, boxes2, "diou", reduction, eps)


@_utils.fx_leaf
def complete_box_iou_loss(
    boxes1: torch.Tensor, boxes2: torch.Tensor, reduction: str = "none", eps: float = 1e-7
) -> torch.Tensor:
    """CIoU loss ``1 - IoU + d^2 / (c^2 + 1e-7) + alpha * v`` of matched boxes; drop-in for torchvision's.

    ``alpha`` is a constant of the gradient (as torchvision computes it under
    ``no_grad``). As in torchvision, ``eps`` enters only ``alpha``; the IoU and
    distance terms use 1e-7 whatever ``eps`` is.
    """
    return _loss(boxes1, boxes2, "ciou", reduction, eps)

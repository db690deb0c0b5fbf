"""NMS family: nms, batched_nms, soft_nms, batched_soft_nms.

One op each for hard and soft suppression (``torch.ops.pyvision_ops.nms`` and
``soft_nms``), with an optional category tensor: C++ on the CPU (categories run
in parallel), CUDA C++ on the GPU (csrc/cuda/nms.cu). Boxes are ``(x1, y1, x2, y2)``.

Ordering: scores are sorted descending with a stable sort (equal scores: lower
index first) and NaN ranks highest. IoU is ``inter / union`` in fp32 (fp64 for
fp64 boxes); a box with NaN coordinates has NaN IoU with every box, so it neither
suppresses nor is suppressed. Boxes and scores may have different float dtypes:
both are promoted to their common dtype. Thresholds and ``sigma`` take any real
number (Python or NumPy) or a 0-d real tensor, as torchvision does; NaN is rejected.
"""

import torch

from . import _utils
from ._library import ops

_METHODS = {"gaussian": 0, "linear": 1, "hard": 2}


def _check_boxes(boxes):
    _utils.check_tensor("boxes", boxes)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {list(boxes.shape)}")
    _utils.check_float_dtype("boxes", boxes)


def _check(boxes, scores, idxs, iou_threshold):
    _check_boxes(boxes)
    _utils.check_tensor("scores", scores)
    _utils.check_float_dtype("scores", scores)
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must have shape [N] with N = boxes.shape[0] = {boxes.shape[0]}, "
                         f"got {list(scores.shape)}")
    devices = {"boxes": boxes, "scores": scores}
    if idxs is not None:
        _utils.check_tensor("idxs", idxs)
        _utils.check_integer("idxs", idxs)  # uint64 too: its cast to int64 keeps categories apart
        if idxs.dim() != 1 or idxs.shape[0] != boxes.shape[0]:
            raise ValueError(f"idxs must have shape [N] with N = boxes.shape[0] = {boxes.shape[0]}, "
                             f"got {list(idxs.shape)}")
        devices["idxs"] = idxs
    _utils.check_same_device(**devices)
    threshold = _utils.check_float("iou_threshold", iou_threshold)
    dtype = torch.promote_types(boxes.dtype, scores.dtype)
    # Post-processing, not differentiable: detached, the outputs never require grad
    # (the ops have no autograd formula; autograd would only warn at backward time).
    return boxes.detach().to(dtype), scores.detach().to(dtype), threshold


@_utils.fx_leaf
def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression; drop-in for ``torchvision.ops.nms``.

    Visits boxes in decreasing score order and removes every later box whose IoU
    with a kept box is ``> iou_threshold`` (strict). Returns the int64 indices of
    the kept boxes in decreasing score order; empty input gives ``int64[0]``.

    IoU is computed in fp32 for fp32/fp16/bf16 input (fp64 for fp64), as in
    torchvision, so it needs areas that fit fp32: from sides of about 1.3e19 the
    sum of two areas overflows, below about 2.5e-23 an area underflows to 0, and
    the IoU comes out 0 or NaN. Such a box behaves like a NaN box: for
    ``iou_threshold >= 0`` it neither suppresses nor is suppressed, even by an
    exact duplicate (torchvision gives the same). Use fp64 boxes, or rescale.
    """
    boxes, scores, thr = _check(boxes, scores, None, iou_threshold)
    return ops.nms(boxes, scores, None, thr)


@_utils.fx_leaf
def batched_nms(boxes: torch.Tensor, scores, idxs, iou_threshold: float) -> torch.Tensor:
    """NMS independently per category ``idxs``; drop-in for ``torchvision.ops.batched_nms``.

    Exact for any coordinates (no coordinate offsets), one call for all
    categories. Result in decreasing score order. IoU is computed as in ``nms``:
    for fp32/fp16/bf16 input, boxes whose areas overflow or underflow fp32 behave
    like NaN boxes. With empty ``boxes`` (shape ``[0, 4]``), ``scores`` and
    ``idxs`` may each be None; the other arguments are checked as usual.
    """
    _check_boxes(boxes)
    # (no test of the size unless an argument is None: under torch.compile a data-dependent
    # number of boxes, such as nms's survivors, cannot be branched on)
    if (scores is None or idxs is None) and boxes.shape[0] == 0:  # stand-ins, so that the usual checks run
        scores = boxes.new_empty((0,)) if scores is None else scores
        idxs = torch.empty((0,), dtype=torch.int64, device=boxes.device) if idxs is None else idxs
    elif idxs is None:
        raise TypeError("idxs must be a tensor of categories (it may be None only when boxes is empty)")
    boxes, scores, thr = _check(boxes, scores, idxs, iou_threshold)
    return ops.nms(boxes, scores, idxs, thr)


def _soft(boxes, scores, idxs, iou_threshold, sigma, score_threshold, method):
    boxes, scores, thr = _check(boxes, scores, idxs, iou_threshold)
    if idxs is not None and idxs.dtype == torch.uint64:
        # The kernels order categories as int64 (ties go to the lower one): with the sign bit
        # flipped, uint64 values from 2^63 up keep their place instead of sorting below 0.
        idxs = idxs.view(torch.int64) ^ torch.iinfo(torch.int64).min
    sigma = _utils.check_float("sigma", sigma, positive=True)
    score_threshold = _utils.check_float("score_threshold", score_threshold)
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {tuple(_METHODS)}, got {type(method).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {tuple(_METHODS)}, got {method!r}")
    return ops.soft_nms(boxes, scores, idxs, thr, sigma, score_threshold, _METHODS[method])


@_utils.fx_leaf
def soft_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = 0.3, sigma: float = 0.5,
             score_threshold: float = 1e-3, method: str = "gaussian") -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS (Bodla et al., 2017). Returns ``(keep, decayed_scores)``.

    Repeatedly selects the highest remaining score, then multiplies every other
    remaining score by ``exp(-iou^2 / sigma)`` (``"gaussian"``), by ``1 - iou``
    when ``iou >= iou_threshold`` (``"linear"``), or by 0 when ``iou >=
    iou_threshold`` (``"hard"``), and drops boxes whose score is below
    ``score_threshold`` (boxes that start below it are never selected).
    ``sigma`` must be > 0; ``sigma=inf`` gives a gaussian factor of 1 (no decay);
    linear and hard ignore it.
    ``keep`` is in selection order: each step takes the highest remaining score, so
    ``decayed_scores`` is decreasing when the scores are >= 0; decaying a negative
    score raises it towards 0, so with negative scores it need not be.
    ``decayed_scores[i]`` is the score box ``keep[i]`` had when selected, in the
    common dtype of ``boxes`` and ``scores`` (``torch.promote_types``: float64
    boxes give float64 scores). Equal current scores go to the box with the higher
    original score, then to the lower index; NaN scores are selected first (and
    stay NaN). A factor of 0 takes any other score to 0, also an infinite one
    (rather than NaN); with ``score_threshold=-inf`` a -inf score is selected too.
    A box with a NaN coordinate neither decays nor is decayed. IoU is computed in
    fp32 for fp32/fp16/bf16 input: a box whose area overflows or underflows fp32
    (see ``nms``) has IoU 0 or NaN with every box and behaves the same way, except
    that ``"hard"`` with ``iou_threshold <= 0`` drops boxes at IoU 0.

    Not differentiable (post-processing): the outputs never require grad.
    """
    return _soft(boxes, scores, None, iou_threshold, sigma, score_threshold, method)


@_utils.fx_leaf
def batched_soft_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float = 0.3,
                     sigma: float = 0.5, score_threshold: float = 1e-3,
                     method: str = "gaussian") -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS independently per category ``idxs``, in one call.

    Returns ``(keep, decayed_scores)``, scores in the common dtype of ``boxes``
    and ``scores`` as in ``soft_nms``, sorted by decreasing decayed score (NaN
    first; ties: lower category first, then selection order), also with a single
    category: with negative scores this can differ from ``soft_nms``'s selection
    order (see there). For fp16/bf16 the sort uses the fp32 decayed scores, before
    they are rounded: scores equal after rounding keep their fp32 order rather
    than the category order. Not differentiable: the outputs never require grad.
    """
    if idxs is None:
        raise TypeError("idxs must be a tensor of categories")
    return _soft(boxes, scores, idxs, iou_threshold, sigma, score_threshold, method)

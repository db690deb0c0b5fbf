"""Losses: sigmoid_focal_loss and dice_loss (fused forward and backward kernels).

C++ on the CPU (csrc/cpu/losses.cpp), Triton on CUDA (kernels/losses.py); the
per-element math is in csrc/common/losses.h.
"""

import torch

from . import _utils
from ._library import ops


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017); drop-in for ``torchvision.ops.sigmoid_focal_loss``.

    ``loss = a_t * BCEWithLogits(inputs, targets) * (1 - p_t) ** gamma`` with
    ``p = sigmoid(inputs)``, ``p_t = p t + (1 - p)(1 - t)``, ``a_t = alpha t +
    (1 - alpha)(1 - t)`` (no weight when ``alpha = -1``). One fused kernel each way;
    gradients reach ``inputs`` and (soft) ``targets``. The result has the dtype of
    ``inputs`` (computed in fp32, fp64 for fp64). ``reduction``: ``"none"``,
    ``"mean"`` or ``"sum"``; as in torchvision, the mean of an empty input is NaN.
    """
    _utils.check_tensor("inputs", inputs)
    _utils.check_tensor("targets", targets)
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be floating point, got {inputs.dtype}")
    if targets.dtype.is_complex:
        raise TypeError(f"targets must be real, got {targets.dtype}")
    if targets.shape != inputs.shape:
        raise ValueError(f"targets must have the shape of inputs {list(inputs.shape)}, got {list(targets.shape)}")
    _utils.check_same_device(inputs=inputs, targets=targets)
    alpha = _utils.check_float("alpha", alpha)
    gamma = _utils.check_float("gamma", gamma)
    if not (0 <= alpha <= 1) and alpha != -1:
        raise ValueError(f"alpha must be in [0, 1], or -1 to disable the weight, got {alpha}")
    _utils.check_reduction(reduction)
    loss = ops.sigmoid_focal_loss(inputs, targets.to(inputs.dtype), alpha, gamma)
    if reduction == "mean":
        return loss.mean()
    return _utils.reduce(loss, reduction)


_NO_IGNORE = -(2**63)  # a target value no class can have


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, ignore_index=None, classes=None,
              reduction: str = "mean") -> torch.Tensor:
    """Multiclass soft Dice loss from logits (softmax over dim 1 inside).

    ``logits``: ``[N, C, ...]``; ``target``: int64 ``[N, ...]`` class indices. Per
    class c, over the whole batch and every position whose target is not
    ``ignore_index``: ``I_c = sum p_c [y = c]``, ``S_c = sum p_c + sum [y = c]``,
    ``loss_c = 1 - (2 I_c + smooth) / (S_c + smooth)``. ``classes`` (a list of class
    indices, default all) selects the classes; ``reduction`` ``"mean"`` / ``"sum"``
    over them, or ``"none"`` for the per-class losses. A class absent from the
    target and never predicted has loss ``1 - smooth / (S_c + smooth)``; with every
    position ignored, every class has loss 0 (when smooth > 0). One fused pass
    computes the statistics and one computes their gradient; the loss is fp32
    (fp64 for fp64 logits). Target values outside ``[0, C)`` that are not
    ``ignore_index`` raise.
    """
    _utils.check_tensor("logits", logits)
    _utils.check_tensor("target", target)
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.dim() < 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [N, C, ...] with C >= 1, got {list(logits.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target must be [N, ...] = {list(logits.shape[:1] + logits.shape[2:])}, "
                         f"got {list(target.shape)}")
    _utils.check_same_device(logits=logits, target=target)
    smooth = _utils.check_float("smooth", smooth)
    _utils.check_reduction(reduction)
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
    ii = _NO_IGNORE if ignore_index is None else ignore_index
    inter, card = ops.dice_stats(logits, target.to(torch.int64), ii)
    loss = 1 - (2 * inter + smooth) / (card + smooth)
    if classes is not None:
        idx = torch.as_tensor(classes, dtype=torch.int64)
        if idx.dim() != 1 or idx.numel() == 0 or bool(((idx < 0) | (idx >= logits.shape[1])).any()):
            raise ValueError(f"classes must be a non-empty list of indices in [0, {logits.shape[1]}), got {classes}")
        loss = loss.index_select(0, idx.to(loss.device))
    return _utils.reduce(loss, reduction) if reduction != "mean" else loss.mean()

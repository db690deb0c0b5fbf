"""Losses: sigmoid_focal_loss (fused forward and backward).

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

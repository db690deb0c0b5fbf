"""Softmax cross-entropy with class-index targets (one fused pass forward, one backward), and
the same on bilinearly upsampled logits without materialising them.

Same values and gradients as ``F.cross_entropy`` for ``[N, C]`` and ``[N, C, d1, ...]``
logits with class-index targets, ``weight``, ``ignore_index``, ``reduction`` and
``label_smoothing`` (with torch's weighted-mean normalisation). The forward keeps two
numbers per position, the largest logit m and log(sum exp(z - m)); the backward
recomputes the softmax from them. Every log-softmax difference is taken from m, so fp32
keeps torch's precision at large logits (all logits near 1e8, or a loss near 0). C++ on
the CPU (csrc/cpu/cross_entropy.cpp), Triton on CUDA (kernels/cross_entropy.py). The
loss is fp32 (fp64 for fp64 logits), fp16/bf16 logits are read with fp32 accumulation.
As torch does, the mean is NaN when the target weights sum to 0 (every target
``ignore_index``, or only zero-weight classes), and so is its gradient at the positions
that are not ignored. A target outside ``[0, C)`` that is not
``ignore_index`` raises on the CPU; on CUDA it is never used as an index and makes its
loss, the mean and the gradients NaN (rejecting it would cost a device-to-host sync).
Only the logits are differentiable (a ``weight`` that requires grad is an error, as in
torch), and only once (double backward raises). A term whose factor is 0 is left out: with
``label_smoothing=1.0`` a -inf target logit gives an infinite loss where torch's
0 * inf gives NaN (the gradients agree). Label smoothing adds the classes' terms from the
largest logit: an infinite class weight on the class that holds it gives a NaN loss
(inf * 0) where torch's is inf.

Logits whose classes are innermost in memory (channels_last, or a sequence-first ``[T, B,
C]`` passed as ``[B, C, T]``) go to the ``[N, C]`` kernels as the view of their positions in
memory order: nothing is copied and the gradient takes the logits' layout. Other layouts
are copied to contiguous memory and give a contiguous gradient.

Training step on CUDA: where the logits require grad and the reduction is mean or sum, the
forward also writes the gradient for a loss gradient of 1, in the same pass over the logits
(they are read once a step, not twice), and the backward only scales it in place by the
incoming loss gradient, reading nothing when that is 1 (``loss.backward()``). The gradient's
memory is then taken at the forward instead of at the backward, and a loss gradient other
than 1 (a GradScaler, a weighted sum of losses) costs a pass more than two ops would. Not for
fp16 logits, [N, C] logits (nor classes innermost, run as [N, C]), under saved-tensor hooks or
torch.compile (``_with_grad``).
``FUSED_GRAD_DEVICES`` lists the device types that do this.
"""

import math

import torch

from . import _utils
from ._library import ops


def _check_options(logits, target, weight, ignore_index, reduction, label_smoothing):
    c = logits.shape[1]
    if c < 1:
        raise ValueError(f"logits must have at least one class (dim 1), got shape {list(logits.shape)}")
    if weight is not None:
        _utils.check_tensor("weight", weight)
        _utils.check_float_dtype("weight", weight)
        if weight.shape != (c,):
            raise ValueError(f"weight must have shape [C] = [{c}], got {list(weight.shape)}")
        _utils.check_same_device(logits=logits, weight=weight)
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError("weight must not require grad: the loss is not differentiable with respect to weight")
    _utils.check_same_device(logits=logits, target=target)
    _utils.check_reduction(reduction)
    eps = _utils.check_float("label_smoothing", label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return eps, _utils.check_int64("ignore_index", ignore_index)


# Device types whose training step writes the gradient in the forward (module docstring). On
# the CPU that op is the forward and backward passes anyway.
FUSED_GRAD_DEVICES = ("cuda",)


def _with_grad(logits, s, reduction):
    """Whether a call takes softmax_cross_entropy_with_grad: not for fp16 logits (their
    gradient for a loss gradient of 1, p / wsum under the mean, is often below fp16's range,
    where a GradScaler's scale would have kept it), not for [N, C] logits (the row kernels do
    not write it in one pass), nor under saved-tensor hooks (checkpointing, offloading: they
    cannot reach the gradient the node keeps) or torch.compile."""
    return (reduction != "none" and s > 1 and logits.dtype != torch.float16
            and logits.device.type in FUSED_GRAD_DEVICES and logits.requires_grad and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # first: dynamo cannot trace the hooks' query
            and not _saved_tensor_hooks())


def _saved_tensor_hooks():
    """Whether saved-tensor hooks are active (True where torch cannot say)."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):
        return True


# The ops take the reduction as torch numbers it; the kernels reduce (no separate sum kernels).
_REDUCTION = {"none": 0, "mean": 1, "sum": 2}


def _check_tensors(logits, target):
    _utils.check_tensor("logits", logits)
    _utils.check_tensor("target", target)
    _utils.check_float_dtype("logits", logits)
    _utils.check_integer("target", target, "hold integer class indices", labels=True)


@_utils.fx_leaf
def softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight=None, ignore_index: int = -100,
                          reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of ``softmax(logits, dim=1)``; see the module docstring."""
    _check_tensors(logits, target)
    out_shape = target.shape
    if logits.dim() == 1:  # unbatched: [C] and a scalar target
        if target.dim() != 0:
            raise ValueError(f"target must be a scalar (0-d) for unbatched logits [C]; got {list(target.shape)}")
        logits, target = logits[None], target.reshape(1)
    if logits.dim() < 2 or target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target must be [N, d1, ...] for logits [N, C, d1, ...]; got logits "
                         f"{list(logits.shape)} and target {list(target.shape)}")
    eps, ignore_index = _check_options(logits, target, weight, ignore_index, reduction, label_smoothing)
    n, c = logits.shape[:2]
    order = _utils.memory_order(logits)
    if order is not None and order[-1] == 1:
        # Classes innermost (channels_last): the [N, C] op on the positions in memory order, a
        # view (no copy), so that the gradient takes the logits' layout.
        t_order = [d - (d > 1) for d in order[:-1]]  # the target's dims: the logits' but C
        t = target.permute(t_order)
        loss = ops.softmax_cross_entropy(logits.permute(order).reshape(-1, c, 1), t.reshape(-1, 1).to(torch.int64),
                                         weight, ignore_index, eps, _REDUCTION[reduction])[0]
        if reduction != "none":
            return loss
        return loss.view(t.shape).permute(_utils.inverse_permutation(t_order))
    s = math.prod(logits.shape[2:])  # not -1: reshape cannot infer it when n == 0
    op = ops.softmax_cross_entropy_with_grad if _with_grad(logits, s, reduction) else ops.softmax_cross_entropy
    loss = op(logits.reshape(n, c, s), target.reshape(n, s).to(torch.int64), weight, ignore_index, eps,
              _REDUCTION[reduction])[0]
    return loss.view(out_shape) if reduction == "none" else loss


@_utils.fx_leaf
def upsample_cross_entropy(logits: torch.Tensor, target: torch.Tensor, align_corners: bool = False, weight=None,
                           ignore_index: int = -100, reduction: str = "mean",
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """``F.cross_entropy(F.interpolate(logits, size=target.shape[-2:], mode="bilinear",
    align_corners=align_corners), target, ...)`` without the upsampled logits.

    ``logits``: ``[N, C, h, w]``; ``target``: ``[N, H, W]``. Forward and backward go
    one output row at a time; the gradient reaches the low-resolution logits
    directly, accumulated in a fixed order (deterministic). Extra memory is two
    ``[N, H, W]`` fp32 maps (max logit, log-sum; and the loss itself for
    ``reduction="none"``); the CUDA backward adds a block of classes' gradient summed
    along x (``[N, c, H, w]`` with ``c * w <= max(W, w)``: at most ``N * H * max(W, w)``
    values).
    """
    _check_tensors(logits, target)
    if logits.dim() != 4 or target.dim() != 3 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"logits must be [N, C, h, w] and target [N, H, W]; got {list(logits.shape)} and "
                         f"{list(target.shape)}")
    if logits.shape[2] == 0 or logits.shape[3] == 0:
        raise ValueError(f"logits must have a non-empty spatial size, got {list(logits.shape)}")
    if target.shape[1] == 0 or target.shape[2] == 0:  # F.interpolate refuses an empty size too
        raise ValueError(f"target must have a non-empty spatial size, got {list(target.shape)}")
    eps, ignore_index = _check_options(logits, target, weight, ignore_index, reduction, label_smoothing)
    align_corners = _utils.check_align_corners(align_corners)
    loss, _, _ = ops.upsample_cross_entropy(logits, target.to(torch.int64), align_corners, weight, ignore_index,
                                            eps, _REDUCTION[reduction])
    return loss

"""Losses: sigmoid_focal_loss, dice_loss, lovasz_softmax and lovasz_hinge.

C++ on the CPU (csrc/cpu/losses.cpp), Triton on CUDA (kernels/losses.py); the
per-element math is in csrc/common/losses.h.
"""

import math

import torch

from . import _utils
from ._library import _acc_dtype, ops


@_utils.fx_leaf
def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> torch.Tensor:
    """Sigmoid focal loss (Lin et al. 2017); drop-in for ``torchvision.ops.sigmoid_focal_loss``.

    ``loss = a_t * BCEWithLogits(inputs, targets) * (1 - p_t) ** gamma`` with
    ``p = sigmoid(inputs)``, ``p_t = p t + (1 - p)(1 - t)``, ``a_t = alpha t +
    (1 - alpha)(1 - t)`` (no weight when ``alpha = -1``). One fused kernel each way;
    gradients reach ``inputs`` and (soft) ``targets``. The result has the dtype torch
    promotes ``inputs`` and floating ``targets`` to, as torchvision's (fp16 logits with fp32
    targets give an fp32 loss), or that of ``inputs`` for integer or bool ``targets`` (which
    torchvision rejects); under ``torch.autocast`` fp16/bf16 give fp32, as torchvision's. It
    is computed in fp32, fp64 for fp64. ``reduction``: ``"none"``,
    ``"mean"`` or ``"sum"``; as in torchvision, the mean of an empty input is NaN, and
    with ``"none"`` channels_last ``inputs`` and ``targets`` give a channels_last loss.
    A target outside ``[0, 1]`` can make ``1 - p_t`` negative: its power follows
    ``torch.pow`` (real for an integral ``gamma``, NaN for a fractional one). With
    ``gamma < 0`` the power overflows to inf where ``1 - p_t`` is tiny; where the input
    agrees with a hard target by 87 or more in fp32 (``inputs >= 87`` at ``targets = 1``,
    ``<= -87`` at 0) both it and the cross-entropy underflow to 0, and the loss is
    0 * inf = NaN (torchvision's is inf or NaN there). Infinite ``inputs`` give the
    loss's and gradients' limits (0 where a hard target agrees, inf where it does not),
    where torchvision's cross-entropy gives NaN.
    """
    _utils.check_tensor("inputs", inputs)
    _utils.check_tensor("targets", targets)
    _utils.check_float_dtype("inputs", inputs)
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
    if targets.is_floating_point():
        inputs = inputs.to(torch.promote_types(inputs.dtype, targets.dtype))
    targets = targets.to(inputs.dtype)
    order = _utils.memory_order(inputs)
    if order is not None and targets.permute(order).is_contiguous():
        # Elementwise, both in one layout: run on the views in memory order, so that the loss
        # and the gradients take that layout, as from torchvision's elementwise ops (and no
        # input is copied). Layouts that differ give contiguous results, as there.
        loss = ops.sigmoid_focal_loss(inputs.permute(order), targets.permute(order), alpha, gamma)
        loss = loss.permute(_utils.inverse_permutation(order))
    else:
        loss = ops.sigmoid_focal_loss(inputs, targets, alpha, gamma)
    if reduction == "mean":
        return loss.mean()
    return _utils.reduce(loss, reduction)


_NO_IGNORE = -(2**63)  # a target value no class can have


def _check_ignore_index(ignore_index):
    """None or an int64 value (returned as an int); -2**63 is _NO_IGNORE, so it cannot be one."""
    if ignore_index is None:
        return None
    value = _utils.check_int64("ignore_index", ignore_index)
    if value == _NO_IGNORE:
        raise ValueError(f"ignore_index must be in [-2**63 + 1, 2**63 - 1], got {ignore_index}")
    return value


def _check_classes(classes, c: int, expected: str) -> list:
    """A non-empty list (or tuple) of int class indices in [0, c), checked in Python: no tensor
    value decides anything, so torch.compile(fullgraph=True) traces it. A repeated index stays."""
    if not isinstance(classes, (list, tuple)) or not all(_utils.is_int(k) for k in classes):
        raise TypeError(f"classes must be {expected}, got {classes!r}")
    classes = [int(k) for k in classes]  # NumPy ints too, as every other int argument
    if len(classes) == 0 or any(not 0 <= k < c for k in classes):
        raise ValueError(f"classes must be a non-empty list of indices in [0, {c}), got {classes}")
    return classes


@_utils.fx_leaf
def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, ignore_index=None, classes=None,
              reduction: str = "mean") -> torch.Tensor:
    """Multiclass soft Dice loss from logits (softmax over dim 1 inside).

    ``logits``: ``[N, C, ...]``; ``target``: int64 ``[N, ...]`` class indices. Per
    class c, over the whole batch and every position whose target is not
    ``ignore_index``: ``I_c = sum p_c [y = c]``, ``S_c = sum p_c + sum [y = c]``,
    ``loss_c = 1 - (2 I_c + smooth) / (S_c + smooth)``; ``smooth`` is finite and
    ``>= 0``. ``classes`` (None for all, or a list of int class indices; a repeated
    index counts again) selects the classes; ``reduction`` ``"mean"`` / ``"sum"``
    over them, or ``"none"`` for the per-class losses in that order. A class absent
    from the target and never predicted has loss ``1 - smooth / (S_c + smooth)``;
    with every position ignored, every class has loss 0 (when smooth > 0). Ignored
    positions count for nothing whatever their logits (NaN too); a NaN logit at a
    counted position makes every class's loss NaN. One fused pass computes the
    statistics and one computes their gradient; the loss is fp32 (fp64 for fp64
    logits). ``ignore_index``: None or an int in ``(-2**63, 2**63)``. Target values
    outside ``[0, C)`` that are not ``ignore_index`` raise on the CPU; on CUDA
    (rejecting them would need a device-to-host sync) they make every class's loss and
    the gradient NaN, and are never used as an index.
    """
    _utils.check_tensor("logits", logits)
    _utils.check_tensor("target", target)
    _utils.check_float_dtype("logits", logits)
    if logits.dim() < 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must be [N, C, ...] with C >= 1, got {list(logits.shape)}")
    _utils.check_integer("target", target, "hold integer class indices", labels=True)
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target must be [N, ...] = {list(logits.shape[:1] + logits.shape[2:])}, "
                         f"got {list(target.shape)}")
    _utils.check_same_device(logits=logits, target=target)
    smooth = _utils.check_float("smooth", smooth)
    if not 0 <= smooth < math.inf:
        raise ValueError(f"smooth must be finite and >= 0, got {smooth}")
    _utils.check_reduction(reduction)
    if classes is not None:
        classes = _check_classes(classes, logits.shape[1], "None or a list of int class indices")
    ignore_index = _check_ignore_index(ignore_index)
    ii = _NO_IGNORE if ignore_index is None else ignore_index
    inter, card = ops.dice_stats(logits, target.to(torch.int64), ii)
    loss = 1 - (2 * inter + smooth) / (card + smooth)
    if classes is not None:
        loss = loss.index_select(0, torch.tensor(classes, dtype=torch.int64, device=loss.device))
    return _utils.reduce(loss, reduction) if reduction != "mean" else loss.mean()


def _lovasz_rows(errors: torch.Tensor, fg: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Lovasz extension of each row: dot(relu(errors sorted descending), Lovasz gradient of the
    ground truth in that order). One stable sort for all rows (ties: lower position first);
    invalid entries sort last and count for nothing."""
    # Invalid entries are -inf; a valid error of -inf (an infinite logit on the right side) is
    # raised to the lowest finite value so that it still sorts before them. Its ReLU, and so its
    # loss and gradient, is 0 either way; NaN stays NaN.
    e = torch.where(valid, errors.clamp(min=torch.finfo(errors.dtype).min), float("-inf"))
    e_sorted, perm = torch.sort(e, dim=1, descending=True, stable=True)
    acc = torch.float64 if errors.dtype == torch.float64 else torch.float32
    fg_sorted = torch.gather(fg.to(acc), 1, perm)
    grad = ops.lovasz_gradient(fg_sorted, valid.sum(1))
    return (e_sorted.clamp(min=0).to(acc) * grad).sum(1)


def _flatten_seg(name: str, x: torch.Tensor, labels: torch.Tensor, with_classes: bool):
    _utils.check_tensor(name, x)
    _utils.check_tensor("labels", labels)
    _utils.check_float_dtype(name, x)
    _utils.check_integer("labels", labels, labels=True)
    spatial = x.shape[2:] if with_classes else x.shape[1:]
    if x.dim() < (3 if with_classes else 2) or labels.shape != x.shape[:1] + spatial:
        want = "[N, C, d1, ...] (at least 3-D)" if with_classes else "[N, d1, ...] (at least 2-D)"
        raise ValueError(f"{name} must be {want} and labels [N, d1, ...] with the same N and positions; got "
                         f"{list(x.shape)} and {list(labels.shape)}")
    _utils.check_same_device(**{name: x, "labels": labels})


@_utils.fx_leaf
def lovasz_softmax(probas: torch.Tensor, labels: torch.Tensor, classes="present", per_image: bool = False,
                   ignore_index=None, from_logits: bool = False) -> torch.Tensor:
    """Lovasz-softmax loss (Berman et al., CVPR 2018), all classes and images in one batched pass.

    ``probas``: ``[N, C, ...]`` softmax probabilities (or logits with
    ``from_logits=True``); ``labels``: ``[N, ...]``. Per class c, the errors
    ``|[y = c] - p_c|`` over the valid positions are sorted in decreasing order
    (stable: ties keep position order, so gradients are deterministic) and
    ``loss_c`` is their dot product with the Lovasz gradient of the sorted ground
    truth (Algorithm 1; counts are int64, exact at any size). ``classes``:
    ``"present"`` averages over classes present in the labels, ``"all"`` over all,
    or a list of int class indices (a repeated index counts again, as in dice_loss).
    ``per_image=True`` averages per-image losses. No valid position (N = 0 too), or
    no present class: the loss is 0 with zero gradients. A NaN probability makes its
    class's loss NaN; a class left out of the average (absent with ``"present"``, or
    not listed) never affects the result. Ignored positions count for nothing
    whatever their values (NaN logits too, with ``from_logits=True``): their
    gradient is 0. A label outside ``[0, C)`` that is not ``ignore_index`` raises on
    the CPU; on CUDA (rejecting it would need a device-to-host sync) it makes the
    loss and its gradient NaN. The loss is fp32 (fp64 for fp64 input). One op computes every row's
    loss and its gradient: on the CPU each (group, class) row is a stable radix sort
    and one walk, rows in parallel; on CUDA, a chunk of classes at a time, one batched
    torch sort between three Triton kernels (errors; foreground counts in sorted order;
    the gradient scan, the loss and d loss / d probas written to each position).
    """
    _flatten_seg("probas", probas, labels, with_classes=True)
    ignore_index = _check_ignore_index(ignore_index)
    _utils.check_bool("per_image", per_image)
    _utils.check_bool("from_logits", from_logits)
    n, c = probas.shape[:2]
    if c < 1:
        raise ValueError(f"probas must have at least one class (dim 1), got shape {list(probas.shape)}")
    sel = None
    if isinstance(classes, str):
        if classes not in ("present", "all"):
            raise ValueError(f"classes must be 'present', 'all' or a list of class indices, got {classes!r}")
    else:
        sel = _check_classes(classes, c, "'present', 'all' or a list of int class indices")
    s = math.prod(probas.shape[2:])  # explicit: reshape(n, c, -1) fails for 0 elements
    # int64 before any comparison: a uint8 label tensor would compare with ignore_index
    # wrapped into its range (256 as 0), not as the op below sees it
    labels = labels.to(torch.int64)
    p = probas
    if from_logits:
        if ignore_index is not None:  # ignored logits, NaN too, must not reach the softmax backward
            p = torch.where((labels != ignore_index).unsqueeze(1), p, 0.0)
        # fp16/bf16 logits: probabilities in fp32 (rounding them to the input dtype first
        # costs ~3 significant digits of the gradient), as lovasz_hinge and dice_loss do
        p = torch.softmax(p, dim=1, dtype=torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else None)
    losses, _, counts = ops.lovasz_softmax_rows(p.reshape(n, c, s), labels.reshape(n, s), ignore_index, per_image)
    g = losses.shape[0]
    if sel is not None:
        # a class listed k times has weight k, as in the paper's loop over the list (and dice_loss)
        idx = torch.tensor(sel, dtype=torch.int64, device=losses.device)
        weight = torch.zeros(c, dtype=losses.dtype, device=losses.device).index_add_(
            0, idx, torch.ones(len(sel), dtype=losses.dtype, device=losses.device))
        weight = weight.expand(g, c)
    elif classes == "present":
        weight = (counts > 0).to(losses.dtype)
    else:
        weight = torch.ones_like(losses)
    # a select, not only a product: 0 * NaN would let a class left out of the average decide it
    per_group = (torch.where(weight > 0, losses, 0.0) * weight).sum(1) / weight.sum(1).clamp(min=1)
    loss = _utils.reduce(per_group, "mean")  # no group (N = 0, per image): 0
    if labels.device.type == "cpu":  # the CPU op raises
        return loss
    bad = (labels < 0) | (labels >= c)
    return _utils.nan_if_any(loss, bad if ignore_index is None else bad & (labels != ignore_index))


@_utils.fx_leaf
def lovasz_hinge(logits: torch.Tensor, labels: torch.Tensor, per_image: bool = True, ignore_index=None):
    """Binary Lovasz hinge loss (Berman et al. 2018) on ``[N, ...]`` logits and {0, 1} labels.

    Errors ``1 - logit * (2 label - 1)``, sorted descending (stable), dotted with the
    Lovasz gradient after a ReLU; ``per_image=True`` averages per-image losses. An
    image with no valid position contributes 0; no valid position at all (N = 0 too)
    gives 0 with zero gradients. The loss is fp32 (fp64 for fp64).
    A label other than 0, 1 and ``ignore_index`` raises ValueError in eager mode on
    the CPU; under ``torch.compile``, on CUDA (where raising would be a graph break
    or a device-to-host sync) and for labels batched by ``torch.func.vmap`` it makes
    the loss and its gradient NaN.
    """
    _flatten_seg("logits", logits, labels, with_classes=False)
    ignore_index = _check_ignore_index(ignore_index)
    _utils.check_bool("per_image", per_image)
    labels = labels.to(torch.int64)  # as in lovasz_softmax: no comparison in a narrower type
    bad = (labels != 0) & (labels != 1)
    if ignore_index is not None:
        bad &= labels != ignore_index
    checked = labels.device.type == "cpu" and not torch.compiler.is_compiling() and not _utils.is_vmapped(labels)
    if checked and bool(bad.any()):
        raise ValueError(f"labels must be 0, 1 or ignore_index, got {labels[bad][0].item()}")
    n, s = logits.shape[0], math.prod(logits.shape[1:])
    x = logits.reshape(n, s)
    y = labels.reshape(n, s)
    valid = torch.ones_like(y, dtype=torch.bool) if ignore_index is None else y != ignore_index
    if not per_image:
        x, y, valid = x.reshape(1, -1), y.reshape(1, -1), valid.reshape(1, -1)
    fg = (y == 1) & valid
    x = x.to(_acc_dtype(x.dtype))  # fp16 / bf16 errors would round (1 - 1e-4 is 1 in fp16)
    errors = 1 - x * (2 * fg.to(x.dtype) - 1)
    loss = _utils.reduce(_lovasz_rows(errors, fg, valid), "mean")  # no image (N = 0, per image): 0
    return loss if checked else _utils.nan_if_any(loss, bad)

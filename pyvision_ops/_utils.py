"""Argument checks shared by the Python fronts. Errors name the argument."""

import functools
import numbers

import torch
from torch._prims_common import suggest_memory_format as _suggest_memory_format
from torch.fx import Proxy

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_UINT_WIDE = (torch.uint16, torch.uint32, torch.uint64)  # few ops of torch's take them; a cast does


def check_float_dtype(name: str, t: torch.Tensor) -> None:
    """fp16, bf16, fp32 or fp64 (not the float8 types, which the kernels do not take)."""
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating point tensor (fp16, bf16, fp32 or fp64), got {t.dtype}")


def fx_leaf(fn):
    """Under ``torch.fx.symbolic_trace`` a call of ``fn`` becomes one graph node, from any
    call site (``torch.fx.wrap`` only patches the calling module's globals): the argument
    checks need real tensors, which a Proxy is not. A Proxy is looked for among the
    arguments and one level into lists, tuples and dicts (boxes per image, feature maps)."""

    @functools.wraps(fn)
    def leaf(*args, **kwargs):
        proxy = find_proxy((*args, *kwargs.values()))
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", leaf, args, kwargs)
        return fn(*args, **kwargs)

    return leaf


def find_proxy(values):
    """The first torch.fx Proxy in values, or one level into a list, tuple or dict in them."""
    for v in values:
        if isinstance(v, Proxy):
            return v
        if isinstance(v, (list, tuple, dict)):
            for u in v.values() if isinstance(v, dict) else v:
                if isinstance(u, Proxy):
                    return u
    return None


def check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_integer(name: str, t: torch.Tensor, what: str = "be an integer tensor", labels: bool = False) -> None:
    """An integer tensor, not bool; with ``labels`` (class indices, compared with C and
    ignore_index after a cast to int64) not uint64 either: its values past 2^63 would wrap to
    negative ones there (one of them onto ignore_index)."""
    if t.dtype not in _INT_DTYPES + _UINT_WIDE:  # not bool, quantized or sub-byte types either
        raise TypeError(f"{name} must {what}, got {t.dtype}")
    if labels and t.dtype == torch.uint64:
        raise TypeError(f"{name} must {what} in a dtype that int64 holds (not torch.uint64)")


def check_boxes(name: str, t, min_dim: int = 1) -> torch.Tensor:
    """A [..., 4] tensor of float or integer coordinates."""
    check_tensor(name, t)
    if t.dtype not in _FLOAT_DTYPES + _INT_DTYPES:
        raise TypeError(f"{name} must have a floating point or integer dtype, got {t.dtype}")
    if t.dim() < min_dim or t.shape[-1] != 4:
        lead = "..., N, 4" if min_dim == 2 else "..., 4"
        raise ValueError(f"{name} must have shape [{lead}], got {list(t.shape)}")
    return t


def check_same_device(**tensors) -> None:
    (n0, t0), *rest = tensors.items()
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {n0} is on {t0.device}; they must be on one device")


def suggests_channels_last(t: torch.Tensor) -> bool:
    """Whether torch lays out an op's output for input ``t`` as channels_last (its
    suggest_memory_format): by the strides, so also where ``t`` is NCHW-contiguous as well (a
    channels_last model's 1x1 pooled branch); False inside ``torch.func.vmap``, which cannot
    answer it for a batched tensor (the op's result is then contiguous)."""
    # under vmap the strides are one example's, but a batched tensor cannot take the layout
    # (is_compiling first: dynamo cannot trace the functorch query)
    if not torch.compiler.is_compiling() and is_vmapped(t):
        return False
    try:
        return _suggest_memory_format(t) == torch.channels_last
    except RuntimeError:
        return False


def memory_order(t: torch.Tensor) -> list[int] | None:
    """The dims of ``t`` from outermost to innermost in memory, where ``t`` is a permuted
    contiguous tensor other than a contiguous one (``t.permute(order)`` is contiguous; a
    detection head's ``[N, C, H, W] -> [N, H * W, C]`` view, channels_last): an op run on
    that view without a copy, its result permuted back (``inverse_permutation``), gives results
    and gradients with t's strides, as torch's elementwise ops do, instead of contiguous ones
    that slow what follows (a gradient in another layout than the activations it meets). None
    otherwise, and under vmap."""
    if t.dim() < 2 or t.is_contiguous() or (not torch.compiler.is_compiling() and is_vmapped(t)):
        return None
    try:
        strides, order = t.stride(), list(range(t.dim()))
    except RuntimeError:  # a tensor without strides (batched under compile)
        return None
    for i in range(1, len(order)):  # by decreasing stride, ties in order (dynamo cannot sort by a key)
        j = i
        while j > 0 and strides[order[j - 1]] < strides[order[j]]:
            order[j - 1], order[j] = order[j], order[j - 1]
            j -= 1
    return order if t.permute(order).is_contiguous() else None


def inverse_permutation(order: list[int]) -> list[int]:
    """``back`` with ``x.permute(order).permute(back)`` equal to ``x`` (a loop: dynamo traces it)."""
    back = [0] * len(order)
    for i, d in enumerate(order):
        back[d] = i
    return back


def is_vmapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by ``torch.func.vmap`` at any level (under ``grad`` too, whose
    wrapper holds the batched tensor): its values cannot decide a Python branch."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def check_reduction(reduction) -> str:
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return reduction


def check_float(name: str, value, positive: bool = False) -> float:
    """A real number as a float: a Python or NumPy number, a 0-d real tensor, or a SymInt /
    SymFloat (torch.compile traces dynamic numbers as those); not bool or complex. NaN is
    rejected; positive=True also rejects values <= 0."""
    if type(value) in (float, int):  # the usual case first: the ABC checks below cost microseconds
        pass
    elif isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a number or a 0-d real tensor, "
                            f"got a {value.dtype} tensor of shape {list(value.shape)}")
    elif isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not isinstance(value, torch.SymFloat):  # kept symbolic: float() would specialise (a recompile per value)
        try:
            value = float(value)
        except OverflowError:
            raise ValueError(f"{name} is too large for a float") from None
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """A real bool: a truthy string such as "no" must not pass for True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_align_corners(value) -> bool:
    """A bool, or None for False as in F.interpolate."""
    return check_bool("align_corners", False if value is None else value)


def is_int(value) -> bool:
    """An int, a NumPy one too (torch and torchvision take them), not a bool (np.bool_ is not
    Integral). type() first: the ABC check costs about a microsecond."""
    return type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))


def check_int64(name: str, value) -> int:
    """An int (see is_int) that fits int64, as a Python int: what the ops' `int` arguments take."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must fit int64, got {value}")
    return value


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """torchvision's loss reduction: the mean of an empty loss is 0, not NaN."""
    if reduction == "mean":
        if torch.compiler.is_compiling():
            # the size may be data-dependent (the boxes nms keeps), which `numel() > 0`
            # could not branch on: the same value without a branch
            return loss.sum() / torch.sym_max(loss.numel(), 1)
        return loss.mean() if loss.numel() > 0 else 0.0 * loss.sum()
    if reduction == "sum":
        return loss.sum()
    return loss


def nan_if_any(loss: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``loss``, or NaN in value and gradient when ``bad`` has a True: labels that cannot be
    rejected without a device-to-host sync (CUDA, or under compile) give a NaN loss rather
    than a quietly wrong one."""
    return loss * torch.where(bad.any(), float("nan"), 1.0).to(loss.dtype)

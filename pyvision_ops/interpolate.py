"""Bilinear interpolation with a deterministic, gather-based backward.

Same values as ``F.interpolate(mode="bilinear")`` on 4-D input, including
torch's source-index rules (with ``scale_factor`` given, the source index uses
``1 / scale_factor``, not in / out). C++ on the CPU (csrc/cpu/interpolate.cpp),
Triton on CUDA (kernels/interpolate.py); both backwards are gather-based and
deterministic. fp16/bf16 are computed with fp32 accumulation. A channels_last input
gives a channels_last output, as in torch (by the strides: 1x1 pixels with channels_last
strides too, though they are NCHW-contiguous as well). An infinite input value reaches each
output that reads it through both taps, even one of weight exactly 0 (a source index on a
pixel), which gives 0 * inf = NaN there; torch's rounded weights give inf or NaN at
other positions (the same holds for ``upsample_cross_entropy`` with -inf logits).
"""

import math
import numbers

import torch

from . import _utils
from ._library import ops


def _two(value, name, kind):
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{name} must have 2 entries (H, W), got {len(value)}")
        a, b = value
    else:
        a = b = value
    # 0-d tensors as plain numbers (torch accepts them too)
    a, b = (v.item() if isinstance(v, torch.Tensor) and v.dim() == 0 else v for v in (a, b))
    for v in (a, b):
        if isinstance(v, bool) or not isinstance(v, kind):
            what = "an int" if kind is numbers.Integral else "a number"
            raise TypeError(f"{name} must be {what} or a pair, got {value!r}")
    return a, b


@_utils.fx_leaf
def interpolate_bilinear(input: torch.Tensor, size=None, scale_factor=None, align_corners: bool = False):
    """Bilinear resize of ``[N, C, H, W]``; ``size`` or ``scale_factor`` (exactly one).

    Output size with ``scale_factor`` is ``floor(in * scale_factor)``, as in torch.
    Backward: each input pixel sums its contributions in a fixed order (no atomics).
    """
    _utils.check_tensor("input", input)
    if input.dim() != 4:
        raise ValueError(f"input must be [N, C, H, W], got shape {list(input.shape)}")
    _utils.check_float_dtype("input", input)
    if (size is None) == (scale_factor is None):
        raise ValueError("give exactly one of size and scale_factor")
    h, w = input.shape[2:]
    if h == 0 or w == 0:
        raise ValueError(f"input must have a non-empty spatial size, got {list(input.shape[2:])}")
    # None is torch's default, False
    align_corners = _utils.check_align_corners(align_corners)
    if size is not None:
        oh, ow = (int(v) for v in _two(size, "size", numbers.Integral))
        sh = sw = -1.0
    else:
        sh, sw = (_utils.check_float("scale_factor", s) for s in _two(scale_factor, "scale_factor", numbers.Real))
        if not (0 < sh < math.inf and 0 < sw < math.inf):  # comparisons: math.isfinite breaks a compiled graph
            raise ValueError(f"scale_factor must be positive and finite, got {scale_factor!r}")
        if sh >= 2**31 or sw >= 2**31:  # checked first: h * sh could overflow to inf
            raise ValueError(f"the output size must be below 2^31 per side, got scale_factor={scale_factor!r}")
        # floor of h * sh (positive: truncation); symbolic under torch.compile with dynamic
        # shapes, hence sym_int, as in F.interpolate
        oh, ow = torch.sym_int(h * sh), torch.sym_int(w * sw)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"the output size must be positive, got {(oh, ow)}")
    if oh >= 2**31 or ow >= 2**31:
        raise ValueError(f"the output size must be below 2^31 per side, got {(oh, ow)} "
                         f"(size={size!r}, scale_factor={scale_factor!r})")
    out = ops.upsample_bilinear(input, oh, ow, align_corners, sh, sw)
    if _utils.suggests_channels_last(input):
        out = out.contiguous(memory_format=torch.channels_last)
    return out

"""Bilinear interpolation: Triton kernels (the CUDA backend) and their launchers.

The launchers compute each axis' taps (two source cells and weights per output
index) with the same formula as csrc/common/interpolate.h, in the accumulation
dtype. Forward: one program per block of output pixels of one plane. Backward:
gather-based, one program per block of input pixels; each input pixel walks the
contiguous range of output rows/columns that read it, in a fixed order, so the
result is deterministic (no atomics).
"""

import torch
import triton
import triton.language as tl


def axis_taps(n_in, n_out, align_corners, scale, acc, device):
    """(i0, i1, w0, w1) per output index, and per input index the range [lo, hi) of outputs reading it."""
    d = torch.arange(n_out, device=device, dtype=acc)
    if n_in == n_out:
        i0 = torch.arange(n_out, device=device)
        w1 = torch.zeros(n_out, device=device, dtype=acc)
        i1 = i0
    else:
        if align_corners:
            ratio = torch.tensor(n_in - 1, dtype=acc) / (n_out - 1) if n_out > 1 else torch.tensor(0.0, dtype=acc)
            src = ratio.to(device) * d
        else:
            ratio = torch.tensor(1.0 / scale, dtype=acc) if scale > 0 else torch.tensor(n_in, dtype=acc) / n_out
            src = (ratio.to(device) * (d + 0.5) - 0.5).clamp(min=0)
        i0 = torch.floor(src).to(torch.int64).clamp(max=n_in - 1)
        w1 = (src - i0.to(acc)).clamp(0, 1)
        i1 = i0 + (i0 < n_in - 1).to(torch.int64)
    w0 = 1 - w1
    cells = torch.arange(n_in, device=device)
    lo = torch.searchsorted(i0, cells - 1, right=False)  # first output whose i0 >= cell - 1
    hi = torch.searchsorted(i0, cells, right=True)       # past the last output whose i0 <= cell
    return (i0.contiguous(), i1.contiguous(), w0.contiguous(), w1.contiguous(), lo.contiguous(), hi.contiguous())


@triton.jit
def bilinear_at(base, W, oy, ox, mask, yi0, yi1, yw0, yw1, xi0, xi1, xw0, xw1):
    """Value at outputs (oy, ox) of the bilinearly resized plane at `base` (row length W)."""
    a0 = tl.load(yi0 + oy, mask=mask, other=0)
    a1 = tl.load(yi1 + oy, mask=mask, other=0)
    b0 = tl.load(xi0 + ox, mask=mask, other=0)
    b1 = tl.load(xi1 + ox, mask=mask, other=0)
    wa0 = tl.load(yw0 + oy, mask=mask, other=0.0)
    wa1 = tl.load(yw1 + oy, mask=mask, other=0.0)
    wb0 = tl.load(xw0 + ox, mask=mask, other=0.0)
    wb1 = tl.load(xw1 + ox, mask=mask, other=0.0)
    acc = wa0.dtype
    v00 = tl.load(base + a0 * W + b0, mask=mask, other=0.0).to(acc)
    v01 = tl.load(base + a0 * W + b1, mask=mask, other=0.0).to(acc)
    v10 = tl.load(base + a1 * W + b0, mask=mask, other=0.0).to(acc)
    v11 = tl.load(base + a1 * W + b1, mask=mask, other=0.0).to(acc)
    return wa0 * (wb0 * v00 + wb1 * v01) + wa1 * (wb0 * v10 + wb1 * v11)


@triton.jit
def tap_weight(i0, i1, w0, w1, o, mask, cell):
    """Weight with which output index o reads input `cell` along one axis (0 if it does not)."""
    return tl.where(tl.load(i0 + o, mask=mask, other=-1) == cell, tl.load(w0 + o, mask=mask, other=0.0), 0.0) \
        + tl.where(tl.load(i1 + o, mask=mask, other=-1) == cell, tl.load(w1 + o, mask=mask, other=0.0), 0.0)


@triton.jit
def _forward_kernel(x_ptr, out_ptr, yi0, yi1, yw0, yw1, xi0, xi1, xw0, xw1, H, W, OH, OW,
                    BLOCK: tl.constexpr):
    plane = tl.program_id(1).to(tl.int64)
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < OH * OW
    val = bilinear_at(x_ptr + plane * H * W, W, o // OW, o % OW, m, yi0, yi1, yw0, yw1, xi0, xi1, xw0, xw1)
    tl.store(out_ptr + plane * OH * OW + o, val.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _backward_kernel(g_ptr, gin_ptr, yi0, yi1, yw0, yw1, ylo, yhi, xi0, xi1, xw0, xw1, xlo, xhi, H, W, OH, OW,
                     MAX_SY: tl.constexpr, MAX_SX: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = p < H * W
    y = p // W
    x = p % W
    y_lo = tl.load(ylo + y, mask=m, other=0)
    y_hi = tl.load(yhi + y, mask=m, other=0)
    x_lo = tl.load(xlo + x, mask=m, other=0)
    x_hi = tl.load(xhi + x, mask=m, other=0)
    gbase = g_ptr + plane * OH * OW
    acc = tl.zeros((BLOCK,), dtype=yw0.dtype.element_ty)
    for dy in range(MAX_SY):
        oy = y_lo + dy
        my = m & (oy < y_hi)
        wy = tap_weight(yi0, yi1, yw0, yw1, oy, my, y)
        row = tl.zeros((BLOCK,), dtype=yw0.dtype.element_ty)
        for dx in range(MAX_SX):
            ox = x_lo + dx
            mx = my & (ox < x_hi)
            wx = tap_weight(xi0, xi1, xw0, xw1, ox, mx, x)
            gv = tl.load(gbase + oy * OW + ox, mask=mx, other=0.0).to(row.dtype)
            row += wx * gv
        acc += wy * row
    tl.store(gin_ptr + plane * H * W + p, acc.to(gin_ptr.dtype.element_ty), mask=m)


_BLOCK = 256


def max_span(n_in, n_out, align_corners, scale):
    """An upper bound, from the sizes alone (no device read), on how many output indices
    read one input cell: about 2 / ratio, plus the outputs clamped onto the first and
    last cells."""
    if n_in == n_out:
        return 1
    if align_corners:
        ratio = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
        ratio = 1.0 / scale if scale > 0 else n_in / n_out
    if ratio <= 0:
        return n_out
    return min(n_out, 3 * int(1.0 / ratio) + 6)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def upsample_bilinear(input, out_h, out_w, align_corners, scale_h, scale_w):
    n, c, h, w = input.shape
    x = input.contiguous()
    out = torch.empty((n, c, out_h, out_w), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    acc = _acc(x.dtype)
    ty = axis_taps(h, out_h, align_corners, scale_h, acc, x.device)
    tx = axis_taps(w, out_w, align_corners, scale_w, acc, x.device)
    grid = (triton.cdiv(out_h * out_w, _BLOCK), n * c)
    _forward_kernel[grid](x, out, *ty[:4], *tx[:4], h, w, out_h, out_w, BLOCK=_BLOCK)
    return out


def upsample_bilinear_backward(grad, in_h, in_w, align_corners, scale_h, scale_w):
    n, c, out_h, out_w = grad.shape
    g = grad.contiguous()
    gin = torch.empty((n, c, in_h, in_w), dtype=g.dtype, device=g.device)
    if gin.numel() == 0:
        return gin
    acc = _acc(g.dtype)
    ty = axis_taps(in_h, out_h, align_corners, scale_h, acc, g.device)
    tx = axis_taps(in_w, out_w, align_corners, scale_w, acc, g.device)
    max_sy = max_span(in_h, out_h, align_corners, scale_h)
    max_sx = max_span(in_w, out_w, align_corners, scale_w)
    grid = (triton.cdiv(in_h * in_w, _BLOCK), n * c)
    _backward_kernel[grid](g, gin, *ty, *tx, in_h, in_w, out_h, out_w, MAX_SY=max_sy, MAX_SX=max_sx, BLOCK=_BLOCK)
    return gin

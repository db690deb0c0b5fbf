"""Bilinear interpolation: Triton kernels (the CUDA backend) and their launchers.

The launchers take each axis' taps (two source cells and weights per output index,
the formula of csrc/common/interpolate.h in the accumulation dtype) from `axis_taps`,
computed once per shape on the host and cached on the device. Forward: one program
per block of one output row, so the row's taps are scalars. Backward: gather-based
and separable, so deterministic without atomics: `contract_x` sums each output row
into the input columns (a fixed-order reduction over the outputs that read each
column), then `_contract_y_kernel` sums those rows into the input rows.
"""

import functools

import torch
import triton
import triton.language as tl

from .._library import _acc_dtype as acc_dtype
from . import next_power_of_2, require, row_grid


class Taps:
    """One axis' taps on a device: i0, i1, w0, w1 per output index; lo, hi per input
    cell (the outputs reading it are [lo, hi)); and the column blocking of the
    backward (cells per program `bx`, the padded block `bxp`, the outputs `fx` that a
    block of `bx` cells is read by, at most)."""

    def __init__(self, cpu, device):
        self.tensors = tuple(t.to(device) for t in cpu)
        self.i0, self.i1, self.w0, self.w1, self.lo, self.hi = self.tensors
        # CUDA: the stream they were made on, and the other streams that used them (axis_taps)
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.streams = set()
        lo, hi = cpu[4], cpu[5]
        n = lo.numel()
        self.bx, self.fx = 1, 1
        # The largest block of cells (<= 32) whose outputs fit 128 lanes, or single cells.
        for bx in range(min(32, n), 0, -1):
            first = torch.arange(0, n, bx)
            foot = int((hi[(first + bx).clamp(max=n) - 1] - lo[first]).max()) if n else 0
            if foot <= 128 or bx == 1:
                self.bx, self.fx = bx, next_power_of_2(max(foot, 16))
                break
        self.bxp = next_power_of_2(self.bx)


@functools.lru_cache(maxsize=256)
def _axis_taps(n_in, n_out, align_corners, scale, acc, device):
    d = torch.arange(n_out, dtype=acc)
    if n_in == n_out:
        i0 = torch.arange(n_out)
        w1 = torch.zeros(n_out, dtype=acc)
        i1 = i0
    else:
        if align_corners:
            ratio = torch.tensor(n_in - 1, dtype=acc) / (n_out - 1) if n_out > 1 else torch.tensor(0.0, dtype=acc)
            src = ratio * d
        else:
            ratio = torch.tensor(1.0 / scale, dtype=acc) if scale > 0 else torch.tensor(n_in, dtype=acc) / n_out
            src = (ratio * (d + 0.5) - 0.5).clamp(min=0)
        # clamped before the conversion (a tiny scale puts src past int64's range) and after
        # it (n_in - 1 as fp32 may round up past 2^24)
        i0 = torch.floor(src).clamp(max=n_in - 1).to(torch.int64).clamp(max=n_in - 1)
        w1 = (src - i0.to(acc)).clamp(0, 1)
        i1 = i0 + (i0 < n_in - 1).to(torch.int64)
    w0 = 1 - w1
    cells = torch.arange(n_in)
    lo = torch.searchsorted(i0, cells - 1, right=False)  # first output whose i0 >= cell - 1
    hi = torch.searchsorted(i0, cells, right=True)       # past the last output whose i0 <= cell
    return Taps((i0, i1, w0, w1, lo, hi), device)


# Taps used while a CUDA graph was captured: the graph keeps their pointers, so they are
# never evicted (graphs are few; the LRU's entries are as many as sizes and scales seen).
_pinned: dict = {}


def axis_taps(n_in, n_out, align_corners, scale, acc, device) -> Taps:
    """The taps of one axis (see Taps), cached per shape, options, dtype and device.

    An entry the LRU evicts is freed while kernels queued before may still read it. The
    caching allocator waits for those on the stream that made it; record_stream makes it
    wait for any other stream that used the entry too."""
    key = (int(n_in), int(n_out), bool(align_corners), float(scale), acc, torch.device(device))
    taps = _pinned.get(key) or _axis_taps(*key)
    if taps.stream is not None:
        if torch.cuda.is_current_stream_capturing():
            _pinned[key] = taps
        else:
            stream = torch.cuda.current_stream(key[5])
            if stream != taps.stream and stream not in taps.streams:
                taps.streams.add(stream)
                for t in taps.tensors:
                    t.record_stream(stream)
    return taps


@triton.jit
def row_taps(i0, i1, w0, w1, o):
    """Scalar taps of output index o."""
    return tl.load(i0 + o), tl.load(i1 + o), tl.load(w0 + o), tl.load(w1 + o)


@triton.jit
def bilinear_row(base, W, a0, a1, wa0, wa1, b0, b1, wb0, wb1, mask):
    """Values at one output row (input rows a0/a1, weights wa0/wa1: scalars) and the
    columns whose taps are b0/b1, wb0/wb1 (vectors) of the plane at `base`."""
    acc = wa0.dtype
    r0 = base + a0.to(tl.int64) * W  # a plane may hold 2^31 values
    r1 = base + a1.to(tl.int64) * W
    v00 = tl.load(r0 + b0, mask=mask, other=0.0).to(acc)
    v01 = tl.load(r0 + b1, mask=mask, other=0.0).to(acc)
    v10 = tl.load(r1 + b0, mask=mask, other=0.0).to(acc)
    v11 = tl.load(r1 + b1, mask=mask, other=0.0).to(acc)
    return wa0 * (wb0 * v00 + wb1 * v01) + wa1 * (wb0 * v10 + wb1 * v11)


@triton.jit
def column_weights(xi0, xi1, xw0, xw1, lo, hi, blk, in_w, BX, FX: tl.constexpr, BXP: tl.constexpr):
    """For the program's block of BX input columns: the outputs `ox` reading them (FX
    lanes, masked by `mo`), the columns `cells` (BXP lanes), and the taps as a pair of
    (FX, BXP) masks `ta`/`tb` (output ox[f] reads column cells[j] through its first /
    second tap) with the tap weights `wa`/`wb` per output."""
    x0 = blk * BX
    j = tl.arange(0, BXP)
    cells = x0 + j
    mc = (j < BX) & (cells < in_w)
    o0 = tl.load(lo + x0)
    o1 = tl.load(hi + tl.minimum(x0 + BX, in_w) - 1)
    ox = o0 + tl.arange(0, FX)
    mo = ox < o1
    a = tl.load(xi0 + ox, mask=mo, other=-1)
    b = tl.load(xi1 + ox, mask=mo, other=-1)
    wa = tl.load(xw0 + ox, mask=mo, other=0.0)
    wb = tl.load(xw1 + ox, mask=mo, other=0.0)
    hit = mc[None, :] & mo[:, None]
    ta = hit & (a[:, None] == cells[None, :])
    tb = hit & (b[:, None] == cells[None, :])
    return ox, mo, cells, mc, ta, tb, wa, wb


@triton.jit
def contract_x(v, ta, tb, wa, wb):
    """Sum of output values v[f] into the input columns through their taps. Selected, not
    multiplied by a 0 weight: an inf gradient reaches only the columns its output reads
    (each tap's product counts, a 0-weight tap included, as on the CPU)."""
    return tl.sum(tl.where(ta, (wa * v)[:, None], 0.0) + tl.where(tb, (wb * v)[:, None], 0.0), axis=0)


@triton.jit
def _forward_kernel(x_ptr, out_ptr, yi0, yi1, yw0, yw1, xi0, xi1, xw0, xw1, H, W, OH, OW, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # plane * OH + output row
    plane = (row // OH).to(tl.int64)
    a0, a1, wa0, wa1 = row_taps(yi0, yi1, yw0, yw1, row % OH)
    ox = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = ox < OW
    b0 = tl.load(xi0 + ox, mask=m, other=0)
    b1 = tl.load(xi1 + ox, mask=m, other=0)
    wb0 = tl.load(xw0 + ox, mask=m, other=0.0)
    wb1 = tl.load(xw1 + ox, mask=m, other=0.0)
    val = bilinear_row(x_ptr + plane * H * W, W, a0, a1, wa0, wa1, b0, b1, wb0, wb1, m)
    tl.store(out_ptr + row.to(tl.int64) * OW + ox, val.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _contract_x_kernel(g_ptr, t_ptr, xi0, xi1, xw0, xw1, xlo, xhi, W, OW, BX, FX: tl.constexpr,
                       BXP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # plane * OH + output row
    ox, mo, cells, mc, ta, tb, wa, wb = column_weights(xi0, xi1, xw0, xw1, xlo, xhi, tl.program_id(1), W, BX, FX,
                                                       BXP)
    v = tl.load(g_ptr + row * OW + ox, mask=mo, other=0.0).to(wa.dtype)
    tl.store(t_ptr + row * W + cells, contract_x(v, ta, tb, wa, wb), mask=mc)


@triton.jit
def _contract_y_kernel(t_ptr, gin_ptr, yi0, yi1, yw0, yw1, ylo, yhi, H, W, OH, src_planes, dst_planes, dst_first,
                       BLOCK: tl.constexpr):
    # t: [images, src_planes, OH, W] rows already summed over x; gin plane (image, dst_first + p)
    # row y = sum over the output rows oy reading y, in increasing oy, of weight * t row oy.
    prow = tl.program_id(0)  # (image * src_planes + p) * H + y
    y = prow % H
    p = prow // H
    p = p.to(tl.int64)  # (image * dst_planes) passes 2^31 before the plane's offset does
    dst = (((p // src_planes) * dst_planes + dst_first + p % src_planes) * H + y) * W
    x = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = x < W
    acc = tl.zeros((BLOCK,), dtype=yw0.dtype.element_ty)
    o0 = tl.load(ylo + y)
    src = t_ptr + (p * OH + o0) * W + x
    for oy in range(o0, tl.load(yhi + y)):
        a0, a1, wa0, wa1 = row_taps(yi0, yi1, yw0, yw1, oy)
        v = tl.load(src, mask=m, other=0.0)
        # Only the taps of row y count (selected, not weighted by 0: an inf stays in its rows)
        acc += tl.where(a0 == y, wa0 * v, 0.0)
        acc += tl.where(a1 == y, wa1 * v, 0.0)
        src += W
    tl.store(gin_ptr + dst + x, acc.to(gin_ptr.dtype.element_ty), mask=m)


_BLOCK = 256



def contract_y_grid(op, rows, w):
    """contract_y's grid for `rows` output rows (N * P * H) of width w: callers check it before
    they allocate t."""
    return row_grid(op, rows, w, _BLOCK)


def contract_y(t, gin, ty: Taps, dst_first=0):
    """gin[:, dst_first : dst_first + P] = the y-contraction of t ([N, P, OH, W] -> [N, P, H, W])."""
    n, p, oh, w = t.shape
    h = gin.shape[2]
    grid = contract_y_grid("contract_y", n * p * h, w)
    _contract_y_kernel[grid](t, gin, ty.i0, ty.i1, ty.w0, ty.w1, ty.lo, ty.hi, h, w, oh, p, gin.shape[1], dst_first,
                             BLOCK=_BLOCK)


def _check_sizes(op, *sizes):
    require(min(sizes) > 0, op, f"input and output spatial sizes must be positive, got {sizes}")


def check_footprint(op, taps: Taps):
    # One program holds the outputs reading a column in registers (fx lanes).
    if taps.fx > 8192:
        raise NotImplementedError(f"{op}: an input column is read by {taps.fx} outputs; upsampling by more than "
                                  "8192x along one axis is not supported on CUDA")


def upsample_bilinear(input, out_h, out_w, align_corners, scale_h, scale_w):
    require(input.dim() == 4 and input.is_floating_point(), "upsample_bilinear",
            "input must be a floating point [N, C, H, W]")
    n, c, h, w = input.shape
    _check_sizes("upsample_bilinear", h, w, out_h, out_w)
    if n * c == 0:
        return torch.empty((n, c, out_h, out_w), dtype=input.dtype, device=input.device)
    grid = row_grid("upsample_bilinear", n * c * out_h, out_w, _BLOCK)  # before any allocation
    x = input.contiguous()
    out = torch.empty((n, c, out_h, out_w), dtype=x.dtype, device=x.device)
    acc = acc_dtype(x.dtype)
    ty = axis_taps(h, out_h, align_corners, scale_h, acc, x.device)
    tx = axis_taps(w, out_w, align_corners, scale_w, acc, x.device)
    _forward_kernel[grid](x, out, ty.i0, ty.i1, ty.w0, ty.w1, tx.i0, tx.i1, tx.w0, tx.w1, h, w, out_h, out_w,
                          BLOCK=_BLOCK)
    return out


def upsample_bilinear_backward(grad, in_h, in_w, align_corners, scale_h, scale_w):
    require(grad.dim() == 4 and grad.is_floating_point(), "upsample_bilinear_backward",
            "grad must be a floating point [N, C, H_out, W_out]")
    n, c, out_h, out_w = grad.shape
    _check_sizes("upsample_bilinear_backward", in_h, in_w)
    g = grad.contiguous()
    gin = torch.empty((n, c, in_h, in_w), dtype=g.dtype, device=g.device)
    if gin.numel() == 0:
        return gin
    if out_h * out_w == 0:
        return gin.zero_()
    acc = acc_dtype(g.dtype)
    ty = axis_taps(in_h, out_h, align_corners, scale_h, acc, g.device)
    tx = axis_taps(in_w, out_w, align_corners, scale_w, acc, g.device)
    check_footprint("upsample_bilinear_backward", tx)
    grid = row_grid("upsample_bilinear_backward", n * c * out_h, in_w, tx.bx)  # and contract_y's, before t
    contract_y_grid("upsample_bilinear_backward", n * c * in_h, in_w)
    t = torch.empty((n, c, out_h, in_w), dtype=acc, device=g.device)
    _contract_x_kernel[grid](g, t, tx.i0, tx.i1, tx.w0, tx.w1, tx.lo, tx.hi, in_w, out_w, tx.bx, FX=tx.fx,
                             BXP=tx.bxp)
    contract_y(t, gin, ty)
    return gin

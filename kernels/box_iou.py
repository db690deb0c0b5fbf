"""Box IoU family: Triton kernels (the CUDA backend) and their launchers.

The pair math mirrors csrc/common/box_iou.h operation for operation, so the
GPU and CPU kernels agree to rounding. One difference: min/max here are the
hardware's (one instruction; a NaN operand is ignored) where the C++ ones keep
a NaN left operand; a NaN or inf - inf coordinate still makes that box's area,
the union and so the value NaN, as on the CPU. fp32 divisions use the GPU's fast
division (at most 2 ulp) unless PRECISE_DIV is set, which makes them IEEE
(div_rn); fp64 divisions are always IEEE. The pairwise kernel's FAST_DIV config (off by
default) takes the approximate division, also 2 ulp but only within a range that
_approx_range checks per tile, for a quarter of the instructions.
atan is not taken in the kernels: the launchers precompute atan(w / h) per box
(O(N + M) work) and pass it in, which keeps libdevice out of the kernels.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .._library import _acc_dtype as acc_dtype
from . import cdiv, interpreting, require

_FOUR_OVER_PI2 = tl.constexpr(0.40528473456935108578)  # 4 / pi^2


# Division modes (DIV_RN below): the GPU's fast full-range division, IEEE, or the
# approximate one, which costs 2 instructions instead of 8 but holds its 2 ulp only for
# |b| in [2^-126, 2^126] (callers check the range: _approx_range) and flushes a quotient
# below 2^-126 to 0 (an absolute error under 1.2e-38). The interpreter has no libdevice:
# there the approximate mode does the same by hand (a * (1 / b), two roundings, then the flush).
DIV_FAST, DIV_IEEE, DIV_APPROX = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
_INTERPRET = tl.constexpr(interpreting())


@triton.jit
def _div(a, b, DIV_RN: tl.constexpr):
    if DIV_RN == 1:
        return tl.math.div_rn(a, b)
    elif DIV_RN == 2:
        if _INTERPRET:
            q = a * (1.0 / b)
            return tl.where(tl.abs(q) < 1.1754943508222875e-38, q * 0.0, q)
        else:
            return libdevice.fast_dividef(a, b)
    else:
        return a / b


@triton.jit
def _approx_range(x1, y1, x2, y2):
    """True when no pair denominator of these boxes (fp32) can leave [2^-126, 2^126] but for 0:
    every box finite with x2 >= x1 and y2 >= y1, every coordinate 0 or of magnitude in
    [2^-20, 2^61]. Coordinates are then multiples of 2^-43, so a width or height is 0 or at
    least 2^-43 and an area 0 or at least 2^-86; none passes 2^62, no area or sum of two
    2^126. A NaN or inf fails every test."""
    ok = (x2 >= x1) & (y2 >= y1) & _approx_coord(x1) & _approx_coord(y1) & _approx_coord(x2) & _approx_coord(y2)
    return tl.min(ok.to(tl.int32), 0) == 1


@triton.jit
def _approx_coord(c):
    m = tl.abs(c)
    return (m == 0) | ((m >= 2.0 ** -20) & (m <= 2.0 ** 61))


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _pair_value(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, ta, tb, eps, eps_a,
                KIND: tl.constexpr, LOSS: tl.constexpr, DIV_RN: tl.constexpr):
    iw = _min(ax2, bx2) - _max(ax1, bx1)
    ih = _min(ay2, by2) - _max(ay1, by1)
    if LOSS:
        inter = tl.where((ih > 0) & (iw > 0), iw * ih, 0.0)
    else:
        inter = _max(iw, 0.0) * _max(ih, 0.0)
    uni = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    if LOSS:
        iou = _div(inter, uni + eps, DIV_RN)
    else:
        iou = _div(inter, uni, DIV_RN)
    val = iou
    if KIND != 0:
        ew = _max(ax2, bx2) - _min(ax1, bx1)
        eh = _max(ay2, by2) - _min(ay1, by1)
        if not LOSS:
            ew = _max(ew, 0.0)
            eh = _max(eh, 0.0)
        if KIND == 1:
            c = ew * eh
            if LOSS:
                val = iou - _div(c - uni, c + eps, DIV_RN)
            else:
                val = iou - _div(c - uni, c, DIV_RN)
        else:
            dx = (ax1 + ax2) / 2 - (bx1 + bx2) / 2
            dy = (ay1 + ay2) / 2 - (by1 + by2) / 2
            diag = ew * ew + eh * eh + eps
            val = iou - _div(dx * dx + dy * dy, diag, DIV_RN)
            if KIND == 3:
                t = ta - tb
                v = _FOUR_OVER_PI2 * (t * t)
                # not approximate: 1 - iou + v + eps_a has no lower bound from the boxes alone
                alpha = _div(v, 1.0 - iou + v + eps_a, DIV_FAST if DIV_RN == 2 else DIV_RN)
                val = val - alpha * v
    if LOSS:
        val = 1.0 - val
    return val


@triton.jit
def _min_grad(a, b, g):
    # d min(a, b): to the smaller operand, split evenly on ties.
    ga = tl.where(a < b, g, tl.where(b < a, 0.0, g * 0.5))
    gb = tl.where(b < a, g, tl.where(a < b, 0.0, g * 0.5))
    return ga, gb


@triton.jit
def _max_grad(a, b, g):
    # d max(a, b): to the larger operand, split evenly on ties.
    ga = tl.where(b < a, g, tl.where(a < b, 0.0, g * 0.5))
    gb = tl.where(a < b, g, tl.where(b < a, 0.0, g * 0.5))
    return ga, gb


@triton.jit
def _pair_grad(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, ta, tb, eps, eps_a, g,
               KIND: tl.constexpr, LOSS: tl.constexpr, DIV_RN: tl.constexpr):
    if LOSS:
        dval = -g
    else:
        dval = g
    iw = _min(ax2, bx2) - _max(ax1, bx1)
    ih = _min(ay2, by2) - _max(ay1, by1)
    iwc = _max(iw, 0.0)
    ihc = _max(ih, 0.0)
    if LOSS:
        overlap = (ih > 0) & (iw > 0)
        inter = tl.where(overlap, iwc * ihc, 0.0)
        uden_add = eps
    else:
        inter = iwc * ihc
        uden_add = 0.0
    wa = ax2 - ax1
    ha = ay2 - ay1
    wb = bx2 - bx1
    hb = by2 - by1
    uni = wa * ha + wb * hb - inter
    uden = uni + uden_add
    iou = _div(inter, uden, DIV_RN)

    zero = tl.zeros_like(dval)
    d_uni = zero
    d_ew = zero
    d_eh = zero
    d_dx = zero
    d_dy = zero
    d_wa = zero
    d_ha = zero
    d_wb = zero
    d_hb = zero
    ew_raw = zero
    eh_raw = zero
    if KIND != 0:
        ew_raw = _max(ax2, bx2) - _min(ax1, bx1)
        eh_raw = _max(ay2, by2) - _min(ay1, by1)
        if LOSS:
            ew = ew_raw
            eh = eh_raw
        else:
            ew = _max(ew_raw, 0.0)
            eh = _max(eh_raw, 0.0)
        if KIND == 1:
            c = ew * eh
            if LOSS:
                den = c + eps
            else:
                den = c
            d_uni += _div(dval, den, DIV_RN)
            d_c = -dval * _div(_div(den - c + uni, den, DIV_RN), den, DIV_RN)  # den^2 would overflow first
            d_ew += d_c * eh
            d_eh += d_c * ew
        else:
            dx = (ax1 + ax2) / 2 - (bx1 + bx2) / 2
            dy = (ay1 + ay2) / 2 - (by1 + by2) / 2
            diag = ew * ew + eh * eh + eps
            cent = dx * dx + dy * dy
            d_cent = _div(-dval, diag, DIV_RN)
            d_diag = dval * _div(_div(cent, diag, DIV_RN), diag, DIV_RN)
            d_ew += 2.0 * ew * d_diag
            d_eh += 2.0 * eh * d_diag
            d_dx = 2.0 * dx * d_cent
            d_dy = 2.0 * dy * d_cent
            if KIND == 3:
                t = ta - tb
                v = _FOUR_OVER_PI2 * (t * t)
                alpha = _div(v, 1.0 - iou + v + eps_a, DIV_RN)
                d_t = -dval * alpha * _FOUR_OVER_PI2 * 2.0 * t
                na = wa * wa + ha * ha
                nb = wb * wb + hb * hb
                d_wa += d_t * _div(ha, na, DIV_RN)
                d_ha -= d_t * _div(wa, na, DIV_RN)
                d_wb -= d_t * _div(hb, nb, DIV_RN)
                d_hb += d_t * _div(wb, nb, DIV_RN)
    d_inter = _div(dval, uden, DIV_RN)
    d_uni -= dval * _div(iou, uden, DIV_RN)
    d_wa += d_uni * ha
    d_ha += d_uni * wa
    d_wb += d_uni * hb
    d_hb += d_uni * wb
    d_inter -= d_uni

    if LOSS:
        d_iw = tl.where(overlap, d_inter * ihc, 0.0)
        d_ih = tl.where(overlap, d_inter * iwc, 0.0)
    else:
        d_iw = tl.where(iw > 0, d_inter * ihc, 0.0)  # torch's clamp(min=0): no gradient at 0
        d_ih = tl.where(ih > 0, d_inter * iwc, 0.0)
    gax2, gbx2 = _min_grad(ax2, bx2, d_iw)
    gax1, gbx1 = _max_grad(ax1, bx1, -d_iw)
    gay2, gby2 = _min_grad(ay2, by2, d_ih)
    gay1, gby1 = _max_grad(ay1, by1, -d_ih)
    if KIND != 0:
        if not LOSS:
            d_ew = tl.where(ew_raw > 0, d_ew, 0.0)
            d_eh = tl.where(eh_raw > 0, d_eh, 0.0)
        p, q = _max_grad(ax2, bx2, d_ew)
        gax2 += p
        gbx2 += q
        p, q = _min_grad(ax1, bx1, -d_ew)
        gax1 += p
        gbx1 += q
        p, q = _max_grad(ay2, by2, d_eh)
        gay2 += p
        gby2 += q
        p, q = _min_grad(ay1, by1, -d_eh)
        gay1 += p
        gby1 += q
    gax1 += d_dx / 2 - d_wa
    gax2 += d_dx / 2 + d_wa
    gbx1 += -d_dx / 2 - d_wb
    gbx2 += -d_dx / 2 + d_wb
    gay1 += d_dy / 2 - d_ha
    gay2 += d_dy / 2 + d_ha
    gby1 += -d_dy / 2 - d_hb
    gby2 += -d_dy / 2 + d_hb
    return gax1, gay1, gax2, gay2, gbx1, gby1, gbx2, gby2


@triton.jit
def _load_box(ptr, idx, mask, acc):
    if mask is None:
        x1 = tl.load(ptr + idx * 4).to(acc)
        y1 = tl.load(ptr + idx * 4 + 1).to(acc)
        x2 = tl.load(ptr + idx * 4 + 2).to(acc)
        y2 = tl.load(ptr + idx * 4 + 3).to(acc)
    else:
        x1 = tl.load(ptr + idx * 4, mask=mask, other=0.0).to(acc)
        y1 = tl.load(ptr + idx * 4 + 1, mask=mask, other=0.0).to(acc)
        x2 = tl.load(ptr + idx * 4 + 2, mask=mask, other=1.0).to(acc)
        y2 = tl.load(ptr + idx * 4 + 3, mask=mask, other=1.0).to(acc)
    return x1, y1, x2, y2


@triton.jit
def _pairwise_side(box_ptr, t_ptr, b, L, r, acc, KIND: tl.constexpr):
    """Boxes r of batch entry b (of L) and their CIoU aspect term (0 for the other kinds).
    Loads clamp r to L - 1 instead of masking (L >= 1); only a partial tile's store is masked."""
    lr = tl.minimum(r, L - 1)
    x1, y1, x2, y2 = _load_box(box_ptr + b * L * 4, lr, None, acc)
    if KIND == 3:
        t = tl.load(t_ptr + b * L + lr)
    else:
        t = tl.zeros_like(x1)
    return x1, y1, x2, y2, t


@triton.jit
def _tile_value(rows, cols, eps, KIND: tl.constexpr, DIV_RN: tl.constexpr):
    """_pair_value of every (row, column) pair of a tile: rows and cols are (x1, y1, x2, y2,
    aspect term) vectors."""
    ax1, ay1, ax2, ay2, ta = rows
    bx1, by1, bx2, by2, tb = cols
    return _pair_value(ax1[:, None], ay1[:, None], ax2[:, None], ay2[:, None],
                       bx1[None, :], by1[None, :], bx2[None, :], by2[None, :],
                       ta[:, None], tb[None, :], eps, eps, KIND, False, DIV_RN)


@triton.jit
def _pairwise_kernel(b1_ptr, b2_ptr, t1_ptr, t2_ptr, out_ptr, N, M, eps: tl.float64,
                     KIND: tl.constexpr, DIV_RN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                     M_TILES: tl.constexpr, EVEN: tl.constexpr, STREAM: tl.constexpr, FAST_DIV: tl.constexpr):
    acc = out_ptr.dtype.element_ty
    eps = tl.full((), eps, acc)  # passed as fp64 (a plain float argument would be fp32 even for fp64 boxes)
    pid = tl.program_id(0)
    # a program: BLOCK_N rows, M_TILES tiles of BLOCK_M columns. All in int64 from here: the
    # cdiv's M + BLOCK_M * M_TILES - 1 would wrap for M just below 2^31 (int32 arguments), and
    # the box offsets idx * 4 pass 2^31 from N or M = 2^29 (tl.cast: Triton specialises an
    # argument equal to 1 to a plain int, which has no .to)
    num_m = tl.cdiv(tl.cast(M, tl.int64), BLOCK_M * M_TILES)
    num_n = tl.cdiv(tl.cast(N, tl.int64), BLOCK_N)
    pid_m = pid % num_m
    rest = pid // num_m
    pid_n = rest % num_n
    b = rest // num_n
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ax1, ay1, ax2, ay2, ta = _pairwise_side(b1_ptr, t1_ptr, b, N, rn, acc, KIND)
    if FAST_DIV:  # fp32 arithmetic only: fp32, fp16, bf16 boxes (the launcher); eps 0 or within range
        rows_ok = _approx_range(ax1, ay1, ax2, ay2) & ((eps == 0) | ((eps >= 2.0 ** -100) & (eps <= 2.0 ** 100)))
    for t in tl.static_range(M_TILES):
        rm = (pid_m * M_TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        bx1, by1, bx2, by2, tb = _pairwise_side(b2_ptr, t2_ptr, b, M, rm, acc, KIND)
        rows = (ax1, ay1, ax2, ay2, ta)
        cols = (bx1, by1, bx2, by2, tb)
        if FAST_DIV:  # the tile's approximate divisions, where _approx_range allows them
            if rows_ok & _approx_range(bx1, by1, bx2, by2):
                val = _tile_value(rows, cols, eps, KIND, DIV_APPROX)
            else:
                val = _tile_value(rows, cols, eps, KIND, DIV_RN)
        else:
            val = _tile_value(rows, cols, eps, KIND, DIV_RN)
        offs = b * N * M + rn[:, None] * M + rm[None, :]
        mask = None if EVEN else (rn < N)[:, None] & (rm < M)[None, :]
        if STREAM:  # streaming store (.cs): the output is written once and not read back here
            tl.store(out_ptr + offs, val, mask=mask, cache_modifier=".cs")
        else:
            tl.store(out_ptr + offs, val, mask=mask)


@triton.jit
def _loss_eps(eps, acc, KIND: tl.constexpr, LOSS: tl.constexpr):
    """The eps of the IoU and distance terms, and alpha's: torchvision's CIoU loss passes its
    eps only to alpha and keeps 1e-7 elsewhere (term_eps in csrc/common/box_iou.h)."""
    if LOSS and KIND == 3:
        return tl.full((), 1e-7, acc), eps
    else:
        return eps, eps


@triton.jit
def _matched_kernel(b1_ptr, b2_ptr, t1_ptr, t2_ptr, out_ptr, K, eps: tl.float64,
                    KIND: tl.constexpr, LOSS: tl.constexpr, DIV_RN: tl.constexpr, BLOCK: tl.constexpr):
    acc = out_ptr.dtype.element_ty
    eps = tl.full((), eps, acc)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < K
    ax1, ay1, ax2, ay2 = _load_box(b1_ptr, idx, mask, acc)
    bx1, by1, bx2, by2 = _load_box(b2_ptr, idx, mask, acc)
    if KIND == 3:
        ta = tl.load(t1_ptr + idx, mask=mask, other=0.0)
        tb = tl.load(t2_ptr + idx, mask=mask, other=0.0)
    else:
        ta = tl.zeros_like(ax1)
        tb = ta
    eps, eps_a = _loss_eps(eps, acc, KIND, LOSS)
    val = _pair_value(ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, ta, tb, eps, eps_a, KIND, LOSS, DIV_RN)
    tl.store(out_ptr + idx, val, mask=mask)


@triton.jit
def _matched_backward_kernel(g_ptr, b1_ptr, b2_ptr, t1_ptr, t2_ptr, g1_ptr, g2_ptr, K, eps: tl.float64,
                             KIND: tl.constexpr, LOSS: tl.constexpr, DIV_RN: tl.constexpr, BLOCK: tl.constexpr):
    acc = g_ptr.dtype.element_ty
    eps = tl.full((), eps, acc)
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < K
    ax1, ay1, ax2, ay2 = _load_box(b1_ptr, idx, mask, acc)
    bx1, by1, bx2, by2 = _load_box(b2_ptr, idx, mask, acc)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0)
    if KIND == 3:
        ta = tl.load(t1_ptr + idx, mask=mask, other=0.0)
        tb = tl.load(t2_ptr + idx, mask=mask, other=0.0)
    else:
        ta = tl.zeros_like(g)
        tb = ta
    eps, eps_a = _loss_eps(eps, acc, KIND, LOSS)
    gax1, gay1, gax2, gay2, gbx1, gby1, gbx2, gby2 = _pair_grad(
        ax1, ay1, ax2, ay2, bx1, by1, bx2, by2, ta, tb, eps, eps_a, g, KIND, LOSS, DIV_RN)
    ty = g1_ptr.dtype.element_ty
    tl.store(g1_ptr + idx * 4, gax1.to(ty), mask=mask)
    tl.store(g1_ptr + idx * 4 + 1, gay1.to(ty), mask=mask)
    tl.store(g1_ptr + idx * 4 + 2, gax2.to(ty), mask=mask)
    tl.store(g1_ptr + idx * 4 + 3, gay2.to(ty), mask=mask)
    tl.store(g2_ptr + idx * 4, gbx1.to(ty), mask=mask)
    tl.store(g2_ptr + idx * 4 + 1, gby1.to(ty), mask=mask)
    tl.store(g2_ptr + idx * 4 + 2, gbx2.to(ty), mask=mask)
    tl.store(g2_ptr + idx * 4 + 3, gby2.to(ty), mask=mask)


# ---------------------------------------------------------------- launchers

PRECISE_DIV = False


def _div_rn(acc):
    return acc == torch.float32 and PRECISE_DIV



def _aspect_atan(boxes, acc):
    """atan(w / h) per box in the accumulation dtype (CIoU's aspect term)."""
    b = boxes.to(acc)
    return torch.atan((b[..., 2] - b[..., 0]) / (b[..., 3] - b[..., 1])).contiguous()


# Measured on an H200 with benchmarks/tune_box_iou.py (4096x4096, CUDA graph; fill_ of the same
# output 15.5 us). GIoU, DIoU, CIoU (more arithmetic per pair): two 64-column tiles per program
# of 32 rows, 4 warps, CIoU 59.1 us in two runs (2026-11-27 16:34 and 16:58; one tile of
# before 64.0, the fastest 56.5 with streaming stores). Plain IoU: 24.6 us; with 64 rows
# 20.3 us (16:58, one run; CIoU 66.1 with it). The IoU config takes 64 rows once a GPU run of
# test_cuda_pairwise_variants_match_the_default has compared that variant with this one.
# FAST_DIV: approximate fp32 divisions in tiles whose boxes keep every denominator in range
# (_approx_range), the full-range ones elsewhere; off until a GPU has timed and compared it.
PAIRWISE_CONFIG = {"BLOCK_N": 32, "BLOCK_M": 64, "M_TILES": 2, "num_warps": 4, "STREAM": False, "FAST_DIV": False}
PAIRWISE_IOU_CONFIG = dict(PAIRWISE_CONFIG)


def _check(op, boxes1, boxes2, kind, pairwise):
    require(0 <= kind <= 3, op, f"box kind must be 0..3 (iou, giou, diou, ciou), got {kind}")
    require(boxes1.dtype == boxes2.dtype and boxes1.is_floating_point(), op,
            "boxes1 and boxes2 must share one floating point dtype")
    if pairwise:
        require(boxes1.dim() == 3 and boxes1.shape[2] == 4 and boxes2.dim() == 3 and boxes2.shape[2] == 4, op,
                "boxes1 and boxes2 must be [B, N, 4] and [B, M, 4]")
        require(boxes1.shape[0] == boxes2.shape[0], op, "batch sizes differ")
    else:
        require(boxes1.dim() == 2 and boxes1.shape[1] == 4 and boxes2.shape == boxes1.shape, op,
                "boxes1 must be [K, 4] and boxes2 the same shape")


def pairwise_box_iou(boxes1, boxes2, kind, eps):
    """[B, N, 4] x [B, M, 4] -> [B, N, M] (fp64 for fp64 input, else fp32)."""
    _check("pairwise_box_iou", boxes1, boxes2, kind, pairwise=True)
    B, N, _ = boxes1.shape
    M = boxes2.shape[1]
    acc = acc_dtype(boxes1.dtype)
    out = torch.empty((B, N, M), dtype=acc, device=boxes1.device)
    if out.numel() == 0:
        return out
    b1 = boxes1.contiguous()
    b2 = boxes2.contiguous()
    t1, t2 = (_aspect_atan(b1, acc), _aspect_atan(b2, acc)) if kind == 3 else (b1, b2)
    cfg = PAIRWISE_IOU_CONFIG if kind == 0 else PAIRWISE_CONFIG
    cols = cfg["BLOCK_M"] * cfg["M_TILES"]
    grid = (B * cdiv(N, cfg["BLOCK_N"]) * cdiv(M, cols),)
    even = N % cfg["BLOCK_N"] == 0 and M % cols == 0
    fast = cfg["FAST_DIV"] and acc == torch.float32 and not _div_rn(acc)
    _pairwise_kernel[grid](b1, b2, t1, t2, out, N, M, eps, KIND=kind, DIV_RN=_div_rn(acc), EVEN=even,
                           **{**cfg, "FAST_DIV": fast})
    return out


_BLOCK = 1024


def matched_box_iou(boxes1, boxes2, kind, loss, eps):
    """[K, 4] x [K, 4] -> [K]."""
    _check("matched_box_iou", boxes1, boxes2, kind, pairwise=False)
    K = boxes1.shape[0]
    acc = acc_dtype(boxes1.dtype)
    out = torch.empty((K,), dtype=acc, device=boxes1.device)
    if K == 0:
        return out
    b1 = boxes1.contiguous()
    b2 = boxes2.contiguous()
    t1, t2 = (_aspect_atan(b1, acc), _aspect_atan(b2, acc)) if kind == 3 else (b1, b2)
    grid = (cdiv(K, _BLOCK),)
    _matched_kernel[grid](b1, b2, t1, t2, out, K, eps, KIND=kind, LOSS=loss, DIV_RN=_div_rn(acc), BLOCK=_BLOCK,
                          num_warps=4)
    return out


def matched_box_iou_backward(grad, boxes1, boxes2, kind, loss, eps):
    """Gradients of matched_box_iou w.r.t. boxes1 and boxes2, in the boxes' dtype."""
    _check("matched_box_iou_backward", boxes1, boxes2, kind, pairwise=False)
    K = boxes1.shape[0]
    require(grad.shape == (K,) and grad.dtype == acc_dtype(boxes1.dtype), "matched_box_iou_backward",
            "grad must be [K] in the output dtype")
    g1 = torch.empty((K, 4), dtype=boxes1.dtype, device=boxes1.device)
    g2 = torch.empty_like(g1)
    if K == 0:
        return g1, g2
    b1 = boxes1.contiguous()
    b2 = boxes2.contiguous()
    acc = acc_dtype(boxes1.dtype)
    t1, t2 = (_aspect_atan(b1, acc), _aspect_atan(b2, acc)) if kind == 3 else (b1, b2)
    grid = (cdiv(K, _BLOCK),)
    _matched_backward_kernel[grid](grad.contiguous(), b1, b2, t1, t2, g1, g2, K, eps, KIND=kind, LOSS=loss,
                                   DIV_RN=_div_rn(acc), BLOCK=_BLOCK, num_warps=4)
    return g1, g2

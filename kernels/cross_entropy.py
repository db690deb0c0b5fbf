"""Softmax cross-entropy and upsample + cross-entropy: Triton kernels (the CUDA backend).

Same per-position formulas as csrc/cpu/cross_entropy.cpp: one program per block of
positions of one image holding every class (C up to a few hundred fits one tile),
fp32 math (fp64 for fp64 logits). The fused upsample version computes the upsampled
logits from their 4 low-resolution taps inside the tile, and its backward is
gather-based per low-resolution pixel and class (deterministic, no atomics).
"""

import torch
import triton
import triton.language as tl

from .interpolate import axis_taps, bilinear_at, max_span, tap_weight


@triton.jit
def _tile(z_ptr, y_ptr, w_ptr, n, blk, C, S, ignore_index, HAS_W: tl.constexpr, BLOCK_C: tl.constexpr,
          BLOCK_P: tl.constexpr):
    c = tl.arange(0, BLOCK_C)
    j = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    mc = c < C
    mj = j < S
    m2 = mc[:, None] & mj[None, :]
    acc = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    z = tl.load(z_ptr + n.to(tl.int64) * C * S + c[:, None].to(tl.int64) * S + j[None, :], mask=m2,
                other=0.0).to(acc)
    y = tl.load(y_ptr + n.to(tl.int64) * S + j, mask=mj, other=ignore_index)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=mc, other=0.0).to(acc)
    else:
        w = tl.where(mc, 1.0, 0.0).to(acc)
    zm = tl.where(m2, z, float("-inf"))
    mx = tl.max(zm, axis=0)
    mx = tl.where(mj, mx, 0.0)
    s = tl.sum(tl.where(m2, tl.exp(zm - mx[None, :]), 0.0), axis=0)
    lse = mx + tl.log(tl.where(mj, s, 1.0))
    valid = (y != ignore_index) & mj
    hit = (y[None, :] == c[:, None]) & m2
    return c, j, mc, mj, m2, z, y, w, lse, valid, hit


@triton.jit
def _ce_forward_kernel(z_ptr, y_ptr, w_ptr, loss_ptr, wpos_ptr, lse_ptr, C, S, nb, ignore_index, keep, spread,
                       HAS_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // nb
    c, j, mc, mj, m2, z, y, w, lse, valid, hit = _tile(z_ptr, y_ptr, w_ptr, n, pid % nb, C, S, ignore_index, HAS_W,
                                                       BLOCK_C, BLOCK_P)
    wsum = tl.sum(w, axis=0)
    zy = tl.sum(tl.where(hit, z, 0.0), axis=0)
    wy = tl.where(valid, tl.sum(tl.where(hit, w[:, None], 0.0), axis=0), 0.0)
    wz = tl.sum(tl.where(m2, w[:, None] * z, 0.0), axis=0)
    loss = tl.where(valid, keep * wy * (lse - zy) + spread * (wsum * lse - wz), 0.0)
    offs = n.to(tl.int64) * S + j
    tl.store(loss_ptr + offs, loss, mask=mj)
    tl.store(wpos_ptr + offs, wy, mask=mj)
    tl.store(lse_ptr + offs, lse, mask=mj)


@triton.jit
def _ce_backward_kernel(g_ptr, z_ptr, y_ptr, w_ptr, lse_ptr, dz_ptr, C, S, nb, ignore_index, keep, spread,
                        HAS_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // nb
    c, j, mc, mj, m2, z, y, w, lse, valid, hit = _tile(z_ptr, y_ptr, w_ptr, n, pid % nb, C, S, ignore_index, HAS_W,
                                                       BLOCK_C, BLOCK_P)
    offs = n.to(tl.int64) * S + j
    g = tl.where(valid, tl.load(g_ptr + offs, mask=mj, other=0.0), 0.0)
    wsum = tl.sum(w, axis=0)
    wy = tl.sum(tl.where(hit, w[:, None], 0.0), axis=0)
    p = tl.exp(z - lse[None, :])
    # dz_c = g (keep w_y + spread W) p_c - g keep w_y [c = y] - g spread w_c
    dz = (g * (keep * wy + spread * wsum))[None, :] * p - tl.where(hit, (g * keep * wy)[None, :], 0.0) \
        - g[None, :] * (spread * w)[:, None]
    dofs = n.to(tl.int64) * C * S + c[:, None].to(tl.int64) * S + j[None, :]
    tl.store(dz_ptr + dofs, dz.to(dz_ptr.dtype.element_ty), mask=m2)


def _blocks(logits):
    n, c, s = logits.shape
    block_c = triton.next_power_of_2(max(c, 1))
    block_p = max(16, min(256, 4096 // block_c))
    return n, c, s, block_c, block_p, triton.cdiv(s, block_p)


def softmax_cross_entropy(logits, target, weight, ignore_index, label_smoothing):
    n, c, s, block_c, block_p, nb = _blocks(logits)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss, wpos, lse = (torch.empty((n, s), dtype=acc, device=logits.device) for _ in range(3))
    if n * nb:
        _ce_forward_kernel[(n * nb,)](logits.contiguous(), target.contiguous(), weight if weight is not None
                                      else logits, loss, wpos, lse, c, s, nb, ignore_index, 1.0 - label_smoothing,
                                      label_smoothing / c, HAS_W=weight is not None, BLOCK_C=block_c,
                                      BLOCK_P=block_p)
    return loss, wpos, lse


def softmax_cross_entropy_backward(grad, logits, target, weight, lse, ignore_index, label_smoothing):
    n, c, s, block_c, block_p, nb = _blocks(logits)
    z = logits.contiguous()
    dz = torch.empty_like(z)
    if n * nb:
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        _ce_backward_kernel[(n * nb,)](grad.to(acc).contiguous(), z, target.contiguous(),
                                       weight if weight is not None else z, lse.to(acc).contiguous(), dz, c, s, nb,
                                       ignore_index, 1.0 - label_smoothing, label_smoothing / c,
                                       HAS_W=weight is not None, BLOCK_C=block_c, BLOCK_P=block_p)
    return dz


# ------------------------------------------------- fused upsample + cross-entropy

@triton.jit
def _up_ce_forward_kernel(l_ptr, y_ptr, w_ptr, loss_ptr, wpos_ptr, lse_ptr, yi0, yi1, yw0, yw1, xi0, xi1, xw0, xw1,
                          C, h, w, H, W, ignore_index, keep, spread, HAS_W: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_P: tl.constexpr):
    n = tl.program_id(1)
    o = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, BLOCK_C)
    mj = o < H * W
    mc = c < C
    m2 = mc[:, None] & mj[None, :]
    planes = l_ptr + (n.to(tl.int64) * C + c[:, None]) * h * w
    z = bilinear_at(planes, w, (o // W)[None, :], (o % W)[None, :], m2, yi0, yi1, yw0, yw1, xi0, xi1, xw0, xw1)
    y = tl.load(y_ptr + n.to(tl.int64) * H * W + o, mask=mj, other=ignore_index)
    if HAS_W:
        wc = tl.load(w_ptr + c, mask=mc, other=0.0).to(z.dtype)
    else:
        wc = tl.where(mc, 1.0, 0.0).to(z.dtype)
    zm = tl.where(m2, z, float("-inf"))
    mx = tl.where(mj, tl.max(zm, axis=0), 0.0)
    lse = mx + tl.log(tl.where(mj, tl.sum(tl.where(m2, tl.exp(zm - mx[None, :]), 0.0), axis=0), 1.0))
    valid = (y != ignore_index) & mj
    hit = (y[None, :] == c[:, None]) & m2
    zy = tl.sum(tl.where(hit, z, 0.0), axis=0)
    wy = tl.where(valid, tl.sum(tl.where(hit, wc[:, None], 0.0), axis=0), 0.0)
    wz = tl.sum(tl.where(m2, wc[:, None] * z, 0.0), axis=0)
    loss = tl.where(valid, keep * wy * (lse - zy) + spread * (tl.sum(wc, axis=0) * lse - wz), 0.0)
    offs = n.to(tl.int64) * H * W + o
    tl.store(loss_ptr + offs, loss, mask=mj)
    tl.store(wpos_ptr + offs, wy, mask=mj)
    tl.store(lse_ptr + offs, lse, mask=mj)


@triton.jit
def _up_ce_backward_kernel(l_ptr, y_ptr, w_ptr, coef_a, coef_b, gm_ptr, lse_ptr, dl_ptr, yi0, yi1, yw0, yw1, ylo,
                           xi0, xi1, xw0, xw1, xlo, C, h, w, H, W, spread, HAS_W: tl.constexpr,
                           MAX_SY: tl.constexpr, MAX_SX: tl.constexpr, BLOCK: tl.constexpr):
    # One program per block of low-res pixels of one (image, class) plane: each pixel sums, in a
    # fixed order, d loss / d U_c(o) times its bilinear weight over the outputs o that read it.
    nc = tl.program_id(1)
    n = nc // C
    c = nc % C
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = p < h * w
    i = p // w
    j = p % w
    y_lo = tl.load(ylo + i, mask=m, other=0)
    x_lo = tl.load(xlo + j, mask=m, other=0)
    if HAS_W:
        wcls = tl.load(w_ptr + c).to(yw0.dtype.element_ty)
    else:
        wcls = 1.0
    acc = tl.zeros((BLOCK,), dtype=yw0.dtype.element_ty)
    plane = n.to(tl.int64) * C
    for dy in range(MAX_SY):
        oy = y_lo + dy
        my = m & (oy < H)
        wy = tap_weight(yi0, yi1, yw0, yw1, oy, my, i)
        for dx in range(MAX_SX):
            ox = x_lo + dx
            mo = my & (ox < W)
            wx = tap_weight(xi0, xi1, xw0, xw1, ox, mo, j)
            wgt = wy * wx
            mo = mo & (wgt != 0)
            u = bilinear_at(l_ptr + (plane + c) * h * w, w, oy, ox, mo, yi0, yi1, yw0, yw1, xi0, xi1, xw0, xw1)
            o = n.to(tl.int64) * H * W + oy * W + ox
            pc = tl.exp(u - tl.load(lse_ptr + o, mask=mo, other=0.0))
            yv = tl.load(y_ptr + o, mask=mo, other=-1)
            du = tl.load(coef_a + o, mask=mo, other=0.0) * pc \
                - tl.where(yv == c, tl.load(coef_b + o, mask=mo, other=0.0), 0.0) \
                - tl.load(gm_ptr + o, mask=mo, other=0.0) * spread * wcls
            acc += tl.where(mo, wgt * du, 0.0)
    tl.store(dl_ptr + nc.to(tl.int64) * h * w + p, acc.to(dl_ptr.dtype.element_ty), mask=m)


def _up_taps(logits, target, align_corners, acc):
    h, w = logits.shape[2:]
    H, W = target.shape[1:]
    return (axis_taps(h, H, align_corners, -1.0, acc, logits.device),
            axis_taps(w, W, align_corners, -1.0, acc, logits.device))


def upsample_cross_entropy(logits, target, align_corners, weight, ignore_index, label_smoothing):
    n, c, h, w = logits.shape
    H, W = target.shape[1:]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss, wpos, lse = (torch.empty((n, H, W), dtype=acc, device=logits.device) for _ in range(3))
    if loss.numel():
        ty, tx = _up_taps(logits, target, align_corners, acc)
        block_c = triton.next_power_of_2(max(c, 1))
        block_p = max(16, min(256, 4096 // block_c))
        lg = logits.contiguous()
        _up_ce_forward_kernel[(triton.cdiv(H * W, block_p), n)](
            lg, target.contiguous(), weight if weight is not None else lg, loss, wpos, lse, *ty[:4], *tx[:4], c, h, w,
            H, W, ignore_index, 1.0 - label_smoothing, label_smoothing / c, HAS_W=weight is not None,
            BLOCK_C=block_c, BLOCK_P=block_p)
    return loss, wpos, lse


def upsample_cross_entropy_backward(grad, logits, target, align_corners, weight, lse, ignore_index, label_smoothing):
    n, c, h, w = logits.shape
    H, W = target.shape[1:]
    lg = logits.contiguous()
    dl = torch.empty_like(lg)
    if dl.numel() == 0:
        return dl
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if H * W == 0:
        return dl.zero_()
    ty, tx = _up_taps(logits, target, align_corners, acc)
    keep, spread = 1.0 - label_smoothing, label_smoothing / c
    valid = target != ignore_index
    wc = weight.to(acc) if weight is not None else torch.ones(c, dtype=acc, device=lg.device)
    wy = torch.where(valid, wc[target.clamp(0, c - 1)], 0)
    gm = torch.where(valid, grad.to(acc), 0)
    coef_a = (gm * (keep * wy + spread * wc.sum())).contiguous()  # d loss / d U_c = a p_c - [c = y] b - gm spread w_c
    coef_b = (gm * keep * wy).contiguous()
    block = 128
    _up_ce_backward_kernel[(triton.cdiv(h * w, block), n * c)](
        lg, target.contiguous(), wc, coef_a, coef_b, gm.contiguous(), lse.to(acc).contiguous(), dl,
        ty[0], ty[1], ty[2], ty[3], ty[4], tx[0], tx[1], tx[2], tx[3], tx[4], c, h, w, H, W, spread,
        HAS_W=weight is not None, MAX_SY=max_span(h, H, align_corners, -1.0),
        MAX_SX=max_span(w, W, align_corners, -1.0), BLOCK=block)
    return dl

"""Softmax cross-entropy: Triton kernels (the CUDA backend) and their launchers.

Same per-position formulas as csrc/cpu/cross_entropy.cpp: logits [N, C, S], one
program per block of positions of one image holding every class (C up to a few
hundred fits one tile), fp32 math (fp64 for fp64 logits).
"""

import torch
import triton
import triton.language as tl


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

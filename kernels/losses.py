"""Loss family: Triton kernels (the CUDA backend) and their launchers.

Same formulas as csrc/common/losses.h, computed in fp32 (fp64 for fp64 inputs).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _pow(m, g, SQUARE: tl.constexpr):
    # torch.pow's values at m = 0: 0 for g > 0, 1 for g = 0, inf for g < 0; NaN for m < 0.
    if SQUARE:
        return m * m
    else:
        r = tl.exp(g * tl.log(tl.where(m > 0, m, 1.0)))
        at_zero = tl.where(g > 0, 0.0, tl.where(g == 0, 1.0, float("inf")))
        return tl.where(g == 0, 1.0, tl.where(m > 0, r, tl.where(m == 0, at_zero, float("nan"))))


@triton.jit
def _focal_terms(x, t, alpha):
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    p = tl.where(x >= 0, inv, e * inv)
    ce = tl.maximum(x, 0.0) - x * t + tl.log(1.0 + e)
    m = p + t - 2.0 * p * t
    at = tl.where(alpha >= 0, alpha * t + (1.0 - alpha) * (1.0 - t), 1.0)
    return p, ce, m, at


@triton.jit
def _focal_forward_kernel(x_ptr, t_ptr, out_ptr, n, alpha, gamma, SQUARE: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    acc = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(acc)
    t = tl.load(t_ptr + idx, mask=mask, other=0.0).to(acc)
    p, ce, m, at = _focal_terms(x, t, alpha)
    loss = at * ce * _pow(m, gamma, SQUARE)
    tl.store(out_ptr + idx, loss.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _focal_backward_kernel(g_ptr, x_ptr, t_ptr, dx_ptr, dt_ptr, n, alpha, gamma, SQUARE: tl.constexpr,
                           BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    acc = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(acc)
    t = tl.load(t_ptr + idx, mask=mask, other=0.0).to(acc)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(acc)
    p, ce, m, at = _focal_terms(x, t, alpha)
    mg = _pow(m, gamma, SQUARE)
    if SQUARE:
        dmg = 2.0 * m
    else:
        dmg = tl.where(gamma == 0, 0.0, gamma * _pow(m, gamma - 1.0, False))
    d_at = tl.where(alpha >= 0, 2.0 * alpha - 1.0, 0.0)
    dx = g * at * ((p - t) * mg + ce * dmg * p * (1.0 - p) * (1.0 - 2.0 * t))
    dt = g * (d_at * ce * mg + at * (-x * mg + ce * dmg * (1.0 - 2.0 * p)))
    ty = dx_ptr.dtype.element_ty
    tl.store(dx_ptr + idx, dx.to(ty), mask=mask)
    tl.store(dt_ptr + idx, dt.to(ty), mask=mask)


_BLOCK = 1024


def sigmoid_focal_loss(inputs, targets, alpha, gamma):
    x, t = inputs.contiguous(), targets.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _focal_forward_kernel[(triton.cdiv(n, _BLOCK),)](x, t, out, n, alpha, gamma, SQUARE=gamma == 2.0,
                                                         BLOCK=_BLOCK)
    return out


def sigmoid_focal_loss_backward(grad, inputs, targets, alpha, gamma):
    x, t, g = inputs.contiguous(), targets.contiguous(), grad.contiguous()
    dx, dt = torch.empty_like(x), torch.empty_like(x)
    n = x.numel()
    if n:
        _focal_backward_kernel[(triton.cdiv(n, _BLOCK),)](g, x, t, dx, dt, n, alpha, gamma, SQUARE=gamma == 2.0,
                                                          BLOCK=_BLOCK)
    return dx, dt


@triton.jit
def _dice_probs(z_ptr, y_ptr, n, blk, C, HW, ignore_index, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """softmax over classes of one block of positions; zeros on ignored/padded positions."""
    c = tl.arange(0, BLOCK_C)
    j = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    mc = c < C
    mj = j < HW
    m2 = mc[:, None] & mj[None, :]
    acc = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    base = n.to(tl.int64) * C * HW
    z = tl.load(z_ptr + base + c[:, None].to(tl.int64) * HW + j[None, :], mask=m2, other=0.0).to(acc)
    y = tl.load(y_ptr + n.to(tl.int64) * HW + j, mask=mj, other=ignore_index)
    zm = tl.where(m2, z, float("-inf"))
    mx = tl.max(zm, axis=0)
    e = tl.where(m2, tl.exp(zm - mx[None, :]), 0.0)
    s = tl.sum(e, axis=0)
    valid = (y != ignore_index) & mj
    p = tl.where(valid[None, :] & mc[:, None], e / tl.where(valid, s, 1.0)[None, :], 0.0)
    hit = (y[None, :] == c[:, None]) & valid[None, :] & mc[:, None]
    return c, mc, valid, p, hit


@triton.jit
def _dice_stats_kernel(z_ptr, y_ptr, part_ptr, C, HW, nb, ignore_index, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    c, mc, valid, p, hit = _dice_probs(z_ptr, y_ptr, pid // nb, pid % nb, C, HW, ignore_index, BLOCK_C, BLOCK_P)
    inter = tl.sum(tl.where(hit, p, 0.0), axis=1)
    card = tl.sum(p, axis=1) + tl.sum(hit.to(p.dtype), axis=1)
    out = part_ptr + pid.to(tl.int64) * 2 * C
    tl.store(out + c, inter, mask=mc)
    tl.store(out + C + c, card, mask=mc)


@triton.jit
def _dice_backward_kernel(g_ptr, z_ptr, y_ptr, dz_ptr, C, HW, nb, ignore_index, BLOCK_C: tl.constexpr,
                          BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    n = pid // nb
    blk = pid % nb
    c, mc, valid, p, hit = _dice_probs(z_ptr, y_ptr, n, blk, C, HW, ignore_index, BLOCK_C, BLOCK_P)
    gi = tl.load(g_ptr + c, mask=mc, other=0.0)
    gs = tl.load(g_ptr + C + c, mask=mc, other=0.0)
    # h_c = d loss / d p_c on valid positions; softmax backward: dz = p (h - sum_c p_c h_c)
    h = tl.where(valid[None, :], gs[:, None] + tl.where(hit, gi[:, None], 0.0), 0.0)
    dot = tl.sum(p * h, axis=0)
    dz = p * (h - dot[None, :])
    j = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    offs = n.to(tl.int64) * C * HW + c[:, None].to(tl.int64) * HW + j[None, :]
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mc[:, None] & (j < HW)[None, :])


def _dice_blocks(logits):
    n, c = logits.shape[:2]
    hw = logits.numel() // max(n * c, 1)
    block_c = triton.next_power_of_2(c)
    block_p = max(16, 4096 // block_c)
    return n, c, hw, block_c, block_p, triton.cdiv(hw, block_p)


def dice_stats(logits, target, ignore_index):
    n, c, hw, block_c, block_p, nb = _dice_blocks(logits)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    part = torch.zeros((n * nb, 2, c), dtype=acc, device=logits.device)
    if n * nb:
        _dice_stats_kernel[(n * nb,)](logits.contiguous(), target.contiguous(), part, c, hw, nb, ignore_index,
                                      BLOCK_C=block_c, BLOCK_P=block_p)
    return part.sum(0)  # per-block partials, summed in a fixed order: deterministic


def dice_stats_backward(grad, logits, target, ignore_index):
    n, c, hw, block_c, block_p, nb = _dice_blocks(logits)
    z = logits.contiguous()
    dz = torch.empty_like(z)
    if n * nb:
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        _dice_backward_kernel[(n * nb,)](grad.to(acc).contiguous(), z, target.contiguous(), dz, c, hw, nb,
                                         ignore_index, BLOCK_C=block_c, BLOCK_P=block_p)
    return dz


@triton.jit
def _lovasz_grad_kernel(fg_ptr, len_ptr, out_ptr, M, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + r), 0), M)
    row = fg_ptr + r * M
    gts = tl.zeros((), dtype=tl.int64)
    for start in range(0, M, BLOCK):
        i = start + tl.arange(0, BLOCK)
        f = tl.load(row + i, mask=i < n, other=0.0)
        gts += tl.sum((f != 0).to(tl.int64), axis=0)
    cum = tl.zeros((), dtype=tl.int64)
    for start in range(0, M, BLOCK):
        i = start + tl.arange(0, BLOCK)
        m = i < n
        hit = ((tl.load(row + i, mask=m, other=0.0) != 0) & m).to(tl.int64)
        c = tl.cumsum(hit, 0) + cum
        # Jaccard loss of the first i + 1 entries, and of the first i (closed form: no shift needed)
        jac = 1.0 - (gts - c).to(tl.float64) / (gts + i + 1 - c).to(tl.float64)
        cp = c - hit
        prev = tl.where(i == 0, 0.0, 1.0 - (gts - cp).to(tl.float64) / tl.maximum(gts + i - cp, 1).to(tl.float64))
        out = tl.where(m, jac - prev, 0.0)
        tl.store(out_ptr + r * M + i, out.to(out_ptr.dtype.element_ty), mask=i < M)
        cum += tl.sum(hit, axis=0)


def lovasz_gradient(fg_sorted, lengths):
    fg = fg_sorted.contiguous()
    out = torch.empty_like(fg)
    r, m = fg.shape
    if r and m:
        _lovasz_grad_kernel[(r,)](fg, lengths.contiguous(), out, m, BLOCK=1024)
    elif out.numel():
        out.zero_()
    return out

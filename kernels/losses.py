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

"""Loss family: Triton kernels (the CUDA backend) and their launchers.

Same formulas as csrc/common/losses.h, computed in fp32 (fp64 for fp64 inputs).
"""

import torch
import triton
import triton.language as tl

from .._library import _acc_dtype as acc_dtype
from ..losses import _NO_IGNORE
from . import cdiv, grid_rows, loss_grad, require
from .cross_entropy import lse_sum, lse_update, position_block


@triton.jit
def _pow(m, g, SQUARE: tl.constexpr):
    # torch.pow's values: at m = 0, 0 for g > 0, 1 for g = 0, inf for g < 0; for m < 0 (targets
    # outside [0, 1]) |m|^g for an even integral g, -|m|^g for an odd one, NaN for a fractional one.
    if SQUARE:
        return m * m
    else:
        a = tl.abs(m)
        half = g * 0.5
        neg_sign = tl.where(tl.floor(g) != g, float("nan"), tl.where(tl.floor(half) == half, 1.0, -1.0))
        sign = tl.where(m < 0, neg_sign, tl.where(m > 0, 1.0, float("nan")))  # NaN for a NaN m
        r = sign * tl.exp(g * tl.log(tl.where(a > 0, a, 1.0)))
        at_zero = tl.where(g > 0, 0.0, tl.where(g == 0, 1.0, float("inf")))
        return tl.where(g == 0, 1.0, tl.where(m == 0, at_zero, r))


@triton.jit
def _focal_terms(x, t, alpha):
    e = tl.exp(-tl.abs(x))
    inv = 1.0 / (1.0 + e)
    p = tl.where(x >= 0, inv, e * inv)
    q = tl.where(x >= 0, e * inv, inv)  # 1 - p without cancellation
    # t softplus(-x) + (1 - t) softplus(x) without the weight-0 term: exact at x = +-inf
    # log1p(e): log(1 + e) is 0 once 1 + e rounds to 1 (x < -17 in fp32, a right answer's
    # cross-entropy); log(u) e / (u - 1) undoes the rounding of u = 1 + e. No libdevice here.
    u = 1.0 + e
    lg = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    ce = tl.where(t != 0, t * (tl.maximum(-x, 0.0) + lg), 0.0) \
        + tl.where(t != 1, (1.0 - t) * (tl.maximum(x, 0.0) + lg), 0.0)
    m = t * q + (1.0 - t) * p  # 1 - p_t; p + t - 2 p t cancels to 0 where p rounds to t
    at = tl.where(alpha >= 0, alpha * t + (1.0 - alpha) * (1.0 - t), 1.0)
    return p, q, ce, m, at


@triton.jit
def _focal_forward_kernel(x_ptr, t_ptr, out_ptr, n, alpha: tl.float64, gamma: tl.float64, SQUARE: tl.constexpr,
                          BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    acc = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    alpha, gamma = tl.full((), alpha, acc), tl.full((), gamma, acc)  # fp64 arguments: a plain float is fp32
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(acc)
    t = tl.load(t_ptr + idx, mask=mask, other=0.0).to(acc)
    p, q, ce, m, at = _focal_terms(x, t, alpha)
    loss = at * ce * _pow(m, gamma, SQUARE)
    tl.store(out_ptr + idx, loss.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _focal_backward_kernel(g_ptr, x_ptr, t_ptr, dx_ptr, dt_ptr, n, alpha: tl.float64, gamma: tl.float64,
                           SQUARE: tl.constexpr, G_STEP: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    acc = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    alpha, gamma = tl.full((), alpha, acc), tl.full((), gamma, acc)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(acc)
    t = tl.load(t_ptr + idx, mask=mask, other=0.0).to(acc)
    g = tl.load(g_ptr + idx * G_STEP, mask=mask, other=0.0).to(acc)
    p, q, ce, m, at = _focal_terms(x, t, alpha)
    mg = _pow(m, gamma, SQUARE)
    # ce gamma m^(gamma - 1), as gamma (ce / m) m^gamma: for a confident right answer
    # m^(gamma - 1) overflows (m below ~1e-308 in fp64) while ce / m stays near 1
    if SQUARE:
        cdm = 2.0 * m * ce
    else:
        cdm = tl.where(gamma == 0, 0.0, tl.where(m != 0, gamma * ((ce / tl.where(m != 0, m, 1.0)) * mg),
                                                 ce * gamma * _pow(m, gamma - 1.0, False)))
    d_at = tl.where(alpha >= 0, 2.0 * alpha - 1.0, 0.0)
    sat = p * q  # ce p (1 - p) tends to 0 where p saturates
    # p - t = (1 - t) p - t q and 1 - 2 p = q - p without cancellation; ce m^(gamma - 1) tends
    # to 0 where p saturates to a hard target (ce = m = 0 once exp(-|x|) underflows)
    dx = g * at * (((1.0 - t) * p - t * q) * mg + tl.where(sat == 0, 0.0, cdm * sat * (1.0 - 2.0 * t)))
    dt = g * (d_at * ce * mg + at * (-x * mg + tl.where(ce == 0, 0.0, cdm * (q - p))))
    ty = dx_ptr.dtype.element_ty
    tl.store(dx_ptr + idx, dx.to(ty), mask=mask)
    tl.store(dt_ptr + idx, dt.to(ty), mask=mask)


_BLOCK = 1024


def _check_alpha(op, alpha):
    if not (0 <= alpha <= 1 or alpha == -1):  # NaN too
        raise ValueError(f"{op}: alpha must be in [0, 1], or -1 to disable the weight, got {alpha}")


def sigmoid_focal_loss(inputs, targets, alpha, gamma):
    _check_alpha("sigmoid_focal_loss", alpha)
    require(targets.shape == inputs.shape and targets.dtype == inputs.dtype and inputs.is_floating_point(),
             "sigmoid_focal_loss", "targets must have the shape and dtype of inputs")
    x, t = inputs.contiguous(), targets.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _focal_forward_kernel[(cdiv(n, _BLOCK),)](x, t, out, n, alpha, gamma, SQUARE=gamma == 2.0,
                                                         BLOCK=_BLOCK)
    return out


def sigmoid_focal_loss_backward(grad, inputs, targets, alpha, gamma):
    _check_alpha("sigmoid_focal_loss_backward", alpha)
    require(targets.shape == inputs.shape and targets.dtype == inputs.dtype and grad.shape == inputs.shape
            and grad.dtype == inputs.dtype and inputs.is_floating_point(), "sigmoid_focal_loss_backward",
            "grad and targets must have the shape and floating point dtype of inputs")
    x, t = inputs.contiguous(), targets.contiguous()
    dx, dt = torch.empty_like(x), torch.empty_like(x)
    n = x.numel()
    if n:
        g, g_step = loss_grad(grad, grad.dtype)
        _focal_backward_kernel[(cdiv(n, _BLOCK),)](g, x, t, dx, dt, n, alpha, gamma, SQUARE=gamma == 2.0,
                                                          G_STEP=g_step, BLOCK=_BLOCK)
    return dx, dt


@triton.jit
def _dice_softmax(z_ptr, y_ptr, pid, nb, C, HW, ignore_index, IGNORES: tl.constexpr, BLOCK: tl.constexpr):
    """One block of positions of one image: the class planes' base, the targets, and the
    softmax max and 1 / sum (0 on ignored and padded positions); classes are walked one
    plane at a time. IGNORES is False for the "no ignore" value: no target is ignored then,
    not even one equal to it."""
    _, zoffs, mj, y, valid = position_block(z_ptr, y_ptr, pid, nb, C, HW, 1, ignore_index, BLOCK)
    if not IGNORES:
        valid = mj
    acc = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    base = z_ptr + zoffs
    mx = tl.full((BLOCK,), float("-inf"), acc)
    s = tl.zeros((BLOCK,), acc)
    plane = base  # class planes by pointer steps: c * HW could pass 2^31
    for _ in range(C):
        mx, s = lse_update(mx, s, tl.load(plane, mask=mj, other=0.0).to(acc))
        plane += HW
    return zoffs, mj, base, y, valid, mx, tl.where(valid, 1.0 / lse_sum(mx, s), 0.0)


@triton.jit
def _dice_p(plane, mj, valid, mx, inv):
    z = tl.load(plane, mask=mj, other=0.0).to(mx.dtype)
    return tl.where(valid, tl.exp(z - mx) * inv, 0.0)


@triton.jit
def _dice_stats_kernel(z_ptr, y_ptr, part_ptr, C, HW, nb, ignore_index, IGNORES: tl.constexpr,
                       BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    zoffs, mj, base, y, valid, mx, inv = _dice_softmax(z_ptr, y_ptr, pid, nb, C, HW, ignore_index, IGNORES, BLOCK)
    out = part_ptr + pid.to(tl.int64) * 2 * C
    # a target outside [0, C) (no sync to reject it) makes every class's statistics NaN
    bad = valid & ((y < 0) | (y >= C))
    plane = base
    for c in range(C):
        p = _dice_p(plane, mj, valid, mx, inv)
        plane += HW
        hit = tl.where(bad, float("nan"), (valid & (y == c)).to(p.dtype))
        tl.store(out + c, tl.sum(p * hit, axis=0))  # a product, as on the CPU: a NaN p stays NaN
        tl.store(out + C + c, tl.sum(p, axis=0) + tl.sum(hit, axis=0))


@triton.jit
def _dice_backward_kernel(g_ptr, z_ptr, y_ptr, dz_ptr, C, HW, nb, ignore_index, IGNORES: tl.constexpr,
                          BLOCK: tl.constexpr):
    # h_c = d loss / d p_c = g_card[c] + [y = c] g_inter[c] on valid positions; softmax
    # backward: dz_c = p_c (h_c - sum_k p_k h_k).
    pid = tl.program_id(0)
    zoffs, mj, base, y, valid, mx, inv = _dice_softmax(z_ptr, y_ptr, pid, nb, C, HW, ignore_index, IGNORES, BLOCK)
    dot = tl.zeros((BLOCK,), mx.dtype)
    plane = base
    for c in range(C):
        h = tl.load(g_ptr + C + c) + tl.where(y == c, tl.load(g_ptr + c), 0.0)
        dot += _dice_p(plane, mj, valid, mx, inv) * h
        plane += HW
    plane = base
    out = dz_ptr + zoffs
    for c in range(C):
        h = tl.load(g_ptr + C + c) + tl.where(y == c, tl.load(g_ptr + c), 0.0)
        # 0 at ignored positions even for a NaN grad (smooth = 0 with nothing valid)
        dz = tl.where(valid, _dice_p(plane, mj, valid, mx, inv) * (h - dot), 0.0)
        tl.store(out, dz.to(dz_ptr.dtype.element_ty), mask=mj)
        plane += HW
        out += HW


def _dice_blocks(op, logits):
    """(N, C, positions an image, blocks an image); a program per block, at most 2^31 - 1 of
    them, checked before the partial sums (one row a program) are allocated."""
    n, c = logits.shape[:2]
    hw = logits.numel() // max(n * c, 1)
    nb = cdiv(hw, _BLOCK)
    grid_rows(op, n * nb)
    return n, c, hw, nb


def _check_dice(op, logits, target):
    require(logits.dim() >= 2 and logits.is_floating_point() and target.dtype == torch.int64
             and target.shape == logits.shape[:1] + logits.shape[2:], op, "logits must be [N, C, ...], target [N, ...]")


def dice_stats(logits, target, ignore_index):
    _check_dice("dice_stats", logits, target)
    n, c, hw, nb = _dice_blocks("dice_stats", logits)
    acc = acc_dtype(logits.dtype)
    part = torch.zeros((n * nb, 2, c), dtype=acc, device=logits.device)
    if n * nb:
        _dice_stats_kernel[(n * nb,)](logits.contiguous(), target.contiguous(), part, c, hw, nb, ignore_index,
                                      IGNORES=ignore_index != _NO_IGNORE, BLOCK=_BLOCK)
    return part.sum(0)  # per-block partials, summed in a fixed order: deterministic


def dice_stats_backward(grad, logits, target, ignore_index):
    _check_dice("dice_stats_backward", logits, target)
    require(grad.shape == (2, logits.shape[1]), "dice_stats_backward", "grad must be [2, C]")
    n, c, hw, nb = _dice_blocks("dice_stats_backward", logits)
    z = logits.contiguous()
    dz = torch.empty_like(z)
    if n * nb:
        acc = acc_dtype(logits.dtype)
        _dice_backward_kernel[(n * nb,)](grad.to(acc).contiguous(), z, target.contiguous(), dz, c, hw, nb,
                                         ignore_index, IGNORES=ignore_index != _NO_IGNORE, BLOCK=_BLOCK)
    return dz


@triton.jit
def _lovasz_row_block(len_ptr, pid, per, M, nb, BLOCK: tl.constexpr):
    """Row r of block pid (nb blocks a row), the row's valid length n (len_ptr[r // per],
    clamped to [0, M]: `per` rows share a length) and the block's positions i."""
    r = (pid // nb).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(len_ptr + r // per), 0), M)
    i = (pid % nb).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # M may pass 2^31
    return r, n, i


@triton.jit
def _lovasz_block(fg_ptr, len_ptr, pid, M, nb, BLOCK: tl.constexpr):
    """Row r and positions i of block pid; hit = 1 where entry i is a valid foreground entry."""
    r, n, i = _lovasz_row_block(len_ptr, pid, 1, M, nb, BLOCK)
    m = i < n
    hit = ((tl.load(fg_ptr + r * M + i, mask=m, other=0.0) != 0) & m).to(tl.int64)
    return r, i, m, hit


@triton.jit
def _lovasz_step(hit, before, gts, i):
    """The Lovasz gradient at sorted entries i (fp64): the Jaccard loss of the first i + 1
    entries minus that of the first i (closed forms: no shift needed). `before`: foreground
    entries ahead of the block; `gts`: the row's."""
    c = tl.cumsum(hit, 0) + before  # foreground entries among the first i + 1
    jac = 1.0 - (gts - c).to(tl.float64) / (gts + i + 1 - c).to(tl.float64)
    cp = c - hit
    prev = tl.where(i == 0, 0.0, 1.0 - (gts - cp).to(tl.float64) / tl.maximum(gts + i - cp, 1).to(tl.float64))
    return jac - prev


@triton.jit
def _lovasz_count_kernel(fg_ptr, len_ptr, cnt_ptr, M, nb, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    r, i, m, hit = _lovasz_block(fg_ptr, len_ptr, pid, M, nb, BLOCK)
    tl.store(cnt_ptr + pid, tl.sum(hit, axis=0))


@triton.jit
def _lovasz_grad_kernel(fg_ptr, len_ptr, before_ptr, total_ptr, out_ptr, M, nb, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    r, i, m, hit = _lovasz_block(fg_ptr, len_ptr, pid, M, nb, BLOCK)
    lg = _lovasz_step(hit, tl.load(before_ptr + pid), tl.load(total_ptr + r), i)
    tl.store(out_ptr + r * M + i, tl.where(m, lg, 0.0).to(out_ptr.dtype.element_ty), mask=i < M)


_SCAN_BLOCK = 1024


def lovasz_gradient(fg_sorted, lengths):
    """Two passes over blocks of every row (the rows' blocks run in parallel): foreground
    counts per block, then each block's cumulative counts from the exclusive scan of those."""
    require(fg_sorted.dim() == 2 and fg_sorted.dtype in (torch.float32, torch.float64)
            and lengths.shape == fg_sorted.shape[:1] and lengths.dtype == torch.int64,
            "lovasz_gradient", "fg_sorted must be [R, M] fp32 or fp64 and lengths [R] int64")
    r, m = fg_sorted.shape
    nb = cdiv(m, _SCAN_BLOCK)
    grid_rows("lovasz_gradient", r * nb)  # a program per block of a row; before any allocation
    fg = fg_sorted.contiguous()
    out = torch.empty_like(fg)
    if r and m:
        lens = lengths.contiguous()
        cnt = torch.empty((r, nb), dtype=torch.int64, device=fg.device)
        _lovasz_count_kernel[(r * nb,)](fg, lens, cnt, m, nb, BLOCK=_SCAN_BLOCK)
        before = cnt.cumsum(1) - cnt
        _lovasz_grad_kernel[(r * nb,)](fg, lens, before, cnt.sum(1), out, m, nb, BLOCK=_SCAN_BLOCK)
    elif out.numel():
        out.zero_()
    return out


# Rows of lovasz_softmax_rows: row r = g k + ci is class c0 + ci of group g (one group of
# all images, or one per image), M positions each: position j of group g is label
# g M + j (images back to back); `code` per entry: bit 0 = valid foreground, bit 1 = p > [y = c].


@triton.jit
def _lovasz_address(q, c, C, S):
    """Offset of class c at label position q in [N, C, S] probas / grad."""
    img = q // S
    return (img * C + c) * S + (q - img * S)


@triton.jit
def _lovasz_errors_kernel(p_ptr, y_ptr, e_ptr, code_ptr, c0, k, C, S, M, nb, ignore_index,
                          IGNORES: tl.constexpr, BLOCK: tl.constexpr):
    """Errors |[y = c] - p_c| of one block of a group's positions for the chunk's k classes
    (-inf where ignored: they sort last), and each entry's code. Labels are read once."""
    pid = tl.program_id(0)
    g = (pid // nb).to(tl.int64)
    j = (pid % nb).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < M
    q = g * M + j
    y = tl.load(y_ptr + q, mask=m, other=0)
    valid = m
    if IGNORES:
        valid = valid & (y != ignore_index)
    for ci in range(0, k):
        c = c0 + ci
        p = tl.load(p_ptr + _lovasz_address(q, c, C, S), mask=m, other=0.0).to(e_ptr.dtype.element_ty)
        fg = (y == c) & valid
        f = fg.to(e_ptr.dtype.element_ty)
        row = (g * k + ci) * M
        tl.store(e_ptr + row + j, tl.where(valid, tl.abs(f - p), float("-inf")), mask=m)
        tl.store(code_ptr + row + j, fg.to(tl.int8) + 2 * (p > f).to(tl.int8), mask=m)


@triton.jit
def _lovasz_sorted_codes_kernel(perm_ptr, code_ptr, len_ptr, out_ptr, cnt_ptr, k, M, nb, BLOCK: tl.constexpr):
    """The codes in sorted order (0 past the valid entries), and the foreground count per block."""
    pid = tl.program_id(0)
    r, n, i = _lovasz_row_block(len_ptr, pid, k, M, nb, BLOCK)
    src = tl.load(perm_ptr + r * M + i, mask=i < M, other=0)
    code = tl.load(code_ptr + r * M + src, mask=i < n, other=0)
    tl.store(out_ptr + r * M + i, code, mask=i < M)
    tl.store(cnt_ptr + pid, tl.sum((code & 1).to(tl.int64), axis=0))


@triton.jit
def _lovasz_scatter_kernel(e_ptr, perm_ptr, code_ptr, len_ptr, before_ptr, total_ptr, grad_ptr, part_ptr, c0, k,
                           C, S, M, nb, BLOCK: tl.constexpr):
    """Per block of sorted entries: the Lovasz gradient, its dot with the ReLU'd errors (one
    fp64 partial per block), and d loss / d p = gradient * sign(p - [y = c]) written to each
    entry's own position (a permutation: every position of the row once, ignored ones 0)."""
    pid = tl.program_id(0)
    r, n, i = _lovasz_row_block(len_ptr, pid, k, M, nb, BLOCK)
    m = i < M
    valid = i < n
    code = tl.load(code_ptr + r * M + i, mask=m, other=0)
    lg = _lovasz_step((code & 1).to(tl.int64), tl.load(before_ptr + pid), tl.load(total_ptr + r), i)
    lg = tl.where(valid, lg, 0.0)
    e = tl.load(e_ptr + r * M + i, mask=valid, other=0.0)
    tl.store(part_ptr + pid, tl.sum(tl.where(e < 0, 0.0, e).to(tl.float64) * lg, axis=0))  # NaN stays NaN
    sign = tl.where((code & 2) != 0, 1.0, tl.where(e > 0, -1.0, 0.0))  # NaN: 0, as torch.sign
    dp = tl.where(valid, lg.to(grad_ptr.dtype.element_ty) * sign, 0.0)
    src = tl.load(perm_ptr + r * M + i, mask=m, other=0)
    tl.store(grad_ptr + _lovasz_address((r // k) * M + src, c0 + r % k, C, S), dp.to(grad_ptr.dtype.element_ty),
             mask=m)


# Errors per sort: classes are sorted a chunk at a time (all groups' rows of the chunk's
# classes together), so that the temporaries (errors, their sorted copy, the int64
# permutation, the sort's buffers) stay near this many elements instead of growing with C.
_LOVASZ_CHUNK = 1 << 23


def lovasz_softmax_rows(probas, labels, ignore_index, per_image):
    """The op on CUDA, per chunk of classes: the errors of every (group, class) row (one
    kernel), a batched stable sort (torch), the foreground counts in sorted order (a gather),
    then the Lovasz gradient, the loss and d loss / d probas in one pass that writes each
    entry's gradient to its position; same results as the CPU kernel."""
    require(probas.dim() == 3 and probas.is_floating_point() and labels.dtype == torch.int64
            and labels.shape == (probas.shape[0], probas.shape[2]), "lovasz_softmax_rows",
            "probas must be [N, C, S] and labels [N, S] int64")
    n, c, s = probas.shape
    acc = acc_dtype(probas.dtype)
    dev = probas.device
    g, m = (n, s) if per_image else (1, n * s)
    nb = cdiv(m, _SCAN_BLOCK)
    grid_rows("lovasz_softmax_rows", g * nb)  # a program per block of a group's positions
    losses = torch.zeros((g, c), dtype=acc, device=dev)
    counts = torch.zeros((g, c), dtype=torch.int64, device=dev)
    grad = torch.empty((n, c, s), dtype=acc, device=dev)
    if g * m == 0:
        return losses, grad, counts
    p, y = probas.contiguous(), labels.contiguous()
    ii = _NO_IGNORE if ignore_index is None else ignore_index
    if ignore_index is None:
        lengths = torch.full((g,), m, dtype=torch.int64, device=dev)
    else:
        lengths = (y != ignore_index).reshape(g, m).sum(1)
    step = max(1, _LOVASZ_CHUNK // (g * m))
    for c0 in range(0, c, step):
        k = min(c, c0 + step) - c0
        e = torch.empty((g * k, m), dtype=acc, device=dev)
        code = torch.empty((g * k, m), dtype=torch.int8, device=dev)
        _lovasz_errors_kernel[(g * nb,)](p, y, e, code, c0, k, c, s, m, nb, ii, IGNORES=ignore_index is not None,
                                         BLOCK=_SCAN_BLOCK)
        e_sorted, perm = torch.sort(e, dim=1, descending=True, stable=True)
        del e
        sorted_code = torch.empty_like(code)
        cnt = torch.empty((g * k, nb), dtype=torch.int64, device=dev)
        _lovasz_sorted_codes_kernel[(g * k * nb,)](perm, code, lengths, sorted_code, cnt, k, m, nb,
                                                   BLOCK=_SCAN_BLOCK)
        del code
        total = cnt.sum(1)
        part = torch.empty((g * k, nb), dtype=torch.float64, device=dev)
        _lovasz_scatter_kernel[(g * k * nb,)](e_sorted, perm, sorted_code, lengths, cnt.cumsum(1) - cnt, total, grad,
                                              part, c0, k, c, s, m, nb, BLOCK=_SCAN_BLOCK)
        losses[:, c0:c0 + k] = part.sum(1).reshape(g, k).to(acc)
        counts[:, c0:c0 + k] = total.reshape(g, k)
    return losses, grad, counts

"""Softmax cross-entropy and upsample + cross-entropy: Triton kernels (the CUDA backend).

Same per-position formulas as csrc/cpu/cross_entropy.cpp, fp32 math (fp64 for fp64
logits). Each program owns a block of positions of one image (with CE_CONFIG's PER_SM,
blocks a grid apart) and walks the classes once (coalesced loads of one class plane at a
time, no padding of C, no cross-thread reductions): an online log-sum-exp (running max and
rescaled sum) and label smoothing's weight terms, all taken from the running max, with the
target's logit loaded once a position (the fused upsample kernel, whose logits are
computed, compares class indices instead), so the forward reads the logits once (variants of
the forward and backward load the planes of a block several classes at a time as one
tile: CE_TILE_CONFIG). It stores the max m and l = log(sum exp(z - m)) of each position as
two planes of `stats`; the backward recomputes the softmax as exp((z - m) - l). Under the
mean and sum each program stores only its sums of loss and target weight, which one more
program adds in a fixed order (no per-position loss map, no atomics). The fused upsample
version computes each upsampled logit from its 4 low-resolution taps inside the program;
its backward is gather-based and separable like the bilinear one (kernels/interpolate.py),
so it is deterministic, and its only full-resolution buffer is one row-contracted block of
classes of at most N*H*W values.

softmax_cross_entropy_with_grad, the training step's forward on CUDA: the same forward
kernels with FUSED, which after a block's log-sum-exp compute its gradient for a loss
gradient of 1 (the backward's code, _grad_planes and _grad_tiles, its logits read again
while they are likely still in L2); under the mean, each program adds up the divisor's
partial sums, taken from the targets first (_ce_wsum_kernel). The backward then only scales
it (_scale_grad_kernel, which reads nothing else where the scale is 1).
"""

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .._library import _acc_dtype as acc_dtype
from . import cdiv, grid_rows, interpreting, loss_grad, next_power_of_2, require, row_grid
from .interpolate import (
    axis_taps,
    bilinear_row,
    check_footprint,
    column_weights,
    contract_x,
    contract_y,
    contract_y_grid,
    row_taps,
)

_INTERPRET = tl.constexpr(interpreting())
_REDUCE = 1024  # lanes of _ce_reduce_kernel's fixed-order sums of partial sums (_sum_parts)
# Partial sums a program of _ce_collapse_kernel adds. The single reduce program's loop waits
# for each load: on an H200 (2026-11-28) it took 1.56 ms over the 2^20 rows of a channels_last
# (2, 19, 512, 1024) step, when the row kernels left a partial sum a row.
_COLLAPSE = 4096
# Lanes of a fused forward program's sum of the mean's partial sums (_mean_divisor): at 1024
# the tile kernel took 78 registers instead of 63 under Triton 3.6, 3 programs of 8 warps an
# SM instead of 4 (python -m benchmarks.sass_cross_entropy)
_FUSED_REDUCE_BLOCK = tl.constexpr(256)


@triton.jit
def _class_weight(w_ptr, c, HAS_W: tl.constexpr):
    # The launchers pass the weight in the accumulation dtype.
    if HAS_W:
        return tl.load(w_ptr + c)
    else:
        return 1.0


@triton.jit
def _target_weight(w_ptr, y, valid, C, HAS_W: tl.constexpr):
    """w[y] at valid positions, 0 at ignored ones. A target outside [0, C) is never an index:
    its weight is NaN, so that its loss, the mean and the gradients are NaN (rejecting it
    would need a device-to-host sync)."""
    inr = valid & (y >= 0) & (y < C)
    bad = valid & ~inr
    if HAS_W:
        return tl.where(bad, float("nan"), tl.load(w_ptr + tl.where(inr, y, 0), mask=inr, other=0.0))
    else:
        return tl.where(inr, 1.0, tl.where(bad, float("nan"), 0.0))


@triton.jit
def _weight_sum(w_ptr, C, HAS_W: tl.constexpr):
    if HAS_W:
        ws = tl.load(w_ptr, mask=C > 0, other=0.0)
        for c in range(1, C):
            ws += tl.load(w_ptr + c)
        return ws
    else:
        return C * 1.0


@triton.jit
def _exp_ftz(x):
    """exp, flushing results below 2^-126 to 0 in fp32 (ex2.approx.ftz: no range fix-ups, 3
    instructions fewer). Where every sum of these holds a 1 (a max's own term), a flushed
    term could not have changed it. fp64 and the interpreter (no libdevice): tl.exp."""
    if _INTERPRET or x.dtype == tl.float64:
        return tl.exp(x)
    else:
        return libdevice.fast_expf(x)


@triton.jit
def lse_merge(mx, s, mc, sc):
    """Online log-sum-exp: the max and the sum of exp(logit - max) after a group of logits
    with max mc and sum of exp(logit - mc) sc. One exp: whichever max is smaller scales its
    sum by exp(-|mc - mx|). A group of -inf logits (sc 0) adds nothing, even while the max is
    -inf (the difference is taken from the max clamped to the dtype's lowest finite value:
    never -inf - -inf). A NaN logit makes the sum NaN; +inf and all -inf are left to
    lse_sum (no per-logit test)."""
    if mx.dtype == tl.float64:
        d = mc - tl.maximum(mx, -1.7976931348623157e308)
    else:
        d = mc - tl.maximum(mx, -3.4028234663852886e38)
    e = _exp_ftz(-tl.abs(d))
    return tl.maximum(mx, mc), tl.where(d > 0, s * e + sc, s + sc * e)


@triton.jit
def lse_update(mx, s, z):
    """lse_merge of one more logit."""
    return lse_merge(mx, s, z, 1.0)


@triton.jit
def lse_sum(mx, s):
    """The sum of lse_merge after the last class: NaN where the max is +inf (a +inf logit) or
    -inf (every logit -inf), as two passes give."""
    return tl.where(tl.abs(mx) == float("inf"), float("nan"), s)


@triton.jit
def _ce_update(z, c, live, mx, s, wd, wseen, w_ptr, HAS_W: tl.constexpr, SMOOTH: tl.constexpr):
    """One class: the log-sum-exp state and, for label smoothing only, wd = sum of
    w_k (max - z_k) over the classes so far and wseen = sum of their w_k. Differences from
    the max, never from a sum of max and log: large logits would round the small part away.
    A class past C (live False: z is -inf, c any class index) changes nothing."""
    new_mx, s = lse_update(mx, s, z)
    if SMOOTH:
        wc = _class_weight(w_ptr, c, HAS_W)
        # A larger max moves every earlier term up by the shift; while the max was -inf, the
        # earlier logits were -inf too and their terms are already infinite.
        grow = tl.where((new_mx > mx) & (mx > float("-inf")), wseen * (new_mx - mx), 0.0)
        term = tl.where(z == float("-inf"), wc * float("inf"), wc * (new_mx - z))
        wd, wseen = tl.where(live, wd + grow + term, wd), tl.where(live, wseen + wc, wseen)
    return new_mx, s, wd, wseen


@triton.jit
def _target_class(y, C):
    """Each position's target as an int32 class index, -1 outside [0, C) (ignored or out of
    range: their loss is 0 or NaN whatever logit they pick)."""
    return tl.where((y >= 0) & (y < C), y, -1).to(tl.int32)


@triton.jit
def _target_logit(z_ptr, zoffs, y, mj, C, ZC, acc, GATHER: tl.constexpr):
    """The target's logit of each position where GATHER (a load of it, classes ZC apart;
    targets outside [0, C) read nothing), else 0 for the forward's class loop to fill in with
    a compare and a select a logit (against _target_class)."""
    if GATHER:
        yt = (y >= 0) & (y < C) & mj
        return tl.load(z_ptr + zoffs + tl.where(yt, y, 0) * ZC, mask=yt, other=0.0).to(acc)
    else:
        return tl.zeros(zoffs.shape, acc)


@triton.jit
def _ce_loss(mx, ls, zy, wd, wy, valid, keep, spread, wsum):
    # A term whose factor is 0 is left out (a -inf logit would make it 0 * inf), as on the CPU.
    hard = tl.where(keep != 0, keep * wy * ((mx - zy) + ls), tl.where(wy != wy, wy, 0.0))
    return tl.where(valid, tl.where(spread != 0, hard + spread * (wd + wsum * ls), hard), 0.0)


@triton.jit
def _ce_finish(mx, s, zy, wd, y, valid, C, w_ptr, keep, spread, loss_ptr, part_ptr, part, nparts, stats_ptr, P,
               offs, mask, HAS_W: tl.constexpr, STORE_LOSS: tl.constexpr):
    """Stores the positions' stats m and l (planes P apart), their loss when STORE_LOSS, and the
    program's fp64 sums of loss and target weight (partial sums `part` of two rows of nparts).
    Returns l and the target weights (for a gradient in the same pass)."""
    wy = _target_weight(w_ptr, y, valid, C, HAS_W)
    ls = tl.log(lse_sum(mx, s))  # all logits -inf, or one +inf: NaN, as on the CPU
    loss = _ce_loss(mx, ls, zy, wd, wy, valid, keep, spread, _weight_sum(w_ptr, C, HAS_W))
    if STORE_LOSS:
        tl.store(loss_ptr + offs, loss, mask=mask)
    tl.store(part_ptr + part, tl.sum(loss.to(tl.float64), 0))
    tl.store(part_ptr + nparts + part, tl.sum(wy.to(tl.float64), 0))
    tl.store(stats_ptr + offs, mx, mask=mask)
    tl.store(stats_ptr + P + offs, ls, mask=mask)
    return ls, wy


@triton.jit
def _sum_parts(part_ptr, nparts, BLOCK: tl.constexpr):
    """The sum of nparts fp64 partial sums in a fixed order (BLOCK running sums, then one
    tl.sum): every program that adds the same parts gets the same bits."""
    acc = tl.zeros((BLOCK,), tl.float64)
    # an int32 loop index would wrap past 2^31 - BLOCK and go on (tl.cast: nparts = 1 comes as
    # a plain int)
    nparts = tl.cast(nparts, tl.int64)
    for i in range(0, nparts, BLOCK):
        o = i + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + o, mask=o < nparts, other=0.0)
    return tl.sum(acc, 0)


@triton.jit
def _ce_collapse_kernel(part_ptr, nparts, out_ptr, nout, BLOCK: tl.constexpr):
    """[2, nparts] fp64 partial sums to [2, nout]: each program adds BLOCK consecutive ones of
    a row, in a fixed order."""
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    nparts = tl.cast(nparts, tl.int64)
    o = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(part_ptr + row * nparts + o, mask=o < nparts, other=0.0)
    tl.store(out_ptr + row * nout + pid, tl.sum(v, 0))


@triton.jit
def _ce_reduce_kernel(part_ptr, nparts, loss_ptr, wsum_ptr, div_ptr, REDUCTION: tl.constexpr, BLOCK: tl.constexpr,
                      GIVEN: tl.constexpr):
    """wsum and the loss (REDUCTION 1: mean, NaN when wsum is 0; 2: sum) from the forward
    programs' partial sums ([2, nparts]: the loss's, then the target weights'), added in fp64
    in a fixed order. GIVEN: wsum is the fp64 sum at div_ptr instead (the one a fused
    forward divided its gradient by)."""
    if GIVEN:
        wsum = tl.load(div_ptr)
    else:
        wsum = _sum_parts(part_ptr + tl.cast(nparts, tl.int64), nparts, BLOCK)
    tl.store(wsum_ptr, wsum.to(wsum_ptr.dtype.element_ty))
    lsum = _sum_parts(part_ptr, nparts, BLOCK)
    if REDUCTION == 1:
        tl.store(loss_ptr, tl.where(wsum == 0, float("nan"), lsum / wsum).to(loss_ptr.dtype.element_ty))
    elif REDUCTION == 2:
        tl.store(loss_ptr, lsum.to(loss_ptr.dtype.element_ty))


@triton.jit
def _position_grad(g_ptr, wsum_ptr, offs, mask, valid, G_STEP: tl.constexpr, MEAN: tl.constexpr):
    """The loss gradient of each position (G_STEP 0: one value for all), 0 where ignored; the
    mean's is divided by wsum (inf or NaN when wsum is 0, as torch's). Both are in the
    accumulation dtype."""
    g = tl.load(g_ptr + offs * G_STEP, mask=mask, other=0.0)
    if MEAN:
        g = g / tl.load(wsum_ptr)
    return tl.where(valid, g, 0.0)


@triton.jit
def position_block(z_ptr, y_ptr, pid, nb, C, S, ZS, ignore_index, BLOCK: tl.constexpr):
    """Block pid of the S positions of an image ([N, C, S] logits, nb blocks an image): the
    positions' offsets in [N, S] and in class plane 0 of the logits (positions ZS apart: 1
    in class planes, C for [N, C] rows taken as one image's planes), their mask, targets and
    validity."""
    n = (pid // nb).to(tl.int64)
    j = (pid % nb).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # S may pass 2^31
    mj = j < S
    y = tl.load(y_ptr + n * S + j, mask=mj, other=ignore_index)
    return n * S + j, n * C * S + j * ZS, mj, y, (y != ignore_index) & mj


@triton.jit
def _blocks(P, S, nb, LOOP: tl.constexpr):
    """(start, stop, step) of the blocks a program takes: its own (a loop of one iteration,
    which the compiler removes), or with LOOP every grid's worth of blocks from its own."""
    if LOOP:
        return tl.program_id(0), (P // S) * nb, tl.num_programs(0)
    else:
        return tl.program_id(0), tl.program_id(0) + 1, 1


@triton.jit
def _ce_forward_kernel(z_ptr, y_ptr, w_ptr, loss_ptr, part_ptr, stats_ptr, dz_ptr, wsum_ptr, div_ptr, C, S, P, nb,
                       ignore_index, keep: tl.float64, spread: tl.float64, HAS_W: tl.constexpr, SMOOTH: tl.constexpr,
                       STORE_LOSS: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr,
                       STAGES: tl.constexpr, GATHER: tl.constexpr, LOOP: tl.constexpr, FUSED: tl.constexpr,
                       MEAN: tl.constexpr, WSUM_PARTS: tl.constexpr, ZS: tl.constexpr):
    """The forward: stats, loss and partial sums of each block of positions. FUSED: then the
    gradient of the block for a loss gradient of 1 (dz_ptr; under the MEAN, wsum_ptr: the
    target weights' sum, or with WSUM_PARTS its partial sums, known before this kernel), its
    logits read again while they are likely still in L2. ZS: the logits' position stride, 1
    in class planes (S apart), C in [N, C] rows (_rows_as_planes: classes 1 apart; a compile
    for each C)."""
    acc = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    keep, spread = tl.full((), keep, acc), tl.full((), spread, acc)  # fp64 arguments: a plain float is fp32
    ZC = S if ZS == 1 else 1  # the class stride
    start, stop, step = _blocks(P, S, nb, LOOP)
    for pid in range(start, stop, step):
        offs, zoffs, mj, y, valid = position_block(z_ptr, y_ptr, pid, nb, C, S, ZS, ignore_index, BLOCK)
        base = z_ptr + zoffs
        yc = _target_class(y, C)
        zy = _target_logit(z_ptr, zoffs, y, mj, C, ZC, acc, GATHER)
        mx = tl.full((BLOCK,), float("-inf"), acc)
        s = tl.zeros((BLOCK,), acc)
        wd = tl.zeros((BLOCK,), acc)
        wseen = tl.zeros((BLOCK,), acc)
        plane = base  # class planes by pointer steps: c * S could pass 2^31
        # UNROLL independent plane loads in flight; STAGES > 1: and the next STAGES - 1 steps'.
        # The classes past C of the last step load -inf (no second loop for them: under
        # Triton 3.6 that loop cost the UNROLL 2 forward 19 registers and a shared-memory
        # round trip)
        for c0 in tl.range(0, C, UNROLL, num_stages=STAGES):
            for u in tl.static_range(UNROLL):
                live = c0 + u < C
                z = tl.load(plane, mask=mj & live, other=float("-inf")).to(acc)
                if not GATHER:
                    zy = tl.where(yc == c0 + u, z, zy)  # a class past C is no target
                mx, s, wd, wseen = _ce_update(z, tl.where(live, c0 + u, 0), live, mx, s, wd, wseen, w_ptr, HAS_W,
                                              SMOOTH)
                plane += ZC
        ls, wy = _ce_finish(mx, s, zy, wd, y, valid, C, w_ptr, keep, spread, loss_ptr, part_ptr, pid, (P // S) * nb,
                            stats_ptr, P, offs, mj, HAS_W, STORE_LOSS)
        if FUSED:
            wsum = _mean_divisor(wsum_ptr, div_ptr, pid, (P // S) * nb, acc, MEAN, WSUM_PARTS)
            coef_a, coef_b, gs = _unit_grad_coefs(wsum, valid, wy, w_ptr, C, keep, spread, HAS_W, SMOOTH, MEAN)
            _grad_planes(base, dz_ptr + zoffs, mj, y, mx, ls, coef_a, coef_b, gs, w_ptr, C, ZC, HAS_W, SMOOTH, UNROLL,
                         STAGES)


@triton.jit
def _ce_tile_update(z, cs, cm, mx, s, wd, wseen, w_ptr, HAS_W: tl.constexpr, SMOOTH: tl.constexpr):
    """_ce_update for a tile of classes cs (rows; cm: those below C, the others hold -inf),
    but for the target's logit (the caller loads it): the tile's own max and sum of
    exponentials, merged into the running ones (lse_merge). A -inf logit adds nothing
    (exp(-inf - m) = 0; an all -inf column subtracts 0, not -inf, so no per-logit test is
    needed), a NaN one makes the sum NaN."""
    mc = tl.max(z, 0)
    sc = tl.sum(_exp_ftz(z - tl.where(mc == float("-inf"), 0.0, mc)[None, :]), 0)
    new_mx, s = lse_merge(mx, s, mc, sc)
    if SMOOTH:
        wc = _row_weights(w_ptr, cs, cm, HAS_W)
        grow = tl.where((new_mx > mx) & (mx > float("-inf")), wseen * (new_mx - mx), 0.0)
        term = tl.where(z == float("-inf"), wc * float("inf"), wc * (new_mx[None, :] - z))
        wd, wseen = wd + grow + tl.sum(tl.where(cm, term, 0.0), 0), wseen + tl.sum(wc, 0)
    return new_mx, s, wd, wseen


@triton.jit
def _ce_tile_forward_kernel(z_ptr, y_ptr, w_ptr, loss_ptr, part_ptr, stats_ptr, dz_ptr, wsum_ptr, div_ptr, C, S, P, nb,
                            ignore_index, keep: tl.float64, spread: tl.float64, HAS_W: tl.constexpr,
                            SMOOTH: tl.constexpr, STORE_LOSS: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK: tl.constexpr, ONE_TILE: tl.constexpr, STAGES: tl.constexpr,
                            GATHER: tl.constexpr, LOOP: tl.constexpr, FUSED: tl.constexpr, MEAN: tl.constexpr,
                            WSUM_PARTS: tl.constexpr):
    """_ce_forward_kernel with the class planes of BLOCK positions loaded BLOCK_C at a time
    as one tile (all of its loads in flight at once, not one plane per step), each tile
    reduced over its classes and merged (_ce_tile_update). ONE_TILE: C <= BLOCK_C, a loop of
    one iteration, which the compiler removes. FUSED: as _ce_forward_kernel's."""
    acc = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    keep, spread = tl.full((), keep, acc), tl.full((), spread, acc)
    start, stop, step = _blocks(P, S, nb, LOOP)
    rows = tl.arange(0, BLOCK_C)[:, None]
    for pid in range(start, stop, step):
        offs, zoffs, mj, y, valid = position_block(z_ptr, y_ptr, pid, nb, C, S, 1, ignore_index, BLOCK)
        yc = _target_class(y, C)
        zy = _target_logit(z_ptr, zoffs, y, mj, C, S, acc, GATHER)
        mx = tl.full((BLOCK,), float("-inf"), acc)
        s = tl.zeros((BLOCK,), acc)
        wd = tl.zeros((BLOCK,), acc)
        wseen = tl.zeros((BLOCK,), acc)
        for c0 in tl.range(0, BLOCK_C if ONE_TILE else C, BLOCK_C, num_stages=STAGES):
            cs = c0 + rows
            cm = cs < C
            z = tl.load(z_ptr + zoffs[None, :] + cs.to(tl.int64) * S, mask=cm & mj[None, :],
                        other=float("-inf")).to(acc)
            if not GATHER:  # z itself in the target's tile, 0 in the others
                zy += tl.sum(tl.where(cs == yc[None, :], z, 0.0), 0)
            mx, s, wd, wseen = _ce_tile_update(z, cs, cm, mx, s, wd, wseen, w_ptr, HAS_W, SMOOTH)
        ls, wy = _ce_finish(mx, s, zy, wd, y, valid, C, w_ptr, keep, spread, loss_ptr, part_ptr, pid, (P // S) * nb,
                            stats_ptr, P, offs, mj, HAS_W, STORE_LOSS)
        if FUSED:
            wsum = _mean_divisor(wsum_ptr, div_ptr, pid, (P // S) * nb, acc, MEAN, WSUM_PARTS)
            coef_a, coef_b, gs = _unit_grad_coefs(wsum, valid, wy, w_ptr, C, keep, spread, HAS_W, SMOOTH, MEAN)
            _grad_tiles(z_ptr, dz_ptr, zoffs, mj, y, mx, ls, coef_a, coef_b, gs, w_ptr, C, S, HAS_W, SMOOTH, BLOCK_C,
                        ONE_TILE, STAGES)


@triton.jit
def _grad_coefs(g, wy, wsum, keep, spread, SMOOTH: tl.constexpr):
    """a = g (keep w_y + spread W), b = g keep w_y and gs = g spread of d loss / d z_c (W =
    wsum is read only with label smoothing). As in _ce_loss, a term whose factor is 0 is left
    out: without label smoothing a NaN or inf weight of a class no position targets must not
    reach every gradient (0 * inf)."""
    hard = tl.where(keep != 0, keep * wy, tl.where(wy != wy, wy, 0.0))  # a NaN w_y stays NaN
    a = hard
    if SMOOTH:
        a = tl.where(spread != 0, hard + spread * wsum, hard)
    return g * a, g * hard, g * spread


@triton.jit
def _smooth_weight_sum(w_ptr, C, HAS_W: tl.constexpr, SMOOTH: tl.constexpr):
    """_weight_sum where label smoothing needs it (a loop over C per program), else 0."""
    if SMOOTH:
        return _weight_sum(w_ptr, C, HAS_W)
    else:
        return 0.0


@triton.jit
def _ce_grad(z, c, y, mx, ls, coef_a, coef_b, gs, w_ptr, HAS_W: tl.constexpr, SMOOTH: tl.constexpr):
    """d loss / d z_c = a p_c - b [c = y] - g spread w_c (the last term only with label smoothing)."""
    dz = coef_a * tl.exp((z - mx) - ls) - tl.where(y == c, coef_b, 0.0)
    if SMOOTH:
        dz -= gs * _class_weight(w_ptr, c, HAS_W)
    return dz


@triton.jit
def _backward_block(pid, g_ptr, wsum_ptr, z_ptr, y_ptr, w_ptr, stats_ptr, C, S, P, nb, ZS, ignore_index, keep,
                    spread, HAS_W: tl.constexpr, SMOOTH: tl.constexpr, G_STEP: tl.constexpr, MEAN: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Block pid of a backward program's positions (position_block): offsets in class plane 0,
    mask and targets, each position's stats m and l, and the coefficients of _grad_coefs."""
    offs, base, mj, y, valid = position_block(z_ptr, y_ptr, pid, nb, C, S, ZS, ignore_index, BLOCK)
    acc = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    keep, spread = tl.full((), keep, acc), tl.full((), spread, acc)
    g = _position_grad(g_ptr, wsum_ptr, offs, mj, valid, G_STEP, MEAN)
    mx = tl.load(stats_ptr + offs, mask=mj, other=0.0).to(acc)
    ls = tl.load(stats_ptr + P + offs, mask=mj, other=0.0).to(acc)
    coef_a, coef_b, gs = _grad_coefs(g, _target_weight(w_ptr, y, valid, C, HAS_W),
                                     _smooth_weight_sum(w_ptr, C, HAS_W, SMOOTH), keep, spread, SMOOTH)
    return base, mj, y, mx, ls, coef_a, coef_b, gs


@triton.jit
def _ce_backward_kernel(g_ptr, wsum_ptr, z_ptr, y_ptr, w_ptr, stats_ptr, dz_ptr, C, S, P, nb, ignore_index,
                        keep: tl.float64, spread: tl.float64, HAS_W: tl.constexpr, SMOOTH: tl.constexpr,
                        G_STEP: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr, UNROLL: tl.constexpr,
                        STAGES: tl.constexpr, LOOP: tl.constexpr, ZS: tl.constexpr):
    """ZS: as in _ce_forward_kernel (the gradient's strides are the logits')."""
    ZC = S if ZS == 1 else 1
    start, stop, step = _blocks(P, S, nb, LOOP)
    for pid in range(start, stop, step):
        base, mj, y, mx, ls, coef_a, coef_b, gs = _backward_block(pid, g_ptr, wsum_ptr, z_ptr, y_ptr, w_ptr,
                                                                  stats_ptr, C, S, P, nb, ZS, ignore_index, keep,
                                                                  spread, HAS_W, SMOOTH, G_STEP, MEAN, BLOCK)
        _grad_planes(z_ptr + base, dz_ptr + base, mj, y, mx, ls, coef_a, coef_b, gs, w_ptr, C, ZC, HAS_W, SMOOTH,
                     UNROLL, STAGES)


@triton.jit
def _grad_planes(zp, dp, mj, y, mx, ls, coef_a, coef_b, gs, w_ptr, C, ZC, HAS_W: tl.constexpr, SMOOTH: tl.constexpr,
                 UNROLL: tl.constexpr, STAGES: tl.constexpr):
    """The gradient of a block of positions (its class plane 0 at zp in the logits, dp in the
    gradient, planes ZC apart), UNROLL class planes a step; classes past C are masked, as in
    the forward."""
    for c0 in tl.range(0, C, UNROLL, num_stages=STAGES):
        for u in tl.static_range(UNROLL):
            live = c0 + u < C
            dz = _ce_grad(tl.load(zp, mask=mj & live, other=0.0).to(mx.dtype), tl.where(live, c0 + u, 0), y, mx,
                          ls, coef_a, coef_b, gs, w_ptr, HAS_W, SMOOTH)
            tl.store(dp, dz.to(dp.dtype.element_ty), mask=mj & live)
            zp += ZC
            dp += ZC


@triton.jit
def _ce_tile_backward_kernel(g_ptr, wsum_ptr, z_ptr, y_ptr, w_ptr, stats_ptr, dz_ptr, C, S, P, nb, ignore_index,
                             keep: tl.float64, spread: tl.float64, HAS_W: tl.constexpr, SMOOTH: tl.constexpr,
                             G_STEP: tl.constexpr, MEAN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr,
                             ONE_TILE: tl.constexpr, STAGES: tl.constexpr, LOOP: tl.constexpr):
    """_ce_backward_kernel with the block's class planes BLOCK_C at a time as one tile."""
    start, stop, step = _blocks(P, S, nb, LOOP)
    for pid in range(start, stop, step):
        base, mj, y, mx, ls, coef_a, coef_b, gs = _backward_block(pid, g_ptr, wsum_ptr, z_ptr, y_ptr, w_ptr,
                                                                  stats_ptr, C, S, P, nb, 1, ignore_index, keep,
                                                                  spread, HAS_W, SMOOTH, G_STEP, MEAN, BLOCK)
        _grad_tiles(z_ptr, dz_ptr, base, mj, y, mx, ls, coef_a, coef_b, gs, w_ptr, C, S, HAS_W, SMOOTH, BLOCK_C,
                    ONE_TILE, STAGES)


@triton.jit
def _grad_tiles(z_ptr, dz_ptr, base, mj, y, mx, ls, coef_a, coef_b, gs, w_ptr, C, S, HAS_W: tl.constexpr,
                SMOOTH: tl.constexpr, BLOCK_C: tl.constexpr, ONE_TILE: tl.constexpr, STAGES: tl.constexpr):
    """_grad_planes with the class planes BLOCK_C at a time as one tile (base: the block's
    offsets in class plane 0)."""
    rows = tl.arange(0, BLOCK_C)[:, None]
    for c0 in tl.range(0, BLOCK_C if ONE_TILE else C, BLOCK_C, num_stages=STAGES):
        cs = c0 + rows
        cm = cs < C
        m = cm & mj[None, :]
        at = base[None, :] + cs.to(tl.int64) * S
        z = tl.load(z_ptr + at, mask=m, other=0.0).to(mx.dtype)
        dz = (coef_a[None, :] * tl.exp((z - mx[None, :]) - ls[None, :])
              - tl.where(cs == y[None, :], coef_b[None, :], 0.0))
        if SMOOTH:
            dz -= gs[None, :] * _row_weights(w_ptr, cs, cm, HAS_W)
        tl.store(dz_ptr + at, dz.to(dz_ptr.dtype.element_ty), mask=m)


@triton.jit
def _mean_divisor(wsum_ptr, div_ptr, pid, nparts, acc: tl.constexpr, MEAN: tl.constexpr,
                  WSUM_PARTS: tl.constexpr):
    """wsum in acc under the mean (else 1, unused): at wsum_ptr, or with WSUM_PARTS summed from
    _ce_wsum_kernel's nparts partial sums there (one launch less), in a fixed order: the same
    bits in every program. That order need not be _ce_reduce_kernel's (inexact partial sums,
    with weights, may round otherwise), so block 0 stores its fp64 sum at div_ptr, from which
    the reduce takes wsum and the mean (GIVEN): the outputs and the gradient agree."""
    if MEAN:
        if WSUM_PARTS:
            wsum = _sum_parts(wsum_ptr, nparts, _FUSED_REDUCE_BLOCK)
            if pid == 0:
                tl.store(div_ptr, wsum)
            return wsum.to(acc)
        return tl.load(wsum_ptr).to(acc)
    return tl.full((), 1.0, acc)


@triton.jit
def _unit_grad_coefs(wsum, valid, wy, w_ptr, C, keep, spread, HAS_W: tl.constexpr, SMOOTH: tl.constexpr,
                     MEAN: tl.constexpr):
    """_grad_coefs for a loss gradient of 1 (what _backward_block computes from a gradient
    of 1.0 in memory: 1 / wsum under the mean)."""
    g = tl.full(wy.shape, 1.0, wy.dtype)
    if MEAN:
        g = g / wsum
    return _grad_coefs(tl.where(valid, g, 0.0), wy, _smooth_weight_sum(w_ptr, C, HAS_W, SMOOTH), keep, spread,
                       SMOOTH)


@triton.jit
def _ce_wsum_kernel(y_ptr, w_ptr, part_ptr, C, S, nb, ignore_index, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """The forward's partial sums of the target weights alone, over the same blocks (and 0 for
    the loss's): the mean's divisor, for a kernel that writes the gradient with the loss."""
    pid = tl.program_id(0)
    _, _, _, y, valid = position_block(y_ptr, y_ptr, pid, nb, C, S, 1, ignore_index, BLOCK)
    wy = _target_weight(w_ptr, y, valid, C, HAS_W)
    tl.store(part_ptr + pid, 0.0)
    tl.store(part_ptr + tl.num_programs(0) + pid, tl.sum(wy.to(tl.float64), 0))


@triton.jit
def _scale_grad_kernel(x_ptr, g_ptr, numel, BLOCK: tl.constexpr):
    """x *= g in place, blocks a grid apart; where g is 1 a program reads g alone."""
    g = tl.load(g_ptr)
    if g != 1.0:
        for b in range(tl.program_id(0), tl.cdiv(numel, BLOCK), tl.num_programs(0)):
            o = tl.cast(b, tl.int64) * BLOCK + tl.arange(0, BLOCK)  # the interpreter: b is an int
            m = o < numel
            x = tl.load(x_ptr + o, mask=m)
            tl.store(x_ptr + o, (x.to(g.dtype) * g).to(x_ptr.dtype.element_ty), mask=m)


# [N, C] logits (S = 1): a block of positions would hold one. A program takes BLOCK_R rows
# (one where a row has many classes), their classes BLOCK_C at a time (contiguous loads), max
# then sum of exp as on the CPU.

@triton.jit
def _row_weights(w_ptr, cs, m, HAS_W: tl.constexpr):
    if HAS_W:
        return tl.load(w_ptr + cs, mask=m, other=0.0)
    else:
        return tl.where(m, 1.0, 0.0)


@triton.jit
def _row_terms(z, mx, cs, m, sv, dv, wv, w_ptr, C, HAS_W: tl.constexpr, SMOOTH: tl.constexpr):
    """A class tile's exp(z - max) into sv and, with label smoothing, its w_c (max - z_c)
    into dv and weights into wv (masked classes m add nothing)."""
    sv += tl.where(m, tl.exp(z - mx[:, None]), 0.0)
    if SMOOTH:
        wc = _row_weights(w_ptr, cs, cs < C, HAS_W)
        dv += tl.where(m, wc * (mx[:, None] - z), 0.0)
        wv += wc
    return sv, dv, wv


@triton.jit
def _ce_rows_forward_kernel(z_ptr, y_ptr, w_ptr, loss_ptr, part_ptr, stats_ptr, N, C, ignore_index,
                            keep: tl.float64, spread: tl.float64, HAS_W: tl.constexpr, SMOOTH: tl.constexpr,
                            STORE_LOSS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                            ONE_TILE: tl.constexpr):
    r0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    lr = tl.arange(0, BLOCK_R)  # offsets within the tile in 32 bits: BLOCK_R > 1 only for few classes
    rm = (lr < N - r0) | (BLOCK_R == 1)  # a program a row: it exists (no mask to apply)
    acc = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    keep, spread = tl.full((), keep, acc), tl.full((), spread, acc)
    z_ptr += r0 * C
    rows = z_ptr + (lr * C)[:, None]
    sv = tl.zeros((BLOCK_R, BLOCK_C), acc)
    dv = tl.zeros((BLOCK_R, BLOCK_C), acc)
    wv = tl.zeros((1, BLOCK_C), acc)  # the same for every row
    if ONE_TILE:  # the rows' classes in one tile: read once
        cs = tl.arange(0, BLOCK_C)[None, :]
        m = rm[:, None] & (cs < C)
        z = tl.load(rows + cs, mask=m, other=float("-inf")).to(acc)
        mx = tl.max(z, 1)
        sv, dv, wv = _row_terms(z, mx, cs, m, sv, dv, wv, w_ptr, C, HAS_W, SMOOTH)
    else:
        mv = tl.full((BLOCK_R, BLOCK_C), float("-inf"), acc)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)[None, :]
            mv = tl.maximum(mv, tl.load(rows + cs, mask=rm[:, None] & (cs < C), other=float("-inf")).to(acc))
        mx = tl.max(mv, 1)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)[None, :]
            m = rm[:, None] & (cs < C)
            z = tl.load(rows + cs, mask=m, other=0.0).to(acc)
            sv, dv, wv = _row_terms(z, mx, cs, m, sv, dv, wv, w_ptr, C, HAS_W, SMOOTH)
    y = tl.load(y_ptr + r0 + lr, mask=rm, other=0)
    valid = y != ignore_index
    inr = valid & (y >= 0) & (y < C)
    zy = tl.load(z_ptr + lr * C + tl.where(inr, y, 0), mask=rm & inr, other=0.0).to(acc)
    wy = _target_weight(w_ptr, y, valid, C, HAS_W)
    ls = tl.where(mx == float("-inf"), float("nan"), tl.log(tl.sum(sv, 1)))
    loss = _ce_loss(mx, ls, zy, tl.sum(dv, 1), wy, valid, keep, spread, tl.sum(wv, 1))
    if STORE_LOSS:
        tl.store(loss_ptr + r0 + lr, loss, mask=rm)
    # a partial sum a program (rows past N are out of the sums)
    pid, nparts = tl.program_id(0), tl.num_programs(0)
    tl.store(part_ptr + pid, tl.sum(tl.where(rm, loss.to(tl.float64), 0.0), 0))
    tl.store(part_ptr + nparts + pid, tl.sum(tl.where(rm, wy.to(tl.float64), 0.0), 0))
    tl.store(stats_ptr + r0 + lr, mx, mask=rm)
    tl.store(stats_ptr + N + r0 + lr, ls, mask=rm)


@triton.jit
def _ce_rows_backward_kernel(g_ptr, wsum_ptr, z_ptr, y_ptr, w_ptr, stats_ptr, dz_ptr, N, C, ignore_index,
                             keep: tl.float64, spread: tl.float64, HAS_W: tl.constexpr, SMOOTH: tl.constexpr,
                             G_STEP: tl.constexpr, MEAN: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_C: tl.constexpr, ONE_TILE: tl.constexpr):
    steps: tl.constexpr = BLOCK_C if ONE_TILE else C  # a constant trip count of 1: no loop
    r0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    lr = tl.arange(0, BLOCK_R)  # as in the forward
    rm = (lr < N - r0) | (BLOCK_R == 1)
    acc = tl.float64 if z_ptr.dtype.element_ty == tl.float64 else tl.float32
    keep, spread = tl.full((), keep, acc), tl.full((), spread, acc)
    y = tl.load(y_ptr + r0 + lr, mask=rm, other=0)
    valid = y != ignore_index
    g = _position_grad(g_ptr, wsum_ptr, r0 + lr, rm, valid, G_STEP, MEAN)
    mx = tl.load(stats_ptr + r0 + lr, mask=rm, other=0.0).to(acc)[:, None]
    ls = tl.load(stats_ptr + N + r0 + lr, mask=rm, other=0.0).to(acc)[:, None]
    wv = tl.zeros((1, BLOCK_C), acc)
    if SMOOTH:
        for c0 in range(0, steps, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)[None, :]
            wv += _row_weights(w_ptr, cs, cs < C, HAS_W)
    coef_a, coef_b, gs = _grad_coefs(g, _target_weight(w_ptr, y, valid, C, HAS_W), tl.sum(wv, 1), keep, spread,
                                     SMOOTH)
    # ignored rows have coefficients 0, targets outside [0, C) NaN ones: -1 matches no class
    coef_a, coef_b, gs, yc = coef_a[:, None], coef_b[:, None], gs[:, None], _target_class(y, C)[:, None]
    z_ptr += r0 * C
    dz_ptr += r0 * C
    rows = z_ptr + (lr * C)[:, None]
    drows = dz_ptr + (lr * C)[:, None]
    for c0 in range(0, steps, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)[None, :]
        m = rm[:, None] & (cs < C)
        z = tl.load(rows + cs, mask=m, other=0.0).to(acc)
        dz = coef_a * tl.exp((z - mx) - ls) - tl.where(yc == cs, coef_b, 0.0)
        if SMOOTH:
            dz -= gs * _row_weights(w_ptr, cs, cs < C, HAS_W)
        tl.store(drows + cs, dz.to(dz_ptr.dtype.element_ty), mask=m)


def _check_class_steps(op, c, step, what):
    # The class loops step through C in C's type: Triton passes C below 2^31 as i32, where the
    # step past the last one would wrap (a negative class, still below C) and go on.
    if 2**31 - step < c < 2**31:
        raise NotImplementedError(f"{op}: {c} classes of {what} logits, within {step} of 2^31 (use fewer, or 2^31 "
                                  "or more)")


# The row kernels' tiles: BLOCK_C, the next power of 2 of C up to MAX_BLOCK_C, by about
# ELEMS / BLOCK_C rows (one from 1024 classes). Few classes ([N * H * W, 19] channels_last
# logits, small heads): a program a row would leave most lanes idle.
# WARPS: a program's warps below 1024 classes (8 from there). Up to PLANES_MAX_C classes the
# rows go to the plain kernels instead (_rows_as_planes: each thread takes whole rows, with
# no shuffles between lanes; the classes' loads are 4C bytes apart across a warp): off until
# a GPU has timed it (benchmarks/tune_cross_entropy.py --rows). On an H200 (2026-11-28 19:35)
# the row tiles of 19 classes took 166 us forward and 98 backward on [2^20, 19], 11% and 39%
# of their passes' copy time, whatever ELEMS and WARPS.
CE_ROWS_CONFIG = {"MAX_BLOCK_C": 1024, "ELEMS": 1024, "WARPS": 4, "PLANES_MAX_C": 0}


def _rows_config(op, n, c):
    """(grid, kernel options) of the row kernels for [N, C] logits, checked before any
    allocation."""
    cap = CE_ROWS_CONFIG["MAX_BLOCK_C"]
    _check_class_steps(op, c, cap, "[N, C]")  # by BLOCK_C, at most cap
    block_c = min(cap, next_power_of_2(c))
    block_r = max(1, CE_ROWS_CONFIG["ELEMS"] // block_c)
    return (grid_rows(op, n, block_r),), {"BLOCK_R": block_r, "BLOCK_C": block_c, "ONE_TILE": block_c >= c,
                                                "num_warps": 8 if block_c >= 1024 else CE_ROWS_CONFIG["WARPS"]}


_BLOCK = 512  # positions per program of the fused upsample kernels
_SCALE_BLOCK = 4096  # elements per step of a scale_grad_ program
# Most loads of the target weights' partial sums (blocks x blocks: each block adds them all)
# for which softmax_cross_entropy_with_grad's forward adds them itself (at (2, 19, 512, 1024)
# with the default tiles, 1024 x 1024) rather than after one more launch (a kernel of one
# program between two full ones).
_WSUM_FOLD_LOADS = 1 << 22
# Positions per program, warps and class planes per loop step of the plain kernels
# (benchmarks/tune_cross_entropy.py). On an H200 (2026-11-27 16:35) 1024 positions, 8 warps
# and two planes a step took 84.5 us for the benchmark's step, 512/4/1 88.3. The class loops
# have since dropped their per-logit inf tests and their second loop for the last C % UNROLL
# classes, and the forward took the target's logit by a load a position (GATHER) instead of a
# compare a logit: fewer instructions (python -m benchmarks.sass_cross_entropy, Triton 3.6:
# forward 29.4 instructions a logit at UNROLL 2 before, 19.6 after; 18.6 at UNROLL 4), yet
# the step took 95.1 us at UNROLL 2 and 94.3 at UNROLL 4 on an H200 (2026-11-28), the forward
# 41.4-41.9 of it. With the benchmark's random labels the gather reads a 32-byte sector from
# a random class plane for 4 bytes, a position each: GATHER False takes the compare again
# (at UNROLL 4: 20.5 instructions a logit, 48 registers), and on the H200 (2026-11-28 09:05,
# 3e70c72) it took the UNROLL 4 step from 94.1 to 87.7 us (forward 41.5 to 36.2), so it is
# the default; the tuner times both.
# PER_SM: 0 launches a program per block; k > 0 at most k programs per multiprocessor, each
# taking blocks a grid apart (fewer, longer programs: no partial last wave).
# STAGES > 1: Triton software-pipelines the class loop, copying the next STAGES - 1 steps'
# planes into shared memory (cp.async) while a step's arithmetic runs; 1: plain loads (the
# same machine code as a plain range). At 3 and 4 stages the step took 88.4-89.7 us on the
# H200 (2026-11-28).
CE_CONFIG = {"BLOCK": 1024, "num_warps": 8, "UNROLL": 4, "PER_SM": 0, "STAGES": 1, "GATHER": False}
# The class-tile kernels (_ce_tile_forward_kernel, _ce_tile_backward_kernel) for
# C <= MAX_C (0: never): tiles of at most BLOCK_C classes (fewer classes: the next power of
# 2) by about ELEMS / BLOCK_C positions. Why: a tile issues all of its loads back to back,
# where the plain kernels issue a class plane's load only after the previous plane's
# arithmetic (one or two 16-byte loads in flight a thread; tiles of 4: 64 bytes, at 18.3
# instructions a logit in the forward under Triton 3.6 with GATHER, 21.3 without, where 74
# registers leave room for 3 programs of 8 warps an SM instead of 4).
# On the H200 (2026-11-28, benchmarks/tune_cross_entropy.py at 12fb470; Triton 3.6) tiles of
# 4 by 4096 positions with 8 warps and GATHER were the fastest forward (34.0 us) and backward
# (44.8 us): a step of 82.1 us, where the plain loop at UNROLL 4 took 94.3 (forward 41.4).
# So they are the default up to 32 classes; the GPU variant and special-value tests passed in
# that run. GATHER: as CE_CONFIG's, for the tiles' forward; without it the step took 80.5 us
# against 82.7 (69.9% of the bound; 09:05 run).
# BACKWARD False: the backward takes the plain kernel (at CE_CONFIG) while the forward
# takes the tiles.
CE_TILE_CONFIG = {"MAX_C": 32, "BLOCK_C": 4, "ELEMS": 4096, "num_warps": 8, "PER_SM": 0, "STAGES": 1,
                  "BACKWARD": True, "GATHER": False}


def _tile_config(c, backward=False):
    """The class-tile kernels' config for C classes (of the backward with `backward`), or None
    where they do not apply."""
    if not 0 < c <= CE_TILE_CONFIG["MAX_C"] or (backward and not CE_TILE_CONFIG["BACKWARD"]):
        return None
    cap = CE_TILE_CONFIG["BLOCK_C"]
    if cap < 1 or cap & (cap - 1):
        raise ValueError(f"CE_TILE_CONFIG['BLOCK_C'] must be a power of 2 (a tile's rows), got {cap}")
    block_c = min(next_power_of_2(c), cap)
    return {"BLOCK_C": block_c, "BLOCK": max(16, CE_TILE_CONFIG["ELEMS"] // block_c), "ONE_TILE": block_c >= c,
            "num_warps": CE_TILE_CONFIG["num_warps"], "PER_SM": CE_TILE_CONFIG["PER_SM"],
            "STAGES": CE_TILE_CONFIG["STAGES"], "GATHER": CE_TILE_CONFIG["GATHER"]}


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    # 4 off CUDA (the interpreter): few enough that the tests' programs take several blocks
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _launch(op, c, s, n, device, backward=False, plain=False):
    """(kernel options, blocks an image, grid) of the plain or class-tile kernels (plain: the
    plain ones)."""
    cfg = dict((None if plain else _tile_config(c, backward)) or CE_CONFIG)
    if "UNROLL" in cfg:  # the plain kernels, UNROLL classes a step
        _check_class_steps(op, c, cfg["UNROLL"], "[N, C, d1, ...]")
    per_sm = cfg.pop("PER_SM")
    gather = cfg.pop("GATHER")
    if not backward:  # the forward's alone
        cfg["GATHER"] = gather
    nb = cdiv(s, cfg["BLOCK"])
    programs = n * nb
    if per_sm:
        programs = min(programs, per_sm * _multiprocessors(device))
    return {**cfg, "LOOP": programs < n * nb}, nb, (programs,)



def _check(op, logits, target, weight, spatial, reduction, label_smoothing, grad=None, stats=None, wsum=None):
    if not 0 <= label_smoothing <= 1:  # NaN too
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    n, c = logits.shape[:2] if logits.dim() >= 2 else (0, 0)
    ok = (logits.dim() == 2 + spatial and logits.is_floating_point() and target.dtype == torch.int64
          and target.dim() == 1 + (1 if spatial == 1 else 2) and target.shape[0] == n
          and (spatial == 2 or target.shape[1:] == logits.shape[2:])
          and (weight is None or weight.shape == (c,)))
    if ok and spatial == 2:
        ok = logits.shape[2] > 0 and logits.shape[3] > 0
    if ok and grad is not None:
        ok = (grad.shape == (target.shape if reduction == 0 else ()) and stats.shape == (2, *target.shape)
              and wsum.shape == () and stats.dtype == wsum.dtype == acc_dtype(logits.dtype))
    require(reduction in (0, 1, 2), op, f"reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    require(ok, op, "logits, target, weight, grad, stats or wsum have inconsistent shapes or dtypes")


def _split(label_smoothing, c):
    """keep and spread of the loss (C = 0, a direct op call: no class to spread over)."""
    return 1.0 - label_smoothing, label_smoothing / max(c, 1)


def _weight(weight, logits):
    """The class weight in the accumulation dtype (any tensor when there is none: unused)."""
    return weight.to(acc_dtype(logits.dtype)).contiguous() if weight is not None else logits


def _outputs(logits, shape, reduction, nparts):
    """The forward's loss map (empty unless reduction is none), stats and fp64 partial sums."""
    acc, dev = acc_dtype(logits.dtype), logits.device
    loss_map = torch.empty((shape[0] if reduction == 0 else 0, *shape[1:]), dtype=acc, device=dev)
    return (loss_map, torch.empty((2, *shape), dtype=acc, device=dev),
            torch.empty((2, nparts), dtype=torch.float64, device=dev))


def _reduce(loss_map, parts, reduction, div=None):
    """(loss, wsum): the map itself for reduction none, else the 0-d mean or sum; wsum from
    the fp64 sum `div` where given (_mean_divisor)."""
    loss = loss_map if reduction == 0 else loss_map.new_empty(())
    wsum = loss_map.new_empty(())
    parts = _collapse(parts)
    _ce_reduce_kernel[(1,)](parts, parts.shape[1], loss, wsum, parts if div is None else div, REDUCTION=reduction,
                            BLOCK=_REDUCE, GIVEN=div is not None)
    return loss, wsum


def _collapse(parts):
    """[2, n] partial sums to at most _REDUCE a row, by launches of many programs (the reduce
    program adds the rest)."""
    while parts.shape[1] > _REDUCE:
        nout = cdiv(parts.shape[1], _COLLAPSE)
        out = parts.new_empty((2, nout))
        _ce_collapse_kernel[(nout, 2)](parts, parts.shape[1], out, nout, BLOCK=_COLLAPSE, num_warps=8)
        parts = out
    return parts


def softmax_cross_entropy(logits, target, weight, ignore_index, label_smoothing, reduction):
    _check("softmax_cross_entropy", logits, target, weight, 1, reduction, label_smoothing)
    n, c, s = logits.shape
    if s == 1:
        return _rows_forward(logits, target, weight, ignore_index, label_smoothing, reduction)
    cfg, nb, grid = _launch("softmax_cross_entropy", c, s, n, logits.device)
    loss_map, stats, parts = _outputs(logits, (n, s), reduction, n * nb)
    if n * nb:
        z = logits.contiguous()
        _forward(cfg, grid, z, target.contiguous(), _weight(weight, z), loss_map, parts, stats, None, None, None, nb,
                 ignore_index, label_smoothing, weight is not None, reduction)
    return (*_reduce(loss_map, parts, reduction), stats)


def _forward(cfg, grid, z, y, w, loss_map, parts, stats, dz, wsum, div, nb, ignore_index, label_smoothing, has_w,
             reduction):
    """The plain or class-tile forward kernel; with a gradient buffer dz FUSED, writing the
    gradient for a loss gradient of 1 too (under the mean, wsum: the divisor, 0-d, or the
    target weights' partial sums, 1-d, whose fp64 sum goes to div)."""
    n, c, s = z.shape
    kernel = _ce_tile_forward_kernel if "BLOCK_C" in cfg else _ce_forward_kernel
    mean = dz is not None and reduction == 1
    wsum, div = (wsum, div) if mean else (parts, parts)
    kernel[grid](z, y, w, loss_map, parts, stats, stats if dz is None else dz, wsum, div, c, s, n * s, nb,
                 ignore_index, *_split(label_smoothing, c), HAS_W=has_w, SMOOTH=label_smoothing != 0,
                 STORE_LOSS=reduction == 0, FUSED=dz is not None, MEAN=mean, WSUM_PARTS=mean and wsum.dim() == 1,
                 **cfg, **_strides(kernel, z))


def _strides(kernel, z):
    """The plain kernels' position stride of [N, C, S] logits z (class planes, or
    _rows_as_planes)."""
    return dict(ZS=z.stride(2)) if kernel in (_ce_forward_kernel, _ce_backward_kernel) else {}


def _rows_as_planes(rows):
    """[N, C, 1] rows (contiguous) as one image's C class planes of N positions, C apart."""
    n, c, _ = rows.shape
    return rows.as_strided((1, c, n), (c * n, 1, c))


def softmax_cross_entropy_with_grad(logits, target, weight, ignore_index, label_smoothing, reduction):
    op = "softmax_cross_entropy_with_grad"
    require(reduction in (1, 2), op, f"reduction must be 1 (mean) or 2 (sum), got {reduction}")
    _check(op, logits, target, weight, 1, reduction, label_smoothing)
    n, c, s = logits.shape
    cfg, nb, grid = _launch(op, c, s, n, logits.device)
    if s == 1 or c == 0 or n * nb == 0:  # the row kernels, or nothing to read: the two ops
        loss, wsum, stats = softmax_cross_entropy(logits, target, weight, ignore_index, label_smoothing, reduction)
        return loss, wsum, stats, softmax_cross_entropy_backward(
            loss.new_ones(()), logits, target, weight, stats, wsum, ignore_index, label_smoothing, reduction)
    z, y = logits.contiguous(), target.contiguous()
    w = _weight(weight, z)
    loss_map, stats, parts = _outputs(logits, (n, s), reduction, n * nb)
    # The mean's divisor first (targets only: 8 bytes a position against 76 of fp32 logits at 19
    # classes): the gradient is written in the loss's pass. Each block of the forward adds its
    # partial sums itself (block 0 keeps the sum in div for the reduce), unless that takes more
    # than _WSUM_FOLD_LOADS loads in all: then one program adds them first. The sum takes no
    # divisor.
    wsum = div = None
    if reduction == 1:
        wparts = parts.new_empty(parts.shape)
        _ce_wsum_kernel[(n * nb,)](y, w, wparts, c, s, nb, ignore_index, HAS_W=weight is not None,
                                   BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
        if (n * nb) ** 2 <= _WSUM_FOLD_LOADS:
            wsum, div = wparts[1], wparts[0, :1]  # the loss's row: unused here
        else:
            wsum = stats.new_empty(())
            wparts = _collapse(wparts)
            _ce_reduce_kernel[(1,)](wparts, wparts.shape[1], wsum, wsum, wparts, REDUCTION=0, BLOCK=_REDUCE,
                                    GIVEN=False)
    dz = torch.empty_like(z)
    _forward(cfg, grid, z, y, w, loss_map, parts, stats, dz, wsum, div, nb, ignore_index, label_smoothing,
             weight is not None, reduction)
    return (*_reduce(loss_map, parts, reduction, div), stats, dz)


def scale_grad_(grad, scale):
    require(grad.is_floating_point() and scale.is_floating_point() and scale.dim() == 0, "scale_grad_",
            "grad must be floating point and scale a 0-d floating-point tensor")
    if not grad.is_contiguous():  # not the kernels' own gradients: torch's kernel
        grad.mul_(scale)
        return
    blocks = cdiv(grad.numel(), _SCALE_BLOCK)
    if blocks:
        _scale_grad_kernel[(min(blocks, 8 * _multiprocessors(grad.device)),)](grad, scale, grad.numel(),
                                                                             BLOCK=_SCALE_BLOCK, num_warps=8)


def _rows_forward(logits, target, weight, ignore_index, label_smoothing, reduction):
    n, c, _ = logits.shape
    op = "softmax_cross_entropy"
    if 0 < c <= CE_ROWS_CONFIG["PLANES_MAX_C"]:  # the plain kernels, a thread a row
        cfg, nb, grid = _launch(op, c, n, 1, logits.device, plain=True)
        loss_map, stats, parts = _outputs(logits, (1, n), reduction, nb)
        if nb:
            z = logits.contiguous()
            _forward(cfg, grid, _rows_as_planes(z), target.contiguous().view(1, n), _weight(weight, z), loss_map,
                     parts, stats, None, None, None, nb, ignore_index, label_smoothing, weight is not None, reduction)
        loss, wsum = _reduce(loss_map, parts, reduction)
        return loss.view(n, 1) if reduction == 0 else loss, wsum, stats.view(2, n, 1)
    grid, cfg = _rows_config(op, n, c)  # before any allocation
    loss_map, stats, parts = _outputs(logits, (n, 1), reduction, grid[0])
    if n:
        z = logits.contiguous()
        _ce_rows_forward_kernel[grid](
            z, target.contiguous(), _weight(weight, z), loss_map, parts, stats, n, c, ignore_index,
            *_split(label_smoothing, c), HAS_W=weight is not None, SMOOTH=label_smoothing != 0,
            STORE_LOSS=reduction == 0, **cfg)
    return (*_reduce(loss_map, parts, reduction), stats)


def softmax_cross_entropy_backward(grad, logits, target, weight, stats, wsum, ignore_index, label_smoothing,
                                   reduction):
    _check("softmax_cross_entropy_backward", logits, target, weight, 1, reduction, label_smoothing, grad, stats,
           wsum)
    n, c, s = logits.shape
    op = "softmax_cross_entropy_backward"
    planes = s == 1 and 0 < c <= CE_ROWS_CONFIG["PLANES_MAX_C"]  # rows by the plain kernels
    if planes:
        cfg, nb, grid = _launch(op, c, n, 1, logits.device, backward=True, plain=True)
    else:
        cfg, nb, grid = _launch(op, c, s, n, logits.device, backward=True)
    if s == 1 and not planes:  # before any allocation
        rows, rows_cfg = _rows_config(op, n, c)
    z = logits.contiguous()
    dz = torch.empty_like(z)
    if n * nb == 0 or (s == 1 and c == 0):
        return dz
    acc = acc_dtype(logits.dtype)
    g, g_step = loss_grad(grad, acc)
    args = (g, wsum, z, target.contiguous(), _weight(weight, z), stats.contiguous(), dz)  # acc already: _check
    opts = dict(HAS_W=weight is not None, SMOOTH=label_smoothing != 0, G_STEP=g_step, MEAN=reduction == 1)
    if planes:  # one image of n positions, c apart (_rows_as_planes); dz the same
        _ce_backward_kernel[grid](*args, c, n, n, nb, ignore_index, *_split(label_smoothing, c), **opts, **cfg, ZS=c)
    elif s == 1:
        _ce_rows_backward_kernel[rows](
            *args, n, c, ignore_index, *_split(label_smoothing, c), **opts, **rows_cfg)
    else:
        kernel = _ce_tile_backward_kernel if "BLOCK_C" in cfg else _ce_backward_kernel
        kernel[grid](*args, c, s, n * s, nb, ignore_index, *_split(label_smoothing, c), **opts, **cfg,
                     **_strides(kernel, z))
    return dz


# ------------------------------------------------- fused upsample + cross-entropy

@triton.jit
def _up_row(yi0, yi1, yw0, yw1, xi0, xi1, xw0, xw1, row, ox, mo, H):
    """Taps of output row `row` (= image * H + oy) and columns ox: the row's scalars,
    the columns' vectors, and the image index."""
    a0, a1, wa0, wa1 = row_taps(yi0, yi1, yw0, yw1, row % H)
    b0 = tl.load(xi0 + ox, mask=mo, other=0)
    b1 = tl.load(xi1 + ox, mask=mo, other=0)
    wb0 = tl.load(xw0 + ox, mask=mo, other=0.0)
    wb1 = tl.load(xw1 + ox, mask=mo, other=0.0)
    return a0, a1, wa0, wa1, b0, b1, wb0, wb1, (row // H).to(tl.int64)


@triton.jit
def _up_ce_forward_kernel(l_ptr, y_ptr, w_ptr, loss_ptr, part_ptr, stats_ptr, yi0, yi1, yw0, yw1, xi0, xi1, xw0,
                          xw1, C, h, w, H, W, P, ignore_index, keep: tl.float64, spread: tl.float64,
                          HAS_W: tl.constexpr, SMOOTH: tl.constexpr, STORE_LOSS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)  # image * H + output row
    ox = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mo = ox < W
    a0, a1, wa0, wa1, b0, b1, wb0, wb1, n = _up_row(yi0, yi1, yw0, yw1, xi0, xi1, xw0, xw1, row, ox, mo, H)
    acc = wa0.dtype
    keep, spread = tl.full((), keep, acc), tl.full((), spread, acc)
    offs = row.to(tl.int64) * W + ox
    y = tl.load(y_ptr + offs, mask=mo, other=ignore_index)
    valid = (y != ignore_index) & mo
    mx = tl.full((BLOCK,), float("-inf"), acc)
    s = tl.zeros((BLOCK,), acc)
    zy = tl.zeros((BLOCK,), acc)
    wd = tl.zeros((BLOCK,), acc)
    wseen = tl.zeros((BLOCK,), acc)
    for c in range(C):
        z = bilinear_row(l_ptr + (n * C + c) * h * w, w, a0, a1, wa0, wa1, b0, b1, wb0, wb1, mo)
        mx, s, wd, wseen = _ce_update(z, c, True, mx, s, wd, wseen, w_ptr, HAS_W, SMOOTH)
        zy += tl.where(y == c, z, 0.0)  # computed logits: no load to gather
    nx = tl.num_programs(1)
    _ce_finish(mx, s, zy, wd, y, valid, C, w_ptr, keep, spread, loss_ptr, part_ptr, row * nx + tl.program_id(1),
               tl.num_programs(0) * nx, stats_ptr, P, offs, mo, HAS_W, STORE_LOSS)


@triton.jit
def _up_ce_contract_x_kernel(l_ptr, y_ptr, w_ptr, g_ptr, wsum_ptr, stats_ptr, t_ptr, yi0, yi1, yw0, yw1, xi0, xi1,
                             xw0, xw1, xlo, xhi, C, c0, CC, h, w, H, W, P, ignore_index, keep: tl.float64,
                             spread: tl.float64, BX, HAS_W: tl.constexpr, SMOOTH: tl.constexpr,
                             G_STEP: tl.constexpr, MEAN: tl.constexpr, FX: tl.constexpr, BXP: tl.constexpr):
    # For classes c0 .. c0 + CC - 1: the gradient of the upsampled logits on one output row,
    # summed along x into the low-resolution columns of this program's block.
    row = tl.program_id(0)  # image * H + output row
    ox, mo, cells, mc, ta, tb, wa, wb = column_weights(xi0, xi1, xw0, xw1, xlo, xhi, tl.program_id(1), w, BX, FX,
                                                       BXP)
    a0, a1, wa0, wa1, b0, b1, wb0, wb1, n = _up_row(yi0, yi1, yw0, yw1, xi0, xi1, xw0, xw1, row, ox, mo, H)
    keep, spread = tl.full((), keep, wa0.dtype), tl.full((), spread, wa0.dtype)
    offs = row.to(tl.int64) * W + ox
    y = tl.load(y_ptr + offs, mask=mo, other=ignore_index)
    valid = (y != ignore_index) & mo
    g = _position_grad(g_ptr, wsum_ptr, offs, mo, valid, G_STEP, MEAN)
    mx = tl.load(stats_ptr + offs, mask=mo, other=0.0)
    ls = tl.load(stats_ptr + P + offs, mask=mo, other=0.0)
    coef_a, coef_b, gs = _grad_coefs(g, _target_weight(w_ptr, y, valid, C, HAS_W),
                                     _smooth_weight_sum(w_ptr, C, HAS_W, SMOOTH), keep, spread, SMOOTH)
    oy = row % H
    for cc in range(CC):
        c = c0 + cc
        z = bilinear_row(l_ptr + (n * C + c) * h * w, w, a0, a1, wa0, wa1, b0, b1, wb0, wb1, mo)
        du = tl.where(mo, _ce_grad(z, c, y, mx, ls, coef_a, coef_b, gs, w_ptr, HAS_W, SMOOTH), 0.0)
        tl.store(t_ptr + ((n * CC + cc) * H + oy) * w + cells, contract_x(du, ta, tb, wa, wb), mask=mc)


def _up_taps(logits, target, align_corners, acc):
    h, w = logits.shape[2:]
    H, W = target.shape[1:]
    return (axis_taps(h, H, align_corners, -1.0, acc, logits.device),
            axis_taps(w, W, align_corners, -1.0, acc, logits.device))


def upsample_cross_entropy(logits, target, align_corners, weight, ignore_index, label_smoothing, reduction):
    _check("upsample_cross_entropy", logits, target, weight, 2, reduction, label_smoothing)
    n, c, h, w = logits.shape
    H, W = target.shape[1:]
    grid = row_grid("upsample_cross_entropy", n * H, W, _BLOCK)
    loss_map, stats, parts = _outputs(logits, (n, H, W), reduction, grid[0] * grid[1])
    if parts.numel():
        ty, tx = _up_taps(logits, target, align_corners, stats.dtype)
        lg = logits.contiguous()
        _up_ce_forward_kernel[grid](
            lg, target.contiguous(), _weight(weight, lg), loss_map, parts, stats, ty.i0, ty.i1, ty.w0, ty.w1, tx.i0,
            tx.i1, tx.w0, tx.w1, c, h, w, H, W, n * H * W, ignore_index, *_split(label_smoothing, c),
            HAS_W=weight is not None, SMOOTH=label_smoothing != 0, STORE_LOSS=reduction == 0, BLOCK=_BLOCK)
    return (*_reduce(loss_map, parts, reduction), stats)


def upsample_cross_entropy_backward(grad, logits, target, align_corners, weight, stats, wsum, ignore_index,
                                    label_smoothing, reduction):
    _check("upsample_cross_entropy_backward", logits, target, weight, 2, reduction, label_smoothing, grad, stats,
           wsum)
    n, c, h, w = logits.shape
    H, W = target.shape[1:]
    lg = logits.contiguous()
    dl = torch.empty_like(lg)
    if dl.numel() == 0:
        return dl
    if H * W == 0:
        return dl.zero_()
    acc = acc_dtype(logits.dtype)
    ty, tx = _up_taps(logits, target, align_corners, acc)
    check_footprint("upsample_cross_entropy_backward", tx)
    # Classes go in blocks of cc, so that the row-contracted gradient t has at most N*H*W values.
    cc = max(1, min(c, W // w))
    grid = row_grid("upsample_cross_entropy_backward", n * H, w, tx.bx)  # and contract_y's, before t
    contract_y_grid("upsample_cross_entropy_backward", n * cc * h, w)
    t = torch.empty((n, cc, H, w), dtype=acc, device=lg.device)
    g, g_step = loss_grad(grad, acc)
    args = (lg, target.contiguous(), _weight(weight, lg), g, wsum, stats.contiguous())  # acc already: _check
    for c0 in range(0, c, cc):
        k = min(cc, c - c0)
        tk = t.view(-1)[: n * k * H * w].view(n, k, H, w)
        _up_ce_contract_x_kernel[grid](
            *args, tk, ty.i0, ty.i1, ty.w0, ty.w1, tx.i0, tx.i1, tx.w0, tx.w1, tx.lo, tx.hi, c, c0, k, h, w, H, W,
            n * H * W, ignore_index, *_split(label_smoothing, c), tx.bx, HAS_W=weight is not None,
            SMOOTH=label_smoothing != 0, G_STEP=g_step, MEAN=reduction == 1, FX=tx.fx, BXP=tx.bxp)
        contract_y(tk, dl, ty, dst_first=c0)
    return dl

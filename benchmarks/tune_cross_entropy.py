"""`python -m benchmarks.tune_cross_entropy`: block size, warps, class-loop unrolling and
pipelining, and programs per multiprocessor of the plain Triton cross-entropy kernels, and
the class-tile kernels' tiles, on this GPU.

Prints, per config (the defaults and the configs that take the target's logit by a
compare first, then in turn the class tiles and the pipelined plain configs, then the other
plain configs), the CUDA-graph time of the benchmark's training
step (forward and backward, mean, ignore_index 255 on (2, 19, 512, 1024) fp32 logits) and
its fraction of the issue's bound: reading the logits twice and writing the gradient once
at the measured copy bandwidth (>= 77% is within 1.3x). The step is CUDA's default, whose
forward writes the gradient too (softmax_cross_entropy_with_grad: the logits read once);
then the same step in two passes (the forward op, then the backward op, as under
torch.compile), the forward op and the backward op alone, each against its own share of the
bound (one pass, two passes), and the forward that writes the gradient alone (against two
passes). First it times the same traffic done by torch's own kernels on the same
logits (two full sums of the logits, one fill of a gradient-sized tensor): the bound as
these kernels reach it on this shape, besides the one the copy bandwidth of 1 GiB buffers
gives, and the default step with the mean's divisor added by a launch of its own.
kernels/cross_entropy.py:CE_CONFIG and CE_TILE_CONFIG take the best.

`--rows`: instead, the row kernels' tiles (CE_ROWS_CONFIG) on the channels_last step (the
[N * H * W, 19] row op) and on [4096, 1000] rows, forward and backward apart.
"""

import itertools
import sys

import torch
import triton.testing
from pyvision_ops.kernels import cross_entropy as K

from pyvision_ops._library import ops

from .bench_cross_entropy import WORKLOADS, two_passes
from .common import cuda_copy_bandwidth

CONFIGS = [{"BLOCK": b, "num_warps": w, "UNROLL": u, "PER_SM": 0, "STAGES": 1, "GATHER": True}
           for b, w, u in [(512, 4, 1), (1024, 4, 1), (1024, 8, 1), (512, 4, 4), (1024, 8, 2), (2048, 8, 2),
                           (1024, 8, 4), (256, 4, 4)]]
# A program per block leaves a partial last wave: under Triton 3.6 the UNROLL 4 forward's 46
# registers give 5 programs of 8 warps an SM, 660 on an H200 for the benchmark's 1024 blocks
# (1.55 waves; the backward's 40: 6, 1.29 waves; `cuobjdump -res-usage` of the sm_90
# compile). Programs that each take about 4 blocks end within a block of each other (on the
# H200, 2026-11-28: 119-185 us, slower than any program-per-block config).
CONFIGS += [{"BLOCK": b, "num_warps": w, "UNROLL": u, "PER_SM": k, "STAGES": 1, "GATHER": True}
            for b, w, u, k in [(256, 4, 4, 8), (256, 4, 4, 4), (512, 4, 4, 4), (1024, 8, 2, 2)]]
# Pipelined class loops (STAGES): the next steps' planes copied to shared memory while a
# step's arithmetic runs (python -m benchmarks.sass_cross_entropy: bytes in flight).
PIPELINED = [{"BLOCK": b, "num_warps": w, "UNROLL": u, "PER_SM": 0, "STAGES": k, "GATHER": True}
             for b, w, u, k in [(1024, 8, 2, 3), (1024, 8, 2, 4), (512, 4, 2, 3), (512, 4, 2, 4), (1024, 8, 1, 5)]]
CONFIGS += PIPELINED
# The forward's target logit by a compare a logit instead of a load a position (GATHER; see
# CE_CONFIG's comment): the default since the H200 timed it (2026-11-28 09:05)
COMPARE = [{"BLOCK": 1024, "num_warps": 8, "UNROLL": u, "PER_SM": 0, "STAGES": 1, "GATHER": False} for u in (4, 2)]
CONFIGS += COMPARE
# The class-tile kernels (CE_TILE_CONFIG): the 19 classes in tiles of 4 (pipelined or not),
# 2 or 8, or in one (python -m benchmarks.sass_cross_entropy: loads in flight, instructions,
# registers; one tile issues 41-80 instructions a logit under Triton 3.6, 40-74 under 3.8).
# On the H200 (2026-11-28) tiles of 4 by 4096 positions with 8 warps were the fastest, one
# tile of all classes the slowest (133-244 us a step).
TILE_CONFIGS = [{"MAX_C": 32, "BLOCK_C": c, "ELEMS": e, "num_warps": w, "PER_SM": 0, "STAGES": k, "BACKWARD": True,
                 "GATHER": True}
                for c, e, w, k in [(4, 4096, 8, 1), (4, 4096, 8, 3), (4, 2048, 4, 1), (4, 2048, 4, 3), (2, 2048, 8, 1),
                                   (8, 4096, 4, 1), (32, 4096, 4, 1), (32, 2048, 4, 1), (32, 4096, 8, 1),
                                   (32, 8192, 8, 1)]]
TILE_COMPARE = [{**t, "GATHER": False} for t in TILE_CONFIGS[:3:2]]  # tiles of 4: 4096/8 and 2048/4
TILE_CONFIGS += TILE_COMPARE
# Fewer blocks in flight for the forward that writes the gradient too: it reads a block's
# logits again after its log-sum-exp, and finds them in L2 only if the blocks in flight fit
# there with the gradient's writes. A block of tiles of 4 by 4096/8 is 19 classes x 1024
# positions x 4 bytes (78 KB); at 63 registers (Triton 3.6) 4 programs an SM hold 41 MB at once
# on an H200's 50 MB L2. Programs that loop over blocks (PER_SM 2, 3) hold 21 and 31 MB.
# Smaller blocks would not do: at 512 or 256 positions by 8 warps the tile spreads its classes
# over threads (42.9 and 77.5 instructions a logit in the forward, against 21.3;
# python -m benchmarks.sass_cross_entropy).
TILE_FUSED = [{"MAX_C": 32, "BLOCK_C": 4, "ELEMS": 4096, "num_warps": 8, "PER_SM": k, "STAGES": 1, "BACKWARD": True,
               "GATHER": False} for k in (2, 3)]
TILE_CONFIGS += TILE_FUSED


ROWS_CONFIGS = [{"ELEMS": e, "WARPS": w} for e, w in [(1024, 4), (512, 4), (2048, 4), (2048, 8), (4096, 8), (256, 2),
                                                          (128, 1)]]
# The rows as class planes (PLANES_MAX_C; these CE_CONFIG blocks, warps and class steps): a
# thread a row. Under Triton 3.8 at 19 classes the forward's class step issues 13.8
# instructions a logit (BLOCK 1024, 8 warps, UNROLL 4; 48 registers), the backward's 18.8 (89
# registers: 2 programs an SM); the row-tile forward issues 1040 instructions a thread for
# its 8 elements of a 32 x 32 tile (19 of a row's 32 classes real), about 130 an element.
ROWS_PLANES = [{"PLANES_MAX_C": 32, "CE_CONFIG": {"BLOCK": b, "num_warps": w, "UNROLL": u}}
               for b, w, u in [(1024, 8, 4), (512, 4, 2), (256, 4, 1), (128, 4, 4)]]


def rows():
    bw = cuda_copy_bandwidth()
    g = torch.Generator(device="cuda").manual_seed(0)
    for n, c in [(2 * 512 * 1024, 19), (4096, 1000)]:
        _rows_case(n, c, bw, g)


def _rows_case(n, c, bw, g):
    z = torch.randn(n, c, 1, device="cuda", generator=g)
    y = torch.randint(0, c, (n, 1), device="cuda", generator=g)
    y[torch.rand(n, 1, device="cuda", generator=g) < 0.1] = 255
    one = torch.ones((), device="cuda")
    _, wsum, stats = ops.softmax_cross_entropy(z, y, None, 255, 0.0, 1)
    bound = z.numel() * z.element_size() / bw  # one pass over the logits
    print(f"[{n}, {c}] rows: one pass over the logits at copy bandwidth {bound * 1e6:.1f} us")
    default, plain = dict(K.CE_ROWS_CONFIG), dict(K.CE_CONFIG)
    for cfg in ROWS_CONFIGS + (ROWS_PLANES if c <= 32 else []):
        K.CE_CONFIG = {**plain, **cfg.get("CE_CONFIG", {})}
        K.CE_ROWS_CONFIG = {**default, **{k: v for k, v in cfg.items() if k != "CE_CONFIG"}}
        fwd = triton.testing.do_bench_cudagraph(lambda: ops.softmax_cross_entropy(z, y, None, 255, 0.0, 1), rep=30,
                                                return_mode="median")
        bwd = triton.testing.do_bench_cudagraph(
            lambda: ops.softmax_cross_entropy_backward(one, z, y, None, stats, wsum, 255, 0.0, 1), rep=30,
            return_mode="median")
        print(f"  {cfg}: forward {fwd * 1e3:6.1f} us ({100 * bound / (fwd / 1e3):5.1f}% of one pass), backward "
              f"{bwd * 1e3:6.1f} us ({100 * 2 * bound / (bwd / 1e3):5.1f}% of two)", flush=True)
    K.CE_ROWS_CONFIG, K.CE_CONFIG = default, plain


def main():
    if "--rows" in sys.argv[1:]:
        return rows()
    workload = next(w for w in WORKLOADS if w.name == "cross_entropy fwd+bwd (2,19,512,1024) (graph)")
    _, step = workload.make("cuda")
    bw = cuda_copy_bandwidth()
    bound = workload.bytes_moved() / bw
    print(f"bound (3 passes at copy bandwidth): {bound * 1e6:.1f} us")
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(2, 19, 512 * 1024, device="cuda", generator=g)
    y = torch.randint(0, 19, (2, 512 * 1024), device="cuda", generator=g)
    y[torch.rand(2, 512 * 1024, device="cuda", generator=g) < 0.1] = 255  # as in the step
    one = torch.ones((), device="cuda")
    dz = torch.empty_like(z)

    def traffic():  # the bound's bytes and no more: read the logits twice, write a gradient once
        z.sum()
        z.sum()
        dz.fill_(1.0)

    ref = triton.testing.do_bench_cudagraph(traffic, rep=50, return_mode="median")
    print(f"the same traffic by torch's kernels: {ref * 1e3:.1f} us ({100 * bound / (ref / 1e3):.1f}% of the "
          f"bound; a step within 1.3x of it takes at most {1.3 * ref * 1e3:.1f} us)")
    # the default step, its mean's divisor added by a launch of its own (not by every program
    # of the forward): what K._WSUM_FOLD_LOADS saves
    fold, K._WSUM_FOLD_LOADS = K._WSUM_FOLD_LOADS, 0
    apart = triton.testing.do_bench_cudagraph(step, rep=30, return_mode="median")
    K._WSUM_FOLD_LOADS = fold
    print(f"the default step with the mean's divisor from a launch of its own: {apart * 1e3:.1f} us")
    _, wsum, stats = ops.softmax_cross_entropy(z, y, None, 255, 0.0, 1)
    best = best_tile = best_fwd = best_bwd = None
    plain, tiles = dict(K.CE_CONFIG), dict(K.CE_TILE_CONFIG)
    tile_off = {**tiles, "MAX_C": 0}
    # the defaults (the tiles, where they take 19 classes, and the plain loop) and the
    # untimed compare configs first, then the class tiles and the pipelined plain configs in
    # turn, then the other plain configs and PER_SM: a run cut by its timeout has the new ones
    head = ([(None, tiles)] if tiles["MAX_C"] >= 19 else []) + [(None, t) for t in TILE_COMPARE + TILE_FUSED
                                                                  if t != tiles]
    head += [(plain, tile_off)] + [(c, tile_off) for c in COMPARE if c != plain]
    rest = itertools.zip_longest([(None, t) for t in TILE_CONFIGS
                                  if t != tiles and t not in TILE_COMPARE and t not in TILE_FUSED],
                                 [(c, tile_off) for c in PIPELINED if c != plain])
    order = (head + [x for pair in rest for x in pair if x]
             + [(c, tile_off) for c in CONFIGS
                if c != plain and c not in PIPELINED and c not in COMPARE and not c["PER_SM"]]
             + [(c, tile_off) for c in CONFIGS if c != plain and c["PER_SM"]])
    for cfg, tile in order:
        K.CE_CONFIG = cfg or plain
        K.CE_TILE_CONFIG = tile
        ms = triton.testing.do_bench_cudagraph(step, rep=50, return_mode="median")
        two = triton.testing.do_bench_cudagraph(two_passes(step), rep=30, return_mode="median")
        fwd = triton.testing.do_bench_cudagraph(lambda: ops.softmax_cross_entropy(z, y, None, 255, 0.0, 1), rep=30,
                                                return_mode="median")
        bwd = triton.testing.do_bench_cudagraph(
            lambda: ops.softmax_cross_entropy_backward(one, z, y, None, stats, wsum, 255, 0.0, 1), rep=30,
            return_mode="median")
        wg = triton.testing.do_bench_cudagraph(lambda: ops.softmax_cross_entropy_with_grad(z, y, None, 255, 0.0, 1),
                                               rep=30, return_mode="median")
        print(f"{cfg or tile}: step {ms * 1e3:6.1f} us, {100 * bound / (ms / 1e3):5.1f}% of the bound, "
              f"{ms / ref:.2f}x torch's traffic | two passes {two * 1e3:6.1f} us, {100 * bound / (two / 1e3):5.1f}% "
              f"| forward {fwd * 1e3:6.1f} us, {100 * bound / 3 / (fwd / 1e3):5.1f}% | backward {bwd * 1e3:6.1f} us, "
              f"{100 * bound * 2 / 3 / (bwd / 1e3):5.1f}% | forward with the gradient {wg * 1e3:6.1f} us, "
              f"{100 * bound * 2 / 3 / (wg / 1e3):5.1f}%", flush=True)
        if cfg is not None:
            best = min(best or (ms, cfg), (ms, cfg), key=lambda t: t[0])
        else:
            best_tile = min(best_tile or (ms, tile), (ms, tile), key=lambda t: t[0])
        best_fwd = min(best_fwd or (fwd, cfg or tile), (fwd, cfg or tile), key=lambda t: t[0])
        best_bwd = min(best_bwd or (bwd, cfg or tile), (bwd, cfg or tile), key=lambda t: t[0])
    print(f"best of CONFIGS: {best[1]} ({best[0] * 1e3:.1f} us)")
    print(f"best of TILE_CONFIGS: {best_tile[1]} ({best_tile[0] * 1e3:.1f} us)" if best_tile else "no tile config ran")
    # Of the pairs, one can be set: a tile forward with a plain backward (CE_TILE_CONFIG's
    # BACKWARD False); two plain configs share CE_CONFIG, and the tiles' switch takes both.
    print(f"best forward: {best_fwd[1]} ({best_fwd[0] * 1e3:.1f} us); best backward: {best_bwd[1]} "
          f"({best_bwd[0] * 1e3:.1f} us); only a tile forward with a plain backward can be paired")


if __name__ == "__main__":
    main()

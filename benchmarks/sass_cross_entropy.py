"""`python -m benchmarks.sass_cross_entropy`: the sm_90 machine code of the cross-entropy
kernels' class loop, per config: the bytes of the global loads that issue before the first
exponential needs one (what a thread has in flight at once), its instructions per logit,
registers (which set how many programs share an SM) and bytes in flight an SM.

Needs no GPU (benchmarks/sass.py). Configs: the plain kernels at CE_CONFIG with UNROLL 1, 2
and 4, then the pipelined plain configs (PIPELINED) and the class-tile ones (TILE_CONFIGS)
of benchmarks/tune_cross_entropy.py, compiled for the
benchmark's step (19 classes, fp32, mean, no weight or smoothing; 16-divisible sizes). One
tile (BLOCK_C >= 19) has no class loop: its loads in flight are the whole kernel's.
Instructions a logit: the whole kernel's, as one program runs it at 19 classes (loop
bodies times their iterations), over its logits. Bytes in flight an SM = programs an SM
(by registers, threads (at most 64 warps) and shared memory) x threads x bytes in flight
a thread; by Little's law the bandwidth a kernel can draw is at most that over
the memory's latency."""

import argparse
import re

from .sass import compile_sm90, compiler, instructions, loops

FORWARD = dict(z_ptr="*fp32", y_ptr="*i64", w_ptr="*fp32", loss_ptr="*fp32", part_ptr="*fp64", stats_ptr="*fp32",
               dz_ptr="*fp32", wsum_ptr="*fp64", div_ptr="*fp64", C="i32", S="i32", P="i32", nb="i32",
               ignore_index="i64", keep="fp64", spread="fp64")
BACKWARD = dict(g_ptr="*fp32", wsum_ptr="*fp32", z_ptr="*fp32", y_ptr="*i64", w_ptr="*fp32", stats_ptr="*fp32",
                dz_ptr="*fp32", C="i32", S="i32", P="i32", nb="i32", ignore_index="i64", keep="fp64", spread="fp64")
CLASSES = 19
_SMEM_PER_SM = 228 * 1024  # sm_90; each program also takes 1 KB of it for the system


def _load_bytes(op: str, text: str) -> int:
    """Bytes an instruction loads if it is `op` (a regex; .64 or .128 suffixes widen the 4 bytes)."""
    m = re.search(r"\b" + op + r"\S*", text)
    if not m:
        return 0
    return 16 if ".128" in m.group(0) else 8 if ".64" in m.group(0) else 4


def analyse(kernel: str, cfg: dict, num_warps: int) -> dict:
    """Loads in flight, instructions per logit at 19 classes, bytes in flight an SM and resources.
    kernel "fused": the forward that writes the gradient too (FUSED), whose two class loops
    each count as one."""
    from pyvision_ops.kernels import cross_entropy as K

    fused = kernel == "fused"
    fwd = kernel in ("forward", "fused")
    tile = "BLOCK_C" in cfg
    fn = getattr(K, f"_ce{'_tile' if tile else ''}_{'forward' if fwd else kernel}_kernel")
    opts = dict(HAS_W=False, SMOOTH=False, LOOP=False, **cfg)
    if not tile:  # class planes: positions 1 apart
        opts["ZS"] = 1
    opts.update(dict(STORE_LOSS=False, FUSED=fused, MEAN=fused, WSUM_PARTS=fused) if fwd else dict(G_STEP=0, MEAN=True))
    if not fwd:
        opts.pop("GATHER")  # the forward's alone
    sig = FORWARD if fwd else BACKWARD
    ints = [i for i, name in enumerate(sig) if sig[name].startswith("*") or name in ("S", "P")]
    sass, res = compile_sm90(fn, sig, opts, num_warps, divisible=ints)
    code = [t for _, t in instructions(sass)]
    total = len(code)
    threads = 32 * num_warps
    # the class loops: those with loads; the plain kernels' second one takes the C % UNROLL
    # classes left over; a single tile has none (its whole code runs once)
    # (those with exponentials: not the fused forward's loop over the mean's partial sums,
    # which runs once a program)
    class_loops = [b for b in loops(sass) if any("LDG" in t for t in b) and any("MUFU.EX2" in t for t in b)]
    body, *rest = sorted(class_loops, key=lambda b: -sum("LDG" in t for t in b)) or [code]

    def classes(b):  # of an iteration of a plain loop (see below)
        return sum(_load_bytes(r"LDG(STS)?\.E", t) for t in b) // 4 // max(1, cfg["BLOCK"] // threads)

    if fused:  # the forward's loop (the first) for the loads in flight; each loop runs over all classes
        body = class_loops[0] if class_loops else code  # one tile: no class loop
        issued = total + sum((-(-CLASSES // (cfg["BLOCK_C"] if tile else max(1, classes(b)))) - 1) * len(b)
                             for b in class_loops)
    elif tile:
        rows = cfg["BLOCK_C"]
        issued = total if cfg["ONE_TILE"] else total + (-(-CLASSES // rows) - 1) * len(body)
    else:
        # classes an iteration of a plain loop: its plane loads' floats over a thread's
        # positions (the compiler may unroll a loop further than UNROLL and add its own
        # leftover loop; the kernels' own last step masks the classes past C)
        issued, left = total, CLASSES
        for b in sorted([body, *rest], key=classes, reverse=True):
            k = classes(b)
            runs = left // k if k else 0
            issued, left = issued + (runs - 1) * len(b), left - runs * k
        if left and classes(body):  # no loop of its own: one more (masked) step of the class loop
            issued += len(body)
    first_exp = next((i for i, t in enumerate(body) if "MUFU.EX2" in t), len(body))
    # bytes a thread has in flight: its loads (LDG.E is 4 bytes, .64 and .128 wider) before
    # the first exponential waits for one
    in_flight = sum(_load_bytes(r"LDG\.E", t) for t in body[:first_exp])
    # a pipelined loop (STAGES > 1) copies the next STAGES - 1 steps' planes to shared memory
    in_flight += (cfg.get("STAGES", 1) - 1) * sum(_load_bytes(r"LDGSTS\.E", t) for t in body)
    regs, local = (int(re.search(key + r":(\d+)", res).group(1)) for key in ("REG", "LOCAL"))
    m = re.search(r"SMEM:(\d+)", res)
    smem = int(m.group(1)) if m else 0
    programs = min(65536 // (regs * threads), 64 * 32 // threads, _SMEM_PER_SM // (smem + 1024))
    return dict(in_flight=in_flight, per_logit=issued / (CLASSES * cfg["BLOCK"] / threads),
                kb=programs * threads * in_flight / 1024,
                res=f"REG:{regs} LOCAL:{local} SMEM:{smem}")


def configs():
    from pyvision_ops.kernels import cross_entropy as K

    from .tune_cross_entropy import COMPARE, PIPELINED, TILE_CONFIGS

    def target(cfg):  # the target's logit loaded (no mark) or by a compare
        return "" if cfg["GATHER"] else ", compare"

    base = {k: v for k, v in K.CE_CONFIG.items() if k != "PER_SM"}
    for cfg in [{**base, "UNROLL": unroll, "GATHER": True} for unroll in (1, 2, 4)] + PIPELINED + COMPARE:
        cfg = {k: v for k, v in cfg.items() if k != "PER_SM"}
        warps = cfg.pop("num_warps")
        yield (f"plain BLOCK {cfg['BLOCK']}, {warps} warps, UNROLL {cfg['UNROLL']}, STAGES {cfg['STAGES']}"
               + target(cfg), cfg, warps)
    saved, tiles = K.CE_TILE_CONFIG, []
    try:
        for t in TILE_CONFIGS:
            K.CE_TILE_CONFIG = t  # the launcher's own tile for 19 classes
            tiles.append((t["BLOCK_C"], K._tile_config(CLASSES)))
    finally:
        K.CE_TILE_CONFIG = saved
    for block_c, cfg in tiles:
        warps, _ = cfg.pop("num_warps"), cfg.pop("PER_SM")
        yield (f"tile BLOCK_C {block_c}, BLOCK {cfg['BLOCK']}, {warps} warps, STAGES {cfg['STAGES']}" + target(cfg),
               cfg, warps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", metavar="REGEX", help="only the configs whose label this matches (re.search)")
    args = p.parse_args(argv)
    print(compiler())
    print("cells: bytes in flight a thread / instructions a logit / KB in flight an SM / registers, spills, "
          "shared memory")
    print("| config | forward | backward | forward writing the gradient (fused) |\n|---|---|---|---|")
    for label, cfg, warps in configs():
        if args.only and not re.search(args.only, label):
            continue
        cells = []
        for kernel in ("forward", "backward", "fused"):
            a = analyse(kernel, cfg, warps)
            cells.append(f"{a['in_flight']} / {a['per_logit']:.1f} / {a['kb']:.0f} / {a['res']}")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

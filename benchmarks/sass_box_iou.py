"""`python -m benchmarks.sass_box_iou`: instructions per output of the pairwise box IoU
kernels, from their sm_90 machine code, and the time that many instructions take to issue.

Needs no GPU (nor TRITON_INTERPRET): Triton compiles kernels/box_iou.py:_pairwise_kernel for sm_90 as a 4096x4096
fp32 launch specialises it (tile configs of the launcher, whole tiles, 16-divisible sizes
and pointers), and its bundled cuobjdump lists the SASS. The kernel has no loops, so every
listed instruction issues once per warp (predicated-off ones too). A Hopper SM issues at
most one warp instruction per clock on each of its 4 schedulers, so

    issue time = outputs x (warp instructions per output) / (SMs x 4 x clock)

is a floor for the kernel's time however fast memory is. Against it: the time of writing
the output at 70% of copy bandwidth (issue 2's target). Defaults: an H200 (132 SMs, 1.98
GHz boost clock, 4245 GB/s measured copy bandwidth, benchmarks/results/nvidia-h200.md).
"""

import argparse
import os
import tempfile

from .sass import compile_sm90, compiler, count_instructions

KINDS = ("iou", "giou", "diou", "ciou")


_GUARD = "if rows_ok & _approx_range(bx1, by1, bx2, by2):"


def _fast_path_module(tmp: str):
    """kernels/box_iou.py with every tile taking FAST_DIV's approximate path (the guard made
    true), loaded from a copy in `tmp`: the instructions of that path alone."""
    import importlib.util

    from pyvision_ops.kernels import box_iou

    src = open(box_iou.__file__).read()
    assert src.count(_GUARD) == 1, "kernels/box_iou.py: FAST_DIV's guard moved; update _GUARD"
    path = os.path.join(tmp, "box_iou_fast_path.py")
    with open(path, "w") as f:
        f.write(src.replace(_GUARD, "if True:"))
    spec = importlib.util.spec_from_file_location("pyvision_ops.kernels.box_iou_fast_path", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_sass(kind: int, config: dict, module=None) -> tuple[str, str]:
    """The SASS of _pairwise_kernel (of `module`, default kernels/box_iou.py) for box kind
    `kind` under `config`, for sm_90, and its resource line (registers, local memory = spills)."""
    from pyvision_ops.kernels import box_iou

    cfg = dict(config)
    num_warps = cfg.pop("num_warps")
    sig = {name: "*fp32" for name in ("b1_ptr", "b2_ptr", "t1_ptr", "t2_ptr", "out_ptr")}
    sig.update(N="i32", M="i32", eps="fp64")
    # what the launch specialises: 16-byte aligned tensors, N and M divisible by 16
    return compile_sm90((module or box_iou)._pairwise_kernel, sig, dict(KIND=kind, DIV_RN=False, EVEN=True, **cfg),
                        num_warps, divisible=range(7))


def _row(label, kinds, cfg, outputs, args, module=None):
    per_thread = cfg["BLOCK_N"] * cfg["BLOCK_M"] * cfg["M_TILES"] // (32 * cfg["num_warps"])
    cells = []
    for kind in kinds:
        sass, res = compile_sass(kind, cfg, module)
        per_output = count_instructions(sass) / per_thread
        issue_us = outputs * per_output / 32 / (args.sms * 4 * args.ghz * 1e9) * 1e6
        cells.append(f"{per_output:.1f} / {issue_us:.1f} / {res}")
    print(f"| {label} | {per_thread} | " + " | ".join(cells) + " |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096, help="N = M of the launch")
    p.add_argument("--sms", type=int, default=132)
    p.add_argument("--ghz", type=float, default=1.98)
    p.add_argument("--bandwidth", type=float, default=4245.0, help="copy bandwidth, GB/s")
    p.add_argument("--tuner", action="store_true", help="every config of benchmarks/tune_box_iou.py too")
    args = p.parse_args(argv)

    from pyvision_ops.kernels import box_iou as K

    outputs = args.size * args.size
    target_us = outputs * 4 / (0.7 * args.bandwidth * 1e9) * 1e6
    print(compiler())
    print(f"{args.size}x{args.size} fp32: 70% of {args.bandwidth:.0f} GB/s writes the output in {target_us:.1f} us; "
          "cells: instructions an output / issue time us / registers and spills (LOCAL)")
    print("| config | outputs a thread | " + " | ".join(KINDS) + " |\n|---|---|" + "---|" * len(KINDS))
    _row("launcher: PAIRWISE_IOU_CONFIG", (0,), K.PAIRWISE_IOU_CONFIG, outputs, args)
    _row("launcher: PAIRWISE_CONFIG", range(1, 4), K.PAIRWISE_CONFIG, outputs, args)
    if args.tuner:
        from .tune_box_iou import CONFIGS

        with tempfile.TemporaryDirectory() as tmp:
            fast = _fast_path_module(tmp)
            for cfg in CONFIGS:
                # a FAST_DIV kernel holds both division paths, one per tile: its approximate one
                _row(", ".join(f"{k} {v}" for k, v in cfg.items()) + (" (approximate path)" if cfg["FAST_DIV"] else ""),
                     range(4), cfg, outputs, args, fast if cfg["FAST_DIV"] else None)


if __name__ == "__main__":
    main()

"""`python -m benchmarks.tune_box_iou [--precise]`: tile sizes of the Triton pairwise kernel on this GPU.

Prints, per config (with --precise also with IEEE fp32 division), the CUDA-graph time of a
4096x4096 IoU and CIoU and the bandwidth of the output write; kernels/box_iou.py:PAIRWISE_CONFIG
takes the best.
"""

import sys

import triton.testing
from pyvision_ops.kernels import box_iou as K

from pyvision_ops.testing import random_boxes

CONFIGS = [
    {"BLOCK_N": n, "BLOCK_M": m, "num_warps": w}
    for n, m, w in [(32, 64, 4), (16, 128, 4), (64, 64, 4), (16, 64, 4), (32, 32, 4), (64, 64, 8), (32, 128, 4),
                    (64, 128, 8)]
]


def main():
    n = 4096
    a = random_boxes(n, 1, scale=1000.0, max_size=200.0).cuda()
    b = random_boxes(n, 1, scale=1000.0, max_size=200.0).cuda()
    out_bytes = n * n * 4
    modes = (False, True) if "--precise" in sys.argv else (False,)
    for precise, cfg in [(p, c) for p in modes for c in CONFIGS]:
        K.PAIRWISE_CONFIG = cfg
        K.PRECISE_DIV = precise
        cells = [f"div_rn={precise!s:5}"]
        for kind in (0, 3):
            ms = triton.testing.do_bench_cudagraph(lambda k=kind: K.pairwise_box_iou(a, b, k, 1e-7), rep=50)
            cells.append(f"kind {kind}: {ms * 1e3:6.1f} us {out_bytes / ms / 1e6:6.0f} GB/s")
        print(cfg, " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()

"""`python -m benchmarks.tune_box_iou [--precise]`: tile sizes of the Triton pairwise kernel on this GPU.

Prints the bandwidth of torch's fill_ of an output of the same size (the ceiling of a kernel
that only writes), then per config (with --precise also with IEEE fp32 division) the
CUDA-graph time of a 4096x4096 IoU and CIoU (all four kinds with FAST_DIV) and the bandwidth of the output write;
kernels/box_iou.py:PAIRWISE_IOU_CONFIG (IoU) and PAIRWISE_CONFIG (the other kinds) take the best.
"""

import sys

import torch
import triton.testing
from pyvision_ops.kernels import box_iou as K

from pyvision_ops.testing import random_boxes

_PLAIN = [(32, 64, 1, 4, False), (16, 128, 1, 4, False), (64, 64, 1, 4, False), (32, 32, 1, 4, False),
          (64, 64, 1, 8, False), (32, 128, 1, 4, False), (32, 64, 1, 4, True), (64, 64, 1, 4, True),
          (32, 128, 1, 4, True), (32, 64, 2, 4, False), (32, 64, 4, 4, False), (64, 64, 4, 8, False),
          (32, 64, 4, 4, True), (64, 64, 2, 4, False), (32, 64, 2, 8, False), (16, 64, 4, 4, False),
          (32, 64, 2, 4, True)]
# approximate divisions (benchmarks/sass_box_iou.py --tuner, Triton 3.8: CIoU 70.8 -> 59.8 instructions
# an output at 2 column tiles, 67.0 -> 56.0 at 4)
_FAST = [(32, 64, 2, 4, False), (32, 64, 4, 4, False), (64, 64, 1, 4, False)]
CONFIGS = [{"BLOCK_N": n, "BLOCK_M": m, "M_TILES": t, "num_warps": w, "STREAM": st, "FAST_DIV": fast}
           for fast, configs in ((False, _PLAIN), (True, _FAST)) for n, m, t, w, st in configs]


def main():
    n = 4096
    g = torch.Generator().manual_seed(0)  # the benchmark's boxes (bench_box_iou._pairwise), as the launcher's [1, n, 4]
    a = random_boxes(n, scale=1000.0, max_size=200.0, generator=g)[None].cuda()
    b = random_boxes(n, scale=1000.0, max_size=200.0, generator=g)[None].cuda()
    out_bytes = n * n * 4
    # The ceiling of a kernel that only writes: torch filling an output of the same size.
    fill = torch.empty(n, n, device="cuda")
    ms = triton.testing.do_bench_cudagraph(lambda: fill.fill_(0.5), rep=50)
    print(f"fill_ of the {out_bytes >> 20} MB output: {ms * 1e3:6.1f} us {out_bytes / ms / 1e6:6.0f} GB/s")
    modes = (False, True) if "--precise" in sys.argv else (False,)
    for precise, cfg in [(p, c) for p in modes for c in CONFIGS]:
        K.PAIRWISE_CONFIG = K.PAIRWISE_IOU_CONFIG = cfg
        K.PRECISE_DIV = precise
        cells = [f"div_rn={precise!s:5}"]
        for kind in range(4) if cfg["FAST_DIV"] else (0, 3):  # GIoU/DIoU of the default: the bench's graph rows
            ms = triton.testing.do_bench_cudagraph(lambda k=kind: K.pairwise_box_iou(a, b, k, 1e-7), rep=50)
            cells.append(f"kind {kind}: {ms * 1e3:6.1f} us {out_bytes / ms / 1e6:6.0f} GB/s")
        print(cfg, " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()

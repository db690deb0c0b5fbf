"""The Soft-NMS CUDA kernels on CPU threads under ThreadSanitizer: with a thread per CUDA
thread and __syncthreads / __syncwarp / shuffles as barriers (cuda_sim.h), two threads that
touch the same memory (shared or global) without a barrier between them are a data race
that ThreadSanitizer reports, as compute-sanitizer's racecheck would on the GPU.

    LD_PRELOAD=$(c++ -print-file-name=libtsan.so) PVO_SIM_TSAN=1 \\
        python tests/cuda_sim/tsan_check.py N:DTYPE:METHOD:KERNEL:ARCH:SCORE_THRESHOLD ...

DTYPE f32 or f64, KERNEL as cuda_sim.soft_nms's, ARCH 0 or 900. Each case runs on
clustered boxes with special ones and is compared with the CPU op; prints a line a case.
Run by tests/test_nms.py (TSAN_OPTIONS=halt_on_error=1: a report ends the process)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cuda_sim  # noqa: E402
import pyvision_ops  # noqa: E402, F401  (registers the CPU op)
from pyvision_ops.testing import clustered_boxes  # noqa: E402


def boxes_and_scores(n, dtype, seed):
    """Boxes around n // 16 objects (a detector's raw output), a NaN, an empty and an
    inverted box, and a NaN score."""
    g = torch.Generator().manual_seed(seed)
    boxes = clustered_boxes(n, objects=max(1, n // 16), generator=g)
    scores = torch.rand(n, generator=g)
    boxes[1] = torch.tensor([float("nan"), 1.0, 5.0, 9.0])
    boxes[2] = torch.tensor([30.0, 30.0, 30.0, 30.0])
    boxes[3] = torch.tensor([50.0, 50.0, 40.0, 45.0])
    scores[4] = float("nan")
    return boxes.to(dtype), scores.to(dtype)


def main(cases):
    for case in cases:
        n, dt, method, kernel, arch, score_threshold = case.split(":")
        boxes, scores = boxes_and_scores(int(n), torch.float64 if dt == "f64" else torch.float32, int(n))
        args = (boxes, scores, None, 0.3, 0.5, float(score_threshold))
        keep, _ = cuda_sim.soft_nms(*args, method, kernel, int(arch))
        want, _ = torch.ops.pyvision_ops.soft_nms(*args, cuda_sim.METHODS[method])
        print(f"{case}: kept {len(keep)}, the CPU op {len(want)}, same {torch.equal(keep, want)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

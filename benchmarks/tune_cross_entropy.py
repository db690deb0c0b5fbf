"""`python -m benchmarks.tune_cross_entropy`: block size and warps of the plain Triton
cross-entropy kernels on this GPU.

Prints, per config, the CUDA-graph time of the benchmark's training step (forward and
backward, mean, ignore_index 255 on (2, 19, 512, 1024) fp32 logits) and its fraction of
the issue's bound: reading the logits twice and writing the gradient once at the measured
copy bandwidth (>= 77% is within 1.3x). kernels/cross_entropy.py:CE_CONFIG takes the best.
"""

import triton.testing
from pyvision_ops.kernels import cross_entropy as K

from .bench_cross_entropy import WORKLOADS
from .common import cuda_copy_bandwidth

CONFIGS = [{"BLOCK": b, "num_warps": w} for b, w in [(512, 4), (256, 4), (1024, 4), (256, 2), (512, 8), (1024, 8)]]


def main():
    workload = next(w for w in WORKLOADS if w.name.endswith("(graph)"))
    _, step = workload.make("cuda")
    bound = workload.bytes_moved() / cuda_copy_bandwidth()
    print(f"bound (3 passes at copy bandwidth): {bound * 1e6:.1f} us")
    for cfg in CONFIGS:
        K.CE_CONFIG = cfg
        ms = triton.testing.do_bench_cudagraph(step, rep=50, return_mode="median")
        print(f"{cfg}: {ms * 1e3:6.1f} us, {100 * bound / (ms / 1e3):5.1f}% of the bound", flush=True)


if __name__ == "__main__":
    main()

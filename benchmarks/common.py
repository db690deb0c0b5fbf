"""Benchmark harness: workloads, timers and the measured copy bandwidth.

A workload builds its inputs once per device and returns two closures (the
anchor: torchvision / torch / a reference; and ours) that run on the same inputs.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable

import torch


@dataclasses.dataclass
class Workload:
    family: str  # the op family (bench_<family>.py)
    name: str  # what is timed, e.g. "box_iou 2000x2000 fp32"
    anchor: str  # what ours is compared with
    make: Callable[[str], tuple[Callable, Callable]]  # device -> (anchor_fn, ours_fn)
    devices: tuple[str, ...] = ("cpu", "cuda")
    bytes_moved: Callable[[], int] | None = None  # fewest bytes ours must move (GPU bandwidth rows)
    quick: bool = True  # part of --quick
    graph: bool = False  # on CUDA, time CUDA-graph replays: the kernels without Python launch overhead


def fwd_bwd(x: torch.Tensor, loss_fn: Callable) -> Callable:
    """A closure running loss_fn forward and backward on a fresh leaf copy of x (a non-scalar
    output is summed first); it returns the gradient."""

    def run():
        xr = x.detach().requires_grad_()
        out = loss_fn(xr)
        (out if out.dim() == 0 else out.sum()).backward()
        return xr.grad

    return run


def time_cpu(fn: Callable, min_run_time: float) -> float:
    """Median seconds per call (torch.utils.benchmark, warm-up excluded)."""
    from torch.utils import benchmark

    fn()  # warm-up
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return m.blocked_autorange(min_run_time=min_run_time).median


def time_cuda(fn: Callable, quick: bool, graph: bool = False) -> float:
    """Median seconds per call with CUDA events (triton.testing.do_bench), or of CUDA-graph replays."""
    import triton.testing

    if graph:
        fn()  # compile/warm up outside the capture
        ms = triton.testing.do_bench_cudagraph(fn, rep=40 if quick else 100, return_mode="median")
    else:
        ms = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100, return_mode="median")
    return ms / 1e3


def time_pair(anchor: Callable, ours: Callable, device: str, quick: bool, graph: bool = False) -> tuple[float, float]:
    """Times anchor and ours alternately, twice each, and keeps each one's best median."""
    rounds = []
    for _ in range(2):
        if device == "cuda":
            rounds.append((time_cuda(anchor, quick, graph), time_cuda(ours, quick, graph)))
        else:
            t = 0.2 if quick else 0.6
            rounds.append((time_cpu(anchor, t), time_cpu(ours, t)))
    return min(r[0] for r in rounds), min(r[1] for r in rounds)


def cuda_copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), 1 GiB buffers."""
    src = torch.empty(256 * 1024 * 1024, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    sec = time_cuda(lambda: dst.copy_(src), quick=False)
    return 2 * src.numel() * 4 / sec


def peak_cuda_memory(fn: Callable) -> int:
    """Peak bytes allocated during one call, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def median(xs):
    return statistics.median(xs)

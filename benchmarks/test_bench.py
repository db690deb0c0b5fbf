"""`pytest benchmarks --benchmark-only`: the run.py workloads through pytest-benchmark."""

import pytest
import torch

from benchmarks.run import workloads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [w for w in workloads(None) if DEVICE in w.devices]


def _sync(fn):
    if DEVICE != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("impl", ["anchor", "ours"])
@pytest.mark.parametrize("workload", CASES, ids=[w.name for w in CASES])
def test_workload(benchmark, workload, impl):
    benchmark.group = workload.name
    anchor, ours = workload.make(DEVICE)
    benchmark(_sync(anchor if impl == "anchor" else ours))


def test_profile_cuda_reads_the_profiler_here():
    # benchmarks.profile_cuda runs on a GPU; its event reading runs here on the CPU (no kernels).
    from benchmarks.profile_cuda import _profile

    host, gpu, rows = _profile(lambda: torch.ones(64).cumsum(0), cuda=False)
    assert host > 0 and gpu == 0 and rows == []

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

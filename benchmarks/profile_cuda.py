"""`python -m benchmarks.profile_cuda [--only nms,losses] [--top 6]`: where each CUDA
workload's time goes, ours and the anchor.

Runs every CUDA workload of benchmarks.run (graph rows excepted: they replay the same
calls) a few times under torch.profiler and prints, per workload and side, the host time
per call, the GPU time per call (kernels, copies and memsets), and the kernels that take
most of it (time per call, launches per call). The timed rows in benchmarks.run say how
fast; this says which kernel to look at, and whether a call is bound by its host time
(host > GPU) or by its kernels.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from .run import workloads

CALLS = 5


def _profile(fn, cuda=True):
    """(host us per call, GPU us per call, [(kernel, us per call, launches per call)])."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()  # the host time outside the profiler, which slows every op down
    for _ in range(CALLS):
        fn()
    host = (time.perf_counter() - t0) / CALLS
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(CALLS):
            fn()
        sync()
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us, n = kernels.get(e.name, (0.0, 0))
            kernels[e.name] = (us + e.time_range.elapsed_us(), n + 1)
    rows = sorted(((name, us / CALLS, n / CALLS) for name, (us, n) in kernels.items()), key=lambda r: -r[1])
    return host * 1e6, sum(r[1] for r in rows), rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="comma-separated families")
    p.add_argument("--top", type=int, default=6, help="kernels listed per workload and side")
    args = p.parse_args(argv)
    for w in workloads(args.only.split(",") if args.only else None):
        if "cuda" not in w.devices or w.graph:
            continue
        try:
            anchor, ours = w.make("cuda")
            sides = [("ours", ours), (w.anchor, anchor)]
            print(f"\n### {w.name}\n\n| side | kernel | GPU us / call | launches / call |\n|---|---|---|---|")
            for side, fn in sides:
                host, gpu, rows = _profile(fn)
                print(f"| {side} | (host {host:.0f} us, GPU {gpu:.0f} us per call) | | |")
                for name, us, n in rows[:args.top]:
                    print(f"| {side} | {name[:90]} | {us:.1f} | {n:g} |")
        except Exception as e:  # one broken workload must not hide the others
            print(f"| failed | {type(e).__name__}: {str(e)[:200]} | | |")
        torch.cuda.empty_cache()
        print(flush=True)


if __name__ == "__main__":
    main()

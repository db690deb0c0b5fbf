"""`python -m benchmarks.soft_nms_scaling [--device cuda|cpu] [--sizes 1000,5000]`: Soft-NMS
time per selection as N grows, on the benchmark's clustered detections, for each CUDA
kernel variant.

The sequential CUDA kernel (PYVISION_OPS_SOFT_NMS_KERNEL=spread or chunks) runs one block
per category and one block-wide max per selection; a thread holds K boxes in registers (K
from N: 1, 4, 8, 16, then global memory), 32-box chunks in spatial order per warp and slot,
and walks its slots one after another. With spread a box's neighbouring chunks sit in
different warps; with chunks in one warp. Rounds (PYVISION_OPS_SOFT_NMS_KERNEL=rounds)
selects all local maxima at once, a round at a time (csrc/cuda/nms.cu). Per N this prints
our nms (the same sort and compaction around a cheaper kernel), soft_nms gaussian with each
variant, the selections it makes and the time per selection of each: a per-selection time
that stays flat as K grows says a selection costs a fixed latency (the block-wide max); one
that grows with K, or drops with spread, says the slot walk dominates. Multi, the default,
may make several selections per block-wide step (spread's registers, or global memory
beyond); lead is multi with a step's selections replayed by one warp instead of all.
"same" says whether each variant kept the chunks kernel's boxes with scores equal to fp32
rounding. On CUDA the last columns split multi's and lead's calls (torch.profiler): the
Soft-NMS kernel's GPU time and the GPU time of the rest (sorts, gathers, copies); what the
timed call takes beyond both is host time the GPU waited for. On the CPU all variants run
the same C++ kernel.
"""

import argparse

import torch

import pyvision_ops as P

from .bench_nms import _detections, soft_nms_kernel
from .common import time_cpu, time_cuda
from .profile_cuda import _profile

SIZES = (1000, 2000, 4000, 5000, 8000, 12000)
VARIANTS = ("chunks", "spread", "multi", "lead", "rounds")
SPLIT = ("multi", "lead")  # the variants whose GPU time is split


def fp32_slots(n):
    """Register slots per thread of the CUDA kernel for one fp32 group of n boxes (0: global
    memory); csrc/cuda/nms.cu:soft_slots and soft_threads."""
    for k, threads in ((1, 1024), (4, 1024), (8, 768), (16, 512)):
        if n <= k * threads:
            return k
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--sizes", help=f"comma-separated N (default: {','.join(map(str, SIZES))})")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else SIZES

    def timed(fn):
        return time_cuda(fn, quick=True) if args.device == "cuda" else time_cpu(fn, 0.2)

    split = SPLIT if args.device == "cuda" else ()
    columns = 5 + 2 * len(VARIANTS) + len(split)
    print("| N | K | nms ms | " + " | ".join(f"{v} ms" for v in VARIANTS) + " | selections | "
          + " | ".join(f"{v} us / selection" for v in VARIANTS) + " | same |"
          + "".join(f" {v} kernel / other GPU ms |" for v in split) + "\n|" + "---|" * columns)
    for n in sizes:
        boxes, scores, _ = _detections(n)
        b, s = boxes.to(args.device), scores.to(args.device)
        hard = timed(lambda b=b, s=s: P.nms(b, s, 0.5))
        soft, out = {}, {}
        for v in VARIANTS:
            with soft_nms_kernel(v):
                out[v] = P.soft_nms(b, s)
                soft[v] = timed(lambda b=b, s=s: P.soft_nms(b, s))
        selections = out["chunks"][0].numel()
        same = all(_same(out["chunks"], out[v]) for v in VARIANTS)
        per = [soft[v] / max(selections, 1) * 1e6 for v in VARIANTS]
        gpu = []
        for v in split:
            with soft_nms_kernel(v):
                _, total, rows = _profile(lambda b=b, s=s: P.soft_nms(b, s))
            kernel = sum(us for name, us, _ in rows if "soft_" in name)
            gpu.append(f" {kernel / 1e3:.3f} / {(total - kernel) / 1e3:.3f} |")
        print(f"| {n} | {fp32_slots(n) or 'global'} | {hard * 1e3:.3f} | "
              + " | ".join(f"{soft[v] * 1e3:.3f}" for v in VARIANTS) + f" | {selections} | "
              + " | ".join(f"{x:.2f}" for x in per) + f" | {'yes' if same else 'NO'} |" + "".join(gpu), flush=True)


def _same(a, b):
    """The same boxes kept with the same scores to fp32 rounding (the variants may multiply
    a box's decay factors in another order)."""
    if sorted(a[0].tolist()) != sorted(b[0].tolist()):
        return False
    score = dict(zip(b[0].tolist(), b[1].tolist()))
    other = torch.tensor([score[k] for k in a[0].tolist()], dtype=torch.float64)
    return torch.allclose(other, a[1].double().cpu(), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    main()

"""`compute-sanitizer --tool racecheck --error-exitcode 1 python -m benchmarks.sanitize`:
each CUDA C++ kernel (csrc/cuda) once on small inputs, for a memory checker to watch.

The tests compare these kernels with the CPU ones; a shared-memory race or an
out-of-bounds read can still give right answers on the inputs they use. So
benchmarks/gpu_check.sh (GPU_CHECK_SANITIZE=1) runs this under compute-sanitizer's
memcheck, racecheck and synccheck. Soft-NMS runs every layout of its sequential and
multi-selection kernels: 1, 4, 8 and 16 register slots a thread and global memory (fp32
groups of 300, 1100, 5000, 6500 and 8500 boxes; fp64 of 300 and 4200), a batched call with
groups of unequal size, and the linear and hard methods. Sizes are small because the
checkers slow kernels down a hundredfold. Prints a line per case; `--device cpu` runs the
same calls on the CPU kernels (a check of this script).
"""

import argparse
import time

import torch

import pyvision_ops as P

from .bench_nms import _detections, soft_nms_kernel

SOFT_CASES = [  # (boxes, dtype, method)
    (300, torch.float32, "gaussian"), (1100, torch.float32, "gaussian"), (5000, torch.float32, "gaussian"),
    (6500, torch.float32, "gaussian"), (8500, torch.float32, "gaussian"), (300, torch.float64, "gaussian"),
    (4200, torch.float64, "gaussian"), (1100, torch.float32, "linear"), (1100, torch.float32, "hard"),
]


def _cases(dev):
    """(name, call) of every case on device `dev`."""
    out = []
    b, s, _ = _detections(3000)
    b, s = b.to(dev), s.to(dev)
    out.append(("nms 3000", lambda: P.nms(b, s, 0.5)))
    out.append(("nms 100 (small kernel)", lambda: P.nms(b[:100], s[:100], 0.5)))
    bb, sb, ib = (t.to(dev) for t in _detections(3000, categories=20))
    out.append(("batched_nms 3000, 20 categories", lambda: P.batched_nms(bb, sb, ib, 0.5)))
    # groups of 100, 1100 and 40 boxes in one launch
    idx = torch.cat([torch.full((k,), i) for i, k in enumerate((100, 1100, 40))]).to(dev)
    bg, sg = bb[:1240], sb[:1240]
    for variant in ("multi", "spread"):  # multi first: a run cut short still checks it
        for n, dtype, method in SOFT_CASES:
            bs, ss = (t.to(dev, dtype) for t in _detections(n)[:2])

            def soft(bs=bs, ss=ss, method=method, variant=variant):
                with soft_nms_kernel(variant):
                    return P.soft_nms(bs, ss, method=method)

            out.append((f"soft_nms {variant} {n} {str(dtype)[6:]} {method}", soft))

        def batched(variant=variant):
            with soft_nms_kernel(variant):
                return P.batched_soft_nms(bg, sg, idx)

        out.append((f"batched_soft_nms {variant} 100+1100+40", batched))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 32, 32, generator=g).to(dev)
    xy = torch.rand(64, 2, generator=g) * 24
    rois = torch.cat([torch.randint(0, 2, (64, 1), generator=g).float(), xy, xy + 1 + torch.rand(64, 2, generator=g)
                      * 8], 1).to(dev)

    def roi_fwd_bwd(deterministic):
        def run():
            before = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(deterministic)
            try:
                xr = x.detach().requires_grad_()
                P.roi_align(xr, rois, 7, 0.5, 2, True).sum().backward()
                return xr.grad
            finally:
                torch.use_deterministic_algorithms(before)
        return run

    out.append(("roi_align fwd+bwd", roi_fwd_bwd(False)))
    out.append(("roi_align fwd+bwd, deterministic", roi_fwd_bwd(True)))
    feats = [torch.randn(2, 8, 32 >> i, 32 >> i, generator=g).to(dev).requires_grad_() for i in range(3)]

    def multi_scale():
        P.multi_scale_roi_align(feats, rois, 7, [1.0, 0.5, 0.25], 2, True).sum().backward()

    out.append(("multi_scale_roi_align fwd+bwd, 3 levels", multi_scale))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    dev = p.parse_args(argv).device
    for name, fn in _cases(dev):
        t0 = time.perf_counter()
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        print(f"{name}: {time.perf_counter() - t0:.2f} s", flush=True)


if __name__ == "__main__":
    main()

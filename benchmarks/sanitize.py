"""`compute-sanitizer --tool racecheck --error-exitcode 1 python -m benchmarks.sanitize`:
each CUDA C++ kernel (csrc/cuda) once on small inputs, for a memory checker to watch.

The tests compare these kernels with the CPU ones; a shared-memory race or an
out-of-bounds read can still give right answers on the inputs they use. So
benchmarks/gpu_check.sh (GPU_CHECK_SANITIZE=1) runs this under compute-sanitizer's
memcheck, racecheck and synccheck. Soft-NMS runs every layout of its sequential and
multi-selection kernels: 1, 4, 8 and 16 register slots a thread and global memory (fp32
groups of 300, 1100, 5000, 6500 and 8500 boxes; fp64 of 300 and 4200), a batched call with
groups of unequal size, the linear and hard methods, and the multi kernel with hard at IoU
threshold 0 and with score threshold 0, and the multi kernel with one warp's replay (lead).
Sizes are small because the checkers slow kernels down a hundredfold. `--triton` runs the
Triton kernels instead, for memcheck: every op forward and backward on sizes that leave
partial blocks, with configs besides the defaults too (64-row IoU tiles, approximate
divisions; the cross-entropy plain loop, one class tile, pipelined loops and the target's
logit loaded). Prints a line per case; `--device cpu` runs the same calls on the CPU (a
check of this script).
"""

import argparse
import contextlib
import importlib
import time

import torch
import torch.nn.functional as F

import pyvision_ops as P

from .bench_cross_entropy import two_passes
from .bench_nms import _detections, soft_nms_kernel
from .common import fwd_bwd

SOFT_CASES = [  # (boxes, dtype, method)
    (300, torch.float32, "gaussian"), (1100, torch.float32, "gaussian"), (5000, torch.float32, "gaussian"),
    (6500, torch.float32, "gaussian"), (8500, torch.float32, "gaussian"), (300, torch.float64, "gaussian"),
    (4200, torch.float64, "gaussian"), (1100, torch.float32, "linear"), (1100, torch.float32, "hard"),
]
# The multi kernel's own paths: no overlap skipping (hard at IoU threshold 0) and one
# selection a step (score threshold 0).
MULTI_CASES = [(1100, "hard", dict(iou_threshold=0.0)), (1100, "gaussian", dict(score_threshold=0.0))]
# The multi kernel with one warp's replay (PYVISION_OPS_SOFT_NMS_KERNEL=lead): its second
# barrier and the selections it hands over in shared memory.
LEAD_CASES = [(1100, torch.float32, "gaussian"), (5000, torch.float32, "gaussian"), (300, torch.float64, "hard")]


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
    # lead, the default, first: a run cut short (racecheck's) still checks it
    for n, dtype, method in LEAD_CASES:
        bs, ss = (t.to(dev, dtype) for t in _detections(n)[:2])

        def soft(bs=bs, ss=ss, method=method):
            with soft_nms_kernel("lead"):
                return P.soft_nms(bs, ss, method=method)

        out.append((f"soft_nms lead {n} {str(dtype)[6:]} {method}", soft))
    for variant in ("multi", "spread"):  # multi next
        for n, dtype, method in SOFT_CASES:
            bs, ss = (t.to(dev, dtype) for t in _detections(n)[:2])

            def soft(bs=bs, ss=ss, method=method, variant=variant):
                with soft_nms_kernel(variant):
                    return P.soft_nms(bs, ss, method=method)

            out.append((f"soft_nms {variant} {n} {str(dtype)[6:]} {method}", soft))
        for n, method, kw in MULTI_CASES if variant == "multi" else ():
            bs, ss = (t.to(dev) for t in _detections(n)[:2])

            def soft(bs=bs, ss=ss, method=method, kw=kw):
                with soft_nms_kernel("multi"):
                    return P.soft_nms(bs, ss, method=method, **kw)

            out.append((f"soft_nms multi {n} {method} {kw}", soft))

        def batched(variant=variant):
            with soft_nms_kernel(variant):
                return P.batched_soft_nms(bg, sg, idx)

        out.append((f"batched_soft_nms {variant} 100+1100+40", batched))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 32, 32, generator=g).to(dev)
    xy = torch.rand(64, 2, generator=g) * 24
    rois = torch.cat([torch.randint(0, 2, (64, 1), generator=g).float(), xy, xy + 1 + torch.rand(64, 2, generator=g)
                      * 8], 1).to(dev)

    roi_step = fwd_bwd(x, lambda t: P.roi_align(t, rois, 7, 0.5, 2, True))

    def deterministic_roi_step():  # the gather backward instead of atomics
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            return roi_step()
        finally:
            torch.use_deterministic_algorithms(before)

    out.append(("roi_align fwd+bwd", roi_step))
    out.append(("roi_align fwd+bwd, deterministic", deterministic_roi_step))
    feats = [torch.randn(2, 8, 32 >> i, 32 >> i, generator=g).to(dev).requires_grad_() for i in range(3)]

    def multi_scale():
        P.multi_scale_roi_align(feats, rois, 7, [1.0, 0.5, 0.25], 2, True).sum().backward()

    out.append(("multi_scale_roi_align fwd+bwd, 3 levels", multi_scale))
    return out


@contextlib.contextmanager
def _config(name, **values):
    """kernels/<module>.py's config dict `name` ("box_iou.PAIRWISE_IOU_CONFIG") updated, then restored."""
    module, attr = name.split(".")
    cfg = getattr(importlib.import_module(f"pyvision_ops.kernels.{module}"), attr)
    before = dict(cfg)
    cfg.update(values)
    try:
        yield
    finally:
        cfg.clear()
        cfg.update(before)


def _triton_cases(dev):
    """(name, call) of the Triton ops (CUDA) or the same calls (CPU), on odd sizes."""
    g = torch.Generator().manual_seed(0)

    def boxes(*shape):
        xy = torch.rand(*shape, 2, generator=g) * 50
        return torch.cat([xy, xy + torch.rand(*shape, 2, generator=g) * 20], -1).to(dev)

    a, b = boxes(2, 37), boxes(2, 70)
    out = []
    for fn in (P.box_iou, P.generalized_box_iou, P.distance_box_iou, P.complete_box_iou):
        out.append((fn.__name__, lambda fn=fn: fn(a, b)))

    def iou_64():
        with _config("box_iou.PAIRWISE_IOU_CONFIG", BLOCK_N=64), _config("box_iou.PAIRWISE_CONFIG", BLOCK_N=64):
            return [fn(a, b) for fn in (P.box_iou, P.complete_box_iou)]

    out.append(("box_iou, complete_box_iou with 64-row tiles", iou_64))

    def iou_fast():
        with _config("box_iou.PAIRWISE_IOU_CONFIG", FAST_DIV=True), _config("box_iou.PAIRWISE_CONFIG", FAST_DIV=True):
            return [fn(a, b) for fn in (P.box_iou, P.generalized_box_iou, P.distance_box_iou, P.complete_box_iou)]

    out.append(("the four pairwise kinds with approximate divisions", iou_fast))
    p, q = boxes(53), boxes(53)
    for fn in (P.generalized_box_iou_loss, P.distance_box_iou_loss, P.complete_box_iou_loss):
        out.append((f"{fn.__name__} fwd+bwd", fwd_bwd(p, lambda x, fn=fn: fn(x, q))))
    z = torch.randn(2, 19, 13, 9, generator=g).to(dev)
    y = torch.randint(0, 19, (2, 13, 9), generator=g)
    y[0, 0] = 255
    y = y.to(dev)
    w = torch.rand(19, generator=g).to(dev)
    out.append(("softmax_cross_entropy fwd+bwd, weight, smoothing",
                fwd_bwd(z, lambda x: P.softmax_cross_entropy(x, y, w, ignore_index=255, label_smoothing=0.1))))

    def ce_variant(tile=None, plain=None):  # the default: class tiles of 4, the target's logit by a compare
        with _config("cross_entropy.CE_TILE_CONFIG", **(tile or {})), _config("cross_entropy.CE_CONFIG",
                                                                               **(plain or {})):
            return fwd_bwd(z, lambda x: P.softmax_cross_entropy(x, y, ignore_index=255))()

    out.append(("softmax_cross_entropy fwd+bwd, plain class loop", lambda: ce_variant(dict(MAX_C=0))))
    out.append(("softmax_cross_entropy fwd+bwd, one class tile", lambda: ce_variant(dict(BLOCK_C=32))))
    out.append(("softmax_cross_entropy fwd+bwd, pipelined class loop",
                lambda: ce_variant(dict(MAX_C=0), dict(STAGES=3))))
    out.append(("softmax_cross_entropy fwd+bwd, pipelined class tiles of 4", lambda: ce_variant(dict(STAGES=3))))
    out.append(("softmax_cross_entropy fwd+bwd, plain class loop, target loaded",
                lambda: ce_variant(dict(MAX_C=0), dict(GATHER=True))))
    out.append(("softmax_cross_entropy fwd+bwd, class tiles of 4, target loaded",
                lambda: ce_variant(dict(GATHER=True))))
    out.append(("softmax_cross_entropy fwd+bwd, weight, smoothing, two passes",
                two_passes(fwd_bwd(z, lambda x: P.softmax_cross_entropy(x, y, w, ignore_index=255,
                                                                       label_smoothing=0.1)))))
    out.append(("softmax_cross_entropy fwd+bwd, sum scaled by 0.5 (the gradient scaled in place)",
                fwd_bwd(z, lambda x: 0.5 * P.softmax_cross_entropy(x, y, ignore_index=255, reduction="sum"))))
    rows, ry = torch.randn(37, 1003, generator=g).to(dev), torch.randint(0, 1003, (37,), generator=g).to(dev)
    out.append(("softmax_cross_entropy fwd+bwd [37, 1003], none",
                fwd_bwd(rows, lambda x: P.softmax_cross_entropy(x, ry, reduction="none"))))
    low = torch.randn(2, 5, 7, 11, generator=g).to(dev)
    lab = torch.randint(0, 5, (2, 29, 45), generator=g).to(dev)
    out.append(("upsample_cross_entropy fwd+bwd", fwd_bwd(low, lambda x: P.upsample_cross_entropy(x, lab))))
    out.append(("interpolate_bilinear fwd+bwd", fwd_bwd(low, lambda x: P.interpolate_bilinear(x, size=(29, 45)))))
    out.append(("interpolate_bilinear fwd+bwd, channels_last, align_corners",
                fwd_bwd(low.to(memory_format=torch.channels_last),
                         lambda x: P.interpolate_bilinear(x, scale_factor=2.5, align_corners=True))))
    f, t = torch.randn(1001, generator=g).to(dev), torch.rand(1001, generator=g).round().to(dev)
    out.append(("sigmoid_focal_loss fwd+bwd", fwd_bwd(f, lambda x: P.sigmoid_focal_loss(x, t))))
    out.append(("dice_loss fwd+bwd", fwd_bwd(z, lambda x: P.dice_loss(x, y, ignore_index=255))))
    prob = F.softmax(z, 1)
    out.append(("lovasz_softmax fwd+bwd", fwd_bwd(prob, lambda x: P.lovasz_softmax(x, y, ignore_index=255))))
    out.append(("lovasz_softmax fwd+bwd, per image",
                fwd_bwd(prob, lambda x: P.lovasz_softmax(x, y, per_image=True, ignore_index=255))))
    hy = torch.randint(0, 2, (2, 13, 9), generator=g).to(dev)
    out.append(("lovasz_hinge fwd+bwd", fwd_bwd(z[:, 0], lambda x: P.lovasz_hinge(x, hy))))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--triton", action="store_true", help="the Triton kernels instead of the CUDA C++ ones")
    args = p.parse_args(argv)
    dev = args.device
    for name, fn in (_triton_cases if args.triton else _cases)(dev):
        t0 = time.perf_counter()
        fn()
        if dev == "cuda":
            torch.cuda.synchronize()
        print(f"{name}: {time.perf_counter() - t0:.2f} s", flush=True)


if __name__ == "__main__":
    main()

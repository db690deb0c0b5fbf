"""`python -m benchmarks.overhead [--device cpu|cuda]`: host time per call on tiny inputs,
ours against the anchor.

On a GPU a call costs at least its host time (Python front, dispatcher, autograd, kernel
launch) however small the kernel, so this is the floor of the eager timings there. On
the CPU it runs with one thread, where the kernels on a few elements cost next to
nothing (the harness's CPU timer, common.time_pair). On CUDA it reads the host clock
around a loop of calls without synchronising (the GPU work is queued, not waited for),
and adds a breakdown of one cross-entropy step: a bare Triton launch, the forward and
backward ops called directly, the training step's forward and backward ops (the gradient
written in the forward, then scaled), the front without autograd.

`--launchers` (any machine, no GPU needed) times the Python work of the Triton launchers
(kernels/*.py) on tiny CPU tensors with every Triton kernel replaced by a no-op: their
argument checks, allocations and grid arithmetic, the part of a GPU call's host time
that is ours rather than Triton's launch (approximately: CPU allocations stand in for
the CUDA caching allocator's).
"""

import argparse
import contextlib
import time

import torch
import torch.nn.functional as F
import torchvision.ops as tv

import pyvision_ops as P
from pyvision_ops._library import ops

from .common import fwd_bwd, time_cpu, time_pair


def _cases(dev):
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(1, 19, 1, 8, generator=g).to(dev), torch.randint(0, 19, (1, 1, 8), generator=g).to(dev)
    f, t = torch.randn(8, generator=g).to(dev), torch.rand(8, generator=g).round().to(dev)
    b = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], device=dev)
    s = torch.tensor([0.9, 0.8, 0.7], device=dev)
    feat, rois = torch.randn(1, 2, 8, 8, generator=g).to(dev), torch.tensor([[0.0, 1, 1, 6, 6]], device=dev)
    return [
        ("cross_entropy fwd+bwd", fwd_bwd(z, lambda a: F.cross_entropy(a, y)),
         fwd_bwd(z, lambda a: P.softmax_cross_entropy(a, y))),
        ("sigmoid_focal_loss fwd+bwd", fwd_bwd(f, lambda a: tv.sigmoid_focal_loss(a, t, reduction="mean")),
         fwd_bwd(f, lambda a: P.sigmoid_focal_loss(a, t, reduction="mean"))),
        ("generalized_box_iou_loss fwd+bwd",
         fwd_bwd(b, lambda a: tv.generalized_box_iou_loss(a, b + 1, reduction="mean")),
         fwd_bwd(b, lambda a: P.generalized_box_iou_loss(a, b + 1, reduction="mean"))),
        ("box_iou", lambda: tv.box_iou(b, b), lambda: P.box_iou(b, b)),
        ("nms", lambda: tv.nms(b, s, 0.5), lambda: P.nms(b, s, 0.5)),
        ("roi_align fwd", lambda: tv.roi_align(feat, rois, 2), lambda: P.roi_align(feat, rois, 2)),
    ]


def _cuda_breakdown():
    """(name, call) of the pieces of one cross-entropy step on CUDA."""
    from pyvision_ops.kernels.cross_entropy import _ce_reduce_kernel

    z = torch.randn(1, 19, 8, device="cuda")
    y = torch.randint(0, 19, (1, 8), device="cuda")
    parts, loss, wsum = torch.rand(2, 1, device="cuda", dtype=torch.float64), z.new_empty(()), z.new_empty(())
    _, w, stats = ops.softmax_cross_entropy(z, y, None, -100, 0.0, 1)
    one = torch.ones((), device="cuda")
    return [
        ("torch.empty on CUDA", lambda: torch.empty((), device="cuda")),
        ("bare Triton launch (1 program)", lambda: _ce_reduce_kernel[(1,)](parts, 1, loss, wsum, parts,
                                                                           REDUCTION=1, BLOCK=1024,
                                                                           GIVEN=False)),
        ("ops.softmax_cross_entropy", lambda: ops.softmax_cross_entropy(z, y, None, -100, 0.0, 1)),
        ("ops.softmax_cross_entropy_backward",
         lambda: ops.softmax_cross_entropy_backward(one, z, y, None, stats, w, -100, 0.0, 1)),
        ("ops.softmax_cross_entropy_with_grad (the training step's forward)",
         lambda: ops.softmax_cross_entropy_with_grad(z, y, None, -100, 0.0, 1)),
        ("ops.scale_grad_ (its backward, scale 1)", lambda: ops.scale_grad_(z, one)),
        ("P.softmax_cross_entropy, no grad", lambda: P.softmax_cross_entropy(z[..., None], y[..., None])),
    ]


@contextlib.contextmanager
def _stubbed_kernels(modules):
    """Every @triton.jit kernel of `modules` replaced by one whose launch does nothing."""
    from triton.runtime.jit import JITFunction

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    saved = [(m, name, k) for m in modules for name, k in vars(m).items() if isinstance(k, JITFunction)]
    try:
        for m, name, _ in saved:
            setattr(m, name, _NoLaunch())
        yield
    finally:
        for m, name, k in saved:
            setattr(m, name, k)


def _launcher_cases():
    from pyvision_ops.kernels import box_iou, cross_entropy, interpolate, losses

    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(1, 19, 8, generator=g), torch.randint(0, 19, (1, 8), generator=g)
    rows, ry = torch.randn(8, 80, 1, generator=g), torch.randint(0, 80, (8, 1), generator=g)
    b = torch.tensor([[[0.0, 0, 10, 10], [1, 1, 11, 11]]])
    f, t = torch.randn(8, generator=g), torch.rand(8, generator=g)
    img = torch.randn(1, 2, 4, 4, generator=g)
    one = torch.ones(())
    _, w, stats = ops.softmax_cross_entropy(z, y, None, -100, 0.0, 1)
    _, rw, rstats = ops.softmax_cross_entropy(rows, ry, None, -100, 0.0, 1)
    cases = [
        ("softmax_cross_entropy [1, 19, 8]", lambda: cross_entropy.softmax_cross_entropy(z, y, None, -100, 0.0, 1)),
        ("softmax_cross_entropy_backward [1, 19, 8]",
         lambda: cross_entropy.softmax_cross_entropy_backward(one, z, y, None, stats, w, -100, 0.0, 1)),
        ("softmax_cross_entropy_with_grad [1, 19, 8]",
         lambda: cross_entropy.softmax_cross_entropy_with_grad(z, y, None, -100, 0.0, 1)),
        ("scale_grad_ [1, 19, 8]", lambda: cross_entropy.scale_grad_(z, one)),
        ("softmax_cross_entropy [8, 80]", lambda: cross_entropy.softmax_cross_entropy(rows, ry, None, -100, 0.0, 1)),
        ("softmax_cross_entropy_backward [8, 80]",
         lambda: cross_entropy.softmax_cross_entropy_backward(one, rows, ry, None, rstats, rw, -100, 0.0, 1)),
        ("pairwise_box_iou", lambda: box_iou.pairwise_box_iou(b, b, 0, 1e-7)),
        ("matched_box_iou (loss)", lambda: box_iou.matched_box_iou(b[0], b[0], 1, True, 1e-7)),
        ("matched_box_iou_backward (loss)",
         lambda: box_iou.matched_box_iou_backward(torch.ones(2), b[0], b[0], 1, True, 1e-7)),
        ("sigmoid_focal_loss", lambda: losses.sigmoid_focal_loss(f, t, 0.25, 2.0)),
        ("sigmoid_focal_loss_backward", lambda: losses.sigmoid_focal_loss_backward(torch.ones(8), f, t, 0.25, 2.0)),
        ("upsample_bilinear 4x4 -> 8x8", lambda: interpolate.upsample_bilinear(img, 8, 8, False, -1.0, -1.0)),
    ]
    return (box_iou, cross_entropy, interpolate, losses), cases


def _host_time(fn, calls=300, rounds=3):
    """Best of `rounds` host seconds per call over `calls` calls, none synchronised."""
    best = float("inf")
    for _ in range(rounds):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
        torch.cuda.synchronize()
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--launchers", action="store_true", help="only the Triton launchers' own host time")
    args = p.parse_args(argv)
    dev = args.device
    if args.launchers:
        torch.set_num_threads(1)
        modules, cases = _launcher_cases()
        print("| Triton launcher, kernels stubbed | host us |\n|---|---|")
        with _stubbed_kernels(modules):
            for name, fn in cases:
                print(f"| {name} | {min(time_cpu(fn, 0.3) for _ in range(3)) * 1e6:.1f} |", flush=True)
        return
    print("| call | anchor us | ours us | ours / anchor |\n|---|---|---|---|")
    if dev == "cpu":
        torch.set_num_threads(1)
    for name, anchor, ours in _cases(dev):
        if dev == "cpu":
            a, o = time_pair(anchor, ours, "cpu", quick=False)
        else:
            a, o = _host_time(anchor), _host_time(ours)
        print(f"| {name} | {a * 1e6:.1f} | {o * 1e6:.1f} | {o / a:.2f} |", flush=True)
    if dev == "cuda":
        print("\n| cross-entropy piece (ours) | host us |\n|---|---|")
        for name, fn in _cuda_breakdown():
            print(f"| {name} | {_host_time(fn) * 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()

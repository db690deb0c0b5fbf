"""`python -m benchmarks.overhead`: host time per call on tiny inputs, ours against the anchor.

On a GPU a call costs at least its host time (Python front, dispatcher, autograd, kernel
launch) however small the kernel, so this is the floor of the eager timings there. Runs on
the CPU with one thread and inputs of a few elements, so the kernels themselves cost
next to nothing; prints microseconds per call (median of 5 rounds).
"""

import statistics
import time

import torch
import torch.nn.functional as F
import torchvision.ops as tv

import pyvision_ops as P


def _step(loss_fn, x, *args, **kwargs):
    """Forward and backward on a fresh leaf copy of x."""

    def run():
        xr = x.detach().requires_grad_()
        loss_fn(xr, *args, **kwargs).backward()

    return run


def _cases():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(1, 19, 1, 8, generator=g), torch.randint(0, 19, (1, 1, 8), generator=g)
    f, t = torch.randn(8, generator=g), torch.rand(8, generator=g).round()
    b = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    s = torch.tensor([0.9, 0.8, 0.7])
    feat, rois = torch.randn(1, 2, 8, 8, generator=g), torch.tensor([[0.0, 1, 1, 6, 6]])
    return [
        ("cross_entropy fwd+bwd", _step(F.cross_entropy, z, y), _step(P.softmax_cross_entropy, z, y)),
        ("sigmoid_focal_loss fwd+bwd", _step(tv.sigmoid_focal_loss, f, t, reduction="mean"),
         _step(P.sigmoid_focal_loss, f, t, reduction="mean")),
        ("generalized_box_iou_loss fwd+bwd", _step(tv.generalized_box_iou_loss, b, b + 1, reduction="mean"),
         _step(P.generalized_box_iou_loss, b, b + 1, reduction="mean")),
        ("box_iou", lambda: tv.box_iou(b, b), lambda: P.box_iou(b, b)),
        ("nms", lambda: tv.nms(b, s, 0.5), lambda: P.nms(b, s, 0.5)),
        ("roi_align fwd", lambda: tv.roi_align(feat, rois, 2), lambda: P.roi_align(feat, rois, 2)),
    ]


def _per_call(fn, n=2000):
    for _ in range(200):
        fn()
    rounds = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t) / n)
    return statistics.median(rounds)


def main():
    torch.set_num_threads(1)
    print("| call | anchor us | ours us | ours / anchor |\n|---|---|---|---|")
    for name, anchor, ours in _cases():
        a, o = _per_call(anchor), _per_call(ours)
        print(f"| {name} | {a * 1e6:.1f} | {o * 1e6:.1f} | {o / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()

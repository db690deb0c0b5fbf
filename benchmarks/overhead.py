"""`python -m benchmarks.overhead`: host time per call on tiny inputs, ours against the anchor.

On a GPU a call costs at least its host time (Python front, dispatcher, autograd, kernel
launch) however small the kernel, so this is the floor of the eager timings there. Runs on
the CPU with one thread and inputs of a few elements, so the kernels themselves cost
next to nothing; prints microseconds per call (the harness's CPU timer, common.time_pair).
"""

import torch
import torch.nn.functional as F
import torchvision.ops as tv

import pyvision_ops as P

from .common import fwd_bwd, time_pair


def _cases():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(1, 19, 1, 8, generator=g), torch.randint(0, 19, (1, 1, 8), generator=g)
    f, t = torch.randn(8, generator=g), torch.rand(8, generator=g).round()
    b = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]])
    s = torch.tensor([0.9, 0.8, 0.7])
    feat, rois = torch.randn(1, 2, 8, 8, generator=g), torch.tensor([[0.0, 1, 1, 6, 6]])
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


def main():
    torch.set_num_threads(1)
    print("| call | anchor us | ours us | ours / anchor |\n|---|---|---|---|")
    for name, anchor, ours in _cases():
        a, o = time_pair(anchor, ours, "cpu", quick=False)
        print(f"| {name} | {a * 1e6:.1f} | {o * 1e6:.1f} | {o / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Loss workloads: sigmoid focal loss vs torchvision (1M logits, and a detection head's logits
viewed as [N, locations, classes]); Dice vs the unfused torch
composition (softmax, gather, index_add) and Lovasz-softmax vs the usual
per-class loop, both on (2, 19, 128, 256) with 10% ignored pixels."""

import torch
import torchvision.ops as tv

import pyvision_ops as P

from .common import Workload, fwd_bwd


def _focal(n, gamma=2.0):
    def make(device):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(n, generator=g) * 3).to(device)
        t = (torch.rand(n, generator=g) > 0.9).float().to(device)
        return (fwd_bwd(x, lambda a: tv.sigmoid_focal_loss(a, t, 0.25, gamma, "mean")),
                fwd_bwd(x, lambda a: P.sigmoid_focal_loss(a, t, 0.25, gamma, "mean")))

    return make


def _focal_head(n, k, h, w):
    """A detection head's class logits [n, k, h, w] viewed as [n, h * w, k] (no copy), targets
    made like that view (zeros_like), as in RetinaNet/FCOS-style losses."""
    def make(device):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(n, k, h, w, generator=g) * 3).to(device)
        t = torch.zeros_like(x.flatten(2).transpose(1, 2))
        t.copy_(torch.rand(n, h * w, k, generator=g) > 0.99)
        return (fwd_bwd(x, lambda a: tv.sigmoid_focal_loss(a.flatten(2).transpose(1, 2), t, 0.25, 2.0, "sum")),
                fwd_bwd(x, lambda a: P.sigmoid_focal_loss(a.flatten(2).transpose(1, 2), t, 0.25, 2.0, "sum")))

    return make


def _dice_torch(x, y, ignore_index=255, smooth=1.0):
    """The lean torch way: the target's probability gathered, intersections and target
    counts by index_add (no one-hot of the logits' size)."""
    c = x.shape[1]
    valid = y != ignore_index
    yc = torch.where(valid, y, 0)
    p = torch.softmax(x, 1) * valid.unsqueeze(1)
    inter = torch.zeros(c, dtype=p.dtype, device=x.device).index_add(0, yc.flatten(),
                                                                    p.gather(1, yc.unsqueeze(1)).flatten())
    # counts by index_add too: bincount and boolean indexing sync with the host on CUDA
    card = p.sum((0, 2, 3)) + torch.zeros(c, dtype=p.dtype, device=x.device).index_add(
        0, yc.flatten(), valid.flatten().to(p.dtype))
    return (1 - (2 * inter + smooth) / (card + smooth)).mean()


def _dice(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 19, 128, 256, generator=g).to(device)
    y = torch.randint(0, 19, (2, 128, 256), generator=g)
    y[torch.rand(2, 128, 256, generator=g) < 0.1] = 255
    y = y.to(device)
    return fwd_bwd(x, lambda a: _dice_torch(a, y)), fwd_bwd(x, lambda a: P.dice_loss(a, y, ignore_index=255))


def _lovasz_per_class(probas, labels, ignore_index=255):
    """The usual implementation: a Python loop over classes, one sort each (float32)."""
    c = probas.shape[1]
    p = probas.movedim(1, -1).reshape(-1, c)
    y = labels.reshape(-1)
    keep = y != ignore_index
    p, y = p[keep], y[keep]
    losses = []
    for k in range(c):
        fg = (y == k).float()
        if fg.sum() == 0:
            continue
        errors, perm = torch.sort((fg - p[:, k]).abs(), descending=True)
        gt = fg[perm]
        gts = gt.sum()
        jac = 1 - (gts - gt.cumsum(0)) / (gts + (1 - gt).cumsum(0))
        jac[1:] = jac[1:] - jac[:-1].clone()
        losses.append(torch.dot(errors, jac))
    return torch.stack(losses).mean()


def _lovasz(n, h, w):
    def make(device):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 19, h, w, generator=g).softmax(1).to(device)
        y = torch.randint(0, 19, (n, h, w), generator=g)
        y[torch.rand(n, h, w, generator=g) < 0.1] = 255
        y = y.to(device)
        return (fwd_bwd(x, lambda a: _lovasz_per_class(a, y)),
                fwd_bwd(x, lambda a: P.lovasz_softmax(a, y, ignore_index=255)))

    return make


WORKLOADS = [
    Workload("losses", "sigmoid_focal_loss fwd+bwd 1M", "torchvision", _focal(1_000_000)),
    Workload("losses", "sigmoid_focal_loss fwd+bwd 1M, gamma 1.5", "torchvision", _focal(1_000_000, 1.5),
             quick=False),
    Workload("losses", "sigmoid_focal_loss fwd+bwd, head logits (8, 80, 32, 64) as [8, 2048, 80]", "torchvision",
             _focal_head(8, 80, 32, 64)),
    Workload("losses", "dice_loss fwd+bwd (2, 19, 128, 256)", "torch composition", _dice),
    Workload("losses", "lovasz_softmax fwd+bwd (2, 19, 128, 256)", "per-class loop", _lovasz(2, 128, 256)),
    Workload("losses", "lovasz_softmax fwd+bwd (8, 19, 512, 1024)", "per-class loop", _lovasz(8, 512, 1024),
             devices=("cuda",)),
]

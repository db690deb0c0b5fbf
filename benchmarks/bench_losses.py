"""Loss workloads vs torchvision: sigmoid focal loss forward+backward on 1M logits."""

import torch
import torchvision.ops as tv

import pyvision_ops as P

from .common import Workload


def _focal(n):
    def make(device):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(n, generator=g) * 3).to(device)
        t = (torch.rand(n, generator=g) > 0.9).float().to(device)

        def run(f):
            xr = x.detach().requires_grad_()
            f(xr, t, 0.25, 2.0, "mean").backward()
            return xr.grad

        return (lambda: run(tv.sigmoid_focal_loss)), (lambda: run(P.sigmoid_focal_loss))

    return make


WORKLOADS = [
    Workload("losses", "sigmoid_focal_loss fwd+bwd 1M", "torchvision", _focal(1_000_000)),
]

"""Cross-entropy vs F.cross_entropy on (2, 19, 512, 1024) logits, ignore_index 255, forward+backward."""

import torch
import torch.nn.functional as F

import pyvision_ops as P

from .common import Workload


def _ce(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 19, 512, 1024, generator=g).to(device)
    y = torch.randint(0, 19, (2, 512, 1024), generator=g)
    y[torch.rand(2, 512, 1024, generator=g) < 0.1] = 255
    y = y.to(device)

    def run(f):
        xr = x.detach().requires_grad_()
        f(xr, y, ignore_index=255).backward()
        return xr.grad

    return (lambda: run(F.cross_entropy)), (lambda: run(P.softmax_cross_entropy))


WORKLOADS = [Workload("cross_entropy", "cross_entropy fwd+bwd (2,19,512,1024)", "F.cross_entropy", _ce,
                      devices=("cpu",))]

"""Bilinear interpolation vs F.interpolate: x8, (2, 19, 64, 128) -> (512, 1024), forward+backward."""

import torch
import torch.nn.functional as F

import pyvision_ops as P

from .common import Workload, fwd_bwd


def _x8(device):
    x = torch.randn(2, 19, 64, 128, generator=torch.Generator().manual_seed(0)).to(device)
    return (fwd_bwd(x, lambda t: F.interpolate(t, size=(512, 1024), mode="bilinear")),
            fwd_bwd(x, lambda t: P.interpolate_bilinear(t, size=(512, 1024))))


WORKLOADS = [Workload("interpolate", "bilinear x8 fwd+bwd (2,19,64,128)->(512,1024)", "F.interpolate", _x8)]

"""Cross-entropy vs F.cross_entropy on (2, 19, 512, 1024) logits (contiguous and
channels_last) and on [4096, 1000] (classification, label smoothing 0.1), and upsample +
cross-entropy from (2, 19, 64, 128) logits to (512, 1024) labels (on CUDA also Cityscapes
size, (8, 19, 128, 256) to (1024, 2048)) vs interpolate then cross_entropy; ignore_index 255
for the dense ones, forward+backward."""

import torch
import torch.nn.functional as F

import pyvision_ops as P
from pyvision_ops import cross_entropy as CE

from .common import Workload, fwd_bwd


def _ce(device, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 19, 512, 1024, generator=g).to(device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 19, (2, 512, 1024), generator=g)
    y[torch.rand(2, 512, 1024, generator=g) < 0.1] = 255
    y = y.to(device)
    return (fwd_bwd(x, lambda t: F.cross_entropy(t, y, ignore_index=255)),
            fwd_bwd(x, lambda t: P.softmax_cross_entropy(t, y, ignore_index=255)))


def two_passes(fn):
    """fn with CUDA's training step in two ops, the forward op then the backward op (without
    the gradient written in the forward, as under torch.compile)."""

    def run():
        saved, CE.FUSED_GRAD_DEVICES = CE.FUSED_GRAD_DEVICES, ()
        try:
            return fn()
        finally:
            CE.FUSED_GRAD_DEVICES = saved

    return run


def _ce_two_passes(device):
    anchor, ours = _ce(device)
    return anchor, two_passes(ours)


def _ce_channels_last(device):
    # a channels_last network's logits: classes innermost (the row op on positions)
    return _ce(device, torch.channels_last)


def _ce_rows(device):
    # classification: [N, C] logits, one row of classes per sample
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4096, 1000, generator=g).to(device)
    y = torch.randint(0, 1000, (4096,), generator=g).to(device)
    return (fwd_bwd(x, lambda t: F.cross_entropy(t, y, label_smoothing=0.1)),
            fwd_bwd(x, lambda t: P.softmax_cross_entropy(t, y, label_smoothing=0.1)))


def _upsample_ce(n, h, w, factor=8):
    def make(device):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(n, 19, h, w, generator=g).to(device)
        size = (h * factor, w * factor)
        y = torch.randint(0, 19, (n, *size), generator=g)
        y[torch.rand(n, *size, generator=g) < 0.1] = 255
        y = y.to(device)

        def unfused(t):
            return F.cross_entropy(F.interpolate(t, size=size, mode="bilinear"), y, ignore_index=255)

        return fwd_bwd(x, unfused), fwd_bwd(x, lambda t: P.upsample_cross_entropy(t, y, ignore_index=255))

    return make


WORKLOADS = [
    # bytes: the logits read twice (forward, backward) and their gradient written once
    Workload("cross_entropy", "cross_entropy fwd+bwd (2,19,512,1024)", "F.cross_entropy", _ce,
             bytes_moved=lambda: 3 * 2 * 19 * 512 * 1024 * 4),
    # The same step replayed from a CUDA graph: kernel time without Python launch overhead.
    Workload("cross_entropy", "cross_entropy fwd+bwd (2,19,512,1024) (graph)", "F.cross_entropy", _ce,
             devices=("cuda",), graph=True, bytes_moved=lambda: 3 * 2 * 19 * 512 * 1024 * 4),
    Workload("cross_entropy", "cross_entropy fwd+bwd (2,19,512,1024), two passes (graph)", "F.cross_entropy",
             _ce_two_passes, devices=("cuda",), graph=True, bytes_moved=lambda: 3 * 2 * 19 * 512 * 1024 * 4),
    Workload("cross_entropy", "cross_entropy fwd+bwd (2,19,512,1024) channels_last", "F.cross_entropy",
             _ce_channels_last, bytes_moved=lambda: 3 * 2 * 19 * 512 * 1024 * 4),
    Workload("cross_entropy", "cross_entropy fwd+bwd (2,19,512,1024) channels_last (graph)", "F.cross_entropy",
             _ce_channels_last, devices=("cuda",), graph=True, bytes_moved=lambda: 3 * 2 * 19 * 512 * 1024 * 4),
    Workload("cross_entropy", "cross_entropy fwd+bwd [4096, 1000], label smoothing 0.1", "F.cross_entropy",
             _ce_rows),
    # No bandwidth figure: its 16 MB of logits stay in L2 across the graph's back-to-back replays.
    Workload("cross_entropy", "cross_entropy fwd+bwd [4096, 1000], label smoothing 0.1 (graph)", "F.cross_entropy",
             _ce_rows, devices=("cuda",), graph=True),
    Workload("cross_entropy", "upsample+CE fwd+bwd (2,19,64,128)->(512,1024)", "interpolate + cross_entropy",
             _upsample_ce(2, 64, 128)),
    Workload("cross_entropy", "upsample+CE fwd+bwd (8,19,128,256)->(1024,2048)", "interpolate + cross_entropy",
             _upsample_ce(8, 128, 256), devices=("cuda",)),
]

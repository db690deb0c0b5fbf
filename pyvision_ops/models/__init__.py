"""The reference model zoo: small models trained on synthetic data with the package's ops.

``python -m pyvision_ops.models train segmenter`` trains one and reports its metric on
held-out images; ``evaluate`` reloads a saved one. See ``train`` below for the loop.
"""

from __future__ import annotations

import time

import torch

from .data import IGNORE_INDEX, Batch, SyntheticShapes
from .detector import Detector
from .segmenter import Segmenter
from .two_stage import TwoStageDetector

MODELS = {"segmenter": Segmenter, "detector": Detector, "two_stage": TwoStageDetector}

__all__ = ["IGNORE_INDEX", "MODELS", "Batch", "Detector", "Segmenter", "SyntheticShapes", "TwoStageDetector", "train"]


def train(model: torch.nn.Module, data: SyntheticShapes, steps: int, batch_size: int = 8, lr: float = 3e-3,
          device="cpu", log=None) -> list[float]:
    """AdamW with a cosine schedule for ``steps`` steps on fresh batches of ``data``; returns the
    loss of each step. ``log(step, loss, seconds)``, when given, is called every 25 steps and
    at the last."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    losses, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        loss = model.loss(data.batch(batch_size).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())  # no host sync per step; read back when logged and at the end
        if log and (step % 25 == 0 or step == steps):
            log(step, losses[-1].item(), time.perf_counter() - t0)
    return torch.stack(losses).tolist() if losses else []

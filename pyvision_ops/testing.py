"""Synthetic inputs shared by the tests, the benchmarks and the model zoo.

Random, clustered (detector-like) and edge-case boxes.
"""

import torch


def random_boxes(n, *batch, scale=100.0, max_size=50.0, dtype=torch.float32, generator=None, device="cpu"):
    xy = torch.rand(*batch, n, 2, generator=generator, dtype=torch.float64) * scale
    wh = torch.rand(*batch, n, 2, generator=generator, dtype=torch.float64) * max_size + 0.5
    return torch.cat([xy, xy + wh], -1).to(device=device, dtype=dtype)


def clustered_boxes(n, objects=20, jitter=4.0, dtype=torch.float32, generator=None, device="cpu"):
    """n boxes scattered around `objects` ground-truth boxes, like a detector's raw output."""
    centres = random_boxes(objects, scale=400.0, max_size=120.0, dtype=torch.float64, generator=generator)
    pick = torch.randint(0, objects, (n,), generator=generator)
    noise = torch.randn(n, 4, generator=generator, dtype=torch.float64) * jitter
    b = centres[pick] + noise
    b = torch.cat([torch.minimum(b[:, :2], b[:, 2:]), torch.maximum(b[:, :2], b[:, 2:])], 1)
    return b.to(device=device, dtype=dtype)


def edge_boxes(dtype=torch.float32):
    """Zero-area, inverted, touching, identical, nested, far-apart and huge boxes."""
    rows = [
        [0, 0, 10, 10],
        [0, 0, 10, 10],  # identical
        [10, 0, 20, 10],  # touching along an edge
        [2, 2, 5, 5],  # nested
        [5, 5, 5, 5],  # a point
        [0, 3, 10, 3],  # zero height
        [4, 0, 4, 10],  # zero width
        [10, 10, 0, 0],  # inverted
        [-5, -5, -1, -1],  # negative coordinates
        [1000, 1000, 1001, 1001],  # far away
        [0, 0, 1e6, 1e6],  # huge
        [3.5, 1.25, 7.75, 9.5],
    ]
    return torch.tensor(rows, dtype=torch.float64).to(dtype)

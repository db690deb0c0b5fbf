"""Synthetic shapes: images, semantic masks and boxes that need no download.

Each image has a noisy gray background and 1..max_objects filled shapes; an object's
class fixes its color (jittered) and its shape (rectangle or ellipse), so a small
network learns the task in a few hundred steps on a CPU. An object's box overlaps each
other box by less than 30% of the smaller one's area, so every object stays mostly
visible.
"""

from __future__ import annotations

import dataclasses

import torch

IGNORE_INDEX = 255  # mask value on a one-pixel band along each object's outline

# Per class: base RGB color and shape.
_COLORS = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.3], [0.25, 0.35, 0.95], [0.9, 0.8, 0.2], [0.8, 0.3, 0.85],
                        [0.2, 0.8, 0.85]])
_ELLIPSE = (False, True, False, True, True, False)


@dataclasses.dataclass
class Batch:
    images: torch.Tensor  # [N, 3, S, S] float32 in about [0, 1]
    masks: torch.Tensor  # [N, S, S] int64: 0 background, 1 + class, IGNORE_INDEX on outlines
    boxes: list[torch.Tensor]  # per image [k, 4] float32 (x1, y1, x2, y2), in pixels
    labels: list[torch.Tensor]  # per image [k] int64 classes in [0, num_classes)

    def to(self, device) -> Batch:
        return Batch(self.images.to(device), self.masks.to(device), [b.to(device) for b in self.boxes],
                     [lb.to(device) for lb in self.labels])


class SyntheticShapes:
    """An endless seeded stream of batches; two instances with one seed give the same batches."""

    def __init__(self, num_classes: int = 3, size: int = 64, max_objects: int = 3, seed: int = 0):
        if not 1 <= num_classes <= len(_COLORS):
            raise ValueError(f"num_classes must be in [1, {len(_COLORS)}], got {num_classes}")
        if size < 16:
            raise ValueError(f"size must be at least 16, got {size}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be at least 1, got {max_objects}")
        self.num_classes, self.size, self.max_objects = num_classes, size, max_objects
        self.generator = torch.Generator().manual_seed(seed)

    def _rand(self, *shape) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator)

    def _boxes(self) -> torch.Tensor:
        s = self.size
        count = 1 + int(torch.randint(self.max_objects, (), generator=self.generator))
        boxes = torch.empty((0, 4))
        for _ in range(8 * count):  # rejection sampling; gives up on a crowded image
            if len(boxes) == count:
                break
            wh = (s / 8 + self._rand(2) * (s / 2.5 - s / 8)).round()
            xy = (self._rand(2) * (s - wh)).round()
            box = torch.cat([xy, xy + wh])[None]
            if len(boxes) == 0 or _overlap(box, boxes).max() < 0.3:
                boxes = torch.cat([boxes, box])
        return boxes

    def batch(self, n: int) -> Batch:
        s, g = self.size, self.generator
        centers = torch.arange(s, dtype=torch.float32) + 0.5
        cy, cx = centers[:, None], centers[None, :]
        images = (0.3 + 0.4 * self._rand(n, 1, 1, 1)).expand(n, 3, s, s) + 0.08 * torch.randn((n, 3, s, s), generator=g)
        masks = torch.zeros((n, s, s), dtype=torch.int64)
        all_boxes, all_labels = [], []
        for i in range(n):
            boxes = self._boxes()
            labels = torch.randint(self.num_classes, (len(boxes),), generator=g)
            for (x1, y1, x2, y2), c in zip(boxes.tolist(), labels.tolist()):
                if _ELLIPSE[c]:
                    inside = (((cx - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2
                              + ((cy - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2) <= 1
                else:
                    inside = (cx >= x1) & (cx < x2) & (cy >= y1) & (cy < y2)
                color = (_COLORS[c] + 0.15 * (self._rand(3) - 0.5)).clamp(0, 1)
                images[i] = torch.where(inside, color[:, None, None] + 0.08 * torch.randn((3, s, s), generator=g),
                                        images[i])
                masks[i][inside] = c + 1
            all_boxes.append(boxes)
            all_labels.append(labels)
        return Batch(images.contiguous(), _ignore_outlines(masks), all_boxes, all_labels)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over the smaller area, ``[len(a), len(b)]``; plain torch, so that the data
    does not depend on the ops under test."""
    lt, rb = torch.maximum(a[:, None, :2], b[None, :, :2]), torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).prod(-1)
    return inter / torch.minimum(area(a)[:, None], area(b)[None, :])


def _ignore_outlines(masks: torch.Tensor) -> torch.Tensor:
    """Marks IGNORE_INDEX on a one-pixel band along every label change: the pixel below or
    right of it."""
    edge = torch.zeros_like(masks, dtype=torch.bool)
    edge[:, 1:] |= masks[:, 1:] != masks[:, :-1]
    edge[:, :, 1:] |= masks[:, :, 1:] != masks[:, :, :-1]
    return masks.masked_fill(edge, IGNORE_INDEX)

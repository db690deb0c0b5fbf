"""RoI Align: roi_align / RoIAlign, and multi-scale pooling over FPN levels.

Same sampling rule and results as ``torchvision.ops.roi_align`` (bilinear samples,
``aligned`` half-pixel shift, adaptive ``ceil(roi / bin)`` sampling when
``sampling_ratio <= 0``, the legacy size clamp when ``aligned=False``). Sampling
weights are computed once per RoI (separable row and column tables) and shared by
all channels. NCHW and channels_last inputs (channels_last output for
channels_last input).

Backends:

- CPU (C++): forward in parallel over (RoI, channel), backward over (image,
  channel), so the gradient is always deterministic.
- CUDA (C++): forward one block per (RoI, channel chunk). The backward scatters
  with ``atomicAdd`` into an fp32 (fp64) buffer, which is fast but not bitwise
  reproducible; when ``torch.are_deterministic_algorithms_enabled()`` it instead
  gathers per input cell over the image's RoIs in RoI order (no atomics, same
  values up to float rounding, bitwise reproducible). With 32 or more channels
  both work channels_last: an NCHW gradient is transposed there and back, which
  costs O(input) extra memory and is much faster than NCHW atomics.

A RoI with a NaN or infinite coordinate pools to zeros (and gets no gradient).
An inf or NaN feature value reaches the bins whose samples give its cell a nonzero
weight, and no others; torchvision also multiplies the zero-weight corners of its
samples (on whole pixels, on the border rows and columns: 0 * inf = NaN), so where
it returns NaN this may return the inf or finite value the weights define.
A batch index outside ``[0, N)`` raises ``ValueError`` on the CPU; on CUDA it is
not checked (that would need a device-to-host sync): such a RoI pools to zeros
and gets no gradient, and nothing outside the input is ever read.
RoIs may have any float or integer dtype; they are used in fp32 (fp64 for fp64
input), including for fp16/bf16 inputs, which are pooled with fp32 accumulation
(integer and fp16/bf16 boxes are converted to fp32 directly, never rounded to the
input's dtype, and so is the batch-index column built for a list of boxes). Under
``torch.autocast`` (CUDA or CPU) fp16/bf16 inputs are pooled in fp32 and the
result is returned in the input's dtype, as torchvision does.
"""

import math

import torch
from torch import nn

from . import _utils
from ._library import _acc_dtype, ops


def _pair(size, name="output_size"):
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {size!r}")
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{name} must be positive, got {tuple(size)}")
    return int(size[0]), int(size[1])


def _to_rois(boxes, input):
    """Tensor[K, 5] or a list of Tensor[L, 4] (one per image) -> Tensor[K, 5]."""
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"boxes must be a Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of "
                             f"Tensor[L, 4], got a tensor of shape {list(boxes.shape)}")
        return boxes.to(_roi_dtype(boxes.dtype, input))
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    for i, b in enumerate(boxes):
        _utils.check_tensor(f"boxes[{i}]", b)
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must be a Tensor[L, 4], got shape {list(b.shape)}")
    if len(boxes) > input.shape[0]:
        raise ValueError(f"boxes has {len(boxes)} entries but input has batch size {input.shape[0]}")
    if len(boxes) == 0:
        return input.new_zeros((0, 5), dtype=_roi_dtype(input.dtype, input))
    dtype = boxes[0].dtype
    for b in boxes[1:]:
        dtype = torch.promote_types(dtype, b.dtype)
    dtype = _roi_dtype(dtype, input)
    ids = torch.cat([torch.full_like(b[:, :1], i, dtype=dtype) for i, b in enumerate(boxes)])
    return torch.cat([ids, torch.cat([b.to(dtype) for b in boxes])], dim=1)


def _roi_dtype(dtype, input):
    # The kernels use RoIs in fp32 (fp64 for fp64 input). fp16/bf16 hold integers exactly only
    # up to 2048/256 (coordinates, and the batch index of a list of boxes), so integer and
    # half-precision boxes go straight to fp32 (fp64 for fp64 input).
    return dtype if dtype in (torch.float32, torch.float64) else _acc_dtype(input.dtype)


def _check_batch_index(rois, batch_size):
    # Reading the indices would sync a GPU (on CUDA an out-of-range RoI pools to zeros), and
    # is data-dependent under torch.compile; there the CPU kernel raises on its own.
    if rois.device.type == "cpu" and rois.numel() > 0 and not torch.compiler.is_compiling():
        idx = rois[:, 0]
        finite = torch.isfinite(idx)
        bad = finite & ((idx < 0) | (idx >= batch_size))
        if bool(bad.any()):
            k = int(torch.nonzero(bad)[0])
            raise ValueError(f"boxes: RoI {k} has batch index {idx[k].item()} outside [0, {batch_size})")


def roi_align(input: torch.Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> torch.Tensor:
    """RoI Align; drop-in for ``torchvision.ops.roi_align``.

    ``input``: ``[N, C, H, W]``; ``boxes``: ``Tensor[K, 5]`` (batch index, x1, y1,
    x2, y2) or a list of ``Tensor[L, 4]``, one per image; returns ``[K, C, PH, PW]``
    in the input's dtype (channels_last for a channels_last input).

    On CUDA the backward uses atomics unless deterministic algorithms are enabled
    (``torch.use_deterministic_algorithms(True)``), and a batch index outside
    ``[0, N)`` pools to zeros instead of raising (see the module docstring).
    """
    _utils.check_tensor("input", input)
    if input.dim() != 4:
        raise ValueError(f"input must be [N, C, H, W], got shape {list(input.shape)}")
    if not input.is_floating_point():
        raise TypeError(f"input must be floating point, got {input.dtype}")
    rois = _to_rois(boxes, input)
    _utils.check_same_device(input=input, boxes=rois)
    ph, pw = _pair(output_size)
    spatial_scale = _utils.check_float("spatial_scale", spatial_scale)
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, int):
        raise TypeError(f"sampling_ratio must be an int, got {type(sampling_ratio).__name__}")
    _check_batch_index(rois, input.shape[0])
    return ops.roi_align(input, rois, spatial_scale, ph, pw, sampling_ratio, bool(aligned))


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`; drop-in for ``torchvision.ops.RoIAlign``."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input, rois):
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def __repr__(self):
        return (f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})")


def fpn_levels(boxes: torch.Tensor, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4,
               eps: float = 1e-6) -> torch.Tensor:
    """FPN eq. 1: the level (0-based from k_min) of each box, as torchvision's LevelMapper.

    The area is computed in fp32 (fp64 for fp64 boxes), as torchvision's ``box_area``
    does: in fp16 it would overflow above 65504.
    """
    boxes = boxes if boxes.dtype == torch.float64 else boxes.float()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    s = torch.sqrt(area)
    lvl = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    return (torch.clamp(lvl, min=k_min, max=k_max) - k_min).to(torch.int64)


def multi_scale_roi_align(features: list, boxes, output_size, spatial_scales: list, sampling_ratio: int = 2,
                          canonical_scale: int = 224, canonical_level: int = 4, aligned: bool = False) -> torch.Tensor:
    """Pools each RoI from its FPN level (``fpn_levels``) of ``features`` (finest first).

    ``spatial_scales[i]`` is the scale of ``features[i]`` (powers of 2). Returns
    ``[K, C, PH, PW]`` in the order of the RoIs. One op call (one kernel launch on
    CUDA) pools every level, forward and backward; the backward is deterministic
    under the same rules as :func:`roi_align`. On CUDA at most 8 levels.
    """
    if not isinstance(features, (list, tuple)) or not features:
        raise ValueError("features must be a non-empty list of [N, C, H, W] tensors")
    for i, f in enumerate(features):
        _utils.check_tensor(f"features[{i}]", f)
        if f.dim() != 4 or f.shape[:2] != features[0].shape[:2]:
            raise ValueError(f"features[{i}] must be [N, C, H, W] with the N and C of features[0], "
                             f"got {list(f.shape)}")
        if f.dtype != features[0].dtype or f.device != features[0].device:
            raise ValueError(f"features[{i}] must have the dtype and device of features[0]")
    if len(spatial_scales) != len(features):
        raise ValueError(f"spatial_scales has {len(spatial_scales)} entries for {len(features)} feature maps")
    if features[0].device.type == "cuda" and len(features) > 8:
        raise ValueError(f"multi_scale_roi_align takes at most 8 feature maps on CUDA, got {len(features)}")
    rois = _to_rois(boxes, features[0])
    _utils.check_same_device(features=features[0], boxes=rois)
    ph, pw = _pair(output_size)
    k_min = -math.log2(spatial_scales[0])
    k_max = -math.log2(spatial_scales[-1])
    if not (float(k_min).is_integer() and float(k_max).is_integer()):
        raise ValueError(f"spatial_scales must be powers of 2, got {spatial_scales}")
    _check_batch_index(rois, features[0].shape[0])
    if len(features) == 1:
        levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    else:
        levels = fpn_levels(rois[:, 1:], int(k_min), int(k_max), canonical_scale, canonical_level)
    return ops.multi_scale_roi_align(list(features), rois, levels, [float(s) for s in spatial_scales], ph, pw,
                                     sampling_ratio, bool(aligned))


def _infer_scale(feature: torch.Tensor, original_size) -> float:
    # Same rule as torchvision: the power of 2 nearest to feature size / image size.
    approx = [float(s1) / float(s2) for s1, s2 in zip(feature.shape[-2:], original_size)]
    scales = [2 ** float(torch.tensor(a).log2().round()) for a in approx]
    if scales[0] != scales[1]:
        raise ValueError(f"feature map {list(feature.shape[-2:])} has different scales in height and width")
    return scales[0]


class MultiScaleRoIAlign(nn.Module):
    """Drop-in for ``torchvision.ops.MultiScaleRoIAlign``: ``forward(x: dict, boxes: list, image_shapes: list)``."""

    def __init__(self, featmap_names: list, output_size, sampling_ratio: int, *, canonical_scale: int = 224,
                 canonical_level: int = 4):
        super().__init__()
        self.featmap_names = list(featmap_names)
        self.output_size = _pair(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, x: dict, boxes: list, image_shapes: list) -> torch.Tensor:
        features = [x[name] for name in self.featmap_names]
        max_h = max(s[0] for s in image_shapes)
        max_w = max(s[1] for s in image_shapes)
        scales = [_infer_scale(f, (max_h, max_w)) for f in features]
        return multi_scale_roi_align(features, boxes, self.output_size, scales, self.sampling_ratio,
                                     self.canonical_scale, self.canonical_level)

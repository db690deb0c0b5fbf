"""RoI Align: roi_align / RoIAlign, and multi-scale pooling over FPN levels.

Same sampling rule and results as ``torchvision.ops.roi_align`` (bilinear samples,
``aligned`` half-pixel shift, adaptive ``ceil(roi / bin)`` sampling when
``sampling_ratio <= 0``, the legacy size clamp when ``aligned=False``), up to the
cap on the adaptive grid described below. Sampling weights are computed once per
RoI (separable row and column tables) and shared by all channels. NCHW and
channels_last inputs (channels_last output for channels_last input, unless it is
also NCHW-contiguous, e.g. one channel; the input's gradient likewise follows the
incoming gradient's layout).

Backends:

- CPU (C++): forward in parallel over (level, image, channel) planes, each pooling
  that image's RoIs (over (RoI, bin) for channels_last input); backward over (image,
  channel), so the gradient is always deterministic.
- CUDA (C++): forward one block per (RoI, channel chunk). The backward scatters
  with ``atomicAdd`` into an fp32 (fp64) buffer, which is fast but not bitwise
  reproducible; when ``torch.are_deterministic_algorithms_enabled()`` it instead
  gathers per input cell over the image's RoIs in RoI order (no atomics, same
  values up to float rounding, bitwise reproducible). With 32 or more channels
  both work channels_last: an NCHW gradient is transposed there and back, which
  costs O(input) extra memory and is much faster than NCHW atomics.

A RoI with a NaN or infinite coordinate, or whose width or height overflows its dtype
(finite corners about 3e38 apart in fp32), pools to zeros (and gets no gradient).
An inf or NaN feature value reaches the bins whose samples give its cell a nonzero
weight, and no others; torchvision also multiplies the zero-weight corners of its
samples (on whole pixels, on the border rows and columns: 0 * inf = NaN), so where
it returns NaN this may return the inf or finite value the weights define.
A batch index is truncated toward zero, as in torchvision (-0.5 is image 0). One
outside ``(-1, N)``, infinite ones included, raises ``ValueError`` on the CPU (from
the kernel, so under ``torch.compile`` too); on CUDA it is not checked (that would
need a device-to-host sync): such a RoI pools to zeros and gets no gradient, and
nothing outside the input is ever read. A NaN batch index pools to zeros on both.

The adaptive grid (``sampling_ratio <= 0``) is capped at 65536 samples per bin axis,
and an explicit ``sampling_ratio`` above 65536 is a ``ValueError`` (torchvision would
take over 2^32 samples per bin). So a RoI whose bins span more than 65536 cells of
the feature map (only absurdly large boxes) is sampled differently from torchvision,
and its values differ; every other RoI gets torchvision's values.

RoIs may have any float or integer dtype; they are used in fp32 (fp64 for fp64
input), including for fp16/bf16 inputs, which are pooled with fp32 accumulation
(integer and fp16/bf16 boxes are converted to fp32 directly, never rounded to the
input's dtype, and so is the batch-index column built for a list of boxes). Under
``torch.autocast`` (CUDA or CPU) fp16/bf16 inputs are pooled in fp32 and the
result is returned in the input's dtype, as torchvision does.
"""

import math
import numbers
from collections.abc import Mapping

import torch
from torch import nn

from . import _utils
from ._library import _acc_dtype, ops


def _pair(size, name="output_size"):
    if _utils.is_int(size):
        size = (size, size)
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(_utils.is_int(s) for s in size)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {size!r}")
    if size[0] < 0 or size[1] < 0:
        raise ValueError(f"{name} must be non-negative, got {tuple(size)}")
    return _utils.check_int64(name, size[0]), _utils.check_int64(name, size[1])


def _kernel_size(ph, pw, sampling_ratio):
    """What the kernels pool for output_size (ph, pw) and a sampling ratio: at least 1 x 1,
    which _cut makes empty again for a 0 (one sample per bin then: it is thrown away)."""
    return max(ph, 1), max(pw, 1), sampling_ratio if ph and pw else 1


def _cut(out, ph, pw):
    """A pooled map of ph x pw from the kernels' (_kernel_size): an output_size of 0 gives
    an empty map, as torchvision's (and still a gradient, of zeros)."""
    return out if ph and pw else out[:, :, :ph, :pw]


def _to_rois(boxes, input):
    """Tensor[K, 5] or a list of Tensor[L, 4] (one per image) -> Tensor[K, 5]."""
    def check_real(name, t):
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got {t.dtype}")

    if isinstance(boxes, torch.Tensor):
        check_real("boxes", boxes)
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(f"boxes must be a Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of "
                             f"Tensor[L, 4], got a tensor of shape {list(boxes.shape)}")
        return boxes.to(_roi_dtype(boxes.dtype, input))
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    for i, b in enumerate(boxes):
        _utils.check_tensor(f"boxes[{i}]", b)
        check_real(f"boxes[{i}]", b)
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


def _check_aligned(value) -> bool:
    # What torchvision's op accepts: a bool, None (False), a number or a 0-d tensor / NumPy
    # scalar; anything else (a string: 'False' is truthy) is a TypeError.
    if type(value) is bool or value is None or isinstance(value, numbers.Real) or getattr(value, "ndim", None) == 0:
        return bool(value)
    raise TypeError(f"aligned must be a bool, got {type(value).__name__}")


@_utils.fx_leaf
def roi_align(input: torch.Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> torch.Tensor:
    """RoI Align; drop-in for ``torchvision.ops.roi_align``.

    ``input``: ``[N, C, H, W]``; ``boxes``: ``Tensor[K, 5]`` (batch index, x1, y1,
    x2, y2) or a list of ``Tensor[L, 4]``, one per image; returns ``[K, C, PH, PW]``
    in the input's dtype (channels_last for a channels_last input).

    ``sampling_ratio``: an int in ``[-2**31, 65536]`` (``<= 0``: adaptive, capped at
    65536 samples per bin axis). ``aligned``: a bool (``None``, numbers and 0-d
    tensors are read as torchvision's op reads them; a string is a ``TypeError``).

    On CUDA the backward uses atomics unless deterministic algorithms are enabled
    (``torch.use_deterministic_algorithms(True)``), and a batch index outside
    ``(-1, N)`` pools to zeros instead of raising (see the module docstring).
    """
    _utils.check_tensor("input", input)
    if input.dim() != 4:
        raise ValueError(f"input must be [N, C, H, W], got shape {list(input.shape)}")
    _utils.check_float_dtype("input", input)
    rois = _to_rois(boxes, input)
    _utils.check_same_device(input=input, boxes=rois)
    ph, pw = _pair(output_size)
    spatial_scale = _utils.check_float("spatial_scale", spatial_scale)
    sampling_ratio = _utils.check_int64("sampling_ratio", sampling_ratio)
    aligned = _check_aligned(aligned)
    return _cut(ops.roi_align(input, rois, spatial_scale, *_kernel_size(ph, pw, sampling_ratio), aligned), ph, pw)


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
    does: in fp16 it would overflow above 65504. A box whose area is NaN or negative
    (a NaN coordinate, or inverted on one axis) has no level: -1. (torchvision casts
    its NaN level to int64, an arbitrary value outside the levels, and so pools such a
    box to zeros, as :func:`multi_scale_roi_align` does with -1.)
    """
    if k_min > k_max:
        raise ValueError(f"fpn_levels: k_min ({k_min}) must be <= k_max ({k_max})")
    boxes = boxes if boxes.dtype == torch.float64 else boxes.float()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    s = torch.sqrt(area)
    lvl = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    lvl = torch.clamp(lvl, min=k_min, max=k_max) - k_min
    return torch.where(torch.isnan(lvl), -1.0, lvl).to(torch.int64)


class LevelMapper:
    """:func:`fpn_levels` behind torchvision's ``LevelMapper`` interface: called with a
    list of ``Tensor[L, 4]``, returns the level of each box (``MultiScaleRoIAlign.map_levels``)."""

    def __init__(self, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4,
                 eps: float = 1e-6):
        self.k_min = k_min
        self.k_max = k_max
        self.s0 = canonical_scale
        self.lvl0 = canonical_level
        self.eps = eps

    def __call__(self, boxlists) -> torch.Tensor:
        return fpn_levels(torch.cat(list(boxlists)), self.k_min, self.k_max, self.s0, self.lvl0, self.eps)


def _check_features(features, names):
    """Feature maps [N, C, H_l, W_l] with one N, C and device; one dtype, except under autocast."""
    if not isinstance(features, (list, tuple)) or not features:
        raise ValueError("features must be a non-empty list of [N, C, H, W] tensors")
    for name, f in zip(names, features):  # before f0.device: a list of numbers is a TypeError
        _utils.check_tensor(name, f)
    f0, n0 = features[0], names[0]
    autocast = f0.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(f0.device.type)
    for name, f in zip(names, features):
        if f.dim() != 4 or f.shape[:2] != f0.shape[:2]:
            raise ValueError(f"{name} must be [N, C, H, W] with the N and C of {n0}, got {list(f.shape)}")
        _utils.check_float_dtype(name, f)
        if f.device != f0.device:
            raise ValueError(f"{name} is on {f.device} but {n0} is on {f0.device}; they must be on one device")
        # torchvision fails on mixed dtypes outside autocast (its RoIs have one dtype) and
        # under autocast pools them all in fp32 and returns the first map's dtype.
        if f.dtype != f0.dtype and not autocast:
            raise ValueError(f"{name} is {f.dtype} but {n0} is {f0.dtype}; feature maps must share one dtype "
                             f"(outside autocast)")
    if f0.device.type == "cuda" and len(features) > 8:
        raise ValueError(f"multi-scale RoI Align takes at most 8 feature maps on CUDA, got {len(features)}")
    return list(features)


def _level_range(scales, what="spatial_scales"):
    """(k_min, k_max) from the finest and coarsest scale, as torchvision's _setup_scales."""
    ks = [-math.log2(s) for s in (scales[0], scales[-1])]
    if not all(k.is_integer() for k in ks):
        raise ValueError(f"{what}: the first and last scales must be powers of 2, got {scales}")
    if ks[0] > ks[1]:
        # torchvision's LevelMapper clamps every level out of range then: all zeros.
        raise ValueError(f"{what} must go from the finest feature map to the coarsest (the first scale the "
                         f"largest), got {scales}")
    return int(ks[0]), int(ks[1])


def _level_mapper(scales, canonical_scale, canonical_level, what="spatial_scales"):
    return LevelMapper(*_level_range(scales, what), canonical_scale, canonical_level)


def _multi_scale(features, boxes, output_size, scales, sampling_ratio, aligned, mapper):
    """Pools RoI k from features[mapper(boxes)[k]]; checked features and scales."""
    f0 = features[0]
    rois = _to_rois(boxes, f0)
    _utils.check_same_device(features=f0, boxes=rois)
    ph, pw = _pair(output_size)
    sampling_ratio = _utils.check_int64("sampling_ratio", sampling_ratio)
    aligned = _check_aligned(aligned)
    if len(features) == 1:  # torchvision pools from the one map whatever the box
        levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    else:
        levels = mapper([rois[:, 1:]])
        # No level (-1: NaN or negative area), or a level past the last map (a gap in the
        # pyramid, or more levels than maps): zeros, as in torchvision. The kernels pool a
        # RoI with a NaN batch index to zeros.
        ok = (levels >= 0) & (levels < len(features))
        rois = torch.cat([torch.where(ok, rois[:, 0], float("nan"))[:, None], rois[:, 1:]], dim=1)
        levels = torch.where(ok, levels, 0)
    dtype = f0.dtype
    if any(f.dtype != dtype for f in features):  # autocast only (_check_features)
        common = torch.float64 if any(f.dtype == torch.float64 for f in features) else torch.float32
        features = [f.to(common) for f in features]
    out = ops.multi_scale_roi_align(features, rois, levels, scales, *_kernel_size(ph, pw, sampling_ratio), aligned)
    return _cut(out, ph, pw).to(dtype)


@_utils.fx_leaf
def multi_scale_roi_align(features: list, boxes, output_size, spatial_scales: list, sampling_ratio: int = 2,
                          canonical_scale: int = 224, canonical_level: int = 4, aligned: bool = False) -> torch.Tensor:
    """Pools each RoI from its FPN level (``fpn_levels``) of ``features`` (finest first).

    ``spatial_scales[i]`` (> 0) is the scale of ``features[i]``; the first and last must
    be powers of 2, the first the largest: they give the levels k_min and k_max, and a
    RoI of level k pools from ``features[k - k_min]``, as in torchvision. A RoI whose
    level has no feature map (a gap in the pyramid, e.g. maps at 1/4 and 1/16 only), or
    that has no level (NaN or negative area, see ``fpn_levels``), pools to zeros, as in
    torchvision; with a single feature map every RoI pools from it, as in
    :func:`roi_align`. Returns ``[K, C, PH, PW]`` in the order of the RoIs, in the
    dtype of ``features[0]`` (the maps' dtypes may differ only under autocast, as in
    torchvision). One op call (one kernel launch on CUDA) pools every level, forward
    and backward; the backward is deterministic under the same rules as
    :func:`roi_align`. On CUDA at most 8 levels.
    """
    features = _check_features(features, [f"features[{i}]" for i in range(len(features))]
                               if isinstance(features, (list, tuple)) else [])
    if not isinstance(spatial_scales, (list, tuple)):
        raise TypeError(f"spatial_scales must be a list of numbers, got {type(spatial_scales).__name__}")
    if len(spatial_scales) != len(features):
        raise ValueError(f"spatial_scales has {len(spatial_scales)} entries for {len(features)} feature maps")
    scales = [_utils.check_float(f"spatial_scales[{i}]", s, positive=True) for i, s in enumerate(spatial_scales)]
    if not all(s < math.inf for s in scales):  # positive already; a comparison traces under compile
        raise ValueError(f"spatial_scales must be finite, got {scales}")
    mapper = None
    if len(scales) > 1:
        mapper = _level_mapper(scales, canonical_scale, canonical_level)
    return _multi_scale(features, boxes, output_size, scales, sampling_ratio, aligned, mapper)


def _log2_nearest(h, max_h):
    """round(log2(h / max_h)) by comparisons of integers: (h / max_h)^2 lies strictly between
    2^(2k - 1) and 2^(2k + 1) (a ratio of integers squared is never 2^odd). torch.compile
    guards on them when the sizes are symbolic, where a tensor's log2 would be
    data-dependent. torchvision rounds log2 in fp32 instead, which can differ only for
    ratios within fp32 rounding of 2^k sqrt(2) (2378 / 3363, say)."""
    a, b, k = h * h, max_h * max_h, 0
    while a * 2 ** max(0, 1 - 2 * k) < b * 2 ** max(0, 2 * k - 1):  # r^2 < 2^(2k - 1)
        k -= 1
    while a * 2 ** max(0, -2 * k - 1) > b * 2 ** max(0, 2 * k + 1):  # r^2 > 2^(2k + 1)
        k += 1
    return k


def _setup_scales(features, names, image_shapes, canonical_scale, canonical_level):
    """torchvision's rule: each map's scale is the power of 2 nearest to its height over the
    largest image height (_log2_nearest); the width is not used."""
    if not isinstance(image_shapes, (list, tuple)) or len(image_shapes) == 0:
        raise ValueError("image_shapes must be a non-empty list of (height, width), one per image")
    max_h = max(int(s[0]) for s in image_shapes)
    max_w = max(int(s[1]) for s in image_shapes)
    if max_h <= 0 or max_w <= 0:
        raise ValueError(f"image_shapes must hold positive sizes, got {list(image_shapes)}")
    scales = []
    for name, f in zip(names, features):
        if f.shape[-2] == 0:
            raise ValueError(f"{name} has height 0: its scale cannot be inferred")
        scales.append(2.0 ** _log2_nearest(f.shape[-2], max_h))
    where = f"the feature maps {names} (in the order of x)"
    return scales, _level_mapper(scales, canonical_scale, canonical_level, where)


def _pool_dict(x, boxes, image_shapes, featmap_names, output_size, sampling_ratio, canonical_scale,
               canonical_level, scales, map_levels):
    """MultiScaleRoIAlign's forward: (pooled, scales, map_levels), the last two inferred from
    the maps and image_shapes when not given."""
    if not isinstance(x, Mapping):
        raise TypeError(f"x must be a dict of feature maps by name, got {type(x).__name__}")
    names = [k for k in x if k in featmap_names]
    if not names:
        raise ValueError(f"x has none of the feature maps in featmap_names {featmap_names} (its keys: {list(x)})")
    features = _check_features([x[k] for k in names], [f"x[{k!r}]" for k in names])
    if scales is None or map_levels is None:
        scales, map_levels = _setup_scales(features, names, image_shapes, canonical_scale, canonical_level)
    if len(scales) != len(features):
        raise ValueError(f"scales has {len(scales)} entries (inferred on the first call) for "
                         f"{len(features)} feature maps")
    return _multi_scale(features, boxes, output_size, scales, sampling_ratio, False, map_levels), scales, map_levels


@_utils.fx_leaf
def _traced_pyramid(x, boxes, image_shapes, featmap_names, output_size, sampling_ratio, canonical_scale,
                    canonical_level, scales):
    """MultiScaleRoIAlign under torch.fx, one node: the module's scales when they were set
    when it was traced, else inferred on every call (as in torchvision's traced graph)."""
    mapper = None if scales is None else _level_mapper(scales, canonical_scale, canonical_level)
    return _pool_dict(x, boxes, image_shapes, featmap_names, output_size, sampling_ratio, canonical_scale,
                      canonical_level, scales, mapper)[0]


class MultiScaleRoIAlign(nn.Module):
    """Drop-in for ``torchvision.ops.MultiScaleRoIAlign``: ``forward(x: dict, boxes: list, image_shapes: list)``.

    As torchvision: the maps used are the entries of ``x`` whose names are in
    ``featmap_names``, in the order of ``x`` (names missing from ``x`` are skipped);
    ``scales`` and ``map_levels`` are inferred from the first call's maps and
    ``image_shapes`` and then kept (set both to ``None`` to infer them again).
    ``torch.fx.symbolic_trace`` records the module as one node, which keeps the scales
    set when it was traced (and the level mapping they give), or else infers them on
    every call.
    """

    def __init__(self, featmap_names: list, output_size, sampling_ratio: int, *, canonical_scale: int = 224,
                 canonical_level: int = 4):
        super().__init__()
        self.featmap_names = featmap_names
        self.output_size = _pair(output_size)
        self.sampling_ratio = sampling_ratio
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.scales = None
        self.map_levels = None

    def forward(self, x: dict, boxes: list, image_shapes: list) -> torch.Tensor:
        if _utils.find_proxy((x, boxes, image_shapes)) is not None:
            # a hand-made map_levels cannot be a graph constant: the scales stand for it
            scales = None if self.map_levels is None else self.scales
            return _traced_pyramid(x, boxes, image_shapes, self.featmap_names, self.output_size, self.sampling_ratio,
                                   self.canonical_scale, self.canonical_level, scales)
        out, self.scales, self.map_levels = _pool_dict(
            x, boxes, image_shapes, self.featmap_names, self.output_size, self.sampling_ratio, self.canonical_scale,
            self.canonical_level, self.scales, self.map_levels)
        return out

    def __repr__(self):
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio})")

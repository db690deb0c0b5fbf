"""Loads the compiled ops and registers what lives in Python: fake kernels,
autograd, and the Triton kernels that serve as CUDA backends."""

import importlib

import torch
import torch.autograd.forward_ad as fwAD

try:
    from pyvision_ops import _C  # noqa: F401  (registers torch.ops.pyvision_ops.*)
except ImportError as e:  # pragma: no cover - exercised by hand
    raise ImportError(
        "pyvision_ops: the compiled extension pyvision_ops._C could not be loaded "
        f"({e}). It must be built against the torch in use (torch {torch.__version__}): "
        "from a source checkout run `make build` (or `pip install --no-build-isolation -e .`); "
        "an installed wheel needs the torch release it names."
    ) from e

ops = torch.ops.pyvision_ops

_lib = torch.library.Library("pyvision_ops", "IMPL")
_libs = {"pyvision_ops": _lib}  # namespace -> the Library its Autograd kernels go through


def _any_tangent(args) -> bool:
    return any(isinstance(a, torch.Tensor) and fwAD.unpack_dual(a).tangent is not None for a in args)


def register_autograd(qualname: str, backward, setup_context, differentiable: bool = True) -> None:
    """``torch.library.register_autograd(qualname, backward, setup_context=...)`` without its
    per-call generic work.

    torch's kernel rebuilds the op's whole argument list from the schema on every call
    (``fill_defaults``, which reads ``schema.arguments`` once per argument): tens of
    microseconds of host time per forward, which is most of a small op's eager cost on a
    GPU. Our schemas have no default values, no keyword-only and no tensor-list arguments,
    so the inputs arrive complete. Otherwise the same: an autograd.Function on the
    Autograd key that redispatches below autograd, the plain redispatch when nothing
    requires grad, and ``setup_context(ctx, inputs, output)`` / ``backward(ctx, *grads)``
    as torch calls them. ``differentiable=False``: outputs without a derivative (forward-mode
    tangents and torch.func transforms see constants).
    """
    namespace, op = qualname.split("::")
    overload = getattr(getattr(torch.ops, namespace), op).default
    schema = overload._schema
    for a in (*schema.arguments, *schema.returns):  # tensor lists: List[Tensor], Tensor?[], Tensor[]?
        if a.kwarg_only or a.has_default_value() or ("List[" in str(a.type) and "Tensor" in str(a.type)):
            raise NotImplementedError(f"register_autograd: {qualname} needs torch.library.register_autograd")
    after = torch._C._after_autograd_keyset

    def forward(ctx, *args):
        *inputs, keyset = args
        with torch._C._AutoDispatchBelowAutograd():
            out = overload.redispatch(keyset & after, *inputs)
            setup_context(ctx, tuple(inputs), out)
        return out

    def backward_keyset(ctx, *grads):
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[:-1]  # as torch's: the inputs' flags, not the keyset's
        try:
            grads_in = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (*(grads_in if isinstance(grads_in, tuple) else (grads_in,)), None)

    def jvp(ctx, *tangents):
        raise NotImplementedError(f"{qualname} has no forward-mode derivative (jvp, forward_ad); use reverse mode")

    # grad_fn: pyvision_ops_<op>Backward
    Function = type(f"pyvision_ops_{op}", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_keyset),
                     "jvp": staticmethod(jvp)})

    def kernel(keyset, *args):
        # Inside a forward-AD level (torch.func.jvp enters one too), dual inputs do not
        # require grad: the Function must see them, or their tangents would be dropped.
        if (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)) or (
                differentiable and fwAD._current_level >= 0 and _any_tangent(args)):
            if not torch._C._are_functorch_transforms_active():
                return Function.apply(*args, keyset)
            if differentiable:
                raise NotImplementedError(f"{qualname} is not differentiable under torch.func transforms (grad, jvp, "
                                          "vmap of a gradient); use torch.autograd")
        with torch._C._AutoDispatchBelowAutograd():
            return overload.redispatch(keyset & after, *args)

    if namespace not in _libs:
        _libs[namespace] = torch.library.Library(namespace, "IMPL")
    _libs[namespace].impl(op, kernel, "Autograd", with_keyset=True)


# op name -> "kernels/<family>.py:<launcher>" for ops whose CUDA kernel is Triton.
TRITON_KERNELS: dict[str, str] = {}


def _register_triton(op: str, family: str, launcher: str | None = None) -> None:
    """Registers kernels/<family>.py:<launcher> as the CUDA kernel of pyvision_ops::<op>.

    The module is imported on first call, so `import pyvision_ops` never imports Triton.
    """
    launcher = launcher or op

    def cuda_impl(*args):
        module = importlib.import_module(f"pyvision_ops.kernels.{family}")
        # Triton launches on the current device and its stream, not on the tensors' device;
        # a direct op call with tensors on two devices would hand it another GPU's memory.
        device = None
        for a in args:  # a plain loop: ~0.3 us less per call than a set or any()
            if isinstance(a, torch.Tensor):
                if device is None:
                    device = a.device
                elif a.device != device:
                    raise RuntimeError(f"pyvision_ops::{op}: expected every tensor on one device, got {device} "
                                       f"and {a.device}")
        with torch.cuda.device(device):
            return getattr(module, launcher)(*args)

    torch.library.register_kernel(f"pyvision_ops::{op}", "cuda", cuda_impl)
    TRITON_KERNELS[op] = f"kernels/{family}.py:{launcher}"


def _like(t: torch.Tensor) -> torch.Tensor:
    """An output shaped like t as the kernels return it: contiguous whatever t's strides
    (they compute on t.contiguous()); empty_like would keep a channels_last layout."""
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Output/accumulation dtype of the kernels: fp64 stays fp64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------- box IoU family

@torch.library.register_fake("pyvision_ops::pairwise_box_iou")
def _(boxes1, boxes2, kind, eps):
    torch._check(boxes1.dim() == 3 and boxes2.dim() == 3)
    return boxes1.new_empty((boxes1.shape[0], boxes1.shape[1], boxes2.shape[1]), dtype=_acc_dtype(boxes1.dtype))


@torch.library.register_fake("pyvision_ops::matched_box_iou")
def _(boxes1, boxes2, kind, loss, eps):
    return boxes1.new_empty((boxes1.shape[0],), dtype=_acc_dtype(boxes1.dtype))


@torch.library.register_fake("pyvision_ops::matched_box_iou_backward")
def _(grad, boxes1, boxes2, kind, loss, eps):
    return _like(boxes1), _like(boxes2)


def _matched_setup(ctx, inputs, output):
    boxes1, boxes2, kind, loss, eps = inputs
    ctx.save_for_backward(boxes1, boxes2)
    ctx.args = (kind, loss, eps)


def _matched_backward(ctx, grad):
    boxes1, boxes2 = ctx.saved_tensors
    g1, g2 = ops.matched_box_iou_backward(grad, boxes1, boxes2, *ctx.args)
    return g1, g2, None, None, None


register_autograd("pyvision_ops::matched_box_iou", _matched_backward, setup_context=_matched_setup)


def _pairwise_setup(ctx, inputs, output):
    boxes1, boxes2, kind, eps = inputs
    ctx.save_for_backward(boxes1, boxes2)
    ctx.args = (kind, eps)


def _pairwise_backward(ctx, grad):
    # Each (n, m) pair is a matched pair: expand to [B, N, M, 4], reuse the fused
    # matched backward, then sum over the partner axis. O(B*N*M) extra memory.
    boxes1, boxes2 = ctx.saved_tensors
    kind, eps = ctx.args
    B, N, M = grad.shape
    a = boxes1[:, :, None, :].expand(B, N, M, 4).reshape(-1, 4)
    b = boxes2[:, None, :, :].expand(B, N, M, 4).reshape(-1, 4)
    ga, gb = ops.matched_box_iou_backward(grad.reshape(-1), a, b, kind, False, eps)
    return ga.view(B, N, M, 4).sum(2), gb.view(B, N, M, 4).sum(1), None, None


register_autograd("pyvision_ops::pairwise_box_iou", _pairwise_backward, setup_context=_pairwise_setup)

# ------------------------------------------------------------------ NMS family

def _kept(boxes):
    """How many boxes a selection keeps: data-dependent (0 and 1 are valid sizes), except 0
    from boxes known to be empty (inductor cannot index a size-0 dimension with a size it
    does not know)."""
    if isinstance(boxes.shape[0], int) and boxes.shape[0] == 0:
        return 0
    return torch.library.get_ctx().new_dynamic_size(min=0)


@torch.library.register_fake("pyvision_ops::nms")
def _(boxes, scores, idxs, iou_threshold):
    return boxes.new_empty((_kept(boxes),), dtype=torch.int64)


@torch.library.register_fake("pyvision_ops::soft_nms")
def _(boxes, scores, idxs, iou_threshold, sigma, score_threshold, method):
    n = _kept(boxes)
    return boxes.new_empty((n,), dtype=torch.int64), scores.new_empty((n,))


def _soft_nms_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)  # a selection: its decayed scores carry no gradient


register_autograd("pyvision_ops::soft_nms", lambda ctx, *grads: (None,) * 7,
                  setup_context=_soft_nms_setup, differentiable=False)


# ------------------------------------------------------------------ RoI Align

def _roi_empty(size, like):
    """An empty tensor in the layout the RoI Align kernels (CPU and CUDA) give for input `like`:
    channels_last only when `like` is channels_last and not also NCHW-contiguous."""
    cl = like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()
    return torch.empty(size, dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


@torch.library.register_fake("pyvision_ops::roi_align")
def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    torch._check(rois.dim() == 2 and rois.shape[1] == 5)
    return _roi_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width), input)


@torch.library.register_fake("pyvision_ops::roi_align_backward")
def _(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, sampling_ratio,
      aligned):
    return _roi_empty((batch_size, channels, height, width), grad)


def _roi_align_setup(ctx, inputs, output):
    input, rois, spatial_scale, ph, pw, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, ph, pw, sampling_ratio, aligned)
    ctx.input_shape = input.shape


def _roi_align_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, ph, pw, sampling_ratio, aligned = ctx.args
    b, c, h, w = ctx.input_shape
    g = ops.roi_align_backward(grad, rois, spatial_scale, ph, pw, b, c, h, w, sampling_ratio, aligned)
    return g, None, None, None, None, None, None


register_autograd("pyvision_ops::roi_align", _roi_align_backward, setup_context=_roi_align_setup)


@torch.library.register_fake("pyvision_ops::multi_scale_roi_align")
def _(features, rois, levels, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned):
    x = features[0]
    return _roi_empty((rois.shape[0], x.shape[1], pooled_height, pooled_width), x)


@torch.library.register_fake("pyvision_ops::multi_scale_roi_align_backward")
def _(grad, rois, levels, spatial_scales, heights, widths, batch_size, channels, pooled_height, pooled_width,
      sampling_ratio, aligned):
    return [_roi_empty((batch_size, channels, h, w), grad) for h, w in zip(heights, widths)]


def _ms_setup(ctx, inputs, output):
    features, rois, levels, scales, ph, pw, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois, levels)
    ctx.args = (scales, [f.shape[2] for f in features], [f.shape[3] for f in features], features[0].shape[0],
                features[0].shape[1], ph, pw, sampling_ratio, aligned)


def _ms_backward(ctx, grad):
    rois, levels = ctx.saved_tensors
    scales, hs, ws, b, c, ph, pw, sampling_ratio, aligned = ctx.args
    grads = ops.multi_scale_roi_align_backward(grad, rois, levels, scales, hs, ws, b, c, ph, pw, sampling_ratio,
                                               aligned)
    return list(grads), None, None, None, None, None, None, None


torch.library.register_autograd("pyvision_ops::multi_scale_roi_align", _ms_backward, setup_context=_ms_setup)


# Autocast as torchvision: fp16/bf16 features and RoIs are pooled in fp32 (fp64 stays fp64)
# and the result comes back in the input's dtype, as its roi_align; the focal loss runs in
# fp32 and stays fp32, as its binary_cross_entropy_with_logits does (an fp16 sum over many
# anchors overflowed to inf). Gradients return in the inputs' dtypes through the casts.


def _fp32(t):
    return t.float() if t.is_floating_point() and t.dtype != torch.float64 else t


def _register_autocast(key: str) -> None:
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def roi_align(_, input, rois, *args):
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            out = ops.roi_align(_fp32(input), _fp32(rois), *args)
        return out.to(input.dtype)

    def multi_scale_roi_align(_, features, rois, levels, *args):
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            out = ops.multi_scale_roi_align([_fp32(f) for f in features], _fp32(rois), levels, *args)
        return out.to(features[0].dtype)

    def sigmoid_focal_loss(_, inputs, targets, alpha, gamma):
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            return ops.sigmoid_focal_loss(_fp32(inputs), _fp32(targets), alpha, gamma)

    _lib.impl("roi_align", roi_align, key, with_keyset=True)
    _lib.impl("multi_scale_roi_align", multi_scale_roi_align, key, with_keyset=True)
    _lib.impl("sigmoid_focal_loss", sigmoid_focal_loss, key, with_keyset=True)


_register_autocast("AutocastCUDA")
_register_autocast("AutocastCPU")

# -------------------------------------------------------------- interpolate

@torch.library.register_fake("pyvision_ops::upsample_bilinear")
def _(input, out_h, out_w, align_corners, scale_h, scale_w):
    return input.new_empty((input.shape[0], input.shape[1], out_h, out_w))


@torch.library.register_fake("pyvision_ops::upsample_bilinear_backward")
def _(grad, in_h, in_w, align_corners, scale_h, scale_w):
    return grad.new_empty((grad.shape[0], grad.shape[1], in_h, in_w))


def _upsample_setup(ctx, inputs, output):
    input, out_h, out_w, align_corners, scale_h, scale_w = inputs
    ctx.args = (input.shape[2], input.shape[3], align_corners, scale_h, scale_w)


def _upsample_backward(ctx, grad):
    return ops.upsample_bilinear_backward(grad, *ctx.args), None, None, None, None, None


register_autograd("pyvision_ops::upsample_bilinear", _upsample_backward, setup_context=_upsample_setup)


def _upsample_backward_setup(ctx, inputs, output):
    grad, in_h, in_w, align_corners, scale_h, scale_w = inputs
    ctx.args = (grad.shape[2], grad.shape[3], align_corners, scale_h, scale_w)


def _upsample_double_backward(ctx, gg):
    # The backward is linear in its incoming gradient, with the forward as its adjoint.
    return ops.upsample_bilinear(gg, *ctx.args), None, None, None, None, None


register_autograd("pyvision_ops::upsample_bilinear_backward", _upsample_double_backward,
                  setup_context=_upsample_backward_setup)


# ------------------------------------------------------------- cross-entropy

def _ce_outputs(like, shape, reduction):
    """Fake outputs of the cross-entropy ops: the loss (`shape` for none, else 0-d), wsum, stats."""
    acc = _acc_dtype(like.dtype)
    return (like.new_empty(shape if reduction == 0 else (), dtype=acc), like.new_empty((), dtype=acc),
            like.new_empty((2, *shape), dtype=acc))


@torch.library.register_fake("pyvision_ops::softmax_cross_entropy")
def _(logits, target, weight, ignore_index, label_smoothing, reduction):
    return _ce_outputs(logits, (logits.shape[0], logits.shape[2]), reduction)


@torch.library.register_fake("pyvision_ops::softmax_cross_entropy_backward")
def _(grad, logits, target, weight, stats, wsum, ignore_index, label_smoothing, reduction):
    return _like(logits)


def _register_ce_autograd(op: str, backward_op=None) -> None:
    """Autograd of a cross-entropy op, whose inputs are (logits, target, *options, weight,
    ignore_index, label_smoothing, reduction) and outputs (loss, wsum, stats); its backward op
    (`backward_op`, default <op>_backward) takes (grad, logits, target, *options, weight,
    stats, wsum, ignore_index, label_smoothing, reduction). wsum and stats are not
    differentiable: only the loss is.

    An op whose fourth output is the gradient for a loss gradient of 1 (with_grad) keeps it as
    ctx.dz, not as a saved tensor: the first eager backward scales it in place and hands it
    on (an in-place change would fail a saved tensor's version check at a second backward,
    and once dropped here the gradient's accumulation can take it without a copy). Every other
    backward (retain_graph's later calls, create_graph, whose backward op refuses a second
    derivative, tracing with functional or fake tensors, batched loss gradients) recomputes it
    with the backward op."""
    backward_op = backward_op or getattr(ops, f"{op}_backward")

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1], inputs[-4], output[2], output[1])
        ctx.options, ctx.args, ctx.n_inputs = inputs[2:-4], inputs[-3:], len(inputs)
        ctx.set_materialize_grads(False)  # no zero gradients for wsum and stats (a full map) each step
        ctx.dz = None
        if len(output) == 4:
            ctx.mark_non_differentiable(output[3])
            ctx.dz = output[3]

    def backward(ctx, grad_loss, *_):
        dz, ctx.dz = ctx.dz, None
        if grad_loss is None:  # only wsum or stats were used
            return (None,) * ctx.n_inputs
        if (dz is not None and type(dz) is torch.Tensor and not torch.is_grad_enabled()
                and not torch._C._are_functorch_transforms_active() and not _legacy_batched(grad_loss)):
            ops.scale_grad_(dz, grad_loss)
        else:
            logits, target, weight, stats, wsum = ctx.saved_tensors
            dz = backward_op(grad_loss, logits, target, *ctx.options, weight, stats, wsum, *ctx.args)
        return (dz,) + (None,) * (ctx.n_inputs - 1)

    register_autograd(f"pyvision_ops::{op}", backward, setup_context=setup)


_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor", lambda t: False)  # is_grads_batched


_register_ce_autograd("softmax_cross_entropy")


@torch.library.register_fake("pyvision_ops::softmax_cross_entropy_with_grad")
def _(logits, target, weight, ignore_index, label_smoothing, reduction):
    return (*_ce_outputs(logits, (logits.shape[0], logits.shape[2]), reduction), _like(logits))


@torch.library.register_fake("pyvision_ops::scale_grad_")
def _(grad, scale):
    return None


_register_ce_autograd("softmax_cross_entropy_with_grad", ops.softmax_cross_entropy_backward)


@torch.library.register_fake("pyvision_ops::upsample_cross_entropy")
def _(logits, target, align_corners, weight, ignore_index, label_smoothing, reduction):
    return _ce_outputs(logits, target.shape, reduction)


@torch.library.register_fake("pyvision_ops::upsample_cross_entropy_backward")
def _(grad, logits, target, align_corners, weight, stats, wsum, ignore_index, label_smoothing, reduction):
    return _like(logits)


_register_ce_autograd("upsample_cross_entropy")


# --------------------------------------------------------------------- losses

@torch.library.register_fake("pyvision_ops::sigmoid_focal_loss")
def _(inputs, targets, alpha, gamma):
    return _like(inputs)


@torch.library.register_fake("pyvision_ops::sigmoid_focal_loss_backward")
def _(grad, inputs, targets, alpha, gamma):
    return _like(inputs), _like(inputs)


def _focal_setup(ctx, inputs, output):
    x, t, alpha, gamma = inputs
    ctx.save_for_backward(x, t)
    ctx.args = (alpha, gamma)


def _focal_backward(ctx, grad):
    x, t = ctx.saved_tensors
    dx, dt = ops.sigmoid_focal_loss_backward(grad, x, t, *ctx.args)
    return dx, dt, None, None


register_autograd("pyvision_ops::sigmoid_focal_loss", _focal_backward, setup_context=_focal_setup)


@torch.library.register_fake("pyvision_ops::dice_stats")
def _(logits, target, ignore_index):
    return logits.new_empty((2, logits.shape[1]), dtype=_acc_dtype(logits.dtype))


@torch.library.register_fake("pyvision_ops::dice_stats_backward")
def _(grad, logits, target, ignore_index):
    return _like(logits)


def _dice_setup(ctx, inputs, output):
    logits, target, ignore_index = inputs
    ctx.save_for_backward(logits, target)
    ctx.ignore_index = ignore_index


def _dice_backward(ctx, grad):
    logits, target = ctx.saved_tensors
    return ops.dice_stats_backward(grad, logits, target, ctx.ignore_index), None, None


register_autograd("pyvision_ops::dice_stats", _dice_backward, setup_context=_dice_setup)


@torch.library.register_fake("pyvision_ops::lovasz_gradient")
def _(fg_sorted, lengths):
    return _like(fg_sorted)


@torch.library.register_fake("pyvision_ops::lovasz_softmax_rows")
def _(probas, labels, ignore_index, per_image):
    rows = (probas.shape[0] if per_image else 1, probas.shape[1])
    acc = _acc_dtype(probas.dtype)
    return (probas.new_empty(rows, dtype=acc), probas.new_empty(probas.shape, dtype=acc),
            probas.new_empty(rows, dtype=torch.int64))


def _lovasz_rows_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.dtype = inputs[0].dtype


def _lovasz_rows_backward(ctx, g_losses, g_grad, g_counts):
    (grad,) = ctx.saved_tensors
    if g_losses is None:
        return None, None, None, None
    # Row (g, c) depends on probas[n, c] of its group only: G = N (per image) or 1 (broadcast).
    return (grad * g_losses.to(grad.dtype).unsqueeze(-1)).to(ctx.dtype), None, None, None


register_autograd("pyvision_ops::lovasz_softmax_rows", _lovasz_rows_backward, setup_context=_lovasz_rows_setup)

_register_triton("pairwise_box_iou", "box_iou")
_register_triton("matched_box_iou", "box_iou")
_register_triton("matched_box_iou_backward", "box_iou")
_register_triton("sigmoid_focal_loss", "losses")
_register_triton("sigmoid_focal_loss_backward", "losses")
_register_triton("dice_stats", "losses")
_register_triton("dice_stats_backward", "losses")
_register_triton("lovasz_gradient", "losses")
_register_triton("lovasz_softmax_rows", "losses")
_register_triton("upsample_bilinear", "interpolate")
_register_triton("upsample_bilinear_backward", "interpolate")
_register_triton("softmax_cross_entropy", "cross_entropy")
_register_triton("softmax_cross_entropy_backward", "cross_entropy")
_register_triton("softmax_cross_entropy_with_grad", "cross_entropy")
_register_triton("scale_grad_", "cross_entropy")
_register_triton("upsample_cross_entropy", "cross_entropy")
_register_triton("upsample_cross_entropy_backward", "cross_entropy")

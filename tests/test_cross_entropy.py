import math

import pytest
import torch
import torch.nn.functional as F
from conftest import check_compiled_channels_last, opcheck

import pyvision_ops as P

ops = torch.ops.pyvision_ops


def batch(shape=(3, 5, 4, 6), dtype=torch.float64, ignore=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    y[torch.rand(y.shape, generator=g) < 0.2] = ignore
    w = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.1
    return x, y, w


@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4, 6), (2, 3, 4, 5, 2), (1, 1, 9)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_torch(shape, weighted, label_smoothing, reduction):
    x, y, w = batch(shape)
    kw = dict(weight=w if weighted else None, reduction=reduction, label_smoothing=label_smoothing)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = P.softmax_cross_entropy(x1, y, **kw), F.cross_entropy(x2, y, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12, equal_nan=True)
    gw = torch.rand(ours.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    go = torch.autograd.grad((ours * gw).sum(), [x1])[0]
    gr = torch.autograd.grad((ref * gw).sum(), [x2])[0]
    torch.testing.assert_close(go, gr, rtol=1e-10, atol=1e-12)


# classes innermost: channels_last, channels_last_3d, a sequence-first [T, B, C] as [B, C, T]
# (the row op on the positions in memory order); for contrast a permuted layout whose classes
# are not innermost (copied, as before)
@pytest.mark.parametrize("make", [
    lambda x: x.contiguous(memory_format=torch.channels_last),
    lambda x: x.reshape(2, 5, 3, 2, 2).contiguous(memory_format=torch.channels_last_3d),
    lambda x: x.reshape(2, 5, 12).permute(2, 0, 1).contiguous().permute(1, 2, 0),
    lambda x: x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2),
], ids=["channels_last", "channels_last_3d", "sequence_first", "h_w_swapped"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_permuted_logits_match_torch_with_its_gradient_layout(make, reduction):
    x, _, w = batch((2, 5, 4, 3))
    x = make(x)
    y = torch.randint(0, 5, x.shape[:1] + x.shape[2:], generator=torch.Generator().manual_seed(3))
    y.view(-1)[::4] = 255
    kw = dict(weight=w, ignore_index=255, reduction=reduction, label_smoothing=0.2)
    x1, x2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    assert x1.stride() == x.stride()
    ours, ref = P.softmax_cross_entropy(x1, y, **kw), F.cross_entropy(x2, y, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    gw = torch.rand(ours.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    go = torch.autograd.grad((ours * gw).sum(), [x1])[0]
    gr = torch.autograd.grad((ref * gw).sum(), [x2])[0]
    torch.testing.assert_close(go, gr, rtol=1e-10, atol=1e-12)
    if x.stride(1) == 1:  # classes innermost: the gradient takes the logits' layout (torch's may or may not)
        assert go.stride() == x.stride()


@pytest.mark.parametrize("dtype,tol,gtol", [(torch.float64, 1e-12, 1e-12), (torch.float32, 2e-6, 2e-6),
                                             (torch.bfloat16, 1e-5, 8e-3)])  # bf16 gradients: an ulp
def test_rows_of_classes_match_the_blocks_of_positions(dtype, tol, gtol):
    # [N, C] logits reduce along each row of classes (csrc/cpu row_stats / row_grad), [1, C, N]
    # across a block of positions per class: the same losses and gradients, special logits
    # included; N spans several blocks of 1024 images
    x, y, w = batch((2500, 37), dtype=dtype, ignore=255)
    x[3, 4], x[5, :] = float("inf"), float("-inf")
    x[7, 2], x[9, y[9] if y[9] != 255 else 0] = float("nan"), float("-inf")
    x[11, :] = 1e30
    for kw in (dict(), dict(weight=w, label_smoothing=0.3), dict(reduction="none", label_smoothing=1.0)):
        x1, x2 = x.clone().requires_grad_(), x.T[None].clone().requires_grad_()
        rows = P.softmax_cross_entropy(x1, y, ignore_index=255, **kw)
        blocks = P.softmax_cross_entropy(x2, y[None], ignore_index=255, **kw)
        torch.testing.assert_close(rows, blocks.reshape(rows.shape), rtol=tol, atol=tol, equal_nan=True)
        gw = torch.rand(rows.shape, dtype=rows.dtype, generator=torch.Generator().manual_seed(2))
        g1 = torch.autograd.grad((rows * gw).nansum(), [x1])[0]
        g2 = torch.autograd.grad((blocks.reshape(rows.shape) * gw).nansum(), [x2])[0]
        torch.testing.assert_close(g1, g2[0].T, rtol=gtol, atol=gtol, equal_nan=True)
    x = x.double()[12:].clone().requires_grad_()  # finite rows: torch's values and gradients
    kw = dict(weight=w, ignore_index=255, label_smoothing=0.1)
    ours, ref = P.softmax_cross_entropy(x, y[12:], **kw), F.cross_entropy(x.detach(), y[12:], **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_ignore_index_values_and_all_ignored():
    import numpy as np

    x, y, w = batch(ignore=255)
    for kw in (dict(), dict(weight=w, label_smoothing=0.2)):
        for ii in (255, np.int64(255)):  # torch takes NumPy ints too
            torch.testing.assert_close(P.softmax_cross_entropy(x, y, ignore_index=ii, **kw),
                                       F.cross_entropy(x, y, ignore_index=255, **kw))
        torch.testing.assert_close(P.upsample_cross_entropy(x, y, None, ignore_index=np.int32(255), **kw),
                                   P.upsample_cross_entropy(x, y, False, ignore_index=255, **kw))
    none = torch.full_like(y, 255)
    ours = P.softmax_cross_entropy(x, none, ignore_index=255)
    assert torch.isnan(ours) and torch.isnan(F.cross_entropy(x, none, ignore_index=255))  # 0 / 0, as torch
    assert P.softmax_cross_entropy(x, none, ignore_index=255, reduction="sum").item() == 0
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(P.softmax_cross_entropy(xr, none, ignore_index=255, reduction="sum"), [xr])
    assert (g == 0).all()


def test_mean_gradient_when_the_target_weights_sum_to_zero():
    # all ignored, or only zero-weight classes: torch's mean gradient (0 at ignored
    # positions, inf/NaN at the others), for both ops
    x, y, w = batch(ignore=255)
    w0 = w.clone()
    w0[y[y != 255].unique()] = 0
    z = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    yz = torch.randint(0, 5, (2, 7, 6))
    wz = torch.ones(5, dtype=torch.float64)
    wz[yz.unique()] = 0
    cases = [(P.softmax_cross_entropy, F.cross_entropy, x, t, kw)
             for t, kw in ((torch.full_like(y, 255), {}), (y, dict(weight=w0)),
                           (y, dict(weight=w0, label_smoothing=0.1)))]
    up = lambda t, yy, **k: F.cross_entropy(F.interpolate(t, size=yy.shape[-2:], mode="bilinear"), yy, **k)  # noqa: E731
    cases.append((P.upsample_cross_entropy, up, z, yz, dict(weight=wz)))
    for ours, ref, inp, target, kw in cases:
        a, b = inp.clone().requires_grad_(), inp.clone().requires_grad_()
        la, lb = ours(a, target, ignore_index=255, **kw), ref(b, target, ignore_index=255, **kw)
        assert torch.isnan(la) and torch.isnan(lb)
        ga, gb = torch.autograd.grad(la, [a])[0], torch.autograd.grad(lb, [b])[0]
        torch.testing.assert_close(ga.isfinite(), gb.isfinite())
        torch.testing.assert_close(ga.nan_to_num(posinf=1, neginf=-1), gb.nan_to_num(posinf=1, neginf=-1))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_low_precision_gives_fp32(dtype, tol):
    x, y, w = batch((2, 19, 16, 24), dtype=dtype, ignore=255)
    ours = P.softmax_cross_entropy(x, y, weight=w.float(), ignore_index=255, label_smoothing=0.1)
    assert ours.dtype == torch.float32
    ref = F.cross_entropy(x.double(), y, weight=w, ignore_index=255, label_smoothing=0.1)
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tol)


def test_unbatched_noncontiguous_determinism():
    x, y, _ = batch((6, 4))
    torch.testing.assert_close(P.softmax_cross_entropy(x[0], y[0].clamp(min=0)),
                               F.cross_entropy(x[0], y[0].clamp(min=0)))
    xt = torch.randn(3, 8, 5, 7, dtype=torch.float64).transpose(2, 3)
    yt = torch.randint(0, 8, (3, 7, 5))
    torch.testing.assert_close(P.softmax_cross_entropy(xt, yt), F.cross_entropy(xt, yt))
    xb, yb, _ = batch((2, 19, 64, 64), dtype=torch.float32, ignore=255)
    xb.requires_grad_()
    g1 = torch.autograd.grad(P.softmax_cross_entropy(xb, yb, ignore_index=255), [xb])[0]
    g2 = torch.autograd.grad(P.softmax_cross_entropy(xb, yb, ignore_index=255), [xb])[0]
    assert torch.equal(g1, g2)


def test_gradcheck_opcheck_compile():
    x, y, w = batch((2, 3, 4))
    xr = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: P.softmax_cross_entropy(t, y, weight=w, label_smoothing=0.2, reduction="none"), (xr,))
    for reduction in (0, 1, 2):  # none, mean, sum
        opcheck(ops.softmax_cross_entropy, (xr, y.clamp(min=0), w, -100, 0.1, reduction))
    opcheck(ops.softmax_cross_entropy, (xr, y, None, -100, 0.0, 1))
    f = torch.compile(lambda t: P.softmax_cross_entropy(t, y) * 2, fullgraph=True)
    torch.testing.assert_close(f(x), P.softmax_cross_entropy(x, y) * 2)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: P.softmax_cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long)), ValueError, "target"),
        (lambda: P.softmax_cross_entropy(torch.zeros(2, 3), torch.zeros(2)), TypeError, "target"),
        # 2^64 - 100 would become -100 (the default ignore_index) in int64
        (lambda: P.softmax_cross_entropy(torch.zeros(2, 3), torch.tensor([1, 2**64 - 100], dtype=torch.uint64)),
         TypeError, "target"),
        (lambda: P.upsample_cross_entropy(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.uint64)),
         TypeError, "target"),
        (lambda: P.softmax_cross_entropy(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long)),
         TypeError, "logits"),
        (lambda: P.softmax_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), weight=torch.ones(4)),
         ValueError, "weight"),
        (lambda: P.softmax_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long),
                                         weight=torch.ones(3, dtype=torch.long)), TypeError, "weight"),
        (lambda: P.softmax_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3])), ValueError, "outside"),
        (lambda: P.softmax_cross_entropy(torch.zeros(2, 3), torch.tensor([0, -5])), ValueError, "outside"),
        (lambda: P.softmax_cross_entropy(torch.zeros(2, 0, 3), torch.zeros(2, 3, dtype=torch.long)), ValueError,
         "class"),
        (lambda: P.softmax_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), reduction="avg"),
         ValueError, "reduction"),
        (lambda: P.softmax_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), label_smoothing=1.5),
         ValueError, "label_smoothing"),
    ],
)
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


# ------------------------------------------------- fused upsample + cross-entropy

def unfused(x, y, align_corners=False, **kw):
    up = F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=align_corners)
    return F.cross_entropy(up, y, **kw)


@pytest.mark.parametrize("out_size", [(23, 17), (48, 56), (6, 7), (3, 4)])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("options", [dict(), dict(weighted=True, label_smoothing=0.2), dict(label_smoothing=1.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_upsample_ce_matches_unfused(out_size, align_corners, options, reduction):
    x, _, w = batch((2, 5, 6, 7))
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 5, (2, *out_size), generator=g)
    y[torch.rand(y.shape, generator=g) < 0.2] = 255
    kw = dict(weight=w if options.get("weighted") else None, ignore_index=255, reduction=reduction,
              label_smoothing=options.get("label_smoothing", 0.0))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = P.upsample_cross_entropy(x1, y, align_corners, **kw)
    ref = unfused(x2, y, align_corners, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    gw = torch.rand(ours.shape, dtype=torch.float64, generator=g)
    go = torch.autograd.grad((ours * gw).sum(), [x1])[0]
    gr = torch.autograd.grad((ref * gw).sum(), [x2])[0]
    torch.testing.assert_close(go, gr, rtol=1e-10, atol=1e-12)


def test_upsample_ce_low_precision_all_ignored_determinism():
    x, _, _ = batch((2, 19, 16, 32), dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, 19, (2, 128, 256), generator=g)
    y[torch.rand(y.shape, generator=g) < 0.1] = 255
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)]:
        ours = P.upsample_cross_entropy(x.to(dtype), y, ignore_index=255)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), unfused(x.to(dtype).double(), y, ignore_index=255), rtol=tol,
                                   atol=tol)
    xr = x.clone().requires_grad_()
    g1 = torch.autograd.grad(P.upsample_cross_entropy(xr, y, ignore_index=255), [xr])[0]
    g2 = torch.autograd.grad(P.upsample_cross_entropy(xr, y, ignore_index=255), [xr])[0]
    assert torch.equal(g1, g2)
    none = torch.full_like(y, 255)
    assert torch.isnan(P.upsample_cross_entropy(x, none, ignore_index=255))  # 0 / 0, as torch


def test_upsample_ce_opcheck_compile_gradcheck():
    x, _, w = batch((1, 3, 3, 4))
    y = torch.randint(0, 3, (1, 7, 9))
    xr = x.clone().requires_grad_()
    for reduction in (0, 1, 2):
        opcheck(ops.upsample_cross_entropy, (xr, y, False, w, -100, 0.1, reduction))
    assert torch.autograd.gradcheck(lambda t: P.upsample_cross_entropy(t, y, True, weight=w, reduction="none"), (xr,))
    f = torch.compile(lambda t: P.upsample_cross_entropy(t, y) * 2, fullgraph=True)
    torch.testing.assert_close(f(x), P.upsample_cross_entropy(x, y) * 2)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: P.upsample_cross_entropy(torch.zeros(2, 3, 4), torch.zeros(2, 4, 4, dtype=torch.long)), ValueError,
         "logits"),
        (lambda: P.upsample_cross_entropy(torch.zeros(2, 3, 4, 4), torch.zeros(3, 4, 4, dtype=torch.long)),
         ValueError, "target"),
        (lambda: P.upsample_cross_entropy(torch.zeros(1, 3, 4, 4), torch.full((1, 8, 8), 7)), ValueError,
         "outside"),
        (lambda: P.upsample_cross_entropy(torch.zeros(1, 3, 0, 4), torch.zeros(1, 8, 8, dtype=torch.long)),
         ValueError, "spatial"),
        (lambda: P.upsample_cross_entropy(torch.zeros(1, 3, 4, 4), torch.zeros(1, 0, 8, dtype=torch.long)),
         ValueError, "target must have a non-empty spatial size"),
        (lambda: P.upsample_cross_entropy(torch.zeros(1, 3, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long),
                                          weight=torch.ones(3, dtype=torch.bool)), TypeError, "weight"),
    ],
)
def test_upsample_ce_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def _nan_weight_case(shape, bad, targeted):
    """Logits, targets and a weight whose last class is `bad` (NaN or inf); that class is a
    target somewhere only when `targeted`."""
    x, y, w = batch(shape, ignore=255)
    c = shape[1]
    if not targeted:
        y[y == c - 1] = 0
    assert (y == c - 1).any() == targeted
    w[c - 1] = bad
    return x, y, w


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_non_finite_class_weight_reaches_only_its_targets(bad, targeted, reduction):
    # Without label smoothing a class weight scales only its own targets' terms: torch's
    # gradient is finite wherever that class is not the target (the backward's 0 * inf made
    # every gradient NaN), for the plain and the fused upsample op.
    kw = dict(ignore_index=255, reduction=reduction)
    for shape, ours_fn, ref_fn in (
            ((7, 4), P.softmax_cross_entropy, F.cross_entropy),
            ((2, 4, 5, 6), P.softmax_cross_entropy, F.cross_entropy),
            ((2, 4, 3, 4), lambda a, t, **k: P.upsample_cross_entropy(a, t, **k), unfused)):
        x, y, w = _nan_weight_case(shape, bad, targeted)
        if ours_fn is not P.softmax_cross_entropy:  # upsampled targets, 2x
            y = y.repeat_interleave(2, 1).repeat_interleave(2, 2)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours, ref = ours_fn(x1, y, weight=w, **kw), ref_fn(x2, y, weight=w, **kw)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12, equal_nan=True)
        go = torch.autograd.grad(ours.sum(), [x1])[0]
        gr = torch.autograd.grad(ref.sum(), [x2])[0]
        torch.testing.assert_close(go, gr, rtol=1e-10, atol=1e-12, equal_nan=True)
        assert torch.isfinite(go).all() or targeted


def test_target_check_reports_the_first_bad_value_across_chunks():
    # The CPU check scans chunks of 2^16 targets in parallel: the earliest bad value is
    # reported whichever chunk a thread finishes first, with one thread or several.
    y = torch.randint(0, 3, (1, 3 * 65536 + 5), generator=torch.Generator().manual_seed(0))
    y[0, 70000], y[0, 140000], y[0, -1] = 7, -9, 11
    threads = torch.get_num_threads()
    try:
        for n in sorted({1, 2, threads}):
            torch.set_num_threads(n)
            with pytest.raises(ValueError, match="value 7 is outside"):
                P.softmax_cross_entropy(torch.zeros(1, 3, y.shape[1]), y)
            y[0, 70000] = 255
            with pytest.raises(ValueError, match="value -9 is outside"):
                P.softmax_cross_entropy(torch.zeros(1, 3, y.shape[1]), y, ignore_index=255)
            y[0, 70000] = 7
    finally:
        torch.set_num_threads(threads)


def test_backward_ops_check_the_targets():
    # The forward ops reject a target outside [0, C); their backward ops, called directly (or
    # after the target changed), must too rather than index the class weights with it.
    z, y, _ = batch((4, 3, 1))
    y = y.clamp(min=0)[:, 0:1].clone()
    loss, wsum, stats = ops.softmax_cross_entropy(z, y, None, -100, 0.0, 0)
    for bad in (10**9, 3, -1):
        yb = y.clone()
        yb[0, 0] = bad
        with pytest.raises(ValueError, match="outside"):
            ops.softmax_cross_entropy_backward(torch.ones(4, 1), z, yb, None, stats, wsum, -100, 0.0, 0)
    x, _, _ = batch((1, 3, 2, 2))
    t = torch.randint(0, 3, (1, 4, 4))
    loss, wsum, stats = ops.upsample_cross_entropy(x, t, False, None, -100, 0.0, 1)
    t[0, 1, 2] = -10**12
    with pytest.raises(ValueError, match="outside"):
        ops.upsample_cross_entropy_backward(torch.ones(()), x, t, False, None, stats, wsum, -100, 0.0, 1)


@pytest.fixture(params=["tiles", "plain", "gather"])
def ce_kernels(request, monkeypatch):
    """The [N, C, S] kernels: the default class tiles (up to CE_TILE_CONFIG's MAX_C classes),
    the plain class loop, or the tiles' forward loading the target's logit (GATHER True; the
    plain loop's: the unrolled-loop test) instead of picking it by a compare."""
    from pyvision_ops.kernels import cross_entropy as K

    if request.param == "plain":
        monkeypatch.setitem(K.CE_TILE_CONFIG, "MAX_C", 0)
    elif request.param == "gather":
        monkeypatch.setitem(K.CE_TILE_CONFIG, "GATHER", True)
    return request.param


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
# [N, C] (S = 1): a program per row, whatever the [N, C, S] kernels
@pytest.mark.parametrize("shape,ce_kernels", [((2, 7, 45), k) for k in ("tiles", "plain", "gather")]
                         + [((30, 7, 1), "tiles"), ((5, 1100, 1), "tiles")], ids=str, indirect=["ce_kernels"])
def test_triton_cross_entropy_interpreter(dtype, weighted, label_smoothing, shape, ce_kernels):
    from pyvision_ops.kernels import cross_entropy as K

    x, y, w = batch(shape, dtype=dtype)
    wt = w.to(dtype) if weighted else None
    half = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)  # fp16 gradient
    for reduction in (0, 1, 2):  # none, mean, sum
        fwd = ops.softmax_cross_entropy(x, y, wt, -100, label_smoothing, reduction)
        for a, b in zip(K.softmax_cross_entropy(x, y, wt, -100, label_smoothing, reduction), fwd):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        g = torch.rand(fwd[0].shape, dtype=fwd[2].dtype) + 0.5
        torch.testing.assert_close(
            K.softmax_cross_entropy_backward(g, x, y, wt, fwd[2], fwd[1], -100, label_smoothing, reduction),
            ops.softmax_cross_entropy_backward(g, x, y, wt, fwd[2], fwd[1], -100, label_smoothing, reduction), **half)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
# (classes, MAX_BLOCK_C, ELEMS): tiles of several rows, one class step or several, a partial
# last row block and class step; one class; a row a program. MAX_BLOCK_C 0: the rows as class
# planes (PLANES_MAX_C) in blocks of ELEMS positions (a partial last one; UNROLL 4: 19 and 5
# classes end in a partial class step)
@pytest.mark.parametrize("classes,cap,elems", [(7, 1024, 64), (19, 8, 64), (1, 1024, 16), (5, 4, 4), (19, 0, 16),
                                               (5, 0, 16), (1, 0, 16)])
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's max of a NaN row
def test_triton_cross_entropy_interpreter_row_tiles(monkeypatch, dtype, classes, cap, elems):
    from pyvision_ops.kernels import cross_entropy as K

    if cap:
        monkeypatch.setitem(K.CE_ROWS_CONFIG, "MAX_BLOCK_C", cap)
        monkeypatch.setitem(K.CE_ROWS_CONFIG, "ELEMS", elems)
    else:
        monkeypatch.setitem(K.CE_ROWS_CONFIG, "PLANES_MAX_C", 32)
        monkeypatch.setitem(K.CE_CONFIG, "BLOCK", elems)
    x, y, w = batch((37, classes, 1), dtype=dtype)
    x[3, 0] = float("-inf")  # a row's max from a later class (with one class: a NaN row, both)
    x[8, classes // 2] = float("nan")  # a NaN loss and gradient row, both
    close = dict(rtol=1e-5, atol=1e-6, equal_nan=True)
    half = dict(close, rtol=1e-3, atol=1e-3) if dtype == torch.float16 else close
    finite = torch.arange(37) != 8  # the NaN row's max: whichever the max keeps
    bad = y.clone()
    bad[5, 0] = classes  # outside [0, C): NaN on CUDA (no read), the CPU raises
    for wt, ls in ((None, 0.0), (w.to(dtype), 0.2)):
        for reduction in (0, 1, 2):  # none, mean, sum
            want = ops.softmax_cross_entropy(x, y, wt, -100, ls, reduction)
            got = K.softmax_cross_entropy(x, y, wt, -100, ls, reduction)
            torch.testing.assert_close(got[:2], want[:2], **close)
            torch.testing.assert_close(got[2][:, finite], want[2][:, finite], **close)
            g = torch.rand(want[0].shape, dtype=want[2].dtype) + 0.5
            gk = K.softmax_cross_entropy_backward(g, x, y, wt, got[2], got[1], -100, ls, reduction)
            torch.testing.assert_close(
                gk, ops.softmax_cross_entropy_backward(g, x, y, wt, want[2], want[1], -100, ls, reduction), **half)
        loss, wsum, stats = K.softmax_cross_entropy(x, bad, wt, -100, ls, 0)
        gk = K.softmax_cross_entropy_backward(torch.ones_like(loss), x, bad, wt, stats, wsum, -100, ls, 0)
        want = ops.softmax_cross_entropy(x, y, wt, -100, ls, 0)
        assert loss[5].isnan() and gk[5].isnan().all()
        rest = torch.arange(37) != 5
        torch.testing.assert_close(loss[rest], want[0][rest], **close)
        torch.testing.assert_close(gk[rest], ops.softmax_cross_entropy_backward(
            torch.ones_like(loss), x, y, wt, want[2], want[1], -100, ls, 0)[rest], **half)


@pytest.mark.interpreter
@pytest.mark.parametrize("elems", [8, 16])  # a row a program; two, the last program's second past N
def test_triton_cross_entropy_interpreter_collapsed_partial_sums(monkeypatch, elems):
    """More partial sums than the reduce program takes: collapse launches add them first, over
    levels here (37 or 19 parts, 4 at a time)."""
    from pyvision_ops.kernels import cross_entropy as K

    monkeypatch.setattr(K, "_REDUCE", 4)
    monkeypatch.setattr(K, "_COLLAPSE", 4)
    monkeypatch.setitem(K.CE_ROWS_CONFIG, "ELEMS", elems)
    x, y, w = batch((37, 5, 1))
    for wt in (None, w):
        for reduction in (1, 2):
            got = K.softmax_cross_entropy(x, y, wt, -100, 0.1, reduction)
            want = ops.softmax_cross_entropy(x, y, wt, -100, 0.1, reduction)
            torch.testing.assert_close(got[:2], want[:2], rtol=1e-12, atol=1e-12)


@pytest.mark.interpreter
# STAGES 3: the option reaches the kernel (the interpreter runs a pipelined loop as a plain
# one; the GPU variant test and the sm_90 compile check the pipelining itself)
@pytest.mark.parametrize("unroll,stages,gather", [(1, 1, True), (2, 1, True), (4, 1, True), (2, 3, True),
                                                 (1, 1, False), (4, 1, False)])
@pytest.mark.parametrize("classes", [7, 4, 1])  # a tail of 1 or 3 planes, none, only the tail
def test_triton_cross_entropy_interpreter_unrolled_class_loop(monkeypatch, unroll, stages, gather, classes):
    from pyvision_ops.kernels import cross_entropy as K

    monkeypatch.setitem(K.CE_CONFIG, "UNROLL", unroll)
    monkeypatch.setitem(K.CE_CONFIG, "STAGES", stages)
    monkeypatch.setitem(K.CE_CONFIG, "GATHER", gather)
    monkeypatch.setitem(K.CE_TILE_CONFIG, "MAX_C", 0)  # the plain class loop
    x, y, w = batch((2, classes, 45))
    for wt, ls in ((None, 0.0), (w, 0.3)):
        for reduction in (0, 1):
            fwd = ops.softmax_cross_entropy(x, y, wt, -100, ls, reduction)
            got = K.softmax_cross_entropy(x, y, wt, -100, ls, reduction)
            for a, b in zip(got, fwd):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            g = torch.rand(fwd[0].shape, dtype=torch.float64) + 0.5
            torch.testing.assert_close(K.softmax_cross_entropy_backward(g, x, y, wt, *got[2:0:-1], -100, ls, reduction),
                                       ops.softmax_cross_entropy_backward(g, x, y, wt, fwd[2], fwd[1], -100, ls,
                                                                          reduction), rtol=1e-12, atol=1e-12)


@pytest.mark.interpreter
@pytest.mark.parametrize("classes", [1, 5, 16, 19, 32, 33])  # a tile of 1, padded, full; past MAX_C: the loop
# one tile, or tiles of 4 classes (the last one padded for 5, 19); the target's logit loaded
# (GATHER) or picked by a compare
@pytest.mark.parametrize("dtype,block_c,gather", [(d, b, True) for d in (torch.float64, torch.float32, torch.bfloat16)
                                                  for b in (32, 4)] + [(torch.float32, b, False) for b in (32, 4)],
                         ids=str)
def test_triton_cross_entropy_interpreter_class_tile(monkeypatch, classes, dtype, block_c, gather):
    from pyvision_ops.kernels import cross_entropy as K

    monkeypatch.setitem(K.CE_TILE_CONFIG, "MAX_C", 32)
    monkeypatch.setitem(K.CE_TILE_CONFIG, "BLOCK_C", block_c)
    monkeypatch.setitem(K.CE_TILE_CONFIG, "GATHER", gather)
    monkeypatch.setitem(K.CE_TILE_CONFIG, "ELEMS", 256)  # several programs, a partial last one
    x, y, w = batch((2, classes, 45))
    x = x.to(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for wt, ls in ((None, 0.0), (w, 0.3)):
        for reduction in (0, 1, 2):
            fwd = ops.softmax_cross_entropy(x, y, wt, -100, ls, reduction)
            got = K.softmax_cross_entropy(x, y, wt, -100, ls, reduction)
            for a, b in zip(got, fwd):
                torch.testing.assert_close(a, b, **tol)
            g = torch.rand(fwd[0].shape, dtype=fwd[2].dtype) + 0.5
            torch.testing.assert_close(
                K.softmax_cross_entropy_backward(g, x, y, wt, fwd[2], fwd[1], -100, ls, reduction).float(),
                ops.softmax_cross_entropy_backward(g, x, y, wt, fwd[2], fwd[1], -100, ls, reduction).float(),
                **(tol if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)))


@pytest.mark.interpreter
@pytest.mark.parametrize("per_sm", [1, 2, 3])
@pytest.mark.parametrize("tile", [0, 32, 4])  # plain, one class tile, tiles of 4 classes
def test_triton_cross_entropy_interpreter_programs_loop_over_blocks(monkeypatch, per_sm, tile):
    # PER_SM: fewer programs than blocks (4 "multiprocessors" off CUDA), each taking blocks a
    # grid apart; the partial sums stay one per block, so every output is the same bit for bit
    from pyvision_ops.kernels import cross_entropy as K

    monkeypatch.setitem(K.CE_CONFIG, "BLOCK", 16)
    monkeypatch.setitem(K.CE_TILE_CONFIG, "ELEMS", 16 * min(tile or 8, 8))  # 16 positions: tiles of 8 or 4 classes
    monkeypatch.setitem(K.CE_TILE_CONFIG, "MAX_C", 32 if tile else 0)
    if tile:
        monkeypatch.setitem(K.CE_TILE_CONFIG, "BLOCK_C", tile)
    x, y, w = batch((3, 5, 45))  # 3 blocks an image: 9, more than 4 * per_sm programs but for 3
    for wt, ls, reduction in ((None, 0.0, 1), (w, 0.3, 0), (w, 0.0, 2)):
        want = K.softmax_cross_entropy(x, y, wt, -100, ls, reduction)
        g = torch.rand(want[0].shape, dtype=torch.float64) + 0.5
        want_dz = K.softmax_cross_entropy_backward(g, x, y, wt, want[2], want[1], -100, ls, reduction)
        with monkeypatch.context() as mp:
            mp.setitem(K.CE_TILE_CONFIG if tile else K.CE_CONFIG, "PER_SM", per_sm)
            assert K._launch("op", 5, 45, 3, x.device)[2] == (min(9, 4 * per_sm),)
            got = K.softmax_cross_entropy(x, y, wt, -100, ls, reduction)
            got_dz = K.softmax_cross_entropy_backward(g, x, y, wt, got[2], got[1], -100, ls, reduction)
        for a, b in zip((*got, got_dz), (*want, want_dz)):
            assert torch.equal(a, b)


@pytest.mark.interpreter
def test_triton_cross_entropy_interpreter_tile_forward_plain_backward(monkeypatch):
    # CE_TILE_CONFIG["BACKWARD"] False: the forward takes the tiles, the backward the plain
    # kernel, bit for bit what each gives on its own
    from pyvision_ops.kernels import cross_entropy as K

    x, y, w = batch((2, 7, 45))
    g = torch.rand(2, 45, dtype=torch.float64) + 0.5
    plain_dz = K.softmax_cross_entropy_backward(g, x, y, w, *K.softmax_cross_entropy(x, y, w, -100, 0.3, 0)[2:0:-1],
                                                -100, 0.3, 0)
    monkeypatch.setitem(K.CE_TILE_CONFIG, "MAX_C", 32)
    monkeypatch.setitem(K.CE_TILE_CONFIG, "BLOCK_C", 4)
    tiles = K.softmax_cross_entropy(x, y, w, -100, 0.3, 0)
    monkeypatch.setitem(K.CE_TILE_CONFIG, "BACKWARD", False)
    assert "BLOCK_C" in K._launch("op", 7, 45, 2, x.device)[0]
    assert "BLOCK_C" not in K._launch("op", 7, 45, 2, x.device, True)[0]
    got = K.softmax_cross_entropy(x, y, w, -100, 0.3, 0)
    for a, b in zip(got, tiles):
        assert torch.equal(a, b)
    with monkeypatch.context() as mp:
        mp.setitem(K.CE_TILE_CONFIG, "MAX_C", 0)
        want_dz = K.softmax_cross_entropy_backward(g, x, y, w, got[2], got[1], -100, 0.3, 0)
    assert torch.equal(K.softmax_cross_entropy_backward(g, x, y, w, got[2], got[1], -100, 0.3, 0), want_dz)
    torch.testing.assert_close(want_dz, plain_dz, rtol=1e-12, atol=1e-12)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max of a tile column holding only NaN
@pytest.mark.parametrize("block_c", [32, 2, 1])
def test_triton_cross_entropy_interpreter_class_tile_special_values(monkeypatch, block_c):
    # -inf logits (first class, last, all), +inf and NaN, and targets outside the classes
    # (6: inside the padding of a tile of 8 for 5 classes) give what the plain kernel gives,
    # with the classes in one tile or in tiles merged one after another (a tile all -inf,
    # the running max -inf, a larger max later)
    from pyvision_ops.kernels import cross_entropy as K

    for x, y in _special_tile_cases():
        g = torch.rand(y.shape, dtype=torch.float64) + 0.5
        for ls in (0.0, 0.2):
            for w in (None, torch.linspace(0.5, 3, x.shape[1], dtype=torch.float64)):
                want, got = _plain_and_tiles(monkeypatch, block_c, K.softmax_cross_entropy,
                                             K.softmax_cross_entropy_backward, x, y, w, ls, g)
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)


def _plain_and_tiles(monkeypatch, block_c, forward, backward, x, y, w, ls, g):
    """(loss, wsum, stats, gradient) of `forward` and `backward` (reduction none) with the class
    tiles off, then on with tiles of at most block_c classes."""
    from pyvision_ops.kernels import cross_entropy as K

    out = []
    for tiles in (False, True):
        with monkeypatch.context() as mp:
            if tiles:
                mp.setitem(K.CE_TILE_CONFIG, "MAX_C", 32)
                mp.setitem(K.CE_TILE_CONFIG, "BLOCK_C", block_c)
            fwd = forward(x, y, w, -100, ls, 0)
            out.append((*fwd, backward(g, x, y, w, fwd[2], fwd[1], -100, ls, 0)))
    return out


def _special_tile_cases():
    """special_logits() with 4 classes and with a fifth (finite) one, targets 6 and -3 added."""
    x, y = special_logits()
    y = y.clone()
    y[1, 0], y[1, 1] = 6, -3
    x5 = torch.cat([x, torch.randn(2, 1, 6, generator=torch.Generator().manual_seed(3), dtype=x.dtype)], 1)
    return (x, y), (x5, y)


def special_logits():
    """[2, 4, 6] logits with -inf in the first class, in the last and in all classes of a
    position, +inf and NaN logits, and finite ones below fp32's range (-inf in fp32); targets
    avoid the -inf classes where one is finite."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([[2, 3, 1, 0, 2, 2], [0, 1, 0, 2, 0, 3]])
    inf = float("inf")
    x[0, 0, 0] = -inf
    x[0, :, 1] = -inf
    x[0, 2, 2] = inf
    x[0, 1, 3] = float("nan")
    x[1, 3, 4] = -inf
    x[1, :2, 5] = -inf
    x[1, :, 2] = torch.tensor([-1e300, -2e300, -3e300, -1e300], dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.2), dict(weight=torch.tensor([1.0, 2, 0.5, 3]))],
                         ids=str)
def test_special_logits_match_torch(kw):
    # -inf logits leave the loss finite (with no label smoothing) and NaN/+inf give NaN, as in
    # torch; 0 * inf in an unused smoothing term or a NaN lost in exp/log must not appear.
    x, y = special_logits()
    x = x.requires_grad_()
    kw = {k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}
    ours = P.softmax_cross_entropy(x, y, reduction="none", **kw)
    ref = F.cross_entropy(x, y, reduction="none", **kw)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    fin = torch.isfinite(ref)
    assert fin.sum() >= 6
    g_ours, g_ref = (torch.autograd.grad(v[fin].sum(), [x])[0] for v in (ours, ref))
    torch.testing.assert_close(g_ours, g_ref, equal_nan=True)
    x4 = x.detach().reshape(2, 4, 2, 3)
    y4 = torch.zeros(2, 4, 6, dtype=torch.long)
    torch.testing.assert_close(
        P.upsample_cross_entropy(x4, y4, reduction="none", **kw),
        F.cross_entropy(F.interpolate(x4, size=(4, 6), mode="bilinear"), y4, reduction="none", **kw), equal_nan=True)


def shifted_logits(offset):
    """fp32 logits of spread ~3 around `offset` and targets in [0, 10)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(512, 10, generator=g, dtype=torch.float64) * 3 + offset).float()
    return x, torch.randint(0, 10, (512,), generator=g)


def _loss_and_grad(fn, x, y, **kw):
    x = x.detach().requires_grad_()
    loss = fn(x, y, reduction="none", **kw)
    return loss.detach().double(), torch.autograd.grad(loss.sum(), [x])[0].double()


@pytest.mark.parametrize("offset", [0.0, 1e4])
@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.1, weight=torch.linspace(0.5, 2, 10))], ids=str)
def test_fp32_precision_at_large_logits(offset, kw):
    # Differences are taken from the max logit, not from max + log(sum): at logits ~1e4 the
    # latter rounded log(sum) away (gradient errors of 4e-4; equal logits of 1e8 gave loss 0).
    x, y = shifted_logits(offset)
    ref_l, ref_g = _loss_and_grad(F.cross_entropy, x.double(), y, **{k: v.double() if torch.is_tensor(v) else v
                                                                     for k, v in kw.items()})
    ours_l, ours_g = _loss_and_grad(P.softmax_cross_entropy, x, y, **kw)
    fp32_l, fp32_g = _loss_and_grad(F.cross_entropy, x, y, **kw)  # torch's own fp32 error is the bar
    assert (ours_l - ref_l).abs().max() <= 3 * (fp32_l - ref_l).abs().max() + 1e-7
    assert (ours_g - ref_g).abs().max() <= 3 * (fp32_g - ref_g).abs().max() + 1e-7


def test_sum_past_fp32_range_is_inf():
    # losses of 3e38 sum (in fp64) past fp32's range: inf, as torch's; the mean stays finite
    # (torch's fp32 sum overflows first: inf)
    x = torch.zeros(1, 2, 4)
    x[0, 1] = 3e38
    y = torch.zeros(1, 4, dtype=torch.long)
    assert P.softmax_cross_entropy(x, y, reduction="sum").item() == float("inf") == F.cross_entropy(
        x, y, reduction="sum").item()
    assert P.softmax_cross_entropy(x, y).item() == pytest.approx(3e38)
    x4 = x.reshape(1, 2, 2, 2)
    assert P.upsample_cross_entropy(x4, torch.zeros(1, 3, 3, dtype=torch.long), reduction="sum").item() == float("inf")


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's fp32 store
def test_triton_sum_past_fp32_range_is_inf():
    from pyvision_ops.kernels import cross_entropy as K

    x = torch.zeros(1, 2, 4)
    x[0, 1] = 3e38
    y = torch.zeros(1, 4, dtype=torch.long)
    for red in (1, 2):
        for a, b in zip(K.softmax_cross_entropy(x, y, None, -100, 0.0, red)[:2],
                        ops.softmax_cross_entropy(x, y, None, -100, 0.0, red)[:2]):
            torch.testing.assert_close(a, b)


def test_full_label_smoothing_leaves_out_the_target_term():
    # label_smoothing=1.0 gives the target term a factor 0: left out, so a -inf target logit
    # makes the loss inf (the smoothing term's), where torch's 0 * inf makes it NaN. Same gradients.
    x = torch.tensor([[float("-inf"), 0.5, 1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0])
    ours, ref = P.softmax_cross_entropy(x, y, label_smoothing=1.0), F.cross_entropy(x, y, label_smoothing=1.0)
    assert ours.item() == float("inf") and ref.isnan()
    torch.testing.assert_close(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0])


def test_equal_huge_logits_give_log_c():
    z = torch.full((1, 3, 2, 2), 1e8)
    y3 = torch.zeros(1, 2, 2, dtype=torch.long)
    assert abs(P.softmax_cross_entropy(z, y3).item() - math.log(3)) < 1e-6
    assert abs(P.upsample_cross_entropy(z, y3).item() - math.log(3)) < 1e-6
    g = torch.autograd.grad(P.softmax_cross_entropy(z.requires_grad_(), y3, reduction="sum"), [z])[0]
    torch.testing.assert_close(g[0, :, 0, 0], torch.tensor([-2 / 3, 1 / 3, 1 / 3]))


@pytest.mark.interpreter
def test_expanded_and_reduced_loss_gradients():
    # A summed "none" loss hands the backward an expanded scalar, read in place; the sum's 0-d
    # gradient g and the mean's g (divided by wsum) give what a full map of g (of g / wsum) gives.
    from pyvision_ops.kernels import cross_entropy as K

    x, y, w = batch((2, 7, 5, 9), ignore=3)
    x3, y2 = x.reshape(2, 7, 45), y.reshape(2, 45)
    x4, y3 = x, torch.randint(0, 7, (2, 8, 11), generator=torch.Generator().manual_seed(4))
    g = torch.tensor(0.7, dtype=torch.float64)
    for impl in (ops, K):
        for fwd, bwd, args in ((impl.softmax_cross_entropy, impl.softmax_cross_entropy_backward, (x3, y2)),
                               (impl.upsample_cross_entropy, impl.upsample_cross_entropy_backward, (x4, y3, False))):
            _, wsum, stats = fwd(*args, w, 3, 0.1, 0)
            full = torch.full(stats.shape[1:], 0.7, dtype=torch.float64)
            want = bwd(full, *args, w, stats, wsum, 3, 0.1, 0)
            one = g.expand(full.shape)
            torch.testing.assert_close(bwd(one, *args, w, stats, wsum, 3, 0.1, 0), want, rtol=0, atol=0)
            torch.testing.assert_close(bwd(g, *args, w, stats, wsum, 3, 0.1, 2), want)
            torch.testing.assert_close(bwd(g, *args, w, stats, wsum, 3, 0.1, 1),
                                       bwd(full / wsum, *args, w, stats, wsum, 3, 0.1, 0))
            # wsum 0 with targets that are not ignored (zero-weight classes): not finite, as torch's;
            # ignored positions 0
            d = bwd(g, *args, w, stats, torch.zeros_like(wsum), 3, 0.1, 1)
            if fwd is impl.softmax_cross_entropy:
                valid = (args[1] != 3).unsqueeze(1).expand_as(d)
                assert not torch.isfinite(d[valid]).any() and (d[~valid] == 0).all()
            else:
                assert not torch.isfinite(d).all()


@pytest.mark.interpreter
def test_triton_cross_entropy_interpreter_large_logits(ce_kernels):
    from pyvision_ops.kernels import cross_entropy as K

    x, y = shifted_logits(1e4)
    x3, y2 = x.T[None].contiguous(), y[None]
    w = torch.linspace(0.5, 2, 10)
    for wt, ls in ((None, 0.0), (w, 0.1)):
        ref, ref_g = _loss_and_grad(F.cross_entropy, x.double(), y, weight=None if wt is None else wt.double(),
                                    label_smoothing=ls)
        loss, wsum, stats = K.softmax_cross_entropy(x3, y2, wt, -100, ls, 0)
        fp32_l, fp32_g = _loss_and_grad(F.cross_entropy, x, y, weight=wt, label_smoothing=ls)
        assert (loss[0].double() - ref).abs().max() <= 3 * (fp32_l - ref).abs().max() + 1e-7
        g = K.softmax_cross_entropy_backward(torch.ones(1, 512), x3, y2, wt, stats, wsum, -100, ls, 0)
        assert (g[0].T.double() - ref_g).abs().max() <= 3 * (fp32_g - ref_g).abs().max() + 1e-7
    z = torch.full((1, 3, 2, 2), 1e8)
    y3 = torch.zeros(1, 2, 2, dtype=torch.long)
    loss, wsum, stats = K.upsample_cross_entropy(z, y3, False, None, -100, 0.0, 0)
    torch.testing.assert_close(loss, torch.full((1, 2, 2), math.log(3)))
    g = K.upsample_cross_entropy_backward(torch.ones(1, 2, 2), z, y3, False, None, stats, wsum, -100, 0.0, 0)
    torch.testing.assert_close(g[0, :, 0, 0], torch.tensor([-2 / 3, 1 / 3, 1 / 3]))


@pytest.mark.interpreter
def test_triton_cross_entropy_interpreter_no_classes():
    # C = 0 reaches the ops only by a direct call (the fronts need a class): no division by C
    from pyvision_ops.kernels import cross_entropy as K

    for s in (3, 1):
        x, y = torch.zeros(2, 0, s), torch.full((2, s), -100)
        fwd = K.softmax_cross_entropy(x, y, None, -100, 0.1, 1)
        for a, b in zip(fwd[:2], ops.softmax_cross_entropy(x, y, None, -100, 0.1, 1)[:2]):
            torch.testing.assert_close(a, b, equal_nan=True)
        dz = K.softmax_cross_entropy_backward(torch.ones(()), x, y, None, fwd[2], fwd[1], -100, 0.1, 1)
        assert dz.shape == x.shape
    x4, y4 = torch.zeros(1, 0, 2, 2), torch.full((1, 4, 4), -100)
    fwd = K.upsample_cross_entropy(x4, y4, False, None, -100, 0.1, 2)
    assert fwd[0].item() == 0 and fwd[1].item() == 0
    dz = K.upsample_cross_entropy_backward(torch.ones(()), x4, y4, False, None, fwd[2], fwd[1], -100, 0.1, 2)
    assert dz.shape == x4.shape


@pytest.mark.interpreter
def test_triton_cross_entropy_interpreter_special_logits(ce_kernels):
    # The one-pass log-sum-exp gives what two passes give: -inf logits (in the first class,
    # in the last, in all), +inf and NaN logits.
    from pyvision_ops.kernels import cross_entropy as K

    x, y = special_logits()
    rows = x.transpose(1, 2).reshape(12, 4, 1), y.reshape(12, 1)  # the same positions as [N, C]
    for reduction in (0, 1):
        for logits in (x, x.float()):
            for a, b in zip(K.softmax_cross_entropy(logits, y, None, -100, 0.0, reduction),
                            ops.softmax_cross_entropy(logits, y, None, -100, 0.0, reduction)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
        for ls in (0.0, 0.2):
            fwd = ops.softmax_cross_entropy(*rows, None, -100, ls, reduction)
            ours = K.softmax_cross_entropy(*rows, None, -100, ls, reduction)
            for a, b in zip(ours[:2], fwd[:2]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
            g = torch.rand(fwd[0].shape, dtype=torch.float64)
            torch.testing.assert_close(
                K.softmax_cross_entropy_backward(g, *rows, None, ours[2], ours[1], -100, ls, reduction),
                ops.softmax_cross_entropy_backward(g, *rows, None, fwd[2], fwd[1], -100, ls, reduction),
                rtol=1e-5, atol=1e-6, equal_nan=True)
    finite = torch.ones(2, 6, dtype=torch.bool)
    finite[0, 1:4] = False
    assert torch.isfinite(K.softmax_cross_entropy(x, y, None, -100, 0.0, 0)[2][:, finite]).all()
    x4, y4 = x.reshape(2, 4, 2, 3), torch.randint(0, 4, (2, 4, 6), generator=torch.Generator().manual_seed(2))
    for ls in (0.0, 0.2):
        fwd = ops.upsample_cross_entropy(x4, y4, False, None, -100, ls, 0)
        for a, b in zip(K.upsample_cross_entropy(x4, y4, False, None, -100, ls, 0), fwd):
            torch.testing.assert_close(a, b, equal_nan=True)
        g = torch.rand(2, 4, 6, dtype=torch.float64)
        torch.testing.assert_close(
            K.upsample_cross_entropy_backward(g, x4, y4, False, None, fwd[2], fwd[1], -100, ls, 0),
            ops.upsample_cross_entropy_backward(g, x4, y4, False, None, fwd[2], fwd[1], -100, ls, 0), equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# [N, C]: the row kernels, a row a program (1100 classes) or tiles of rows (19); channels_last:
# the row tiles on the positions
@pytest.mark.parametrize("shape", [(2, 19, 64, 96), (3000, 1100), (5001, 19), "channels_last"], ids=str)
def test_cuda_cross_entropy_matches_cpu(dtype, shape):
    x, y, w = batch((2, 19, 64, 96) if shape == "channels_last" else shape, dtype=dtype, ignore=255)
    if shape == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for kw in (dict(), dict(weight=w.float(), label_smoothing=0.1)):
        xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
        assert xg.stride() == xc.stride() == x.stride()
        a = P.softmax_cross_entropy(xg, y.cuda(), ignore_index=255, **{k: v.cuda() if torch.is_tensor(v) else v
                                                                      for k, v in kw.items()})
        b = P.softmax_cross_entropy(xc, y, ignore_index=255, **kw)
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
        ga, gb = torch.autograd.grad(a, [xg])[0], torch.autograd.grad(b, [xc])[0]
        torch.testing.assert_close(ga.cpu(), gb, rtol=tol, atol=tol)
        assert ga.stride() == gb.stride()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", [("CE_CONFIG", "UNROLL", 1), ("CE_CONFIG", "UNROLL", 2),
                                     ("CE_TILE_CONFIG", "MAX_C", None), ("CE_TILE_CONFIG", "BLOCK_C", 8),
                                     ("CE_CONFIG", "PER_SM", 1), ("CE_CONFIG", "STAGES", 3),
                                     ("CE_TILE_CONFIG", "STAGES", 3), ("CE_TILE_CONFIG", "BACKWARD", False),
                                     ("CE_CONFIG", "GATHER", True), ("CE_TILE_CONFIG", "GATHER", True)], ids=str)
def test_cuda_cross_entropy_variants_match_the_default(variant, monkeypatch):
    # the tuner's variants compute what the default does, on the GPU's own compile (the
    # class tile adds the exponentials in another order; None: the tile switched on if it is
    # off by default, else off; the CE_CONFIG variants with the tiles off; BLOCK_C 8: the tile
    # on, 19 classes in 3 tiles; PER_SM with 4 multiprocessors: 4 programs for 12 blocks;
    # STAGES 3: the class loop pipelined, of the plain kernels or of tiles of 4; BACKWARD
    # False: tiles of 4 forward, a plain backward; GATHER True: the target's logit loaded)
    from pyvision_ops.kernels import cross_entropy as K

    config, key, value = variant
    if value is None:
        value = 32 if K.CE_TILE_CONFIG["MAX_C"] == 0 else 0
    x, y, w = batch((2, 19, 64, 96), dtype=torch.float32, ignore=255)
    z, t = x.reshape(2, 19, -1).cuda(), y.reshape(2, -1).cuda()
    for wt, ls in ((None, 0.0), (w.float().cuda(), 0.1)):
        for reduction in (0, 1):
            want = ops.softmax_cross_entropy(z, t, wt, 255, ls, reduction)
            g = torch.ones(want[0].shape, device="cuda")
            want_dz = ops.softmax_cross_entropy_backward(g, z, t, wt, want[2], want[1], 255, ls, reduction)
            with monkeypatch.context() as mp:
                mp.setitem(getattr(K, config), key, value)
                if key == "PER_SM":
                    mp.setattr(K, "_multiprocessors", lambda device: 4)
                if config == "CE_CONFIG":
                    mp.setitem(K.CE_TILE_CONFIG, "MAX_C", 0)
                if config == "CE_TILE_CONFIG" and key != "MAX_C":
                    mp.setitem(K.CE_TILE_CONFIG, "MAX_C", 32)
                    mp.setitem(K.CE_TILE_CONFIG, "BLOCK_C", value if key == "BLOCK_C" else 4)
                got = ops.softmax_cross_entropy(z, t, wt, 255, ls, reduction)
                got_dz = ops.softmax_cross_entropy_backward(g, z, t, wt, got[2], got[1], 255, ls, reduction)
                # and the forward that writes the gradient too (for a loss gradient of 1)
                fused = ops.softmax_cross_entropy_with_grad(z, t, wt, 255, ls, 1) if reduction else None
            for a, b in zip((*got, got_dz), (*want, want_dz)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            for a, b in zip(fused or (), (*want, want_dz)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_training_step_gradient_in_the_forward(dtype, monkeypatch):
    # the training step with the gradient written in the forward (CUDA's default) against the
    # two ops, scaled by 0.5 and then again by 1 on the retained graph
    from pyvision_ops import cross_entropy as CE

    x, y, w = batch((2, 19, 64, 96), dtype=dtype, ignore=255)
    xg, yg, wg = x.cuda(), y.cuda(), w.float().cuda()
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
    for kw in (dict(ignore_index=255), dict(ignore_index=255, weight=wg, label_smoothing=0.1, reduction="sum")):
        steps = []
        for devices in (("cuda",), ()):
            monkeypatch.setattr(CE, "FUSED_GRAD_DEVICES", devices)
            xr = xg.clone().requires_grad_()
            loss = P.softmax_cross_entropy(xr, yg, **kw)
            assert ("with_grad" in type(loss.grad_fn).__name__) == bool(devices)
            (loss * 0.5).backward(retain_graph=True)
            first = xr.grad.clone()
            loss.backward()
            steps.append((loss, first, xr.grad))
        for a, b in zip(*steps):
            torch.testing.assert_close(a, b, **tol)
    h = torch.randn(3, 10000, device="cuda").to(dtype)
    k = h.clone()
    ops.scale_grad_(k, torch.ones((), device="cuda"))
    assert torch.equal(k, h)
    ops.scale_grad_(k, torch.tensor(3.0, device="cuda"))
    assert torch.equal(k, (h.float() * 3).to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("block_c", [4, 1])
def test_cuda_cross_entropy_class_tiles_special_values(block_c, monkeypatch):
    # on the GPU's own code (a max that may skip NaN, exponentials flushed below 2^-126), tiles
    # merged one after another (few compiles: the GPU check has a time budget): the
    # special values of the interpreter test, and logits 100 apart (terms that flush), in
    # fp32, give what the plain kernels give
    spread = torch.arange(5, dtype=torch.float64).repeat(2, 6, 1).permute(0, 2, 1) * -100.0
    cases = [*_special_tile_cases(), (spread, torch.tensor([[0, 1, 2, 3, 4, 0]] * 2))]
    for x, y in cases:
        z, t = x.float().cuda(), y.cuda()
        g = torch.ones(t.shape, device="cuda")
        for ls in (0.0, 0.2):
            want, got = _plain_and_tiles(monkeypatch, block_c, ops.softmax_cross_entropy,
                                         ops.softmax_cross_entropy_backward, z, t, None, ls, g)
            # stats[0] (the max) of a position holding NaN depends on how a max treats NaN
            for a, b in zip((got[0], got[1], got[2][1], got[3]), (want[0], want[1], want[2][1], want[3])):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.gpu
def test_cuda_cross_entropy_precision_at_large_logits():
    x, y = shifted_logits(1e4)
    w = torch.linspace(0.5, 2, 10)
    for kw in (dict(), dict(label_smoothing=0.1, weight=w)):
        ref_l, ref_g = _loss_and_grad(F.cross_entropy, x.double(), y, **{k: v.double() if torch.is_tensor(v) else v
                                                                         for k, v in kw.items()})
        fp32_l, fp32_g = _loss_and_grad(F.cross_entropy, x, y, **kw)
        ours_l, ours_g = _loss_and_grad(P.softmax_cross_entropy, x.cuda(), y.cuda(),
                                        **{k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()})
        assert (ours_l.cpu() - ref_l).abs().max() <= 3 * (fp32_l - ref_l).abs().max() + 1e-7
        assert (ours_g.cpu() - ref_g).abs().max() <= 3 * (fp32_g - ref_g).abs().max() + 1e-7


@pytest.mark.gpu
# [1, 2, 2^30 + 7]: 2^31 + 14 logits, the offset of class plane c (c * S) does not fit in 32
# bits; [2^27 + 3, 17] (the row tiles): 2^31 + 51, nor do the last tiles' (r0 * C)
@pytest.mark.parametrize("shape", [(1, 2, 2**30 + 7), (2**27 + 3, 17)], ids=["class_planes", "row_tiles"])
def test_cuda_cross_entropy_past_2_31_logits(shape):
    if torch.cuda.get_device_properties(0).total_memory < 60 * 2**30:
        pytest.skip("needs 60 GiB of GPU memory")
    c, n = shape[1], shape[-1] if len(shape) == 3 else shape[0]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=torch.float16, generator=g).requires_grad_()
    y = torch.randint(0, c, shape[:1] + shape[2:], device="cuda", generator=g)
    loss = P.softmax_cross_entropy(x, y, reduction="none")
    at = (lambda i: (Ellipsis, i)) if len(shape) == 3 else (lambda i: (i,))  # positions: last dim, or rows
    tail, rest = at(slice(n - 5, n)), at(slice(0, n - 5))
    xt, yt = x.detach()[tail].float(), y[..., n - 5:]
    torch.testing.assert_close(loss[..., n - 5:], F.cross_entropy(xt, yt, reduction="none"))
    (dx,) = torch.autograd.grad(loss[..., n - 5:].sum(), [x])
    ref = torch.softmax(xt, 1) - F.one_hot(yt, c).movedim(-1, 1)
    torch.testing.assert_close(dx[tail].float(), ref, rtol=2e-3, atol=2e-3)
    assert not dx[rest].any()
    del x, loss, dx
    torch.cuda.empty_cache()


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("weighted_smoothing", [False, True])
@pytest.mark.parametrize("sizes", [((4, 5), (9, 11)), ((2, 3), (5, 200)), ((6, 9), (4, 5))], ids=str)
def test_triton_upsample_ce_interpreter(dtype, align_corners, weighted_smoothing, sizes):
    from pyvision_ops.kernels import cross_entropy as K

    (lh, lw), (H, W) = sizes
    x, _, w = batch((2, 3, lh, lw), dtype=dtype)
    y = torch.randint(0, 3, (2, H, W), generator=torch.Generator().manual_seed(5))
    y[0, :2] = -100
    wt, ls = (w.to(dtype), 0.2) if weighted_smoothing else (None, 0.0)
    half = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)  # fp16 gradient
    # The mean for weighted smoothing, none otherwise.
    reduction = 1 if weighted_smoothing else 0
    fwd_k = K.upsample_cross_entropy(x, y, align_corners, wt, -100, ls, reduction)
    fwd_c = ops.upsample_cross_entropy(x, y, align_corners, wt, -100, ls, reduction)
    for a, b in zip(fwd_k, fwd_c):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    g = torch.rand(fwd_c[0].shape, dtype=fwd_c[2].dtype) + 0.5
    torch.testing.assert_close(
        K.upsample_cross_entropy_backward(g, x, y, align_corners, wt, fwd_c[2], fwd_c[1], -100, ls, reduction),
        ops.upsample_cross_entropy_backward(g, x, y, align_corners, wt, fwd_c[2], fwd_c[1], -100, ls, reduction),
        **half)


@pytest.mark.interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_triton_non_finite_class_weight_reaches_only_its_targets(bad):
    # test_non_finite_class_weight_reaches_only_its_targets for the Triton backward kernels
    # (positions, rows of classes, upsampled), against the CPU ops
    from pyvision_ops.kernels import cross_entropy as K

    for shape in ((2, 4, 30), (9, 4, 1)):
        x, y, w = _nan_weight_case(shape, bad, targeted=False)
        fwd = ops.softmax_cross_entropy(x, y, w, 255, 0.0, 0)
        g = torch.rand(fwd[0].shape, dtype=torch.float64) + 0.5
        got = K.softmax_cross_entropy_backward(g, x, y, w, fwd[2], fwd[1], 255, 0.0, 0)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ops.softmax_cross_entropy_backward(g, x, y, w, fwd[2], fwd[1], 255, 0.0, 0),
                                   rtol=1e-12, atol=1e-12)
    x, y, w = _nan_weight_case((2, 4, 3, 4), bad, targeted=False)
    y = y.repeat_interleave(2, 1).repeat_interleave(2, 2)
    fwd = ops.upsample_cross_entropy(x, y, False, w, 255, 0.0, 2)
    got = K.upsample_cross_entropy_backward(torch.ones(()), x, y, False, w, fwd[2], fwd[1], 255, 0.0, 2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ops.upsample_cross_entropy_backward(torch.ones(()), x, y, False, w, fwd[2],
                                                                        fwd[1], 255, 0.0, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(2, 5, 7), (6, 5, 1)], ids=str)  # blocks of positions, rows of classes
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3, 1.0])
def test_triton_target_outside_classes_is_nan_not_an_index(shape, weighted, label_smoothing, ce_kernels):
    # The CUDA kernels cannot raise without a sync: such a target's loss and gradient are NaN
    # (the mean's everywhere), every other position as if it were ignored.
    from pyvision_ops.kernels import cross_entropy as K

    x, y, w = batch(shape)
    w = w if weighted else None
    y[0, 0], y[-1, -1] = 5, -3
    bad = (y == 5) | (y == -3)
    ignored = torch.where(bad, -100, y)
    want = ops.softmax_cross_entropy(x, ignored, w, -100, label_smoothing, 0)
    loss = K.softmax_cross_entropy(x, y, w, -100, label_smoothing, 0)[0]
    assert loss[bad].isnan().all()
    torch.testing.assert_close(loss[~bad], want[0][~bad])
    for reduction in (1, 2):
        fwd = K.softmax_cross_entropy(x, y, w, -100, label_smoothing, reduction)
        assert fwd[0].isnan()
        # the gradient of the sum is NaN at the bad targets, the mean's wherever a target counts
        # (its divisor is NaN); ignored positions keep their 0
        dz = K.softmax_cross_entropy_backward(torch.ones(()), x, y, w, fwd[2], fwd[1], -100, label_smoothing,
                                              reduction)
        assert torch.equal(dz.isnan(), (bad if reduction == 2 else y != -100).unsqueeze(1).expand_as(x))
    g = torch.rand(y.shape, dtype=torch.float64) + 0.5
    dz = K.softmax_cross_entropy_backward(g, x, y, w, want[2], want[1], -100, label_smoothing, 0)
    assert dz.movedim(1, -1)[bad].isnan().all()
    torch.testing.assert_close(dz.movedim(1, -1)[~bad], ops.softmax_cross_entropy_backward(
        g, x, ignored, w, want[2], want[1], -100, label_smoothing, 0).movedim(1, -1)[~bad])
    # upsampled: the loss map is NaN exactly there, and the gradient of the sum reaches NaN
    xu, _, _ = batch((2, 5, 3, 4))
    yu = torch.randint(0, 5, (2, 6, 8), generator=torch.Generator().manual_seed(3))
    yu[1, 2, 3] = 5
    fwd = K.upsample_cross_entropy(xu, yu, False, w, -100, label_smoothing, 0)
    assert fwd[0].isnan().nonzero().tolist() == [[1, 2, 3]]
    dx = K.upsample_cross_entropy_backward(torch.ones(()), xu, yu, False, w, fwd[2], fwd[1], -100,
                                           label_smoothing, 2)
    assert dx[1].isnan().any() and not dx[0].isnan().any()


@pytest.mark.interpreter
def test_triton_negative_zero_class_weight_keeps_its_sign(ce_kernels):
    from pyvision_ops.kernels import cross_entropy as K

    x, y, w = batch((2, 4, 9))
    w[1] = -0.0
    y[0, 1] = y[1, 3] = 1
    want = ops.softmax_cross_entropy(x, y, w, -100, 0.0, 0)[0]
    assert want.signbit().sum() == 2
    got = K.softmax_cross_entropy(x, y, w, -100, 0.0, 0)[0]
    torch.testing.assert_close(got, want)
    assert torch.equal(got.signbit(), want.signbit())


@pytest.mark.gpu
def test_cuda_target_outside_classes_gives_nan():
    x, y, _ = batch((2, 5, 6, 7), dtype=torch.float32)
    y[0, 1, 2] = 5
    xg = x.cuda().requires_grad_()
    # the mean's gradient is NaN wherever a target counts; ignored positions keep their 0
    loss = P.softmax_cross_entropy(xg, y.cuda())
    (g,) = torch.autograd.grad(loss, [xg])
    assert loss.isnan()
    assert torch.equal(g.isnan().cpu(), (y != -100).unsqueeze(1).expand_as(x))
    loss = P.upsample_cross_entropy(xg, y.cuda().repeat(1, 2, 2))
    (g,) = torch.autograd.grad(loss, [xg])
    assert loss.isnan() and g.isnan().any() and not g.isinf().any()
    assert P.softmax_cross_entropy(xg, y.cuda(), reduction="none").isnan().nonzero().tolist() == [[0, 1, 2]]


@pytest.mark.gpu
def test_cuda_upsample_ce_matches_cpu():
    x, _, w = batch((2, 19, 32, 64), dtype=torch.float32)
    g = torch.Generator().manual_seed(6)
    y = torch.randint(0, 19, (2, 256, 512), generator=g)
    y[torch.rand(y.shape, generator=g) < 0.1] = 255
    for kw in (dict(), dict(weight=w.float(), label_smoothing=0.1)):
        xc, xg = x.clone().requires_grad_(), x.cuda().requires_grad_()
        a = P.upsample_cross_entropy(xg, y.cuda(), ignore_index=255,
                                     **{k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()})
        b = P.upsample_cross_entropy(xc, y, ignore_index=255, **kw)
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-5)
        ga = torch.autograd.grad(a, [xg])[0]
        torch.testing.assert_close(ga.cpu(), torch.autograd.grad(b, [xc])[0], rtol=1e-3, atol=1e-7)
        assert torch.equal(ga, torch.autograd.grad(P.upsample_cross_entropy(
            xg, y.cuda(), ignore_index=255, **{k: v.cuda() if torch.is_tensor(v) else v for k, v in kw.items()}),
            [xg])[0])


def test_empty_batch_unbatched_shapes_and_weight_rules():
    for reduction in ("mean", "sum", "none"):
        for shape in ((0, 3), (0, 3, 4)):
            x = torch.randn(shape)
            y = torch.zeros((0,) + shape[2:], dtype=torch.long)
            torch.testing.assert_close(P.softmax_cross_entropy(x, y, reduction=reduction),
                                       F.cross_entropy(x, y, reduction=reduction), equal_nan=True)
    x, y = torch.randn(4, dtype=torch.float64), torch.tensor(1)
    ours = P.softmax_cross_entropy(x, y, reduction="none")
    assert ours.shape == () and torch.allclose(ours, F.cross_entropy(x, y, reduction="none"))
    with pytest.raises(ValueError, match="target"):
        P.softmax_cross_entropy(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="ignore_index"):
        P.softmax_cross_entropy(x, torch.tensor(1), ignore_index=2**70)
    with pytest.raises(TypeError, match="align_corners"):  # a string is not taken for True
        P.upsample_cross_entropy(torch.zeros(1, 3, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long), align_corners="no")
    with pytest.raises(ValueError, match="weight"):
        P.softmax_cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), weight=torch.rand(3, requires_grad=True))
    with torch.no_grad():  # no gradient wanted: allowed
        P.softmax_cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), weight=torch.rand(3, requires_grad=True))
    # Target weights summing to 0 under label smoothing: NaN as in torch (the smoothing sum alone is > 0)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 0, 0])
    w = torch.tensor([0.0, 1, 1, 1], dtype=torch.float64)
    assert torch.isnan(F.cross_entropy(x, y, weight=w, label_smoothing=0.2))
    assert torch.isnan(P.softmax_cross_entropy(x, y, weight=w, label_smoothing=0.2))
    x4, y4 = x.T.reshape(1, 4, 3, 1), y.reshape(1, 3, 1)
    assert torch.isnan(P.upsample_cross_entropy(x4, y4, weight=w, label_smoothing=0.2))


def test_double_backward_raises():
    x, y = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True), torch.randint(0, 4, (3, 5))
    for loss in (P.softmax_cross_entropy(x, y, reduction="sum"),
                 P.upsample_cross_entropy(x.reshape(3, 4, 5, 1), y.reshape(3, 5, 1), reduction="sum")):
        (g,) = torch.autograd.grad(loss, [x], create_graph=True)
        with pytest.raises(RuntimeError, match="derivative for pyvision_ops::.* is not implemented"):
            torch.autograd.grad(g.square().sum(), [x])


@pytest.mark.parametrize("fused", [False, True])
def test_compile_with_channels_last_logits(fused):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    if fused:
        y = torch.randint(0, 5, (2, 12, 14), generator=g)
        check_compiled_channels_last(lambda a: P.upsample_cross_entropy(a, y), z)
    else:
        y = torch.randint(0, 5, (2, 6, 7), generator=g)
        check_compiled_channels_last(lambda a: P.softmax_cross_entropy(a, y), z)


# ---------------------------------------------- the training step's gradient written in the forward

def _unit_step(x, y, w, ls, reduction, forward, backward):
    """(loss, wsum, stats, gradient for a loss gradient of 1) from the two ops."""
    fwd = forward(x, y, w, -100, ls, reduction)
    return (*fwd, backward(torch.ones((), dtype=fwd[0].dtype), x, y, w, fwd[2], fwd[1], -100, ls, reduction))


def test_with_grad_op_is_the_forward_and_a_unit_backward():
    x, y, w = batch((2, 5, 24))
    for wt, ls in ((None, 0.0), (w, 0.2)):
        for reduction in (1, 2):
            got = ops.softmax_cross_entropy_with_grad(x, y, wt, -100, ls, reduction)
            want = _unit_step(x, y, wt, ls, reduction, ops.softmax_cross_entropy, ops.softmax_cross_entropy_backward)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
            opcheck(ops.softmax_cross_entropy_with_grad, (x.clone().requires_grad_(), y, wt, -100, ls, reduction))
    with pytest.raises(RuntimeError, match="reduction must be 1"):
        ops.softmax_cross_entropy_with_grad(x, y, None, -100, 0.0, 0)
    g = torch.randn(3, 4, dtype=torch.float64)
    for scale in (1.0, 2.5, 0.0, float("nan")):
        h = g.clone()
        ops.scale_grad_(h, torch.tensor(scale, dtype=torch.float64))
        torch.testing.assert_close(h, g * scale, rtol=0, atol=0, equal_nan=True)
    opcheck(ops.scale_grad_, (g.clone(), torch.tensor(2.0, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match="0-d"):
        ops.scale_grad_(g, torch.ones(1))


@pytest.fixture
def grad_in_forward(monkeypatch):
    """CUDA's training step (softmax_cross_entropy_with_grad, then scale_grad_ in place) on
    the CPU too, whose op gives the same gradient in two passes."""
    from pyvision_ops import cross_entropy as CE

    monkeypatch.setattr(CE, "FUSED_GRAD_DEVICES", ("cpu", "cuda"))
    return CE


@pytest.mark.parametrize("kw", [dict(), dict(weight="w", label_smoothing=0.2, reduction="sum")], ids=str)
def test_training_step_takes_the_forwards_gradient(grad_in_forward, kw):
    x, y, w = batch((2, 5, 4, 6))
    kw = {k: w if v == "w" else v for k, v in kw.items()}
    xr = x.clone().requires_grad_()
    loss = P.softmax_cross_entropy(xr, y, **kw)
    assert type(loss.grad_fn).__name__ == "pyvision_ops_softmax_cross_entropy_with_gradBackward"
    dz = loss.grad_fn.dz.data_ptr()
    loss.backward()
    # the leaf's gradient is the forward's own buffer (no copy), which the node no longer holds
    assert xr.grad.data_ptr() == dz and loss.grad_fn.dz is None
    grad_in_forward.FUSED_GRAD_DEVICES = ()
    xp = x.clone().requires_grad_()
    plain = P.softmax_cross_entropy(xp, y, **kw)
    assert type(plain.grad_fn).__name__ == "pyvision_ops_softmax_cross_entropyBackward"
    plain.backward()
    assert torch.equal(loss, plain) and torch.equal(xr.grad, xp.grad)  # the CPU op: the same two passes
    ref = x.clone().requires_grad_()
    F.cross_entropy(ref, y, **kw).backward()
    torch.testing.assert_close(xr.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_training_step_scaled_retained_upstream_and_second_derivative(grad_in_forward):
    x, y, w = batch((2, 5, 24))
    xr = x.clone().requires_grad_()
    (unit,) = torch.autograd.grad(P.softmax_cross_entropy(xr, y, weight=w), [xr])
    loss = P.softmax_cross_entropy(xr, y, weight=w)
    (2.5 * loss).backward(retain_graph=True)  # the forward's gradient, scaled in place
    assert torch.equal(xr.grad, unit * 2.5)
    loss.backward()  # the same graph again: the backward op recomputes the gradient
    assert torch.equal(xr.grad, unit * 2.5 + unit)
    # logits computed from a leaf: the gradient flows on through their op
    (up,) = torch.autograd.grad(P.softmax_cross_entropy(xr * 3.0, y, weight=w), [xr])
    xs = (x * 3.0).requires_grad_()
    (g3,) = torch.autograd.grad(P.softmax_cross_entropy(xs, y, weight=w), [xs])
    assert torch.equal(up, g3 * 3.0)
    # batched loss gradients (vmap over the backward): the backward op
    (gb,) = torch.autograd.grad(P.softmax_cross_entropy(xr, y, weight=w), [xr],
                                grad_outputs=torch.tensor([1.0, -0.5], dtype=torch.float64), is_grads_batched=True)
    assert torch.equal(gb[0], unit) and torch.equal(gb[1], -0.5 * unit)
    # a graph of the backward (create_graph): the backward op, which refuses a second derivative
    (g,) = torch.autograd.grad(P.softmax_cross_entropy(xr, y, reduction="sum"), [xr], create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for pyvision_ops::.* is not implemented"):
        torch.autograd.grad(g.square().sum(), [xr])


def test_training_step_elsewhere_takes_the_two_ops(grad_in_forward):
    # reduction none (a map of loss gradients), no gradient wanted, fp16 logits (whose
    # unscaled gradient may underflow), [N, C] logits, saved-tensor hooks (checkpointing,
    # offloading: they could not reach the node's gradient), or under torch.compile
    x, y, w = batch((2, 5, 24))
    xr = x.clone().requires_grad_()
    plain = "pyvision_ops_softmax_cross_entropyBackward"
    assert type(P.softmax_cross_entropy(xr, y, reduction="none").grad_fn.next_functions[0][0]).__name__ == plain
    with torch.no_grad():
        assert P.softmax_cross_entropy(xr, y).grad_fn is None
    assert P.softmax_cross_entropy(x, y).grad_fn is None
    assert type(P.softmax_cross_entropy(x.half().requires_grad_(), y).grad_fn).__name__ == plain
    assert type(P.softmax_cross_entropy(xr[:, :, 0], y[:, 0]).grad_fn).__name__ == plain
    want = torch.autograd.grad(P.softmax_cross_entropy(xr, y, weight=w), [xr])[0]
    for hooks in (lambda: torch.autograd.graph.save_on_cpu(), lambda: torch.autograd.graph.saved_tensors_hooks(
            lambda t: t.clone(), lambda t: t)):
        with hooks():
            loss = P.softmax_cross_entropy(xr, y, weight=w)
        assert type(loss.grad_fn).__name__ == plain and torch.equal(torch.autograd.grad(loss, [xr])[0], want)
    from torch.utils.checkpoint import checkpoint

    names = []

    def inner(t):
        loss = P.softmax_cross_entropy(t * 1.0, y, weight=w)
        names.append(type(loss.grad_fn).__name__)
        return loss

    assert torch.equal(torch.autograd.grad(checkpoint(inner, xr, use_reentrant=False), [xr])[0], want)
    assert names[0] == plain

    def unknown(ignore_is_tracing):  # a torch that cannot say whether hooks are active
        raise RuntimeError("no hook stack here")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch._C._autograd, "_top_saved_tensors_default_hooks", unknown)
        assert type(P.softmax_cross_entropy(xr, y).grad_fn).__name__ == plain
    eager = torch.autograd.grad(P.softmax_cross_entropy(xr, y, weight=w), [xr])[0]
    f = torch.compile(lambda t: P.softmax_cross_entropy(t, y, weight=w), fullgraph=True)
    torch.testing.assert_close(torch.autograd.grad(f(xr), [xr])[0], eager, rtol=1e-12, atol=1e-12)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_triton_with_grad_interpreter(dtype, ce_kernels):
    # the gradient written in the forward's pass is bit for bit the backward's for a loss
    # gradient of 1, and the other outputs the forward's; then scaled in place
    from pyvision_ops.kernels import cross_entropy as K

    x, y, w = batch((2, 7, 45), dtype=dtype)
    for wt, ls in ((None, 0.0), (w.to(dtype), 0.3)):
        for reduction in (1, 2):
            got = K.softmax_cross_entropy_with_grad(x, y, wt, -100, ls, reduction)
            want = _unit_step(x, y, wt, ls, reduction, K.softmax_cross_entropy, K.softmax_cross_entropy_backward)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
            torch.testing.assert_close(got[3], ops.softmax_cross_entropy_with_grad(x, y, wt, -100, ls, reduction)[3],
                                       **(dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else {}))
    dz, acc = got[3], got[0].dtype
    for scale in (1.0, 0.75, float("nan")):
        h = dz.clone()
        K.scale_grad_(h, torch.tensor(scale, dtype=acc))
        torch.testing.assert_close(h, (dz.to(acc) * scale).to(dtype), rtol=0, atol=0, equal_nan=True)
        assert scale != 1.0 or torch.equal(h, dz)
    nc, empty = dz.clone().transpose(1, 2), dz[:0].clone()  # not the kernels' layout (torch's mul_), nothing
    K.scale_grad_(nc, torch.tensor(2.0, dtype=acc))
    K.scale_grad_(empty, torch.tensor(2.0, dtype=acc))
    assert torch.equal(nc, (dz.transpose(1, 2).to(acc) * 2).to(dtype)) and empty.shape == (0, 7, 45)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:All-NaN slice")  # the interpreter's max of a tile column holding only NaN
def test_triton_with_grad_interpreter_special_values_and_loops(monkeypatch, ce_kernels):
    # -inf, +inf and NaN logits, targets outside the classes (NaN), every target ignored (the
    # mean NaN, the gradient 0), one position, and programs looping over blocks (PER_SM)
    from pyvision_ops.kernels import cross_entropy as K

    cases = list(_special_tile_cases())
    x, y, w = batch((3, 5, 45))
    cases += [(x, torch.full_like(y, -100)), (x[:1, :, :2], y[:1, :2])]
    for xc, yc in cases:
        for wt, ls in ((None, 0.0), (torch.linspace(0.5, 3, xc.shape[1], dtype=torch.float64), 0.2)):
            for reduction in (1, 2):
                got = K.softmax_cross_entropy_with_grad(xc, yc, wt, -100, ls, reduction)
                want = _unit_step(xc, yc, wt, ls, reduction, K.softmax_cross_entropy,
                                  K.softmax_cross_entropy_backward)
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    got = K.softmax_cross_entropy_with_grad(x, torch.full_like(y, -100), None, -100, 0.0, 1)
    assert torch.isnan(got[0]) and got[1] == 0 and not got[3].any()
    monkeypatch.setitem(K.CE_CONFIG, "BLOCK", 16)
    monkeypatch.setitem(K.CE_TILE_CONFIG, "ELEMS", 64)
    monkeypatch.setitem(K.CE_CONFIG, "PER_SM", 1)
    monkeypatch.setitem(K.CE_TILE_CONFIG, "PER_SM", 1)
    assert K._launch("op", 5, 45, 3, x.device)[0]["LOOP"]
    want = _unit_step(x, y, w, 0.3, 1, K.softmax_cross_entropy, K.softmax_cross_entropy_backward)
    for a, b in zip(K.softmax_cross_entropy_with_grad(x, y, w, -100, 0.3, 1), want):
        assert torch.equal(a, b)
    # the mean's divisor from 9 weighted partial sums: added by every program, or (past
    # _WSUM_FOLD_LOADS) by a launch of its own first
    monkeypatch.setattr(K, "_WSUM_FOLD_LOADS", 0)
    for a, b in zip(K.softmax_cross_entropy_with_grad(x, y, w, -100, 0.3, 1), want):
        assert torch.equal(a, b)


@pytest.mark.interpreter
def test_triton_with_grad_interpreter_divisor_is_the_returned_wsum(monkeypatch):
    # 300 weighted fp64 partial sums, which the forward's blocks add in another order than the
    # reduce kernel would (256 lanes against 1024): the returned wsum and mean are the sum the
    # gradient was divided by, so the backward op from the returned outputs gives its bits
    from pyvision_ops.kernels import cross_entropy as K

    monkeypatch.setitem(K.CE_TILE_CONFIG, "MAX_C", 0)
    monkeypatch.setitem(K.CE_CONFIG, "BLOCK", 16)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 300 * 16, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (1, 300 * 16), generator=g)
    w = torch.rand(3, dtype=torch.float64, generator=g) + 0.1
    loss, wsum, stats, dz = K.softmax_cross_entropy_with_grad(x, y, w, -100, 0.0, 1)
    assert torch.equal(dz, K.softmax_cross_entropy_backward(torch.ones((), dtype=torch.float64), x, y, w, stats,
                                                            wsum, -100, 0.0, 1))
    two = K.softmax_cross_entropy(x, y, w, -100, 0.0, 1)
    torch.testing.assert_close(wsum, two[1], rtol=1e-15, atol=0)
    torch.testing.assert_close(loss, two[0], rtol=1e-15, atol=0)

import itertools
import sys

import pytest
import reference
import torch
import torchvision.ops as tv
from conftest import opcheck
from hypothesis import given, settings
from hypothesis import strategies as st

import pyvision_ops as P
from pyvision_ops.testing import clustered_boxes, edge_boxes, random_boxes

PAIRWISE = {
    "iou": (P.box_iou, tv.box_iou),
    "giou": (P.generalized_box_iou, tv.generalized_box_iou),
    "diou": (P.distance_box_iou, tv.distance_box_iou),
    "ciou": (P.complete_box_iou, tv.complete_box_iou),
}
LOSSES = {
    "giou": (P.generalized_box_iou_loss, tv.generalized_box_iou_loss),
    "diou": (P.distance_box_iou_loss, tv.distance_box_iou_loss),
    "ciou": (P.complete_box_iou_loss, tv.complete_box_iou_loss),
}
KINDS = list(PAIRWISE)
ops = torch.ops.pyvision_ops


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ pairwise

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,m", [(1, 1), (7, 13), (64, 3), (130, 257)])
def test_pairwise_matches_reference(kind, dtype, n, m):
    g = gen(n * 1000 + m)
    a, b = random_boxes(n, dtype=dtype, generator=g), random_boxes(m, dtype=dtype, generator=g)
    out = PAIRWISE[kind][0](a, b)
    assert out.dtype == dtype and out.shape == (n, m)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(out.double(), reference.pairwise(a, b, kind), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source", ["random", "clustered", "edge"])
def test_pairwise_matches_torchvision(kind, source):
    g = gen(1)
    if source == "random":
        a, b = random_boxes(300, generator=g), random_boxes(200, generator=g)
    elif source == "clustered":
        a, b = clustered_boxes(500, generator=g), clustered_boxes(100, generator=g)
    else:
        a = b = edge_boxes()
    ours, theirs = PAIRWISE[kind][0](a, b), PAIRWISE[kind][1](a, b)
    assert ours.dtype == theirs.dtype
    # Same NaNs (0/0 for two zero-area boxes, as torchvision), same values.
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6, equal_nan=True)


def test_zero_area_follows_torchvision():
    point = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    assert torch.isnan(P.box_iou(point, point)).all()  # union 0 -> 0/0
    assert P.box_iou(point, box).item() == 0.0
    assert torch.isnan(P.generalized_box_iou(point, point)).all()  # enclosing area 0
    assert P.box_iou(box, box).item() == 1.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float16, torch.bfloat16])
def test_pairwise_low_precision_and_int_give_fp32(kind, dtype):
    g = gen(2)
    a = (random_boxes(40, generator=g) * 4).round().to(dtype)
    b = (random_boxes(30, generator=g) * 4).round().to(dtype)
    ours, theirs = PAIRWISE[kind][0](a, b), PAIRWISE[kind][1](a, b)
    assert ours.dtype == torch.float32 == theirs.dtype
    # Integers: exact areas in both. fp16/bf16: we subtract in fp32 where torchvision
    # subtracts in the input dtype, so they differ by the input's rounding.
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 2e-6)
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.double(), reference.pairwise(a, b, kind), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", KINDS)
def test_pairwise_batched_broadcasts(kind):
    g = gen(3)
    a = random_boxes(5, 2, 3, generator=g)  # [2, 3, 5, 4]
    b = random_boxes(7, 3, generator=g)  # [3, 7, 4]
    out = PAIRWISE[kind][0](a, b)
    assert out.shape == (2, 3, 5, 7)
    for i, j in itertools.product(range(2), range(3)):
        torch.testing.assert_close(out[i, j], PAIRWISE[kind][0](a[i, j], b[j]), rtol=0, atol=0)
    torch.testing.assert_close(out, PAIRWISE[kind][1](a, b.expand(2, 3, 7, 4)), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_pairwise_empty(kind):
    f = PAIRWISE[kind][0]
    assert f(torch.zeros(0, 4), torch.zeros(5, 4)).shape == (0, 5)
    assert f(torch.zeros(3, 4), torch.zeros(0, 4)).shape == (3, 0)
    assert f(torch.zeros(0, 3, 4), torch.zeros(0, 2, 4)).shape == (0, 3, 2)
    assert f(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64)).dtype == torch.float64


def test_pairwise_non_contiguous():
    g = gen(4)
    a = random_boxes(50, generator=g).t().contiguous().t()  # column-major
    b = random_boxes(80, generator=g)[::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    torch.testing.assert_close(P.complete_box_iou(a, b), tv.complete_box_iou(a, b), rtol=2e-6, atol=2e-6)


def test_box_iou_formats():
    g = gen(5)
    a, b = random_boxes(20, generator=g), random_boxes(10, generator=g)
    for fmt in ("xywh", "cxcywh"):
        ca, cb = tv.box_convert(a, "xyxy", fmt), tv.box_convert(b, "xyxy", fmt)
        torch.testing.assert_close(P.box_iou(ca, cb, fmt=fmt), tv.box_iou(ca, cb, fmt=fmt), rtol=1e-5, atol=1e-6)
    # half boxes get their corners in fp32: a width below bf16's spacing at x = 300 (2) stays
    for dtype in (torch.bfloat16, torch.float16):
        for fmt, box in (("xywh", [300.0, 10, 0.5, 20]), ("cxcywh", [300.0, 20, 0.5, 20])):
            x = torch.tensor([box], dtype=dtype)
            assert P.box_iou(x, x, fmt=fmt).item() == 1.0


def test_nan_and_inf_coordinates_give_nan_not_crash():
    a = torch.tensor([[float("nan"), 0, 1, 1], [0, 0, float("inf"), 1], [0, 0, 1, 1]])
    for kind in KINDS:
        out = PAIRWISE[kind][0](a, a)
        assert out.shape == (3, 3)
        assert torch.isnan(out[0]).all() and torch.isnan(out[:, 0]).all()
        torch.testing.assert_close(out, PAIRWISE[kind][1](a, a), equal_nan=True)


def test_huge_coordinates():
    a = torch.tensor([[0.0, 0.0, 1e18, 1e18], [1e17, 1e17, 2e18, 3e18]], dtype=torch.float64)
    for kind in KINDS:
        torch.testing.assert_close(PAIRWISE[kind][0](a, a), PAIRWISE[kind][1](a, a), rtol=1e-12, atol=1e-12)


@pytest.mark.interpreter
def test_gradient_at_huge_fp32_coordinates_is_finite():
    # dval * cent overflowed to inf at centres 1e19 apart (inf / inf = NaN on the CPU; the
    # Triton kernel takes cent / diag^2 first): both finite now, and the same
    from pyvision_ops.kernels import box_iou as K

    b1, b2 = torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[1e19, 0, 1.1e19, 1]])
    g = torch.full((1,), 4.0)
    for kind in range(1, 4):
        for loss in (False, True):
            cpu = ops.matched_box_iou_backward(g, b1, b2, kind, loss, 1e-7)
            for a, b in zip(cpu, K.matched_box_iou_backward(g, b1, b2, kind, loss, 1e-7)):
                assert torch.isfinite(a).all()
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def _extreme_scale_boxes(scale):
    """Overlapping fp32 boxes of sides ~ scale, their enclosing box's squared area and
    diagonal past fp32's range (scale 1e10) or below its normal range (scale 1e-12)."""
    a = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1.2]]) * scale
    b = torch.tensor([[0.5, 0.25, 2, 1.5], [0.1, 0.4, 1.6, 3]]) * scale
    return a, b


@pytest.mark.parametrize("scale", [1e10, 1e-12])
def test_gradient_at_extreme_fp32_scales_matches_torchvision(scale):
    # The enclosing term's gradient divided by den^2 (and diag^2), which overflows (or
    # underflows) long before the values do: wrong signs at 1e10, inf at 1e-12. torchvision
    # divides twice; its fp64 gradient is the truth here.
    a, b = _extreme_scale_boxes(scale)
    cases = [(f, tv_f, False) for f, tv_f in (PAIRWISE["giou"], PAIRWISE["diou"], PAIRWISE["ciou"])]
    cases += [(f, tv_f, True) for f, tv_f in LOSSES.values()] if scale > 1 else []  # the losses' eps at 1e-12
    for ours_fn, ref_fn, loss in cases:
        x1 = a.clone().requires_grad_()
        x2 = a.double().requires_grad_()
        out = ours_fn(x1, b) if loss else ours_fn(x1, b).diagonal()
        ref = ref_fn(x2, b.double()) if loss else ref_fn(x2, b.double()).diagonal()
        g1 = torch.autograd.grad(out.sum(), [x1])[0]
        g2 = torch.autograd.grad(ref.sum(), [x2])[0]
        assert torch.isfinite(g1).all(), ours_fn.__name__
        torch.testing.assert_close(g1.double(), g2, rtol=1e-4, atol=0, msg=ours_fn.__name__)


@pytest.mark.interpreter
@pytest.mark.parametrize("scale", [1e10, 1e-12])
def test_triton_gradient_at_extreme_fp32_scales(scale):
    from pyvision_ops.kernels import box_iou as K

    a, b = _extreme_scale_boxes(scale)
    g = torch.ones(2)
    for kind in range(1, 4):
        cpu = ops.matched_box_iou_backward(g, a, b, kind, False, 1e-7)
        for x, y in zip(cpu, K.matched_box_iou_backward(g, a, b, kind, False, 1e-7)):
            assert torch.isfinite(x).all()
            torch.testing.assert_close(x, y, rtol=1e-5, atol=0)


@settings(max_examples=40, deadline=None)
@given(
    coords=st.lists(
        st.tuples(*[st.floats(-1e3, 1e3, allow_nan=False, width=32)] * 4), min_size=1, max_size=12
    ),
    kind=st.sampled_from(KINDS),
)
def test_pairwise_hypothesis_vs_torchvision(coords, kind):
    a = torch.tensor(coords, dtype=torch.float64)
    torch.testing.assert_close(PAIRWISE[kind][0](a, a.flip(0)), PAIRWISE[kind][1](a, a.flip(0)),
                               rtol=1e-9, atol=1e-9, equal_nan=True)


# ------------------------------------------------------------------- matched

@pytest.mark.parametrize("kind", KINDS)
def test_matched_is_pairwise_diagonal(kind):
    g = gen(6)
    a, b = random_boxes(100, generator=g), random_boxes(100, generator=g)
    torch.testing.assert_close(P.matched_box_iou(a, b, kind), PAIRWISE[kind][0](a, b).diagonal(), rtol=0, atol=0)
    e = edge_boxes()
    torch.testing.assert_close(P.matched_box_iou(e, e.flip(0), kind), PAIRWISE[kind][1](e, e.flip(0)).diagonal(),
                               rtol=2e-6, atol=2e-6, equal_nan=True)


def test_matched_broadcast_and_shape():
    g = gen(7)
    a, b = random_boxes(6, 2, generator=g), random_boxes(6, generator=g)
    out = P.matched_box_iou(a, b, "giou")
    assert out.shape == (2, 6)
    torch.testing.assert_close(out[1], P.matched_box_iou(a[1], b, "giou"))
    assert P.matched_box_iou(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0,)
    assert P.matched_box_iou(torch.zeros(4), torch.ones(4) * 2).shape == ()


@pytest.mark.parametrize("kind", KINDS)
def test_matched_gradcheck(kind):
    g = gen(8)
    a = random_boxes(6, dtype=torch.float64, generator=g).requires_grad_()
    b = random_boxes(6, dtype=torch.float64, generator=g).requires_grad_()
    # CIoU: alpha is a constant of the gradient, so compare with the reference's autograd.
    if kind == "ciou":
        ours = torch.autograd.grad(P.matched_box_iou(a, b, kind).sum(), [a, b])
        ref = torch.autograd.grad(reference.box_pair_metric(a, b, kind).sum(), [a, b])
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    else:
        assert torch.autograd.gradcheck(lambda x, y: P.matched_box_iou(x, y, kind), (a, b))


# -------------------------------------------------------------------- losses

@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("source", ["random", "clustered", "edge"])
def test_loss_matches_torchvision(kind, reduction, source):
    g = gen(9)
    if source == "random":
        a, b = random_boxes(500, generator=g), random_boxes(500, generator=g)
    elif source == "clustered":
        a, b = clustered_boxes(500, generator=g), clustered_boxes(500, generator=g)
    else:
        # Drop the rows whose torchvision gradient is NaN (0/0 in its atan/mask chain).
        e = edge_boxes()[[0, 1, 2, 3, 8, 9, 11]]
        a, b = e, e.roll(1, 0)
    ours_f, tv_f = LOSSES[kind]
    x1, y1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    x2, y2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ours, theirs = ours_f(x1, y1, reduction), tv_f(x2, y2, reduction)
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=2e-6)
    w = torch.rand(ours.shape, generator=g)
    go = torch.autograd.grad((ours * w).sum(), [x1, y1])
    gt = torch.autograd.grad((theirs * w).sum(), [x2, y2])
    torch.testing.assert_close(go, gt, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("eps", [0.0, 0.5, 3.0])
def test_loss_non_default_eps_matches_torchvision(kind, eps):
    # torchvision's CIoU loss passes eps only to alpha (its IoU and distance terms keep
    # 1e-7); GIoU and DIoU pass it everywhere. Values and gradients follow each.
    g = gen(22)
    a, b = random_boxes(64, dtype=torch.float64, generator=g), random_boxes(64, dtype=torch.float64, generator=g)
    x1, y1, x2, y2 = (t.clone().requires_grad_() for t in (a, b, a, b))
    ours, theirs = LOSSES[kind][0](x1, y1, eps=eps), LOSSES[kind][1](x2, y2, eps=eps)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), [x1, y1]), torch.autograd.grad(theirs.sum(), [x2, y2]),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.interpreter
@pytest.mark.parametrize("eps", [1e-7, 0.5])
def test_triton_ciou_loss_eps_like_torchvision(eps):
    from pyvision_ops.kernels import box_iou as K

    g = gen(23)
    a, b = random_boxes(40, dtype=torch.float64, generator=g), random_boxes(40, dtype=torch.float64, generator=g)
    torch.testing.assert_close(K.matched_box_iou(a, b, 3, True, eps), ops.matched_box_iou(a, b, 3, True, eps))
    grad = torch.rand(40, dtype=torch.float64, generator=g)
    for x, y in zip(K.matched_box_iou_backward(grad, a, b, 3, True, eps),
                    ops.matched_box_iou_backward(grad, a, b, 3, True, eps)):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("kind", list(LOSSES))
def test_loss_ties_split_gradient_like_torch(kind):
    # A perfect prediction: every min/max ties, torch splits those gradients evenly.
    a = torch.tensor([[1.0, 2.0, 5.0, 9.0], [0.0, 0.0, 3.0, 3.0]], dtype=torch.float64)
    x1, y1 = a.clone().requires_grad_(), a.clone().requires_grad_()
    x2, y2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    go = torch.autograd.grad(LOSSES[kind][0](x1, y1, "sum"), [x1, y1])
    gt = torch.autograd.grad(LOSSES[kind][1](x2, y2, "sum"), [x2, y2])
    torch.testing.assert_close(go, gt, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", list(LOSSES))
def test_loss_dtypes(kind):
    g = gen(10)
    a, b = random_boxes(64, generator=g), random_boxes(64, generator=g)
    ours_f, tv_f = LOSSES[kind]
    for dtype, tol in [(torch.float64, 1e-12), (torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.int64, 2e-6)]:
        ca, cb = ((t.round() if dtype == torch.int64 else t).to(dtype) for t in (a, b))
        ours, theirs = ours_f(ca, cb), tv_f(ca, cb)
        assert ours.dtype == theirs.dtype, dtype
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)
    h = a.half().requires_grad_()
    ours = ours_f(h, b.half(), "sum")
    (gh,) = torch.autograd.grad(ours, [h])
    assert gh.dtype == torch.float16 and torch.isfinite(gh).all()


@pytest.mark.parametrize("kind", list(LOSSES))
def test_loss_empty(kind):
    f = LOSSES[kind][0]
    a = torch.zeros(0, 4, requires_grad=True)
    for reduction in ("none", "mean", "sum"):
        out = f(a, torch.zeros(0, 4), reduction)
        ref = LOSSES[kind][1](torch.zeros(0, 4), torch.zeros(0, 4), reduction)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert out.sum().item() == 0.0  # torchvision: the mean of nothing is 0
    (g,) = torch.autograd.grad(f(a, torch.zeros(0, 4), "mean"), [a])
    assert g.shape == (0, 4)


@pytest.mark.parametrize("kind", list(LOSSES))
def test_loss_gradcheck(kind):
    g = gen(11)
    a = random_boxes(5, dtype=torch.float64, generator=g).requires_grad_()
    b = random_boxes(5, dtype=torch.float64, generator=g).requires_grad_()
    f = LOSSES[kind][0]
    if kind == "ciou":  # alpha is held constant, as torchvision does
        ours = torch.autograd.grad(f(a, b, "sum"), [a, b])
        ref = torch.autograd.grad(reference.box_pair_metric(a, b, kind, loss=True).sum(), [a, b])
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    else:
        assert torch.autograd.gradcheck(lambda x, y: f(x, y, "mean"), (a, b))


def test_pairwise_backward_matches_torchvision():
    g = gen(12)
    for kind in KINDS:
        a = random_boxes(9, dtype=torch.float64, generator=g)
        b = random_boxes(11, dtype=torch.float64, generator=g)
        w = torch.rand(9, 11, dtype=torch.float64, generator=g)
        x1, y1, x2, y2 = (t.clone().requires_grad_() for t in (a, b, a, b))
        go = torch.autograd.grad((PAIRWISE[kind][0](x1, y1) * w).sum(), [x1, y1])
        gt = torch.autograd.grad((PAIRWISE[kind][1](x2, y2) * w).sum(), [x2, y2])
        torch.testing.assert_close(go, gt, rtol=1e-9, atol=1e-12)


def grid_boxes(n, generator):
    """Boxes on an integer grid: touching sides, zero-width and zero-height boxes, shared edges."""
    xy = torch.randint(0, 6, (n, 2), generator=generator)
    wh = torch.randint(0, 4, (n, 2), generator=generator)
    return torch.cat([xy, xy + wh], 1).double()


def _clamp_passes_gradient_at_zero():
    x = torch.zeros(1, requires_grad=True)
    return bool(torch.autograd.grad(x.clamp(min=0).sum(), [x])[0])


@pytest.mark.skipif(_clamp_passes_gradient_at_zero(), reason="this torch's clamp(min=0) passes a gradient at "
                    "exactly 0 (2.11 does, 2.14 does not), so torchvision's autograd is no reference there")
def test_pairwise_backward_matches_torchvision_at_touching_and_flat_boxes():
    # torch's clamp(min=0) passes no gradient at exactly 0: an overlap side (or an enclosing
    # side) of exactly 0 gets none here either.
    g = gen(21)
    a, b = grid_boxes(40, g), grid_boxes(40, g)
    for kind in KINDS:
        w = torch.rand(40, 40, dtype=torch.float64, generator=g)
        x1, y1, x2, y2 = (t.clone().requires_grad_() for t in (a, b, a, b))
        ours, ref = PAIRWISE[kind][0](x1, y1), PAIRWISE[kind][1](x2, y2)
        fin = torch.isfinite(ref)
        go = torch.autograd.grad((torch.where(fin, ours, 0) * w).sum(), [x1, y1])
        gt = torch.autograd.grad((torch.where(fin, ref, 0) * w).sum(), [x2, y2])
        # NaN where both give NaN (a 0/0 union reaches the gradient even when masked out)
        torch.testing.assert_close(go, gt, rtol=1e-9, atol=1e-12, equal_nan=True)
    t1 = torch.tensor([[0.0, 0, 1, 1]], dtype=torch.float64, requires_grad=True)
    t2 = torch.tensor([[1.0, 0, 2, 1]], dtype=torch.float64)  # touching at x = 1
    assert not torch.autograd.grad(P.box_iou(t1, t2).sum(), [t1])[0].any()


def test_ciou_gradient_at_a_zero_height_box_is_finite():
    # d atan(w / h) / dh = -w / (w^2 + h^2) is finite at h = 0; torchvision's autograd goes
    # through w / h = inf and gives NaN (documented in the module docstring)
    a = torch.tensor([[0.0, 0, 2, 2]], dtype=torch.float64)
    for op, tv_op in ((P.complete_box_iou_loss, tv.complete_box_iou_loss),
                      (lambda x, y: P.complete_box_iou(x, y).sum(), lambda x, y: tv.complete_box_iou(x, y).sum())):
        b1, b2 = (torch.tensor([[0.0, 1, 2, 1]], dtype=torch.float64, requires_grad=True) for _ in range(2))
        (g,) = torch.autograd.grad(op(a, b1).sum(), [b1])
        (gt,) = torch.autograd.grad(tv_op(a, b2).sum(), [b2])
        assert torch.isfinite(g).all() and gt.isnan().all()
        torch.testing.assert_close(op(a, b1), tv_op(a, b2))


def test_mixed_integer_and_float64_boxes_promote_like_torchvision():
    a = torch.tensor([[0, 0, 3, 3], [1, 0, 2, 5]])
    b = torch.tensor([[1.0, 1.0, 4.0, 5.0 + 1e-9]], dtype=torch.float64)
    for kind in KINDS:
        for x, y in ((a, b), (b, a), (a, a), (a, b.float()), (b.half(), b)):
            ours, ref = PAIRWISE[kind][0](x, y), PAIRWISE[kind][1](x, y)
            assert ours.dtype == ref.dtype, (kind, x.dtype, y.dtype)
            torch.testing.assert_close(ours, ref, equal_nan=True, **({} if ours.dtype == torch.float64 else
                                                                      dict(rtol=2e-3, atol=2e-3)))
    # torchvision's losses take integer boxes as fp32, but some fail on mixed dtypes: compare
    # with them on inputs already promoted
    bb = b.expand(2, 4)
    for name, (ours_fn, ref_fn) in LOSSES.items():
        for x, y, d in ((bb, a, torch.float64), (a, bb, torch.float64), (a, a.float(), torch.float32)):
            ours, ref = ours_fn(x, y), ref_fn(x.to(d), y.to(d))
            assert ours.dtype == d, (name, x.dtype, y.dtype)
            torch.testing.assert_close(ours, ref)


def test_integer_boxes_against_half_boxes_are_not_rounded_to_half(monkeypatch):
    # int and fp16 promote to fp16 in torch; the integer box must still be exact: computed in
    # fp32 (90000 -> inf in fp16; torchvision's GIoU is NaN here, its enclosing area
    # overflows fp16), close to the float64 result
    a = torch.tensor([[0, 0, 90000, 90000], [30000, 0, 60000, 150000]])
    b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1, 1, 4, 5]], dtype=torch.float16)
    for kind in KINDS:
        for x, y in ((a, b), (b, a)):
            ours = PAIRWISE[kind][0](x, y)
            assert ours.dtype == torch.float32
            torch.testing.assert_close(ours, PAIRWISE[kind][0](x.double(), y.double()).float(), rtol=1e-6, atol=0)
        ours = P.matched_box_iou(a, b, kind=kind)
        torch.testing.assert_close(ours, P.matched_box_iou(a.double(), b.double(), kind=kind).float(), rtol=1e-6,
                                   atol=0)
    # the computation dtype: fp32 for int against half and against fp32 (not fp64: integer
    # ground truth against fp32 anchors is the common case), fp64 for integers alone
    seen = []
    module = sys.modules["pyvision_ops.box_iou"]  # P.box_iou is the function
    monkeypatch.setattr(module, "ops", type("Ops", (), {"pairwise_box_iou": staticmethod(
        lambda b1, b2, *rest: seen.append(b1.dtype) or ops.pairwise_box_iou(b1, b2, *rest))}))
    for x, y in ((a, b), (a, b.float()), (a, b.bfloat16()), (a, a), (b, b), (a, b.double())):
        P.box_iou(x, y)
    assert seen == [torch.float32] * 3 + [torch.float64, torch.float16, torch.float64]


# ------------------------------------------------------- op-level machinery

def _op_inputs(requires_grad):
    g = gen(13)
    a = random_boxes(6, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
    b = random_boxes(6, dtype=torch.float64, generator=g).requires_grad_(requires_grad)
    return a, b


@pytest.mark.parametrize("kind", range(4))
def test_opcheck(kind):
    a, b = _op_inputs(True)
    opcheck(ops.pairwise_box_iou, (a[None], b[None, :4], kind, 1e-7))
    for loss in (False, True):
        opcheck(ops.matched_box_iou, (a, b, kind, loss, 1e-7))
        ga, gb = _op_inputs(False)
        opcheck(ops.matched_box_iou_backward, (torch.rand(6, dtype=torch.float64), ga, gb, kind, loss, 1e-7))
    opcheck(ops.matched_box_iou, (a[:0], b[:0], kind, True, 1e-7))
    opcheck(ops.pairwise_box_iou, (a.half()[None].detach(), b.half()[None].detach(), kind, 1e-7))


def test_compile_fullgraph():
    g = gen(14)
    a, b = random_boxes(20, generator=g), random_boxes(20, generator=g)

    @torch.compile(fullgraph=True, dynamic=True)
    def step(x, y):
        return P.complete_box_iou(x, y).amax(1).sum() + P.generalized_box_iou_loss(x, y, "mean")

    x = a.clone().requires_grad_()
    out = step(x, b)
    out.backward()
    x2 = a.clone().requires_grad_()
    ref = P.complete_box_iou(x2, b).amax(1).sum() + P.generalized_box_iou_loss(x2, b, "mean")
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    # a second size under the same compiled function
    torch.testing.assert_close(step(a[:7], b[:7]), P.complete_box_iou(a[:7], b[:7]).amax(1).sum()
                               + P.generalized_box_iou_loss(a[:7], b[:7], "mean"))


# --------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: P.box_iou(torch.zeros(3, 5), torch.zeros(2, 4)), ValueError, "boxes1"),
        (lambda: P.box_iou(torch.zeros(3, 4), torch.zeros(4)), ValueError, "boxes2"),
        (lambda: P.box_iou(torch.zeros(2, 3, 4), torch.zeros(3, 3, 4)), ValueError, "batch"),
        (lambda: P.box_iou(torch.zeros(3, 4, dtype=torch.bool), torch.zeros(2, 4)), TypeError, "boxes1"),
        (lambda: P.box_iou(torch.zeros(3, 4, dtype=torch.complex64), torch.zeros(2, 4)), TypeError, "boxes1"),
        (lambda: P.box_iou([[0, 0, 1, 1]], torch.zeros(2, 4)), TypeError, "boxes1"),
        (lambda: P.box_iou(torch.zeros(3, 4), torch.zeros(2, 4, device="meta")), ValueError, "device"),
        (lambda: P.box_iou(torch.zeros(3, 4), torch.zeros(2, 4), fmt="xyxyxyxy"), ValueError, "fmt"),
        (lambda: P.box_iou(torch.zeros(3, 5), torch.zeros(2, 5), fmt="cxcywhr"), ValueError, "rotated"),
        (lambda: P.distance_box_iou(torch.zeros(3, 4), torch.zeros(2, 4), eps=float("nan")), ValueError, "eps"),
        (lambda: P.matched_box_iou(torch.zeros(3, 4), torch.zeros(2, 4)), ValueError, "broadcast"),
        (lambda: P.matched_box_iou(torch.zeros(3, 4), torch.zeros(3, 4), kind="dice"), ValueError, "kind"),
        (lambda: P.matched_box_iou(torch.zeros(3, 4), torch.zeros(3, 4), kind=["iou"]), ValueError, "kind"),
        (lambda: P.generalized_box_iou_loss(torch.zeros(3, 4), torch.zeros(3, 4), "avg"), ValueError, "reduction"),
        (lambda: P.complete_box_iou_loss(torch.zeros(3, 3), torch.zeros(3, 3)), ValueError, "boxes1"),
        (lambda: P.distance_box_iou_loss(torch.zeros(3, 4), torch.zeros(3, 4, device="meta")), ValueError, "device"),
    ],
)
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_op_level_checks_do_not_crash():
    with pytest.raises(RuntimeError, match="boxes1"):
        ops.pairwise_box_iou(torch.zeros(3, 4), torch.zeros(1, 3, 4), 0, 1e-7)
    with pytest.raises(RuntimeError, match="kind"):
        ops.matched_box_iou(torch.zeros(3, 4), torch.zeros(3, 4), 7, False, 1e-7)
    with pytest.raises(RuntimeError, match="grad"):
        ops.matched_box_iou_backward(torch.zeros(2), torch.zeros(3, 4), torch.zeros(3, 4), 0, False, 1e-7)


# ------------------------------------------------- Triton under interpreter

@pytest.mark.interpreter
@pytest.mark.parametrize("kind", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("precise_div", [False, True])
def test_triton_pairwise_interpreter(kind, dtype, precise_div, monkeypatch):
    from pyvision_ops.kernels import box_iou as K

    monkeypatch.setattr(K, "PRECISE_DIV", precise_div)
    g = gen(15)
    a = torch.cat([random_boxes(37, dtype=dtype, generator=g), edge_boxes(dtype)])[None]
    b = random_boxes(45, dtype=dtype, generator=g)[None]
    out = K.pairwise_box_iou(a, b, kind, 1e-7)
    ref = ops.pairwise_box_iou(a, b, kind, 1e-7)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(out.double()[0, :37], reference.pairwise(a[0, :37], b[0], KINDS[kind]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", range(4))
@pytest.mark.parametrize("variant", [{}, {"STREAM": True}, {"M_TILES": 3}, {"FAST_DIV": True}],
                         ids=str)  # the tuner's variants
@pytest.mark.parametrize("whole", [True, False])
def test_triton_pairwise_interpreter_tiles(kind, variant, whole, monkeypatch):
    # Sizes that are multiples of a program's columns take the unmasked store, others the
    # masked one (a partial last tile, and with M_TILES 3 tiles wholly past M); two batch entries.
    from pyvision_ops.kernels import box_iou as K

    cfg = K.PAIRWISE_IOU_CONFIG if kind == 0 else K.PAIRWISE_CONFIG  # the launcher's
    for key, value in variant.items():
        monkeypatch.setitem(cfg, key, value)
    g = gen(18)
    bn, bm = cfg["BLOCK_N"], cfg["BLOCK_M"] * cfg["M_TILES"]
    n, m = (2 * bn, 2 * bm) if whole else (2 * bn - 5, 2 * bm + cfg["BLOCK_M"] // 2)
    edge = edge_boxes(torch.float32)
    a = torch.stack([torch.cat([edge, random_boxes(n - len(edge), generator=g)]) for _ in range(2)])
    b = torch.stack([torch.cat([random_boxes(m - len(edge), generator=g), edge]) for _ in range(2)])
    torch.testing.assert_close(K.pairwise_box_iou(a, b, kind, 1e-7), ops.pairwise_box_iou(a, b, kind, 1e-7),
                               rtol=1e-6, atol=1e-6, equal_nan=True)


def _approx_range_kernel():
    """A one-program kernel storing kernels/box_iou.py:_approx_range of [B, 4] boxes. Triton
    resolves a kernel's names among its module's globals, hence the global import."""
    import triton
    import triton.language as tl

    global _approx_range
    from pyvision_ops.kernels.box_iou import _approx_range

    @triton.jit
    def check(box_ptr, out_ptr, B: tl.constexpr):
        i = tl.arange(0, B)
        x1, y1 = tl.load(box_ptr + i * 4), tl.load(box_ptr + i * 4 + 1)
        x2, y2 = tl.load(box_ptr + i * 4 + 2), tl.load(box_ptr + i * 4 + 3)
        tl.store(out_ptr, _approx_range(x1, y1, x2, y2).to(tl.int32))

    return check


@pytest.mark.interpreter
def test_triton_approximate_division_range():
    # FAST_DIV takes a tile's approximate divisions only when _approx_range holds for its boxes
    check = _approx_range_kernel()

    def in_range(*box):
        boxes = torch.tensor([[0.0, 0, 1, 1], [-5, -3, 2, 7], box, [10, 10, 10, 10]])
        out = torch.empty(1, dtype=torch.int32)
        check[(1,)](boxes, out, B=4)
        return bool(out.item())

    assert in_range(1.0, 2, 3, 4) and in_range(0, 0, 0, 0) and in_range(-2.0 ** 61, 2.0 ** -20, 2.0 ** 61, 1)
    for box in ((3.0, 0, 1, 1), (0, 3.0, 1, 1),  # inverted: an area may cancel to anything
                (0, 0, 1e-7, 1), (0, 0, 2.0 ** 62, 1),  # tiny or huge coordinates
                (float("nan"), 0, 1, 1), (0, 0, float("inf"), 1), (float("-inf"), 0, 1, 1)):
        assert not in_range(*box), box


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", range(4))
@pytest.mark.parametrize("loss", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_matched_interpreter(kind, loss, dtype):
    from pyvision_ops.kernels import box_iou as K

    g = gen(16)
    a = torch.cat([random_boxes(50, dtype=dtype, generator=g), edge_boxes(dtype)])
    b = torch.cat([random_boxes(50, dtype=dtype, generator=g), edge_boxes(dtype).roll(3, 0)])
    grad = torch.rand(a.shape[0], dtype=dtype, generator=g)
    torch.testing.assert_close(K.matched_box_iou(a, b, kind, loss, 1e-7), ops.matched_box_iou(a, b, kind, loss, 1e-7),
                               rtol=1e-6, atol=1e-6, equal_nan=True)
    for x, y in zip(K.matched_box_iou_backward(grad, a, b, kind, loss, 1e-7),
                    ops.matched_box_iou_backward(grad, a, b, kind, loss, 1e-7)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.interpreter
def test_triton_launchers_check_shapes_like_the_cpu_ops():
    # a direct op call with mismatched shapes must raise, not read past a tensor's end
    from pyvision_ops.kernels import box_iou as K

    a, b = torch.rand(4, 3, 4), torch.rand(1, 2, 4)
    for impl in (ops, K):
        with pytest.raises(RuntimeError, match="batch sizes differ"):
            impl.pairwise_box_iou(a, b, 0, 1e-7)
        with pytest.raises(RuntimeError, match="kind"):
            impl.pairwise_box_iou(a, a, 9, 1e-7)
        with pytest.raises(RuntimeError, match="boxes2"):
            impl.matched_box_iou(torch.rand(5, 4), torch.rand(2, 4), 0, False, 1e-7)
        with pytest.raises(RuntimeError, match="grad"):
            impl.matched_box_iou_backward(torch.ones(3), torch.rand(5, 4), torch.rand(5, 4), 0, False, 1e-7)


@pytest.mark.interpreter
def test_triton_eps_is_fp64_for_fp64_boxes():
    # d^2 / (c^2 + eps) with c = 0: the value is -d^2 / eps, exact only with a fp64 eps
    from pyvision_ops.kernels import box_iou as K

    a = torch.tensor([[[0.0, 0, 0, 0]]], dtype=torch.float64)
    b = torch.tensor([[[10.0, 10, 0, 0]]], dtype=torch.float64)
    assert K.pairwise_box_iou(a, b, 2, 1e-7).item() == ops.pairwise_box_iou(a, b, 2, 1e-7).item() == -5e8
    assert K.matched_box_iou(a[0], b[0], 2, False, 1e-7).item() == -5e8


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("variant", [{"STREAM": True}, {"M_TILES": 1}, {"M_TILES": 4, "STREAM": True}, {"BLOCK_N": 64},
                                     {"FAST_DIV": True}, {"FAST_DIV": True, "M_TILES": 4}], ids=str)
def test_cuda_pairwise_variants_match_the_default(variant, monkeypatch):
    # the tuner's variants compute what the default does, on the GPU's own compile, to
    # rounding: the compiler fuses a multiply into an add (fma) where the product has one
    # use, and which of the two box areas that is depends on the tiling (seen on an H200)
    from pyvision_ops.kernels import box_iou as K

    g = gen(19)
    for n, m in ((1000, 700), (512, 1024)):  # partial and whole tiles
        a, b = random_boxes(n, 2, generator=g).cuda(), random_boxes(m, 2, generator=g).cuda()
        for kind in range(4):
            want = ops.pairwise_box_iou(a, b, kind, 1e-7)
            with monkeypatch.context() as mp:
                for key, value in variant.items():
                    mp.setitem(K.PAIRWISE_CONFIG, key, value)
                    mp.setitem(K.PAIRWISE_IOU_CONFIG, key, value)
                got = ops.pairwise_box_iou(a, b, kind, 1e-7)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_approximate_division_keeps_edge_tiles_exact(kind, dtype, monkeypatch):
    # FAST_DIV: tiles holding an edge box (zero-area, inverted, NaN, inf, huge, tiny) take
    # the full-range divisions, bit for bit the default's; the others approximate ones
    from pyvision_ops.kernels import box_iou as K

    g = gen(23)
    rows = (K.PAIRWISE_IOU_CONFIG if kind == 0 else K.PAIRWISE_CONFIG)["BLOCK_N"]
    odd = torch.tensor([[float("nan"), 0, 1, 1], [0, 0, float("inf"), 1], [1e-30, 1e-30, 2e-30, 2e-30]])
    odd = torch.cat([edge_boxes(torch.float32), odd])  # 15 rows, in the third row tile
    a = torch.cat([random_boxes(2 * rows, generator=g), odd, random_boxes(64, generator=g)])[None]
    b = torch.cat([random_boxes(200, generator=g), edge_boxes(torch.float32) * 1e30])[None]
    a, b = a.to("cuda", dtype), b.to("cuda", dtype)  # fp16: huge coordinates become inf, tiny ones 0
    want = ops.pairwise_box_iou(a, b, kind, 1e-7)
    with monkeypatch.context() as mp:
        mp.setitem(K.PAIRWISE_CONFIG, "FAST_DIV", True)
        mp.setitem(K.PAIRWISE_IOU_CONFIG, "FAST_DIV", True)
        got = ops.pairwise_box_iou(a, b, kind, 1e-7)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, equal_nan=True)
    tile = slice(2 * rows, 3 * rows)  # every column exact
    assert torch.equal(got[0, tile].nan_to_num(7.0), want[0, tile].nan_to_num(7.0))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(kind, dtype):
    g = gen(17)
    a = torch.cat([random_boxes(1000, 2, dtype=dtype, generator=g), edge_boxes(dtype).expand(2, -1, -1)], 1)
    b = random_boxes(700, 2, dtype=dtype, generator=g)
    tol = 1e-5 if dtype != torch.float64 else 1e-12
    torch.testing.assert_close(ops.pairwise_box_iou(a.cuda(), b.cuda(), kind, 1e-7).cpu(),
                               ops.pairwise_box_iou(a, b, kind, 1e-7), rtol=tol, atol=tol, equal_nan=True)
    x, y = a[0, :700], b[0]
    grad = torch.rand(700, generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32)
    for loss in (False, True):
        torch.testing.assert_close(ops.matched_box_iou(x.cuda(), y.cuda(), kind, loss, 1e-7).cpu(),
                                   ops.matched_box_iou(x, y, kind, loss, 1e-7), rtol=tol, atol=tol, equal_nan=True)
        gpu = ops.matched_box_iou_backward(grad.cuda(), x.cuda(), y.cuda(), kind, loss, 1e-7)
        cpu = ops.matched_box_iou_backward(grad, x, y, kind, loss, 1e-7)
        gtol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, tol * 10)
        for p, q in zip(gpu, cpu):
            torch.testing.assert_close(p.cpu(), q, rtol=gtol, atol=gtol, equal_nan=True)


@pytest.mark.gpu
def test_cuda_public_api_and_large_batch():
    g = gen(18)
    a, b = random_boxes(3000, generator=g).cuda(), random_boxes(2500, generator=g).cuda()
    for ours, theirs in PAIRWISE.values():
        torch.testing.assert_close(ours(a, b), theirs(a, b), rtol=1e-5, atol=1e-5)
    x, y = a[:2500].clone().requires_grad_(), b.clone().requires_grad_()
    x2, y2 = a[:2500].clone().requires_grad_(), b.clone().requires_grad_()
    for ours_f, tv_f in LOSSES.values():
        go = torch.autograd.grad(ours_f(x, y, "mean"), [x, y])
        gt = torch.autograd.grad(tv_f(x2, y2, "mean"), [x2, y2])
        torch.testing.assert_close(go, gt, rtol=1e-4, atol=1e-7)
    # > 65535 row blocks and a big batch: the 1-D grid has no per-axis limit
    many = random_boxes(3, 70000, generator=g).cuda()
    torch.testing.assert_close(P.box_iou(many, many).cpu(), P.box_iou(many.cpu(), many.cpu()))

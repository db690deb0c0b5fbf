from collections import OrderedDict

import pytest
import torch
import torchvision.ops as tv
from conftest import opcheck

import pyvision_ops as P

ops = torch.ops.pyvision_ops


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def make_rois(k, batch, size=200.0, dtype=torch.float64, seed=0):
    g = gen(seed)
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * size
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) * size / 2
    idx = torch.randint(0, batch, (k, 1), generator=g).to(torch.float64)
    return torch.cat([idx, xy, xy + wh], 1).to(dtype)


def feature(b=2, c=8, h=50, w=60, dtype=torch.float64, seed=0):
    return torch.randn(b, c, h, w, generator=gen(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize("output_size", [(7, 7), (3, 5), 1])
def test_forward_backward_match_torchvision(aligned, sampling_ratio, output_size):
    x = feature()
    rois = make_rois(40, 2)
    ours = P.roi_align(x, rois, output_size, 0.25, sampling_ratio, aligned)
    theirs = tv.roi_align(x, rois, output_size, 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g = torch.randn(ours.shape, generator=gen(1), dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ga,) = torch.autograd.grad((P.roi_align(x1, rois, output_size, 0.25, sampling_ratio, aligned) * g).sum(), [x1])
    (gt,) = torch.autograd.grad((tv.roi_align(x2, rois, output_size, 0.25, sampling_ratio, aligned) * g).sum(), [x2])
    torch.testing.assert_close(ga, gt, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_dtypes(dtype, tol):
    x = feature(dtype=torch.float32)
    rois = make_rois(30, 2, dtype=torch.float32)
    ref = tv.roi_align(x, rois, 7, 0.25, 2, True)
    ours = P.roi_align(x.to(dtype), rois, 7, 0.25, 2, True)
    assert ours.dtype == dtype
    # fp16/bf16: the input is rounded; pooling accumulates in fp32.
    torch.testing.assert_close(ours.float(), tv.roi_align(x.to(dtype).float(), rois, 7, 0.25, 2, True),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(ours.float(), ref, rtol=tol * 5, atol=tol * 5)
    xr = x.to(dtype).requires_grad_()
    (g,) = torch.autograd.grad(P.roi_align(xr, rois, 7, 0.25, 2, True).float().sum(), [xr])
    assert g.dtype == dtype and torch.isfinite(g.float()).all()


def test_list_boxes_and_module():
    x = feature(b=3)
    boxes = [make_rois(5, 1, seed=s)[:, 1:] for s in range(3)]
    torch.testing.assert_close(P.roi_align(x, boxes, 7, 0.25, 2, True), tv.roi_align(x, boxes, 7, 0.25, 2, True))
    m = P.RoIAlign((7, 7), 0.25, 2, aligned=True)
    torch.testing.assert_close(m(x, boxes), tv.RoIAlign((7, 7), 0.25, 2, aligned=True)(x, boxes))
    assert "RoIAlign" in repr(m)


def test_empty_rois_outside_map_and_degenerate():
    x = feature()
    assert P.roi_align(x, torch.zeros(0, 5, dtype=torch.float64), 7).shape == (0, 8, 7, 7)
    assert P.roi_align(x, [], 7).shape == (0, 8, 7, 7)
    rois = torch.tensor([
        [0, -500, -500, -400, -400],  # far outside: zeros
        [1, 1000, 1000, 1200, 1300],
        [0, 10, 10, 10, 10],  # a point
        [1, 30, 20, 10, 5],  # inverted
        [0, -5, -5, 5, 5],  # straddles the border
        [1, 0, 0, 240, 200],  # whole map
    ], dtype=torch.float64)
    for aligned in (False, True):
        for sr in (-1, 2):
            torch.testing.assert_close(P.roi_align(x, rois, 5, 0.25, sr, aligned),
                                       tv.roi_align(x, rois, 5, 0.25, sr, aligned), rtol=1e-12, atol=1e-12)


def test_nan_and_inf_boxes_give_zeros():
    x = feature()
    rois = make_rois(4, 2)
    rois[1, 2] = float("nan")
    rois[2, 3] = float("inf")
    xr = x.clone().requires_grad_()
    out = P.roi_align(xr, rois, 7, 0.25, -1, True)
    assert (out[1] == 0).all() and (out[2] == 0).all()
    torch.testing.assert_close(out[[0, 3]], tv.roi_align(x, rois[[0, 3]], 7, 0.25, -1, True))
    (g,) = torch.autograd.grad(out.sum(), [xr])
    assert torch.isfinite(g).all()


def test_huge_roi_does_not_hang():
    x = feature(b=1, c=2, h=8, w=8)
    rois = torch.tensor([[0, 0, 0, 1e30, 1e30]], dtype=torch.float64)
    out = P.roi_align(x, rois, 2, 1.0, -1, False)  # adaptive grid capped at 65536 samples per axis
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("aligned", [False, True])
def test_channels_last(aligned):
    x = feature()
    rois = make_rois(25, 2)
    xc = x.contiguous(memory_format=torch.channels_last)
    out = P.roi_align(xc, rois, 7, 0.5, 2, aligned)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, tv.roi_align(x, rois, 7, 0.5, 2, aligned), rtol=1e-12, atol=1e-12)
    g = torch.randn(out.shape, generator=gen(2), dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    xr, x2 = xc.clone().requires_grad_(), x.clone().requires_grad_()
    (ga,) = torch.autograd.grad((P.roi_align(xr, rois, 7, 0.5, 2, aligned) * g).sum(), [xr])
    (gt,) = torch.autograd.grad((tv.roi_align(x2, rois, 7, 0.5, 2, aligned) * g).sum(), [x2])
    torch.testing.assert_close(ga, gt, rtol=1e-12, atol=1e-12)


def test_gradcheck():
    x = feature(b=2, c=2, h=9, w=11).requires_grad_()
    rois = torch.tensor([[0, 1.3, 2.1, 6.7, 7.9], [1, 0.2, 0.5, 9.4, 5.5], [0, 3.3, 3.3, 4.1, 4.4]],
                        dtype=torch.float64)
    for aligned, sr in [(False, -1), (True, 2), (True, 0)]:
        assert torch.autograd.gradcheck(lambda t, s=sr, a=aligned: P.roi_align(t, rois, (3, 2), 1.0, s, a), (x,))


def test_backward_is_deterministic():
    x = feature(b=2, c=16, h=40, w=40, dtype=torch.float32).requires_grad_()
    rois = make_rois(300, 2, size=160.0, dtype=torch.float32)
    grads = []
    for _ in range(2):
        (g,) = torch.autograd.grad(P.roi_align(x, rois, 7, 0.25, 2, True).square().sum(), [x])
        grads.append(g)
    assert torch.equal(grads[0], grads[1])


def test_opcheck():
    x = feature(b=2, c=3, h=10, w=12).requires_grad_()
    rois = make_rois(6, 2, size=40.0)
    opcheck(ops.roi_align, (x, rois, 0.25, 3, 2, 2, True))
    opcheck(ops.roi_align, (x, rois[:0], 0.25, 3, 2, -1, False))
    opcheck(ops.roi_align_backward, (torch.randn(6, 3, 3, 2, dtype=torch.float64), rois, 0.25, 3, 2, 2, 3, 10, 12,
                                     2, True))


def test_compile_fullgraph():
    x = feature(b=2, c=4, h=20, w=20, dtype=torch.float32)
    rois = make_rois(10, 2, size=80.0, dtype=torch.float32)
    f = torch.compile(lambda t, r: P.roi_align(t, r, 7, 0.25, 2, True).relu().sum(), fullgraph=True)
    xr, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = f(xr, rois)
    out.backward()
    ref = P.roi_align(x2, rois, 7, 0.25, 2, True).relu().sum()
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(xr.grad, x2.grad)


def test_multi_scale_matches_torchvision():
    g = gen(3)
    feats = OrderedDict((name, torch.randn(2, 8, s, s, generator=g)) for name, s in
                        [("p2", 64), ("p3", 32), ("p4", 16), ("p5", 8)])
    image_shapes = [(256, 256), (240, 250)]
    boxes = [make_rois(30, 1, size=220.0, dtype=torch.float32, seed=s)[:, 1:] for s in (4, 5)]
    boxes[0][:5] *= 0.1  # small boxes: lowest level
    ours = P.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)(feats, boxes, image_shapes)
    theirs = tv.MultiScaleRoIAlign(["p2", "p3", "p4", "p5"], 7, 2)(feats, boxes, image_shapes)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    single = P.MultiScaleRoIAlign(["p3"], (5, 5), 2)(feats, boxes, image_shapes)
    torch.testing.assert_close(single, tv.MultiScaleRoIAlign(["p3"], (5, 5), 2)(feats, boxes, image_shapes))


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: P.roi_align(torch.zeros(2, 3, 4), torch.zeros(1, 5), 7), ValueError, "input"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4, dtype=torch.int32), torch.zeros(1, 5), 7), TypeError, "input"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4), 7), ValueError, "boxes"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), [torch.zeros(1, 5)], 7), ValueError, "boxes"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.tensor([[3.0, 0, 0, 1, 1]]), 7), ValueError,
         "batch index"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), 0), ValueError, "output_size"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), (2, -1)), ValueError, "output_size"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), 2.5), TypeError, "output_size"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5, device="meta"), 2), ValueError, "device"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), 2, sampling_ratio=1.5), TypeError,
         "sampling_ratio"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), "boxes", 2), TypeError, "boxes"),
    ],
)
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.gpu
def test_cuda_input_raises_until_there_is_a_kernel():
    with pytest.raises(NotImplementedError, match="roi_align"):
        P.roi_align(torch.zeros(1, 3, 4, 4, device="cuda"), torch.zeros(1, 5, device="cuda"), 2)


def test_op_level_batch_index_check():
    with pytest.raises(RuntimeError, match="batch index"):
        ops.roi_align(torch.zeros(1, 3, 4, 4), torch.tensor([[5.0, 0, 0, 1, 1]]), 1.0, 2, 2, -1, False)


def test_multi_scale_backward_matches_torchvision_and_opcheck():
    g = gen(6)
    sizes = [("p2", 32), ("p3", 16), ("p4", 8)]
    feats = OrderedDict((n, torch.randn(2, 4, s, s, generator=g, dtype=torch.float64)) for n, s in sizes)
    image_shapes = [(128, 128), (120, 128)]
    boxes = [make_rois(12, 1, size=110.0, seed=s)[:, 1:] for s in (7, 8)]
    ours_in = OrderedDict((n, f.clone().requires_grad_()) for n, f in feats.items())
    tv_in = OrderedDict((n, f.clone().requires_grad_()) for n, f in feats.items())
    ours = P.MultiScaleRoIAlign(list(feats), 3, 2)(ours_in, boxes, image_shapes)
    theirs = tv.MultiScaleRoIAlign(list(feats), 3, 2)(tv_in, boxes, image_shapes)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    w = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    go = torch.autograd.grad((ours * w).sum(), list(ours_in.values()))
    gt = torch.autograd.grad((theirs * w).sum(), list(tv_in.values()))
    torch.testing.assert_close(go, gt, rtol=1e-12, atol=1e-12)

    rois = make_rois(8, 2, size=100.0)
    levels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    fl = [f.clone().requires_grad_() for f in feats.values()]
    opcheck(ops.multi_scale_roi_align, (fl, rois, levels, [0.25, 0.125, 0.0625], 3, 3, 2, True))
    f = torch.compile(lambda fs, r: P.multi_scale_roi_align(fs, r, 3, [0.25, 0.125, 0.0625]).sum(), fullgraph=True)
    torch.testing.assert_close(f(fl, rois), P.multi_scale_roi_align(fl, rois, 3, [0.25, 0.125, 0.0625]).sum())

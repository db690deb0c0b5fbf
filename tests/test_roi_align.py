import contextlib
import math
from collections import OrderedDict

import pytest
import torch
import torchvision.ops as tv
from conftest import opcheck
from torchvision.ops.poolers import LevelMapper

import pyvision_ops as P
from pyvision_ops.roi_align import fpn_levels

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
@pytest.mark.parametrize("output_size", [(7, 7), (3, 5), 1, 0, (0, 3)])  # 0: empty maps, as torchvision's
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


def test_integer_boxes_are_not_rounded_to_a_half_input_dtype():
    # Column 257 holds 1; in bf16 the box's x (257) would round to 256, which holds 0.
    x = (torch.arange(600.0) % 4).repeat(1, 1, 8, 1)
    rois = torch.tensor([[0, 257, 2, 257, 4]])
    for dtype in (torch.bfloat16, torch.float16):
        out = P.roi_align(x.to(dtype), rois, 1, 1.0, 1, False)
        assert out.dtype == dtype and out.item() == 1.5
    assert P.roi_align(x, rois, 1, 1.0, 1, False).item() == 1.5
    assert P.roi_align(x.bfloat16(), [rois[:, 1:]], 1, 1.0, 1, False).item() == 1.5


def test_list_boxes_batch_index_exact_for_half_boxes():
    # Image i holds the value i; bf16 holds integers exactly only up to 256.
    xs = torch.arange(290.0).reshape(290, 1, 1, 1).expand(290, 1, 2, 2).contiguous()
    for dtype in (torch.bfloat16, torch.float16):
        out = P.roi_align(xs, [torch.tensor([[0.0, 0, 1, 1]], dtype=dtype)] * 290, 1, 1.0, 1, True)
        torch.testing.assert_close(out.flatten(), torch.arange(290.0), rtol=0, atol=0)
    # Mixed box dtypes are promoted together, not rounded to the first one's dtype.
    boxes = [torch.tensor([[0.0, 0, 1, 1]], dtype=torch.bfloat16), torch.tensor([[0.0, 0, 1.0039, 1]],
                                                                                dtype=torch.float64)]
    x = torch.randn(2, 3, 4, 4, generator=gen(9), dtype=torch.float64)
    torch.testing.assert_close(P.roi_align(x, boxes, 2, 1.0, 2, True), tv.roi_align(x, boxes, 2, 1.0, 2, True))


def test_fpn_levels_fp16_area_does_not_overflow():
    boxes = torch.tensor([[0.0, 0, 300, 300], [0, 0, 20, 30], [10, 10, 900, 700]])
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        b = boxes.to(dtype)
        torch.testing.assert_close(fpn_levels(b, 2, 5), LevelMapper(2, 5)([b]), rtol=0, atol=0)
    assert fpn_levels(boxes[:1].half(), 2, 5).item() == 2


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


def nonfinite_features(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 20, generator=g)
    m = torch.rand(x.shape, generator=g) < 0.01
    x[m] = torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.randint(0, 3, (int(m.sum()),), generator=g)]
    xy = torch.rand(40, 2, generator=g) * 18
    wh = torch.rand(40, 2, generator=g) * 10
    return x, torch.cat([torch.randint(0, 2, (40, 1), generator=g).float(), xy, xy + wh], 1)


@pytest.mark.parametrize("sr, aligned", [(2, False), (0, True)])
def test_nonfinite_features_reach_only_their_bins(sr, aligned):
    # NCHW (separable tables) and channels_last agree; wherever torchvision is not NaN the
    # values match it, inf included. (torchvision's extra NaNs come from 0 * inf at the
    # zero-weight corners of border samples; see the module docstring.)
    x, rois = nonfinite_features(31)
    ours = P.roi_align(x, rois, 3, 1.0, sr, aligned)
    torch.testing.assert_close(ours, P.roi_align(x.contiguous(memory_format=torch.channels_last), rois, 3, 1.0, sr,
                                                 aligned), equal_nan=True)
    ref = tv.roi_align(x, rois, 3, 1.0, sr, aligned)
    known = ~ref.isnan()
    assert (~torch.isfinite(ref[known])).any()  # the input reaches some bins as +-inf
    torch.testing.assert_close(ours[known], ref[known])
    # A -inf on the last row, read by a bin whose samples lie below the image's last row
    # centre: torchvision gives NaN (its corner below has weight 0), the weights give -inf.
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 3, 1] = -float("inf")
    rois = torch.tensor([[0.0, 0.5, 3.2, 2.5, 3.9]])
    assert tv.roi_align(x, rois, 1, 1.0, 2, False).isnan().all()
    assert P.roi_align(x, rois, 1, 1.0, 2, False).item() == -float("inf")
    # Samples on whole pixels (x = 1, 3, ...) give their right neighbours weight 0: a NaN
    # there stays out of every bin (torchvision: NaN in the first).
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 1, 2] = float("nan")
    rois = torch.tensor([[0.0, 0, 0, 8, 8]])
    assert tv.roi_align(x, rois, 2, 1.0, 2, False)[0, 0, 0, 0].isnan()
    for layout in (torch.contiguous_format, torch.channels_last):
        assert (P.roi_align(x.contiguous(memory_format=layout), rois, 2, 1.0, 2, False) == 0).all()


def test_nan_and_inf_boxes_give_zeros():
    x = feature()
    rois = make_rois(5, 2)
    rois[1, 2] = float("nan")
    rois[2, 3] = float("inf")
    rois[4, 0] = float("nan")  # batch index
    xr = x.clone().requires_grad_()
    out = P.roi_align(xr, rois, 7, 0.25, -1, True)
    assert (out[1] == 0).all() and (out[2] == 0).all() and (out[4] == 0).all()
    torch.testing.assert_close(out[[0, 3]], tv.roi_align(x, rois[[0, 3]], 7, 0.25, -1, True))
    (g,) = torch.autograd.grad(out.sum(), [xr])
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_corners_whose_size_overflows_give_zeros(dtype):
    # each corner finite, the width not (inf): bin 0's first sample would sit at 0 * inf = NaN,
    # which the CPU kernel cast to an int cell far outside the map
    big = torch.finfo(dtype).max / 2
    x = feature(b=1, c=2, h=8, w=8).to(dtype).requires_grad_()
    rois = torch.tensor([[0, -1.5 * big, 0, 1.5 * big, 10], [0, 1, 1, 5, 5]], dtype=dtype)
    for aligned in (False, True):
        out = P.roi_align(x, rois, 7, 1.0, -1, aligned)
        assert (out[0] == 0).all()
        torch.testing.assert_close(out[1:], P.roi_align(x, rois[1:], 7, 1.0, -1, aligned))
        (g,) = torch.autograd.grad(out.sum(), [x])
        (g1,) = torch.autograd.grad(P.roi_align(x, rois[1:], 7, 1.0, -1, aligned).sum(), [x])
        torch.testing.assert_close(g, g1)


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


def test_opcheck_channels_last():
    # The fake kernels must give the layout of the real ones: channels_last for channels_last
    # input (or grad), NCHW for a tensor that is both (C == 1).
    cl = torch.channels_last
    x = feature(b=2, c=3, h=10, w=12).contiguous(memory_format=cl).requires_grad_()
    rois = make_rois(6, 2, size=40.0)
    opcheck(ops.roi_align, (x, rois, 0.25, 3, 2, 2, True))
    opcheck(ops.roi_align, (feature(b=2, c=1, h=10, w=12).contiguous(memory_format=cl), rois, 0.25, 3, 2, 2, True))
    grad = torch.randn(6, 3, 3, 2, dtype=torch.float64).contiguous(memory_format=cl)
    opcheck(ops.roi_align_backward, (grad, rois, 0.25, 3, 2, 2, 3, 10, 12, 2, True))
    feats = [feature(b=2, c=3, h=s, w=s, seed=s).contiguous(memory_format=cl).requires_grad_() for s in (16, 8)]
    levels = torch.tensor([0, 1, 1, 0, 1, 0])
    opcheck(ops.multi_scale_roi_align, (feats, rois, levels, [0.25, 0.125], 3, 3, 2, False))
    opcheck(ops.multi_scale_roi_align_backward, (torch.randn(6, 3, 3, 3, dtype=torch.float64).contiguous(
        memory_format=cl), rois, levels, [0.25, 0.125], [16, 8], [16, 8], 2, 3, 3, 3, 2, False))


def test_compile_fullgraph_channels_last():
    x = feature(b=2, c=8, h=17, w=19, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    rois = make_rois(10, 2, size=70.0, dtype=torch.float32)
    f = torch.compile(lambda t, r: P.roi_align(t, r, (3, 4), 0.25, 2, True) * 2 + 1, fullgraph=True)
    torch.testing.assert_close(f(x, rois), P.roi_align(x, rois, (3, 4), 0.25, 2, True) * 2 + 1)  # inference graph
    xr, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = f(xr, rois)
    ref = P.roi_align(x2, rois, (3, 4), 0.25, 2, True) * 2 + 1
    torch.testing.assert_close(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last)
    w = torch.randn(out.shape, generator=gen(4)).contiguous(memory_format=torch.channels_last)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(xr.grad, x2.grad)


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


def test_compiled_training_step_does_not_recompile_per_feature_size():
    # The backward ops take SymInt sizes: int ones fixed each map's size in the traced backward,
    # a recompile per size until the limit of 8, after which calls ran uncompiled.
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    single = torch.compile(lambda t, r: P.roi_align(t, r, 3, 0.25, 2, True).sum(), backend=counter)
    multi = torch.compile(lambda a, b, bx: P.multi_scale_roi_align([a, b], [bx], 3, [0.25, 0.125]).sum(),
                          backend=counter)
    for i, side in enumerate((12, 16, 20, 26, 30, 36)):
        rois = make_rois(6, 2, size=side * 3.0, dtype=torch.float32, seed=i)
        x = feature(b=2, c=3, h=side, w=side + 2, dtype=torch.float32).requires_grad_()
        single(x, rois).backward()
        ref = x.detach().clone().requires_grad_()
        P.roi_align(ref, rois, 3, 0.25, 2, True).sum().backward()
        torch.testing.assert_close(x.grad, ref.grad)
        a = feature(b=1, c=3, h=side, w=side, dtype=torch.float32).requires_grad_()
        b = feature(b=1, c=3, h=side // 2, w=side // 2, dtype=torch.float32).requires_grad_()
        multi(a, b, rois[:, 1:]).backward()
    assert counter.frame_count <= 4  # a static and a dynamic graph each
    torch._dynamo.reset()


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
    for size in (0, (3, 0)):  # empty maps, as torchvision's
        empty = P.MultiScaleRoIAlign(["p2", "p3"], size, 2)(feats, boxes, image_shapes)
        assert empty.shape == tv.MultiScaleRoIAlign(["p2", "p3"], size, 2)(feats, boxes, image_shapes).shape


def pyramid(sizes, b=1, c=3, seed=11, dtype=torch.float32):
    g = gen(seed)
    return OrderedDict((n, torch.randn(b, c, h, w, generator=g, dtype=torch.float64).to(dtype))
                       for n, (h, w) in sizes.items())


def test_multi_scale_nan_and_inverted_boxes_match_torchvision():
    feats = pyramid({"p2": (64, 64), "p3": (32, 32), "p4": (16, 16)})
    boxes = torch.tensor([
        [100.0, 10, 60, 60],  # inverted in x: negative area, no level -> zeros (torchvision too)
        [10, 100, 60, 60],  # inverted in y
        [float("nan"), 10, 60, 60],
        [60, 60, 10, 10],  # inverted on both axes: positive area, pooled
        [0, 0, 0, 50],  # zero area: the lowest level
        [5, 8, 120, 90], [30, 40, 250, 200], [1, 2, 9, 7],
    ])
    names = list(feats)
    ours = P.MultiScaleRoIAlign(names, 3, 2)(feats, [boxes], [(256, 256)])
    theirs = tv.MultiScaleRoIAlign(names, 3, 2)(feats, [boxes], [(256, 256)])
    torch.testing.assert_close(ours, theirs)
    assert (ours[:3] == 0).all() and (ours[3:].abs().sum((1, 2, 3)) > 0).all()
    fs = [f.clone().requires_grad_() for f in feats.values()]
    out = P.multi_scale_roi_align(fs, [boxes], 3, [0.25, 0.125, 0.0625])
    torch.testing.assert_close(out, theirs)
    # The zeroed RoIs get no gradient: only the others' reaches the maps.
    w = torch.randn(out.shape, generator=gen(12))
    grads = torch.autograd.grad((out * w).sum(), fs)
    ref = torch.autograd.grad((P.multi_scale_roi_align(fs, [boxes[3:]], 3, [0.25, 0.125, 0.0625]) * w[3:]).sum(), fs)
    torch.testing.assert_close(grads, ref)


def test_fpn_levels_nan_and_negative_area_have_no_level():
    boxes = torch.tensor([[100.0, 10, 60, 60], [float("nan"), 0, 1, 1], [0, 0, 300, 300], [60, 60, 10, 10]])
    assert fpn_levels(boxes, 2, 5).tolist() == [-1, -1, 2, 0]
    with pytest.raises(ValueError, match="k_min"):
        fpn_levels(boxes, 5, 2)


def test_multi_scale_takes_maps_in_dict_order():
    feats = pyramid({"p2": (32, 32), "p3": (16, 16), "pool": (8, 8)})
    boxes = [torch.tensor([[0.0, 0, 50, 50], [3, 4, 120, 100], [10, 10, 20, 30]])]
    for names in (["p3", "p2"], ["p2", "p3", "p9"], ["pool", "p2"]):
        ours = P.MultiScaleRoIAlign(names, 3, 2)(feats, boxes, [(128, 128)])
        theirs = tv.MultiScaleRoIAlign(names, 3, 2)(feats, boxes, [(128, 128)])
        torch.testing.assert_close(ours, theirs)
    with pytest.raises(ValueError, match="featmap_names"):
        P.MultiScaleRoIAlign(["p9"], 3, 2)(feats, boxes, [(128, 128)])
    with pytest.raises(TypeError, match="x must be a dict of feature maps by name, got list"):
        P.MultiScaleRoIAlign(["p2"], 3, 2)(list(feats.values()), boxes, [(128, 128)])


def test_multi_scale_pyramid_with_a_gap_matches_torchvision():
    # torchvision's docstring example: maps 1/8 and 1/32 of a 512 image (feat2 unused); and
    # 1/4, 1/16 of a 256 image. A RoI whose level has no map pools to zeros.
    g = gen(13)
    cases = [(["feat1", "feat3"], {"feat1": (64, 64), "feat2": (32, 32), "feat3": (16, 16)}, (512, 512)),
             (["p2", "p4"], {"p2": (64, 64), "p3": (32, 32), "p4": (16, 16)}, (256, 256))]
    for names, sizes, image in cases:
        boxes = torch.rand(40, 4, generator=g, dtype=torch.float64) * image[0] / 2
        boxes[:, 2:] += boxes[:, :2]
        boxes = torch.cat([boxes, torch.tensor([[0.0, 0, 250, 250], [0, 0, 500, 500], [2, 2, 6, 6]],
                                               dtype=torch.float64)])
        feats = pyramid(sizes, dtype=torch.float64)
        ours_in = OrderedDict((n, f.clone().requires_grad_()) for n, f in feats.items())
        tv_in = OrderedDict((n, f.clone().requires_grad_()) for n, f in feats.items())
        ours = P.MultiScaleRoIAlign(names, 3, 2)(ours_in, [boxes], [image])
        theirs = tv.MultiScaleRoIAlign(names, 3, 2)(tv_in, [boxes], [image])
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        zero = (theirs == 0).flatten(1).all(1)
        assert zero.any() and not zero.all()
        w = torch.randn(ours.shape, generator=g, dtype=torch.float64)
        used = [n for n in feats if n in names]
        go = torch.autograd.grad((ours * w).sum(), [ours_in[n] for n in used])
        gt = torch.autograd.grad((theirs * w).sum(), [tv_in[n] for n in used])
        torch.testing.assert_close(go, gt, rtol=1e-12, atol=1e-12)
    fs = list(pyramid({"p2": (64, 64), "p4": (16, 16)}).values())
    out = P.multi_scale_roi_align(fs, [torch.tensor([[0.0, 0, 250, 250], [0, 0, 120, 120]])], 3, [0.25, 0.0625])
    assert (out[0] == 0).all() and (out[1] != 0).any()


def test_multi_scale_coarse_first_is_a_value_error():
    # torchvision silently pools every RoI to zeros then (its level clamp has min > max).
    feats = pyramid({"p4": (16, 16), "p2": (64, 64)})
    boxes = [torch.tensor([[0.0, 0, 50, 50]])]
    assert (tv.MultiScaleRoIAlign(["p2", "p4"], 3, 2)(feats, boxes, [(256, 256)]) == 0).all()
    with pytest.raises(ValueError, match="finest"):
        P.MultiScaleRoIAlign(["p2", "p4"], 3, 2)(feats, boxes, [(256, 256)])
    with pytest.raises(ValueError, match="spatial_scales"):
        P.multi_scale_roi_align(list(feats.values()), boxes, 3, [0.0625, 0.25])


def test_multi_scale_scale_from_the_height_as_torchvision():
    # (32, 8) on a 128 x 30 image: height 1/4, width ~1/4; (2, 1): height 1/64, width 1/32.
    feats = pyramid({"a": (32, 8), "b": (2, 1)})
    boxes = [torch.tensor([[0.0, 0, 20, 20], [1, 2, 28, 120], [0, 0, 30, 128]])]
    m = P.MultiScaleRoIAlign(["a", "b"], 3, 2)
    t = tv.MultiScaleRoIAlign(["a", "b"], 3, 2)
    torch.testing.assert_close(m(feats, boxes, [(128, 30)]), t(feats, boxes, [(128, 30)]))
    assert m.scales == t.scales == [0.25, 2.0 ** -6]
    # Sizes that are not a power of 2 of the image: the nearest power of 2 in log2
    # (50 / 200 -> 1/4, 13 / 200 -> 1/16, 30 / 200 -> 1/8).
    feats = pyramid({"a": (50, 50), "b": (30, 30), "c": (13, 13)})
    boxes = [torch.tensor([[0.0, 0, 20, 20], [1, 2, 28, 120], [0, 0, 190, 180], [5, 5, 90, 60]])]
    for names in (["a", "b", "c"], ["a", "c"]):
        m, t = P.MultiScaleRoIAlign(names, 3, 2), tv.MultiScaleRoIAlign(names, 3, 2)
        torch.testing.assert_close(m(feats, boxes, [(200, 190)]), t(feats, boxes, [(200, 190)]))
        assert m.scales == t.scales


def test_multi_scale_module_drop_in_details():
    feats = pyramid({"p2": (32, 32), "p3": (16, 16), "p4": (8, 8)})
    boxes = [torch.tensor([[0.0, 0, 50, 50], [3, 4, 120, 100], [10, 10, 20, 30]])]
    m = P.MultiScaleRoIAlign(["p2", "p3", "p4"], 7, 2)
    t = tv.MultiScaleRoIAlign(["p2", "p3", "p4"], 7, 2)
    assert repr(m) == repr(t) == "MultiScaleRoIAlign(featmap_names=['p2', 'p3', 'p4'], output_size=(7, 7), " \
                                 "sampling_ratio=2)"
    assert m.scales is None and m.map_levels is None
    torch.testing.assert_close(m(feats, boxes, [(128, 128)]), t(feats, boxes, [(128, 128)]))
    assert m.scales == t.scales
    assert (m.map_levels.k_min, m.map_levels.k_max) == (t.map_levels.k_min, t.map_levels.k_max) == (2, 4)
    torch.testing.assert_close(m.map_levels(boxes), t.map_levels(boxes), rtol=0, atol=0)
    # Scales are kept from the first call, as in torchvision (here the image is twice as big).
    torch.testing.assert_close(m(feats, boxes, [(256, 256)]), t(feats, boxes, [(256, 256)]))
    assert m.scales == [0.25, 0.125, 0.0625]
    m.scales = m.map_levels = None
    torch.testing.assert_close(m(feats, boxes, [(256, 256)]), P.MultiScaleRoIAlign(["p2", "p3", "p4"], 7, 2)(
        feats, boxes, [(256, 256)]))
    assert m.scales == [0.125, 0.0625, 0.03125]
    with pytest.raises(ValueError, match="image_shapes"):
        P.MultiScaleRoIAlign(["p2"], 7, 2)(feats, boxes, [])


@pytest.mark.parametrize("first", [torch.bfloat16, torch.float32])
def test_multi_scale_mixed_dtypes_under_autocast_as_torchvision(first):
    other = torch.float32 if first == torch.bfloat16 else torch.bfloat16
    feats = pyramid({"a": (32, 32), "b": (16, 16)})
    feats = OrderedDict(a=feats["a"].to(first), b=feats["b"].to(other))
    boxes = [torch.tensor([[0.0, 0, 20, 20], [0, 0, 100, 100], [5, 6, 70, 40]])]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = P.MultiScaleRoIAlign(["a", "b"], 3, 2)(feats, boxes, [(128, 128)])
        theirs = tv.MultiScaleRoIAlign(["a", "b"], 3, 2)(feats, boxes, [(128, 128)])
    assert ours.dtype == theirs.dtype == first
    # torchvision rounds the bf16 level's results to bf16 before the cast; we do not.
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match=r"x\['b'\]"):
        P.MultiScaleRoIAlign(["a", "b"], 3, 2)(feats, boxes, [(128, 128)])


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(sampling_ratio=True), TypeError, "sampling_ratio"),
        (dict(sampling_ratio=2.0), TypeError, "sampling_ratio"),
        (dict(spatial_scales=[0.0, 0.125]), ValueError, "spatial_scales"),
        (dict(spatial_scales=[0.25, -0.125]), ValueError, "spatial_scales"),
        (dict(spatial_scales=[0.25, float("inf")]), ValueError, "spatial_scales"),
        (dict(spatial_scales=[0.3, 0.125]), ValueError, "powers of 2"),
        (dict(spatial_scales=[0.25]), ValueError, "spatial_scales"),
    ],
)
def test_multi_scale_bad_arguments(kwargs, exc, words):
    args = dict(features=[torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 4, 4)], boxes=torch.zeros(1, 5),
                output_size=2, spatial_scales=[0.25, 0.125]) | kwargs
    with pytest.raises(exc, match=words):
        P.multi_scale_roi_align(**args)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: P.roi_align(torch.zeros(2, 3, 4), torch.zeros(1, 5), 7), ValueError, "input"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4, dtype=torch.int32), torch.zeros(1, 5), 7), TypeError, "input"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4), 7), ValueError, "boxes"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), [torch.zeros(1, 5)], 7), ValueError, "boxes"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.tensor([[3.0, 0, 0, 1, 1]]), 7), ValueError,
         "batch index"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), (2, -1)), ValueError, "output_size"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), 2.5), TypeError, "output_size"),
        # past int64 the op's schema would refuse it with an unclear RuntimeError
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), 2**63), ValueError, "output_size"),
        (lambda: P.multi_scale_roi_align([torch.zeros(1, 3, 4, 4)], torch.zeros(1, 5), (2, 2**63), [1.0]),
         ValueError, "output_size"),
        (lambda: P.multi_scale_roi_align([1, 2], torch.zeros(1, 5), 2, [1.0, 0.5]), TypeError, "features\\[0\\]"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5, device="meta"), 2), ValueError, "device"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), 2, sampling_ratio=1.5), TypeError,
         "sampling_ratio"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), "boxes", 2), TypeError, "boxes"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), 2, aligned="False"), TypeError, "aligned"),
        (lambda: P.RoIAlign(2, 1.0, 2, aligned="True")(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5)), TypeError,
         "aligned"),
        (lambda: P.multi_scale_roi_align([torch.zeros(1, 3, 4, 4)], torch.zeros(1, 5), 2, [1.0], aligned=[True]),
         TypeError, "aligned"),
        # 2**31 - 1 samples per bin axis would run for hours; 2**32 + 2 would wrap to 2 in C++.
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), 2, sampling_ratio=2**31 - 1), ValueError,
         "sampling_ratio"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), 2, sampling_ratio=2**32 + 2), ValueError,
         "sampling_ratio"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5), 2, sampling_ratio=-(2**32) + 2), ValueError,
         "sampling_ratio"),
        (lambda: P.multi_scale_roi_align([torch.zeros(1, 3, 4, 4)], torch.zeros(1, 5), 2, [1.0], 2**31 - 1),
         ValueError, "sampling_ratio"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.tensor([[-1.0, 0, 0, 1, 1]]), 2), ValueError,
         "batch index"),
        # checked whatever else the RoI or input is: no channels, a NaN coordinate
        (lambda: P.roi_align(torch.zeros(1, 0, 4, 4), torch.tensor([[2.0, 0, 0, 1, 1]]), 2), ValueError,
         "batch index"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.tensor([[2.0, math.nan, 0, 1, 1]]), 2), ValueError,
         "batch index"),
        (lambda: P.multi_scale_roi_align([torch.zeros(1, 3, 4, 4)], torch.tensor([[1.0, 0, 0, 1, 1]]), 2, [1.0]),
         ValueError, "batch index"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.tensor([[math.inf, 0, 0, 1, 1]]), 2), ValueError,
         "batch index"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), torch.zeros(1, 5, dtype=torch.complex64), 2), TypeError,
         "boxes must hold real numbers"),
        (lambda: P.roi_align(torch.zeros(1, 3, 4, 4), [torch.zeros(1, 4, dtype=torch.bool)], 2), TypeError,
         "boxes\\[0\\] must hold real numbers"),
    ],
)
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_op_level_batch_index_check():
    for b in (5.0, 1e30, -1.0, -1e30, math.inf, -math.inf):  # 1e30 would overflow an int64 cast
        with pytest.raises(ValueError, match="boxes: RoI 0 has batch index"):
            ops.roi_align(torch.zeros(1, 3, 4, 4), torch.tensor([[b, 0, 0, 1, 1]]), 1.0, 2, 2, -1, False)
        with pytest.raises(ValueError, match="boxes: RoI 0 has batch index"):
            ops.roi_align_backward(torch.zeros(1, 3, 2, 2), torch.tensor([[b, 0, 0, 1, 1]]), 1.0, 2, 2, 1, 3, 4, 4,
                                   -1, False)


def test_fractional_batch_index_of_an_empty_batch_raises():
    # -0.5 truncates to image 0, which a batch of 0 images lacks (the CPU kernel read past
    # its per-image table)
    x, r = torch.zeros(0, 3, 4, 4), torch.tensor([[-0.5, 0, 0, 1, 1]])
    with pytest.raises(ValueError, match="batch index"):
        P.roi_align(x, r, 2)
    with pytest.raises(ValueError, match="batch index"):
        ops.roi_align(x, r, 1.0, 2, 2, -1, False)
    with pytest.raises(ValueError, match="batch index"):
        ops.multi_scale_roi_align([x], r, torch.zeros(1, dtype=torch.long), [1.0], 2, 2, 2, False)


def test_op_level_size_checks():
    # the kernels index bins and feature-map cells with an int
    x, r = torch.zeros(1, 1, 4, 4, dtype=torch.float16), torch.tensor([[0.0, 0, 0, 1, 1]])
    for ph, pw in ((46341, 46341), (2**31, 1), (1, 2**40), (1, 2**28 + 1), (2**28 + 1, 1)):
        with pytest.raises(ValueError, match="output_size"):
            ops.roi_align(x, r, 1.0, ph, pw, 1, False)
        with pytest.raises(ValueError, match="output_size"):
            P.roi_align(x, r, (ph, pw))
    for h, w in ((2**31, 4), (4, 2**30 + 1)):  # within 64 of 2^31, fp32 samples would round past the map
        with pytest.raises(ValueError, match="feature map sizes"):
            ops.roi_align_backward(torch.zeros(1, 1, 2, 2), r, 1.0, 2, 2, 1, 1, h, w, 1, False)
    # an expanded map costs no memory: its size is checked before anything is read
    with pytest.raises(ValueError, match="feature map sizes"):
        P.roi_align(torch.zeros(1, 1, 1, 1, dtype=torch.float16).expand(1, 1, 1, 2**30 + 1), r, 1)
    with pytest.raises(ValueError, match="feature map sizes"):
        ops.roi_align_backward(torch.zeros(1, 1, 2, 2), r, 1.0, 2, 2, 1, 1, 4, -1, 1, False)


def test_op_level_sampling_ratio_check():
    # the ops take it as an int: outside [-2^31, 65536] it would wrap or run for hours
    x, r = torch.zeros(1, 3, 4, 4), torch.tensor([[0.0, 0, 0, 1, 1]])
    for sr in (2**32 + 2, 2**31, 65537, -(2**31) - 1):
        with pytest.raises(ValueError, match="sampling_ratio"):
            ops.roi_align(x, r, 1.0, 2, 2, sr, False)
        with pytest.raises(ValueError, match="sampling_ratio"):
            ops.roi_align_backward(torch.zeros(1, 3, 2, 2), r, 1.0, 2, 2, 1, 3, 4, 4, sr, False)
    ops.roi_align(x, r, 1.0, 2, 2, 65536, False)


def test_fractional_batch_index_truncates_as_torchvision():
    x = feature(b=3, c=2, h=8, w=8)
    rois = torch.tensor([[-0.5, 0, 0, 5, 5], [0.9, 1, 1, 6, 6], [2.7, 0, 0, 7, 4]], dtype=torch.float64)
    ours = P.roi_align(x, rois, 2, 1.0, 2, False)
    torch.testing.assert_close(ours, tv.roi_align(x, rois, 2, 1.0, 2, False))
    torch.testing.assert_close(ours, P.roi_align(x, rois.trunc(), 2, 1.0, 2, False))
    torch.testing.assert_close(P.multi_scale_roi_align([x], rois, 2, [1.0]), ours)


def test_aligned_and_sampling_ratio_accept_what_torchvision_accepts():
    import numpy as np

    x = feature(b=1, c=2, h=8, w=8)
    rois = torch.tensor([[0, 0.5, 1, 6, 5]], dtype=torch.float64)
    for aligned, ref in [(None, False), (0, False), (1, True), (torch.tensor(True), True), (np.bool_(True), True)]:
        torch.testing.assert_close(P.roi_align(x, rois, 2, 1.0, 2, aligned), tv.roi_align(x, rois, 2, 1.0, 2, ref))
    torch.testing.assert_close(P.roi_align(x, rois, 2, 1.0, np.int64(3)), tv.roi_align(x, rois, 2, 1.0, 3))
    for size in (np.int64(2), (np.int32(2), 3)):  # NumPy output sizes
        torch.testing.assert_close(P.roi_align(x, rois, size, 1.0, 2), tv.roi_align(x, rois, size, 1.0, 2))
    with pytest.raises(TypeError, match="output_size"):
        P.roi_align(x, rois, np.bool_(True))
    # The largest sampling_ratio accepted runs at once (the tables are separable).
    torch.testing.assert_close(P.roi_align(x, rois, 1, 1.0, 65536, True), tv.roi_align(x, rois, 1, 1.0, 4096, True),
                               rtol=1e-6, atol=1e-6)


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


def test_multi_scale_module_infers_its_scales_under_compile_with_dynamic_shapes():
    # scales from symbolic map heights (integer comparisons, no tensor's log2), as eagerly;
    # the nearest power of 2 as torchvision rounds it, over many height ratios
    from pyvision_ops.roi_align import _log2_nearest

    assert all(_log2_nearest(h, m) == int(torch.tensor(h / m).log2().round())
               for m in range(1, 300, 7) for h in range(1, 2 * m + 3))
    boxes = [torch.tensor([[1.0, 1, 20, 20], [2, 3, 9, 12]]), torch.tensor([[0.0, 0, 30, 30]])]
    for size, image in ((8, 32), (16, 64), (13, 50)):
        feats = pyramid({"p2": (size, size), "p3": ((size + 1) // 2, (size + 1) // 2)}, b=2)
        torch._dynamo.reset()
        m, eager = P.MultiScaleRoIAlign(["p2", "p3"], 2, 2), P.MultiScaleRoIAlign(["p2", "p3"], 2, 2)
        got = torch.compile(m, fullgraph=True, dynamic=True)(feats, boxes, [(image, image)] * 2)
        torch.testing.assert_close(got, eager(feats, boxes, [(image, image)] * 2))
        assert m.scales == eager.scales


def test_autocast_cpu_pools_in_fp32_and_returns_the_input_dtype():
    x = feature(dtype=torch.bfloat16).requires_grad_()
    rois = make_rois(20, 2, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = P.roi_align(x, rois, 7, 0.25, 2, True)
        out32 = P.roi_align(x.detach().float(), rois, 7, 0.25, 2, True)
        ms = P.multi_scale_roi_align([x], rois, 7, [0.25], 2, aligned=True)
    ref = P.roi_align(x.detach().float(), rois.float(), 7, 0.25, 2, True)
    assert out.dtype == torch.bfloat16 and out32.dtype == torch.float32 and ms.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(ms, ref.bfloat16(), rtol=0, atol=0)
    (g,) = torch.autograd.grad(out.float().sum(), [x])
    assert g.dtype == torch.bfloat16


# ------------------------------------------------------------------ CUDA
# The CUDA kernels are compared with the CPU kernel on the same inputs (and with
# torchvision's CUDA kernel), for the atomic backward and the deterministic one.

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float16: dict(rtol=2e-3, atol=1e-4), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3)}


@contextlib.contextmanager
def deterministic(on=True):
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on, warn_only=warn)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)


def cuda_rois(k, batch, size, seed=0):
    """Random RoIs plus degenerate ones: inverted, a point, outside the map, straddling it."""
    rois = make_rois(k, batch, size=size, dtype=torch.float32, seed=seed)
    odd = torch.tensor([[0, 30, 20, 10, 5], [1, 12, 12, 12, 12], [0, -500, -500, -400, -400],
                        [1, -8, -6, 9, 7], [0, 0, 0, 4 * size, 4 * size]], dtype=torch.float32)
    return torch.cat([rois, odd])


def backward_both(grad, rois, *args):
    """(atomic, deterministic) results of the backward op."""
    fast = ops.roi_align_backward(grad, rois, *args)
    with deterministic():
        det = ops.roi_align_backward(grad, rois, *args)
    return fast, det


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = feature(b=2, c=6, h=23, w=31, dtype=dtype).contiguous(memory_format=fmt)
    rois = cuda_rois(50, 2, 120.0)
    for aligned, sr, (ph, pw) in [(False, -1, (5, 4)), (True, 0, (7, 7)), (True, 2, (3, 5)), (False, 2, (1, 1))]:
        out = ops.roi_align(x, rois, 0.25, ph, pw, sr, aligned)
        out_cuda = ops.roi_align(x.cuda(), rois.cuda(), 0.25, ph, pw, sr, aligned)
        assert out_cuda.dtype == dtype
        assert out_cuda.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out_cuda.cpu(), out, **TOL[dtype])
        g = torch.randn(out.shape, generator=gen(1), dtype=torch.float64).to(dtype).contiguous(memory_format=fmt)
        args = (0.25, ph, pw, 2, 6, 23, 31, sr, aligned)
        ref = ops.roi_align_backward(g, rois, *args)
        for got in backward_both(g.cuda(), rois.cuda(), *args):
            assert got.dtype == dtype and got.stride() == ref.stride()  # a 1x1 grad is NCHW
            torch.testing.assert_close(got.cpu(), ref, **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
def test_cuda_matches_torchvision(aligned, sampling_ratio):
    # 32 channels: the NCHW backward runs channels_last internally (float4 loads in the gather).
    # atol 5e-5: fp32 sample positions put both builds up to 1.6e-5 from an fp64 reference
    # on these RoIs, and they round differently (torchvision's is built with FMA contraction):
    # on the H200 they differed by 1.6e-5 at one of 196000 outputs.
    x = feature(b=2, c=32, h=40, w=48, dtype=torch.float32).cuda()
    rois = cuda_rois(120, 2, 180.0).cuda()
    tol = dict(rtol=1e-5, atol=5e-5)
    for size in [(7, 7), (3, 5), 1]:
        torch.testing.assert_close(P.roi_align(x, rois, size, 0.25, sampling_ratio, aligned),
                                   tv.roi_align(x, rois, size, 0.25, sampling_ratio, aligned), **tol)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = P.roi_align(xa, rois, size, 0.25, sampling_ratio, aligned)
        w = torch.randn(out.shape, generator=gen(2)).cuda()
        (gt,) = torch.autograd.grad((tv.roi_align(xb, rois, size, 0.25, sampling_ratio, aligned) * w).sum(), [xb])
        (ga,) = torch.autograd.grad((out * w).sum(), [xa])
        torch.testing.assert_close(ga, gt, **tol)
        with deterministic():
            (gd,) = torch.autograd.grad((P.roi_align(xa, rois, size, 0.25, sampling_ratio, aligned) * w).sum(), [xa])
        torch.testing.assert_close(gd, gt, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_deterministic_backward_is_reproducible(channels_last):
    # 1200 overlapping RoIs on 2 images (several 256-RoI batches per image), 70 channels
    # (a partial chunk in both kernels).
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = feature(b=2, c=70, h=40, w=40, dtype=torch.float32).contiguous(memory_format=fmt).cuda()
    rois = make_rois(1200, 2, size=160.0, dtype=torch.float32).cuda()
    out = ops.roi_align(x, rois, 0.25, 7, 7, 2, True)
    g = torch.randn(out.shape, generator=gen(3)).cuda().contiguous(memory_format=fmt)
    args = (0.25, 7, 7, 2, 70, 40, 40, 2, True)
    with deterministic():
        first = ops.roi_align_backward(g, rois, *args)
        second = ops.roi_align_backward(g, rois, *args)
    assert torch.equal(first, second)
    assert first.is_contiguous(memory_format=fmt)
    fast = ops.roi_align_backward(g, rois, *args)
    assert fast.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(first, fast, rtol=1e-5, atol=1e-4)
    ref = ops.roi_align_backward(g.cpu(), rois.cpu(), *args)
    torch.testing.assert_close(first.cpu(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.gpu
def test_cuda_nan_and_out_of_range_boxes_give_zeros():
    x = feature(b=2, c=5, h=20, w=24)
    rois = make_rois(12, 2, size=90.0)
    bad = [1, 4, 5, 7, 8, 10]
    rois[1, 2] = float("nan")
    rois[4, 3] = float("inf")
    rois[5, 0] = 7  # batch index out of range: zeros on CUDA (no host sync to raise)
    rois[7, 0] = -3
    rois[8, 0] = float("nan")
    rois[10, 0] = float("inf")
    cpu_rois = rois.clone()
    cpu_rois[[5, 7, 10], 0] = float("nan")  # the CPU raises on those; NaN pools to zeros there too
    out = ops.roi_align(x.cuda(), rois.cuda(), 0.25, 4, 4, -1, True)
    assert (out[bad] == 0).all()
    torch.testing.assert_close(out.cpu(), ops.roi_align(x, cpu_rois, 0.25, 4, 4, -1, True))
    g = torch.randn(out.shape, generator=gen(4), dtype=torch.float64)
    args = (0.25, 4, 4, 2, 5, 20, 24, -1, True)
    ref = ops.roi_align_backward(g, cpu_rois, *args)
    for got in backward_both(g.cuda(), rois.cuda(), *args):
        torch.testing.assert_close(got.cpu(), ref)
        assert torch.isfinite(got).all()


@pytest.mark.gpu
def test_cuda_empty_inputs():
    rois = make_rois(3, 2, size=20.0).cuda()
    x = feature(b=2, c=3, h=10, w=10).cuda()
    assert P.roi_align(x, rois[:0], 7).shape == (0, 3, 7, 7)
    assert P.roi_align(x[:, :0], rois, 7).shape == (3, 0, 7, 7)
    out = ops.roi_align(x[:, :, :0], rois, 1.0, 2, 2, -1, False)
    assert out.shape == (3, 3, 2, 2) and (out == 0).all()
    for args, shape in [((rois[:0], 1.0, 2, 2, 2, 3, 10, 10, -1, False), (2, 3, 10, 10)),
                        ((rois, 1.0, 2, 2, 2, 3, 0, 10, -1, False), (2, 3, 0, 10))]:
        grad = torch.ones(args[0].shape[0], 3, 2, 2, dtype=torch.float64, device="cuda")
        for got in backward_both(grad, *args):
            assert got.shape == shape and (got == 0).all()


@pytest.mark.gpu
def test_cuda_large_bins_and_pooled_sizes():
    # Bins over 1000 cells wide with adaptive sampling exceed the shared tables (direct
    # sampling); a 1 x 2500 output has no tables at all and needs several gather passes;
    # a 1e30 RoI caps its grid at 65536 samples.
    cases = [
        (feature(b=1, c=3, h=6, w=2100, dtype=torch.float32),
         torch.tensor([[0, 0, 0, 2100, 6], [0, 10, 1, 1900, 5]], dtype=torch.float32), 1.0, (2, 2), -1, True),
        (feature(b=2, c=2, h=5, w=9), make_rois(4, 2, size=9.0), 1.0, (1, 2500), 2, False),
        (feature(b=1, c=2, h=8, w=8), torch.tensor([[0, 0, 0, 1e30, 1e30]], dtype=torch.float64), 1.0, (2, 2),
         -1, False),
    ]
    for x, rois, scale, (ph, pw), sr, aligned in cases:
        out = ops.roi_align(x, rois, scale, ph, pw, sr, aligned)
        torch.testing.assert_close(ops.roi_align(x.cuda(), rois.cuda(), scale, ph, pw, sr, aligned).cpu(), out,
                                   rtol=1e-5, atol=1e-5)
        g = torch.randn(out.shape, generator=gen(5), dtype=torch.float64).to(x.dtype)
        args = (scale, ph, pw, *x.shape, sr, aligned)
        ref = ops.roi_align_backward(g, rois, *args)
        for got in backward_both(g.cuda(), rois.cuda(), *args):
            torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_multi_scale_matches_cpu(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = gen(7)
    feats = [torch.randn(2, 6, s, s, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
             for s in (32, 16, 8, 4)]
    scales = [0.25, 0.125, 0.0625, 0.03125]
    rois = make_rois(60, 2, size=120.0)
    levels = torch.randint(0, 4, (60,), generator=g)
    levels[-1] = 7  # a level outside the list pools to zeros on CUDA (the CPU raises)
    ref_levels = levels.clone()
    ref_levels[-1] = 0
    ref_rois = rois.clone()
    ref_rois[-1, 0] = float("nan")
    for aligned, sr in [(False, 2), (True, -1)]:
        out = ops.multi_scale_roi_align(feats, ref_rois, ref_levels, scales, 3, 4, sr, aligned)
        got = ops.multi_scale_roi_align([f.cuda() for f in feats], rois.cuda(), levels.cuda(), scales, 3, 4, sr,
                                        aligned)
        assert got.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(got.cpu(), out, rtol=1e-10, atol=1e-10)
        w = torch.randn(out.shape, generator=g, dtype=torch.float64).contiguous(memory_format=fmt)
        args = (scales, [f.shape[2] for f in feats], [f.shape[3] for f in feats], 2, 6, 3, 4, sr, aligned)
        ref = ops.multi_scale_roi_align_backward(w, ref_rois, ref_levels, *args)
        fast = ops.multi_scale_roi_align_backward(w.cuda(), rois.cuda(), levels.cuda(), *args)
        with deterministic():
            det = ops.multi_scale_roi_align_backward(w.cuda(), rois.cuda(), levels.cuda(), *args)
        for grads in (fast, det):
            assert len(grads) == 4
            for a, b in zip(grads, ref):
                assert a.is_contiguous(memory_format=fmt)
                torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
def test_cuda_multi_scale_module_matches_torchvision():
    g = gen(8)
    names = ["p2", "p3", "p4", "p5"]
    feats = OrderedDict((n, torch.randn(2, 8, s, s, generator=g).cuda()) for n, s in zip(names, (64, 32, 16, 8)))
    image_shapes = [(256, 256), (240, 250)]
    boxes = [make_rois(40, 1, size=220.0, dtype=torch.float32, seed=s)[:, 1:].cuda() for s in (9, 10)]
    ours_in = OrderedDict((n, f.clone().requires_grad_()) for n, f in feats.items())
    tv_in = OrderedDict((n, f.clone().requires_grad_()) for n, f in feats.items())
    ours = P.MultiScaleRoIAlign(names, 7, 2)(ours_in, boxes, image_shapes)
    theirs = tv.MultiScaleRoIAlign(names, 7, 2)(tv_in, boxes, image_shapes)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    w = torch.randn(ours.shape, generator=g).cuda()
    go = torch.autograd.grad((ours * w).sum(), list(ours_in.values()))
    gt = torch.autograd.grad((theirs * w).sum(), list(tv_in.values()))
    torch.testing.assert_close(go, gt, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_cuda_autocast():
    x = feature(b=2, c=4, h=20, w=20, dtype=torch.float16).cuda().requires_grad_()
    rois = make_rois(10, 2, size=80.0, dtype=torch.float16).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        out = P.roi_align(x, rois, 7, 0.25, 2, True)
        out32 = P.roi_align(x.detach().float(), rois, 7, 0.25, 2, True)
    assert out.dtype == torch.float16 and out32.dtype == torch.float32
    ref = P.roi_align(x.detach().float(), rois.float(), 7, 0.25, 2, True)
    torch.testing.assert_close(out, ref.half(), rtol=0, atol=0)
    (g,) = torch.autograd.grad(out.float().sum(), [x])
    assert g.dtype == torch.float16 and torch.isfinite(g).all()


@pytest.mark.gpu
@pytest.mark.parametrize("c", [3, 32])  # 32 channels: the NCHW backward works channels_last inside
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_opcheck(channels_last, c):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = feature(b=2, c=c, h=10, w=12).contiguous(memory_format=fmt).cuda().requires_grad_()
    rois = make_rois(6, 2, size=40.0).cuda()
    opcheck(ops.roi_align, (x, rois, 0.25, 3, 2, 2, True))
    opcheck(ops.roi_align, (x, rois[:0], 0.25, 3, 2, -1, False))
    grad = torch.randn(6, c, 3, 2, dtype=torch.float64, device="cuda").contiguous(memory_format=fmt)
    opcheck(ops.roi_align_backward, (grad, rois, 0.25, 3, 2, 2, c, 10, 12, 2, True))
    opcheck(ops.roi_align_backward, (grad, rois, 0.25, 3, 2, 0, c, 10, 12, 2, True))  # no image: zeros
    feats = [feature(b=2, c=c, h=s, w=s, seed=s).contiguous(memory_format=fmt).cuda().requires_grad_()
             for s in (16, 8)]
    levels = torch.tensor([0, 1, 1, 0, 1, 0], device="cuda")
    opcheck(ops.multi_scale_roi_align, (feats, rois, levels, [0.25, 0.125], 3, 3, 2, False))
    grad = torch.randn(6, c, 3, 3, dtype=torch.float64, device="cuda").contiguous(memory_format=fmt)
    opcheck(ops.multi_scale_roi_align_backward, (grad, rois, levels, [0.25, 0.125], [16, 8], [16, 8], 2, c, 3, 3, 2,
                                                 False))


@pytest.mark.gpu
def test_cuda_multi_scale_gap_and_nan_boxes_match_torchvision():
    feats = pyramid({"p2": (64, 64), "p3": (32, 32), "p4": (16, 16)}, b=1, c=4)
    feats = OrderedDict((n, f.cuda()) for n, f in feats.items())
    boxes = [torch.tensor([[100.0, 10, 60, 60], [float("nan"), 10, 60, 60], [60, 60, 10, 10], [0, 0, 250, 250],
                           [0, 0, 120, 120], [3, 4, 20, 30]]).cuda()]
    for names in (["p2", "p4"], ["p2", "p3", "p4"]):
        ours = P.MultiScaleRoIAlign(names, 3, 2)(feats, boxes, [(256, 256)])
        theirs = tv.MultiScaleRoIAlign(names, 3, 2)(feats, boxes, [(256, 256)])
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert (ours[:2] == 0).all()
        cpu = P.MultiScaleRoIAlign(names, 3, 2)(OrderedDict((n, f.cpu()) for n, f in feats.items()),
                                                [boxes[0].cpu()], [(256, 256)])
        torch.testing.assert_close(ours.cpu(), cpu, rtol=1e-5, atol=1e-5)

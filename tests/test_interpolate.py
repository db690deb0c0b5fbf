import pytest
import torch
import torch.nn.functional as F
from conftest import opcheck

import pyvision_ops as P

ops = torch.ops.pyvision_ops

RESIZES = [dict(size=(20, 33)), dict(size=(3, 4)), dict(size=(7, 11)), dict(size=(1, 1)), dict(size=5),
           dict(scale_factor=2.5), dict(scale_factor=(1.3, 0.7)), dict(scale_factor=8), dict(scale_factor=0.34)]


def feature(n=2, c=3, h=7, w=11, dtype=torch.float64, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("kw", RESIZES, ids=str)
@pytest.mark.parametrize("align_corners", [False, True])
def test_matches_torch_values_and_gradients(kw, align_corners):
    x = feature()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = P.interpolate_bilinear(x1, align_corners=align_corners, **kw)
    ref = F.interpolate(x2, mode="bilinear", align_corners=align_corners, **kw)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn(ours.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (go,) = torch.autograd.grad((ours * w).sum(), [x1])
    (gr,) = torch.autograd.grad((ref * w).sum(), [x2])
    torch.testing.assert_close(go, gr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_dtypes_layouts(dtype, tol):
    x = feature(c=4, h=16, w=24, dtype=dtype)
    ref = F.interpolate(x.float(), scale_factor=3, mode="bilinear").to(dtype)
    out = P.interpolate_bilinear(x, scale_factor=3)
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    xc = x.contiguous(memory_format=torch.channels_last)
    out_c = P.interpolate_bilinear(xc, scale_factor=3)
    torch.testing.assert_close(out_c, out)
    assert out_c.is_contiguous(memory_format=torch.channels_last)  # the layout torch keeps
    # 1x1 pixels with channels_last strides (a channels_last model's pooled branch) are
    # NCHW-contiguous too; torch goes by the strides, and so do we
    for p in (x[:, :, :1, :1].contiguous(), x[:, :, :1, :1].contiguous(memory_format=torch.channels_last)):
        want = F.interpolate(p, size=(5, 7), mode="bilinear")
        assert P.interpolate_bilinear(p, size=(5, 7)).stride() == want.stride()
    # under vmap, examples with channels_last strides (a batched tensor takes no layout)
    xb = torch.stack([x.float()] * 2).permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    got = torch.func.vmap(lambda t: P.interpolate_bilinear(t, size=(7, 8)))(xb)
    torch.testing.assert_close(got, torch.stack([F.interpolate(t, size=(7, 8), mode="bilinear") for t in xb]))
    torch.testing.assert_close(P.interpolate_bilinear(x[:, :, ::2], size=(9, 9)),
                               F.interpolate(x[:, :, ::2].float(), size=(9, 9), mode="bilinear").to(dtype),
                               rtol=tol, atol=tol)


def test_backward_is_deterministic_and_gradcheck():
    x = feature(c=8, h=16, w=32, dtype=torch.float32).requires_grad_()
    grads = [torch.autograd.grad(P.interpolate_bilinear(x, scale_factor=8).square().sum(), [x])[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])
    xs = feature(n=1, c=2, h=3, w=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: P.interpolate_bilinear(t, size=(5, 7)), (xs,))
    assert torch.autograd.gradcheck(lambda t: P.interpolate_bilinear(t, scale_factor=1.7, align_corners=True), (xs,))
    # Second derivatives: the backward is linear in the incoming gradient, with the forward as its adjoint.
    assert torch.autograd.gradgradcheck(lambda t: P.interpolate_bilinear(t, size=(5, 7)), (xs,))
    assert torch.autograd.gradgradcheck(lambda t: P.interpolate_bilinear(t, scale_factor=0.6), (xs,))


def test_empty_and_nan():
    assert P.interpolate_bilinear(torch.zeros(0, 3, 4, 4), size=8).shape == (0, 3, 8, 8)
    x = feature()
    x[0, 0, 3, 5] = float("nan")
    out = P.interpolate_bilinear(x, scale_factor=2)
    torch.testing.assert_close(out, F.interpolate(x, scale_factor=2, mode="bilinear"), equal_nan=True)


def test_opcheck_and_compile():
    x = feature(n=1, c=2, h=5, w=6).requires_grad_()
    opcheck(ops.upsample_bilinear, (x, 9, 13, False, -1.0, -1.0))
    opcheck(ops.upsample_bilinear, (x, 12, 15, True, 2.5, 2.5))
    opcheck(ops.upsample_bilinear_backward, (torch.randn(1, 2, 9, 13, dtype=torch.float64), 5, 6, False, -1.0, -1.0))
    f = torch.compile(lambda t: P.interpolate_bilinear(t, scale_factor=2).sum(), fullgraph=True)
    torch.testing.assert_close(f(x), P.interpolate_bilinear(x, scale_factor=2).sum())


def test_scale_factor_with_dynamic_shapes_compiles_and_exports():
    # The output size follows the input's under dynamic shapes (SymInt sizes in the schema,
    # sym_int of h * scale in the front): compile across sizes, forward and backward, and an
    # export with dynamic H and W run on new sizes. math.floor / isfinite of the symbolic
    # size failed to trace, and int sizes fixed H at export.
    from torch.export import Dim

    def up(t):
        return P.interpolate_bilinear(t, scale_factor=1.5)

    for dynamic in (True, None):
        torch._dynamo.reset()
        f = torch.compile(lambda t: up(t).square().sum(), fullgraph=True, dynamic=dynamic)
        for h, w in ((4, 5), (6, 8), (9, 7)):
            x = feature(n=1, c=2, h=h, w=w)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            (g1,), (g2,) = torch.autograd.grad(f(x1), [x1]), torch.autograd.grad(up(x2).square().sum(), [x2])
            torch.testing.assert_close(g1, g2)

    class Up(torch.nn.Module):
        def forward(self, t):
            return up(t)

    ep = torch.export.export(Up(), (feature(n=1, c=2, h=4, w=5),), dynamic_shapes=({2: Dim.DYNAMIC, 3: Dim.DYNAMIC},))
    for h, w in ((6, 7), (9, 3)):
        x = feature(n=1, c=2, h=h, w=w)
        torch.testing.assert_close(ep.module()(x), up(x), rtol=0, atol=0)


def test_size_and_flags_accept_what_torch_accepts():
    import numpy as np

    x = feature(n=1, c=2, h=5, w=6)
    ref = F.interpolate(x, size=(7, 7), mode="bilinear")
    for size in (np.int64(7), (np.int32(7), 7), torch.tensor(7)):
        torch.testing.assert_close(P.interpolate_bilinear(x, size=size), ref)
    torch.testing.assert_close(P.interpolate_bilinear(x, scale_factor=np.float32(1.5), align_corners=None),
                               F.interpolate(x, scale_factor=1.5, mode="bilinear"))
    with pytest.raises(TypeError, match="align_corners"):
        P.interpolate_bilinear(x, size=7, align_corners="yes")


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: P.interpolate_bilinear(torch.zeros(2, 3, 4), size=4), ValueError, "input"),
        (lambda: P.interpolate_bilinear(torch.zeros(1, 1, 4, 4, dtype=torch.long), size=4), TypeError, "input"),
        (lambda: P.interpolate_bilinear(torch.zeros(1, 1, 4, 4)), ValueError, "exactly one"),
        (lambda: P.interpolate_bilinear(torch.zeros(1, 1, 4, 4), size=4, scale_factor=2), ValueError, "exactly one"),
        (lambda: P.interpolate_bilinear(torch.zeros(1, 1, 4, 4), size=(4, 4, 4)), ValueError, "size"),
        (lambda: P.interpolate_bilinear(torch.zeros(1, 1, 4, 4), size=2.5), TypeError, "size"),
        (lambda: P.interpolate_bilinear(torch.zeros(1, 1, 4, 4), scale_factor=-1), ValueError, "scale_factor"),
        (lambda: P.interpolate_bilinear(torch.zeros(1, 1, 4, 4), scale_factor=0.1), ValueError, "output size"),
        (lambda: P.interpolate_bilinear(torch.zeros(1, 1, 4, 4), scale_factor=1e30), ValueError, "2\\^31"),
        (lambda: P.interpolate_bilinear(torch.zeros(1, 1, 4, 4), scale_factor=1e308), ValueError, "2\\^31"),
        (lambda: P.interpolate_bilinear(torch.zeros(1, 1, 4, 4), scale_factor=10**400), ValueError, "scale_factor"),
        (lambda: P.interpolate_bilinear(torch.zeros(1, 1, 4, 4), scale_factor=float("nan")), ValueError,
         "scale_factor"),
        (lambda: P.interpolate_bilinear(torch.zeros(1, 1, 0, 4), size=4), ValueError, "spatial"),
    ],
)
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("case", [(7, 11, 20, 33, False, -1.0), (7, 11, 20, 33, True, -1.0),
                                  (7, 11, 17, 27, False, 2.5), (7, 11, 3, 4, False, -1.0),
                                  (1, 5, 6, 9, False, -1.0), (2, 2, 9, 9, True, -1.0),
                                  # a cell read by > 128 outputs (one column per program); downsampling
                                  (2, 3, 5, 301, False, -1.0), (13, 40, 5, 9, True, -1.0),
                                  (3, 70, 7, 90, False, -1.0)], ids=str)
def test_triton_interpreter(dtype, case):
    from pyvision_ops.kernels import interpolate as K

    h, w, oh, ow, ac, scale = case
    x = feature(h=h, w=w, dtype=dtype)
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(K.upsample_bilinear(x, oh, ow, ac, scale, scale),
                               ops.upsample_bilinear(x, oh, ow, ac, scale, scale), **tol)
    g = torch.randn(2, 3, oh, ow, dtype=torch.float64).to(dtype)
    torch.testing.assert_close(K.upsample_bilinear_backward(g, h, w, ac, scale, scale),
                               ops.upsample_bilinear_backward(g, h, w, ac, scale, scale),
                               **(tol if dtype == torch.float16 else dict(rtol=1e-5, atol=2e-5)))


@pytest.mark.interpreter
@pytest.mark.parametrize("case", [(4, 8, 4, 16, False), (5, 7, 11, 13, True), (6, 9, 3, 4, False)], ids=str)
def test_triton_interpreter_backward_keeps_inf_in_place(case):
    # An inf/NaN incoming gradient reaches exactly the input cells the CPU kernel gives it
    # (its taps, a 0-weight tap included), not every cell of the program's block.
    from pyvision_ops.kernels import interpolate as K

    h, w, oh, ow, ac = case
    g = torch.randn(1, 2, oh, ow, dtype=torch.float64)
    g[0, 0, 1, 0], g[0, 1, oh - 1, ow // 2] = float("inf"), float("nan")
    ours, ref = K.upsample_bilinear_backward(g, h, w, ac, -1.0, -1.0), ops.upsample_bilinear_backward(
        g, h, w, ac, -1.0, -1.0)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)) and torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.isfinite(ref).sum() > ref.numel() // 2
    torch.testing.assert_close(ours, ref, equal_nan=True)


def _tiny_scale_case():
    # plane 0 zeros, plane 1 all 100; rows of distinct values so that a wrong row shows
    x = torch.stack([torch.zeros(3, 4), torch.arange(12.0).reshape(3, 4) + 100]).reshape(1, 2, 3, 4)
    # a scale of 1e-30 (a direct op call: the front never passes one whose 1 / scale passes the
    # input size) puts every source index far past the last cell: all read the last one
    want = x[:, :, -1:, -1:].expand(1, 2, 2, 5)
    return x, want


@pytest.mark.parametrize("scale", [1e-30, 1e-300, 5e-324])
def test_direct_op_with_a_tiny_scale_reads_the_last_cell(scale):
    x, want = _tiny_scale_case()
    assert torch.equal(ops.upsample_bilinear(x, 2, 5, False, scale, scale), want)
    g = ops.upsample_bilinear_backward(torch.ones(1, 2, 2, 5), 3, 4, False, scale, scale)
    want_g = torch.zeros(1, 2, 3, 4)
    want_g[:, :, -1, -1] = 10.0  # every one of the 2 x 5 outputs' gradient
    assert torch.equal(g, want_g)


@pytest.mark.interpreter
def test_triton_interpreter_tiny_scale():
    from pyvision_ops.kernels import interpolate as K

    x, want = _tiny_scale_case()
    assert torch.equal(K.upsample_bilinear(x, 2, 5, False, 1e-30, 1e-30), want)


@pytest.mark.interpreter
def test_triton_interpreter_direct_op_edges():
    from pyvision_ops.kernels import cross_entropy as C
    from pyvision_ops.kernels import interpolate as K

    # no output columns: zeros (as the CPU kernel), not uninitialised memory
    assert torch.equal(K.upsample_bilinear_backward(torch.ones(1, 2, 3, 0), 4, 5, False, -1.0, -1.0),
                       torch.zeros(1, 2, 4, 5))
    with pytest.raises(RuntimeError, match="positive"):
        K.upsample_bilinear(torch.ones(1, 1, 0, 3), 4, 4, False, -1.0, -1.0)
    with pytest.raises(NotImplementedError, match="8192x"):
        K.upsample_bilinear_backward(torch.ones(1, 1, 1, 9000), 1, 1, False, -1.0, -1.0)
    # the C++ ops' argument checks: a direct op call gets a clear error, not an unpacking one
    with pytest.raises(RuntimeError, match="floating point"):
        K.upsample_bilinear(torch.ones(1, 1, 2, 2, dtype=torch.int64), 4, 4, False, -1.0, -1.0)
    with pytest.raises(RuntimeError, match="N, C, H, W"):
        K.upsample_bilinear(torch.ones(1, 2, 2), 4, 4, False, -1.0, -1.0)
    with pytest.raises(RuntimeError, match="grad must be"):
        K.upsample_bilinear_backward(torch.ones(2, 3, 3), 2, 2, False, -1.0, -1.0)
    # column blocks go along grid dimension y, at most 65535 of them
    from pyvision_ops.kernels import column_blocks

    assert column_blocks("op", 256 * 65535, 256) == 65535
    with pytest.raises(NotImplementedError, match="op: a width of 16776961 needs 65536 blocks"):
        column_blocks("op", 256 * 65535 + 1, 256)
    # and rows times column blocks below 2^31 (Triton's launcher multiplies them in 32 bits)
    from pyvision_ops.kernels import row_grid

    assert row_grid("op", 2**30 - 1, 512, 256) == (2**30 - 1, 2) and row_grid("op", 2**31 - 1, 1, 256) == (2**31 - 1, 1)
    with pytest.raises(NotImplementedError, match="op: 1073741824 rows of 2 blocks"):
        row_grid("op", 2**30, 512, 256)
    # rows (a program each) along x, at most 2^31 - 1: checked before the input is made
    # contiguous (an expanded one would take 8 GB) or the output allocated
    x = torch.zeros(1, 1, 1, 1).expand(2**16, 2**15, 1, 1)
    with pytest.raises(NotImplementedError, match="upsample_bilinear: 2147483648 rows"):
        K.upsample_bilinear(x, 1, 1, False, -1.0, -1.0)
    with pytest.raises(NotImplementedError, match="upsample_cross_entropy: 2147483648 rows"):
        C.upsample_cross_entropy(x[:1, :1], torch.zeros(1, 1, 1, dtype=torch.long).expand(1, 2**31, 1), False,
                                 None, -100, 0.0, 1)
    # 1025 classes: a row a program (fewer share a program: C = 2 takes 2^31 rows in 2^22)
    z, t = torch.zeros(1, 1, 1).expand(2**31, 1025, 1), torch.zeros(1, dtype=torch.long).expand(2**31, 1)
    stats = torch.zeros(1, 1, 1).expand(2, 2**31, 1)  # expanded: nothing of 2^31 rows is ever allocated
    for call in (lambda: C.softmax_cross_entropy(z, t, None, -100, 0.0, 1),
                 lambda: C.softmax_cross_entropy_backward(torch.ones(()), z, t, None, stats, torch.ones(()), -100,
                                                          0.0, 1)):
        with pytest.raises(NotImplementedError, match="softmax_cross_entropy(_backward)?: 2147483648 rows"):
            call()
    # [N, C] logits: the rows kernels step through C < 2^31 classes in 32 bits
    z, t = torch.zeros(1, 1, 1).expand(1, 2**31 - 1023, 1), torch.zeros(1, 1, dtype=torch.long)
    stats = torch.zeros(2, 1, 1)
    for call in (lambda: C.softmax_cross_entropy(z, t, None, -100, 0.0, 1),
                 lambda: C.softmax_cross_entropy_backward(torch.ones(()), z, t, None, stats, torch.ones(()), -100,
                                                          0.0, 1)):
        with pytest.raises(NotImplementedError, match="softmax_cross_entropy(_backward)?: 2147482625 classes"):
            call()
    assert C._rows_config("op", 1, 2**31 - 1024)[1]["BLOCK_C"] == 1024 == C._rows_config("op", 1, 2**31)[1]["BLOCK_C"]
    assert C._rows_config("op", (2**31 - 1) * 512, 2)[0] == (2**31 - 1,)  # rows of 2 classes: 512 a program
    with pytest.raises(NotImplementedError, match=r"op: 1099511627265 rows \(512 a program\)"):
        C._rows_config("op", (2**31 - 1) * 512 + 1, 2)
    # [N, C, d1, ...] logits past the class tiles: the plain kernels step through C by UNROLL
    step = C.CE_CONFIG["UNROLL"]
    z, t = torch.zeros(1, 1, 1).expand(1, 2**31 - 1, 2), torch.zeros(1, 2, dtype=torch.long)
    stats = torch.zeros(2, 1, 2)
    for call in (lambda: C.softmax_cross_entropy(z, t, None, -100, 0.0, 1),
                 lambda: C.softmax_cross_entropy_with_grad(z, t, None, -100, 0.0, 1),
                 lambda: C.softmax_cross_entropy_backward(torch.ones(()), z, t, None, stats, torch.ones(()), -100,
                                                          0.0, 1)):
        with pytest.raises(NotImplementedError, match="softmax_cross_entropy(_with_grad|_backward)?: 2147483647 "
                                                      f"classes of .N, C, d1, .... logits, within {step} of 2"):
            call()
    assert C._launch("op", 2**31 - step, 2, 1, torch.device("cpu"))[1] == 1
    # an empty batch is not a launch: an empty output, whatever its width
    assert K.upsample_bilinear(torch.zeros(0, 1, 1, 1), 1, 2**24 + 1, False, -1.0, -1.0).shape == (0, 1, 1, 2**24 + 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu_and_is_deterministic(dtype):
    x = feature(c=19, h=64, w=128, dtype=dtype)
    for kw in (dict(size=(512, 1024)), dict(scale_factor=2.5, align_corners=True)):
        xg, xc = x.cuda().requires_grad_(), x.clone().requires_grad_()
        a, b = P.interpolate_bilinear(xg, **kw), P.interpolate_bilinear(xc, **kw)
        tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)
        w = torch.randn(a.shape, dtype=torch.float32).to(dtype)
        g1 = torch.autograd.grad((a * w.cuda()).sum(), [xg])[0]
        g2 = torch.autograd.grad((P.interpolate_bilinear(xg, **kw) * w.cuda()).sum(), [xg])[0]
        assert torch.equal(g1, g2)
        torch.testing.assert_close(g1.cpu(), torch.autograd.grad((b * w).sum(), [xc])[0], rtol=tol * 10, atol=tol * 10)


@pytest.mark.gpu
def test_cuda_taps_cache_records_other_streams_and_pins_graph_entries():
    # Cached taps live on the device: one used from another stream is recorded on it (the
    # allocator then waits for that stream when the LRU frees it), and one used while a CUDA
    # graph is captured is pinned, so that evicting the LRU does not free what the graph reads.
    from pyvision_ops.kernels import interpolate as K

    x = torch.randn(1, 2, 5, 7, device="cuda")
    ref = P.interpolate_bilinear(x, size=(11, 13))
    taps = K.axis_taps(5, 11, False, -1.0, torch.float32, x.device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = P.interpolate_bilinear(x, size=(11, 13))
    assert side in taps.streams
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    xs = torch.randn(1, 2, 6, 9, device="cuda")
    want = P.interpolate_bilinear(xs, size=(17, 19))  # the taps are made before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = P.interpolate_bilinear(xs, size=(17, 19))
    assert {(6, 17), (9, 19)} <= {k[:2] for k in K._pinned}
    K._axis_taps.cache_clear()
    torch.randn(1 << 20, device="cuda")  # reuse freed memory, if any was freed
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, want)


def test_compiled_scale_factor_that_varies_does_not_break_the_graph():
    # math.isfinite on a symbolic scale broke the graph (a new graph per scale, past the limit)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(lambda t, s: P.interpolate_bilinear(t, scale_factor=s).sum(), backend="eager")
    x = torch.randn(1, 2, 9, 9, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for s in (0.7, 1.3, 1.9, 2.45, 2.8, 3.15):
        f(x, s).backward()
        torch.testing.assert_close(f(x, s), P.interpolate_bilinear(x, scale_factor=s).sum())
    assert sum(counters["graph_break"].values()) == 0
    torch._dynamo.reset()

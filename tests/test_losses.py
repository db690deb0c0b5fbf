import math

import pytest
import reference
import torch
import torchvision.ops as tv
from conftest import check_compiled_channels_last, opcheck

import pyvision_ops as P
from pyvision_ops import _utils

ops = torch.ops.pyvision_ops


def logits_targets(n=4000, dtype=torch.float32, soft=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g, dtype=torch.float64) * 4).to(dtype)
    t = torch.rand(n, generator=g, dtype=torch.float64) if soft else (torch.rand(n, generator=g) > 0.8).double()
    return x, t.to(dtype)


@pytest.mark.parametrize("alpha", [0.25, 0.0, 1.0, -1])
@pytest.mark.parametrize("gamma", [2.0, 0.0, 1.0, 1.5, 3.0])
@pytest.mark.parametrize("soft", [False, True])
def test_focal_matches_torchvision(alpha, gamma, soft):
    x, t = logits_targets(soft=soft, seed=int(gamma * 10))
    x1, t1, x2, t2 = (v.clone().requires_grad_() for v in (x, t, x, t))
    ours, theirs = P.sigmoid_focal_loss(x1, t1, alpha, gamma), tv.sigmoid_focal_loss(x2, t2, alpha, gamma)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    w = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    go = torch.autograd.grad((ours * w).sum(), [x1, t1])
    gt = torch.autograd.grad((theirs * w).sum(), [x2, t2])
    torch.testing.assert_close(go, gt, rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_reductions_and_shapes(reduction):
    x, t = logits_targets(600)
    x, t = x.view(2, 3, 100), t.view(2, 3, 100)
    torch.testing.assert_close(P.sigmoid_focal_loss(x, t, reduction=reduction),
                               tv.sigmoid_focal_loss(x, t, reduction=reduction), rtol=1e-5, atol=1e-6)
    xt, tt = x.transpose(0, 2), t.transpose(0, 2)  # non-contiguous
    torch.testing.assert_close(P.sigmoid_focal_loss(xt, tt), tv.sigmoid_focal_loss(xt, tt), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_focal_dtypes(dtype, tol):
    x, t = logits_targets(dtype=dtype, soft=True)
    ours = P.sigmoid_focal_loss(x, t)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, tv.sigmoid_focal_loss(x, t) if dtype == torch.float64
                               else tv.sigmoid_focal_loss(x.double(), t.double()).to(dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("x_dtype,t_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float64), (torch.float32, torch.float16)])
def test_focal_mixed_dtypes_promote_like_torchvision(x_dtype, t_dtype):
    # fp16 logits (autocast) with fp32 targets: an fp16 loss overflowed a sum that fp32 holds
    x, t = logits_targets(dtype=torch.float64, soft=True)
    x = x.to(x_dtype).requires_grad_()
    t = t.to(t_dtype)
    ours, theirs = P.sigmoid_focal_loss(x, t), tv.sigmoid_focal_loss(x, t)
    assert ours.dtype == theirs.dtype == torch.promote_types(x_dtype, t_dtype)
    # torchvision rounds sigmoid(x) to fp16/bf16 first; ours keeps fp32 from the rounded x
    exact = tv.sigmoid_focal_loss(x.double(), t.double()).to(ours.dtype)
    torch.testing.assert_close(ours, exact, rtol=1e-5, atol=1e-6)
    big = (torch.randn(70000, 8, generator=torch.Generator().manual_seed(0)) * 3).to(x_dtype)
    hard = (torch.rand(70000, 8, generator=torch.Generator().manual_seed(1)) > 0.5).to(t_dtype)
    assert torch.isfinite(P.sigmoid_focal_loss(big, hard, reduction="sum"))
    (gx,) = torch.autograd.grad(ours.sum(), [x])
    assert gx.dtype == x_dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_focal_under_autocast_gives_fp32_like_torchvision(dtype):
    # an AMP detector's summed focal loss over many anchors: fp16 overflowed to inf
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 80, generator=g).to(dtype).requires_grad_()
    t = torch.zeros(20000, 80, dtype=dtype)  # torchvision's RetinaNet builds targets with zeros_like
    with torch.autocast("cpu", dtype=dtype):
        ours = P.sigmoid_focal_loss(x, t, reduction="sum")
        theirs = tv.sigmoid_focal_loss(x, t, reduction="sum")
        direct = ops.sigmoid_focal_loss(x, t, 0.25, 2.0)
    assert ours.dtype == theirs.dtype == direct.dtype == torch.float32
    exact = tv.sigmoid_focal_loss(x.detach().double(), t.double(), reduction="sum")
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=0)
    (gx,) = torch.autograd.grad(ours, [x])
    assert gx.dtype == dtype
    with torch.autocast("cpu", dtype=dtype):  # fp32 and fp64 inputs keep their dtype
        assert P.sigmoid_focal_loss(x.detach().double(), t.double()).dtype == torch.float64


@pytest.mark.parametrize("targets_channels_last", [True, False])
def test_focal_keeps_channels_last_like_torchvision(targets_channels_last):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last)
    t = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    t = t.to(memory_format=torch.channels_last) if targets_channels_last else t
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = P.sigmoid_focal_loss(xa, t), tv.sigmoid_focal_loss(xb, t)
    assert ours.stride() == theirs.stride()
    torch.testing.assert_close(ours, theirs)
    w = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    import torch._inductor.config as inductor_config

    with inductor_config.patch(force_disable_caches=True):  # a cached graph keeps old strides
        compiled = torch.compile(P.sigmoid_focal_loss, fullgraph=True)(x, t)
    assert compiled.stride() == theirs.stride()
    torch.testing.assert_close(compiled, theirs.detach())


def test_focal_follows_a_permuted_layout_like_torchvision():
    # A detection head's [N, K, H, W] -> [N, H * W, K] view, targets made like it (zeros_like):
    # the loss and the gradient reaching the view take its strides, as torchvision's, where a
    # contiguous gradient would meet the head's activations in another layout
    g = torch.Generator().manual_seed(5)
    base = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.zeros_like(base.flatten(2).transpose(1, 2)).copy_(torch.rand(2, 20, 3, generator=g) > 0.7)
    w = torch.rand(2, 20, 3, generator=g, dtype=torch.float64)
    out = {}
    for name, fn in (("ours", P.sigmoid_focal_loss), ("torchvision", tv.sigmoid_focal_loss)):
        leaf = base.clone().requires_grad_()
        x = leaf.flatten(2).transpose(1, 2)
        x.register_hook(lambda grad, name=name: out.setdefault(name + " grad", grad))
        out[name] = fn(x, t)
        (out[name] * w).sum().backward()
    assert out["ours"].stride() == out["torchvision"].stride() == t.stride() != t.contiguous().stride()
    assert out["ours grad"].stride() == out["torchvision grad"].stride() == t.stride()
    torch.testing.assert_close(out["ours"], out["torchvision"])
    torch.testing.assert_close(out["ours grad"], out["torchvision grad"])
    import torch._inductor.config as inductor_config

    with inductor_config.patch(force_disable_caches=True):
        compiled = torch.compile(P.sigmoid_focal_loss, fullgraph=True)(base.flatten(2).transpose(1, 2), t)
    assert compiled.stride() == t.stride()
    torch.testing.assert_close(compiled, out["torchvision"].detach())


def test_focal_edge_cases():
    empty = torch.zeros(0)
    assert P.sigmoid_focal_loss(empty, empty).shape == (0,)
    assert P.sigmoid_focal_loss(empty, empty, reduction="sum").item() == 0
    assert torch.isnan(P.sigmoid_focal_loss(empty, empty, reduction="mean"))  # as torchvision
    x = torch.tensor([float("nan"), 50.0, -50.0, 0.0])
    t = torch.tensor([1.0, 1.0, 0.0, 0.5])
    out = P.sigmoid_focal_loss(x, t)
    assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all()
    torch.testing.assert_close(out[1:], tv.sigmoid_focal_loss(x[1:], t[1:]), rtol=1e-5, atol=1e-7)


INF_X = [float("inf"), float("-inf"), float("inf"), float("-inf"), float("inf")]
INF_T = [1.0, 1.0, 0.0, 0.0, 0.5]


@pytest.mark.parametrize("gamma", [2.0, 1.5, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_focal_infinite_logits(gamma, dtype):
    # The limits of the loss (0 on the right side, inf on the wrong one, also for a soft
    # target) and of its gradient (torchvision's at |x| = 1e4); torchvision gives NaN for
    # most of these (inf - inf and 0 * inf in its formula).
    x = torch.tensor(INF_X, dtype=dtype, requires_grad=True)
    t = torch.tensor(INF_T, dtype=dtype)
    loss = P.sigmoid_focal_loss(x, t, gamma=gamma)
    torch.testing.assert_close(loss, torch.tensor([0.0, float("inf"), float("inf"), 0.0, float("inf")], dtype=dtype))
    (dx,) = torch.autograd.grad(loss[:4].sum(), [x])
    far = torch.tensor([1e4, -1e4, 1e4, -1e4], dtype=torch.float64, requires_grad=True)
    (ref,) = torch.autograd.grad(tv.sigmoid_focal_loss(far, t[:4].double(), gamma=gamma).sum(), [far])
    torch.testing.assert_close(dx[:4], ref.to(dtype))


@pytest.mark.parametrize("gamma", [0.5, 0.25, 1.5])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_focal_saturated_hard_target_gradients(gamma, dtype, tol):
    # 1 - p_t at t = 1 and large x (t = 0 and very negative x) is tiny, not 0: with
    # 0 < gamma < 1 its power gamma - 1 must stay finite (it was inf from x = 20 in fp32)
    xs = [10.0, 17.0, 20.0, 30.0, 40.0, 60.0, 80.0]
    x = torch.tensor(xs + [-v for v in xs], dtype=dtype)
    t = torch.tensor([1.0] * len(xs) + [0.0] * len(xs), dtype=dtype)
    x1, t1 = x.clone().requires_grad_(), t.clone().requires_grad_()
    x2, t2 = x.double().requires_grad_(), t.double().requires_grad_()
    ours = P.sigmoid_focal_loss(x1, t1, gamma=gamma)
    ref = reference.sigmoid_focal_loss(x2, t2, gamma=gamma)
    # relative accuracy down to the underflow (exp flushes below the normal range, and the
    # gradient scales that by |x| <= 80)
    tiny = 1e3 * torch.finfo(dtype).tiny
    torch.testing.assert_close(ours.double(), ref, rtol=tol, atol=tiny)
    dx, dt = torch.autograd.grad(ours.sum(), [x1, t1])
    for a, b in zip((dx, dt), torch.autograd.grad(ref.sum(), [x2, t2])):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tiny)
    # and torchvision in float64 at x = 20, where its 1 - p_t is still accurate
    xv, tv_t = torch.tensor([20.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    (dt_tv,) = torch.autograd.grad(tv.sigmoid_focal_loss(xv, tv_t, gamma=gamma).sum(), [tv_t])
    torch.testing.assert_close(dt[2].double(), dt_tv[0], rtol=max(tol, 1e-6), atol=0)
    # beyond the exponential's range 1 - p_t is 0: the gradient is its limit, 0, not NaN
    far = torch.tensor([100.0, -100.0], dtype=torch.float32, requires_grad=True)
    tf = torch.tensor([1.0, 0.0], requires_grad=True)
    for g in torch.autograd.grad(P.sigmoid_focal_loss(far, tf, gamma=gamma).sum(), [far, tf]):
        assert torch.isfinite(g).all() and g.abs().max() < 1e-12


def focal_fp64_subnormal_case():
    """Right answers so confident that 1 - p_t is subnormal in fp64 (|x| in ~[709, 745]), and
    the limit of d loss / d t there: -a_t (x + sign(x) gamma) exp(-gamma |x|)."""
    x = torch.tensor([-720.0, 720.0, -740.0, 744.0, -745.0], dtype=torch.float64)
    t = (x > 0).double()

    def dt_limit(gamma, alpha=0.25):
        at = torch.where(t == 1, alpha, 1 - alpha)
        return -at * (x + x.sign() * gamma) * torch.exp(-gamma * x.abs())

    return x, t, dt_limit


@pytest.mark.parametrize("gamma", [0.0, 0.001, 0.5, 1.5])
def test_focal_fp64_subnormal_one_minus_pt_gradients(gamma):
    # gamma m^(gamma - 1) overflowed at a subnormal m = 1 - p_t: NaN (gamma = 0: 0 * inf) or inf
    # gradients, where torchvision gives NaN for 0 < gamma < 1
    x, t, dt_limit = focal_fp64_subnormal_case()
    x1, t1 = x.clone().requires_grad_(), t.clone().requires_grad_()
    dx, dt = torch.autograd.grad(P.sigmoid_focal_loss(x1, t1, gamma=gamma).sum(), [x1, t1])
    assert dx.abs().max() < 1e-300 and dt.isfinite().all()
    # compared where the subnormal 1 - p_t still holds ~11 digits (|x| = 720; ~2 at 740)
    torch.testing.assert_close(dt[:2], dt_limit(gamma)[:2], rtol=1e-6, atol=0)
    if gamma == 0:  # torchvision's is exact here
        t2 = t.clone().requires_grad_()
        (dt_tv,) = torch.autograd.grad(tv.sigmoid_focal_loss(x, t2, gamma=0.0).sum(), [t2])
        torch.testing.assert_close(dt, dt_tv, rtol=1e-12, atol=0)


def focal_outside_targets(dtype=torch.float64):
    """Targets outside [0, 1]: 1 - p_t < 0 at some entries."""
    x = torch.tensor([2.0, -2.0, -1.0, 0.5, 3.0, 4.0], dtype=dtype)
    t = torch.tensor([1.5, -0.5, -1.0, 2.0, 1.25, 3.0], dtype=dtype)
    return x, t


@pytest.mark.parametrize("gamma", [-2.0, -3.0, -9.0])
def test_focal_negative_gamma_near_float_overflow(gamma):
    # gamma < 0: m^gamma = exp(gamma log m) reaches expf's overflow threshold. The fp32 CPU
    # exp gave inf just below it and, past 2 * 88.4, wrapped to tiny negative values or 0:
    # inf now wherever the power overflows, up to |x| = 87 where exp(-|x|) underflows.
    x = torch.cat([torch.linspace(43.0, 44.35, 64), torch.linspace(1.0, 86.9, 300)]).double()
    t = torch.ones_like(x)
    ours = P.sigmoid_focal_loss(x.float(), t.float(), gamma=gamma)
    exact = P.sigmoid_focal_loss(x, t, gamma=gamma)  # fp64: std::exp
    m_pow = (-x).exp() ** gamma  # m = 1 - p = exp(-x) (to fp32 rounding) at t = 1
    top = torch.finfo(torch.float32).max
    finite, over = m_pow < top * 0.99, m_pow > top * 1.01
    assert finite.sum() > 10 and over.sum() > 10
    torch.testing.assert_close(ours[finite].double(), exact[finite], rtol=2e-5, atol=0)
    assert torch.isposinf(ours[over]).all()
    # a soft target far outside [0, 1]: |m| ~ 1e10, m^9 overflows (negative), times a negative ce
    far = P.sigmoid_focal_loss(torch.tensor([5.0]), torch.tensor([1e10]), alpha=-1, gamma=9.0)
    assert torch.isposinf(far).all()


@pytest.mark.parametrize("gamma", [1.0, 3.0, 4.0, 5.0, 0.5, 1.5])
@pytest.mark.parametrize("alpha", [-1, 0.25])
def test_focal_targets_outside_unit_interval(gamma, alpha):
    # torch.pow of a negative base is real for an integral exponent (odd: negative), NaN for a
    # fractional one; torchvision's loss follows it (x = 2, t = 1.5, alpha = -1: 0.2284 for gamma 1)
    x, t = focal_outside_targets()
    x1, t1, x2, t2 = (v.clone().requires_grad_() for v in (x, t, x, t))
    ours, theirs = P.sigmoid_focal_loss(x1, t1, alpha, gamma), tv.sigmoid_focal_loss(x2, t2, alpha, gamma)
    assert (1 - (torch.sigmoid(x) * t + (1 - torch.sigmoid(x)) * (1 - t)) < 0).sum() >= 3
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, equal_nan=True)
    assert ours.isnan().any() == (gamma % 1 != 0)
    go = torch.autograd.grad(ours.sum(), [x1, t1])
    gt = torch.autograd.grad(theirs.sum(), [x2, t2])
    torch.testing.assert_close(go, gt, rtol=1e-10, atol=1e-12, equal_nan=True)


def test_focal_gradcheck_and_opcheck():
    x, t = logits_targets(20, dtype=torch.float64, soft=True)
    x.requires_grad_()
    t.requires_grad_()
    for gamma in (2.0, 1.5):
        assert torch.autograd.gradcheck(lambda a, b, g=gamma: P.sigmoid_focal_loss(a, b, 0.25, g), (x, t))
    opcheck(ops.sigmoid_focal_loss, (x, t, 0.25, 2.0))
    opcheck(ops.sigmoid_focal_loss, (x, t, -1.0, 1.5))
    opcheck(ops.sigmoid_focal_loss_backward, (torch.rand(20, dtype=torch.float64), x.detach(), t.detach(), 0.25, 2.0))


def test_focal_compile():
    x, t = logits_targets(500)
    f = torch.compile(lambda a, b: P.sigmoid_focal_loss(a, b, reduction="mean") * 2, fullgraph=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = f(x1, t)
    out.backward()
    ref = P.sigmoid_focal_loss(x2, t, reduction="mean") * 2
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: P.sigmoid_focal_loss(torch.zeros(3), torch.zeros(4)), ValueError, "targets"),
        (lambda: P.sigmoid_focal_loss(torch.zeros(3, dtype=torch.long), torch.zeros(3)), TypeError, "inputs"),
        (lambda: P.sigmoid_focal_loss(torch.zeros(3), torch.zeros(3), alpha=2.0), ValueError, "alpha"),
        (lambda: P.sigmoid_focal_loss(torch.zeros(3), torch.zeros(3), gamma=float("nan")), ValueError, "gamma"),
        (lambda: P.sigmoid_focal_loss(torch.zeros(3), torch.zeros(3), reduction="avg"), ValueError, "reduction"),
        (lambda: P.sigmoid_focal_loss(torch.zeros(3), torch.zeros(3, device="meta")), ValueError, "device"),
    ],
)
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.interpreter
@pytest.mark.parametrize("gamma", [2.0, 1.5, 0.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_focal_interpreter(gamma, dtype):
    from pyvision_ops.kernels import losses as K

    x, t = logits_targets(1500, dtype=dtype, soft=True)
    g = torch.rand(1500, dtype=dtype)
    torch.testing.assert_close(K.sigmoid_focal_loss(x, t, 0.25, gamma), ops.sigmoid_focal_loss(x, t, 0.25, gamma),
                               rtol=1e-5, atol=1e-6)
    for a, b in zip(K.sigmoid_focal_loss_backward(g, x, t, 0.25, gamma),
                    ops.sigmoid_focal_loss_backward(g, x, t, 0.25, gamma)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    one = torch.tensor(0.3, dtype=dtype).expand(1500)  # an expanded scalar gradient is read in place
    for a, b in zip(K.sigmoid_focal_loss_backward(one, x, t, 0.25, gamma),
                    K.sigmoid_focal_loss_backward(one.contiguous(), x, t, 0.25, gamma)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    xi, ti = torch.tensor(INF_X, dtype=dtype), torch.tensor(INF_T, dtype=dtype)
    torch.testing.assert_close(K.sigmoid_focal_loss(xi, ti, 0.25, gamma), ops.sigmoid_focal_loss(xi, ti, 0.25, gamma))
    torch.testing.assert_close(K.sigmoid_focal_loss_backward(torch.ones_like(xi), xi, ti, 0.25, gamma)[0],
                               ops.sigmoid_focal_loss_backward(torch.ones_like(xi), xi, ti, 0.25, gamma)[0],
                               equal_nan=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("gamma", [0.5, 1.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_focal_interpreter_saturated(gamma, dtype):
    # right answers with tiny losses (t = 1 too: tiny 1 - p_t): relative agreement with the CPU
    # kernel (no atol to hide them; only below the normal range, times |x|: the CPU's exp
    # flushes there, numpy's not)
    from pyvision_ops.kernels import losses as K

    xs = [10.0, 17.0, 20.0, 30.0, 40.0, 80.0]
    x = torch.tensor([-v for v in xs] + xs, dtype=dtype)
    t = (x > 0).to(dtype)
    tiny = 1e3 * torch.finfo(dtype).tiny
    torch.testing.assert_close(K.sigmoid_focal_loss(x, t, 0.25, gamma), ops.sigmoid_focal_loss(x, t, 0.25, gamma),
                               rtol=1e-5, atol=tiny)
    g = torch.ones_like(x)
    for a, b in zip(K.sigmoid_focal_loss_backward(g, x, t, 0.25, gamma),
                    ops.sigmoid_focal_loss_backward(g, x, t, 0.25, gamma)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=tiny)


@pytest.mark.interpreter
@pytest.mark.parametrize("gamma", [0.0, 0.001, 1.5])
def test_triton_focal_interpreter_fp64_subnormal_one_minus_pt(gamma):
    from pyvision_ops.kernels import losses as K

    x, t, dt_limit = focal_fp64_subnormal_case()
    dx, dt = K.sigmoid_focal_loss_backward(torch.ones_like(x), x, t, 0.25, gamma)
    assert dx.abs().max() < 1e-300 and dt.isfinite().all()
    torch.testing.assert_close(dt[:2], dt_limit(gamma)[:2], rtol=1e-6, atol=0)


@pytest.mark.interpreter
@pytest.mark.parametrize("gamma", [1.0, 3.0, 4.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_focal_interpreter_outside_targets(gamma, dtype):
    from pyvision_ops.kernels import losses as K

    x, t = focal_outside_targets(dtype)
    g = torch.ones_like(x)
    loss = K.sigmoid_focal_loss(x, t, -1, gamma)
    torch.testing.assert_close(loss, ops.sigmoid_focal_loss(x, t, -1, gamma), rtol=1e-5, atol=1e-6, equal_nan=True)
    for a, b in zip(K.sigmoid_focal_loss_backward(g, x, t, -1, gamma),
                    ops.sigmoid_focal_loss_backward(g, x, t, -1, gamma)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert loss.isnan().any() == (gamma % 1 != 0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_focal_matches_cpu(dtype):
    x, t = logits_targets(100_000, dtype=dtype, soft=True)
    g = torch.rand(100_000).to(dtype)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    for gamma in (2.0, 1.5):
        torch.testing.assert_close(ops.sigmoid_focal_loss(x.cuda(), t.cuda(), 0.25, gamma).cpu(),
                                   ops.sigmoid_focal_loss(x, t, 0.25, gamma), rtol=tol, atol=tol)
        for a, b in zip(ops.sigmoid_focal_loss_backward(g.cuda(), x.cuda(), t.cuda(), 0.25, gamma),
                        ops.sigmoid_focal_loss_backward(g, x, t, 0.25, gamma)):
            torch.testing.assert_close(a.cpu(), b, rtol=tol * 10, atol=tol)


@pytest.mark.gpu
def test_cuda_focal_under_autocast_gives_fp32():
    x, t = logits_targets(10_000, dtype=torch.float16)
    x = x.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = P.sigmoid_focal_loss(x, t.cuda(), reduction="sum")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.cpu(), P.sigmoid_focal_loss(x.detach().cpu().float(), t.float(), reduction="sum"))
    (gx,) = torch.autograd.grad(loss, [x])
    assert gx.dtype == torch.float16


# ---------------------------------------------------------------- dice_loss

def seg_batch(n=2, c=5, h=13, w=17, dtype=torch.float64, ignore=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, c, (n, h, w), generator=g)
    if ignore is not None:
        y[torch.rand(n, h, w, generator=g) < 0.2] = ignore
    return x, y


def special_seg_batch():
    """seg_batch() with -inf logits (one class, all classes of an ignored position) and NaN
    logits at an ignored position."""
    x, y = seg_batch(c=4, h=5, w=6, ignore=255, seed=3)
    y[0, 0, :3] = 255
    x[0, 1, 2, 2] = float("-inf")
    x[0, :, 0, 0] = float("-inf")
    x[0, :, 0, 1] = float("nan")
    x[1, 0, 3] = float("-inf")
    return x, y


def test_dice_special_logits():
    # A -inf logit is probability 0; an ignored position counts for nothing, even with NaN
    # logits; a NaN logit at a counted position makes every class NaN.
    x, y = special_seg_batch()
    xr = x.clone().requires_grad_()
    loss = P.dice_loss(xr, y, ignore_index=255, reduction="none")
    torch.testing.assert_close(loss, reference.dice_loss(x, y, ignore_index=255, reduction="none"))
    (g,) = torch.autograd.grad(loss.sum(), [xr])
    valid = (y != 255).unsqueeze(1).expand_as(x)
    assert torch.isfinite(g[valid]).all() and not g[~valid].any()
    x[1, 2, 4, 4] = float("nan")
    y[1, 4, 4] = 1
    assert P.dice_loss(x, y, ignore_index=255, reduction="none").isnan().all()


@pytest.mark.interpreter
def test_triton_dice_interpreter_no_ignore_value_is_a_label():
    # without ignore_index, a target equal to the internal "no ignore" value is out of range
    # like any other (every statistic NaN: the CUDA kernels cannot raise), never ignored
    from pyvision_ops.kernels import losses as K

    from pyvision_ops.losses import _NO_IGNORE

    x, y = seg_batch(c=3, h=4, w=5, seed=13)
    y_min, y_big = y.clone(), y.clone()
    y_min[0, 1, 2], y_big[0, 1, 2] = _NO_IGNORE, 3
    for t in (y_min, y_big):
        assert K.dice_stats(x, t, _NO_IGNORE).isnan().all()
    assert not K.dice_stats(x, y_big, 3).isnan().any()  # ignored, it counts for nothing
    g = torch.rand(2, 3, dtype=torch.float64)
    torch.testing.assert_close(K.dice_stats_backward(g, x, y_min, _NO_IGNORE),
                               K.dice_stats_backward(g, x, y_big, _NO_IGNORE))


@pytest.mark.interpreter
def test_triton_dice_interpreter_special_logits():
    from pyvision_ops.kernels import losses as K

    x, y = special_seg_batch()
    for logits in (x, x.float()):  # -inf in the first class: the running max is -inf there
        torch.testing.assert_close(K.dice_stats(logits, y, 255), ops.dice_stats(logits, y, 255))
        g = torch.rand(2, 4, dtype=logits.dtype)
        torch.testing.assert_close(K.dice_stats_backward(g, logits, y, 255),
                                   ops.dice_stats_backward(g, logits, y, 255))
    # a +inf logit at a counted position makes every class NaN (its sum is caught once a position)
    x, y = x.clone(), y.clone()
    x[1, 2, 4, 5], y[1, 4, 5] = float("inf"), 0
    stats = K.dice_stats(x, y, 255)
    assert stats.isnan().all()
    torch.testing.assert_close(stats, ops.dice_stats(x, y, 255), equal_nan=True)


@pytest.mark.parametrize("ignore_index", [None, 255, -100, 1])  # 1: a class index, then never a target
@pytest.mark.parametrize("classes", [None, [0, 3]])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("smooth", [1.0, 0.0])
def test_dice_matches_reference(ignore_index, classes, reduction, smooth):
    x, y = seg_batch(ignore=ignore_index)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    import numpy as np

    ii = np.int64(ignore_index) if ignore_index == 1 else ignore_index  # NumPy ints are ints
    ours = P.dice_loss(x1, y, smooth, ii, classes, reduction)
    ref = reference.dice_loss(x2, y, smooth, ignore_index, classes, reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    w = torch.rand(ours.shape, dtype=torch.float64)
    (go,) = torch.autograd.grad((ours * w).sum(), [x1])
    (gr,) = torch.autograd.grad((ref * w).sum(), [x2])
    torch.testing.assert_close(go, gr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_dice_dtypes_and_layouts(dtype, tol):
    x, y = seg_batch(c=19, h=32, w=40, ignore=255)
    ours = P.dice_loss(x.to(dtype), y, ignore_index=255)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference.dice_loss(x.to(dtype), y, ignore_index=255), rtol=tol,
                               atol=tol)
    x1d = x[:, :, 0]  # [N, C, W]: any number of spatial dims
    torch.testing.assert_close(P.dice_loss(x1d, y[:, 0], ignore_index=255),
                               reference.dice_loss(x1d, y[:, 0], ignore_index=255))
    xcl = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(P.dice_loss(xcl, y, ignore_index=255), reference.dice_loss(x, y, ignore_index=255))


def test_dice_edge_cases_and_determinism():
    x, y = seg_batch()
    all_ignored = torch.full_like(y, 255)
    xr = x.clone().requires_grad_()
    loss = P.dice_loss(xr, all_ignored, ignore_index=255)
    assert loss.item() == 0.0  # (0 + smooth) / (0 + smooth) = 1 for every class
    (g,) = torch.autograd.grad(loss, [xr])
    assert (g == 0).all()
    # smooth = 0: 0 / 0 is NaN, yet the ignored positions still get no gradient
    loss = P.dice_loss(xr, all_ignored, smooth=0.0, ignore_index=255)
    assert loss.isnan()
    (g,) = torch.autograd.grad(loss, [xr])
    assert (g == 0).all()
    one = P.dice_loss(x[:, :, :1, :1], y[:, :1, :1])
    torch.testing.assert_close(one, reference.dice_loss(x[:, :, :1, :1], y[:, :1, :1]))
    big, yb = seg_batch(n=2, c=19, h=128, w=128, dtype=torch.float32, ignore=255)
    b1, b2 = big.clone().requires_grad_(), big.clone().requires_grad_()
    (ga,) = torch.autograd.grad(P.dice_loss(b1, yb, ignore_index=255), [b1])
    (gb,) = torch.autograd.grad(P.dice_loss(b2, yb, ignore_index=255), [b2])
    assert torch.equal(ga, gb)


def test_dice_opcheck_gradcheck_compile():
    x, y = seg_batch(n=2, c=3, h=4, w=5, ignore=255)
    xr = x.clone().requires_grad_()
    opcheck(ops.dice_stats, (xr, y, 255))
    opcheck(ops.dice_stats_backward, (torch.rand(2, 3, dtype=torch.float64), x, y, 255))
    assert torch.autograd.gradcheck(lambda t: P.dice_loss(t, y, ignore_index=255, reduction="none"), (xr,))
    f = torch.compile(lambda t, u: P.dice_loss(t, u, ignore_index=255) * 3, fullgraph=True)
    torch.testing.assert_close(f(x, y), P.dice_loss(x, y, ignore_index=255) * 3)


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 5, dtype=torch.long)), ValueError, "target"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4)), TypeError, "target"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.uint64)), TypeError, "target"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)), TypeError,
         "logits"),
        (lambda: P.dice_loss(torch.zeros(2), torch.zeros(2, dtype=torch.long)), ValueError, "logits"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.full((2, 4), 3)), ValueError, "outside"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), classes=[5]), ValueError,
         "classes"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), classes=[]), ValueError,
         "classes"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), classes=[1.7]), TypeError,
         "classes"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), classes=[True]), TypeError,
         "classes"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), classes="all"), TypeError,
         "classes"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), reduction="avg"), ValueError,
         "reduction"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), ignore_index=2.5), TypeError,
         "ignore_index"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), smooth=float("inf")),
         ValueError, "smooth"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), smooth=-1.0), ValueError,
         "smooth"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), ignore_index=2**63),
         ValueError, "ignore_index"),
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), ignore_index=-2**63),
         ValueError, "ignore_index"),
        # -2**63 is the internal "no ignore" value: as a target it is out of range, not ignored
        (lambda: P.dice_loss(torch.zeros(2, 3, 4), torch.full((2, 4), -2**63)), ValueError,
         "outside"),
    ],
)
def test_dice_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("c", [1, 5, 19])
def test_triton_dice_interpreter(dtype, c):
    from pyvision_ops.kernels import losses as K

    ig = 255 if c < 5 else 3  # also an ignore_index that is a class index
    x, y = seg_batch(c=c, h=37, w=41, dtype=dtype, ignore=ig)
    torch.testing.assert_close(K.dice_stats(x, y, ig), ops.dice_stats(x, y, ig), rtol=1e-5, atol=1e-5)
    g = torch.rand(2, c, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    half = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-5, atol=1e-6)  # fp16 gradient
    torch.testing.assert_close(K.dice_stats_backward(g, x, y, ig), ops.dice_stats_backward(g, x, y, ig), **half)


@pytest.mark.interpreter
def test_triton_dice_interpreter_nan_grad_leaves_ignored_positions_at_zero():
    from pyvision_ops.kernels import losses as K

    x, y = seg_batch(ignore=255)
    y[0] = 255
    g = torch.full((2, 5), math.nan, dtype=x.dtype)
    for dz in (K.dice_stats_backward(g, x, y, 255), ops.dice_stats_backward(g, x, y, 255)):
        assert (dz[0] == 0).all() and dz[1].isnan().any()


@pytest.mark.interpreter
def test_triton_launchers_check_dtypes_as_the_cpu_ops():
    # what the C++ ops reject, a direct call of a Triton launcher rejects too
    from pyvision_ops.kernels import box_iou as B
    from pyvision_ops.kernels import losses as K

    x = torch.randn(6)
    with pytest.raises(RuntimeError, match="floating point dtype of inputs"):
        K.sigmoid_focal_loss_backward(torch.ones(6, dtype=torch.float64), x, x, 0.25, 2.0)
    with pytest.raises(RuntimeError, match="fp32 or fp64"):
        K.lovasz_gradient(torch.ones(2, 3, dtype=torch.float16), torch.tensor([3, 3]))
    b = torch.tensor([[0, 0, 2, 2]])
    with pytest.raises(RuntimeError, match="floating point dtype"):
        B.pairwise_box_iou(b[None], b[None], 0, 1e-7)
    with pytest.raises(RuntimeError, match="floating point dtype"):
        B.matched_box_iou(b, b, 0, False, 1e-7)


@pytest.mark.gpu
def test_cuda_label_outside_classes_gives_nan():
    # the CPU raises; CUDA cannot without a sync: the loss and gradient are NaN instead
    x, y = seg_batch(c=5, ignore=255)
    y[1, 3, 4] = 5
    xg, yg = x.cuda().requires_grad_(), y.cuda()
    for loss in (P.dice_loss(xg, yg, ignore_index=255), P.lovasz_softmax(xg, yg, ignore_index=255, from_logits=True),
                 P.lovasz_hinge(xg[:, 0], yg.clamp(max=1) + (yg == 5).long(), ignore_index=255)):
        (g,) = torch.autograd.grad(loss, [xg])
        assert loss.isnan() and g.isnan().any()
    yi = torch.where(yg == 5, 255, yg)  # the same batch with that label ignored
    for loss in (P.dice_loss(xg, yi, ignore_index=255), P.lovasz_softmax(xg, yi, ignore_index=255, from_logits=True)):
        assert loss.isfinite()


@pytest.mark.gpu
def test_cuda_dice_matches_cpu():
    x, y = seg_batch(n=2, c=19, h=256, w=300, dtype=torch.float32, ignore=255)
    torch.testing.assert_close(ops.dice_stats(x.cuda(), y.cuda(), 255).cpu(), ops.dice_stats(x, y, 255),
                               rtol=1e-4, atol=1e-3)
    g = torch.rand(2, 19)
    torch.testing.assert_close(ops.dice_stats_backward(g.cuda(), x.cuda(), y.cuda(), 255).cpu(),
                               ops.dice_stats_backward(g, x, y, 255), rtol=1e-4, atol=1e-6)


# -------------------------------------------------------------------- Lovasz

@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("classes", ["present", "all", [1, 3]])
@pytest.mark.parametrize("ignore_index", [None, 255])
def test_lovasz_softmax_matches_reference(per_image, classes, ignore_index):
    x, y = seg_batch(ignore=ignore_index, seed=2)
    y[1][y[1] == 3] = 0  # class 3 absent from image 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = P.lovasz_softmax(x1, y, classes, per_image, ignore_index, from_logits=True)
    ref = reference.lovasz_softmax(x2, y, classes, per_image, ignore_index, from_logits=True)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    (go,) = torch.autograd.grad(ours, [x1])
    (gr,) = torch.autograd.grad(ref, [x2])
    torch.testing.assert_close(go, gr, rtol=1e-10, atol=1e-12)


def test_lovasz_softmax_probas_ties_and_edge_cases():
    x, y = seg_batch(c=4, seed=3)
    p = torch.softmax(x, 1)
    torch.testing.assert_close(P.lovasz_softmax(p, y), reference.lovasz_softmax(p, y))
    # ties: constant probabilities give equal errors; stable order makes gradients reproducible
    flat = torch.full_like(p, 0.25).requires_grad_()
    (g1,) = torch.autograd.grad(P.lovasz_softmax(flat, y), [flat])
    (g2,) = torch.autograd.grad(P.lovasz_softmax(flat, y), [flat])
    assert torch.equal(g1, g2)
    (gr,) = torch.autograd.grad(reference.lovasz_softmax(flat, y), [flat])
    torch.testing.assert_close(g1, gr)
    # every position ignored, and a single valid position
    xr = x.clone().requires_grad_()
    loss = P.lovasz_softmax(xr, torch.full_like(y, 255), ignore_index=255, from_logits=True)
    (g,) = torch.autograd.grad(loss, [xr])
    assert loss.item() == 0 and (g == 0).all()
    one = torch.full_like(y, 255)
    one[0, 0, 0] = 2
    torch.testing.assert_close(P.lovasz_softmax(x, one, ignore_index=255, from_logits=True),
                               reference.lovasz_softmax(x, one, ignore_index=255, from_logits=True))
    assert P.lovasz_softmax(x.float(), y, from_logits=True).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lovasz_half_logits_take_the_softmax_in_fp32(dtype):
    # from_logits with fp16/bf16 logits: the probabilities are fp32 (rounded to bf16 first,
    # the gradient was off by ~4e-3 relative): loss and gradient as the float64 reference's
    # on the same (rounded) logits, to fp32 accuracy and the gradient's final rounding
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 16, 16, generator=g).to(dtype)
    y = torch.randint(0, 4, (2, 16, 16), generator=g)
    x1, x2 = x.clone().requires_grad_(), x.double().requires_grad_()
    ours, ref = P.lovasz_softmax(x1, y, from_logits=True), reference.lovasz_softmax(x2, y, from_logits=True)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-7)
    (g1,), (g2,) = torch.autograd.grad(ours, [x1]), torch.autograd.grad(ref, [x2])
    assert g1.dtype == dtype
    torch.testing.assert_close(g1.double(), g2.to(dtype).double(), rtol=0, atol=torch.finfo(dtype).eps * g2.abs().max())


@pytest.mark.parametrize("per_image", [False, True])
def test_repeated_classes_count_again(per_image):
    # the reference loops over the list: class 2 listed twice weighs twice
    x, y = seg_batch(c=4, seed=11)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = P.lovasz_softmax(x1, y, [2, 2, 1], per_image, from_logits=True)
    ref = reference.lovasz_softmax(x2, y, [2, 2, 1], per_image, from_logits=True)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, [x1]), torch.autograd.grad(ref, [x2]))
    assert abs(ours.item() - P.lovasz_softmax(x, y, [2, 1], per_image, from_logits=True).item()) > 1e-6
    # dice_loss weighs them the same way
    d = P.dice_loss(x, y, classes=[2, 2, 1], reduction="none")
    torch.testing.assert_close(P.dice_loss(x, y, classes=[2, 2, 1]), (2 * d[0] + d[2]) / 3)
    # NumPy ints are class indices too (as for every other int argument)
    import numpy as np

    listed = [np.int64(2), np.int32(2), np.uint8(1)]
    torch.testing.assert_close(P.dice_loss(x, y, classes=listed), P.dice_loss(x, y, classes=[2, 2, 1]))
    torch.testing.assert_close(P.lovasz_softmax(x, y, listed, per_image, from_logits=True), ours.detach())


@pytest.mark.parametrize("classes", ["present", [0, 3]])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lovasz_softmax_class_left_out_ignores_its_channel(classes, bad):
    # class 2: absent from the labels and not in the list, so its channel is not averaged
    x, y = seg_batch(c=4, seed=12)
    y[y == 2] = 1
    p = torch.softmax(x, 1)
    p_bad = p.clone()
    p_bad[0, 2, 1, 1] = bad
    p1, p2 = p_bad.requires_grad_(), p.clone().requires_grad_()
    ours, clean = P.lovasz_softmax(p1, y, classes), P.lovasz_softmax(p2, y, classes)
    torch.testing.assert_close(ours, clean)
    (g1,) = torch.autograd.grad(ours, [p1])
    (g2,) = torch.autograd.grad(clean, [p2])
    torch.testing.assert_close(g1, g2)
    assert not g1[:, 2].any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_lovasz_softmax_ignored_logits_count_for_nothing(bad):
    x, y = seg_batch(c=4, ignore=255, seed=15)
    y[0, 2, 3] = 255
    x_bad = x.clone()
    x_bad[0, :, 2, 3] = bad
    x_bad[0, 1, 2, 3] = 0.5  # mixed with finite ones
    x1, x2 = x_bad.requires_grad_(), x.clone().requires_grad_()
    ours = P.lovasz_softmax(x1, y, ignore_index=255, from_logits=True)
    clean = P.lovasz_softmax(x2, y, ignore_index=255, from_logits=True)
    torch.testing.assert_close(ours, clean)
    (g1,) = torch.autograd.grad(ours, [x1])
    (g2,) = torch.autograd.grad(clean, [x2])
    torch.testing.assert_close(g1, g2)
    assert not g1[0, :, 2, 3].any()


@pytest.mark.parametrize("per_image", [True, False])
def test_lovasz_hinge_matches_reference(per_image):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 9, 11, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (3, 9, 11), generator=g)
    y[0, :3] = 255
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = P.lovasz_hinge(x1, y, per_image, 255)
    ref = reference.lovasz_hinge(x2, y, per_image, 255)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, [x1]), torch.autograd.grad(ref, [x2]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lovasz_hinge_half_logits_accumulate_in_fp32(dtype):
    # the errors 1 - x (2y - 1) are fp32: in fp16 1 - 1e-4 would round to 1
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 7, 9, generator=g) * 1e-2).to(dtype)
    y = torch.randint(0, 2, (2, 7, 9), generator=g)
    x1, x2 = x.clone().requires_grad_(), x.double().requires_grad_()
    ours, ref = P.lovasz_hinge(x1, y), reference.lovasz_hinge(x2, y)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-7)
    (g1,) = torch.autograd.grad(ours, [x1])
    assert g1.dtype == dtype
    torch.testing.assert_close(g1.double(), torch.autograd.grad(ref, [x2])[0].to(dtype).double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lovasz_hinge_infinite_logit_next_to_ignored(dtype):
    # error 1 - inf = -inf at a valid pixel must not trade places with the ignored pixel
    inf = float("inf")
    x = torch.tensor([[0.0, inf, 0.3]], dtype=dtype, requires_grad=True)
    loss = P.lovasz_hinge(x, torch.tensor([[255, 1, 0]]), ignore_index=255)
    (g,) = torch.autograd.grad(loss, [x])
    xv = torch.tensor([[inf, 0.3]], dtype=torch.float64, requires_grad=True)
    ref = reference.lovasz_hinge(xv, torch.tensor([[1, 0]]))
    torch.testing.assert_close(loss.double(), ref)  # 0.65
    torch.testing.assert_close(g[0, 1:].double(), torch.autograd.grad(ref, [xv])[0][0])  # [0, 0.5]
    assert g[0, 0] == 0
    nan_x = torch.tensor([[0.0, float("nan"), 0.3]], dtype=dtype)
    assert P.lovasz_hinge(nan_x, torch.tensor([[255, 1, 0]]), ignore_index=255).isnan()


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)])
def test_lovasz_no_position(per_image, shape):
    # N = 0 or no spatial position: loss 0 and zero gradients, as for all positions ignored
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(shape[:1] + shape[2:], dtype=torch.long)
    for classes in ("present", "all", [1]):
        loss = P.lovasz_softmax(x, y, classes, per_image, from_logits=True)
        (g,) = torch.autograd.grad(loss, [x])
        assert loss.item() == 0 and g.shape == x.shape and not g.any()
    xh = x[:, 0].detach().requires_grad_()
    loss = P.lovasz_hinge(xh, y, per_image)
    (g,) = torch.autograd.grad(loss, [xh])
    assert loss.item() == 0 and g.shape == xh.shape


def test_lovasz_hinge_compiled_bad_label_gives_nan():
    # as documented: only eager mode on the CPU can raise; compiled, a bad label makes the loss
    # and its gradient NaN (an ignored one does not)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(14), requires_grad=True)
    y = torch.tensor([[0, 1, 2, 1, 0, 0], [1, 1, 0, 0, 1, 0]])
    f = torch.compile(lambda a, b, ig: P.lovasz_hinge(a, b, ignore_index=ig), fullgraph=True)
    loss = f(x, y, None)
    (g,) = torch.autograd.grad(loss, [x])
    assert loss.isnan() and g.isnan().any()  # a relu that cuts an error still gives 0
    torch.testing.assert_close(f(x, y, 2), P.lovasz_hinge(x, y, ignore_index=2))
    with pytest.raises(ValueError, match="labels"):
        P.lovasz_hinge(x, y)


def test_nan_if_any():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    for bad, want in ((torch.tensor([False, False]), [1.0, 2.0]), (torch.tensor([[False], [True]]), [math.nan] * 2)):
        out = _utils.nan_if_any(x, bad)
        assert out.dtype == x.dtype
        torch.testing.assert_close(out, torch.tensor(want, dtype=x.dtype), equal_nan=True)
        (g,) = torch.autograd.grad(out.sum(), [x])
        assert g.isnan().all() == bad.any()


def test_lovasz_gradient_op_exact_counts_opcheck_compile():
    fg = torch.tensor([[1.0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    lengths = torch.tensor([6, 4, 2])
    out = ops.lovasz_gradient(fg, lengths)
    for r in range(3):
        torch.testing.assert_close(out[r, :lengths[r]].double(), reference.lovasz_grad(fg[r, :lengths[r]].double()))
    assert (out[1, 4:] == 0).all() and (out[2, 2:] == 0).all()
    opcheck(ops.lovasz_gradient, (fg, lengths))
    # counts are int64: a row longer than 2^24 would lose 1s in a float32 cumsum
    big = torch.zeros(1, (1 << 24) + 3)
    big[0, -1] = 1
    g = ops.lovasz_gradient(big, torch.tensor([big.shape[1]]))
    assert g[0, -1].item() > 0  # the last entry's increment is still seen
    x, y = seg_batch(c=3, h=5, w=6, seed=5)
    f = torch.compile(lambda a, b: P.lovasz_softmax(a, b, from_logits=True), fullgraph=True)
    torch.testing.assert_close(f(x, y), P.lovasz_softmax(x, y, from_logits=True))


@pytest.mark.parametrize("loss", [P.dice_loss, P.lovasz_softmax])
def test_class_list_compiles(loss):
    # the list is checked in Python: no data-dependent branch breaks the graph
    x, y = seg_batch(c=4, h=5, w=6, seed=10)
    f = torch.compile(lambda a, b: loss(a, b, classes=[3, 1]) * 2, fullgraph=True)
    torch.testing.assert_close(f(x, y), loss(x, y, classes=[3, 1]) * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lovasz_softmax_rows_op_dtypes_nan_opcheck(dtype):
    x, y = seg_batch(c=5, h=7, w=9, ignore=255, seed=8)
    p = torch.softmax(x, 1).to(dtype)
    for per_image in (False, True):
        pr = p.clone().requires_grad_()
        ours = P.lovasz_softmax(pr, y, per_image=per_image, ignore_index=255)
        assert ours.dtype == torch.float32
        pd = p.double().requires_grad_()
        ref = reference.lovasz_softmax(pd, y, per_image=per_image, ignore_index=255)
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
        (go,) = torch.autograd.grad(ours, [pr])
        (gr,) = torch.autograd.grad(ref, [pd])
        assert go.dtype == dtype
        torch.testing.assert_close(go.double(), gr, rtol=1e-3, atol=1e-3)
    opcheck(ops.lovasz_softmax_rows, (p.float().reshape(2, 5, -1).requires_grad_(), y.reshape(2, -1), 255, False))
    opcheck(ops.lovasz_softmax_rows, (p.double().reshape(2, 5, -1), (y % 5).reshape(2, -1), None, True))
    # a NaN probability makes its rows' losses NaN (it sorts first), not a crash
    bad = p.float().clone()
    bad[0, 1, 0, 0] = float("nan")
    losses = ops.lovasz_softmax_rows(bad.reshape(2, 5, -1), y.reshape(2, -1), 255, True)[0]
    assert losses[0, 1].isnan() or y[0, 0, 0] == 255
    assert not losses[1].isnan().any()


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: P.lovasz_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), ignore_index=1.5),
         TypeError, "ignore_index"),
        (lambda: P.lovasz_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 5, dtype=torch.long)), ValueError, "labels"),
        (lambda: P.lovasz_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4)), TypeError, "labels"),
        (lambda: P.lovasz_hinge(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.uint64)), TypeError, "labels"),
        (lambda: P.lovasz_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), classes="some"),
         ValueError, "classes"),
        (lambda: P.lovasz_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), classes=[3]),
         ValueError, "classes"),
        (lambda: P.lovasz_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), classes=[1.7]),
         TypeError, "classes"),
        (lambda: P.lovasz_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), classes=[True]),
         TypeError, "classes"),
        (lambda: P.lovasz_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), classes=None),
         TypeError, "classes"),
        (lambda: P.lovasz_hinge(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)), TypeError,
         "logits"),
        (lambda: P.lovasz_softmax(torch.zeros(2, 3, 4), torch.full((2, 4), 3)), ValueError, "labels value 3"),
        (lambda: P.lovasz_softmax(torch.zeros(2, 3, 4), torch.full((2, 4), -1), ignore_index=255), ValueError,
         "outside"),
        (lambda: P.lovasz_softmax(torch.zeros(2, 0, 4), torch.zeros(2, 4, dtype=torch.long)), ValueError, "class"),
        (lambda: P.lovasz_hinge(torch.zeros(2, 4), torch.full((2, 4), 2)), ValueError, "labels"),
        # 255 in a uint8 tensor is not ignore_index -1 (torch would wrap -1 to 255 in a uint8 comparison)
        (lambda: P.lovasz_hinge(torch.zeros(2, 4), torch.full((2, 4), 255, dtype=torch.uint8), ignore_index=-1),
         ValueError, "got 255"),
        (lambda: P.lovasz_hinge(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long), ignore_index="x"), TypeError,
         "ignore_index"),
        (lambda: P.lovasz_hinge(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long), per_image="no"), TypeError,
         "per_image"),
        (lambda: P.lovasz_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), per_image="no"),
         TypeError, "per_image"),
        (lambda: P.lovasz_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), from_logits=1),
         TypeError, "from_logits"),
        (lambda: P.lovasz_hinge(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long), ignore_index=2**63),
         ValueError, "ignore_index"),
        (lambda: P.lovasz_softmax(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), ignore_index=2**63),
         ValueError, "ignore_index"),
    ],
)
def test_lovasz_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_lovasz_softmax_narrow_labels_compare_ignore_index_as_int64(dtype):
    # ignore_index outside the labels' dtype (256 for uint8) ignores nothing, also in the
    # from_logits masking (a uint8 comparison would read it as 0)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (2, 5, 4), generator=torch.Generator().manual_seed(4))
    big = torch.iinfo(dtype).max + 1
    for from_logits in (False, True):
        p = x if from_logits else x.softmax(1)
        torch.testing.assert_close(P.lovasz_softmax(p, y.to(dtype), ignore_index=big, from_logits=from_logits),
                                   reference.lovasz_softmax(p, y, from_logits=from_logits))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_lovasz_gradient_interpreter(dtype):
    from pyvision_ops.kernels import losses as K

    g = torch.Generator().manual_seed(6)
    fg = (torch.rand(5, 2500, generator=g) > 0.6).to(dtype)
    lengths = torch.tensor([2500, 0, 1, 1024, 2047])
    torch.testing.assert_close(K.lovasz_gradient(fg, lengths), ops.lovasz_gradient(fg, lengths), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.interpreter
@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("ignore_index", [None, 255])
@pytest.mark.parametrize("chunk", [None, 1, 3 * 2 * 30 * 41])  # all classes, one, three per sort
def test_triton_lovasz_softmax_rows_interpreter(per_image, ignore_index, chunk, monkeypatch):
    from pyvision_ops.kernels import losses as K

    if chunk:
        monkeypatch.setattr(K, "_LOVASZ_CHUNK", chunk)
    x, y = seg_batch(c=4, h=30, w=41, ignore=ignore_index, seed=9)
    args = (torch.softmax(x, 1).float().reshape(2, 4, -1), y.reshape(2, -1), ignore_index, per_image)
    for a, b in zip(K.lovasz_softmax_rows(*args), ops.lovasz_softmax_rows(*args)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    empty = (torch.zeros(0, 4, 6), torch.zeros(0, 6, dtype=torch.long), ignore_index, per_image)
    for a, b in zip(K.lovasz_softmax_rows(*empty), ops.lovasz_softmax_rows(*empty)):
        torch.testing.assert_close(a, b)


def _odd_lovasz_rows(dtype):
    """Values outside [0, 1] (sign(p - [y = c]) both ways), exact 0 / 1 (zero errors), ties, NaN
    at a valid and at an ignored position, ignore_index 2 inside [0, C), an image all ignored."""
    g = torch.Generator().manual_seed(11)
    p = torch.rand(3, 5, 37, generator=g, dtype=torch.float64) * 1.4 - 0.2
    p[:, :, :4] = torch.tensor([0.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    y = torch.randint(0, 5, (3, 37), generator=g)
    y[:, ::7] = 2
    y[2] = 2
    p[0, 1, 5], p[1, 3, 7] = float("nan"), float("nan")  # y[1, 7] == 2: ignored
    return p.to(dtype), y


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("per_image", [False, True])
def test_triton_lovasz_softmax_rows_interpreter_odd_values(dtype, per_image, monkeypatch):
    from pyvision_ops.kernels import losses as K

    monkeypatch.setattr(K, "_LOVASZ_CHUNK", 2 * 3 * 37)  # two classes per sort
    p, y = _odd_lovasz_rows(dtype)
    for a, b in zip(K.lovasz_softmax_rows(p, y, 2, per_image), ops.lovasz_softmax_rows(p, y, 2, per_image)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_cuda_lovasz_softmax_rows_odd_values_and_labels_outside_classes(dtype):
    p, y = _odd_lovasz_rows(dtype)
    for per_image in (False, True):
        ours = ops.lovasz_softmax_rows(p.cuda(), y.cuda(), 2, per_image)
        for a, b in zip(ours, ops.lovasz_softmax_rows(p, y, 2, per_image)):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6, equal_nan=True)
    # a label outside [0, C) is background for every class (as an extra class C on the CPU)
    y[0, 1:9] = 5
    extra = torch.cat([p, torch.rand(3, 1, 37, dtype=dtype)], 1)
    for per_image in (False, True):
        ours = ops.lovasz_softmax_rows(p.cuda(), y.cuda(), 2, per_image)
        want = ops.lovasz_softmax_rows(extra, y, 2, per_image)
        for a, b in zip(ours, (want[0][:, :5], want[1][:, :5], want[2][:, :5])):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.interpreter
def test_triton_lovasz_softmax_rows_interpreter_label_outside_classes_is_background():
    # on CUDA (no sync to check it) a label outside [0, C) is background for every class: the
    # same rows as the CPU op gives with an extra class C holding those labels
    from pyvision_ops.kernels import losses as K

    g = torch.Generator().manual_seed(12)
    p = torch.rand(2, 4, 50, generator=g)
    y = torch.randint(0, 4, (2, 50), generator=g)
    y[0, :9] = 4
    extra = torch.cat([p, torch.rand(2, 1, 50, generator=g)], 1)
    for per_image in (False, True):
        ours = K.lovasz_softmax_rows(p, y, None, per_image)
        want = ops.lovasz_softmax_rows(extra, y, None, per_image)
        for a, b in zip(ours, (want[0][:, :4], want[1][:, :4], want[2][:, :4])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [None, 4 * 2 * 64 * 96])  # all 19 classes in one sort; 4 per sort
def test_cuda_lovasz_matches_cpu(chunk, monkeypatch):
    from pyvision_ops.kernels import losses as K

    if chunk:
        monkeypatch.setattr(K, "_LOVASZ_CHUNK", chunk)
    x, y = seg_batch(n=2, c=19, h=64, w=96, dtype=torch.float32, ignore=255, seed=7)
    for per_image in (False, True):
        xg, xc = x.cuda().requires_grad_(), x.clone().requires_grad_()
        a = P.lovasz_softmax(xg, y.cuda(), per_image=per_image, ignore_index=255, from_logits=True)
        b = P.lovasz_softmax(xc, y, per_image=per_image, ignore_index=255, from_logits=True)
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.autograd.grad(a, [xg])[0].cpu(), torch.autograd.grad(b, [xc])[0],
                                   rtol=1e-4, atol=1e-7)


@pytest.mark.interpreter
def test_triton_launchers_check_shapes_like_the_cpu_ops():
    # direct op calls with mismatched shapes raise instead of reading past a tensor's end
    from pyvision_ops.kernels import cross_entropy as KC
    from pyvision_ops.kernels import losses as KL

    x, y = torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)
    calls = [
        lambda: KL.sigmoid_focal_loss(torch.rand(5), torch.rand(4), 0.25, 2.0),
        lambda: KL.sigmoid_focal_loss_backward(torch.rand(4), torch.rand(5), torch.rand(5), 0.25, 2.0),
        lambda: KL.dice_stats(x, y, -100),
        lambda: KL.dice_stats_backward(torch.ones(2, 4), x, torch.zeros(2, 5, dtype=torch.long), -100),
        lambda: KL.lovasz_gradient(torch.rand(3, 7), torch.tensor([7, 7])),
        lambda: KL.lovasz_softmax_rows(x, y, -100, False),
        lambda: KC.softmax_cross_entropy(x, y, None, -100, 0.0, 1),
        lambda: KC.softmax_cross_entropy(x, torch.zeros(2, 5, dtype=torch.long), torch.ones(4), -100, 0.0, 1),
        lambda: KC.softmax_cross_entropy(x, torch.zeros(2, 5, dtype=torch.long), None, -100, 0.0, 3),
        lambda: KC.softmax_cross_entropy_backward(torch.ones(2, 5), x, torch.zeros(2, 5, dtype=torch.long), None,
                                                  torch.zeros(2, 2, 5), torch.ones(()), -100, 0.0, 1),
        lambda: KC.upsample_cross_entropy(x[..., None], torch.zeros(1, 4, 4, dtype=torch.long), False, None, -100, 0.0,
                                          0),
    ]
    for call in calls:
        with pytest.raises(RuntimeError):
            call()
    # [P, C] logits take a dice program a position: at most 2^31 - 1, refused before the
    # partial sums (32 GB here) are allocated; expanded: nothing of that size exists
    z, t = torch.zeros(1, 2, dtype=torch.float16).expand(2**31, 2), torch.zeros(1, dtype=torch.long).expand(2**31)
    with pytest.raises(NotImplementedError, match="dice_stats: 2147483648 rows"):
        KL.dice_stats(z, t, -100)
    with pytest.raises(NotImplementedError, match="dice_stats_backward: 2147483648 rows"):
        KL.dice_stats_backward(torch.ones(2, 2), z, t, -100)
    # the Lovasz kernels take a program per block of 1024 entries of a row (of a group's
    # positions): at most 2^31 - 1 programs
    with pytest.raises(NotImplementedError, match="lovasz_gradient: 2147483648 rows"):
        KL.lovasz_gradient(torch.zeros(1, 1).expand(2**31, 1), torch.ones(1, dtype=torch.long).expand(2**31))
    with pytest.raises(NotImplementedError, match="lovasz_softmax_rows: 2147483648 rows"):
        KL.lovasz_softmax_rows(torch.zeros(1, 1, 1).expand(2**31, 1, 1), torch.zeros(1, 1, dtype=torch.long).expand(
            2**31, 1), None, True)


@pytest.mark.interpreter
def test_op_calls_reject_what_the_fronts_reject_on_both_backends():
    # option values the Python fronts reject (label_smoothing outside [0, 1], alpha outside
    # [0, 1] but for -1, NaN), and a backward given stats or wsum of another dtype than its
    # forward made: rejected by a direct op call, the C++ kernel and the Triton launcher alike
    from pyvision_ops.kernels import cross_entropy as KC
    from pyvision_ops.kernels import losses as KL

    x, y = torch.randn(2, 3, 5, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.long)
    x4, y4 = x[..., None], torch.zeros(2, 4, 4, dtype=torch.long)
    _, wsum, stats = ops.softmax_cross_entropy(x, y, None, -100, 0.0, 0)
    _, uwsum, ustats = ops.upsample_cross_entropy(x4, y4, False, None, -100, 0.0, 0)
    g, ug = torch.ones(2, 5, dtype=torch.float64), torch.ones(2, 4, 4, dtype=torch.float64)
    f = torch.randn(6, dtype=torch.float64)
    for bad in (math.nan, -0.1, 2.0):
        for ce in (ops, KC):
            calls = [(ce.softmax_cross_entropy, (x, y, None, -100, bad, 0)),
                     (ce.softmax_cross_entropy_backward, (g, x, y, None, stats, wsum, -100, bad, 0)),
                     (ce.upsample_cross_entropy, (x4, y4, False, None, -100, bad, 0)),
                     (ce.upsample_cross_entropy_backward, (ug, x4, y4, False, None, ustats, uwsum, -100, bad, 0))]
            for fn, args in calls:
                with pytest.raises(ValueError, match="label_smoothing must be in"):
                    fn(*args)
        for focal in (ops, KL):
            with pytest.raises(ValueError, match="alpha must be in"):
                focal.sigmoid_focal_loss(f, f, bad, 2.0)
            with pytest.raises(ValueError, match="alpha must be in"):
                focal.sigmoid_focal_loss_backward(f, f, f, bad, 2.0)
    for ce in (ops, KC):
        for dtype in (torch.int64, torch.bool, torch.float32):  # fp64 logits: the forward's are fp64
            with pytest.raises(RuntimeError, match="stats"):
                ce.softmax_cross_entropy_backward(g, x, y, None, stats.to(dtype), wsum, -100, 0.0, 0)
            with pytest.raises(RuntimeError, match="stats"):
                ce.softmax_cross_entropy_backward(g, x, y, None, stats, wsum.to(dtype), -100, 0.0, 0)
            with pytest.raises(RuntimeError, match="stats"):
                ce.upsample_cross_entropy_backward(ug, x4, y4, False, None, ustats.to(dtype), uwsum, -100, 0.0, 0)
    for focal in (ops, KL):  # -1 (no weight) and the ends of [0, 1] stay accepted
        for alpha in (-1.0, 0.0, 1.0):
            torch.testing.assert_close(focal.sigmoid_focal_loss(f, f, alpha, 2.0),
                                       ops.sigmoid_focal_loss(f, f, alpha, 2.0))


@pytest.mark.parametrize("loss", ["focal", "dice", "lovasz"])
def test_compile_with_channels_last_logits(loss):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (2, 6, 7), generator=g)
    t = torch.rand(2, 5, 6, 7, generator=g, dtype=torch.float64)
    fn = {"focal": lambda a: P.sigmoid_focal_loss(a, t, reduction="mean"),
          "dice": lambda a: P.dice_loss(a, y),
          "lovasz": lambda a: P.lovasz_softmax(a, y, from_logits=True)}[loss]
    check_compiled_channels_last(fn, x)

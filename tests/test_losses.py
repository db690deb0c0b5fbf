import pytest
import torch
import torchvision.ops as tv
from conftest import opcheck

import pyvision_ops as P

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

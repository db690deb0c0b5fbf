import importlib.util
import os

import torch

# Triton launchers run on CPU tensors under the interpreter; it must be set
# before any @triton.jit module is imported. Never on a machine with a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import pyvision_ops  # noqa: E402,F401

HAS_CUDA = torch.cuda.is_available()
HAS_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "interpreter" in item.keywords and not HAS_INTERPRETER:
            item.add_marker(pytest.mark.skip(reason="needs TRITON_INTERPRET=1 and triton (CPU-only machines)"))


OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck(op, args, kwargs=None):
    """torch.library.opcheck with every test; raises on the first failure."""
    result = torch.library.opcheck(op, args, kwargs, test_utils=OPCHECK_UTILS, raise_exception=True)
    assert all(v == "SUCCESS" for v in result.values()), result


def check_compiled_channels_last(loss_fn, x):
    """loss_fn(x) forward and backward under torch.compile(fullgraph=True) with channels_last
    x: the same loss and gradient as eager (a fake kernel whose output strides differ from
    the real kernel's fails here). Inductor's caches are off: a cached graph would keep the
    strides of an older fake kernel."""
    import torch._inductor.config as inductor_config

    x = x.contiguous(memory_format=torch.channels_last)
    results = []
    with inductor_config.patch(force_disable_caches=True):
        for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
            xr = x.detach().clone().requires_grad_()
            loss = fn(xr)
            loss.backward()
            results.append((loss.detach(), xr.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])

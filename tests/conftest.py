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

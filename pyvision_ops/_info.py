"""build_info() and the op/backend table printed by `python -m pyvision_ops`."""

import importlib.util

import torch

from . import _C
from ._library import TRITON_KERNELS


def build_info() -> dict:
    """How the extension was built and what this machine offers.

    Keys: version, torch_version (built against), torch_runtime, cuda (CUDA C++
    kernels compiled), cuda_archs, openmp, triton (importable), cuda_available,
    cpu_threads.
    """
    info = dict(_C.build_info())
    info["torch_runtime"] = torch.__version__
    info["triton"] = importlib.util.find_spec("triton") is not None
    info["cuda_available"] = torch.cuda.is_available()
    info["cpu_threads"] = torch.get_num_threads()
    return info


def _ops() -> list[str]:
    names = set()
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("pyvision_ops::"):
            names.add(schema.name.split("::", 1)[1])
    return sorted(names)


def op_table() -> list[dict]:
    """One row per op: which backends it has, and whether each can run here."""
    info = build_info()
    rows = []
    for op in _ops():
        qualname = f"pyvision_ops::{op}"
        cpu = torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
        if op in TRITON_KERNELS:
            cuda = "Triton" + ("" if info["triton"] else " (triton missing)")
        elif torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"):
            cuda = "CUDA C++"
        else:
            cuda = "-"
        runs_on_cuda = cuda != "-" and "missing" not in cuda and info["cuda_available"]
        rows.append({"op": op, "cpu": "C++" if cpu else "-", "cuda": cuda, "cuda_usable_here": runs_on_cuda})
    return rows

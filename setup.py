"""Builds pyvision_ops._C: every csrc/**/*.cpp, plus csrc/cuda/*.cu when CUDA is on.

CUDA is on when FORCE_CUDA=1, or when torch sees a GPU and a toolkit is found;
PYVISION_OPS_NO_CUDA=1 turns it off.
"""

import glob
import os
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _pip_cuda_includes():
    # ATen's CUDA headers include cusparse.h etc., which pip ships under nvidia/cu*/include.
    dirs = []
    for base in sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}):
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include")))
    return dirs


def _extension():
    import torch
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu_sources = sorted(glob.glob("csrc/cuda/*.cu"))

    if _flag("PYVISION_OPS_NO_CUDA"):
        with_cuda = False
    elif _flag("FORCE_CUDA"):
        with_cuda = True
    else:
        with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None

    # -fno-trapping-math lets GCC if-convert and vectorise the branchy box math;
    # results stay IEEE (no fast-math), only FP exception flags are not honoured.
    # No fused multiply-add contraction on either device: a product rounded before the sum, as
    # in torch's CPU ops, so an IoU or a sample position near a threshold decides the same way
    # on the CPU and on the GPU (nvcc contracts by default and moved IoUs by an ulp).
    # -g0: Python's CFLAGS carry -g, which made _C ~15x larger (debug info of the ATen templates).
    cxx = ["-O3", "-g0", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    define_macros = [("PYVISION_OPS_VERSION", f'"{VERSION}"')]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        if not archs and not torch.cuda.is_available():
            archs = os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        define_macros += [("PYVISION_OPS_WITH_CUDA", None), ("PYVISION_OPS_CUDA_ARCHS", f'"{archs or "native"}"')]
        include_dirs += _pip_cuda_includes()
        ext = cpp_extension.CUDAExtension(
            "pyvision_ops._C",
            cpp_sources + cu_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-fmad=false"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "pyvision_ops._C",
            cpp_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return ext, cpp_extension.BuildExtension.with_options(use_ninja=True)


def _torch_requirement():
    # _C is compiled against one torch's C++ ABI. A release wheel requires that torch
    # (PYVISION_OPS_PIN_TORCH=1 when it is built); a source build does not, so that pip never
    # swaps the user's torch for the one an isolated build happened to fetch: build with
    # --no-build-isolation against the torch in use, and a mismatch fails to load with a
    # message naming it.
    if not _flag("PYVISION_OPS_PIN_TORCH") or _flag("PYVISION_OPS_NO_EXT"):
        return "torch"
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


if _flag("PYVISION_OPS_NO_EXT"):
    # Editable install of the Python files only; `make build` compiles _C in place.
    ext_modules, cmdclass = [], {}
else:
    ext, build_ext = _extension()
    ext_modules, cmdclass = [ext], {"build_ext": build_ext}
    print(f"pyvision_ops: {ext.name} from {len(ext.sources)} sources", file=sys.stderr)

setup(
    name="pyvision_ops",
    version=VERSION,
    description="Fast, correct detection and segmentation ops for PyTorch",
    packages=find_packages(include=["pyvision_ops", "pyvision_ops.*"]) + ["pyvision_ops.kernels"],
    package_dir={"pyvision_ops.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=[_torch_requirement()],
)

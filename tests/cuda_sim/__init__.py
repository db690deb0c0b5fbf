"""The Soft-NMS CUDA kernels (csrc/cuda/soft_nms.cuh) on CPU threads: builds
soft_nms_sim.cpp once per source version (under build/cuda_sim/) and runs a kernel with
the layout csrc/cuda/nms.cu:soft_nms_cuda gives it (score order, category groups, Morton
placement, register slots, thread counts), so that tests compare the kernels' own code
with the CPU op on machines without a GPU. Slow (a thread per CUDA thread): small inputs."""

import ctypes
import hashlib
import os
import subprocess

import numpy as np
import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
METHODS = {"gaussian": 0, "linear": 1, "hard": 2}
VARIANTS = {"chunks": 0, "spread": 1, "multi": 2, "lead": 3}  # soft_nms_sim.cpp:chunks
ROUNDS_MAX_LEN = 64 * 256  # csrc/cuda/soft_nms.cuh: kWord * kRoundsMaxChunks

_libs = {}


def library(arch=0):
    """The simulator built for __CUDA_ARCH__ `arch` (0: none, the kernels' pre-sm_80 branches;
    900: sm_90's, as the GPU runs them). Environment: PVO_SIM_TSAN=1 builds it with
    ThreadSanitizer (the process must preload libtsan: tsan_check.py), PVO_SIM_CSRC takes the
    kernels from another csrc folder (a modified copy)."""
    if arch not in _libs:
        cxx = os.environ.get("CXX", "c++")
        csrc = os.environ.get("PVO_SIM_CSRC", os.path.join(ROOT, "csrc"))
        tsan = os.environ.get("PVO_SIM_TSAN") == "1"
        flags = ["-std=c++20", "-O1" if tsan else "-O2", "-fPIC", "-shared", "-pthread", "-Wno-unknown-pragmas",
                 "-I" + csrc, "-I" + HERE] + ["-I" + p for p in cpp_extension.include_paths()]
        flags += ["-g", "-fsanitize=thread"] if tsan else []
        flags += [f"-DPVO_SIM_ARCH={arch}"] if arch else []
        # the sources' contents below, not csrc's path: a modified copy in a new folder each run
        # builds once
        digest = hashlib.sha256(" ".join([cxx] + [f for f in flags if f != "-I" + csrc]).encode())
        sources = [os.path.join(HERE, f) for f in ("soft_nms_sim.cpp", "cuda_sim.h")] + [
            os.path.join(csrc, f) for f in ("cuda/soft_nms.cuh", "common/nms.h", "common/box_iou.h", "common/text.h")]
        for path in sources:
            with open(path, "rb") as f:
                digest.update(f.read())
        out = os.path.join(ROOT, "build", "cuda_sim", f"soft_nms_sim-{digest.hexdigest()[:16]}.so")
        if not os.path.exists(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)
            tmp = f"{out}.{os.getpid()}.tmp"  # pytest-xdist workers may build at once
            subprocess.run([cxx, *flags, sources[0], "-o", tmp], check=True)
            os.replace(tmp, out)
        _libs[arch] = ctypes.CDLL(out)
    return _libs[arch]


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def _spread16(x):
    x = x & 0xFFFF
    x = (x | (x << 8)) & 0x00FF00FF
    x = (x | (x << 4)) & 0x0F0F0F0F
    x = (x | (x << 2)) & 0x33333333
    return (x | (x << 1)) & 0x55555555


def morton_place(b, seg):
    """csrc/cuda/nms.cu:morton_kernel and the stable sort after it."""
    def order16(v):
        u = v.float().numpy().view(np.uint32).astype(np.uint64)
        return np.where(u >> 31 == 1, ~u & 0xFFFFFFFF, u | 0x80000000) >> 16
    cx, cy = b[:, 0] / 2 + b[:, 2] / 2, b[:, 1] / 2 + b[:, 3] / 2
    code = _spread16(order16(cx)) | (_spread16(order16(cy)) << 1)
    code = np.where((cx != cx).numpy() | (cy != cy).numpy(), np.uint64(0xFFFFFFFF), code)
    key = (seg.numpy().astype(np.uint64) << 32) | code
    return torch.from_numpy(np.argsort(key, kind="stable").astype(np.int32))


def _soft_threads(fp64, k):
    if k <= 1:
        return 1024
    if not fp64:
        return 1024 if k <= 4 else 768 if k <= 8 else 512
    return 512


def _soft_slots(fp64, max_len):
    for k in (1, 4, 8) + (() if fp64 else (16,)):
        if max_len <= k * _soft_threads(fp64, k):
            return k
    return 0


def soft_nms(boxes, scores, idxs, iou_threshold, sigma, score_threshold, method, kernel="spread", arch=0):
    """torch.ops.pyvision_ops.soft_nms's result from the CUDA kernel `kernel` ("chunks",
    "spread", "multi", "lead" or "rounds", as PYVISION_OPS_SOFT_NMS_KERNEL) run on CPU threads, its
    code compiled for __CUDA_ARCH__ `arch` (library)."""
    lib = library(arch)
    n = len(scores)
    fp64 = boxes.dtype == torch.float64
    acc = torch.float64 if fp64 else torch.float32
    order = torch.sort(scores, descending=True, stable=True).indices
    if idxs is None:
        grouped, lens = order, [n]
    else:
        cats = idxs.long()[order]
        perm = torch.sort(cats, stable=True).indices
        grouped, lens = order[perm], torch.unique_consecutive(cats[perm], return_counts=True)[1].tolist()
    groups, max_len = len(lens), max(lens)
    length = torch.tensor(lens, dtype=torch.int64)
    start = torch.cumsum(length, 0) - length
    seg = torch.repeat_interleave(torch.arange(groups), length)
    b = boxes[grouped].to(acc).contiguous()
    sc = scores[grouped].to(acc).contiguous()
    place = morton_place(b, seg if groups > 1 else torch.zeros(n, dtype=torch.int64))
    words = [(x + 63) // 64 for x in lens]
    mask_words = sum(x * w for x, w in zip(lens, words))
    rounds = (kernel == "rounds" and score_threshold > 0 and not (method == "hard" and not iou_threshold > 0)
              and max_len <= ROUNDS_MAX_LEN and mask_words <= 1 << 26)
    args = (iou_threshold, sigma, score_threshold)
    out_score = torch.empty(n, dtype=acc)
    if rounds:  # nms.cu:plan_rounds and launch_rounds
        tables = []
        for sizes in ([x * w for x, w in zip(lens, words)], [w * w for w in words], words):
            tables += np.cumsum([0] + sizes)[:-1].tolist()
        if groups > 1:
            tables += [v for c, w in enumerate(words) for rb in range(w) for cb in range(w) for v in (c, rb, cb)]
        tiles = (len(tables) - 3 * groups) // 3
        tables = torch.tensor(tables, dtype=torch.int64)
        i32 = dict(dtype=torch.int32)
        mask = torch.zeros(max(mask_words, 1), dtype=torch.int64)
        listed = torch.empty(sum(w * w for w in words), dtype=torch.uint8)
        scratch = [torch.empty(4 * n, dtype=acc), torch.empty(n, dtype=acc)] + [torch.empty(n, **i32) for _ in range(4)]
        clist, ccount = torch.empty(sum(w * w for w in words), **i32), torch.empty(sum(words), **i32)
        selected = torch.zeros(n, dtype=torch.bool)
        threads = min(1024, (max_len + 31) // 32 * 32)
        rc = lib.sim_soft_rounds(int(fp64), METHODS[method], ctypes.c_int64(groups), ctypes.c_int64(max_len),
                                 ctypes.c_int64(tiles), threads, _ptr(b), _ptr(sc), _ptr(start), _ptr(length),
                                 _ptr(place), _ptr(tables), *map(ctypes.c_double, args), _ptr(mask), _ptr(listed),
                                 *map(_ptr, scratch), _ptr(clist), _ptr(ccount), _ptr(selected), _ptr(out_score))
        assert rc == 0
        pos = torch.arange(n)[selected]
        keep, dec, batched = grouped[pos], out_score[selected], True
    else:
        k = _soft_slots(fp64, max_len)
        per_thread = (max_len + k - 1) // k if k else max_len
        threads = min(_soft_threads(fp64, k), max(32, (per_thread + 31) // 32 * 32))
        alive, out_pos = torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int64)
        count = torch.empty(groups, dtype=torch.int64)
        rc = lib.sim_soft_chunks(int(fp64), METHODS[method], k, ctypes.c_int64(groups), threads, _ptr(b), _ptr(sc),
                                 _ptr(start), _ptr(length), _ptr(place), *map(ctypes.c_double, args),
                                 VARIANTS.get(kernel, 1), _ptr(alive), _ptr(out_pos), _ptr(out_score), _ptr(count))
        assert rc == 0
        rank = torch.arange(n) - start[seg]
        filled = rank < count[seg]
        pos = (out_pos.masked_fill(~filled, 0) + start[seg])[filled]
        keep, dec, batched = grouped[pos], out_score[filled], idxs is not None
    if batched:  # nms::merge_groups
        by_score = torch.sort(dec, descending=True, stable=True).indices
        keep, dec = keep[by_score], dec[by_score]
    return keep, dec.to(scores.dtype)

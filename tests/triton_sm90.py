"""Compiles every Triton kernel for sm_90 on a machine without a GPU.

`python tests/triton_sm90.py` runs each launcher in kernels/ on small CPU tensors
with Triton's driver replaced by one that names an sm_90 target and with launches
turned into compile-only warm-ups: each kernel goes through Triton's whole
pipeline down to a cubin (ptxas) with the specialisations its launcher gives it,
but nothing runs. The interpreter tests check what the kernels compute; this
checks that the GPU compiler accepts them. Prints one JSON line: the kernels
compiled and those defined. Never run it with TRITON_INTERPRET=1.
"""

import inspect
import json
import os
import sys

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class _Sm90:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _launchers():
    from pyvision_ops.kernels import box_iou, cross_entropy, interpolate, losses

    g = torch.Generator().manual_seed(0)

    def boxes(n, dtype):
        xy = torch.rand(n, 2, generator=g) * 50
        return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 20 + 1], 1).to(dtype)

    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        a, b = boxes(7, dtype), boxes(9, dtype)
        for kind in range(4):
            box_iou.pairwise_box_iou(a[None], b[None], kind, 1e-7)
            box_iou.pairwise_box_iou(a[None, :1], b[None, :1], kind, 1e-7)  # N = M = 1: Triton may specialise 1
            if dtype in (torch.float32, torch.float64):
                for loss in (False, True):
                    box_iou.matched_box_iou(a, b[:7], kind, loss, 1e-7)
                    box_iou.matched_box_iou_backward(torch.ones(7, dtype=dtype), a, b[:7], kind, loss, 1e-7)

        x = torch.randn(2, 5, 6, 7, generator=g).to(dtype)
        y = torch.randint(0, 5, (2, 6, 7), generator=g)
        w = (torch.rand(5, generator=g) + 0.1).to(dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        losses.sigmoid_focal_loss(x, (x > 0).to(dtype), 0.25, 2.0)
        losses.sigmoid_focal_loss(x, (x > 0).to(dtype), -1.0, 1.5)
        losses.sigmoid_focal_loss_backward(torch.ones_like(x), x, (x > 0).to(dtype), 0.25, 2.0)
        losses.sigmoid_focal_loss_backward(torch.ones_like(x), x, (x > 0).to(dtype), 0.25, 1.5)
        losses.dice_stats(x, y, 255)
        losses.dice_stats_backward(torch.ones(2, 5, dtype=acc), x, y, 255)
        losses.lovasz_softmax_rows(x.softmax(1).reshape(2, 5, -1), y.reshape(2, -1), 255, False)
        losses.lovasz_softmax_rows(x.softmax(1).reshape(2, 5, -1), y.reshape(2, -1), None, True)
        interpolate.upsample_bilinear(x, 13, 20, False, -1.0, -1.0)
        interpolate.upsample_bilinear(x, 13, 20, True, 2.5, 2.5)
        interpolate.upsample_bilinear_backward(torch.ones(2, 5, 13, 20, dtype=dtype), 6, 7, False, -1.0, -1.0)
        for weight in (None, w):
            z, t = x.reshape(2, 5, -1), y.reshape(2, -1)
            big = torch.randint(0, 5, (2, 13, 20), generator=g)
            for reduction, shape in ((0, (2, 42)), (1, ()), (2, ())):
                _, wsum, stats = cross_entropy.softmax_cross_entropy(z, t, weight, 255, 0.1, reduction)
                cross_entropy.softmax_cross_entropy_backward(torch.ones(shape, dtype=acc), z, t, weight, stats, wsum,
                                                             255, 0.1, reduction)
                rz, rt = x[:, :, :1, 0], y[:, :1, 0]  # [N, C, 1]: the row kernels
                _, wsum, stats = cross_entropy.softmax_cross_entropy(rz, rt, weight, 255, 0.1, reduction)
                cross_entropy.softmax_cross_entropy_backward(torch.ones(shape[:1] + (1,) if shape else (), dtype=acc),
                                                             rz, rt, weight, stats, wsum, 255, 0.1, reduction)
                _, wsum, stats = cross_entropy.upsample_cross_entropy(x, big, False, weight, 255, 0.1, reduction)
                cross_entropy.upsample_cross_entropy_backward(torch.ones(shape[:1] + (13, 20) if shape else (),
                                                                         dtype=acc), x, big, False, weight, stats,
                                                              wsum, 255, 0.1, reduction)
            for reduction in (1, 2):  # the gradient in the forward's pass
                cross_entropy.softmax_cross_entropy_with_grad(z, t, weight, 255, 0.1, reduction)
        # [N, C] rows with more classes than a tile: a row a program and its class loop
        wz, wt = torch.randn(2, 1100, 1, generator=g).to(dtype), torch.randint(0, 1100, (2, 1), generator=g)
        _, wsum, stats = cross_entropy.softmax_cross_entropy(wz, wt, None, 255, 0.1, 1)
        cross_entropy.softmax_cross_entropy_backward(torch.ones((), dtype=acc), wz, wt, None, stats, wsum, 255, 0.1, 1)
        cross_entropy.scale_grad_(x, torch.ones((), dtype=acc))
    for kind, cfg in ((3, box_iou.PAIRWISE_CONFIG), (0, box_iou.PAIRWISE_IOU_CONFIG)):
        # the tuners' variants
        for key, value in (("STREAM", True), ("M_TILES", 1), ("M_TILES", 4), ("FAST_DIV", True)):
            default, cfg[key] = cfg[key], value
            for n in (7, 128):
                box_iou.pairwise_box_iou(boxes(n, torch.float32)[None], boxes(n, torch.float32)[None], kind, 1e-7)
            cfg[key] = default
    z, t = torch.randn(2, 7, 9, generator=g), torch.randint(0, 7, (2, 9), generator=g)
    saved = dict(cross_entropy.CE_CONFIG), dict(cross_entropy.CE_TILE_CONFIG)
    cross_entropy.CE_TILE_CONFIG.update(MAX_C=0)  # the plain class loop
    # STAGES 3: the class loop pipelined; GATHER False: the target's logit by a compare
    for unroll, stages, gather in ((1, 1, True), (2, 1, True), (4, 1, True), (2, 3, True), (4, 1, False)):
        cross_entropy.CE_CONFIG.update(UNROLL=unroll, STAGES=stages, GATHER=gather)
        for zz in (z, z.double(), z.half()) if stages > 1 else (z,):
            _, wsum, stats = cross_entropy.softmax_cross_entropy(zz, t, None, 255, 0.0, 1)
            cross_entropy.softmax_cross_entropy_backward(torch.ones(()), zz, t, None, stats, wsum, 255, 0.0, 1)
            cross_entropy.softmax_cross_entropy_with_grad(zz, t, None, 255, 0.0, 1)
    cross_entropy.CE_CONFIG.update(saved[0])
    cross_entropy.CE_TILE_CONFIG.update(saved[1])
    saved = dict(cross_entropy.CE_TILE_CONFIG)
    # the class tile: one tile of the 7 classes, or tiles of 4 in a loop, pipelined or not, the
    # target's logit loaded or by a compare
    for block_c, stages, gather in ((32, 1, True), (4, 1, True), (4, 3, True), (4, 1, False)):
        cross_entropy.CE_TILE_CONFIG.update(MAX_C=32, BLOCK_C=block_c, STAGES=stages, GATHER=gather)
        for zz in (z, z.double(), z.half()):
            acc = torch.float64 if zz.dtype == torch.float64 else torch.float32
            for weight, smoothing in ((None, 0.0), (torch.rand(7, generator=g).to(zz.dtype), 0.1)):
                for reduction, grad in ((0, torch.ones(t.shape, dtype=acc)), (1, torch.ones((), dtype=acc))):
                    _, wsum, stats = cross_entropy.softmax_cross_entropy(zz, t, weight, 255, smoothing, reduction)
                    cross_entropy.softmax_cross_entropy_backward(grad, zz, t, weight, stats, wsum, 255, smoothing,
                                                                 reduction)
    cross_entropy.CE_TILE_CONFIG.update(saved)
    # PER_SM: programs looping over blocks (4 multiprocessors off CUDA; 16-position blocks)
    saved = dict(cross_entropy.CE_CONFIG), dict(cross_entropy.CE_TILE_CONFIG)
    cross_entropy.CE_CONFIG.update(PER_SM=1, BLOCK=16)
    for max_c, block_c in ((0, 32), (32, 32), (32, 4)):
        cross_entropy.CE_TILE_CONFIG.update(PER_SM=1, MAX_C=max_c, BLOCK_C=block_c, ELEMS=128)
        zz = torch.randn(2, 7, 90, generator=g)
        tt = torch.randint(0, 7, (2, 90), generator=g)
        assert cross_entropy._launch("op", 7, 90, 2, zz.device)[0]["LOOP"]
        _, wsum, stats = cross_entropy.softmax_cross_entropy(zz, tt, None, 255, 0.0, 1)
        cross_entropy.softmax_cross_entropy_backward(torch.ones(()), zz, tt, None, stats, wsum, 255, 0.0, 1)
        cross_entropy.softmax_cross_entropy_with_grad(zz, tt, None, 255, 0.0, 1)
    cross_entropy.CE_CONFIG.update(saved[0])
    cross_entropy.CE_TILE_CONFIG.update(saved[1])
    for zz, tt in ((z[:1], t[:1]), (z[:1, :, :1], t[:1, :1])):  # one forward program: nparts = 1
        _, wsum, stats = cross_entropy.softmax_cross_entropy(zz, tt, None, 255, 0.0, 1)
        cross_entropy.softmax_cross_entropy_backward(torch.ones(()), zz, tt, None, stats, wsum, 255, 0.0, 1)
    # [N, C] rows as class planes (PLANES_MAX_C): positions 7 apart, a constant
    saved = dict(cross_entropy.CE_ROWS_CONFIG)
    cross_entropy.CE_ROWS_CONFIG["PLANES_MAX_C"] = 32
    rt = torch.randint(0, 7, (9, 1), generator=g)
    for rz in (torch.randn(9, 7, 1, generator=g), torch.randn(9, 7, 1, generator=g).half()):
        for reduction, grad in ((0, torch.ones(9, 1)), (1, torch.ones(()))):
            _, wsum, stats = cross_entropy.softmax_cross_entropy(rz, rt, None, 255, 0.1, reduction)
            cross_entropy.softmax_cross_entropy_backward(grad, rz, rt, None, stats, wsum, 255, 0.1, reduction)
    cross_entropy.CE_ROWS_CONFIG.update(saved)
    cross_entropy._collapse(torch.zeros(2, 1500, dtype=torch.float64))  # more partial sums than the reduce takes
    # Sizes of 1 everywhere: Triton passes an int argument equal to 1 as a constant, which
    # some expressions (x.to(...)) do not accept.
    one = torch.ones((), dtype=torch.float32)
    b1 = boxes(1, torch.float32)
    for kind in range(4):
        box_iou.matched_box_iou(b1, b1, kind, True, 1e-7)
        box_iou.matched_box_iou_backward(torch.ones(1), b1, b1, kind, True, 1e-7)
    x1, y1 = torch.randn(1, 1, 1, 1, generator=g), torch.zeros(1, 1, 1, dtype=torch.int64)
    losses.sigmoid_focal_loss(x1.flatten(), x1.flatten().gt(0).float(), 0.25, 1.5)
    losses.sigmoid_focal_loss_backward(torch.ones(1), x1.flatten(), x1.flatten().gt(0).float(), 0.25, 1.5)
    losses.dice_stats(x1, y1, 255)
    losses.dice_stats_backward(torch.ones(2, 1), x1, y1, 255)
    losses.lovasz_softmax_rows(x1.reshape(1, 1, 1), y1.reshape(1, 1), None, True)
    interpolate.upsample_bilinear(x1, 1, 1, False, -1.0, -1.0)
    interpolate.upsample_bilinear(x1, 2, 3, True, -1.0, -1.0)
    interpolate.upsample_bilinear_backward(torch.ones(1, 1, 2, 3), 1, 1, True, -1.0, -1.0)
    for smoothing in (0.0, 0.1):
        for reduction, grad in ((0, torch.ones(1, 1)), (1, one)):
            _, wsum, stats = cross_entropy.softmax_cross_entropy(x1.reshape(1, 1, 1), y1.reshape(1, 1), None, 255,
                                                                 smoothing, reduction)
            cross_entropy.softmax_cross_entropy_backward(grad, x1.reshape(1, 1, 1), y1.reshape(1, 1), None, stats,
                                                         wsum, 255, smoothing, reduction)
        _, wsum, stats = cross_entropy.upsample_cross_entropy(x1, y1.expand(1, 2, 3).contiguous(), False, None, 255,
                                                              smoothing, 1)
        cross_entropy.upsample_cross_entropy_backward(one, x1, y1.expand(1, 2, 3).contiguous(), False, None, stats,
                                                      wsum, 255, smoothing, 1)
    for dtype in (torch.float32, torch.float64):
        losses.lovasz_gradient((torch.rand(3, 2000, generator=g) > 0.5).to(dtype), torch.tensor([2000, 5, 0]))
    return (box_iou, cross_entropy, interpolate, losses)


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1")
    driver.set_active(_Sm90())
    run = JITFunction.run
    compiled = set()

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is None or "cubin" not in kernel.asm:
            raise RuntimeError(f"{self.fn.__name__}: no cubin")
        compiled.add(f"{self.fn.__module__}.{self.fn.__name__}")
        return kernel

    JITFunction.run = compile_only
    modules = _launchers()
    defined = sorted(f"{m.__name__}.{name}" for m in modules for name, obj in inspect.getmembers(m)
                     if isinstance(obj, JITFunction) and name.endswith("_kernel"))
    print(json.dumps({"compiled": sorted(compiled), "defined": defined}))


if __name__ == "__main__":
    main()

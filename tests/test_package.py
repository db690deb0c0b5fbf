import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest
import torch

import pyvision_ops as P
from pyvision_ops.testing import random_boxes


def test_build_info():
    info = P.build_info()
    for key in ("version", "torch_version", "torch_runtime", "cuda", "cuda_archs", "openmp", "triton",
                "cuda_available", "cpu_threads"):
        assert key in info, key
    assert info["version"] == P.__version__
    assert info["torch_runtime"].startswith(info["torch_version"])
    assert info["cpu_threads"] >= 1


def test_op_table_lists_every_op_with_a_cpu_kernel():
    rows = {r["op"]: r for r in P.op_table()}
    for op in ("pairwise_box_iou", "matched_box_iou", "matched_box_iou_backward"):
        assert rows[op]["cpu"] == "C++"
        assert rows[op]["cuda"].startswith("Triton")


def test_main_prints_info_and_table():
    out = subprocess.run([sys.executable, "-m", "pyvision_ops"], capture_output=True, text=True, check=True).stdout
    assert "torch_version" in out and "pairwise_box_iou" in out


def test_missing_extension_gives_one_clear_message():
    code = "import sys; sys.modules['pyvision_ops._C'] = None\nimport pyvision_ops"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "make build" in proc.stderr and "pyvision_ops._C" in proc.stderr
    assert f"torch {torch.__version__}" in proc.stderr  # an extension built for another torch fails to load


def test_sdist_manifest_covers_every_source():
    # The sdist must build on its own: every csrc file, headers included (setup.py lists only the
    # .cpp/.cu files it compiles, and only the .cu ones with CUDA on).
    root = pathlib.Path(__file__).resolve().parents[1]
    rules = [line.split() for line in (root / "MANIFEST.in").read_text().splitlines() if line.startswith("recursive")]
    patterns = {pat for rule in rules if rule[1] == "csrc" for pat in rule[2:]}
    files = [p for p in (root / "csrc").rglob("*") if p.is_file()]
    assert files and [str(p) for p in files if not any(p.match(pat) for pat in patterns)] == []


def test_bench_run_saves_each_row_and_survives_a_failing_workload(tmp_path, monkeypatch):
    import json

    from benchmarks import common, run

    def ok(device):
        x = torch.ones(8)
        return (lambda: x + 1), (lambda: x * 2)

    def broken(device):
        raise RuntimeError("kernel exploded\nsecond line")

    fake = [common.Workload("box_iou", "fine", "torch", ok), common.Workload("box_iou", "broken", "torch", broken),
            common.Workload("box_iou", "fine again", "torch", ok)]
    monkeypatch.setattr(run, "workloads", lambda only: fake)
    saved = []
    result = run.run("cpu", None, quick=True, save=lambda r: saved.append(json.dumps(r)))
    assert len(saved) == 3  # one save per row: a run cut short keeps what it measured
    rows = result["rows"]
    assert [r["workload"] for r in rows] == ["fine", "broken", "fine again"]
    assert rows[1]["error"] == "RuntimeError: kernel exploded" and "speedup" in rows[2]
    assert "failed: RuntimeError: kernel exploded" in run.table(result)
    run.chart(result, str(tmp_path / "c.png"))  # failed rows are left out of the chart


def test_double_backward_raises_instead_of_giving_zeros():
    b1 = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 4]], dtype=torch.float64, requires_grad=True)
    b2 = torch.tensor([[0.5, 0, 2, 3], [0, 1, 2, 2]], dtype=torch.float64)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 0.5, 0.5, 4.0, 5.0]], dtype=torch.float64)
    for inp, loss in ((b1, P.complete_box_iou_loss(b1, b2, reduction="sum")),
                      (b1, P.sigmoid_focal_loss(b1, torch.rand(2, 4, dtype=torch.float64), reduction="sum"))):
        (g,) = torch.autograd.grad(loss, [inp], create_graph=True)
        with pytest.raises(RuntimeError, match="derivative for pyvision_ops::.* is not implemented"):
            torch.autograd.grad(g.square().sum(), [inp])
    # RoI Align is linear in its input: its gradient depends on the incoming gradient only.
    out = P.roi_align(x, rois, 2, sampling_ratio=2)
    v = torch.ones_like(out, requires_grad=True)
    (g,) = torch.autograd.grad(out, [x], grad_outputs=v, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for pyvision_ops::.* is not implemented"):
        torch.autograd.grad(g.sum(), [v])


def test_forward_mode_and_func_transforms_raise_instead_of_dropping_tangents():
    # A dual input does not require grad: without the check the kernels ran below autograd and
    # torch.func.jvp gave a zero tangent for every op.
    import torch.autograd.forward_ad as fwAD

    x = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    b = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 4]], dtype=torch.float64)
    y = torch.randint(0, 2, (1, 4, 4))
    calls = [lambda a: P.interpolate_bilinear(a, size=(6, 6)), lambda a: P.softmax_cross_entropy(a, y),
             lambda a: P.roi_align(a, torch.tensor([[0, 0.5, 0.5, 3.0, 3.0]], dtype=a.dtype), 2)]
    for f, inp in [(f, x) for f in calls] + [(lambda a: P.generalized_box_iou_loss(a, a.flip(0)), b)]:
        want = f(inp)
        with fwAD.dual_level():
            with pytest.raises(NotImplementedError, match="pyvision_ops::.* has no forward-mode derivative"):
                f(fwAD.make_dual(inp, torch.ones_like(inp)))
        with pytest.raises(NotImplementedError, match="not differentiable under torch.func"):
            torch.func.jvp(f, (inp,), (torch.ones_like(inp),))
        with pytest.raises(NotImplementedError, match="not differentiable under torch.func"):
            torch.func.grad(lambda a, f=f: f(a).sum())(inp)
        with fwAD.dual_level():  # inputs without a tangent: as before
            torch.testing.assert_close(f(inp), want)
    # an op whose inputs carry no tangent is a constant to jvp, and Soft-NMS outputs have no
    # derivative: both run under jvp/jacfwd as they did
    t = torch.randn(3, dtype=torch.float64)
    _, jt = torch.func.jvp(lambda v: v * P.box_iou(b, b).sum(), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(jt, P.box_iou(b, b).sum().expand(3))
    torch.testing.assert_close(torch.func.jacfwd(lambda v: v * P.box_iou(b, b).sum())(t),
                               torch.eye(3, dtype=t.dtype) * P.box_iou(b, b).sum())
    s = torch.tensor([0.9, 0.8], dtype=torch.float64)
    _, js = torch.func.jvp(lambda v: P.soft_nms(b, v, 0.5)[1], (s,), (torch.ones_like(s),))
    assert not js.any()
    # vmap of a forward alone runs (torch's per-sample fallback), and autograd through it
    bb = torch.rand(3, 5, 4, dtype=torch.float64)
    bb[..., 2:] += bb[..., :2]
    bb.requires_grad_()
    torch.vmap(lambda a: P.generalized_box_iou(a, a))(bb).sum().backward()
    assert bb.grad.abs().sum() > 0


def test_vmap_of_fronts_that_query_layouts_or_check_labels():
    # A batched tensor cannot say whether it is channels_last (the result is then
    # contiguous), nor decide a Python branch on its values (batched lovasz_hinge labels
    # outside {0, 1} make that sample's loss NaN, as under torch.compile)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 2, 3, 4, generator=g)
    for dim in (0, 4):  # the batch dimension first, or last: the per-sample views are not contiguous
        got = torch.vmap(lambda a: P.interpolate_bilinear(a, size=(5, 6)), in_dims=dim)(x)
        want = torch.stack([P.interpolate_bilinear(a, size=(5, 6)) for a in x.movedim(dim, 0)])
        torch.testing.assert_close(got, want)
    z, t = torch.randn(2, 3, 4, 5, 3, generator=g), torch.rand(2, 3, 4, 5, 3, generator=g)
    got = torch.vmap(P.sigmoid_focal_loss, in_dims=4)(z, t)
    torch.testing.assert_close(got, torch.stack([P.sigmoid_focal_loss(z[..., i], t[..., i]) for i in range(3)]))
    logits, labels = torch.randn(3, 2, 4, generator=g), torch.randint(0, 2, (3, 2, 4), generator=g)
    got = torch.vmap(P.lovasz_hinge)(logits, labels)
    torch.testing.assert_close(got, torch.stack([P.lovasz_hinge(a, b) for a, b in zip(logits, labels)]))
    # per-sample gradients: grad's wrapper holds the batched labels
    per_sample = torch.func.grad(P.lovasz_hinge)
    got = torch.vmap(per_sample)(logits, labels)
    torch.testing.assert_close(got, torch.stack([per_sample(a, b) for a, b in zip(logits, labels)]))
    labels[1, 0, 0] = 3
    got = torch.vmap(P.lovasz_hinge)(logits, labels)
    assert got[1].isnan() and not got[[0, 2]].isnan().any()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_tiny_inputs_stay_on_one_thread_and_run_in_a_forked_child():
    # A fork()ed child of a process that ran OpenMP regions can hang in its first region
    # (multiprocessing's fork pools); a tiny input opens none.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.randn(4_000_000).exp().sum()  # the parent's OpenMP pool exists
        g = torch.Generator().manual_seed(0)
        xy = torch.rand(40, 2, generator=g) * 100
        b, s, idx = torch.cat([xy, xy + 20], 1), torch.rand(40, generator=g), torch.arange(40) % 3
        x, rois = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([[0, 1.0, 1, 6, 6], [1, 0, 0, 5, 7]])
        lg, tg = torch.randn(2, 4, 6, 6, generator=g), torch.randint(0, 4, (2, 6, 6), generator=g)
        pr = lg.softmax(1)  # torch's softmax would open a region in the child
        calls = [lambda: P.batched_nms(b, s, idx, 0.5), lambda: P.batched_soft_nms(b, s, idx),
                 lambda: P.roi_align(x, rois, 2, 1.0, 2), lambda: P.roi_align(x.to(memory_format=torch.channels_last),
                                                                               rois, 2, 1.0, 2),
                 lambda: P.interpolate_bilinear(x, size=(5, 5)), lambda: P.softmax_cross_entropy(lg, tg),
                 lambda: P.softmax_cross_entropy(lg[:, :, 0, 0], tg[:, 0, 0]),
                 lambda: P.upsample_cross_entropy(lg, tg.repeat(1, 2, 2)), lambda: P.dice_loss(lg, tg),
                 lambda: P.lovasz_softmax(pr, tg)]
        for i, f in enumerate(calls):
            f()
            pid = os.fork()
            if pid == 0:  # the child: killed by the alarm if it hangs
                signal.alarm(20)
                f()
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"call {i} hung or failed in the child"
    finally:
        torch.set_num_threads(threads)


def _check_macro_args(text):
    """(line, argument) of each message argument of TORCH_CHECK* / TORCH_INTERNAL_ASSERT* (after
    the condition), TORCH_WARN*, AT_ERROR and c10::str that is neither a string or char
    literal, std::to_string(..), real_text(..) nor one of the const char* names."""
    found = []
    for m in re.finditer(r"\b(TORCH_CHECK\w*|TORCH_INTERNAL_ASSERT\w*|TORCH_WARN\w*|AT_ERROR|c10::str)\s*\(", text):
        args, depth, cur, i = [], 1, "", m.end()
        while depth:
            c = text[i]
            if c in "\"'":  # a literal, escapes included
                j = i + 1
                while text[j] != c:
                    j += 2 if text[j] == "\\" else 1
                cur, i = cur + text[i:j + 1], j + 1
                continue
            if text.startswith(("//", "/*"), i):  # a comment
                end = "\n" if text[i + 1] == "/" else "*/"
                i = text.index(end, i) + len(end)
                continue
            depth += (c in "([{") - (c in ")]}")
            if depth == 1 and c == ",":
                args.append(cur.strip())
                cur = ""
            elif depth:
                cur += c
            i += 1
        args.append(cur.strip())
        line = text.count("\n", 0, m.start()) + 1
        condition = m.group(1).startswith(("TORCH_CHECK", "TORCH_INTERNAL_ASSERT"))
        found += [(line, a) for a in args[1 if condition else 0:]
                  if not a.startswith(('"', "'", "std::to_string(", "real_text(")) and a not in ("op", "name", "what")]
    return found


def test_error_messages_format_numbers_without_ostream():
    # common/text.h: ostream << long inside the extension crashed on the lent GPU machine's build.
    root = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    bad = {f"{p.relative_to(root)}:{line}": a for p in sorted(root.rglob("*"))
           if p.suffix in (".h", ".cuh", ".cpp", ".cu") for line, a in _check_macro_args(p.read_text())}
    assert bad == {}
    assert _check_macro_args('TORCH_CHECK(x > 0, op, ": got ", x, f(a, b));') == [(1, "x"), (1, "f(a, b)")]
    assert _check_macro_args("TORCH_CHECK(c == ')', \"a, (\", /* (, */ // x)\n n);\nTORCH_WARN(\"w\", k);") == [
        (1, "n"), (3, "k")]


def test_lean_autograd_registration():
    # _library.register_autograd: a graph node only when an input requires grad, named after
    # the op; ops with a tensor-list argument keep torch.library.register_autograd.
    from pyvision_ops._library import ops, register_autograd

    z, y = torch.randn(2, 3, 4), torch.randint(0, 3, (2, 4))
    assert ops.softmax_cross_entropy(z, y, None, -100, 0.0, 1)[0].grad_fn is None
    loss = ops.softmax_cross_entropy(z.requires_grad_(), y, None, -100, 0.0, 1)[0]
    assert type(loss.grad_fn).__name__ == "pyvision_ops_softmax_cross_entropyBackward"
    with torch.no_grad():
        assert ops.softmax_cross_entropy(z, y, None, -100, 0.0, 1)[0].grad_fn is None
    with pytest.raises(NotImplementedError, match="multi_scale_roi_align"):
        register_autograd("pyvision_ops::multi_scale_roi_align", None, None)
    # torch's conventions: needs_input_grad of the op's inputs only; a one-input op's backward
    # may return a bare tensor
    lib = torch.library.Library("pvo_test_autograd", "DEF")
    lib.define("scale(Tensor x, float k) -> Tensor")
    lib.impl("scale", lambda x, k: x * k, "CPU")
    lib.define("neg(Tensor x) -> Tensor")
    lib.impl("neg", lambda x: -x, "CPU")
    seen = []

    def backward(ctx, grad):
        seen.append(ctx.needs_input_grad)
        return grad * ctx.k, None

    def setup(ctx, inputs, output):
        ctx.k = inputs[1]

    register_autograd("pvo_test_autograd::scale", backward, setup)
    register_autograd("pvo_test_autograd::neg", lambda ctx, grad: -grad, lambda ctx, inputs, output: None)
    x = torch.ones(3, requires_grad=True)
    (g,) = torch.autograd.grad(torch.ops.pvo_test_autograd.scale(x, 2.5).sum(), [x])
    assert torch.equal(g, torch.full((3,), 2.5)) and seen == [(True, False)]
    (g,) = torch.autograd.grad(torch.ops.pvo_test_autograd.neg(x).sum(), [x])
    assert torch.equal(g, -torch.ones(3))


@pytest.mark.gpu
def test_triton_ops_reject_tensors_on_two_devices():
    # The Triton launchers run on the first tensor's device; a direct op call mixing devices
    # gets an error instead of handing a kernel another device's pointer.
    a, b = torch.rand(1, 3, 4, device="cuda"), torch.rand(1, 3, 4)
    with pytest.raises(RuntimeError, match="one device"):
        torch.ops.pyvision_ops.pairwise_box_iou(a, b, 0, 1e-7)


def test_overhead_launcher_cases_run_with_stubbed_kernels():
    # benchmarks.overhead --launchers: every case runs with its kernels stubbed out, and the
    # kernels are restored afterwards
    from triton.runtime.jit import JITFunction

    from benchmarks import overhead

    modules, cases = overhead._launcher_cases()
    before = {(m.__name__, n): k for m in modules for n, k in vars(m).items() if isinstance(k, JITFunction)}
    with overhead._stubbed_kernels(modules):
        assert not any(isinstance(k, JITFunction) for m in modules for k in vars(m).values())
        for _, fn in cases:
            fn()
    assert before == {(m.__name__, n): k for m in modules for n, k in vars(m).items() if isinstance(k, JITFunction)}


def test_fx_symbolic_trace_records_each_front_as_one_node():
    # torch.fx (create_feature_extractor, FX quantization) traces models that call the ops: each
    # public function is one node from any call site, and the traced graph computes what eager does.
    g = torch.Generator().manual_seed(0)
    boxes = random_boxes(40, scale=60.0, max_size=30.0, generator=g)
    scores, idxs = torch.rand(40, generator=g), torch.randint(0, 3, (40,), generator=g)
    fmap = torch.randn(2, 4, 16, 16, generator=g)
    logits, labels = torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 3, (2, 8, 8), generator=g)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 1)
            self.roi = P.RoIAlign(3, 0.25, 2)
            self.pyramid = P.MultiScaleRoIAlign(["p2", "p3"], 3, 2)

        def forward(self, fmap, boxes, scores, idxs, logits, labels):
            f = self.conv(fmap)
            pyr = {"p2": f, "p3": f[:, :, ::2, ::2]}
            per_image = [boxes[:20], boxes[20:]]
            keep, decayed = P.batched_soft_nms(boxes, scores, idxs)  # a tuple output, unpacked
            return (self.roi(f, per_image).sum() + self.pyramid(pyr, per_image, [(64, 64), (64, 64)]).sum(),
                    P.batched_nms(boxes, scores, idxs, 0.5), keep, decayed,
                    P.box_iou(boxes[:5], boxes).sum() + P.generalized_box_iou_loss(boxes, boxes.flip(0)).sum(),
                    P.softmax_cross_entropy(logits, labels) + P.upsample_cross_entropy(logits, labels.repeat(1, 2, 2))
                    + P.lovasz_softmax(logits.softmax(1), labels) + P.dice_loss(logits, labels)
                    + P.sigmoid_focal_loss(logits, logits.sigmoid()).mean(),
                    P.interpolate_bilinear(f, scale_factor=1.5))

    model = Model()
    gm = torch.fx.symbolic_trace(model)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    for front in (P.roi_align, P.batched_soft_nms, P.batched_nms, P.box_iou, P.softmax_cross_entropy,
                  P.lovasz_softmax, P.interpolate_bilinear, P.sigmoid_focal_loss):
        assert front in targets, front.__name__
    args = (fmap, boxes, scores, idxs, logits, labels)
    for traced, eager in zip(gm(*args), model(*args)):
        torch.testing.assert_close(traced, eager)
    pyr = {"p2": fmap, "p3": fmap[:, :, ::2, ::2]}
    fresh = P.MultiScaleRoIAlign(["p2", "p3"], 3, 2)
    torch.testing.assert_close(torch.fx.symbolic_trace(fresh)(pyr, [boxes], [(64, 64)]),
                               fresh(pyr, [boxes], [(64, 64)]))
    # scales kept from an eager call (other image sizes: scales 1/8, 1/16): the traced module keeps them too
    kept = P.MultiScaleRoIAlign(["p2", "p3"], 3, 2)
    kept(pyr, [boxes], [(128, 128)])
    traced = torch.fx.symbolic_trace(kept)
    assert kept.scales == [0.125, 0.0625]
    torch.testing.assert_close(traced(pyr, [boxes], [(64, 64)]), kept(pyr, [boxes], [(64, 64)]))


def test_kernels_read_triton_interpret_as_triton_does(monkeypatch):
    # kernels calling libdevice on the GPU take their interpreter path for any value Triton
    # itself reads as on ("true" as well as "1"), or they would fail under the interpreter
    from pyvision_ops.kernels import interpreting

    for value, on in (("1", True), ("true", True), ("0", False), ("false", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert interpreting() is on


def test_fronts_name_the_argument_of_an_unsupported_dtype():
    # float8 passes is_floating_point(), but the kernels do not take it: the fronts refuse
    # it by name instead of a dispatcher error
    f8 = torch.float8_e4m3fn
    boxes, scores = torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1]]), torch.tensor([0.9, 0.8])
    cases = [
        (lambda: P.nms(boxes.to(f8), scores, 0.5), "boxes"),
        (lambda: P.nms(boxes, scores.to(f8), 0.5), "scores"),
        (lambda: P.nms(torch.zeros(0, 4, dtype=f8), torch.zeros(0), 0.5), "boxes"),
        (lambda: P.softmax_cross_entropy(torch.zeros(2, 3, dtype=f8), torch.zeros(2, dtype=torch.long)), "logits"),
        (lambda: P.interpolate_bilinear(torch.zeros(1, 1, 2, 2, dtype=f8), size=(3, 3)), "input"),
        (lambda: P.roi_align(torch.zeros(1, 1, 4, 4, dtype=f8), torch.tensor([[0.0, 0, 0, 2, 2]]), 2), "input"),
        (lambda: P.sigmoid_focal_loss(torch.zeros(3, dtype=f8), torch.zeros(3)), "inputs"),
    ]
    for call, name in cases:
        with pytest.raises(TypeError, match=f"^{name} must"):
            call()

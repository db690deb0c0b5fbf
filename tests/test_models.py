"""The model zoo: synthetic data, metrics, each model against the same model on torch /
torchvision ops, short training runs that must learn, and the CLI."""

import copy
import math
import types

import pytest
import reference as R
import torch
import torchvision.ops as tv

import pyvision_ops as P
from benchmarks import bench_models
from pyvision_ops.models import IGNORE_INDEX, MODELS, Detector, Segmenter, SyntheticShapes, TwoStageDetector, train
from pyvision_ops.models import __main__ as cli
from pyvision_ops.models.metrics import average_precision, mean_iou

# ---------------------------------------------------------------- data


def test_data_is_seeded():
    a, b, c = (SyntheticShapes(seed=s).batch(6) for s in (0, 0, 1))
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert all(torch.equal(x, y) for x, y in zip(a.boxes + a.labels, b.boxes + b.labels))
    assert not torch.equal(a.images, c.images)


@pytest.mark.parametrize("num_classes,size,max_objects", [(3, 64, 3), (6, 48, 5), (1, 16, 1)])
def test_data_contents(num_classes, size, max_objects):
    batch = SyntheticShapes(num_classes, size, max_objects, seed=3).batch(16)
    assert batch.images.shape == (16, 3, size, size) and batch.images.dtype == torch.float32
    assert batch.masks.shape == (16, size, size) and batch.masks.dtype == torch.int64
    values = set(batch.masks.unique().tolist())
    assert values <= set(range(num_classes + 1)) | {IGNORE_INDEX} and IGNORE_INDEX in values
    for mask, boxes, labels in zip(batch.masks, batch.boxes, batch.labels):
        assert 1 <= len(boxes) <= max_objects and labels.shape == (len(boxes),) and labels.dtype == torch.int64
        assert ((labels >= 0) & (labels < num_classes)).all()
        assert (boxes >= 0).all() and (boxes <= size).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        labelled = mask != 0
        inside = torch.zeros_like(labelled)
        for (x1, y1, x2, y2), c in zip(boxes.long().tolist(), labels.tolist()):
            inside[y1:y2, x1:x2] = True
            assert (mask[y1:y2, x1:x2] == c + 1).sum() >= 0.25 * (x2 - x1) * (y2 - y1)  # mostly visible
        assert not (labelled & ~inside & (mask != IGNORE_INDEX)).any()  # no object pixel outside every box


def test_data_ignores_a_band_along_outlines():
    batch = SyntheticShapes(seed=5).batch(4)
    m = batch.masks
    band = m == IGNORE_INDEX
    # Every ignored pixel is below or right of a label change, every change has one ignored pixel.
    change = torch.zeros_like(band)
    change[:, 1:] |= m[:, 1:] != m[:, :-1]
    change[:, :, 1:] |= m[:, :, 1:] != m[:, :, :-1]
    assert band.any() and (band[:, 1:, 1:] <= change[:, 1:, 1:] | band[:, :-1, 1:] | band[:, 1:, :-1]).all()


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"num_classes": 7}, {"size": 8}, {"max_objects": 0}])
def test_data_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SyntheticShapes(**kwargs)


# ---------------------------------------------------------------- metrics


def test_mean_iou():
    t = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    assert mean_iou(t.clamp(max=2), t, 3, ignore_index=255) == 1.0
    p = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 0]])
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    assert math.isclose(mean_iou(p, t, 3, ignore_index=255), (1 / 3 + 2 / 3 + 1 / 2) / 3)
    # class 0: tp 1 of union 5; class 1: tp 2 of union 7; class 2 only predicted: 0 of 1
    assert math.isclose(mean_iou(p, t.clamp(max=1), 3), (1 / 5 + 2 / 7 + 0) / 3)
    assert math.isnan(mean_iou(p, torch.full_like(t, 255), 3, ignore_index=255))
    # a class outside [0, 3) where the target is not ignored: an error, not another class's count
    for bad_p, bad_t, name in ((p.clamp(max=2) + 1, t, "pred"), (p.clamp(max=2) - 1, t, "pred"),
                               (p, t.clamp(max=3), "target")):
        with pytest.raises(ValueError, match=f"^{name} must"):
            mean_iou(bad_p, bad_t, 3, ignore_index=255)
    with pytest.raises(ValueError, match="shape"):
        mean_iou(p[:, :3], t, 3)


def _det(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def test_average_precision():
    gt = [torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])]
    labels = [torch.tensor([0, 1])]
    perfect = _det([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 1])
    assert average_precision([perfect], gt, labels, 3) == 1.0  # class 2 has no ground truth: left out
    # A false positive above the true one: precision 1/2 at recall 1.
    fp_first = _det([[50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30]], [0.95, 0.9, 0.8], [0, 0, 1])
    assert average_precision([fp_first], gt, labels, 2) == (0.5 + 1.0) / 2
    # A duplicate below the match is a false positive that costs nothing; a wrong class finds nothing.
    dup = _det([[0, 0, 10, 10], [1, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.85, 0.8], [0, 0, 0])
    assert average_precision([dup], gt, labels, 2) == (1.0 + 0.0) / 2
    # IoU 0.5 exactly is a match; below is not.
    half = _det([[0, 0, 10, 20]], [0.9], [0])
    assert average_precision([half], [gt[0][:1]], [torch.tensor([0])], 1) == 1.0
    less = _det([[0, 0, 10, 20.5]], [0.9], [0])
    assert average_precision([less], [gt[0][:1]], [torch.tensor([0])], 1) == 0.0
    with pytest.raises(ValueError, match="one entry per image"):  # zip would drop the second image's
        average_precision([perfect], gt * 2, labels * 2, 2)
    # Two images, one ground truth missed: recall stops at 1/2.
    assert average_precision([perfect, _det([], [], [])], gt * 2, labels * 2, 2) == 0.5
    assert math.isnan(average_precision([perfect], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.int64)], 2))


# ---------------------------------------------------------------- each model against torch / torchvision ops


# The benchmark's anchor ops, with the float64 Lovasz reference instead of its float32 loop.
TORCH_OPS = types.SimpleNamespace(**{**vars(bench_models.TORCH_OPS), "lovasz_softmax": lambda p, y, ignore_index: (
    R.lovasz_softmax(p, y, ignore_index=ignore_index).to(p.dtype))})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_matches_torch_ops(name):
    """The loss, every parameter's gradient and the predictions of one model, ours against
    the same weights on torch/torchvision ops, after a few training steps (so that the
    detectors' predictions are not empty)."""
    torch.manual_seed(0)
    ours = MODELS[name]()
    train(ours, SyntheticShapes(seed=0), 20)
    theirs = bench_models.with_ops(ours, TORCH_OPS)
    batch = SyntheticShapes(seed=7).batch(4)
    ours.eval(), theirs.eval()
    losses = []
    for model in (ours, theirs):
        model.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for (pname, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=pname)
    if name == "segmenter":
        pred = ours.predict(batch.images), theirs.predict(batch.images)
        assert (pred[0] == pred[1]).float().mean() > 0.999  # argmax ties of near-equal logits aside
    else:  # a low threshold: after 20 steps, eval-mode scores are still low
        pred = ours.predict(batch.images, score_threshold=1e-3), theirs.predict(batch.images, score_threshold=1e-3)
        assert sum(len(p["boxes"]) for p in pred[0]) > 0
        for a, b in zip(*pred):
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("name,steps,floor", [("segmenter", 150, 0.85), ("detector", 300, 0.75),
                                              ("two_stage", 300, 0.75)])
def test_model_learns(name, steps, floor):
    torch.manual_seed(0)
    model = MODELS[name]()
    held_out = SyntheticShapes(seed=123).batch(64)
    model.eval()
    before = model.evaluate(held_out)[model.metric]
    losses = train(model, SyntheticShapes(seed=0), steps)
    model.eval()
    after = model.evaluate(held_out)[model.metric]
    assert sum(losses[-25:]) < 0.5 * sum(losses[:25])
    assert before < 0.1 and after > floor, (before, after)


def test_segmenter_loss_compiles_fullgraph():
    """The segmenter's whole loss (backbone, upsample+CE, bilinear, softmax, Lovasz) is one
    graph: every op it calls is visible to torch.compile. Same loss and gradients as eager."""
    torch.manual_seed(0)
    model = Segmenter(width=8)
    batch = SyntheticShapes(seed=2).batch(4)
    grads = []
    for loss_fn in (model.loss, torch.compile(model.loss, fullgraph=True)):
        model.zero_grad()
        loss = loss_fn(batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cli_train_and_evaluate(tmp_path, capsys):
    path = str(tmp_path / "seg.pt")
    cli.main(["train", "segmenter", "--steps", "3", "--size", "32", "--classes", "2", "--width", "8",
              "--eval-images", "4", "--save", path, "--device", "cpu"])
    out = capsys.readouterr().out
    assert "step     3" in out and "segmenter: mIoU " in out
    trained = out.split("segmenter: ")[1].splitlines()[0]
    cli.main(["evaluate", path, "--eval-images", "4", "--device", "cpu"])
    assert capsys.readouterr().out.strip() == f"segmenter: {trained}"
    for bad in (["--size", "30"], ["--size", "12"], ["--classes", "7"], ["--steps", "0"], ["--lr", "0"],
                ["--lr", "inf"], ["--lr", "nan"], ["--lr", "1e308"], ["--seed", str(2**64)], ["--seed", "-1"],
                ["--width", "0"], ["--batch-size", "0"], ["--eval-images", "0"], ["--device", "foo"],
                ["--device", "meta"], ["--device", "cuda:99"], ["--save", str(tmp_path / "no" / "x.pt")]):
        with pytest.raises(SystemExit):
            cli.main(["train", "segmenter", *bad])
        assert bad[0] in capsys.readouterr().err
    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save([1, 2], str(tmp_path / "list.pt"))
    torch.save({"model": ["segmenter"], "config": {}, "data": {}, "state_dict": {}}, str(tmp_path / "odd.pt"))
    for name in ("missing.pt", "text.pt", "empty.pt", "list.pt", "odd.pt"):
        with pytest.raises(SystemExit):
            cli.main(["evaluate", str(tmp_path / name)])
        assert f"checkpoint {tmp_path / name}" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_on_cuda(name, monkeypatch):
    """The same weights give the CPU's loss on CUDA (fp32 convolutions without TF32; the
    detectors' candidate order may still differ at near-equal scores: a loose tolerance),
    and a few CUDA steps lower it."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    cpu = MODELS[name]().eval()
    gpu = copy.deepcopy(cpu).cuda()
    batch = SyntheticShapes(seed=7).batch(8)
    torch.testing.assert_close(gpu.loss(batch.to("cuda")).cpu(), cpu.loss(batch), rtol=0.02, atol=1e-3)
    losses = train(gpu, SyntheticShapes(seed=0), 60, device="cuda")
    assert sum(losses[-10:]) < sum(losses[:10])
    gpu.eval()
    assert math.isfinite(gpu.evaluate(batch.to("cuda"))[gpu.metric])


def test_bind_ops():
    with pytest.raises(TypeError, match="missing lovasz_softmax$"):
        Segmenter(ops=types.SimpleNamespace(upsample_cross_entropy=P.upsample_cross_entropy,
                                            interpolate_bilinear=P.interpolate_bilinear))
    copy.deepcopy(Detector(ops=tv))  # holds functions, not the module


def test_models_are_exported():
    assert {Segmenter, Detector, TwoStageDetector} == set(MODELS.values())

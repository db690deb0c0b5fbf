import fractions
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import reference
import torch
import torchvision.ops as tv
from conftest import opcheck

import pyvision_ops as P
from pyvision_ops.testing import clustered_boxes, edge_boxes

ops = torch.ops.pyvision_ops


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_same_modulo_ties(ours, theirs, scores):
    """Same kept boxes in the same score order; boxes with equal scores may be permuted
    (torchvision's batched_nms sorts its result with an unstable sort)."""
    assert sorted(ours.tolist()) == sorted(theirs.tolist())
    torch.testing.assert_close(scores[ours], scores[theirs], rtol=0, atol=0)


def assert_soft_close(keep_a, dec_a, keep_b, dec_b):
    """Soft-NMS results from two backends: the same boxes with the same decayed scores to
    fp32 rounding. exp differs in the last bits between backends, so two boxes whose
    decayed scores are nearly equal may come out in either order."""
    assert sorted(keep_a.tolist()) == sorted(keep_b.tolist())
    score_a = dict(zip(keep_a.tolist(), dec_a.double().tolist()))
    got = torch.tensor([score_a[k] for k in keep_b.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, dec_b.double(), rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(dec_a.double(), dec_b.double(), rtol=1e-5, atol=1e-6, equal_nan=True)  # both decreasing


def detections(n, objects=None, seed=0, dtype=torch.float32, categories=None):
    """A detector's raw output: n boxes around `objects` objects, random scores (and categories)."""
    g = gen(seed)
    boxes = clustered_boxes(n, objects=objects or max(1, n // 20), generator=g, dtype=dtype)
    scores = torch.rand(n, generator=g, dtype=torch.float64).to(dtype)
    if categories is None:
        return boxes, scores
    return boxes, scores, torch.randint(0, categories, (n,), generator=g)


# ----------------------------------------------------------------------- nms

@pytest.mark.parametrize("n", [1, 2, 10, 500, 3000])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
def test_nms_matches_torchvision(n, thr):
    boxes, scores = detections(n, seed=n)
    torch.testing.assert_close(P.nms(boxes, scores, thr), tv.nms(boxes, scores, thr), rtol=0, atol=0)


def test_nms_matches_reference_float64():
    boxes, scores = detections(300, objects=15, seed=1, dtype=torch.float64)
    for thr in (0.2, 0.5, 0.8):
        torch.testing.assert_close(P.nms(boxes, scores, thr), reference.nms(boxes, scores, thr))


def test_nms_ties_keep_lower_index_first():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60.0]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert P.nms(boxes, scores, 0.5).tolist() == [0, 3]
    torch.testing.assert_close(P.nms(boxes, scores, 0.5), tv.nms(boxes, scores, 0.5))
    s = torch.full((200,), 0.25)  # all tied: output must be stable
    b, _ = detections(200, seed=3)
    torch.testing.assert_close(P.nms(b, s, 0.5), reference.nms(b, s, 0.5))


def test_nms_nan_scores_rank_highest_and_nan_boxes_neither_suppress_nor_are_suppressed():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [float("nan"), 0, 10, 10], [0, 0, 10, 10.5]])
    scores = torch.tensor([0.9, float("nan"), 0.95, 0.1])
    keep = P.nms(boxes, scores, 0.5)
    assert keep.tolist() == [1, 2]  # NaN score first; the NaN box survives and suppresses nothing
    torch.testing.assert_close(keep, tv.nms(boxes, scores, 0.5))


def test_nms_negative_coordinates_and_degenerate_boxes():
    e = edge_boxes()
    scores = torch.linspace(1, 0.1, len(e))
    for thr in (0.0, 0.5):
        torch.testing.assert_close(P.nms(e, scores, thr), tv.nms(e, scores, thr))
    b, s = detections(400, seed=4)
    torch.testing.assert_close(P.nms(b - 1000, s, 0.5), tv.nms(b - 1000, s, 0.5))


def test_nms_threshold_is_compared_in_double():
    # IoU = 0.3 exactly representable in float32 is 0.30000001192...; torchvision compares
    # the float IoU with the double threshold, and so must we.
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 3.0]])  # IoU = 0.3 (float: 0.3000000119)
    s = torch.tensor([0.9, 0.8])
    assert P.nms(a, s, 0.3).tolist() == tv.nms(a, s, 0.3).tolist() == [0]


def test_nms_empty_and_single():
    assert P.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).dtype == torch.int64
    assert P.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
    assert P.nms(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([0.3]), 0.5).tolist() == [0]


@pytest.mark.parametrize("side", [2e19, 1e-23])
def test_areas_that_overflow_or_underflow_fp32_behave_like_nan_boxes(side):
    # Documented, as in torchvision: the fp32 IoU of two such equal boxes is inf/inf or
    # 0/0 = NaN, so duplicates survive; fp64 boxes give the exact answer.
    boxes = torch.tensor([[0, 0, side, side], [0, 0, side, side], [0, 0, side, side / 2], [0, 0, 1, 1]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    idxs = torch.zeros(4, dtype=torch.long)
    assert P.nms(boxes, scores, 0.3).tolist() == tv.nms(boxes, scores, 0.3).tolist() == [0, 1, 2, 3]
    assert P.batched_nms(boxes, scores, idxs, 0.3).tolist() == tv.batched_nms(boxes, scores, idxs, 0.3).tolist()
    assert P.nms(boxes.bfloat16(), scores.bfloat16(), 0.3).tolist() == [0, 1, 2, 3]
    for method in ("gaussian", "linear", "hard"):
        keep, dec = P.soft_nms(boxes, scores, method=method)
        assert keep.tolist() == [0, 1, 2, 3]
        torch.testing.assert_close(dec, scores)  # nothing decayed
    b64, s64 = boxes.double(), scores.double()
    assert P.nms(b64, s64, 0.3).tolist() == tv.nms(b64, s64, 0.3).tolist() == [0, 3]
    assert P.soft_nms(boxes.double(), scores, method="hard")[0].tolist() == [0, 3]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_nms_dtypes(dtype):
    boxes, scores = detections(2000, seed=5)
    b, s = boxes.to(dtype), scores.to(dtype)
    ours = P.nms(b, s, 0.5)
    if dtype == torch.float64:
        torch.testing.assert_close(ours, tv.nms(b, s, 0.5))
        return
    # IoU is computed in fp32 from the rounded coordinates; torchvision's fp16 path computes in fp16.
    # Decisions may differ only where an IoU sits within fp16 rounding of the threshold, so compare
    # with fp32 NMS on the same (rounded) inputs: identical, and close to the fp32-input result.
    torch.testing.assert_close(ours, tv.nms(b.float(), s.float(), 0.5))
    # Against fp32 inputs: bf16 keeps 8 mantissa bits, so coordinates near 400 move by up to 1
    # and many scores tie; the kept sets still mostly agree.
    ref = set(tv.nms(boxes, scores, 0.5).tolist())
    agree = len(ref & set(ours.tolist())) / len(ref | set(ours.tolist()))
    assert agree > {torch.float16: 0.9, torch.bfloat16: 0.8}[dtype], agree


def test_nms_mixed_dtypes_promote():
    boxes, scores = detections(300, seed=6)
    torch.testing.assert_close(P.nms(boxes, scores.double(), 0.5), tv.nms(boxes.double(), scores.double(), 0.5))


# --------------------------------------------------------------- batched_nms

@pytest.mark.parametrize("n,categories", [(1, 1), (100, 3), (2000, 80), (5000, 10)])
def test_batched_nms_matches_torchvision(n, categories):
    boxes, scores, idxs = detections(n, seed=n, categories=categories)
    ours = P.batched_nms(boxes, scores, idxs, 0.5)
    assert_same_modulo_ties(ours, tv.batched_nms(boxes, scores, idxs, 0.5), scores)
    if n <= 100:  # the float64 reference is a plain Python loop
        torch.testing.assert_close(ours, reference.batched_nms(boxes, scores, idxs, 0.5))


def test_batched_nms_exact_with_negative_coordinates():
    # Boxes of different categories that overlap must not suppress each other, for any
    # coordinates; compare with a plain loop over categories.
    boxes, scores, idxs = detections(600, seed=7, categories=5)
    boxes = boxes - 300
    torch.testing.assert_close(P.batched_nms(boxes, scores, idxs, 0.5),
                               reference.batched_nms(boxes, scores, idxs, 0.5))
    # two identical boxes in two categories both survive
    b = torch.tensor([[-10.0, -10, -1, -1], [-10.0, -10, -1, -1]])
    assert sorted(P.batched_nms(b, torch.tensor([0.9, 0.8]), torch.tensor([0, 1]), 0.5).tolist()) == [0, 1]


def test_batched_nms_arbitrary_category_ids_and_none_when_empty():
    boxes, scores, idxs = detections(500, seed=8, categories=4)
    big = idxs * 1_000_003 - 7  # negative and sparse ids
    torch.testing.assert_close(P.batched_nms(boxes, scores, big, 0.5), P.batched_nms(boxes, scores, idxs, 0.5))
    assert P.batched_nms(torch.empty(0, 4), None, None, 0.5).shape == (0,)
    for scores_, idxs_ in [(None, None), (torch.empty(0), None), (None, torch.empty(0, dtype=torch.int32)),
                           (torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long))]:
        keep = P.batched_nms(torch.empty(0, 4), scores_, idxs_, 0.5)
        assert keep.shape == (0,) and keep.dtype == torch.int64
    torch.testing.assert_close(P.batched_nms(boxes, scores, idxs.int(), 0.5), P.batched_nms(boxes, scores, idxs, 0.5))


# ------------------------------------------------------------------ soft-NMS

@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_nms_matches_reference(method, dtype):
    boxes, scores = detections(150, objects=10, seed=9, dtype=dtype)
    keep, dec = P.soft_nms(boxes, scores, iou_threshold=0.3, sigma=0.5, score_threshold=0.05, method=method)
    rkeep, rdec = reference.soft_nms(boxes, scores, 0.3, 0.5, 0.05, method)
    assert dec.dtype == dtype
    torch.testing.assert_close(keep, rkeep)
    torch.testing.assert_close(dec.double(), rdec, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-7)


def test_soft_nms_hard_is_nms_with_inclusive_threshold():
    boxes, scores = detections(800, seed=10)
    keep, dec = P.soft_nms(boxes, scores, iou_threshold=0.5, score_threshold=1e-9, method="hard")
    torch.testing.assert_close(keep, reference.soft_nms(boxes, scores, 0.5, 0.5, 1e-9, "hard")[0])
    torch.testing.assert_close(dec, scores[keep])
    assert (dec[1:] <= dec[:-1]).all()


def test_soft_nms_edge_cases():
    keep, dec = P.soft_nms(torch.zeros(0, 4), torch.zeros(0))
    assert keep.shape == dec.shape == (0,) and keep.dtype == torch.int64
    keep, dec = P.soft_nms(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([1e-4]))  # below score_threshold
    assert keep.numel() == 0
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [float("nan"), 0, 1, 1], [20, 20, 30, 30.0]])
    scores = torch.tensor([0.9, float("nan"), 0.8, 0.7])
    keep, dec = P.soft_nms(boxes, scores, method="linear", iou_threshold=0.5)
    rkeep, rdec = reference.soft_nms(boxes, scores, 0.5, 0.5, 1e-3, "linear")
    torch.testing.assert_close(keep, rkeep)
    torch.testing.assert_close(dec.double(), rdec, equal_nan=True)
    assert keep[0].item() == 1 and torch.isnan(dec[0])


def special_detections(n, objects, seed):
    """detections() with boxes whose overlap tests are special: NaN coordinates, zero area,
    inverted, far away; and a NaN score."""
    boxes, scores = detections(n, objects=objects, seed=seed)
    boxes[5] = torch.tensor([float("nan"), 1.0, 5.0, 9.0])
    boxes[17] = torch.tensor([30.0, 30.0, 30.0, 30.0])
    boxes[33] = torch.tensor([50.0, 50.0, 40.0, 45.0])
    boxes[40] = torch.tensor([1e6, 1e6, 1e6 + 5, 1e6 + 5])
    scores[77] = float("nan")
    return boxes, scores


SOFT_CASES = [("gaussian", 0.3), ("linear", 0.0), ("hard", 0.0), ("hard", 0.4)]


@pytest.mark.parametrize("method, iou_threshold", SOFT_CASES)
def test_soft_nms_spatial_blocks_match_reference(method, iou_threshold):
    # Several 64-box blocks, plus boxes whose overlap tests are special: NaN coordinates,
    # zero area, inverted, far away; a threshold of 0 makes "hard" drop non-overlapping boxes.
    boxes, scores = special_detections(420, objects=25, seed=21)
    keep, dec = P.soft_nms(boxes, scores, iou_threshold=iou_threshold, sigma=0.5, score_threshold=0.01, method=method)
    rkeep, rdec = reference.soft_nms(boxes, scores, iou_threshold, 0.5, 0.01, method)
    torch.testing.assert_close(keep, rkeep)
    torch.testing.assert_close(dec.double(), rdec, rtol=1e-5, atol=1e-7, equal_nan=True)


def infinite_score_detections(seed):
    """30 boxes with a +inf, a -inf and two NaN scores, copies of the +inf box and of a NaN
    one (IoU 1: NaN scores stay NaN, selected first)."""
    g = gen(seed)
    xy = torch.rand(30, 2, generator=g) * 50
    boxes = torch.cat([xy, xy + torch.rand(30, 2, generator=g) * 30], 1)
    scores = torch.rand(30, generator=g)
    scores[[3, 7, 11, 23]] = torch.tensor([float("inf"), float("-inf"), float("nan"), float("nan")])
    boxes[19] = boxes[3]
    boxes[23] = boxes[11]
    return boxes, scores


@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
@pytest.mark.parametrize("score_threshold", [1e-3, float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_nms_infinite_scores_match_reference(method, score_threshold, dtype):
    # A factor of 0 (hard; linear at IoU 1) takes even an inf score to 0, not NaN; with a
    # -inf threshold a -inf score is selected too (last).
    for seed in range(5):
        boxes, scores = infinite_score_detections(seed)
        keep, dec = P.soft_nms(boxes.to(dtype), scores.to(dtype), method=method, score_threshold=score_threshold)
        rkeep, rdec = reference.soft_nms(boxes, scores, 0.3, 0.5, score_threshold, method)
        torch.testing.assert_close(keep, rkeep)
        torch.testing.assert_close(dec.double(), rdec, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_batched_soft_nms_bf16_merges_by_fp32_scores():
    # Categories merge by the fp32 scores the kernels compared (as on CUDA), not by their
    # bf16 rounding: the result equals the fp32 run's order.
    boxes, scores, idxs = detections(600, seed=24, categories=5)
    bb, sb = boxes.bfloat16(), scores.bfloat16()
    keep, dec = P.batched_soft_nms(bb, sb, idxs, score_threshold=0.01)
    keep32, dec32 = P.batched_soft_nms(bb.float(), sb.float(), idxs, score_threshold=0.01)
    assert torch.equal(keep, keep32)
    assert torch.equal(dec, dec32.bfloat16())


@pytest.mark.parametrize("dtype, sigma", [(torch.float32, 1e-39), (torch.float32, 1e-300), (torch.float64, 5e-324)])
def test_soft_nms_sigma_whose_inverse_overflows(dtype, sigma):
    # A box that does not overlap the selected one keeps its score (exp(-0 * inf) would be NaN).
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [1, 1, 11, 11]], dtype=dtype)
    scores = torch.tensor([0.9, 0.8, 0.7], dtype=dtype)
    keep, dec = P.soft_nms(boxes, scores, sigma=sigma)
    assert keep.tolist() == [0, 1]
    torch.testing.assert_close(dec, scores[:2])


@pytest.mark.parametrize("dtype, sigma, far, width", [(torch.float32, 1e-39, 1e10, 1e-9),
                                                     (torch.float64, 5e-324, 1e77, 1e-77)])
def test_soft_nms_sigma_whose_inverse_overflows_decays_tiny_ious(dtype, sigma, far, width):
    # IoU width / far (1e-19 or 1e-154) against sigma: iou^2 / sigma is 10 or 2e15, so the
    # second box decays below the score threshold. A capped 1 / sigma made that exp(-iou^2 *
    # max), which kept it.
    boxes = torch.tensor([[0.0, 0, far, far], [0, 0, width, far]], dtype=torch.float64).to(dtype)
    scores = torch.tensor([0.9, 0.8], dtype=dtype)
    keep, dec = P.soft_nms(boxes, scores, sigma=sigma)
    rkeep, rdec = reference.soft_nms(boxes, scores, 0.3, sigma, 1e-3, "gaussian")
    assert keep.tolist() == rkeep.tolist() == [0]
    s = torch.tensor([0.9, 0.8, 0.8], dtype=dtype)
    keep, dec = P.soft_nms(boxes[[0, 1, 1]], s, sigma=sigma, score_threshold=0.0)
    rkeep, rdec = reference.soft_nms(boxes[[0, 1, 1]], s, 0.3, sigma, 0.0, "gaussian")
    assert keep.tolist() == rkeep.tolist()
    torch.testing.assert_close(dec.double(), rdec, rtol=1e-5, atol=0)


def _tiny_factor_cases():
    """(boxes, scores, sigma, score_threshold) whose gaussian factors fall below e^-87, where
    fp32 has only subnormals: e^-90.25 and e^-100 (box 2 then ranks above box 1), e^-90 of a
    score of 1e38 (0.08: kept), e^-96 of an infinite score (still infinite)."""
    yield torch.tensor([[0.0, 0, 100, 100], [0, 0, 100, 100], [0, 0, 100, 95]]), torch.tensor([1.0, 0.9, 0.5]), \
        0.01, 0.0
    yield torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]]), torch.tensor([float("inf"), 1e38]), 1 / 90, 1e-3
    yield torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10.2]]), torch.tensor([float("inf"), float("inf")]), 0.01, 1e-3


def test_soft_nms_fp32_factors_below_e87_are_subnormal_not_zero():
    # fp32 against the fp64 reference: the same selections, the decayed scores to fp32's
    # subnormal precision
    for boxes, scores, sigma, score_threshold in _tiny_factor_cases():
        keep, dec = P.soft_nms(boxes, scores, sigma=sigma, score_threshold=score_threshold)
        rkeep, rdec = reference.soft_nms(boxes.double(), scores.double(), 0.3, sigma, score_threshold, "gaussian")
        assert keep.tolist() == rkeep.tolist() == P.soft_nms(boxes.double(), scores.double(), sigma=sigma,
                                                             score_threshold=score_threshold)[0].tolist()
        torch.testing.assert_close(dec.double(), rdec.float().double(), rtol=1e-5, atol=1e-44)
    keep, dec = P.soft_nms(*next(_tiny_factor_cases())[:2], sigma=0.01, score_threshold=0.0)
    assert keep.tolist() == [0, 2, 1] and 0 < dec[1] < 1e-38


@pytest.mark.parametrize("kernel", ["spread", "multi", "lead"])
def test_soft_nms_cuda_kernels_tiny_factors_on_cpu_threads(kernel):
    # the CUDA kernels' own code, which always takes the subnormal factors, as the CPU op
    import cuda_sim

    for arch in (0, 900):
        for boxes, scores, sigma, score_threshold in _tiny_factor_cases():
            args = (boxes, scores, None, 0.3, sigma, score_threshold)
            k_sim, s_sim = cuda_sim.soft_nms(*args, "gaussian", kernel, arch)
            k_cpu, s_cpu = torch.ops.pyvision_ops.soft_nms(*args, cuda_sim.METHODS["gaussian"])
            assert torch.equal(k_sim, k_cpu)
            torch.testing.assert_close(s_sim, s_cpu, rtol=1e-5, atol=1e-44)


@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
def test_soft_nms_infinite_sigma_matches_reference(method):
    # gaussian: exp(-iou^2 / inf) = 1, no decay at all; linear and hard ignore sigma.
    boxes, scores = special_detections(200, objects=10, seed=25)
    keep, dec = P.soft_nms(boxes, scores, sigma=float("inf"), score_threshold=0.01, method=method)
    rkeep, rdec = reference.soft_nms(boxes, scores, 0.3, float("inf"), 0.01, method)
    torch.testing.assert_close(keep, rkeep)
    torch.testing.assert_close(dec.double(), rdec, rtol=1e-5, atol=1e-7, equal_nan=True)
    if method == "gaussian":
        torch.testing.assert_close(dec, scores[keep], equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_nms_equal_decayed_scores_go_to_the_higher_original_score(dtype):
    # Box 2 (0.8, IoU 0.5 with box 0) decays linearly to 0.4, tying box 1 (0.4, no overlap):
    # box 2 ranks higher by its original score, although its index is higher.
    boxes = torch.tensor([[0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 5.0]], dtype=dtype)
    scores = torch.tensor([1.0, 0.4, 0.8], dtype=dtype)
    keep, dec = P.soft_nms(boxes, scores, method="linear", iou_threshold=0.3)
    assert dec[1] == dec[2] == scores[1]
    assert keep.tolist() == reference.soft_nms(boxes, scores, 0.3, 0.5, 1e-3, "linear")[0].tolist() == [0, 2, 1]


@pytest.mark.parametrize("boxes_dtype, scores_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                                       (torch.float16, torch.float32), (torch.bfloat16, torch.float16)])
def test_soft_nms_scores_come_back_in_the_promoted_dtype(boxes_dtype, scores_dtype):
    boxes, scores, idxs = detections(50, seed=31, categories=2)
    b, s = boxes.to(boxes_dtype), scores.to(scores_dtype)
    common = torch.promote_types(boxes_dtype, scores_dtype)
    assert P.soft_nms(b, s)[1].dtype == common
    assert P.batched_soft_nms(b, s, idxs)[1].dtype == common
    for x, y in zip(P.soft_nms(b, s), P.soft_nms(b.to(common), s.to(common))):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_soft_nms_ties_are_stable():
    boxes, _ = detections(200, seed=11)
    scores = torch.full((200,), 0.5)
    keep, dec = P.soft_nms(boxes, scores, method="linear")
    torch.testing.assert_close(keep, reference.soft_nms(boxes, scores, 0.3, 0.5, 1e-3, "linear")[0])


@pytest.mark.parametrize("categories", [1, 6])
@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("method", ["gaussian", "hard"])
def test_batched_soft_nms_is_per_category(method, negative, categories):
    # Negative scores rise when decayed, so a category's selection order is not decreasing:
    # the result is sorted by decayed score however many categories there are.
    boxes, scores, idxs = detections(400, seed=12, categories=categories)
    score_thr = 0.01
    if negative:
        scores, score_thr = scores - 0.7, -0.6
    keep, dec = P.batched_soft_nms(boxes, scores, idxs, method=method, score_threshold=score_thr)
    parts_k, parts_s = [], []
    for c in torch.unique(idxs):
        m = torch.where(idxs == c)[0]
        k, s = reference.soft_nms(boxes[m], scores[m], 0.3, 0.5, score_thr, method)
        parts_k.append(m[k])
        parts_s.append(s)
    rk, rs = torch.cat(parts_k), torch.cat(parts_s)
    order = torch.sort(rs, stable=True, descending=True)[1]
    torch.testing.assert_close(keep, rk[order])
    torch.testing.assert_close(dec.double(), rs[order], rtol=1e-5, atol=1e-7)
    assert (dec[1:] <= dec[:-1]).all()


def test_batched_soft_nms_ties_go_to_the_lower_category_in_any_integer_dtype():
    boxes = torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 110], [200, 200, 210, 210]])
    scores = torch.full((4,), 0.9)
    want = [1, 0, 2, 3]  # box 1 has the lowest category, then boxes 0, 2, 3
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32):
        hi = torch.iinfo(dtype).max
        idxs = torch.tensor([hi - 2, hi - 3, hi - 1, hi], dtype=dtype)
        assert P.batched_soft_nms(boxes, scores, idxs)[0].tolist() == want, dtype
    # uint64 on both sides of 2**63 (as int64 bits, 2**63 and up would sort below 1)
    idxs = torch.tensor([2**63, 1, 2**63 + 1, 2**64 - 1], dtype=torch.uint64)
    assert P.batched_soft_nms(boxes, scores, idxs)[0].tolist() == want


def test_soft_nms_negative_scores_selection_order_vs_batched_order():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 5], [100, 100, 110, 110.0]])
    scores = torch.tensor([-0.1, -0.2, -0.15, -0.5])
    keep, dec = P.soft_nms(boxes, scores, score_threshold=-1.0)
    rkeep, rdec = reference.soft_nms(boxes, scores, 0.3, 0.5, -1.0, "gaussian")
    assert keep.tolist() == rkeep.tolist() == [0, 1, 2, 3]  # selection order, not decreasing
    torch.testing.assert_close(dec.double(), rdec, rtol=1e-5, atol=1e-7)
    assert not (dec[1:] <= dec[:-1]).all()
    expected = [1, 2, 0, 3]
    for idxs in ([0, 0, 0, 0], [0, 0, 0, 1], [5, 5, 5, 5]):
        bkeep, bdec = P.batched_soft_nms(boxes, scores, torch.tensor(idxs), score_threshold=-1.0)
        assert bkeep.tolist() == expected, idxs
        torch.testing.assert_close(bdec, dec[[1, 2, 0, 3]])


@pytest.mark.parametrize("batched", [False, True])
def test_soft_nms_is_not_differentiable(batched):
    # The outputs never require grad, so a loss that uses them backpropagates without the
    # "no autograd kernel" warning (and gives decayed_scores no gradient path).
    boxes, scores, idxs = detections(50, seed=27, categories=2)
    boxes.requires_grad_()
    scores.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keep, dec = P.batched_soft_nms(boxes, scores, idxs) if batched else P.soft_nms(boxes, scores)
        assert not dec.requires_grad and dec.grad_fn is None
        (dec.sum() + scores.sum() + boxes[keep].sum()).backward()
    torch.testing.assert_close(scores.grad, torch.ones_like(scores))
    assert P.nms(boxes, scores, 0.5).requires_grad is False
    with warnings.catch_warnings():  # the op itself, called directly, says the same
        warnings.simplefilter("error")
        _, dec = torch.ops.pyvision_ops.soft_nms(boxes, scores, idxs if batched else None, 0.3, 0.5, 1e-3, 0)
        assert not dec.requires_grad


# ------------------------------------------------------- op-level machinery

def test_opcheck():
    boxes, scores, idxs = detections(60, seed=13, categories=3)
    opcheck(ops.nms, (boxes, scores, None, 0.5))
    opcheck(ops.nms, (boxes, scores, idxs, 0.5))
    opcheck(ops.nms, (boxes[:0], scores[:0], None, 0.5))
    opcheck(ops.soft_nms, (boxes, scores, None, 0.3, 0.5, 1e-3, 0))
    opcheck(ops.soft_nms, (boxes, scores, idxs, 0.3, 0.5, 1e-3, 1))


@pytest.mark.parametrize("survivors", [0, 1, "many"])
def test_compile_and_export_with_0_1_many_survivors(survivors):
    # 0 survivors: soft-NMS with every score under its threshold (NMS keeps >= 1 box of any input).
    if survivors == 0:
        boxes, scores = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10]]), torch.tensor([1e-4, 1e-5])
    elif survivors == 1:
        boxes, scores = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10]]), torch.tensor([0.9, 0.8])
    else:
        boxes, scores = detections(300, seed=14)

    def f(b, s):
        keep = P.nms(b, s, 0.5)
        soft, dec = P.soft_nms(b, s, method="hard", iou_threshold=0.5)
        return b[keep].sum(0), b[soft].sum(0) + dec.sum(), soft.numel()

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(boxes, scores)
    ref = f(boxes, scores)
    torch.testing.assert_close(out, ref)
    assert out[2] == {0: 0, 1: 1}.get(survivors, ref[2])

    class M(torch.nn.Module):
        def forward(self, b, s):
            keep = P.nms(b, s, 0.5)
            kept, dec = P.soft_nms(b, s)
            return b.index_select(0, keep), kept, dec

    ep = torch.export.export(M(), (boxes, scores))
    for x, y in zip(ep.module()(boxes, scores), M()(boxes, scores)):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("batched", [False, True])
def test_compile_with_dynamic_float_arguments(batched):
    # A second call with other floats makes dynamo trace them as SymFloats; the Python
    # front must not call math functions on them.
    boxes, scores, idxs = detections(200, seed=26, categories=3)
    cats = idxs if batched else None

    def f(b, s, c, thr, sigma, score_thr):
        if c is None:
            return P.soft_nms(b, s, iou_threshold=thr, sigma=sigma, score_threshold=score_thr)
        return P.batched_soft_nms(b, s, c, iou_threshold=thr, sigma=sigma, score_threshold=score_thr)

    torch._dynamo.reset()
    g = torch.compile(f, fullgraph=True)
    for args in [(0.3, 0.5, 0.01), (0.4, 0.6, 0.02), (0.5, float("inf"), 0.03)]:
        for x, y in zip(g(boxes, scores, cats, *args), f(boxes, scores, cats, *args)):
            torch.testing.assert_close(x, y)
    torch._dynamo.reset()
    g = torch.compile(f, fullgraph=True, dynamic=True)
    for x, y in zip(g(boxes, scores, cats, 0.3, 0.5, 0.01), f(boxes, scores, cats, 0.3, 0.5, 0.01)):
        torch.testing.assert_close(x, y)


def test_compile_empty_input():
    # inductor indexes the boxes with the kept indices: from boxes known to be empty, the
    # fake kernels keep 0 (a data-dependent size could not index a size-0 dimension)
    def f(b, s, i):
        return (P.nms(b, s, 0.5), b[P.nms(b, s, 0.5)], b[P.soft_nms(b, s)[0]], b[P.batched_nms(b, s, i, 0.5)],
                b[P.batched_soft_nms(b, s, i)[0]])

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="inductor")(torch.zeros(0, 4), torch.zeros(0),
                                                               torch.zeros(0, dtype=torch.int64))
    assert [tuple(o.shape) for o in out] == [(0,)] + [(0, 4)] * 4


def test_compile_ops_after_nms_on_its_data_dependent_survivors():
    # a two-stage chain and a mean loss on the kept boxes (also on a mask keeping none): no
    # front branches on their number, which torch.compile cannot know
    boxes, scores, labels = detections(60, objects=6, seed=3, categories=3)
    target = boxes + 1

    def chain(b, s, i):
        k = P.nms(b, s, 0.9)
        return P.batched_nms(b[k], s[k], i[k], 0.5), P.generalized_box_iou_loss(b[k], target[k], reduction="mean")

    torch._dynamo.reset()
    for got, want in zip(torch.compile(chain, fullgraph=True)(boxes, scores, labels), chain(boxes, scores, labels)):
        torch.testing.assert_close(got, want)
    b = boxes.clone().requires_grad_()
    loss = torch.compile(lambda b, m: P.distance_box_iou_loss(b[m], target[m], reduction="mean"), fullgraph=True)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        for m in (scores > 0.5, scores > 2):
            got = loss(b, m)
            want = P.distance_box_iou_loss(b[m], target[m], reduction="mean")
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(torch.autograd.grad(got, [b])[0], torch.autograd.grad(want, [b])[0])
    assert want == 0 and not (scores > 2).any()
    torch._dynamo.reset()


# --------------------------------------------------------------- bad input

@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: P.nms(torch.zeros(3, 5), torch.zeros(3), 0.5), ValueError, "boxes"),
        (lambda: P.nms(torch.zeros(3, 4), torch.zeros(4), 0.5), ValueError, "scores"),
        (lambda: P.nms(torch.zeros(3, 4), torch.zeros(3, 1), 0.5), ValueError, "scores"),
        (lambda: P.nms(torch.zeros(3, 4, dtype=torch.int64), torch.zeros(3), 0.5), TypeError, "boxes"),
        (lambda: P.nms(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int32), 0.5), TypeError, "scores"),
        (lambda: P.nms(torch.zeros(3, 4), torch.zeros(3, device="meta"), 0.5), ValueError, "device"),
        (lambda: P.nms(torch.zeros(3, 4), torch.zeros(3), float("nan")), ValueError, "iou_threshold"),
        (lambda: P.nms(torch.zeros(3, 4), torch.zeros(3), "0.5"), TypeError, "iou_threshold"),
        (lambda: P.batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(3), 0.5), TypeError, "idxs"),
        (lambda: P.batched_nms(torch.zeros(3, 4), torch.zeros(3), torch.zeros(2, dtype=torch.long), 0.5),
         ValueError, "idxs"),
        (lambda: P.batched_nms(torch.zeros(3, 4), torch.zeros(3), None, 0.5), TypeError, "idxs"),
        # empty boxes with scores / idxs None: the other arguments are still checked
        (lambda: P.batched_nms(torch.empty(5, 0), None, None, 0.5), ValueError, "boxes"),
        (lambda: P.batched_nms(torch.empty(0, 5), None, None, 0.5), ValueError, "boxes"),
        (lambda: P.batched_nms(torch.empty(0), None, None, 0.5), ValueError, "boxes"),
        (lambda: P.batched_nms(torch.empty(0, 4, dtype=torch.long), None, None, 0.5), TypeError, "boxes"),
        (lambda: P.batched_nms(torch.empty(0, 4), None, None, float("nan")), ValueError, "iou_threshold"),
        (lambda: P.batched_nms(torch.empty(0, 4), None, None, "0.5"), TypeError, "iou_threshold"),
        (lambda: P.batched_nms(torch.empty(0, 4), torch.empty(2), None, 0.5), ValueError, "scores"),
        (lambda: P.batched_nms(torch.empty(0, 4), None, torch.empty(0), 0.5), TypeError, "idxs"),
        (lambda: P.batched_nms(torch.zeros(3, 4), None, torch.zeros(3, dtype=torch.long), 0.5), TypeError, "scores"),
        (lambda: P.soft_nms(torch.zeros(3, 4), torch.zeros(3), sigma=0.0), ValueError, "sigma"),
        (lambda: P.soft_nms(torch.zeros(3, 4), torch.zeros(3), sigma=-1.0), ValueError, "sigma"),
        (lambda: P.soft_nms(torch.zeros(3, 4), torch.zeros(3), method="cubic"), ValueError, "method"),
        (lambda: P.soft_nms(torch.zeros(3, 4), torch.zeros(3), method=["gaussian"]), TypeError, "method"),
        (lambda: P.soft_nms(torch.zeros(3, 4), torch.zeros(3), method=0), TypeError, "method"),
        (lambda: P.soft_nms(torch.zeros(3, 4), torch.zeros(3), score_threshold=float("nan")), ValueError,
         "score_threshold"),
    ],
)
def test_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


NAN = float("nan")


@pytest.mark.parametrize("batched", [False, True])
def test_raw_nms_op_rejects_nan_threshold(batched):
    # The op itself checks (callers may skip the Python front): ValueError naming the argument.
    boxes, scores = detections(3, seed=28)
    with pytest.raises(ValueError, match="iou_threshold"):
        ops.nms(boxes, scores, torch.tensor([0, 1, 1]) if batched else None, NAN)


@pytest.mark.parametrize(
    "iou_threshold, sigma, score_threshold, words",
    [(NAN, 0.5, 1e-3, "iou_threshold"), (0.3, 0.5, NAN, "score_threshold"), (0.3, NAN, 1e-3, "sigma"),
     (0.3, 0.0, 1e-3, "sigma")],
)
@pytest.mark.parametrize("batched", [False, True])
def test_raw_soft_nms_op_rejects_nan_arguments(iou_threshold, sigma, score_threshold, words, batched):
    boxes, scores = detections(3, seed=28)
    idxs = torch.tensor([0, 1, 1]) if batched else None
    for method in range(3):
        with pytest.raises(ValueError, match=words):
            ops.soft_nms(boxes, scores, idxs, iou_threshold, sigma, score_threshold, method)


@pytest.mark.parametrize(
    "thr, as_float",
    [(np.float32(0.5), 0.5), (np.float64(0.01), 0.01), (np.int64(1), 1.0), (np.int8(0), 0.0),
     (torch.tensor(0.5), 0.5), (torch.tensor(0.01, dtype=torch.float64), 0.01), (torch.tensor(1), 1.0),
     (fractions.Fraction(1, 2), 0.5)],
)
def test_thresholds_accept_numpy_scalars_and_0d_tensors(thr, as_float):
    # As torchvision does: any real number, and 0-d real tensors.
    boxes, scores, idxs = detections(300, seed=29, categories=3)
    keep = P.nms(boxes, scores, thr)
    torch.testing.assert_close(keep, P.nms(boxes, scores, as_float), rtol=0, atol=0)
    torch.testing.assert_close(keep, tv.nms(boxes, scores, thr), rtol=0, atol=0)
    torch.testing.assert_close(P.batched_nms(boxes, scores, idxs, thr), P.batched_nms(boxes, scores, idxs, as_float))
    for x, y in zip(P.soft_nms(boxes, scores, thr, sigma=thr if as_float > 0 else 0.5, score_threshold=thr),
                    P.soft_nms(boxes, scores, as_float, sigma=as_float if as_float > 0 else 0.5,
                               score_threshold=as_float)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize(
    "thr, exc",
    [("0.5", TypeError), (True, TypeError), (np.bool_(False), TypeError), (0.5 + 0j, TypeError),
     (np.complex64(0.5), TypeError), (torch.tensor([0.5]), TypeError), (torch.tensor(True), TypeError),
     (torch.tensor(0.5 + 0j), TypeError), (None, TypeError), (10**400, ValueError), (-(10**400), ValueError),
     (np.float32("nan"), ValueError), (torch.tensor(float("nan")), ValueError)],
)
def test_thresholds_reject_non_real(thr, exc):
    boxes, scores = detections(3, seed=30)
    with pytest.raises(exc, match="iou_threshold"):
        P.nms(boxes, scores, thr)
    with pytest.raises(exc, match="score_threshold"):
        P.soft_nms(boxes, scores, score_threshold=thr)


# ---------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("n", [0, 1, 7, 64, 65, 1000, 20000])
def test_cuda_nms_matches_cpu(n):
    boxes, scores = detections(n, seed=n) if n else (torch.zeros(0, 4), torch.zeros(0))
    for thr in (0.3, 0.7):
        torch.testing.assert_close(P.nms(boxes.cuda(), scores.cuda(), thr).cpu(), P.nms(boxes, scores, thr))
    torch.testing.assert_close(P.nms(boxes.cuda(), scores.cuda(), 0.5).cpu(), tv.nms(boxes, scores, 0.5))


@pytest.mark.gpu
def test_cuda_nms_nan_ties_dtypes():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [float("nan"), 0, 10, 10], [0, 0, 10, 10.5]])
    scores = torch.tensor([0.9, float("nan"), 0.95, 0.1])
    assert P.nms(boxes.cuda(), scores.cuda(), 0.5).tolist() == [1, 2]
    b, _ = detections(3000, seed=15)
    s = torch.full((3000,), 0.5)
    torch.testing.assert_close(P.nms(b.cuda(), s.cuda(), 0.5).cpu(), P.nms(b, s, 0.5))
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        bb, ss = b.to(dtype), torch.rand(3000, generator=gen(1)).to(dtype)
        torch.testing.assert_close(P.nms(bb.cuda(), ss.cuda(), 0.5).cpu(), P.nms(bb, ss, 0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_nms_gathers_any_layout_and_dtype(dtype):
    # The CUDA kernels read the input boxes through the score order in their own dtype.
    boxes, scores, idxs = detections(700, seed=16, categories=5)
    wide = torch.cat([boxes, boxes], 1).to(dtype)
    b, s = wide[:, :4], scores.to(dtype)  # b is not contiguous
    assert not b.is_contiguous()
    torch.testing.assert_close(P.nms(b.cuda(), s.cuda(), 0.5).cpu(), P.nms(b, s, 0.5))
    torch.testing.assert_close(P.batched_nms(b.cuda(), s.cuda(), idxs.cuda(), 0.5).cpu(),
                               P.batched_nms(b, s, idxs, 0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("n,categories", [(100, 3), (20000, 80), (5000, 1)])
def test_cuda_batched_nms_matches_cpu(n, categories):
    boxes, scores, idxs = detections(n, seed=n, categories=categories)
    ours = P.batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5).cpu()
    torch.testing.assert_close(ours, P.batched_nms(boxes, scores, idxs, 0.5))
    assert_same_modulo_ties(ours, tv.batched_nms(boxes, scores, idxs, 0.5), scores)


def soft_decay(s, q_iou, iou_threshold, sigma, method):
    """Scores `s` decayed by a selected box they have IoU `q_iou` with (float64)."""
    if method == "gaussian":
        f = torch.exp(-q_iou.nan_to_num(0.0)**2 / sigma)
    else:
        f = torch.where(q_iou >= iou_threshold, 1 - q_iou if method == "linear" else 0.0, 1.0)
    return torch.where((f == 0) & ~s.isnan(), 0.0, s * f)


def soft_nms_by_rounds(boxes, scores, iou_threshold, sigma, score_threshold, method):
    """A float64 model of the CUDA soft_rounds_kernel (csrc/cuda/nms.cu): each round selects
    every live box whose key (score, NaN first; ties to the lower position) beats every live
    box it interacts with, then decays the others by the round's selections in one fixed
    order; the selections sorted by key are the result. Returns (keep, scores, rounds)."""
    n = len(scores)
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    b, s = boxes.double()[order], scores.double()[order].clone()
    iou = reference.pairwise(b, b, "iou")
    links = iou >= iou_threshold if method != "gaussian" and iou_threshold > 0 else iou > 0
    links.fill_diagonal_(False)
    live, chosen, rounds = ~(s < score_threshold), torch.zeros(n, dtype=torch.bool), 0
    pos = torch.arange(n)
    while live.any():
        rounds += 1
        nan = s.isnan()
        # greater[i, j]: key j > key i
        greater = (nan[None] & ~nan[:, None]) | ((nan[None] == nan[:, None]) & (
            (s[None] > s[:, None]) | (((s[None] == s[:, None]) | nan[None]) & (pos[None] < pos[:, None]))))
        wins = live & ~(links & live[None] & greater).any(1)
        assert wins.any(), "a round without a selection"
        for q in wins.nonzero().flatten().tolist():
            hit = links[q] & live & ~wins
            s[hit] = soft_decay(s[hit], iou[q, hit], iou_threshold, sigma, method)
        chosen |= wins
        live &= ~wins & ~(s < score_threshold)
    picked = chosen.nonzero().flatten()
    by_key = torch.sort(s[picked], descending=True, stable=True).indices  # picked is in position order
    return order[picked[by_key]], s[picked[by_key]], rounds


def multi_warps(boxes, scores):
    """The warp of each position (in score order) in the multi kernels of
    csrc/cuda/soft_nms.cuh for one group, as nms.cu lays it out: the spread placement of the
    Morton order in registers, or thread t owning positions t, t + threads, ... in global
    memory."""
    import cuda_sim

    n, fp64 = len(scores), boxes.dtype == torch.float64
    k = cuda_sim._soft_slots(fp64, n)
    threads = min(cuda_sim._soft_threads(fp64, k), max(32, (-(-n // max(k, 1)) + 31) // 32 * 32))
    if k == 0:
        return torch.arange(n) % threads // 32
    warps = threads // 32
    order = torch.sort(scores, descending=True, stable=True).indices
    place = cuda_sim.morton_place(boxes[order].to(torch.float64 if boxes.dtype == torch.float64 else torch.float32),
                                  torch.zeros(n, dtype=torch.int64)).long()
    warp_of = torch.empty(n, dtype=torch.int64)
    warp_of[place] = (torch.arange(n) // 32) % warps
    return warp_of


def soft_nms_by_steps(boxes, scores, warp_of, iou_threshold, sigma, score_threshold, method):
    """A float64 model of the CUDA soft_multi_kernel (csrc/cuda/soft_nms.cuh): warp_of[p] holds
    position p (score order). Each step every warp posts its best live key (NaN first, then
    score, ties to the lower position) and its second best; the best posted box is selected
    and decays the others, then the best remaining posted box as long as it beats every
    warp's second (with a positive score threshold; else one a step). Returns (keep,
    scores, steps)."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    b, s = boxes.double()[order], scores.double()[order].clone()
    iou = reference.pairwise(b, b, "iou")
    live = ~(s < score_threshold)

    def key(p):
        v = s[p].item()
        return (v != v, 0.0 if v != v else v, -p)

    keep, dec, steps = [], [], 0
    while live.any():
        steps += 1
        ranked = live.nonzero().flatten()
        ranked = ranked[torch.sort(s[ranked], descending=True, stable=True).indices]  # NaN first
        by_warp = ranked[torch.sort(warp_of[ranked], stable=True).indices]
        w = warp_of[by_warp]
        first = torch.ones_like(w, dtype=torch.bool)
        first[1:] = w[1:] != w[:-1]
        second = torch.zeros_like(first)
        second[1:] = first[:-1] & ~first[1:]
        posted = by_warp[first].tolist()
        bound = max((key(p) for p in by_warp[second].tolist()), default=None)
        picked = 0
        while posted:
            q = max(posted, key=key)
            if picked and (score_threshold <= 0 or (bound is not None and key(q) < bound)):
                break
            picked += 1
            posted.remove(q)
            keep.append(q)
            dec.append(s[q].item())
            live[q] = False
            s[live] = soft_decay(s[live], iou[q, live], iou_threshold, sigma, method)
            live &= ~(s < score_threshold)
            posted = [p for p in posted if live[p]]
    return order[keep], torch.tensor(dec, dtype=torch.float64), steps


@pytest.mark.parametrize("method, iou_threshold", [("gaussian", 0.3), ("linear", 0.0), ("hard", 0.4)])
@pytest.mark.parametrize("seed", range(4))
def test_soft_nms_multi_model_matches_cpu(method, iou_threshold, seed):
    """The claim soft_multi_kernel rests on: with a positive score threshold, a warp's second
    best key bounds every box it did not post, so the steps make the sequential selections
    (ties, NaN and infinite scores, zero-area boxes included), in far fewer steps than
    selections on clustered detections; with a threshold of 0, one selection a step."""
    boxes, scores = special_detections(2000, objects=100, seed=seed)
    boxes, scores = boxes.double(), scores.double()
    if seed % 2:
        scores = (scores * 8).round() / 8  # many ties
    score_threshold = [1e-3, 0.05, 0.0, 1e-3][seed]
    kw = dict(iou_threshold=iou_threshold, sigma=0.5, score_threshold=score_threshold, method=method)
    keep, dec, steps = soft_nms_by_steps(boxes, scores, multi_warps(boxes, scores), **kw)
    k_cpu, s_cpu = P.soft_nms(boxes, scores, **kw)
    assert_soft_close(keep, dec, k_cpu, s_cpu)
    assert torch.equal(keep, k_cpu)
    assert steps == len(k_cpu) if score_threshold <= 0 else steps < len(k_cpu) / 3


def test_soft_nms_multi_model_in_global_memory_matches_cpu():
    # beyond the register layouts (8192 fp32 boxes) thread t owns positions t, t + 1024, ...
    boxes, scores = special_detections(9000, objects=400, seed=5)
    kw = dict(iou_threshold=0.3, sigma=0.5, score_threshold=0.05, method="gaussian")
    keep, dec, steps = soft_nms_by_steps(boxes, scores, multi_warps(boxes, scores), **kw)
    k_cpu, s_cpu = P.soft_nms(boxes.double(), scores.double(), **kw)
    assert torch.equal(keep, k_cpu)
    assert_soft_close(keep, dec, k_cpu, s_cpu)
    assert steps < len(k_cpu) / 3


@pytest.mark.parametrize("method, iou_threshold", [("gaussian", 0.3), ("linear", 0.0), ("linear", 0.5),
                                                   ("hard", 0.4)])
@pytest.mark.parametrize("seed", range(4))
def test_soft_nms_rounds_model_matches_cpu(method, iou_threshold, seed):
    """The claim soft_rounds_kernel rests on: with a positive score threshold, rounds of local
    maxima make the sequential selections (ties, NaN and infinite scores, zero-area boxes
    included), in far fewer rounds than selections on clustered detections."""
    boxes, scores = special_detections(400, objects=20, seed=seed)
    boxes, scores = boxes.double(), scores.double()
    if seed % 2:
        scores = (scores * 8).round() / 8  # many ties
    kw = dict(iou_threshold=iou_threshold, sigma=0.5, score_threshold=[1e-3, 0.05][seed % 2], method=method)
    keep, dec, rounds = soft_nms_by_rounds(boxes, scores, **kw)
    k_cpu, s_cpu = P.soft_nms(boxes, scores, **kw)
    assert_soft_close(keep, dec, k_cpu, s_cpu)
    assert torch.equal(keep, k_cpu)
    assert rounds < len(k_cpu) / 3


# ------------------------------------------------ the CUDA Soft-NMS kernels on CPU threads
# tests/cuda_sim runs the kernels' source (csrc/cuda/soft_nms.cuh) with a thread per CUDA
# thread and the layout soft_nms_cuda gives them (a Python copy of its host code): the
# kernels' logic is checked here, the host code and real hardware by the gpu tests below.


def _sim_check(n, dtype, categories, score_threshold, method, kernel, ties=False, arch=0):
    import cuda_sim

    boxes, scores = special_detections(n, objects=max(1, n // 16), seed=n)
    if ties:
        scores = (scores * 16).round() / 16
        scores[[3, 50]] = float("inf")
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    idxs = None if categories is None else torch.arange(n) % categories
    args = (boxes, scores, idxs, 0.3, 0.5, score_threshold)
    k_sim, s_sim = cuda_sim.soft_nms(*args, method, kernel, arch)
    k_cpu, s_cpu = torch.ops.pyvision_ops.soft_nms(*args, cuda_sim.METHODS[method])
    assert_soft_close(k_sim, s_sim, k_cpu, s_cpu)


@pytest.mark.parametrize("kernel", ["chunks", "spread", "multi", "lead", "rounds"])
@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
@pytest.mark.parametrize("dtype, categories, ties", [(torch.float32, None, True), (torch.float64, 3, False)])
def test_soft_nms_cuda_kernels_on_cpu_threads(kernel, method, dtype, categories, ties):
    _sim_check(300, dtype, categories, 0.01, method, kernel, ties)


@pytest.mark.parametrize("n, dtype, score_threshold, method, kernel", [
    (1500, torch.float32, 0.01, "gaussian", "chunks"),  # 4 register slots per thread
    (1500, torch.float32, 0.01, "gaussian", "spread"),
    (2100, torch.float64, 0.6, "hard", "chunks"),  # 8 slots, each tested on its step
    (4200, torch.float32, 0.6, "linear", "chunks"),  # 8 slots, all tested first
    (6500, torch.float32, 0.6, "gaussian", "chunks"),  # 16 slots
    (6500, torch.float32, 0.6, "gaussian", "spread"),
    (9000, torch.float32, 0.8, "linear", "chunks"),  # global memory
    (1500, torch.float32, 0.01, "gaussian", "rounds"),
    (1500, torch.float64, 0.05, "linear", "rounds"),
    (1100, torch.float32, 0.01, "gaussian", "multi"),  # 4 slots
    (2100, torch.float64, 0.6, "hard", "multi"),  # 8 slots, fp64
    (4200, torch.float32, 0.6, "linear", "multi"),  # 8 slots
    (6500, torch.float32, 0.6, "gaussian", "multi"),  # 16 slots
    (300, torch.float32, 0.0, "linear", "multi"),  # a threshold of 0: one selection a step
    (9000, torch.float32, 0.8, "gaussian", "multi"),  # global memory
    (1100, torch.float32, 0.01, "gaussian", "lead"),  # 4 slots
    (4200, torch.float32, 0.6, "linear", "lead"),  # 8 slots
])
def test_soft_nms_cuda_kernel_layouts_on_cpu_threads(n, dtype, score_threshold, method, kernel):
    _sim_check(n, dtype, None, score_threshold, method, kernel)


@pytest.mark.parametrize("n, dtype, categories, score_threshold, method, kernel, ties", [
    (300, torch.float32, None, 0.01, "gaussian", "spread", True),
    (300, torch.float64, 3, 0.01, "linear", "multi", False),
    (1100, torch.float32, None, 0.01, "gaussian", "multi", False),  # 4 slots
    (1100, torch.float32, None, 0.01, "gaussian", "lead", False),
])
def test_soft_nms_cuda_kernels_sm90_branch_on_cpu_threads(n, dtype, categories, score_threshold, method, kernel,
                                                          ties):
    # The kernels' code as nvcc compiles it for sm_90 (warp_max's __reduce_max_sync branch,
    # word by word over tied keys), which the tests above, built without __CUDA_ARCH__, skip.
    _sim_check(n, dtype, categories, score_threshold, method, kernel, ties, arch=900)


@pytest.mark.parametrize("seed, arch", [(0, 0), (1, 0), (2, 0), (3, 0), (0, 900), (1, 900)])
def test_soft_nms_multi_kernel_equals_spread_on_cpu_threads(seed, arch):
    # Several selections a step make the same selections as one a step, bit for bit, on boxes
    # with few score levels (many exact ties), +inf, NaN and 0 scores, duplicates, NaN
    # coordinates and inverted boxes (the rule's claim; the kernels' own code, also as
    # compiled for sm_90), whether every warp replays a step's selections or one (lead).
    import cuda_sim

    g = gen(seed)
    n, dtype = [70, 100, 160, 100][seed], [torch.float32, torch.float64][seed % 2]
    xy = torch.randint(0, 6, (n, 2), generator=g).to(dtype) * 4
    boxes = torch.cat([xy, xy + torch.randint(1, 8, (n, 2), generator=g).to(dtype) * 2], 1)
    boxes[torch.randint(0, n, (n // 4,), generator=g)] = boxes[0].clone()
    scores = torch.randint(1, 6, (n,), generator=g).to(dtype) / 5
    scores[torch.randint(0, n, (3,), generator=g)] = float("inf")
    scores[torch.randint(0, n, (2,), generator=g)] = float("nan")
    scores[torch.randint(0, n, (2,), generator=g)] = 0.0
    boxes[torch.randint(0, n, (2,), generator=g), 0] = float("nan")
    boxes[torch.randint(0, n, (2,), generator=g), 2] -= 20
    for method, thr in (("gaussian", 0.3), ("linear", 0.05), ("hard", 0.5), ("hard", 0.0)):
        args = (boxes, scores, None, thr, 0.5, [1e-3, 0.05][seed // 2])
        k1, s1 = cuda_sim.soft_nms(*args, method, "spread", arch)
        for kernel in ("multi", "lead"):
            k2, s2 = cuda_sim.soft_nms(*args, method, kernel, arch)
            assert torch.equal(k1, k2)
            assert torch.equal(s1.nan_to_num(-7.0), s2.nan_to_num(-7.0))


def _tsan(cases, csrc=None):
    """tests/cuda_sim/tsan_check.py on `cases` under ThreadSanitizer (a report ends it with
    exit code 66), the kernels from `csrc` where given."""
    lib = subprocess.run([os.environ.get("CXX", "c++"), "-print-file-name=libtsan.so"], capture_output=True,
                         text=True).stdout.strip()
    if not os.path.isabs(lib):
        pytest.skip("needs the compiler's libtsan")
    env = {**os.environ, "LD_PRELOAD": lib, "PVO_SIM_TSAN": "1",
           "TSAN_OPTIONS": "halt_on_error=1 exitcode=66 report_signal_unsafe=0"}
    if csrc:
        env["PVO_SIM_CSRC"] = str(csrc)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_sim", "tsan_check.py")
    return subprocess.run([sys.executable, script, *cases], env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_soft_nms_cuda_kernels_have_no_race_on_cpu_threads():
    # ThreadSanitizer over the kernels' own code as compiled for sm_90: lead's hand-over through
    # shared memory (one register slot, and 4), multi's warp-synchronous replay, fp64 multi
    r = _tsan(["300:f32:hard:lead:900:0.01", "1100:f32:gaussian:lead:900:0.01", "300:f64:linear:multi:900:0.01"])
    assert r.returncode == 0, r.stderr[-6000:]
    assert "ThreadSanitizer" not in r.stderr
    assert r.stdout.count("same True") == 3, r.stdout


@pytest.mark.slow
def test_thread_sanitizer_finds_a_missing_barrier_in_the_kernels(tmp_path):
    # The check above can fail: without lead's second barrier, the other warps read the step's
    # selections while warp 0 writes them.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = shutil.copytree(os.path.join(root, "csrc"), tmp_path / "csrc")
    path = csrc / "cuda" / "soft_nms.cuh"
    text = path.read_text()
    barrier = "        if (lane == 0) sel_count = m;\n      }\n      __syncthreads();\n"
    assert text.count(barrier) == 1
    path.write_text(text.replace(barrier, "        if (lane == 0) sel_count = m;\n      }\n"))
    r = _tsan(["300:f32:gaussian:lead:900:0.01"], csrc)
    assert r.returncode == 66, r.stderr[-6000:]
    assert "ThreadSanitizer: data race" in r.stderr and "soft_nms.cuh" in r.stderr


# PYVISION_OPS_SOFT_NMS_KERNEL: several selections a step (multi; lead, the default: replayed
# by one warp), one with either chunk layout (spread, chunks), or the rounds kernel where it
# applies (a positive score threshold; not the hard method at a threshold <= 0).
KERNELS = pytest.mark.parametrize("kernel", ["chunks", "spread", "multi", "lead", "rounds"])


@pytest.mark.gpu
def test_cuda_soft_nms_unknown_kernel_variant_raises(monkeypatch):
    monkeypatch.setenv("PYVISION_OPS_SOFT_NMS_KERNEL", "fast")
    boxes, scores = detections(10)
    with pytest.raises(ValueError, match="PYVISION_OPS_SOFT_NMS_KERNEL must be chunks, spread, multi, lead or rounds"):
        P.soft_nms(boxes.cuda(), scores.cuda())


@pytest.mark.gpu
@KERNELS
@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
@pytest.mark.parametrize("n", [0, 1, 300, 5000, 12000])
def test_cuda_soft_nms_matches_cpu(method, n, kernel, monkeypatch):
    monkeypatch.setenv("PYVISION_OPS_SOFT_NMS_KERNEL", kernel)
    boxes, scores, idxs = detections(n, seed=n, categories=4) if n else (torch.zeros(0, 4), torch.zeros(0),
                                                                          torch.zeros(0, dtype=torch.long))
    for cats in (None, idxs):
        args = (boxes, scores) if cats is None else (boxes, scores, cats)
        f = P.soft_nms if cats is None else P.batched_soft_nms
        k_gpu, s_gpu = f(*[a.cuda() for a in args], method=method)
        k_cpu, s_cpu = f(*args, method=method)
        assert_soft_close(k_gpu.cpu(), s_gpu.cpu(), k_cpu, s_cpu)


@pytest.mark.gpu
@KERNELS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [420, 3000, 6000, 7500])
@pytest.mark.parametrize("method, iou_threshold", SOFT_CASES)
def test_cuda_soft_nms_special_boxes_match_cpu(method, iou_threshold, n, dtype, kernel, monkeypatch):
    # Every kernel layout (fp32: 1, 4, 8, 16 register slots per thread; fp64: 1, 4, 8 and
    # global memory from 4097 boxes), both chunk placements and the rounds kernel, with and
    # without the spatial skipping (hard at threshold 0 visits every box, and takes the
    # sequential kernel when rounds are asked for; multi takes it from 4097 fp64 boxes).
    monkeypatch.setenv("PYVISION_OPS_SOFT_NMS_KERNEL", kernel)
    boxes, scores = special_detections(n, objects=n // 16, seed=n)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    kw = dict(iou_threshold=iou_threshold, sigma=0.5, score_threshold=0.01, method=method)
    for idxs in (None, torch.arange(n) % 3):
        if idxs is None:
            k_gpu, s_gpu = P.soft_nms(boxes.cuda(), scores.cuda(), **kw)
            k_cpu, s_cpu = P.soft_nms(boxes, scores, **kw)
        else:
            k_gpu, s_gpu = P.batched_soft_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), **kw)
            k_cpu, s_cpu = P.batched_soft_nms(boxes, scores, idxs, **kw)
        assert_soft_close(k_gpu.cpu(), s_gpu.cpu(), k_cpu, s_cpu)


@pytest.mark.gpu
@KERNELS
@pytest.mark.parametrize("score_threshold", [1e-3, float("-inf")])
def test_cuda_soft_nms_infinite_scores_match_cpu(score_threshold, kernel, monkeypatch):
    monkeypatch.setenv("PYVISION_OPS_SOFT_NMS_KERNEL", kernel)
    for method in ("gaussian", "linear", "hard"):
        for seed in range(3):
            boxes, scores = infinite_score_detections(seed)
            kw = dict(method=method, score_threshold=score_threshold)
            k_gpu, s_gpu = P.soft_nms(boxes.cuda(), scores.cuda(), **kw)
            k_cpu, s_cpu = P.soft_nms(boxes, scores, **kw)
            assert_soft_close(k_gpu.cpu(), s_gpu.cpu(), k_cpu, s_cpu)


@pytest.mark.gpu
def test_cuda_decisions_at_an_ulp_match_cpu():
    # An IoU of 0.425731421 (fp32), an ulp above the thresholds: the CUDA build contracts no
    # multiply-add, so it rounds the IoU as the CPU does (with an fma: 0.425731361, kept).
    boxes = torch.tensor([[95.7889557, 41.1787872, 149.105484, 60.933876],
                          [102.707726, 44.0750847, 134.259293, 58.2870979]])
    scores = torch.tensor([0.9, 0.8])
    for thr in (0.4257314, 0.42573139):
        assert P.nms(boxes.cuda(), scores.cuda(), thr).tolist() == P.nms(boxes, scores, thr).tolist() == [0]
        k_gpu, _ = P.soft_nms(boxes.cuda(), scores.cuda(), thr, method="hard")
        assert k_gpu.tolist() == P.soft_nms(boxes, scores, thr, method="hard")[0].tolist() == [0]
    # a factor of e^-96 is an fp32 subnormal on both devices, so an infinite score stays
    # infinite (inf * 1.9e-42), as in fp64 (a factor flushed to 0 would drop the box)
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10.2]])
    scores = torch.tensor([float("inf"), float("inf")])
    keep, _ = P.soft_nms(boxes.cuda(), scores.cuda(), sigma=0.01)
    assert keep.tolist() == P.soft_nms(boxes, scores, sigma=0.01)[0].tolist() == [0, 1]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, sigma", [(torch.float32, 1e-39), (torch.float64, 5e-324)])
def test_cuda_soft_nms_sigma_whose_inverse_overflows(dtype, sigma):
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [1, 1, 11, 11]], dtype=dtype, device="cuda")
    keep, dec = P.soft_nms(boxes, torch.tensor([0.9, 0.8, 0.7], dtype=dtype, device="cuda"), sigma=sigma)
    assert keep.tolist() == [0, 1]

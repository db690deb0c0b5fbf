// NMS family: math shared by the CPU and CUDA kernels. The IoU of two boxes is
// box::pair_value<T, kIoU, false> (csrc/common/box_iou.h): inter / union, so a
// NaN coordinate or a 0/0 union gives NaN, which never suppresses.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/sort.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>

#include "common/box_iou.h"
#include "common/text.h"

namespace pyvision_ops {
namespace nms {

enum Method : int { kGaussian = 0, kLinear = 1, kHard = 2 };

// Threshold in T such that, for every T value x, (x > t) == ((double)x > thr).
// Comparing a float IoU with the float nearest to thr would disagree when that
// float rounds above thr.
template <typename T>
inline T gt_threshold(double thr) {
  T t = static_cast<T>(thr);
  if (static_cast<double>(t) > thr) t = std::nextafter(t, -std::numeric_limits<T>::infinity());
  return t;
}

// Same for (x >= t) == ((double)x >= thr).
template <typename T>
inline T ge_threshold(double thr) {
  T t = static_cast<T>(thr);
  if (static_cast<double>(t) < thr) t = std::nextafter(t, std::numeric_limits<T>::infinity());
  return t;
}

// exp for float without branches or calls, so CPU loops vectorise: 2^k * p(r),
// |r| <= ln2 / 2, degree-6 Taylor polynomial; relative error < 3e-7 on [-87, 0].
// Arguments below -87 give 0, NaN gives NaN. Callers take it of values <= 0, or cap their
// arguments as losses::pow_ does: above about 88.37 2^k leaves the exponent range and wraps
// (a cap here, one more select per call, slowed the CPU cross-entropy forward by ~15%).
PVO_HD float exp_approx(float x) {
#ifdef __CUDA_ARCH__
  // as below, 0 under -87 (the CPU's cannot give subnormals; exp_decay does where they count).
  // expf of the clamped argument, then a select: no branch around it (NaN stays NaN)
  const float e = expf(x < -87.f ? -87.f : x);
  return x <= -87.f ? 0.f : e;
#else
  x = x < -87.f ? -87.f : x;  // NaN stays NaN
  const float kf = std::floor(x * 1.4426950408889634f + 0.5f);
  const float r = x - kf * 0.693145751953125f - kf * 1.428606765330187e-06f;  // x - k ln2, two parts
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  // 2^k from the bits of k + 1.5 * 2^23, where the integer k sits in the low mantissa bits:
  // no float-to-int conversion, which a NaN would make undefined (p is NaN then anyway).
  const float shifted = kf + 12582912.f;
  uint32_t bits;  // unsigned: wraps, never overflows
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x <= -87.f ? 0.f : p * scale;
#endif
}
PVO_HD double exp_approx(double x) { return std::exp(x); }

// exp(x) of the gaussian decay down to fp32's subnormals (e^-103.9 the smallest): a factor of
// e^-90 still takes a score of 1e38 to 0.08, where exp_approx's 0 would drop the box. Below
// -87 it takes exp_approx of x + 64 ln 2, then 2^-64 (exact, one rounding into the
// subnormals). One exp either way: the CPU loop stays branch-free.
PVO_HD float exp_decay(float x) {
  const bool tiny = x <= -87.f;
  const float e = exp_approx(tiny ? x + 44.36141955583649f : x);
  return tiny ? e * 5.421010862427522e-20f : e;
}
PVO_HD double exp_decay(double x) { return std::exp(x); }

// 1 / sqrt(sigma) in T, at most T's largest finite value. The gaussian decay takes
// exp(-(iou * this)^2): 1 / sigma itself overflows fp32 for sigma below 3e-39, where
// capping it made tiny IoUs decay far too little (IoU 1e-19 at sigma 1e-39: 0.03, not
// exp(-10)), and an infinite one would make
// the decay of IoU 0 exp(-0 * inf) = NaN instead of 1. Its square root stays finite for
// any fp64 sigma > 0 and any fp32 sigma above 9e-78 (below that, only IoUs under 3e-38 see
// the cap).
template <typename T>
inline T rsqrt_sig(double sigma) {
  const double v = 1.0 / std::sqrt(sigma);
  const double top = static_cast<double>(std::numeric_limits<T>::max());
  return static_cast<T>(v < top ? v : top);
}

// Whether a gaussian decay with this rsqrt_sig can reach exp(x <= -87) for an IoU of at most
// 1 (plus rounding): decay<T, false> is exact otherwise.
template <typename T>
inline bool needs_tiny(T rsqrt_sig) {
  return rsqrt_sig > T(9.3);  // 9.3^2 = 86.49
}

// Soft-NMS decay factor for a box whose IoU with the selected box is `iou`.
// `thr` is the IoU threshold as ge_threshold() returns it. A NaN IoU (NaN
// coordinates) decays nothing. TINY false: the gaussian's exp flushes factors below e^-87
// to 0, which only 1 / sigma above 86 can reach (needs_tiny: an IoU is at most 1); the CPU's
// vectorised loop then saves exp_decay's selects and product (~10% of its soft_nms).
template <typename T, bool TINY = true>
PVO_HD T decay(T iou, int method, T thr, T rsqrt_sig) {
  if (method == kGaussian) {
    const T q = iou == iou ? iou : T(0);
    // at most 1, which the CUDA kernels' exactness rests on (a decay never raises a score):
    // the device's expf is only documented to within 2 ulp
    const T t = q * rsqrt_sig;
    const T f = TINY ? exp_decay(-(t * t)) : exp_approx(-(t * t));
    return f < T(1) ? f : T(1);
  }
  const bool hit = iou >= thr;
  if (method == kLinear) return hit ? T(1) - iou : T(1);
  return hit ? T(0) : T(1);
}

// False only when no box inside `u` (a union of boxes) can meet `a` with positive area.
// Such a box has IoU 0 or NaN with `a`, so a decay factor of exactly 1 (except the hard
// method with a threshold <= 0, which callers exclude). NaN in `a` answers true.
template <typename T>
PVO_HD bool may_overlap(const box::Box<T>& a, const box::Box<T>& u) {
  return !((a.x2 <= u.x1) | (u.x2 <= a.x1) | (a.y2 <= u.y1) | (u.y2 <= a.y1));  // | : no branches
}

// The 16 low bits of x on the even bits of the result (one axis of a Morton code).
PVO_HD uint32_t spread16(uint32_t x) {
  x &= 0xffffu;
  x = (x | (x << 8)) & 0x00ff00ffu;
  x = (x | (x << 4)) & 0x0f0f0f0fu;
  x = (x | (x << 2)) & 0x33333333u;
  return (x | (x << 1)) & 0x55555555u;
}

// A decayed score: score * factor, but 0 for a factor of 0 (the hard method, or the
// linear one at IoU 1), so that a +-inf score becomes 0 there rather than NaN. A NaN
// score stays NaN (NaN scores are selected first whatever they overlap).
template <typename T>
PVO_HD T decay_score(T score, T factor) {
  return factor == T(0) && score == score ? T(0) : score * factor;
}

// Argument checks of the nms and soft_nms ops, shared by the CPU and CUDA kernels.
inline void check_inputs(const char* op, const at::Tensor& boxes, const at::Tensor& scores,
                         const std::optional<at::Tensor>& idxs, double iou_threshold) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, op, ": boxes must be [N, 4]");
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0), op, ": scores must be [N]");
  TORCH_CHECK(at::isFloatingType(boxes.scalar_type()), op, ": boxes must be floating point");
  TORCH_CHECK(scores.scalar_type() == boxes.scalar_type(), op, ": scores must have the dtype of boxes");
  TORCH_CHECK(scores.device() == boxes.device(), op, ": scores must be on the device of boxes");
  if (idxs) {
    TORCH_CHECK(idxs->dim() == 1 && idxs->size(0) == boxes.size(0), op, ": idxs must be [N]");
    TORCH_CHECK(at::isIntegralType(idxs->scalar_type(), /*includeBool=*/false), op, ": idxs must be integer");
    TORCH_CHECK(idxs->device() == boxes.device(), op, ": idxs must be on the device of boxes");
  }
  TORCH_CHECK_VALUE(!std::isnan(iou_threshold), op, ": iou_threshold must not be NaN");
}

inline void check_soft_args(double sigma, double score_threshold, int64_t method) {
  TORCH_CHECK(method >= 0 && method <= 2, "soft_nms: method must be 0 (gaussian), 1 (linear) or 2 (hard)");
  TORCH_CHECK_VALUE(sigma > 0, "soft_nms: sigma must be > 0, got ", real_text(sigma));  // NaN too
  TORCH_CHECK_VALUE(!std::isnan(score_threshold), "soft_nms: score_threshold must not be NaN");
}

// Host side of both soft_nms ops: the groups' selections (each group in selection order,
// scores in the kernels' precision), with idxs (`batched`) sorted by decreasing score, ties
// keeping group then selection order, then the scores cast to the input's dtype; so both
// devices order them alike. Sorted whatever the number of groups: decaying a negative
// score raises it, so even one group's selection order need not be decreasing.
inline std::tuple<at::Tensor, at::Tensor> merge_groups(at::Tensor keep, at::Tensor scores, bool batched,
                                                      at::ScalarType dtype) {
  if (batched) {
    const at::Tensor perm = std::get<1>(at::sort(scores, /*stable=*/true, /*dim=*/0, /*descending=*/true));
    keep = keep.index_select(0, perm);
    scores = scores.index_select(0, perm);
  }
  return {keep, scores.to(dtype)};
}

}  // namespace nms
}  // namespace pyvision_ops

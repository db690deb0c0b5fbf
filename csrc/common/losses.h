// Loss family: per-element math shared by the CPU kernels (the GPU side is Triton,
// kernels/losses.py, with the same formulas).
//
// Sigmoid focal loss of logit x and target t (Lin et al. 2017, torchvision's form):
//   p = sigmoid(x), q = 1 - p, ce = max(x, 0) - x t + log1p(exp(-|x|)),
//   m = 1 - p_t = t q + (1 - t) p, loss = a_t ce m^gamma, a_t = alpha t + (1 - alpha)(1 - t)
//   (1 when alpha < 0).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#include "common/nms.h"  // exp_approx

namespace pyvision_ops {
namespace losses {

// log1p(u) for u in [0, 1] without branches: 2 atanh(s), s = u / (2 + u) <= 1/3, odd
// series to s^19 (relative error < 1e-9 before rounding).
PVO_HD float log1p_unit(float u) {
  const float s = u / (2.f + u), z = s * s;
  float p = 1.f / 19.f;
  p = p * z + 1.f / 17.f;
  p = p * z + 1.f / 15.f;
  p = p * z + 1.f / 13.f;
  p = p * z + 1.f / 11.f;
  p = p * z + 1.f / 9.f;
  p = p * z + 1.f / 7.f;
  p = p * z + 1.f / 5.f;
  p = p * z + 1.f / 3.f;
  p = p * z + 1.f;
  return 2.f * s * p;
}
PVO_HD double log1p_unit(double u) { return std::log1p(u); }

// Class indices must be in [0, C) or ignore_index; checked by the CPU kernels (the CUDA
// ones never index with them, and checking there would cost a sync). `what` names them.
// Chunks in parallel, each scanned with bitwise operations (no short-circuit, so that it
// can vectorise); the first bad value over all chunks is reported.
inline void check_labels(const char* what, const at::Tensor& y, int64_t C, std::optional<int64_t> ignore_index) {
  const int64_t* py = y.const_data_ptr<int64_t>();
  const int64_t n = y.numel(), ign = ignore_index.value_or(0);
  const uint64_t has_ign = ignore_index.has_value() ? 1 : 0, classes = static_cast<uint64_t>(C);
  auto bad = [=](int64_t v) {
    return static_cast<uint64_t>(static_cast<uint64_t>(v) >= classes) & ~(has_ign & static_cast<uint64_t>(v == ign));
  };
  std::atomic<int64_t> first{n};
  at::parallel_for(0, n, int64_t(1) << 16, [&](int64_t lo, int64_t hi) {
    uint64_t any = 0;
    for (int64_t i = lo; i < hi; ++i) any |= bad(py[i]);
    if (!any) return;
    int64_t i = lo;
    while (!bad(py[i])) ++i;
    int64_t cur = first.load();
    while (i < cur && !first.compare_exchange_weak(cur, i)) {
    }
  });
  const int64_t i = first.load();
  TORCH_CHECK_VALUE(i == n, what, " value ", std::to_string(i < n ? py[i] : 0), " is outside [0, ",
                    std::to_string(C), ") and is not ignore_index");
}

// log(v) for normal v > 0: v = 2^k f with f in [1, 2), log v = k ln 2 + log1p(f - 1); NaN
// gives NaN.
PVO_HD float log_pos(float v) {
  int32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const int32_t k = ((bits >> 23) & 0xff) - 127;
  const int32_t fb = (bits & 0x007fffff) | 0x3f800000;
  float f;
  std::memcpy(&f, &fb, sizeof(f));
  return v != v ? v : static_cast<float>(k) * 0.6931471805599453f + log1p_unit(f - 1.f);
}
PVO_HD double log_pos(double v) { return std::log(v); }

// scale * m^g for a fixed g, with torch.pow's values of m^g: at m = 0, 0 for g > 0, 1 for
// g = 0, inf for g < 0; for m < 0 (targets outside [0, 1]) |m|^g for an even integral g,
// -|m|^g for an odd one, NaN for a fractional one; and 0 whatever m^g when scale = 0 (the
// gradient gamma m^(gamma - 1) at gamma = 0). What depends on g alone is worked out once,
// before the loop: a select whose condition does not vary in the loop keeps GCC from
// vectorising it, so per element only selects on m remain.
template <typename T>
struct Pow {
  T g, pos, neg, at_zero;  // the factors for m > 0 and m < 0, and the value at m = 0
  PVO_HD explicit Pow(T g_, T scale = T(1)) : g(g_), pos(scale) {
    const T half = g * T(0.5);
    neg = scale * (std::floor(g) != g ? T(NAN) : (std::floor(half) == half ? T(1) : T(-1)));  // (-1)^g
    at_zero = scale == T(0) ? T(0) : scale * (g > T(0) ? T(0) : (g == T(0) ? T(1) : T(INFINITY)));
  }
};

// SQUARE: g = 2 and scale = 1, where m^2 is exact.
template <bool SQUARE, typename T>
PVO_HD T pow_(T m, Pow<T> p) {
  if (SQUARE) return m * m;
  const T a = m < T(0) ? -m : m;
  const T factor = m < T(0) ? p.neg : (m > T(0) ? p.pos : T(NAN));  // NaN for a NaN m
  // exp(v)^2 of v = g log|a| / 2 (v > 0 for g < 0 or |m| > 1): the float exp_approx leaves
  // its exponent range above ~88.37 (2^k wraps), so v is capped where exp(v)^2 overflows
  // anyway (exp(64)^2 in float, exp(400)^2 in double); a NaN v stays NaN.
  const T v = T(0.5) * (p.g * log_pos(a > T(0) ? a : T(1)));
  const T cap = sizeof(T) == 4 ? T(64) : T(400);
  const T h = nms::exp_approx(v > cap ? cap : v);
  const T r = factor * (h * h);
  return m == T(0) ? p.at_zero : r;
}

template <typename T>
struct Focal {
  T p, q, ce, m, at;  // q = 1 - p
};

template <typename T>
PVO_HD Focal<T> focal_terms(T x, T t, T alpha) {
  const T e = nms::exp_approx(-(x < T(0) ? -x : x));  // exp(-|x|)
  const T inv = T(1) / (T(1) + e);
  Focal<T> f;
  f.p = x >= T(0) ? inv : e * inv;
  f.q = x >= T(0) ? e * inv : inv;  // not 1 - p, which is 0 once p rounds to 1
  // ce = t softplus(-x) + (1 - t) softplus(x), a term with weight 0 left out: exact at x = +-inf
  // (max(x, 0) - x t gives inf - inf there).
  const T l = log1p_unit(e);
  f.ce = (t != T(0) ? t * ((x < T(0) ? -x : T(0)) + l) : T(0)) +
         (t != T(1) ? (T(1) - t) * ((x > T(0) ? x : T(0)) + l) : T(0));
  // p + t - 2 p t would cancel to 0 where p rounds to t (t = 1, x > 17 in fp32), and
  // m^(gamma - 1) in the gradient would be inf there.
  f.m = t * f.q + (T(1) - t) * f.p;
  f.at = alpha >= T(0) ? alpha * t + (T(1) - alpha) * (T(1) - t) : T(1);
  return f;
}

template <bool SQUARE, typename T>
PVO_HD T focal_loss(T x, T t, T alpha, Pow<T> pg) {
  const Focal<T> f = focal_terms(x, t, alpha);
  return f.at * f.ce * pow_<SQUARE>(f.m, pg);
}

// d loss / d x and d loss / d t, times g; pg = Pow(gamma), dpg = Pow(gamma - 1, gamma).
template <bool SQUARE, typename T>
PVO_HD void focal_grad(T x, T t, T alpha, Pow<T> pg, Pow<T> dpg, T g, T& dx, T& dt) {
  const Focal<T> f = focal_terms(x, t, alpha);
  const T mg = pow_<SQUARE>(f.m, pg);
  // ce gamma m^(gamma - 1) (dpg's scale is gamma; torch's pow backward gives 0 for gamma = 0),
  // as gamma (ce / m) m^gamma: for a confident right answer m^(gamma - 1) overflows (m below
  // ~1e-308 in fp64) while ce / m stays near 1.
  const T cdm = SQUARE ? T(2) * f.m * f.ce
                       : (dpg.pos == T(0) ? T(0)
                                          : (f.m != T(0) ? dpg.pos * ((f.ce / f.m) * mg)
                                                         : f.ce * pow_<false>(f.m, dpg)));
  const T d_at = alpha >= T(0) ? T(2) * alpha - T(1) : T(0);
  // ce p (1 - p) tends to 0 where p saturates (x = +-inf: inf * 0 otherwise).
  const T sat = f.p * f.q;
  // p - t = (1 - t) p - t q and 1 - 2 p = q - p, without cancellation.
  const T p_minus_t = (T(1) - t) * f.p - t * f.q;
  dx = g * f.at * (p_minus_t * mg + (sat == T(0) ? T(0) : cdm * sat * (T(1) - T(2) * t)));
  // ce m^(gamma - 1) tends to 0 where p saturates to a hard target (ce = m = 0 once exp(-|x|)
  // underflows: 0 * inf otherwise).
  dt = g * (d_at * f.ce * mg + f.at * (-x * mg + (f.ce == T(0) ? T(0) : cdm * (f.q - f.p))));
}

}  // namespace losses
}  // namespace pyvision_ops

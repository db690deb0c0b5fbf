// Loss family, CPU kernels: fused elementwise forward and backward, vectorised
// (branch-free exp/log from csrc/common, AVX2 clones).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <string>
#include <type_traits>
#include <vector>

#include "common/losses.h"
#include "common/parallel.h"
#include "common/text.h"

namespace pyvision_ops {
namespace {

template <typename scalar_t, typename T, bool SQUARE>
__attribute__((target_clones("avx2", "default"))) void focal_forward(const scalar_t* __restrict__ x,
                                                                     const scalar_t* __restrict__ t, int64_t n,
                                                                     T alpha, T gamma, scalar_t* __restrict__ out) {
  const losses::Pow<T> pg(gamma);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(losses::focal_loss<SQUARE, T>(T(x[i]), T(t[i]), alpha, pg));
}

template <typename scalar_t, typename T, bool SQUARE>
__attribute__((target_clones("avx2", "default"))) void focal_backward(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, const scalar_t* __restrict__ t, int64_t n, T alpha,
    T gamma, scalar_t* __restrict__ dx, scalar_t* __restrict__ dt) {
  const losses::Pow<T> pg(gamma), dpg(gamma - T(1), gamma);
  for (int64_t i = 0; i < n; ++i) {
    T a, b;
    losses::focal_grad<SQUARE, T>(T(x[i]), T(t[i]), alpha, pg, dpg, T(g[i]), a, b);
    dx[i] = static_cast<scalar_t>(a);
    dt[i] = static_cast<scalar_t>(b);
  }
}

void check_focal(const char* op, const at::Tensor& inputs, const at::Tensor& targets, double alpha) {
  TORCH_CHECK_VALUE((alpha >= 0 && alpha <= 1) || alpha == -1, op,
                    ": alpha must be in [0, 1], or -1 to disable the weight, got ", real_text(alpha));
  TORCH_CHECK(at::isFloatingType(inputs.scalar_type()), op, ": inputs must be floating point");
  TORCH_CHECK(targets.scalar_type() == inputs.scalar_type(), op, ": targets must have the dtype of inputs");
  TORCH_CHECK(targets.sizes() == inputs.sizes(), op, ": targets must have the shape of inputs");
}

at::Tensor sigmoid_focal_loss_cpu(const at::Tensor& inputs, const at::Tensor& targets, double alpha, double gamma) {
  check_focal("sigmoid_focal_loss", inputs, targets, alpha);
  const auto x = inputs.contiguous(), t = targets.contiguous();
  auto out = at::empty_like(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sigmoid_focal_loss_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    const scalar_t* pt = t.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [&](int64_t lo, int64_t hi) {
      if (gamma == 2.0) {
        focal_forward<scalar_t, T, true>(px + lo, pt + lo, hi - lo, T(alpha), T(gamma), po + lo);
      } else {
        focal_forward<scalar_t, T, false>(px + lo, pt + lo, hi - lo, T(alpha), T(gamma), po + lo);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& inputs,
                                                                   const at::Tensor& targets, double alpha,
                                                                   double gamma) {
  check_focal("sigmoid_focal_loss_backward", inputs, targets, alpha);
  TORCH_CHECK(grad.sizes() == inputs.sizes() && grad.scalar_type() == inputs.scalar_type(),
              "sigmoid_focal_loss_backward: grad must have the shape and dtype of inputs");
  const auto x = inputs.contiguous(), t = targets.contiguous(), g = grad.contiguous();
  auto dx = at::empty_like(x), dt = at::empty_like(x);
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sigmoid_focal_loss_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    at::parallel_for(0, n, 16384, [&](int64_t lo, int64_t hi) {
      auto run = [&](auto square) {
        focal_backward<scalar_t, T, decltype(square)::value>(
            g.const_data_ptr<scalar_t>() + lo, x.const_data_ptr<scalar_t>() + lo, t.const_data_ptr<scalar_t>() + lo,
            hi - lo, T(alpha), T(gamma), dx.mutable_data_ptr<scalar_t>() + lo, dt.mutable_data_ptr<scalar_t>() + lo);
      };
      if (gamma == 2.0) {
        run(std::true_type{});
      } else {
        run(std::false_type{});
      }
    });
  });
  return {dx, dt};
}

// ------------------------------------------------------------------ Dice

constexpr int64_t kPixBlock = 2048;  // fixed blocks: the sums do not depend on the thread count

void check_dice(const char* op, const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.dim() >= 2, op, ": logits must be [N, C, ...]");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating point");
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64");
  TORCH_CHECK(target.dim() == logits.dim() - 1 && target.size(0) == logits.size(0) &&
                  target.sizes().slice(1) == logits.sizes().slice(2),
              op, ": target must be [N, ...] with the spatial shape of logits");
}

// Softmax over the C planes (stride hw) of one block of n positions: prob[c * kPixBlock + j].
// Positions whose target is ignore_index get probability 0 for every class (selected, so
// that NaN logits there stay out of the sums).
template <typename scalar_t, typename T>
__attribute__((target_clones("avx2", "default"))) void softmax_block(const scalar_t* __restrict__ z, int64_t C,
                                                                     int64_t hw, int64_t n,
                                                                     const int64_t* __restrict__ y,
                                                                     int64_t ignore_index, T* __restrict__ mx,
                                                                     T* __restrict__ inv, T* __restrict__ prob) {
  for (int64_t j = 0; j < n; ++j) mx[j] = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < n; ++j) mx[j] = std::max(mx[j], T(z[c * hw + j]));
  for (int64_t j = 0; j < n; ++j) inv[j] = T(0);
  for (int64_t c = 0; c < C; ++c) {
    T* pc = prob + c * kPixBlock;
    for (int64_t j = 0; j < n; ++j) {
      pc[j] = nms::exp_approx(T(z[c * hw + j]) - mx[j]);
      inv[j] += pc[j];
    }
  }
  for (int64_t j = 0; j < n; ++j) inv[j] = T(1) / inv[j];
  for (int64_t c = 0; c < C; ++c) {
    T* pc = prob + c * kPixBlock;
    for (int64_t j = 0; j < n; ++j) pc[j] = y[j] == ignore_index ? T(0) : pc[j] * inv[j];
  }
}

// (sum p_c [y == c], sum p_c + sum [y == c]) over one block (p already 0 where ignored).
template <typename T>
__attribute__((target_clones("avx2", "default"))) void class_sums(const T* __restrict__ pc,
                                                                  const int64_t* __restrict__ y, int64_t n, int64_t c,
                                                                  int64_t ignore_index, T& inter, T& card) {
  // An ignore_index inside [0, C) is not class c's target: its positions are ignored (p = 0
  // there), and -1 matches no target then (targets are in [0, C) or ignore_index).
  const int64_t match = c == ignore_index ? -1 : c;
  T a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
  for (int64_t j = 0; j < n; ++j) {
    const T hit = (y[j] == match) ? T(1) : T(0);
    a += hit * pc[j];
    b += pc[j] + hit;
  }
  inter = a;
  card = b;
}

// h_c = d loss / d p_c = gI_c [y == c] + gS_c on valid positions (p = 0 elsewhere, so
// dz = p (h - sum_c p_c h_c) vanishes there); dz = p (h - sum_c p_c h_c) into the C planes
// (stride hw) of dz. AVX2 compares the int64 targets four at a time (SSE2 has no such compare).
template <typename scalar_t, typename T>
__attribute__((target_clones("avx2", "default"))) void dice_grad_block(const T* __restrict__ prob,
                                                                       const int64_t* __restrict__ y, int64_t n,
                                                                       int64_t C, int64_t ignore_index,
                                                                       const T* __restrict__ gi,
                                                                       const T* __restrict__ gs, T* __restrict__ dot,
                                                                       scalar_t* __restrict__ dz, int64_t hw) {
  // gi[c] and gs[c] in locals: read under the condition, a load GCC may not hoist, which kept
  // these loops scalar (about 60% of the backward)
  for (int64_t j = 0; j < n; ++j) dot[j] = T(0);
  for (int64_t c = 0; c < C; ++c) {
    const T* pc = prob + c * kPixBlock;
    const T hit = gi[c], all = gs[c];
    for (int64_t j = 0; j < n; ++j) dot[j] += pc[j] * (all + (y[j] == c ? hit : T(0)));
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* pc = prob + c * kPixBlock;
    const T hit = gi[c], all = gs[c];
    scalar_t* out = dz + c * hw;
    // 0 at ignored positions even for a NaN grad (smooth = 0 with nothing valid): p = 0 there
    for (int64_t j = 0; j < n; ++j) {
      const T h = all + (y[j] == c ? hit : T(0));
      out[j] = y[j] == ignore_index ? scalar_t(0) : static_cast<scalar_t>(pc[j] * (h - dot[j]));
    }
  }
}

at::Tensor dice_stats_cpu(const at::Tensor& logits, const at::Tensor& target, int64_t ignore_index) {
  check_dice("dice_stats", logits, target);
  const int64_t N = logits.size(0), C = logits.size(1), HW = logits.numel() / std::max<int64_t>(N * C, 1);
  auto z = logits.contiguous();
  auto y = target.contiguous();
  const int64_t nb = (HW + kPixBlock - 1) / kPixBlock;
  const bool f64 = z.scalar_type() == at::kDouble;
  auto partial = at::zeros({N * nb, 2, C}, z.options().dtype(f64 ? at::kDouble : at::kFloat));
  // INT64_MIN is pyvision_ops.losses._NO_IGNORE (no ignore_index): a target of that value is
  // out of range like any other, never ignored.
  const bool ignores = ignore_index != std::numeric_limits<int64_t>::min();
  losses::check_labels("dice_loss: target", y, C, ignores ? std::optional<int64_t>(ignore_index) : std::nullopt);
  const int64_t* py = y.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "dice_stats_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* pz = z.const_data_ptr<scalar_t>();
    T* pp = partial.mutable_data_ptr<T>();
    at::parallel_for(0, N * nb, grain_for(N * nb, 4 * z.numel()), [&](int64_t lo, int64_t hi) {
      std::vector<T> mx(kPixBlock), inv(kPixBlock), prob(C * kPixBlock);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t n = task / nb, j0 = (task % nb) * kPixBlock, cnt = std::min(kPixBlock, HW - j0);
        const int64_t* yy = py + n * HW + j0;
        softmax_block<scalar_t, T>(pz + n * C * HW + j0, C, HW, cnt, yy, ignore_index, mx.data(), inv.data(),
                                   prob.data());
        T* inter = pp + task * 2 * C;
        for (int64_t c = 0; c < C; ++c)
          class_sums<T>(prob.data() + c * kPixBlock, yy, cnt, c, ignore_index, inter[c], inter[C + c]);
      }
    });
  });
  return partial.sum(0);  // fixed order over the blocks
}

at::Tensor dice_stats_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                                   int64_t ignore_index) {
  check_dice("dice_stats_backward", logits, target);
  const int64_t N = logits.size(0), C = logits.size(1), HW = logits.numel() / std::max<int64_t>(N * C, 1);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == 2 && grad.size(1) == C, "dice_stats_backward: grad must be [2, C]");
  auto z = logits.contiguous();
  auto y = target.contiguous();
  auto dz = at::empty_like(z);
  const int64_t nb = (HW + kPixBlock - 1) / kPixBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "dice_stats_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const auto g = grad.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const T* gi = g.const_data_ptr<T>();  // d/d inter
    const T* gs = gi + C;                 // d/d card
    const scalar_t* pz = z.const_data_ptr<scalar_t>();
    const int64_t* py = y.const_data_ptr<int64_t>();
    scalar_t* pd = dz.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * nb, grain_for(N * nb, 8 * z.numel()), [&](int64_t lo, int64_t hi) {
      std::vector<T> mx(kPixBlock), inv(kPixBlock), dot(kPixBlock), prob(C * kPixBlock);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t n = task / nb, j0 = (task % nb) * kPixBlock, cnt = std::min(kPixBlock, HW - j0);
        const int64_t* yy = py + n * HW + j0;
        softmax_block<scalar_t, T>(pz + n * C * HW + j0, C, HW, cnt, yy, ignore_index, mx.data(), inv.data(),
                                   prob.data());
        dice_grad_block<scalar_t, T>(prob.data(), yy, cnt, C, ignore_index, gi, gs, dot.data(), pd + n * C * HW + j0,
                                     HW);
      }
    });
  });
  return dz;
}

// ---------------------------------------------------------------- Lovasz

at::Tensor lovasz_gradient_cpu(const at::Tensor& fg_sorted, const at::Tensor& lengths) {
  TORCH_CHECK(fg_sorted.dim() == 2, "lovasz_gradient: fg_sorted must be [R, M]");
  TORCH_CHECK(fg_sorted.scalar_type() == at::kFloat || fg_sorted.scalar_type() == at::kDouble,
              "lovasz_gradient: fg_sorted must be float32 or float64");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == fg_sorted.size(0) && lengths.scalar_type() == at::kLong,
              "lovasz_gradient: lengths must be int64 [R]");
  const int64_t R = fg_sorted.size(0), M = fg_sorted.size(1);
  auto fg = fg_sorted.contiguous();
  auto len = lengths.contiguous();
  auto out = at::zeros_like(fg);
  const int64_t* pl = len.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(fg.scalar_type(), "lovasz_gradient_cpu", [&] {
    const scalar_t* pf = fg.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, R, grain_for(R, R * M), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t n = std::min(std::max<int64_t>(pl[r], 0), M);
        const scalar_t* f = pf + r * M;
        scalar_t* o = po + r * M;
        int64_t gts = 0;
        for (int64_t i = 0; i < n; ++i) gts += f[i] != scalar_t(0);
        int64_t cum = 0;
        double prev = 0;
        for (int64_t i = 0; i < n; ++i) {
          cum += f[i] != scalar_t(0);
          // Jaccard loss of the first i + 1 entries: 1 - |gt & pred| / |gt | pred| (union > 0).
          const double jac = 1.0 - static_cast<double>(gts - cum) / static_cast<double>(gts + (i + 1) - cum);
          o[i] = static_cast<scalar_t>(jac - prev);
          prev = jac;
        }
      }
    });
  });
  return out;
}

// Unsigned keys that sort like the floats (NaN above +inf), inverted so that an ascending
// sort gives decreasing values.
inline uint32_t descending_key(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return ~((b & 0x80000000u) ? ~b : (b | 0x80000000u));
}
inline uint64_t descending_key(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  return ~((b & (uint64_t(1) << 63)) ? ~b : (b | (uint64_t(1) << 63)));
}
template <typename T, typename K>
T key_value(K k) {
  k = ~k;
  k = (k & (K(1) << (sizeof(K) * 8 - 1))) ? (k & ~(K(1) << (sizeof(K) * 8 - 1))) : ~k;
  T v;
  std::memcpy(&v, &k, sizeof v);
  return v;
}

// Stable LSD radix sort of (key, value) pairs by ascending key, 8 bits a pass, with every
// pass's histogram counted in one read; a pass whose digit is the same for every key is
// skipped. The result is left in key / val.
template <typename K, typename I>
void radix_sort(K* key, I* val, K* key_tmp, I* val_tmp, int64_t n) {
  constexpr int kBits = 8, kBuckets = 1 << kBits;
  constexpr int kPasses = (sizeof(K) * 8 + kBits - 1) / kBits;
  std::vector<int64_t> hist(int64_t(kPasses) * kBuckets, 0);
  for (int64_t i = 0; i < n; ++i) {
    for (int p = 0; p < kPasses; ++p) ++hist[p * kBuckets + ((key[i] >> (p * kBits)) & (kBuckets - 1))];
  }
  K *sk = key, *dk = key_tmp;
  I *sv = val, *dv = val_tmp;
  for (int p = 0; p < kPasses; ++p) {
    int64_t* count = hist.data() + p * kBuckets;
    if (std::any_of(count, count + kBuckets, [n](int64_t c) { return c == n; })) continue;
    int64_t sum = 0;
    for (int b = 0; b < kBuckets; ++b) {
      const int64_t t = count[b];
      count[b] = sum;
      sum += t;
    }
    const int shift = p * kBits;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t at = count[(sk[i] >> shift) & (kBuckets - 1)]++;
      dk[at] = sk[i];
      dv[at] = sv[i];
    }
    std::swap(sk, dk);
    std::swap(sv, dv);
  }
  if (sk != key) {
    std::copy(sk, sk + n, key);
    std::copy(sv, sv + n, val);
  }
}

// One row (group g, class c): errors of the valid positions, radix-sorted, then the Lovasz
// gradient in one walk (int64 counts). The value packs the entry's offset in probas / grad
// * 4 + [y = c] * 2 + [p > [y = c]].
template <typename scalar_t, typename T, typename I>
void lovasz_softmax_row(const scalar_t* p, const int64_t* y, int64_t n0, int64_t n1, int64_t C, int64_t S, int64_t c,
                        const std::optional<int64_t>& ignore, T* grad, T& loss, int64_t& fg_count) {
  using K = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  const int64_t m = (n1 - n0) * S;
  std::vector<K> key(m), key_tmp(m);
  std::vector<I> val(m), val_tmp(m);
  int64_t n = 0, gts = 0;
  for (int64_t img = n0; img < n1; ++img) {
    const int64_t base = (img * C + c) * S;
    const scalar_t* pc = p + base;
    const int64_t* yc = y + img * S;
    for (int64_t s = 0; s < S; ++s) {
      if (ignore && yc[s] == *ignore) {
        grad[base + s] = T(0);  // this row owns its planes: ignored positions get 0 here
        continue;
      }
      const bool fg = yc[s] == c;
      const T pv = static_cast<T>(pc[s]);
      key[n] = descending_key(std::fabs(static_cast<T>(fg) - pv));
      val[n++] = static_cast<I>((base + s) * 4 + fg * 2 + (pv > T(fg)));
      gts += fg;
    }
  }
  radix_sort(key.data(), val.data(), key_tmp.data(), val_tmp.data(), n);
  double acc = 0, prev = 0;
  int64_t cum = 0;
  for (int64_t i = 0; i < n; ++i) {
    cum += (val[i] >> 1) & 1;
    // Jaccard loss of the first i + 1 entries, 1 - |gt & pred| / |gt | pred|, which
    // simplifies to (i + 1) / |gt | pred| (the union is > 0).
    const double jac = static_cast<double>(i + 1) / static_cast<double>(gts + (i + 1) - cum);
    const double lg = jac - prev;
    prev = jac;
    const T e = key_value<T>(key[i]);
    acc += static_cast<double>(e < T(0) ? T(0) : e) * lg;
    // d |fg - p| / d p = sign(p - fg): -1 on foreground, +1 on background, 0 where equal.
    const T sign = (val[i] & 1) ? T(1) : (e > T(0) ? T(-1) : T(0));
    grad[val[i] >> 2] = static_cast<T>(lg) * sign;
  }
  loss = static_cast<T>(acc);
  fg_count = gts;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lovasz_softmax_rows_cpu(const at::Tensor& probas,
                                                                      const at::Tensor& labels,
                                                                      std::optional<int64_t> ignore_index,
                                                                      bool per_image) {
  TORCH_CHECK(probas.dim() == 3, "lovasz_softmax_rows: probas must be [N, C, S]");
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == probas.size(0) && labels.size(1) == probas.size(2) &&
                  labels.scalar_type() == at::kLong,
              "lovasz_softmax_rows: labels must be int64 [N, S] matching probas");
  TORCH_CHECK(at::isFloatingType(probas.scalar_type()), "lovasz_softmax_rows: probas must be floating point");
  const int64_t N = probas.size(0), C = probas.size(1), S = probas.size(2);
  const int64_t G = per_image ? N : 1;
  const auto acc_type = probas.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto p = probas.contiguous();
  auto y = labels.contiguous();
  losses::check_labels("lovasz_softmax: labels", y, C, ignore_index);
  auto losses = at::zeros({G, C}, probas.options().dtype(acc_type));
  auto grad = at::empty({N, C, S}, probas.options().dtype(acc_type));  // every entry is written
  auto counts = at::zeros({G, C}, probas.options().dtype(at::kLong));
  // Values pack an offset into [N, C, S] and 2 flag bits: 32 bits while N * C * S < 2^30.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "lovasz_softmax_rows_cpu", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const int64_t* py = y.const_data_ptr<int64_t>();
    T* pg = grad.mutable_data_ptr<T>();
    T* pl = losses.mutable_data_ptr<T>();
    int64_t* pc = counts.mutable_data_ptr<int64_t>();
    at::parallel_for(0, G * C, grain_for(G * C, 8 * p.numel()), [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t g = r / C, c = r % C;
        const int64_t n0 = per_image ? g : 0, n1 = per_image ? g + 1 : N;
        if (N * C * S < (int64_t(1) << 30)) {
          lovasz_softmax_row<scalar_t, T, uint32_t>(pp, py, n0, n1, C, S, c, ignore_index, pg, pl[r], pc[r]);
        } else {
          lovasz_softmax_row<scalar_t, T, uint64_t>(pp, py, n0, n1, C, S, c, ignore_index, pg, pl[r], pc[r]);
        }
      }
    });
  });
  return {losses, grad, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvision_ops, CPU, m) {
  m.impl("sigmoid_focal_loss", &sigmoid_focal_loss_cpu);
  m.impl("sigmoid_focal_loss_backward", &sigmoid_focal_loss_backward_cpu);
  m.impl("dice_stats", &dice_stats_cpu);
  m.impl("dice_stats_backward", &dice_stats_backward_cpu);
  m.impl("lovasz_gradient", &lovasz_gradient_cpu);
  m.impl("lovasz_softmax_rows", &lovasz_softmax_rows_cpu);
}

}  // namespace pyvision_ops

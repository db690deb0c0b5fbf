// Softmax cross-entropy, CPU kernels. Logits are [N, C, S]; positions run in fixed
// blocks of one image, classes in the outer loop, so every inner loop is contiguous
// and vectorised. The forward keeps two numbers per position, the largest logit m and
// l = log sum_c exp(z_c - m); the backward recomputes the softmax from them. The mean
// and sum are taken here: each block's loss and target weights summed in double, the
// blocks' sums added in block order (the same result for any number of threads).
//
// Per position with target y (not ignored), weights w (1 when absent), W = sum_c w_c:
//   loss = (1 - eps) w_y ((m - z_y) + l) + eps / C (sum_c w_c (m - z_c) + W l)
//   d loss / d z_c = (1 - eps) w_y (p_c - [c = y]) + eps / C (W p_c - w_c)
// Every difference is taken from m, never from lse = m + l: at large logits (or a loss
// near 0) m + l would round away l, as a log-softmax computed in one number would.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/interpolate.h"
#include "common/losses.h"  // log_pos, and exp_approx via nms.h
#include "common/parallel.h"
#include "common/text.h"

namespace pyvision_ops {
namespace {

constexpr int64_t kBlock = 1024;

// `reduction` as torch numbers it.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", std::to_string(reduction));
}

// A backward's grad (the loss's shape: `target`'s for none, else 0-d), and the forward's
// stats and wsum (0-d) in the logits' accumulation type, as the forward made them.
void check_grad(const char* op, const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& stats,
                const at::Tensor& wsum, const at::Tensor& target, int64_t reduction) {
  check_reduction(op, reduction);
  TORCH_CHECK(reduction == kNone ? grad.sizes() == target.sizes() : grad.dim() == 0, op,
              ": grad must have the loss's shape (target's for reduction none, else 0-d)");
  TORCH_CHECK(wsum.dim() == 0, op, ": wsum must be 0-d");
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(stats.scalar_type() == acc && wsum.scalar_type() == acc, op,
              ": stats and wsum must have the dtype the forward gives them (float64 for float64 logits, else "
              "float32)");
}

void check_smoothing(const char* op, double label_smoothing) {
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1, op, ": label_smoothing must be in [0, 1], got ",
                    real_text(label_smoothing));  // NaN too
}

// The loss and wsum outputs from the per-block sums of the loss and the target weights.
// `map` is the per-position loss (reduction none).
std::pair<at::Tensor, at::Tensor> reduced(const std::vector<double>& loss_sums,
                                          const std::vector<double>& weight_sums, int64_t reduction,
                                          const at::Tensor& map, const at::TensorOptions& opt) {
  double ls = 0, ws = 0;
  for (size_t i = 0; i < loss_sums.size(); ++i) ls += loss_sums[i], ws += weight_sums[i];
  // torch's weighted mean: NaN when the target weights sum to 0 (with label smoothing the
  // loss sum is then > 0, which would give inf).
  const double value = reduction == kSum ? ls : ws == 0 ? std::nan("") : ls / ws;
  // through a float64 tensor: a sum past fp32's range becomes inf, as torch's does
  // (at::scalar_tensor would refuse to convert it)
  const auto scalar = [&](double v) { return at::scalar_tensor(v, opt.dtype(at::kDouble)).to(opt.dtype()); };
  return {reduction == kNone ? map : scalar(value), scalar(ws)};
}

void check_ce(const char* op, const at::Tensor& logits, const at::Tensor& target,
              const std::optional<at::Tensor>& weight, double label_smoothing) {
  check_smoothing(op, label_smoothing);
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be [N, C, S]");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating point");
  TORCH_CHECK(target.dim() == 2 && target.size(0) == logits.size(0) && target.size(1) == logits.size(2), op,
              ": target must be [N, S]");
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64");
  if (weight) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == logits.size(1), op, ": weight must be [C]");
  }
}

// The loss gradient of each position in T (divided by wsum under the mean: inf or NaN when
// wsum is 0, as torch's; ignored positions get 0 anyway), and whether it is one value for
// every position: a 0-d grad (mean, sum), or a summed "none" loss's expanded scalar, read
// in place instead of materialised.
template <typename T>
std::pair<at::Tensor, bool> loss_grad(const at::Tensor& grad, const at::Tensor& wsum, int64_t reduction) {
  const auto strides = grad.strides();
  const bool one = grad.numel() > 0 && std::all_of(strides.begin(), strides.end(), [](int64_t s) { return s == 0; });
  at::Tensor g = (one ? grad.as_strided({1}, {1}) : grad).to(c10::CppTypeToScalarType<T>::value).contiguous();
  if (reduction == kMean) g = g.div(wsum.item<double>());
  return {g, one};
}

// Class weights (1 when absent) and the label-smoothing split of the loss:
// loss = keep * w_y ((m - z_y) + l) + spread * (sum_c w_c (m - z_c) + W l).
template <typename T>
struct Classes {
  // For the backward (see grad_factors): kw = keep w_c and sw = spread w_c, 0 where keep or
  // spread is; swsum = spread W likewise.
  std::vector<T> w, kw, sw;
  T wsum = 0, keep, spread, swsum = 0;
  Classes(const std::optional<at::Tensor>& weight, int64_t C, double label_smoothing)
      : w(C, T(1)), kw(C, T(0)), sw(C, T(0)), keep(T(1) - T(label_smoothing)), spread(T(label_smoothing) / T(C)) {
    if (weight) {
      const auto wt = weight->to(c10::CppTypeToScalarType<T>::value).contiguous();
      const T* pw = wt.template const_data_ptr<T>();
      std::copy(pw, pw + C, w.begin());
    }
    for (T v : w) wsum += v;
    for (int64_t c = 0; c < C; ++c) {
      if (keep != T(0)) kw[c] = keep * w[c];
      if (spread != T(0)) sw[c] = spread * w[c];
    }
    if (spread != T(0)) swsum = spread * wsum;
  }
  // One position's loss from m, l, z_y and wd = sum_c w_c (m - z_c). A term whose factor is
  // 0 is left out, not multiplied: a -inf logit makes it infinite (0 * inf = NaN), and
  // torch gives that loss finite without label smoothing.
  T loss(T wy, T m, T l, T zy, T wd) const {
    const T hard = keep == T(0) ? T(0) : keep * wy * ((m - zy) + l);
    return spread == T(0) ? hard : hard + spread * (wd + wsum * l);
  }
  // The losses of n positions with targets y (0 where ignored) into `out` when given; returns
  // their sum and the sum of their target weights, in double.
  std::pair<double, double> losses(const int64_t* y, int64_t n, int64_t ignore_index, const T* m, const T* l,
                                   const T* zy, const T* wd, T* out) const {
    double ls = 0, ws = 0;
    for (int64_t j = 0; j < n; ++j) {
      const bool ign = y[j] == ignore_index;
      const T wy = ign ? T(0) : w[y[j]];
      const T lj = ign ? T(0) : loss(wy, m[j], l[j], zy[j], wd[j]);
      if (out) out[j] = lj;
      ls += lj, ws += wy;
    }
    return {ls, ws};
  }
  // The backward's per-position factors, dz_c = a p_c - b [c = y] - gm sw_c (see the top):
  // gm = g (0 where ignored), a = gm (kw_y + swsum), b = gm kw_y. As in loss(), a term whose
  // factor is 0 is left out (kw, sw, swsum): without label smoothing a NaN or inf weight of a
  // class no position targets must not reach every gradient (0 * inf), as it does not in torch.
  void grad_factors(const int64_t* y, int64_t n, int64_t ignore_index, const T* g, int64_t g_step, T* gm, T* a,
                    T* b) const {
    for (int64_t j = 0; j < n; ++j) {
      const bool ign = y[j] == ignore_index;
      const T hard = ign ? T(0) : kw[y[j]];
      gm[j] = ign ? T(0) : g[j * g_step];
      a[j] = gm[j] * (hard + swsum);
      b[j] = gm[j] * hard;
    }
  }
};

// Over the C planes (stride S) of a block of n positions: mx[j] = m, ls[j] = l,
// wd[j] = sum_c w_c (m - z_c) and zy[j] = z_{y_j}, in two passes over the logits.
template <typename scalar_t, typename T>
__attribute__((target_clones("avx2", "default"))) void block_stats(const scalar_t* __restrict__ z, int64_t C,
                                                                   int64_t S, int64_t n,
                                                                   const int64_t* __restrict__ y,
                                                                   const T* __restrict__ w, T* __restrict__ mx,
                                                                   T* __restrict__ sum, T* __restrict__ wd,
                                                                   T* __restrict__ zy, T* __restrict__ ls) {
  for (int64_t j = 0; j < n; ++j) {
    mx[j] = -std::numeric_limits<T>::infinity();
    sum[j] = wd[j] = zy[j] = T(0);
  }
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < n; ++j) mx[j] = std::max(mx[j], T(z[c * S + j]));
  for (int64_t c = 0; c < C; ++c) {
    const T wc = w[c];
    for (int64_t j = 0; j < n; ++j) {
      const T v = T(z[c * S + j]);
      sum[j] += nms::exp_approx(v - mx[j]);
      wd[j] += wc * (mx[j] - v);
      zy[j] += y[j] == c ? v : T(0);
    }
  }
  for (int64_t j = 0; j < n; ++j) ls[j] = losses::log_pos(sum[j]);
}

// dz_c = a p_c - [c = y] b - g sw_c for every class plane of a block.
template <typename scalar_t, typename T>
__attribute__((target_clones("avx2", "default"))) void block_grad(const scalar_t* __restrict__ z, int64_t C,
                                                                  int64_t S, int64_t n,
                                                                  const int64_t* __restrict__ y,
                                                                  const T* __restrict__ sw, const T* __restrict__ a,
                                                                  const T* __restrict__ b, const T* __restrict__ g,
                                                                  const T* __restrict__ mx, const T* __restrict__ ls,
                                                                  scalar_t* __restrict__ dz) {
  for (int64_t c = 0; c < C; ++c) {
    const T gs = sw[c];
    for (int64_t j = 0; j < n; ++j) {
      const T p = nms::exp_approx((T(z[c * S + j]) - mx[j]) - ls[j]);
      dz[c * S + j] = static_cast<scalar_t>(a[j] * p - (y[j] == c ? b[j] : T(0)) - g[j] * gs);
    }
  }
}

// [N, C] logits (S = 1) have one position per image, so a block of positions would be one
// wide: there each position's C classes are contiguous and the reductions run along them.
// Same quantities as block_stats for the position with target y (zy = 0 when ignored).
template <typename scalar_t, typename T>
__attribute__((target_clones("avx2", "default"))) void row_stats(const scalar_t* __restrict__ z, int64_t C,
                                                                 int64_t y, const T* __restrict__ w, T& m, T& l,
                                                                 T& wd, T& zy) {
  // Any NaN logit makes the loss NaN through the sum, whichever max the lanes keep.
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t c = 0; c < C; ++c) mx = std::max(mx, T(z[c]));
  T sum = 0, d = 0;
#pragma omp simd reduction(+ : sum, d)
  for (int64_t c = 0; c < C; ++c) {
    const T v = T(z[c]);
    sum += nms::exp_approx(v - mx);
    d += w[c] * (mx - v);
  }
  m = mx;
  l = losses::log_pos(sum);
  wd = d;
  zy = y >= 0 && y < C ? T(z[y]) : T(0);
}

// block_grad for one [N, C] position: a, b, g its factors, m and l its stats.
template <typename scalar_t, typename T>
__attribute__((target_clones("avx2", "default"))) void row_grad(const scalar_t* __restrict__ z, int64_t C, int64_t y,
                                                                const T* __restrict__ sw, T a, T b, T g, T m, T l,
                                                                scalar_t* __restrict__ dz) {
  for (int64_t c = 0; c < C; ++c) {
    const T p = nms::exp_approx((T(z[c]) - m) - l);
    dz[c] = static_cast<scalar_t>(a * p - g * sw[c]);
  }
  if (y >= 0 && y < C) {
    const T p = nms::exp_approx((T(z[y]) - m) - l);
    dz[y] = static_cast<scalar_t>(a * p - b - g * sw[y]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy_cpu(const at::Tensor& logits,
                                                                         const at::Tensor& target,
                                                                         const std::optional<at::Tensor>& weight,
                                                                         int64_t ignore_index,
                                                                         double label_smoothing,
                                                                         int64_t reduction) {
  check_ce("softmax_cross_entropy", logits, target, weight, label_smoothing);
  check_reduction("softmax_cross_entropy", reduction);
  const int64_t N = logits.size(0), C = logits.size(1), S = logits.size(2);
  const auto z = logits.contiguous();
  const auto y = target.contiguous();
  const auto opt = z.options().dtype(z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  auto map = at::empty({reduction == kNone ? N : 0, S}, opt);
  auto stats = at::empty({2, N, S}, opt);  // m and l of every position
  losses::check_labels("cross_entropy: target", y, C, ignore_index);
  const int64_t* py = y.const_data_ptr<int64_t>();
  const bool rows = S == 1;  // row_stats: a task is a block of kBlock images
  const int64_t nb = (S + kBlock - 1) / kBlock, tasks = rows ? (N + kBlock - 1) / kBlock : N * nb;
  std::vector<double> loss_sums(tasks), weight_sums(tasks);
  if (N * S > 0)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "softmax_cross_entropy_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const Classes<T> cls(weight, C, label_smoothing);
    const auto& w = cls.w;
    const scalar_t* pz = z.const_data_ptr<scalar_t>();
    T *pl = reduction == kNone ? map.mutable_data_ptr<T>() : nullptr, *pm = stats.mutable_data_ptr<T>();
    at::parallel_for(0, tasks, grain_for(tasks, 4 * N * S * C), [&](int64_t lo, int64_t hi) {  // an exp a logit
      std::vector<T> sum(kBlock), wd(kBlock), zy(kBlock);
      for (int64_t task = lo; task < hi; ++task) {
        if (rows) {
          const int64_t r0 = task * kBlock, cnt = std::min(kBlock, N - r0);
          T *m = pm + r0, *l = m + N;
          for (int64_t j = 0; j < cnt; ++j)
            row_stats<scalar_t, T>(pz + (r0 + j) * C, C, py[r0 + j], w.data(), m[j], l[j], wd[j], zy[j]);
          std::tie(loss_sums[task], weight_sums[task]) =
              cls.losses(py + r0, cnt, ignore_index, m, l, zy.data(), wd.data(), pl ? pl + r0 : nullptr);
          continue;
        }
        const int64_t n = task / nb, j0 = (task % nb) * kBlock, cnt = std::min(kBlock, S - j0);
        const int64_t* yy = py + n * S + j0;
        T *m = pm + n * S + j0, *l = m + N * S;
        block_stats<scalar_t, T>(pz + n * C * S + j0, C, S, cnt, yy, w.data(), m, sum.data(), wd.data(), zy.data(),
                                 l);
        std::tie(loss_sums[task], weight_sums[task]) =
            cls.losses(yy, cnt, ignore_index, m, l, zy.data(), wd.data(), pl ? pl + n * S + j0 : nullptr);
      }
    });
  });
  auto [loss, wsum] = reduced(loss_sums, weight_sums, reduction, map, opt);
  return {loss, wsum, stats};
}

at::Tensor softmax_cross_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                              const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                              const at::Tensor& stats, const at::Tensor& target_wsum,
                                              int64_t ignore_index, double label_smoothing, int64_t reduction) {
  check_ce("softmax_cross_entropy_backward", logits, target, weight, label_smoothing);
  check_grad("softmax_cross_entropy_backward", grad, logits, stats, target_wsum, target, reduction);
  const int64_t N = logits.size(0), C = logits.size(1), S = logits.size(2);
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({2, N, S}), "softmax_cross_entropy_backward: stats must be [2, N, S]");
  const auto z = logits.contiguous();
  const auto y = target.contiguous();
  auto dz = at::empty_like(z);
  if (N * S == 0 || C == 0) return dz;
  // The forward checked them, but a direct call (or a target edited since) must not index w.
  losses::check_labels("cross_entropy: target", y, C, ignore_index);
  const bool rows = S == 1;  // row_grad: a task is a block of kBlock images
  const int64_t nb = (S + kBlock - 1) / kBlock, tasks = rows ? (N + kBlock - 1) / kBlock : N * nb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "softmax_cross_entropy_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const Classes<T> cls(weight, C, label_smoothing);
    const auto& sw = cls.sw;
    const auto [g, g_one] = loss_grad<T>(grad, target_wsum, reduction);
    const auto e = stats.contiguous();  // T already: check_grad
    const scalar_t* pz = z.const_data_ptr<scalar_t>();
    const int64_t* py = y.const_data_ptr<int64_t>();
    const T *pg = g.const_data_ptr<T>(), *pm = e.const_data_ptr<T>();
    const int64_t g_step = g_one ? 0 : 1;
    scalar_t* pd = dz.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, tasks, grain_for(tasks, 4 * N * S * C), [&](int64_t lo, int64_t hi) {
      std::vector<T> a(kBlock), b(kBlock), gm(kBlock);
      for (int64_t task = lo; task < hi; ++task) {
        if (rows) {
          const int64_t r0 = task * kBlock, cnt = std::min(kBlock, N - r0);
          cls.grad_factors(py + r0, cnt, ignore_index, pg + r0 * g_step, g_step, gm.data(), a.data(), b.data());
          for (int64_t j = 0; j < cnt; ++j)
            row_grad<scalar_t, T>(pz + (r0 + j) * C, C, py[r0 + j], sw.data(), a[j], b[j], gm[j], pm[r0 + j],
                                  pm[N + r0 + j], pd + (r0 + j) * C);
          continue;
        }
        const int64_t n = task / nb, j0 = (task % nb) * kBlock, cnt = std::min(kBlock, S - j0);
        const int64_t* yy = py + n * S + j0;
        const T* gg = pg + (n * S + j0) * g_step;
        cls.grad_factors(yy, cnt, ignore_index, gg, g_step, gm.data(), a.data(), b.data());
        block_grad<scalar_t, T>(pz + n * C * S + j0, C, S, cnt, yy, sw.data(), a.data(), b.data(), gm.data(),
                                pm + n * S + j0, pm + N * S + n * S + j0, pd + n * C * S + j0);
      }
    });
  });
  return dz;
}

// ------------------------------------------------- fused upsample + cross-entropy

void check_up(const char* op, const at::Tensor& logits, const at::Tensor& target,
              const std::optional<at::Tensor>& weight, double label_smoothing) {
  check_smoothing(op, label_smoothing);
  TORCH_CHECK(logits.dim() == 4, op, ": logits must be [N, C, h, w]");
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating point");
  TORCH_CHECK(target.dim() == 3 && target.size(0) == logits.size(0) && target.scalar_type() == at::kLong, op,
              ": target must be int64 [N, H, W]");
  TORCH_CHECK(logits.size(2) > 0 && logits.size(3) > 0, op, ": logits must have a non-empty spatial size");
  if (weight) TORCH_CHECK(weight->dim() == 1 && weight->size(0) == logits.size(1), op, ": weight must be [C]");
}

// Upsampled logits of output row oy for every class: u[c * W + ox].
template <typename scalar_t, typename T>
void upsampled_row(const scalar_t* L, int64_t C, int64_t h, int64_t w, int64_t W, const interp::Tap<T>& ty,
                   const std::vector<interp::Tap<T>>& tx, T* blend, T* u) {
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* r0 = L + (c * h + ty.i0) * w;
    const scalar_t* r1 = L + (c * h + ty.i1) * w;
    for (int64_t x = 0; x < w; ++x) blend[x] = ty.w0 * T(r0[x]) + ty.w1 * T(r1[x]);
    T* uc = u + c * W;
    for (int64_t ox = 0; ox < W; ++ox) uc[ox] = tx[ox].w0 * blend[tx[ox].i0] + tx[ox].w1 * blend[tx[ox].i1];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_cross_entropy_cpu(const at::Tensor& logits,
                                                                          const at::Tensor& target,
                                                                          bool align_corners,
                                                                          const std::optional<at::Tensor>& weight,
                                                                          int64_t ignore_index,
                                                                          double label_smoothing,
                                                                          int64_t reduction) {
  check_up("upsample_cross_entropy", logits, target, weight, label_smoothing);
  check_reduction("upsample_cross_entropy", reduction);
  const int64_t N = logits.size(0), C = logits.size(1), h = logits.size(2), w = logits.size(3);
  const int64_t H = target.size(1), W = target.size(2);
  const auto z = logits.contiguous();
  const auto y = target.contiguous();
  const auto opt = z.options().dtype(z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  auto map = at::empty({reduction == kNone ? N : 0, H, W}, opt);
  auto stats = at::empty({2, N, H, W}, opt);  // m and l of every position
  losses::check_labels("cross_entropy: target", y, C, ignore_index);
  const int64_t* py = y.const_data_ptr<int64_t>();
  std::vector<double> loss_sums(N * H), weight_sums(N * H);
  if (y.numel() > 0)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "upsample_cross_entropy_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const Classes<T> cls(weight, C, label_smoothing);
    const auto& wc = cls.w;
    const auto ty = interp::axis_taps<T>(h, H, align_corners, -1.0);
    const auto tx = interp::axis_taps<T>(w, W, align_corners, -1.0);
    const scalar_t* pz = z.const_data_ptr<scalar_t>();
    T *pl = reduction == kNone ? map.mutable_data_ptr<T>() : nullptr, *pm = stats.mutable_data_ptr<T>();
    const int64_t P = N * H * W;
    at::parallel_for(0, N * H, grain_for(N * H, 8 * P * C), [&](int64_t lo, int64_t hi) {  // taps and an exp
      std::vector<T> blend(w), u(C * W), sum(W), wd(W), zy(W);
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t n = row / H, oy = row % H;
        upsampled_row<scalar_t, T>(pz + n * C * h * w, C, h, w, W, ty[oy],
                                   tx, blend.data(), u.data());
        const int64_t* yy = py + row * W;
        T *m = pm + row * W, *l = m + P;
        block_stats<T, T>(u.data(), C, W, W, yy, wc.data(), m, sum.data(), wd.data(), zy.data(), l);
        std::tie(loss_sums[row], weight_sums[row]) =
            cls.losses(yy, W, ignore_index, m, l, zy.data(), wd.data(), pl ? pl + row * W : nullptr);
      }
    });
  });
  auto [loss, wsum] = reduced(loss_sums, weight_sums, reduction, map, opt);
  return {loss, wsum, stats};
}

at::Tensor upsample_cross_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits,
                                               const at::Tensor& target, bool align_corners,
                                               const std::optional<at::Tensor>& weight, const at::Tensor& stats,
                                               const at::Tensor& target_wsum, int64_t ignore_index,
                                               double label_smoothing, int64_t reduction) {
  check_up("upsample_cross_entropy_backward", logits, target, weight, label_smoothing);
  check_grad("upsample_cross_entropy_backward", grad, logits, stats, target_wsum, target, reduction);
  const int64_t N = logits.size(0), C = logits.size(1), h = logits.size(2), w = logits.size(3);
  const int64_t H = target.size(1), W = target.size(2);
  TORCH_CHECK(stats.sizes() == at::IntArrayRef({2, N, H, W}),
              "upsample_cross_entropy_backward: stats must be [2, N, H, W]");
  const auto z = logits.contiguous();
  const auto y = target.contiguous();
  auto dz = at::empty_like(z);
  losses::check_labels("cross_entropy: target", y, C, ignore_index);  // as in softmax_cross_entropy_backward
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "upsample_cross_entropy_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const Classes<T> cls(weight, C, label_smoothing);
    const auto& sw = cls.sw;
    const auto ty = interp::axis_taps<T>(h, H, align_corners, -1.0);
    const auto tx = interp::axis_taps<T>(w, W, align_corners, -1.0);
    const auto [g, g_one] = loss_grad<T>(grad, target_wsum, reduction);
    const auto e = stats.contiguous();  // T already: check_grad
    const scalar_t* pz = z.const_data_ptr<scalar_t>();
    const int64_t* py = y.const_data_ptr<int64_t>();
    const T *pg = g.const_data_ptr<T>(), *pm = e.const_data_ptr<T>();
    const int64_t P = N * H * W, g_step = g_one ? 0 : 1;
    scalar_t* pd = dz.mutable_data_ptr<scalar_t>();
    // One image per task, rows in order: each image's gradient is accumulated in a fixed order.
    at::parallel_for(0, N, grain_for(N, 8 * P * C), [&](int64_t lo, int64_t hi) {
      std::vector<T> blend(w), u(C * W), du(C * W), a(W), b(W), gm(W), dr(w), acc(C * h * w);
      for (int64_t n = lo; n < hi; ++n) {
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t oy = 0; oy < H; ++oy) {
          const int64_t row = n * H + oy;
          const interp::Tap<T>& tyo = ty[oy];
          upsampled_row<scalar_t, T>(pz + n * C * h * w, C, h, w, W, tyo, tx, blend.data(), u.data());
          const int64_t* yy = py + row * W;
          cls.grad_factors(yy, W, ignore_index, pg + row * W * g_step, g_step, gm.data(), a.data(), b.data());
          block_grad<T, T>(u.data(), C, W, W, yy, sw.data(), a.data(), b.data(), gm.data(), pm + row * W,
                           pm + P + row * W, du.data());
          for (int64_t c = 0; c < C; ++c) {
            std::fill(dr.begin(), dr.end(), T(0));
            interp::scatter_axis(tx.data(), du.data() + c * W, W, w, dr.data());
            T* g0 = acc.data() + (c * h + tyo.i0) * w;
            T* g1 = acc.data() + (c * h + tyo.i1) * w;
            for (int64_t x = 0; x < w; ++x) g0[x] += tyo.w0 * dr[x];
            for (int64_t x = 0; x < w; ++x) g1[x] += tyo.w1 * dr[x];
          }
        }
        scalar_t* dst = pd + n * C * h * w;
        for (int64_t i = 0; i < C * h * w; ++i) dst[i] = static_cast<scalar_t>(acc[i]);
      }
    });
  });
  return dz;
}

// The forward, then the backward for a loss gradient of 1. On the CPU the two passes stay
// two (the autograd front takes this op on CUDA only, where one pass saves a read).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy_with_grad_cpu(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, int64_t reduction) {
  TORCH_CHECK(reduction == kMean || reduction == kSum,
              "softmax_cross_entropy_with_grad: reduction must be 1 (mean) or 2 (sum), got ",
              std::to_string(reduction));
  auto [loss, wsum, stats] =
      softmax_cross_entropy_cpu(logits, target, weight, ignore_index, label_smoothing, reduction);
  auto dz = softmax_cross_entropy_backward_cpu(at::scalar_tensor(1.0, loss.options()), logits, target, weight, stats,
                                               wsum, ignore_index, label_smoothing, reduction);
  return std::make_tuple(loss, wsum, stats, dz);
}

void scale_grad_cpu(at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.is_floating_point() && scale.is_floating_point() && scale.dim() == 0,
              "scale_grad_: grad must be floating point and scale a 0-d floating-point tensor");
  TORCH_CHECK(scale.device() == grad.device(), "scale_grad_: grad and scale must be on one device");
  if (scale.item<double>() != 1.0) grad.mul_(scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvision_ops, CPU, m) {
  m.impl("softmax_cross_entropy", &softmax_cross_entropy_cpu);
  m.impl("softmax_cross_entropy_backward", &softmax_cross_entropy_backward_cpu);
  m.impl("softmax_cross_entropy_with_grad", &softmax_cross_entropy_with_grad_cpu);
  m.impl("scale_grad_", &scale_grad_cpu);
  m.impl("upsample_cross_entropy", &upsample_cross_entropy_cpu);
  m.impl("upsample_cross_entropy_backward", &upsample_cross_entropy_backward_cpu);
}

}  // namespace pyvision_ops

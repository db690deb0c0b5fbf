// NMS family, CPU kernels.
//
// Both ops sort once (stable, descending, NaN first), group the sorted positions by
// category (one group when idxs is None), and run each group on its own thread.
// Within a group the boxes sit in structure-of-arrays form, in score order, and
// every pass over the remaining boxes is a branch-free loop the compiler
// vectorises; suppressed boxes are compacted away as they accumulate.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "common/nms.h"
#include "common/parallel.h"

namespace pyvision_ops {
namespace {

using box::Box;

// Positions into `order` (the score-sorted permutation), grouped by category with
// score order kept inside each group; `starts` has one entry per group plus the end.
struct Groups {
  at::Tensor order;                 // int64 [N]: original index of the k-th highest score
  std::vector<int64_t> positions;   // [N]: positions into order, grouped by category
  std::vector<int64_t> starts;

  int64_t count() const { return static_cast<int64_t>(starts.size()) - 1; }
  // at::parallel_for's grain over the groups: a group's work grows as its size squared,
  // times the work of a pair.
  int64_t grain(int64_t pair_work) const {
    int64_t work = 0;
    for (int64_t c = 0; c < count(); ++c) work += (starts[c + 1] - starts[c]) * (starts[c + 1] - starts[c]);
    return grain_for(count(), pair_work * work);
  }
};

Groups group_by_category(const at::Tensor& scores, const std::optional<at::Tensor>& idxs) {
  Groups g;
  const int64_t n = scores.size(0);
  g.order = std::get<1>(at::sort(scores, /*stable=*/true, /*dim=*/0, /*descending=*/true)).contiguous();
  g.positions.resize(n);
  if (!idxs) {
    for (int64_t k = 0; k < n; ++k) g.positions[k] = k;
    g.starts = {0, n};
    return g;
  }
  const at::Tensor cats = idxs->to(at::kLong).index_select(0, g.order);
  auto [sorted_cats, perm] = at::sort(cats, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  sorted_cats = sorted_cats.contiguous();
  perm = perm.contiguous();
  const int64_t* c = sorted_cats.const_data_ptr<int64_t>();
  const int64_t* p = perm.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < n; ++k) {
    g.positions[k] = p[k];
    if (k == 0 || c[k] != c[k - 1]) g.starts.push_back(k);
  }
  g.starts.push_back(n);
  return g;
}

// One group's boxes in score order, structure-of-arrays.
template <typename T>
struct Soa {
  std::vector<T> x1, y1, x2, y2;
  std::vector<int64_t> pos;  // position into `order`
  explicit Soa(int64_t n) : x1(n), y1(n), x2(n), y2(n), pos(n) {}
  Box<T> box(int64_t k) const { return {x1[k], y1[k], x2[k], y2[k]}; }
  // Keeps the entries k in [from, n) with drop[k] == 0; returns the new n.
  template <typename Flag, typename... Extra>
  int64_t compact(int64_t from, int64_t n, Flag* drop, Extra*... extra) {
    int64_t w = from;
    for (int64_t k = from; k < n; ++k) {
      if (drop[k]) continue;
      x1[w] = x1[k], y1[w] = y1[k], x2[w] = x2[k], y2[w] = y2[k], pos[w] = pos[k];
      ((extra[w] = extra[k]), ...);
      drop[w] = 0;
      ++w;
    }
    return w;
  }
};

template <typename scalar_t, typename T>
Soa<T> gather(const scalar_t* boxes, const int64_t* order, const int64_t* positions, int64_t begin, int64_t end) {
  Soa<T> s(end - begin);
  for (int64_t k = begin; k < end; ++k) {
    const int64_t pos = positions[k];
    const scalar_t* b = boxes + order[pos] * 4;
    s.x1[k - begin] = T(b[0]), s.y1[k - begin] = T(b[1]), s.x2[k - begin] = T(b[2]), s.y2[k - begin] = T(b[3]);
    s.pos[k - begin] = pos;
  }
  return s;
}

// removed[j] |= IoU(a, box j) > thr for j in [begin, end); returns how many it newly removed.
template <typename T>
__attribute__((target_clones("avx2", "default"))) int64_t suppress(const Box<T> a, const T* __restrict__ x1,
                                                                   const T* __restrict__ y1, const T* __restrict__ x2,
                                                                   const T* __restrict__ y2, int64_t begin, int64_t end,
                                                                   T thr, int32_t* __restrict__ removed) {
  int64_t count = 0;
  for (int64_t j = begin; j < end; ++j) {
    const T iou = box::pair_value<T, box::kIoU, false>(a, Box<T>{x1[j], y1[j], x2[j], y2[j]}, T(0), T(0), T(0));
    const int32_t hit = iou > thr;
    count += hit & (removed[j] ^ 1);
    removed[j] |= hit;
  }
  return count;
}

// Greedy NMS of one group; sets keep[pos] for the kept boxes.
template <typename T>
void greedy_nms(Soa<T>& s, T thr, uint8_t* keep) {
  int64_t n = static_cast<int64_t>(s.pos.size());
  std::vector<int32_t> removed(n, 0);
  int64_t pending = 0;  // removed entries not yet compacted away
  for (int64_t i = 0; i < n; ++i) {
    if (removed[i]) continue;
    keep[s.pos[i]] = 1;
    pending += suppress<T>(s.box(i), s.x1.data(), s.y1.data(), s.x2.data(), s.y2.data(), i + 1, n, thr,
                           removed.data());
    if (pending > 256 && 4 * pending > n - i) {
      n = s.compact(i + 1, n, removed.data());
      pending = 0;
    }
  }
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores, const std::optional<at::Tensor>& idxs,
                   double iou_threshold) {
  nms::check_inputs("nms", boxes, scores, idxs, iou_threshold);
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  Groups g = group_by_category(scores, idxs);
  auto keep = at::zeros({n}, boxes.options().dtype(at::kByte));
  uint8_t* kp = keep.mutable_data_ptr<uint8_t>();
  auto b = boxes.contiguous();
  const int64_t* order = g.order.const_data_ptr<int64_t>();
  const int64_t groups = g.count();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "nms_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const T thr = nms::gt_threshold<T>(iou_threshold);
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    at::parallel_for(0, groups, g.grain(4), [&](int64_t lo, int64_t hi) {  // a pair: an IoU
      for (int64_t c = lo; c < hi; ++c) {
        Soa<T> s = gather<scalar_t, T>(pb, order, g.positions.data(), g.starts[c], g.starts[c + 1]);
        greedy_nms<T>(s, thr, kp);
      }
    });
  });
  return g.order.masked_select(keep.to(at::kBool));
}

constexpr int64_t kBlock = 64;

// One Soft-NMS pass over the remaining boxes: decay by the selected box `a` and drop
// those under the score threshold. Writes the highest remaining score of each block
// of kBlock entries to block_max and returns the highest overall.
template <typename T, int METHOD, bool TINY>
__attribute__((target_clones("avx2", "default"))) T decay_pass(const Box<T> a, const T* __restrict__ x1,
                                                               const T* __restrict__ y1, const T* __restrict__ x2,
                                                               const T* __restrict__ y2, T* __restrict__ s,
                                                               int32_t* __restrict__ drop, int64_t n, T thr,
                                                               T rsqrt_sig, T score_thr, T* __restrict__ block_max) {
  constexpr T none = -std::numeric_limits<T>::infinity();
  T best = none;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t end = std::min(n, b0 + kBlock);
    T bm = none;
    int32_t inf_times_zero = 0;
#pragma omp simd reduction(max : bm) reduction(| : inf_times_zero)
    for (int64_t j = b0; j < end; ++j) {
      const T iou = box::pair_value<T, box::kIoU, false>(a, Box<T>{x1[j], y1[j], x2[j], y2[j]}, T(0), T(0), T(0));
      // A plain product keeps this loop vectorised (a select on NaN does not); the scores
      // here are never NaN (those are selected first), so a NaN is an infinite score times 0.
      const T v = s[j] * nms::decay<T, TINY>(iou, METHOD, thr, rsqrt_sig);
      const int32_t gone = drop[j] | (v < score_thr);
      s[j] = v;
      drop[j] = gone;
      inf_times_zero |= v != v;
      const T cand = (gone || v != v) ? none : v;
      bm = cand > bm ? cand : bm;
    }
    if (inf_times_zero) {  // rare: redo those entries as nms::decay_score defines them
      for (int64_t j = b0; j < end; ++j) {
        if (s[j] == s[j]) continue;
        s[j] = T(0);
        drop[j] |= T(0) < score_thr;
        if (!drop[j]) bm = T(0) > bm ? T(0) : bm;
      }
    }
    block_max[b0 / kBlock] = bm;
    best = bm > best ? bm : best;
  }
  return best;
}

// Bit-interleaved (Morton) code of 16-bit quantised box centres: boxes close in the plane get
// close codes. Non-finite centres go last.
template <typename T>
std::vector<uint32_t> morton_codes(const Soa<T>& s, int64_t begin, int64_t end) {
  T lo_x = std::numeric_limits<T>::infinity(), lo_y = lo_x, hi_x = -lo_x, hi_y = -lo_x;
  std::vector<T> cx(end - begin), cy(end - begin);
  for (int64_t j = begin; j < end; ++j) {
    cx[j - begin] = (s.x1[j] + s.x2[j]) / 2, cy[j - begin] = (s.y1[j] + s.y2[j]) / 2;
    if (std::isfinite(cx[j - begin]) && std::isfinite(cy[j - begin])) {
      lo_x = std::min(lo_x, cx[j - begin]), hi_x = std::max(hi_x, cx[j - begin]);
      lo_y = std::min(lo_y, cy[j - begin]), hi_y = std::max(hi_y, cy[j - begin]);
    }
  }
  const double sx = hi_x > lo_x ? 65535.0 / (double(hi_x) - double(lo_x)) : 0.0;
  const double sy = hi_y > lo_y ? 65535.0 / (double(hi_y) - double(lo_y)) : 0.0;
  std::vector<uint32_t> code(end - begin);
  for (int64_t j = 0; j < end - begin; ++j) {
    if (!(std::isfinite(cx[j]) && std::isfinite(cy[j]))) {
      code[j] = 0xFFFFFFFFu;
      continue;
    }
    const auto qx = static_cast<uint32_t>((double(cx[j]) - double(lo_x)) * sx);
    const auto qy = static_cast<uint32_t>((double(cy[j]) - double(lo_y)) * sy);
    code[j] = nms::spread16(qx) | (nms::spread16(qy) << 1);
  }
  return code;
}

// Soft-NMS of one group (boxes already in score order, NaN scores first).
// Appends (position, score at selection) to `out` in selection order.
//
// A box that does not overlap the selected one keeps its score (its decay factor is exactly
// 1), so after the NaN-score entries the boxes are laid out in spatial (Morton) order in
// blocks of kBlock with their union box: a selection decays only the blocks its box
// overlaps, and picks the highest score (ties: lowest position) from the blocks' maxima.
// The hard method with a threshold <= 0 drops non-overlapping boxes too: it visits every
// block. The decay of each box is the same arithmetic in the same order as a full pass.
template <typename T, int METHOD, bool TINY = false>
void soft_nms_group(Soa<T>& s, std::vector<T>& score, T thr, T rsqrt_sig, T score_thr,
                    std::vector<std::pair<int64_t, T>>& out) {
  constexpr T none = -std::numeric_limits<T>::infinity();
  int64_t n = static_cast<int64_t>(s.pos.size());
  std::vector<int32_t> drop(n);
  for (int64_t j = 0; j < n; ++j) drop[j] = score[j] < score_thr;  // NaN scores stay
  n = s.compact(0, n, drop.data(), score.data());
  std::vector<T> block_max(n / kBlock + 1, none);
  // NaN scores rank first, in position order; each decays the others like any selected box.
  int64_t first_real = 0;
  while (first_real < n && std::isnan(score[first_real])) ++first_real;
  for (int64_t m = 0; m < first_real; ++m) {
    out.emplace_back(s.pos[m], score[m]);
    decay_pass<T, METHOD, TINY>(s.box(m), s.x1.data() + first_real, s.y1.data() + first_real,
                                s.x2.data() + first_real, s.y2.data() + first_real, score.data() + first_real,
                                drop.data() + first_real, n - first_real, thr, rsqrt_sig, score_thr, block_max.data());
  }
  for (int64_t m = 0; m < first_real; ++m) drop[m] = 1;
  n = s.compact(0, n, drop.data(), score.data());

  // Spatial layout of the remaining entries.
  {
    const std::vector<uint32_t> code = morton_codes(s, 0, n);
    std::vector<int64_t> perm(n);
    for (int64_t j = 0; j < n; ++j) perm[j] = j;
    std::stable_sort(perm.begin(), perm.end(), [&](int64_t i, int64_t j) { return code[i] < code[j]; });
    Soa<T> t(n);
    std::vector<T> ts(n);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t k = perm[j];
      t.x1[j] = s.x1[k], t.y1[j] = s.y1[k], t.x2[j] = s.x2[k], t.y2[j] = s.y2[k], t.pos[j] = s.pos[k];
      ts[j] = score[k];
    }
    s = std::move(t);
    score = std::move(ts);
  }
  const int64_t nb = (n + kBlock - 1) / kBlock;
  // Union box of each block (NaN coordinates left out: such a box's IoU is NaN, decay 1).
  std::vector<Box<T>> ub(nb, Box<T>{std::numeric_limits<T>::infinity(), std::numeric_limits<T>::infinity(),
                                    -std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity()});
  block_max.assign(nb, none);
  for (int64_t j = 0; j < n; ++j) {
    Box<T>& u = ub[j / kBlock];
    if (!std::isnan(s.x1[j]) && !std::isnan(s.x2[j])) u.x1 = std::min(u.x1, s.x1[j]), u.x2 = std::max(u.x2, s.x2[j]);
    if (!std::isnan(s.y1[j]) && !std::isnan(s.y2[j])) u.y1 = std::min(u.y1, s.y1[j]), u.y2 = std::max(u.y2, s.y2[j]);
    block_max[j / kBlock] = score[j] > block_max[j / kBlock] ? score[j] : block_max[j / kBlock];
  }
  const bool visit_all = METHOD == nms::kHard && !(thr > T(0));
  auto rescan = [&](int64_t b) {
    T bm = none;
    for (int64_t j = b * kBlock; j < std::min(n, (b + 1) * kBlock); ++j)
      if (!drop[j] && score[j] > bm) bm = score[j];
    block_max[b] = bm;
  };
  while (true) {
    T best = none;
    for (int64_t b = 0; b < nb; ++b) best = block_max[b] > best ? block_max[b] : best;
    if (!(best >= score_thr)) break;  // nothing eligible is left
    // The highest-ranked (lowest position) live entry holding the best score. `none` is also
    // a live score (-inf) when score_thr is -inf: then no entry found means none is left.
    int64_t m = -1;
    for (int64_t b = 0; b < nb; ++b) {
      if (block_max[b] != best) continue;
      for (int64_t j = b * kBlock; j < std::min(n, (b + 1) * kBlock); ++j)
        if (!drop[j] && score[j] == best && (m < 0 || s.pos[j] < s.pos[m])) m = j;
    }
    if (m < 0) break;
    out.emplace_back(s.pos[m], score[m]);
    drop[m] = 1;
    const Box<T> a = s.box(m);
    bool own_visited = false;
    for (int64_t b = 0; b < nb; ++b) {
      const Box<T>& u = ub[b];
      if (!visit_all && !nms::may_overlap(a, u)) continue;
      const int64_t b0 = b * kBlock, len = std::min(n, b0 + kBlock) - b0;
      decay_pass<T, METHOD, TINY>(a, s.x1.data() + b0, s.y1.data() + b0, s.x2.data() + b0, s.y2.data() + b0,
                                  score.data() + b0, drop.data() + b0, len, thr, rsqrt_sig, score_thr,
                                  block_max.data() + b);
      own_visited |= b == m / kBlock;
    }
    if (!own_visited) rescan(m / kBlock);  // the selected entry leaves its block's maximum
  }
}

std::tuple<at::Tensor, at::Tensor> soft_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                                                const std::optional<at::Tensor>& idxs, double iou_threshold,
                                                double sigma, double score_threshold, int64_t method) {
  nms::check_inputs("soft_nms", boxes, scores, idxs, iou_threshold);
  nms::check_soft_args(sigma, score_threshold, method);
  const int64_t n = boxes.size(0);
  if (n == 0) return {at::empty({0}, boxes.options().dtype(at::kLong)), at::empty({0}, scores.options())};
  Groups g = group_by_category(scores, idxs);
  auto b = boxes.contiguous();
  auto sc = scores.contiguous();
  const int64_t* order = g.order.const_data_ptr<int64_t>();
  const int64_t groups = g.count();
  at::Tensor keep, kept_scores;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "soft_nms_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const scalar_t* ps = sc.const_data_ptr<scalar_t>();
    const T thr = nms::ge_threshold<T>(iou_threshold);
    const T score_thr = nms::ge_threshold<T>(score_threshold);
    const T rsqrt_sig = nms::rsqrt_sig<T>(sigma);
    std::vector<std::vector<std::pair<int64_t, T>>> picked(groups);
    at::parallel_for(0, groups, g.grain(16), [&](int64_t lo, int64_t hi) {  // an IoU, an exp, passes
      for (int64_t c = lo; c < hi; ++c) {
        Soa<T> s = gather<scalar_t, T>(pb, order, g.positions.data(), g.starts[c], g.starts[c + 1]);
        std::vector<T> score(s.pos.size());
        for (size_t k = 0; k < score.size(); ++k) score[k] = T(ps[order[s.pos[k]]]);
        switch (method) {
          case nms::kGaussian:
            if (nms::needs_tiny(rsqrt_sig))
              soft_nms_group<T, nms::kGaussian, true>(s, score, thr, rsqrt_sig, score_thr, picked[c]);
            else
              soft_nms_group<T, nms::kGaussian>(s, score, thr, rsqrt_sig, score_thr, picked[c]);
            break;
          case nms::kLinear: soft_nms_group<T, nms::kLinear>(s, score, thr, rsqrt_sig, score_thr, picked[c]); break;
          default: soft_nms_group<T, nms::kHard>(s, score, thr, rsqrt_sig, score_thr, picked[c]); break;
        }
      }
    });
    int64_t total = 0;
    for (const auto& p : picked) total += static_cast<int64_t>(p.size());
    keep = at::empty({total}, boxes.options().dtype(at::kLong));
    kept_scores = at::empty({total}, scores.options().dtype(c10::CppTypeToScalarType<T>::value));
    int64_t* kp = keep.mutable_data_ptr<int64_t>();
    T* sp = kept_scores.mutable_data_ptr<T>();
    int64_t w = 0;
    for (const auto& p : picked) {
      for (const auto& [pos, v] : p) {
        kp[w] = order[pos];
        sp[w++] = v;
      }
    }
  });
  return nms::merge_groups(keep, kept_scores, idxs.has_value(), scores.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvision_ops, CPU, m) {
  m.impl("nms", &nms_cpu);
  m.impl("soft_nms", &soft_nms_cpu);
}

}  // namespace pyvision_ops

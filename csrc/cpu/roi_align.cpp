// RoI Align, CPU kernels, single- and multi-level (FPN) in one code path: a
// single-level call is one level. Separable sampling weights
// (csrc/common/roi_align.h) are computed once per RoI and shared by all channels.
// NCHW: one task per (level, image, channel) plane running that image's RoIs of
// that level, so the plane stays in cache (tasks ordered channel-major, so the
// threads' contiguous shares hold every level alike); the backward accumulates into the plane
// it owns, so it is deterministic without atomics. channels_last: inner loops
// run over contiguous channels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <string>
#include <vector>

#include "common/parallel.h"
#include "common/roi_align.h"
#include "common/text.h"

namespace pyvision_ops {
namespace {

struct Level {
  int64_t H, W;
  double scale;
};

// Per-RoI tables: for each bin row the input rows its samples read and their weights
// (already divided by the sample count), and the same for bin columns. Entry j of
// bin row p of RoI k is at y_off[k] + p * span_h[k] + j, j < ny[k * ph + p].
template <typename T>
struct Tables {
  int ph, pw;
  std::vector<int64_t> batch;         // [K], -1 for a RoI that pools to zeros
  std::vector<int64_t> level;         // [K]
  std::vector<int64_t> y_off, x_off;  // [K + 1]
  std::vector<int> span_h, span_w;    // [K]
  std::vector<int> ny, nx;            // [K * ph], [K * pw]
  std::vector<int> iy, ix;            // input row / column of each entry
  std::vector<T> wy, wx;
  // RoIs of each (level, image), in RoI order: the fixed accumulation order.
  std::vector<std::vector<int64_t>> groups;  // [levels * batch]

  // Cells read (or written) per channel over all bins: the work for grain_for.
  int64_t taps() const {
    int64_t total = 0;
    for (size_t k = 0; k < batch.size(); ++k) {
      int64_t rows = 0, cols = 0;
      for (int p = 0; p < ph; ++p) rows += ny[k * ph + p];
      for (int q = 0; q < pw; ++q) cols += nx[k * pw + q];
      total += rows * cols;
    }
    return total;
  }
};

// The cells bin p reads along one axis and their weights (roi::bin_cells, as on CUDA): at
// most `span` of them, the room the tables give each bin.
template <typename T>
void fill_axis(const roi::Geometry<T>& g, bool rows, int p, int size, int span, int& n, int* idx, T* w) {
  n = rows ? roi::bin_cells(g.start_h, g.bin_h, p, g.grid_h, size, span, idx, w)
           : roi::bin_cells(g.start_w, g.bin_w, p, g.grid_w, size, span, idx, w);
  TORCH_INTERNAL_ASSERT(n >= 0, "roi_align: a bin reads more cells than its span");
  if (rows) {
    for (int j = 0; j < n; ++j) w[j] *= g.inv_count;  // fold 1 / count into the rows
  }
}

// Every batch index but NaN must name an image once truncated toward zero, as in torchvision:
// (-1, batch_size), so -0.5 is image 0 when there is one. Checked in T, the type the tables
// cast from (a huge index would overflow the cast). NaN: the RoI pools to zeros (the
// multi-scale front marks a RoI without a level so).
// Returns the RoIs in T, contiguous: what make_tables reads.
template <typename T>
at::Tensor checked_rois(const char* op, const at::Tensor& rois, int64_t batch_size) {
  at::Tensor r = rois.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const T* pr = r.const_data_ptr<T>();
  for (int64_t k = 0; k < r.size(0); ++k) {
    const T b = pr[k * 5];
    TORCH_CHECK_VALUE(std::isnan(b) || (b > T(-1) && std::trunc(b) < static_cast<T>(batch_size)), op,
                      ": boxes: RoI ", std::to_string(k), " has batch index ", real_text(b), " outside (-1, ",
                      std::to_string(batch_size), ") (truncated toward zero, it must name one of the ",
                      std::to_string(batch_size), " images)");
  }
  return r;
}

template <typename T>
Tables<T> make_tables(const at::Tensor& rois, const int64_t* roi_level, const std::vector<Level>& levels,
                      int64_t batch_size, int ph, int pw, int sampling_ratio, bool aligned) {
  const int64_t K = rois.size(0), L = static_cast<int64_t>(levels.size());
  Tables<T> t;
  t.ph = ph;
  t.pw = pw;
  t.batch.assign(K, -1);
  t.level.assign(K, 0);
  t.span_h.assign(K, 0);
  t.span_w.assign(K, 0);
  t.y_off.assign(K + 1, 0);
  t.x_off.assign(K + 1, 0);
  t.ny.assign(K * ph, 0);
  t.nx.assign(K * pw, 0);
  t.groups.assign(L * batch_size, {});
  const T* pr = rois.const_data_ptr<T>();  // checked_rois
  std::vector<roi::Geometry<T>> geo(K);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t l = roi_level ? roi_level[k] : 0;
    TORCH_CHECK(l >= 0 && l < L, "multi_scale_roi_align: RoI ", std::to_string(k), " has level ", std::to_string(l),
                " outside [0, ", std::to_string(L), ")");
    const Level& lv = levels[l];
    t.level[k] = l;
    geo[k] = roi::geometry<T>(pr + k * 5, static_cast<T>(lv.scale), ph, pw, sampling_ratio, aligned);
    const T b = pr[k * 5];
    if (geo[k].valid && geo[k].inv_count > T(0) && std::isfinite(b) && lv.H > 0 && lv.W > 0) {
      const int64_t bi = static_cast<int64_t>(b);  // in range: checked_rois
      t.batch[k] = bi;
      t.span_h[k] = roi::axis_span(geo[k].bin_h, static_cast<int>(lv.H));
      t.span_w[k] = roi::axis_span(geo[k].bin_w, static_cast<int>(lv.W));
      t.groups[l * batch_size + bi].push_back(k);
    }
    t.y_off[k + 1] = t.y_off[k] + int64_t(ph) * t.span_h[k];
    t.x_off[k + 1] = t.x_off[k] + int64_t(pw) * t.span_w[k];
  }
  t.wy.assign(t.y_off[K], T(0));
  t.wx.assign(t.x_off[K], T(0));
  t.iy.assign(t.y_off[K], 0);
  t.ix.assign(t.x_off[K], 0);
  at::parallel_for(0, K, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      if (t.batch[k] < 0) continue;
      const Level& lv = levels[t.level[k]];
      for (int p = 0; p < ph; ++p) {
        const int64_t o = t.y_off[k] + int64_t(p) * t.span_h[k];
        fill_axis(geo[k], true, p, static_cast<int>(lv.H), t.span_h[k], t.ny[k * ph + p], t.iy.data() + o,
                  t.wy.data() + o);
      }
      for (int p = 0; p < pw; ++p) {
        const int64_t o = t.x_off[k] + int64_t(p) * t.span_w[k];
        fill_axis(geo[k], false, p, static_cast<int>(lv.W), t.span_w[k], t.nx[k * pw + p], t.ix.data() + o,
                  t.wx.data() + o);
      }
    }
  });
  return t;
}

// Calls f(ny, iy, wy, nx, ix, wx) for bin (y, x) of RoI k.
template <typename T, typename F>
inline void with_bin(const Tables<T>& t, int64_t k, int y, int x, F&& f) {
  const int64_t oy = t.y_off[k] + int64_t(y) * t.span_h[k], ox = t.x_off[k] + int64_t(x) * t.span_w[k];
  f(t.ny[k * t.ph + y], t.iy.data() + oy, t.wy.data() + oy, t.nx[k * t.pw + x], t.ix.data() + ox,
    t.wx.data() + ox);
}

// sum_q w[q] * row[ix[q] - off]; bins read at most 2 * sampling_ratio cells per axis, so
// the common short lengths are unrolled.
template <typename scalar_t, typename T>
inline T dot_row(const scalar_t* row, const int* ix, const T* w, int n, int off = 0) {
  switch (n) {
    case 2: return w[0] * T(row[ix[0] - off]) + w[1] * T(row[ix[1] - off]);
    case 3: return w[0] * T(row[ix[0] - off]) + w[1] * T(row[ix[1] - off]) + w[2] * T(row[ix[2] - off]);
    case 4:
      return (w[0] * T(row[ix[0] - off]) + w[1] * T(row[ix[1] - off])) +
             (w[2] * T(row[ix[2] - off]) + w[3] * T(row[ix[3] - off]));
    default: {
      T acc = 0;
      for (int q = 0; q < n; ++q) acc += w[q] * T(row[ix[q] - off]);
      return acc;
    }
  }
}

// The input columns a RoI's bins read, [lo, lo + n); dense when the bins read most of them,
// so that blending whole rows first costs less than reading every bin's cells.
struct Span {
  int lo, n;
  bool dense;
};

template <typename T>
Span column_span(const Tables<T>& t, int64_t k) {
  int lo = INT_MAX, hi = -1, cells = 0;
  for (int x = 0; x < t.pw; ++x) {
    const int n = t.nx[k * t.pw + x];
    if (n == 0) continue;
    const int* ix = t.ix.data() + t.x_off[k] + int64_t(x) * t.span_w[k];
    lo = std::min(lo, ix[0]);  // a bin's cells are in increasing order
    hi = std::max(hi, ix[n - 1]);
    cells += n;
  }
  if (hi < lo) return {0, 0, false};
  return {lo, hi - lo + 1, hi - lo + 1 <= 2 * cells};
}

// When every bin of RoI k reads 1 to 4 columns: their offsets from lo, padded to 4 per bin
// with the bin's first column, in idx [pw * 4], and the counts in cnt [pw]; else false.
template <typename T>
bool pad_columns(const Tables<T>& t, int64_t k, int lo, std::vector<int>& idx, std::vector<T>& w,
                 std::vector<int>& cnt) {
  for (int x = 0; x < t.pw; ++x) {
    const int n = t.nx[k * t.pw + x];
    if (n < 1 || n > 4) return false;
  }
  for (int x = 0; x < t.pw; ++x) {
    const int n = t.nx[k * t.pw + x];
    const int64_t ox = t.x_off[k] + int64_t(x) * t.span_w[k];
    cnt[x] = n;
    for (int q = 0; q < 4; ++q) {
      idx[4 * x + q] = t.ix[ox + (q < n ? q : 0)] - lo;
      w[4 * x + q] = q < n ? t.wx[ox + q] : T(0);
    }
  }
  return true;
}

// sum over q < n of w[q] * b[i[q]] for n in 1..4 without branches: the padded terms are
// selected away, not multiplied by 0 (0 * inf is NaN).
template <typename T>
inline T dot4(const T* b, const int* i, const T* w, int n) {
  const T t1 = n > 1 ? w[1] * b[i[1]] : T(0), t2 = n > 2 ? w[2] * b[i[2]] : T(0);
  const T t3 = n > 3 ? w[3] * b[i[3]] : T(0);
  return (w[0] * b[i[0]] + t1) + (t2 + t3);
}

// out[j] = sum_r w[r] * plane[iy[r], lo + j], j < n.
template <typename scalar_t, typename T>
inline void blend_rows(const scalar_t* plane, int64_t W, int ny, const int* iy, const T* w, int lo, int n,
                       T* __restrict__ out) {
  if (ny == 0) {
    std::fill(out, out + n, T(0));
    return;
  }
  const scalar_t* __restrict__ src = plane + int64_t(iy[0]) * W + lo;
  for (int j = 0; j < n; ++j) out[j] = w[0] * T(src[j]);
  for (int r = 1; r < ny; ++r) {
    const scalar_t* __restrict__ row = plane + int64_t(iy[r]) * W + lo;
    const T wr = w[r];
    for (int j = 0; j < n; ++j) out[j] += wr * T(row[j]);
  }
}

bool is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

at::Tensor zeros_like_format(at::IntArrayRef size, const at::TensorOptions& opts, bool channels_last) {
  // at::zeros drops the memory format: allocate with it, then zero.
  auto out = at::empty(size, opts.memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                              : at::MemoryFormat::Contiguous));
  out.zero_();
  return out;
}

// Pools every RoI from its level's features; all features share dtype, layout, N and C.
template <typename scalar_t>
void forward_impl(const std::vector<at::Tensor>& feats, const std::vector<Level>& levels,
                  const Tables<at::opmath_type<scalar_t>>& t, int64_t B, int64_t C, bool cl, at::Tensor& out) {
  using T = at::opmath_type<scalar_t>;
  const int64_t K = static_cast<int64_t>(t.batch.size()), L = static_cast<int64_t>(levels.size());
  const int ph = t.ph, pw = t.pw;
  scalar_t* po = out.mutable_data_ptr<scalar_t>();
  const int64_t work = C * t.taps() + out.numel();
  if (!cl) {
    int64_t widest = 0;
    for (int64_t k = 0; k < K; ++k) widest = std::max<int64_t>(widest, column_span(t, k).n);
    at::parallel_for(0, L * B * C, grain_for(L * B * C, work), [&](int64_t lo, int64_t hi) {
      std::vector<T> blended(std::max<int64_t>(widest, 1)), cw(4 * pw);
      std::vector<int> cidx(4 * pw), cnt(pw);
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t c = task / (L * B), lb = task % (L * B), l = lb / B, b = lb % B;
        const int64_t W = levels[l].W;
        const scalar_t* plane = feats[l].template const_data_ptr<scalar_t>() + (b * C + c) * levels[l].H * W;
        for (int64_t k : t.groups[lb]) {
          scalar_t* o = po + (k * C + c) * ph * pw;
          const Span sp = column_span(t, k);
          if (sp.dense) {
            // Separable: each bin row's input rows are first blended over the RoI's columns
            // (a contiguous, vectorised loop), then each bin reads its own few columns (at
            // most 4: branch-free; never a column it does not read, whose inf or NaN would
            // leak in through a zero weight).
            const bool four = pad_columns(t, k, sp.lo, cidx, cw, cnt);
            for (int y = 0; y < ph; ++y) {
              const int64_t oy = t.y_off[k] + int64_t(y) * t.span_h[k];
              const T* b = blended.data();
              blend_rows(plane, W, t.ny[k * ph + y], t.iy.data() + oy, t.wy.data() + oy, sp.lo, sp.n, blended.data());
              for (int x = 0; x < pw; ++x) {
                const int64_t ox = t.x_off[k] + int64_t(x) * t.span_w[k];
                const T v = four ? dot4(b, cidx.data() + 4 * x, cw.data() + 4 * x, cnt[x])
                                 : dot_row(b, t.ix.data() + ox, t.wx.data() + ox, t.nx[k * pw + x], sp.lo);
                o[y * pw + x] = static_cast<scalar_t>(v);
              }
            }
            continue;
          }
          for (int y = 0; y < ph; ++y) {
            for (int x = 0; x < pw; ++x) {
              with_bin(t, k, y, x, [&](int ny, const int* iy, const T* wy, int nx, const int* ix, const T* wx) {
                T acc = 0;
                for (int r = 0; r < ny; ++r) acc += wy[r] * dot_row(plane + int64_t(iy[r]) * W, ix, wx, nx);
                o[y * pw + x] = static_cast<scalar_t>(acc);
              });
            }
          }
        }
      }
    });
    return;
  }
  // NHWC: one (RoI, bin) per task, inner loops over contiguous channels; output [K, PH, PW, C].
  at::parallel_for(0, K * ph * pw, std::max<int64_t>(4, grain_for(K * ph * pw, work)), [&](int64_t lo, int64_t hi) {
    std::vector<T> acc(C);
    for (int64_t kb = lo; kb < hi; ++kb) {
      const int64_t k = kb / (ph * pw);
      if (t.batch[k] < 0) continue;
      const Level& lv = levels[t.level[k]];
      const scalar_t* img = feats[t.level[k]].template const_data_ptr<scalar_t>() + t.batch[k] * lv.H * lv.W * C;
      std::fill(acc.begin(), acc.end(), T(0));
      with_bin(t, k, static_cast<int>((kb / pw) % ph), static_cast<int>(kb % pw),
               [&](int ny, const int* iy, const T* wy, int nx, const int* ix, const T* wx) {
                 for (int r = 0; r < ny; ++r) {
                   for (int q = 0; q < nx; ++q) {
                     const T w = wy[r] * wx[q];
                     const scalar_t* px = img + (int64_t(iy[r]) * lv.W + ix[q]) * C;
                     for (int64_t c = 0; c < C; ++c) acc[c] += w * T(px[c]);
                   }
                 }
               });
      scalar_t* o = po + kb * C;
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

// Gradient w.r.t. every level's features; grads[l] has the layout the caller chose.
template <typename scalar_t>
void backward_impl(const at::Tensor& grad, const std::vector<Level>& levels, const Tables<at::opmath_type<scalar_t>>& t,
                   int64_t B, int64_t C, bool cl, std::vector<at::Tensor>& grads) {
  using T = at::opmath_type<scalar_t>;
  const int64_t L = static_cast<int64_t>(levels.size());
  const int ph = t.ph, pw = t.pw;
  const scalar_t* pg = grad.const_data_ptr<scalar_t>();
  int64_t work = C * t.taps();
  for (const auto& gl : grads) work += gl.numel();
  if (!cl) {
    at::parallel_for(0, L * B * C, grain_for(L * B * C, work), [&](int64_t lo, int64_t hi) {
      std::vector<T> plane;
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t c = task / (L * B), lb = task % (L * B), l = lb / B, b = lb % B;
        if (t.groups[lb].empty()) continue;
        const int64_t H = levels[l].H, W = levels[l].W;
        plane.assign(H * W, T(0));
        for (int64_t k : t.groups[lb]) {
          const scalar_t* go = pg + (k * C + c) * ph * pw;
          for (int y = 0; y < ph; ++y) {
            for (int x = 0; x < pw; ++x) {
              const T gv = T(go[y * pw + x]);
              with_bin(t, k, y, x, [&](int ny, const int* iy, const T* wy, int nx, const int* ix, const T* wx) {
                for (int r = 0; r < ny; ++r) {
                  T* row = plane.data() + int64_t(iy[r]) * W;
                  const T gr = gv * wy[r];
                  for (int q = 0; q < nx; ++q) row[ix[q]] += gr * wx[q];
                }
              });
            }
          }
        }
        scalar_t* dst = grads[l].template mutable_data_ptr<scalar_t>() + (b * C + c) * H * W;
        for (int64_t i = 0; i < H * W; ++i) dst[i] = static_cast<scalar_t>(plane[i]);
      }
    });
    return;
  }
  // NHWC: each task owns one (level, image) and a block of channels.
  constexpr int64_t kCBlock = 64;
  const int64_t cblocks = (C + kCBlock - 1) / kCBlock;
  at::parallel_for(0, L * B * cblocks, grain_for(L * B * cblocks, work), [&](int64_t lo, int64_t hi) {
    std::vector<T> acc;
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t lb = task % (L * B), l = lb / B, b = lb % B;
      const int64_t c0 = (task / (L * B)) * kCBlock, c1 = std::min(C, c0 + kCBlock), nc = c1 - c0;
      if (t.groups[lb].empty()) continue;
      const int64_t H = levels[l].H, W = levels[l].W;
      acc.assign(H * W * nc, T(0));
      for (int64_t k : t.groups[lb]) {
        for (int y = 0; y < ph; ++y) {
          for (int x = 0; x < pw; ++x) {
            const scalar_t* go = pg + ((k * ph + y) * pw + x) * C + c0;  // channels_last grad
            with_bin(t, k, y, x, [&](int ny, const int* iy, const T* wy, int nx, const int* ix, const T* wx) {
              for (int r = 0; r < ny; ++r) {
                for (int q = 0; q < nx; ++q) {
                  const T w = wy[r] * wx[q];
                  T* a = acc.data() + (int64_t(iy[r]) * W + ix[q]) * nc;
                  for (int64_t c = 0; c < nc; ++c) a[c] += w * T(go[c]);
                }
              }
            });
          }
        }
      }
      scalar_t* dst = grads[l].template mutable_data_ptr<scalar_t>() + b * H * W * C;
      for (int64_t p = 0; p < H * W; ++p)
        for (int64_t c = 0; c < nc; ++c) dst[p * C + c0 + c] = static_cast<scalar_t>(acc[p * nc + c]);
    }
  });
}

// Shared by both forward ops: features[l] is [N, C, H_l, W_l].
at::Tensor pool(const std::vector<at::Tensor>& features, const at::Tensor& rois, const at::Tensor* roi_levels,
                const std::vector<double>& scales, int64_t ph, int64_t pw, int64_t sampling_ratio, bool aligned) {
  const at::Tensor& x0 = features[0];
  const int64_t K = rois.size(0), B = x0.size(0), C = x0.size(1);
  const bool cl = is_channels_last(x0);
  std::vector<at::Tensor> feats;
  std::vector<Level> levels;
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    TORCH_CHECK(f.dim() == 4 && f.size(0) == B && f.size(1) == C, "roi_align: every feature map must be [N, C, H, W]"
                " with the N and C of the first");
    TORCH_CHECK(f.scalar_type() == x0.scalar_type(), "roi_align: feature maps must share one dtype");
    roi::check_size("roi_align", f.size(2), f.size(3));
    feats.push_back(cl ? f.contiguous(at::MemoryFormat::ChannelsLast) : f.contiguous());
    levels.push_back({f.size(2), f.size(3), scales[l]});
  }
  auto out = zeros_like_format({K, C, ph, pw}, x0.options(), cl);
  if (K == 0) return out;
  at::Tensor lv = roi_levels ? roi_levels->to(at::kLong).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "roi_align_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor r = checked_rois<T>(roi_levels ? "multi_scale_roi_align" : "roi_align", rois, B);
    if (C == 0) return;
    const auto t = make_tables<T>(r, roi_levels ? lv.const_data_ptr<int64_t>() : nullptr, levels, B,
                                  static_cast<int>(ph), static_cast<int>(pw), static_cast<int>(sampling_ratio),
                                  aligned);
    forward_impl<scalar_t>(feats, levels, t, B, C, cl, out);
  });
  return out;
}

std::vector<at::Tensor> unpool(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor* roi_levels,
                               const std::vector<double>& scales, const std::vector<std::array<int64_t, 2>>& hw,
                               int64_t B, int64_t C, int64_t ph, int64_t pw, int64_t sampling_ratio, bool aligned) {
  const int64_t K = rois.size(0);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == K && grad.size(1) == C && grad.size(2) == ph && grad.size(3) == pw,
              "roi_align_backward: grad must be [K, C, pooled_height, pooled_width]");
  const bool cl = is_channels_last(grad);
  const at::Tensor g = cl ? grad : grad.contiguous();
  std::vector<at::Tensor> grads;
  std::vector<Level> levels;
  for (size_t l = 0; l < hw.size(); ++l) {
    roi::check_size("roi_align_backward", hw[l][0], hw[l][1]);
    grads.push_back(zeros_like_format({B, C, hw[l][0], hw[l][1]}, grad.options(), cl));
    levels.push_back({hw[l][0], hw[l][1], scales[l]});
  }
  if (K == 0) return grads;
  at::Tensor lv = roi_levels ? roi_levels->to(at::kLong).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "roi_align_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const char* op = roi_levels ? "multi_scale_roi_align_backward" : "roi_align_backward";
    const at::Tensor r = checked_rois<T>(op, rois, B);
    if (C == 0 || B == 0) return;
    const auto t = make_tables<T>(r, roi_levels ? lv.const_data_ptr<int64_t>() : nullptr, levels, B,
                                  static_cast<int>(ph), static_cast<int>(pw), static_cast<int>(sampling_ratio),
                                  aligned);
    backward_impl<scalar_t>(g, levels, t, B, C, cl, grads);
  });
  return grads;
}

at::Tensor roi_align_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t pooled_height,
                         int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(input.dim() == 4, "roi_align: input must be [N, C, H, W]");
  roi::check_rois("roi_align", rois, pooled_height, pooled_width, sampling_ratio);
  return pool({input}, rois, nullptr, {spatial_scale}, pooled_height, pooled_width, sampling_ratio, aligned);
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio, bool aligned) {
  roi::check_rois("roi_align_backward", rois, pooled_height, pooled_width, sampling_ratio);
  return unpool(grad, rois, nullptr, {spatial_scale}, {{height, width}}, batch_size, channels, pooled_height,
                pooled_width, sampling_ratio, aligned)[0];
}

at::Tensor multi_scale_roi_align_cpu(at::TensorList features, const at::Tensor& rois, const at::Tensor& levels,
                                     at::ArrayRef<double> spatial_scales, int64_t pooled_height, int64_t pooled_width,
                                     int64_t sampling_ratio, bool aligned) {
  roi::check_rois("multi_scale_roi_align", rois, pooled_height, pooled_width, sampling_ratio);
  roi::check_levels("multi_scale_roi_align", rois, levels, features.size(), spatial_scales.size());
  return pool(features.vec(), rois, &levels, spatial_scales.vec(), pooled_height, pooled_width, sampling_ratio,
              aligned);
}

std::vector<at::Tensor> multi_scale_roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                                           const at::Tensor& levels,
                                                           at::ArrayRef<double> spatial_scales,
                                                           at::IntArrayRef heights, at::IntArrayRef widths,
                                                           int64_t batch_size, int64_t channels, int64_t pooled_height,
                                                           int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  roi::check_rois("multi_scale_roi_align_backward", rois, pooled_height, pooled_width, sampling_ratio);
  roi::check_levels("multi_scale_roi_align_backward", rois, levels, heights.size(), spatial_scales.size());
  TORCH_CHECK(widths.size() == heights.size(), "multi_scale_roi_align_backward: heights and widths differ in length");
  std::vector<std::array<int64_t, 2>> hw;
  for (size_t l = 0; l < heights.size(); ++l) hw.push_back({heights[l], widths[l]});
  return unpool(grad, rois, &levels, spatial_scales.vec(), hw, batch_size, channels, pooled_height, pooled_width,
                sampling_ratio, aligned);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvision_ops, CPU, m) {
  m.impl("roi_align", &roi_align_cpu);
  m.impl("roi_align_backward", &roi_align_backward_cpu);
  m.impl("multi_scale_roi_align", &multi_scale_roi_align_cpu);
  m.impl("multi_scale_roi_align_backward", &multi_scale_roi_align_backward_cpu);
}

}  // namespace pyvision_ops

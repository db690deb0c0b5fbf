// RoI Align, CPU kernels. Separable sampling weights (csrc/common/roi_align.h) are
// computed once per RoI and shared by all channels. Forward is parallel over
// (RoI, channel); backward is parallel over (image, channel) so each thread owns a
// disjoint slice of the input gradient: deterministic, no atomics. channels_last
// inputs take a path whose inner loops run over contiguous channels.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/roi_align.h"

namespace pyvision_ops {
namespace {

// Per-RoI tables: for each bin row the input rows its samples read and their weights
// (already divided by the sample count), and the same for bin columns. Entry j of
// bin row p of RoI k is at y_off[k] + p * span_h[k] + j, j < ny[k * ph + p].
template <typename T>
struct Tables {
  int ph, pw;
  std::vector<int64_t> batch;         // [K], -1 for a RoI that pools to zeros
  std::vector<int64_t> y_off, x_off;  // [K + 1]
  std::vector<int> span_h, span_w;    // [K]
  std::vector<int> ny, nx;            // [K * ph], [K * pw]
  std::vector<int> iy, ix;            // input row / column of each entry
  std::vector<T> wy, wx;
};

// bin_weights, then keep only the cells a sample reads.
template <typename T>
void fill_axis(const roi::Geometry<T>& g, bool rows, int p, int size, int span, int& n, int* idx, T* w) {
  int first = 0, m = 0;
  std::vector<T> tmp(span);
  std::vector<unsigned char> touched(span);
  if (rows) {
    roi::bin_weights(g.start_h, g.bin_h, p, g.grid_h, size, span, first, m, tmp.data(), touched.data());
  } else {
    roi::bin_weights(g.start_w, g.bin_w, p, g.grid_w, size, span, first, m, tmp.data(), touched.data());
  }
  n = 0;
  for (int j = 0; j < m; ++j) {
    if (!touched[j]) continue;
    idx[n] = first + j;
    w[n++] = rows ? tmp[j] * g.inv_count : tmp[j];  // fold 1 / count into the rows
  }
}

template <typename T>
Tables<T> make_tables(const at::Tensor& rois, int64_t batch_size, int64_t height, int64_t width, double scale, int ph,
                      int pw, int sampling_ratio, bool aligned) {
  const int64_t K = rois.size(0);
  Tables<T> t;
  t.ph = ph;
  t.pw = pw;
  t.batch.assign(K, -1);
  t.span_h.assign(K, 0);
  t.span_w.assign(K, 0);
  t.y_off.assign(K + 1, 0);
  t.x_off.assign(K + 1, 0);
  t.ny.assign(K * ph, 0);
  t.nx.assign(K * pw, 0);
  const at::Tensor r = rois.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const T* pr = r.const_data_ptr<T>();
  std::vector<roi::Geometry<T>> geo(K);
  for (int64_t k = 0; k < K; ++k) {
    geo[k] = roi::geometry<T>(pr + k * 5, static_cast<T>(scale), ph, pw, sampling_ratio, aligned);
    const T b = pr[k * 5];
    if (geo[k].valid && geo[k].inv_count > T(0) && std::isfinite(b)) {
      const int64_t bi = static_cast<int64_t>(b);
      TORCH_CHECK(bi >= 0 && bi < batch_size, "roi_align: RoI ", std::to_string(k), " has batch index ",
                  std::to_string(bi), " outside [0, ", std::to_string(batch_size), ")");
      t.batch[k] = bi;
      t.span_h[k] = roi::axis_span(geo[k].bin_h, static_cast<int>(height));
      t.span_w[k] = roi::axis_span(geo[k].bin_w, static_cast<int>(width));
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
      for (int p = 0; p < ph; ++p) {
        const int64_t o = t.y_off[k] + int64_t(p) * t.span_h[k];
        fill_axis(geo[k], true, p, static_cast<int>(height), t.span_h[k], t.ny[k * ph + p], t.iy.data() + o,
                  t.wy.data() + o);
      }
      for (int p = 0; p < pw; ++p) {
        const int64_t o = t.x_off[k] + int64_t(p) * t.span_w[k];
        fill_axis(geo[k], false, p, static_cast<int>(width), t.span_w[k], t.nx[k * pw + p], t.ix.data() + o,
                  t.wx.data() + o);
      }
    }
  });
  return t;
}

// The RoIs of each image, in RoI order (RoIs that pool to zeros left out).
template <typename T>
std::vector<std::vector<int64_t>> rois_per_image(const Tables<T>& t, int64_t batch_size) {
  std::vector<std::vector<int64_t>> per_image(batch_size);
  for (int64_t k = 0; k < static_cast<int64_t>(t.batch.size()); ++k)
    if (t.batch[k] >= 0) per_image[t.batch[k]].push_back(k);
  return per_image;
}

void check_args(const char* op, const at::Tensor& rois, int64_t ph, int64_t pw) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be [K, 5]");
  TORCH_CHECK(at::isFloatingType(rois.scalar_type()), op, ": rois must be floating point");
  TORCH_CHECK(ph > 0 && pw > 0, op, ": output size must be positive");
}

at::Tensor roi_align_cpu(const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t pooled_height,
                         int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(input.dim() == 4, "roi_align: input must be [N, C, H, W]");
  check_args("roi_align", rois, pooled_height, pooled_width);
  const int64_t K = rois.size(0), B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int ph = static_cast<int>(pooled_height), pw = static_cast<int>(pooled_width);
  const bool cl = input.is_contiguous(at::MemoryFormat::ChannelsLast) && !input.is_contiguous();
  // at::zeros drops the memory format: allocate with it, then zero.
  auto out = at::empty({K, C, ph, pw}, input.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                                         : at::MemoryFormat::Contiguous));
  out.zero_();
  if (K == 0 || C == 0 || H == 0 || W == 0) return out;
  const at::Tensor in = cl ? input : input.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "roi_align_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const Tables<T> t = make_tables<T>(rois, B, H, W, spatial_scale, ph, pw, static_cast<int>(sampling_ratio), aligned);
    const scalar_t* pin = in.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    if (!cl) {
      // One (image, channel) plane per task, all of that image's RoIs: the plane stays in cache.
      const auto per_image = rois_per_image(t, B);
      at::parallel_for(0, B * C, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t bc = lo; bc < hi; ++bc) {
          const int64_t b = bc / C, c = bc % C;
          const scalar_t* plane = pin + bc * H * W;
          for (int64_t k : per_image[b]) {
            scalar_t* o = po + (k * C + c) * ph * pw;
            for (int y = 0; y < ph; ++y) {
              const int ny = t.ny[k * ph + y];
              const int64_t oy = t.y_off[k] + int64_t(y) * t.span_h[k];
              const int* iy = t.iy.data() + oy;
              const T* wy = t.wy.data() + oy;
              for (int x = 0; x < pw; ++x) {
                const int nx = t.nx[k * pw + x];
                const int64_t ox = t.x_off[k] + int64_t(x) * t.span_w[k];
                const int* ix = t.ix.data() + ox;
                const T* wx = t.wx.data() + ox;
                T acc = 0;
                for (int r = 0; r < ny; ++r) {
                  const scalar_t* row = plane + int64_t(iy[r]) * W;
                  T racc = 0;
                  for (int q = 0; q < nx; ++q) racc += wx[q] * T(row[ix[q]]);
                  acc += wy[r] * racc;
                }
                o[y * pw + x] = static_cast<scalar_t>(acc);
              }
            }
          }
        }
      });
    } else {
      // NHWC: one (RoI, bin) per task, inner loops over contiguous channels.
      at::parallel_for(0, K * ph * pw, 4, [&](int64_t lo, int64_t hi) {
        std::vector<T> acc(C);
        for (int64_t kb = lo; kb < hi; ++kb) {
          const int64_t k = kb / (ph * pw);
          const int y = static_cast<int>((kb / pw) % ph), x = static_cast<int>(kb % pw);
          if (t.batch[k] < 0) continue;
          std::fill(acc.begin(), acc.end(), T(0));
          const int ny = t.ny[k * ph + y], nx = t.nx[k * pw + x];
          const int64_t oy = t.y_off[k] + int64_t(y) * t.span_h[k], ox = t.x_off[k] + int64_t(x) * t.span_w[k];
          const int *iy = t.iy.data() + oy, *ix = t.ix.data() + ox;
          const T *wy = t.wy.data() + oy, *wx = t.wx.data() + ox;
          for (int r = 0; r < ny; ++r) {
            for (int q = 0; q < nx; ++q) {
              const T w = wy[r] * wx[q];
              const scalar_t* px = pin + ((t.batch[k] * H + iy[r]) * W + ix[q]) * C;
              for (int64_t c = 0; c < C; ++c) acc[c] += w * T(px[c]);
            }
          }
          scalar_t* o = po + kb * C;  // channels_last [K, PH, PW, C]
          for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c]);
        }
      });
    }
  });
  return out;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                  int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio, bool aligned) {
  check_args("roi_align_backward", rois, pooled_height, pooled_width);
  const int64_t K = rois.size(0), B = batch_size, C = channels, H = height, W = width;
  const int ph = static_cast<int>(pooled_height), pw = static_cast<int>(pooled_width);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == K && grad.size(1) == C && grad.size(2) == ph && grad.size(3) == pw,
              "roi_align_backward: grad must be [K, C, pooled_height, pooled_width]");
  const bool cl = grad.is_contiguous(at::MemoryFormat::ChannelsLast) && !grad.is_contiguous();
  auto gin = at::empty({B, C, H, W}, grad.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                                     : at::MemoryFormat::Contiguous));
  gin.zero_();
  if (K == 0 || C == 0 || H == 0 || W == 0 || B == 0) return gin;
  const at::Tensor g = cl ? grad : grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "roi_align_backward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const Tables<T> t = make_tables<T>(rois, B, H, W, spatial_scale, ph, pw, static_cast<int>(sampling_ratio), aligned);
    // RoIs of each image, in order: the fixed accumulation order that makes this deterministic.
    const auto per_image = rois_per_image(t, B);
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    scalar_t* pi = gin.mutable_data_ptr<scalar_t>();
    if (!cl) {
      at::parallel_for(0, B * C, 1, [&](int64_t lo, int64_t hi) {
        std::vector<T> plane(H * W);
        for (int64_t bc = lo; bc < hi; ++bc) {
          const int64_t b = bc / C, c = bc % C;
          if (per_image[b].empty()) continue;
          std::fill(plane.begin(), plane.end(), T(0));
          for (int64_t k : per_image[b]) {
            const scalar_t* go = pg + (k * C + c) * ph * pw;
            for (int y = 0; y < ph; ++y) {
              const int ny = t.ny[k * ph + y];
              const int64_t oy = t.y_off[k] + int64_t(y) * t.span_h[k];
              const int* iy = t.iy.data() + oy;
              const T* wy = t.wy.data() + oy;
              for (int x = 0; x < pw; ++x) {
                const T gv = T(go[y * pw + x]);
                const int nx = t.nx[k * pw + x];
                const int64_t ox = t.x_off[k] + int64_t(x) * t.span_w[k];
                const int* ix = t.ix.data() + ox;
                const T* wx = t.wx.data() + ox;
                for (int r = 0; r < ny; ++r) {
                  T* row = plane.data() + int64_t(iy[r]) * W;
                  const T gr = gv * wy[r];
                  for (int q = 0; q < nx; ++q) row[ix[q]] += gr * wx[q];
                }
              }
            }
          }
          scalar_t* dst = pi + bc * H * W;
          for (int64_t i = 0; i < H * W; ++i) dst[i] = static_cast<scalar_t>(plane[i]);
        }
      });
    } else {
      // NHWC: each task owns one image and a block of channels.
      constexpr int64_t kCBlock = 64;
      const int64_t cblocks = (C + kCBlock - 1) / kCBlock;
      at::parallel_for(0, B * cblocks, 1, [&](int64_t lo, int64_t hi) {
        std::vector<T> acc;
        for (int64_t task = lo; task < hi; ++task) {
          const int64_t b = task / cblocks, c0 = (task % cblocks) * kCBlock, c1 = std::min(C, c0 + kCBlock);
          const int64_t nc = c1 - c0;
          if (per_image[b].empty()) continue;
          acc.assign(H * W * nc, T(0));
          for (int64_t k : per_image[b]) {
            for (int y = 0; y < ph; ++y) {
              const int ny = t.ny[k * ph + y];
              const int64_t oy = t.y_off[k] + int64_t(y) * t.span_h[k];
              const int* iy = t.iy.data() + oy;
              const T* wy = t.wy.data() + oy;
              for (int x = 0; x < pw; ++x) {
                const scalar_t* go = pg + ((k * ph + y) * pw + x) * C + c0;  // channels_last grad
                const int nx = t.nx[k * pw + x];
                const int64_t ox = t.x_off[k] + int64_t(x) * t.span_w[k];
                const int* ix = t.ix.data() + ox;
                const T* wx = t.wx.data() + ox;
                for (int r = 0; r < ny; ++r) {
                  for (int q = 0; q < nx; ++q) {
                    const T w = wy[r] * wx[q];
                    T* a = acc.data() + (int64_t(iy[r]) * W + ix[q]) * nc;
                    for (int64_t c = 0; c < nc; ++c) a[c] += w * T(go[c]);
                  }
                }
              }
            }
          }
          for (int64_t p = 0; p < H * W; ++p)
            for (int64_t c = 0; c < nc; ++c) pi[(b * H * W + p) * C + c0 + c] = static_cast<scalar_t>(acc[p * nc + c]);
        }
      });
    }
  });
  return gin;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvision_ops, CPU, m) {
  m.impl("roi_align", &roi_align_cpu);
  m.impl("roi_align_backward", &roi_align_backward_cpu);
}

}  // namespace pyvision_ops

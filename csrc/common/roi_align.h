// RoI Align: the sampling math shared by the CPU and CUDA kernels.
//
// The rule is torchvision's: a RoI (batch, x1, y1, x2, y2) is scaled by
// spatial_scale (and shifted by -0.5 when aligned); without `aligned` its size is
// clamped to >= 1; each of the PH x PW bins averages grid_h x grid_w bilinear
// samples (grid = sampling_ratio, or ceil(roi size / bins) when it is <= 0).
// A sample with y < -1, y > H, x < -1 or x > W contributes 0; coordinates <= 0
// are clamped to 0, and the last row/column is clamped to H-1 / W-1.
//
// The sample weights factor into a row part and a column part, so a bin is
// sum_r Wy[r] * sum_c Wx[c] * in[r, c] over the rows and columns it touches: the
// kernels precompute Wy per (RoI, bin row) and Wx per (RoI, bin column), shared
// by every channel, instead of four weights per sample.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <climits>
#include <cmath>
#include <string>

#include "common/box_iou.h"  // PVO_HD

namespace pyvision_ops {
namespace roi {

// Adaptive samples per bin, ceil(bin size), capped at kMaxGrid so that an absurdly
// large RoI cannot overflow the count or stall the kernel (such a bin samples
// almost only outside the map, where samples weigh 0).
constexpr int kMaxGrid = 1 << 16;

// Argument checks shared by the CPU and CUDA ops. sampling_ratio: the kernels take it as
// an int (outside int32 it would wrap: 2^32 + 2 read as 2), and above kMaxGrid a bin
// would take over 2^32 samples. The kernels index a RoI's bins with an int (the CPU one
// 4 table entries per output column, the CUDA ones a bin index stepped by a block of up
// to 256), and cells of a feature map along one axis with an int, from float samples:
// under kMaxSide a map's size is exact in fp32, and the kernels' size + 16 fits an int.
constexpr int64_t kMaxBinsPerSide = int64_t(1) << 28;
constexpr int64_t kMaxSide = int64_t(1) << 30;

inline void check_rois(const char* op, const at::Tensor& rois, int64_t ph, int64_t pw, int64_t sampling_ratio) {
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5, op, ": rois must be [K, 5]");
  TORCH_CHECK(at::isFloatingType(rois.scalar_type()), op, ": rois must be floating point");
  TORCH_CHECK(ph > 0 && pw > 0, op, ": output size must be positive");
  TORCH_CHECK_VALUE(ph <= kMaxBinsPerSide && pw <= kMaxBinsPerSide && ph * pw <= INT_MAX - 256, op,
                    ": output_size must be at most 2^28 per side and 2^31 - 257 bins in all, got ",
                    std::to_string(ph), " x ", std::to_string(pw));
  TORCH_CHECK_VALUE(sampling_ratio >= INT_MIN && sampling_ratio <= kMaxGrid, op, ": sampling_ratio must be in [-2^31, ",
                    std::to_string(kMaxGrid), "], got ", std::to_string(sampling_ratio));
}

inline void check_size(const char* op, int64_t H, int64_t W) {
  TORCH_CHECK_VALUE(H >= 0 && W >= 0 && H <= kMaxSide && W <= kMaxSide, op,
                    ": feature map sizes must be in [0, 2^30], got ", std::to_string(H), " x ", std::to_string(W));
}

inline void check_levels(const char* op, const at::Tensor& rois, const at::Tensor& levels, size_t n_levels,
                         size_t n_scales) {
  TORCH_CHECK(n_levels > 0, op, ": at least one feature map is needed");
  TORCH_CHECK(n_scales == n_levels, op, ": one spatial scale per feature map is needed");
  TORCH_CHECK(levels.dim() == 1 && levels.size(0) == rois.size(0), op, ": levels must be [K]");
  TORCH_CHECK(at::isIntegralType(levels.scalar_type(), false), op, ": levels must be integer");
  TORCH_CHECK(levels.device() == rois.device(), op, ": levels must be on the device of rois");
}

template <typename T>
PVO_HD int adaptive_grid(T bin) {
  const T g = std::ceil(bin);
  return g > T(kMaxGrid) ? kMaxGrid : (g < T(-kMaxGrid) ? -kMaxGrid : static_cast<int>(g));
}

template <typename T>
struct Geometry {
  T start_h, start_w, bin_h, bin_w;
  int grid_h, grid_w;
  T inv_count;  // 1 / max(grid_h * grid_w, 1)
  bool valid;   // false for non-finite coordinates: the RoI pools to zeros
};

template <typename T>
PVO_HD Geometry<T> geometry(const T* roi, T spatial_scale, int pooled_h, int pooled_w, int sampling_ratio,
                            bool aligned) {
  Geometry<T> g{};
  const T offset = aligned ? T(0.5) : T(0);
  const T sw = roi[1] * spatial_scale - offset, sh = roi[2] * spatial_scale - offset;
  const T ew = roi[3] * spatial_scale - offset, eh = roi[4] * spatial_scale - offset;
  T rw = ew - sw, rh = eh - sh;
  // Finite corners can still be too far apart for T (rw = inf): 0 * inf would then be a NaN
  // sample position, cast to an int cell.
  g.valid = std::isfinite(rw) && std::isfinite(rh);  // false for a non-finite corner too
  if (!g.valid) return g;
  if (!aligned) {
    rw = rw > T(1) ? rw : T(1);
    rh = rh > T(1) ? rh : T(1);
  }
  g.start_h = sh;
  g.start_w = sw;
  g.bin_h = rh / static_cast<T>(pooled_h);
  g.bin_w = rw / static_cast<T>(pooled_w);
  g.grid_h = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(rh / static_cast<T>(pooled_h));
  g.grid_w = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(rw / static_cast<T>(pooled_w));
  // A grid of <= 0 samples (empty or negative-size aligned RoI) has no samples: zeros.
  const T count = static_cast<T>(g.grid_h) * static_cast<T>(g.grid_w);
  g.inv_count = (g.grid_h > 0 && g.grid_w > 0) ? T(1) / count : T(0);
  return g;
}

// Position of sample i (of `grid`) in bin p along one axis.
template <typename T>
PVO_HD T sample_pos(T start, T bin, int p, int i, int grid) {
  return start + static_cast<T>(p) * bin + static_cast<T>(i + .5f) * bin / static_cast<T>(grid);
}

// The two cells a sample at `v` reads along an axis of `size` cells and their weights.
// Returns false (weight 0) when the sample lies outside [-1, size] or is NaN.
template <typename T>
PVO_HD bool axis_weights(T v, int size, int& lo, int& hi, T& w_lo, T& w_hi) {
  if (!(v >= T(-1) && v <= static_cast<T>(size))) return false;
  if (v <= T(0)) v = T(0);
  lo = static_cast<int>(v);
  if (lo >= size - 1) {
    hi = lo = size - 1;
    v = static_cast<T>(lo);
  } else {
    hi = lo + 1;
  }
  const T l = v - static_cast<T>(lo);
  w_lo = T(1) - l;
  w_hi = l;
  return true;
}

// Number of cells a bin's samples can touch along an axis of `size` cells: the bin's
// extent plus one cell on each side of the interpolation, never more than the axis.
template <typename T>
PVO_HD int axis_span(T bin, int size) {
  const T b = std::fabs(bin);
  return (b < static_cast<T>(size) ? static_cast<int>(std::ceil(b)) : size) + 2;
}

// The distinct cells the samples of bin p read along one axis, in increasing order,
// with their summed (unnormalised) weights, those that are nonzero, without a
// span-sized scratch. Returns their number, or -1 when more than `cap`
// cells would be needed. Samples are visited by increasing position (backwards for
// a negative-size bin), so a new cell is almost always the last one stored, the one
// before it, or a new last one; the insertion below stays correct in any order.
template <typename T>
PVO_HD int bin_cells(T start, T bin, int p, int grid, int size, int cap, int* cell, T* w) {
  int n = 0;
  for (int s = 0; s < grid; ++s) {
    const int i = bin < T(0) ? grid - 1 - s : s;
    int lo, hi;
    T wl, wh;
    if (!axis_weights(sample_pos(start, bin, p, i, grid), size, lo, hi, wl, wh)) continue;
    for (int e = 0; e < 2; ++e) {
      const int c = e ? hi : lo;
      const T wt = e ? wh : wl;
      int j = n - 1;
      while (j >= 0 && cell[j] > c) --j;
      if (j >= 0 && cell[j] == c) {
        w[j] += wt;
        continue;
      }
      if (n == cap) return -1;
      for (int m = n; m > j + 1; --m) cell[m] = cell[m - 1], w[m] = w[m - 1];
      cell[j + 1] = c;
      w[j + 1] = wt;
      ++n;
    }
  }
  int m = 0;  // a cell whose weights are all 0 is not read (0 * inf would be NaN)
  for (int j = 0; j < n; ++j) {
    if (w[j] != T(0)) cell[m] = cell[j], w[m] = w[j], ++m;
  }
  return m;
}

}  // namespace roi
}  // namespace pyvision_ops

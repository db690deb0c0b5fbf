// Bilinear interpolation: torch's source-index rule for one axis, shared by the kernels.
//
// ratio = (in - 1) / (out - 1) with align_corners (0 when out == 1); else 1 / scale when
// the caller gave a scale factor (scale > 0), else in / out. Destination d reads source
// src = ratio * d (align_corners) or max(ratio * (d + 0.5) - 0.5, 0), from cells
// i0 = min(floor(src), in - 1) and i1 = i0 + (i0 < in - 1), weights 1 - l and l with
// l = clamp(src - i0, 0, 1). Equal sizes copy.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/box_iou.h"  // PVO_HD

namespace pyvision_ops {
namespace interp {

template <typename T>
PVO_HD T axis_ratio(int64_t in, int64_t out, bool align_corners, double scale) {
  if (align_corners) return out > 1 ? static_cast<T>(in - 1) / static_cast<T>(out - 1) : T(0);
  return scale > 0 ? static_cast<T>(1.0 / scale) : static_cast<T>(in) / static_cast<T>(out);
}

template <typename T>
struct Tap {
  int64_t i0, i1;
  T w0, w1;
};

template <typename T>
PVO_HD Tap<T> axis_tap(int64_t d, int64_t in, int64_t out, bool align_corners, T ratio) {
  if (in == out) return {d, d, T(1), T(0)};
  T src = align_corners ? ratio * static_cast<T>(d) : ratio * (static_cast<T>(d) + T(0.5)) - T(0.5);
  if (!align_corners && src < T(0)) src = T(0);
  // Compared before the conversion: a ratio of 1 / scale for a tiny scale puts src past
  // int64's range (or at inf), where the conversion is undefined; and after it, as in - 1
  // as a float may round up past 2^24.
  int64_t i0 = src < static_cast<T>(in - 1) ? static_cast<int64_t>(std::floor(src)) : in - 1;
  i0 = i0 < in - 1 ? i0 : in - 1;
  T l = src - static_cast<T>(i0);
  l = l < T(0) ? T(0) : (l > T(1) ? T(1) : l);
  return {i0, i0 + (i0 < in - 1 ? 1 : 0), T(1) - l, l};
}

// Host helper: the taps of every destination index along one axis.
template <typename T>
inline std::vector<Tap<T>> axis_taps(int64_t in, int64_t out, bool align_corners, double scale) {
  const T ratio = axis_ratio<T>(in, out, align_corners, scale);
  std::vector<Tap<T>> t(out);
  for (int64_t d = 0; d < out; ++d) t[d] = axis_tap<T>(d, in, out, align_corners, ratio);
  return t;
}

// The transpose of one axis' interpolation, as a sum into dst (`in` cells, zero before the
// call): dst[i0(d)] += w0(d) src[d] and dst[i1(d)] += w1(d) src[d] for d in order. Taps are
// monotone (i0 never decreases with d; i1 is i0 or i0 + 1), so the running sums of cells k
// and k + 1, for the run of d with i0 = k, stay in registers until i0 moves on: a store and
// reload per tap made each d wait on the last. Each cell gets the same terms in the same
// order as the plain loop, so the result is the same to the bit.
template <typename T, typename S>
inline void scatter_axis(const Tap<T>* taps, const S* src, int64_t out, int64_t in, T* dst) {
  int64_t k = -1;
  T s0 = 0, s1 = 0;  // cells k and k + 1
  for (int64_t d = 0; d < out; ++d) {
    const Tap<T> t = taps[d];
    if (t.i0 != k) {
      if (k >= 0) {
        dst[k] += s0;
        if (t.i0 == k + 1) {
          s0 = s1;  // cell k + 1 goes on with the next run
        } else {
          if (k + 1 < in) dst[k + 1] += s1;
          s0 = T(0);
        }
      }
      s1 = T(0);
      k = t.i0;
    }
    const T v = static_cast<T>(src[d]);
    s0 += t.w0 * v;
    if (t.i1 == k)
      s0 += t.w1 * v;
    else
      s1 += t.w1 * v;
  }
  if (k >= 0) {
    dst[k] += s0;
    if (k + 1 < in) dst[k + 1] += s1;
  }
}

}  // namespace interp
}  // namespace pyvision_ops

// RoI Align, CUDA kernels. Single- and multi-level (FPN) share one code path, as on
// the CPU: a single-level call is one level, and every level is pooled by one launch
// (per-level pointers, sizes and scales travel by value in a small struct).
//
// Forward: one block per (RoI, chunk of channels). The block computes the RoI's
// geometry once and, per bin row and per bin column, the distinct input rows /
// columns its samples read with their summed weights (common/roi_align.h:
// bin_cells), in shared memory; then each thread makes outputs with loads and FMAs
// only. Consecutive threads take consecutive bins of a channel (NCHW) or consecutive
// channels of a bin (channels_last), so stores are coalesced.
//
// Backward, default: the same blocks scatter grad * weight with atomicAdd into an
// fp32 (fp64) buffer, cast to the input dtype at the end (fp32/fp64: the output
// itself). Atomics are fast only when a warp's land on one or two cache lines: with
// 32 or more channels the backward works channels_last (an NCHW grad is transposed
// first and the result transposed back: O(input) extra memory, ~4x faster on an
// H200), consecutive threads taking consecutive channels. Below 32 channels, NCHW:
// the RoI's entries are merged per input cell (one atomic per cell and channel) and a
// group of lanes takes one (channel, input row) and walks its columns.
//
// Backward, deterministic (torch.use_deterministic_algorithms(True)): a gather, no
// atomics. RoIs are stable-sorted by (level, image) on the device and the segment of
// each (level, image) is found with searchsorted: no host sync. One block per
// (level, image, 16x16 map tile, 32 channels) walks its segment in RoI order, keeps
// the RoIs whose footprint meets the tile (a block-wide ballot, order kept), builds
// their row / column weights restricted to the tile 16 RoIs at a time, and each
// thread adds to its cell sum_p sum_q wy[p] wx[q] grad[k, c, p, q] in a fixed order
// (RoI, bin row, bin column), accumulating in registers. Same layout rule as above.
// Extra memory: a key, an order index and a footprint per RoI (and the transposes).
//
// A RoI whose bins read more distinct cells than the table capacity (with adaptive
// sampling, bins wider than 100 to 300 cells, depending on dtype and pooled size;
// every RoI when the pooled size is huge) is sampled directly, sample by sample.
//
// RoIs with a non-finite coordinate, size or batch index, an empty sampling grid, a batch
// index outside [0, N) or a level outside the feature list pool to zeros and get no
// gradient. The CPU kernel raises on the last two; here that would need a host sync.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>
#include <string>
#include <vector>

#include "common/roi_align.h"

namespace pyvision_ops {
namespace {

constexpr int kMaxLevels = 8;
constexpr int kThreads = 256;          // block size of every kernel here
constexpr int kChunk = 64;             // channels per block: forward and atomic backward
constexpr int kAxisBytes = 16 * 1024;  // shared-memory budget of one axis of the tables
constexpr int kMaxShared = 47 * 1024;  // dynamic shared memory: 48 KB without an opt-in, less the static
constexpr int kTile = 16;              // deterministic backward: kTile x kTile cells ...
constexpr int kAcc = 32;               // ... and kAcc channels per block, one accumulator each
constexpr int kHits = 16;              // ... and up to kHits RoIs per round
constexpr int kGatherBytes = 32 * 1024;

// Per-level feature (or gradient) pointers, sizes and spatial scales.
template <typename P, typename T>
struct Levels {
  P data[kMaxLevels];
  int H[kMaxLevels], W[kMaxLevels];
  T scale[kMaxLevels];
  int n;
};

// Deterministic backward: tile numbering of one image, level after level.
struct TileMap {
  int64_t first[kMaxLevels + 1];  // first tile of each level; first[n] = tiles per image
  int tiles_x[kMaxLevels];
};

template <typename T>
struct Roi {
  roi::Geometry<T> g;
  int64_t batch;
  int level, H, W;
  bool ok;  // false: pools to zeros, no gradient
};

template <typename T, typename L>
__device__ __forceinline__ Roi<T> load_roi(const T* rois, const int64_t* roi_level, int64_t k, const L& lv,
                                           int64_t B, int ph, int pw, int sr, bool aligned) {
  Roi<T> r;
  const int64_t l = roi_level ? roi_level[k] : 0;
  const bool level_ok = l >= 0 && l < lv.n;
  r.level = level_ok ? static_cast<int>(l) : 0;
  r.H = lv.H[r.level];
  r.W = lv.W[r.level];
  r.g = roi::geometry<T>(rois + k * 5, lv.scale[r.level], ph, pw, sr, aligned);
  const T b = rois[k * 5];
  // b > -1 and b < B also reject NaN and +-Inf before the conversion; the index is
  // b truncated toward zero, as on the CPU.
  r.ok = level_ok && r.g.valid && r.g.inv_count > T(0) && r.H > 0 && r.W > 0 && b > T(-1) &&
         b < static_cast<T>(B);
  r.batch = r.ok ? static_cast<int64_t>(b) : 0;
  r.ok = r.ok && r.batch < B;
  return r;
}

// ------------------------------------------------------------------ tables

// Shared-memory tables of one RoI: entry j of bin row p is (iy, wy)[p * sh + j],
// j < ny[p]; row weights carry 1 / (sample count). Same for bin columns.
template <typename T>
struct Tables {
  T *wy, *wx;
  int *iy, *ix, *ny, *nx;
  int sh, sw;
};

template <typename T>
__device__ __forceinline__ Tables<T> carve(unsigned char* smem, int ph, int pw, int sh, int sw) {
  Tables<T> t;
  t.wy = reinterpret_cast<T*>(smem);  // the T arrays first: alignment
  t.wx = t.wy + ph * sh;
  t.iy = reinterpret_cast<int*>(t.wx + pw * sw);
  t.ix = t.iy + ph * sh;
  t.ny = t.ix + pw * sw;
  t.nx = t.ny + ph;
  return t;
}

// Table capacity per bin (sh, sw) and the dynamic shared memory, from sizes known on
// the host only: a bin reads at most 2 * sampling_ratio distinct cells and never more
// than the axis has. sh = sw = 0: no tables, every RoI is sampled directly.
struct TableShape {
  int sh = 0, sw = 0;
  size_t smem = 0;
};

template <typename T>
TableShape table_shape(int64_t ph, int64_t pw, int sr, int64_t max_h, int64_t max_w, int64_t extra_per_entry,
                       int64_t extra_bytes) {
  const int64_t per_entry = sizeof(T) + sizeof(int) + extra_per_entry;
  const int64_t budget = kAxisBytes / per_entry;  // entries per axis
  auto cap = [&](int64_t size, int64_t bins) {
    const int64_t need = sr > 0 ? std::min<int64_t>(2 * static_cast<int64_t>(sr), size) : size;
    return std::min<int64_t>(need, budget / bins);
  };
  TableShape s;
  const int64_t sh = cap(max_h, ph), sw = cap(max_w, pw);
  if (sh <= 0 || sw <= 0) return s;
  const int64_t bytes = (ph * sh + pw * sw) * per_entry + (ph + pw) * static_cast<int64_t>(sizeof(int)) + extra_bytes;
  if (bytes > kMaxShared) return s;
  s.sh = static_cast<int>(sh);
  s.sw = static_cast<int>(sw);
  s.smem = static_cast<size_t>(bytes);
  return s;
}

// Fills the tables of one RoI (all threads of the block call it). Returns false, on
// every thread, when some bin needs more than the capacity.
template <typename T>
__device__ bool build_tables(const roi::Geometry<T>& g, int H, int W, int ph, int pw, const Tables<T>& t,
                             int* overflow) {
  if (threadIdx.x == 0) *overflow = 0;
  __syncthreads();
  for (int j = threadIdx.x; j < ph + pw; j += blockDim.x) {
    int n;
    if (j < ph) {
      T* w = t.wy + j * t.sh;
      n = roi::bin_cells(g.start_h, g.bin_h, j, g.grid_h, H, t.sh, t.iy + j * t.sh, w);
      for (int r = 0; r < n; ++r) w[r] *= g.inv_count;
      t.ny[j] = n;
    } else {
      const int q = j - ph;
      n = roi::bin_cells(g.start_w, g.bin_w, q, g.grid_w, W, t.sw, t.ix + q * t.sw, t.wx + q * t.sw);
      t.nx[q] = n;
    }
    if (n < 0) *overflow = 1;
  }
  __syncthreads();
  return *overflow == 0;
}

// One output from the tables; `base` is the channel's plane (NCHW) or the image plus
// the channel (channels_last); ys / xs are the row / column strides.
template <typename scalar_t, typename T>
__device__ __forceinline__ T pool_bin(const scalar_t* base, int64_t ys, int64_t xs, const Tables<T>& t, int p,
                                      int q) {
  const int ny = t.ny[p], nx = t.nx[q];
  const int* iy = t.iy + p * t.sh;
  const T* wy = t.wy + p * t.sh;
  const int* ix = t.ix + q * t.sw;
  const T* wx = t.wx + q * t.sw;
  T acc = T(0);
  if (nx <= 4) {  // the common case (sampling_ratio <= 2): column offsets and weights in registers
    int64_t xo[4];
    T xw[4];
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      xo[s] = 0;
      xw[s] = T(0);
      if (s < nx) {
        xo[s] = ix[s] * xs;
        xw[s] = wx[s];
      }
    }
    for (int r = 0; r < ny; ++r) {
      const scalar_t* row = base + iy[r] * ys;
      T v = T(0);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        if (s < nx) v += xw[s] * static_cast<T>(row[xo[s]]);
      }
      acc += wy[r] * v;
    }
    return acc;
  }
  for (int r = 0; r < ny; ++r) {
    const scalar_t* row = base + iy[r] * ys;
    T v = T(0);
    for (int s = 0; s < nx; ++s) v += wx[s] * static_cast<T>(row[ix[s] * xs]);
    acc += wy[r] * v;
  }
  return acc;
}

// w * v, or 0 for w = 0 whatever v is: the cells the tables leave out (0 * inf is NaN).
template <typename T, typename scalar_t>
__device__ __forceinline__ T weighted(T w, const scalar_t* v) {
  return w != T(0) ? w * static_cast<T>(*v) : T(0);
}

// One output sampled directly (RoIs whose tables do not fit).
template <typename scalar_t, typename T>
__device__ T direct_bin(const scalar_t* base, int64_t ys, int64_t xs, const roi::Geometry<T>& g, int p, int q,
                        int H, int W) {
  T acc = T(0);
  for (int i = 0; i < g.grid_h; ++i) {
    int y0, y1;
    T wy0, wy1;
    if (!roi::axis_weights(roi::sample_pos(g.start_h, g.bin_h, p, i, g.grid_h), H, y0, y1, wy0, wy1)) continue;
    const scalar_t* r0 = base + y0 * ys;
    const scalar_t* r1 = base + y1 * ys;
    for (int j = 0; j < g.grid_w; ++j) {
      int x0, x1;
      T wx0, wx1;
      if (!roi::axis_weights(roi::sample_pos(g.start_w, g.bin_w, q, j, g.grid_w), W, x0, x1, wx0, wx1)) continue;
      acc += weighted(wy0 * wx0, r0 + x0 * xs) + weighted(wy0 * wx1, r0 + x1 * xs) +
             weighted(wy1 * wx0, r1 + x0 * xs) + weighted(wy1 * wx1, r1 + x1 * xs);
    }
  }
  return acc * g.inv_count;
}

template <typename T>
__device__ void direct_scatter(T* base, int64_t ys, int64_t xs, const roi::Geometry<T>& g, int p, int q, int H,
                               int W, T gv) {
  for (int i = 0; i < g.grid_h; ++i) {
    int y0, y1;
    T wy0, wy1;
    if (!roi::axis_weights(roi::sample_pos(g.start_h, g.bin_h, p, i, g.grid_h), H, y0, y1, wy0, wy1)) continue;
    for (int j = 0; j < g.grid_w; ++j) {
      int x0, x1;
      T wx0, wx1;
      if (!roi::axis_weights(roi::sample_pos(g.start_w, g.bin_w, q, j, g.grid_w), W, x0, x1, wx0, wx1)) continue;
      if (wy0 * wx0 != T(0)) atomicAdd(base + y0 * ys + x0 * xs, gv * wy0 * wx0);
      if (wy0 * wx1 != T(0)) atomicAdd(base + y0 * ys + x1 * xs, gv * wy0 * wx1);
      if (wy1 * wx0 != T(0)) atomicAdd(base + y1 * ys + x0 * xs, gv * wy1 * wx0);
      if (wy1 * wx1 != T(0)) atomicAdd(base + y1 * ys + x1 * xs, gv * wy1 * wx1);
    }
  }
}

// Item e of a block's (channel, bin) work: channels_last walks channels fastest (consecutive
// threads, consecutive addresses), NCHW walks bins fastest.
template <bool CL>
__device__ __forceinline__ void split_item(int e, int nc, int nbins, int& c, int& bin) {
  if (CL) {
    bin = e / nc;
    c = e - bin * nc;
  } else {
    c = e / nbins;
    bin = e - c * nbins;
  }
}

// ------------------------------------------------------------------ forward

// Grid (K, channel chunks). out: [K, C, PH, PW], NCHW or channels_last like the input.
template <typename scalar_t, typename T, bool CL>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const __grid_constant__ Levels<const scalar_t*, T> lv, const T* __restrict__ rois,
                   const int64_t* __restrict__ roi_level, int64_t B, int64_t C, int ph, int pw, int sr, bool aligned,
                   int sh, int sw, int chunk, scalar_t* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int overflow;
  const int64_t k = blockIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int nc = static_cast<int>(min(static_cast<int64_t>(chunk), C - c0));
  const int nbins = ph * pw, items = nc * nbins;
  scalar_t* o = out + (CL ? k * nbins * C + c0 : (k * C + c0) * nbins);
  const Roi<T> r = load_roi(rois, roi_level, k, lv, B, ph, pw, sr, aligned);
  if (!r.ok) {
    for (int e = threadIdx.x; e < items; e += blockDim.x) {
      const int c = CL ? e % nc : e / nbins, bin = CL ? e / nc : e % nbins;
      o[CL ? static_cast<int64_t>(bin) * C + c : static_cast<int64_t>(c) * nbins + bin] = scalar_t(0);
    }
    return;
  }
  const Tables<T> t = carve<T>(smem, ph, pw, sh, sw);
  const bool tabled = sh > 0 && build_tables(r.g, r.H, r.W, ph, pw, t, &overflow);
  const int64_t HW = static_cast<int64_t>(r.H) * r.W;
  const scalar_t* img = lv.data[r.level] + r.batch * C * HW;
  const int64_t xs = CL ? C : 1, ys = CL ? r.W * C : r.W;
  for (int e = threadIdx.x; e < items; e += blockDim.x) {
    int c, bin;
    split_item<CL>(e, nc, nbins, c, bin);
    const int p = bin / pw, q = bin - p * pw;
    const scalar_t* base = img + (CL ? c0 + c : (c0 + c) * HW);
    const T acc = tabled ? pool_bin(base, ys, xs, t, p, q) : direct_bin(base, ys, xs, r.g, p, q, r.H, r.W);
    o[CL ? static_cast<int64_t>(bin) * C + c : static_cast<int64_t>(c) * nbins + bin] = static_cast<scalar_t>(acc);
  }
}

// ------------------------------------------------------------------ backward, atomics

// Sorts the table entries of all bins along one axis by cell (bins in order within a
// cell) and cuts them into runs of one cell: run u is ent[start[u] .. start[u + 1]),
// bin[i] the bin of ent[i]. One thread; entries come nearly sorted. Returns the runs.
__device__ int merge_cells(const int* cell, const int* count, int bins, int cap, int* ent, int* bin, int* start) {
  int n = 0;
  for (int p = 0; p < bins; ++p) {
    for (int i = 0; i < count[p]; ++i) {
      const int e = p * cap + i, c = cell[e];
      int j = n - 1;
      for (; j >= 0 && cell[ent[j]] > c; --j) ent[j + 1] = ent[j], bin[j + 1] = bin[j];
      ent[j + 1] = e;
      bin[j + 1] = p;
      ++n;
    }
  }
  int m = 0;
  for (int a = 0; a < n; ++a) {
    if (a == 0 || cell[ent[a]] != cell[ent[a - 1]]) start[m++] = a;
  }
  start[m] = n;
  return m;
}

// Grid (K, channel chunks). lv.data: zeroed fp32/fp64 buffers in the layout of grad.
template <typename scalar_t, typename T, bool CL>
__global__ void __launch_bounds__(kThreads)
    backward_atomic_kernel(const __grid_constant__ Levels<T*, T> lv, const scalar_t* __restrict__ grad,
                           const T* __restrict__ rois, const int64_t* __restrict__ roi_level, int64_t B, int64_t C,
                           int ph, int pw, int sr, bool aligned, int sh, int sw, int chunk) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int overflow, n_rows, n_cols;
  const int64_t k = blockIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * chunk;
  const int nc = static_cast<int>(min(static_cast<int64_t>(chunk), C - c0));
  const int nbins = ph * pw, items = nc * nbins;
  const Roi<T> r = load_roi(rois, roi_level, k, lv, B, ph, pw, sr, aligned);
  if (!r.ok) return;
  const Tables<T> t = carve<T>(smem, ph, pw, sh, sw);
  const bool tabled = sh > 0 && build_tables(r.g, r.H, r.W, ph, pw, t, &overflow);
  const int64_t HW = static_cast<int64_t>(r.H) * r.W;
  T* img = lv.data[r.level] + r.batch * C * HW;
  const scalar_t* g = grad + (CL ? k * nbins * C + c0 : (k * C + c0) * nbins);
  const int64_t xs = CL ? C : 1, ys = CL ? r.W * C : r.W;

  if (!tabled || CL) {
    // One (channel, bin) per item; channels_last: consecutive threads, consecutive channels.
    for (int e = threadIdx.x; e < items; e += blockDim.x) {
      int c, bin;
      split_item<CL>(e, nc, nbins, c, bin);
      const int p = bin / pw, q = bin - p * pw;
      T* base = img + (CL ? c0 + c : (c0 + c) * HW);
      const T gv = static_cast<T>(g[CL ? static_cast<int64_t>(bin) * C + c : static_cast<int64_t>(c) * nbins + bin]);
      if (!tabled) {
        direct_scatter(base, ys, xs, r.g, p, q, r.H, r.W, gv * r.g.inv_count);
        continue;
      }
      const int ny = t.ny[p], nx = t.nx[q];
      const int* iy = t.iy + p * t.sh;
      const T* wy = t.wy + p * t.sh;
      const int* ix = t.ix + q * t.sw;
      const T* wx = t.wx + q * t.sw;
      for (int i = 0; i < ny; ++i) {
        T* row = base + iy[i] * ys;
        const T gy = gv * wy[i];
        for (int j = 0; j < nx; ++j) atomicAdd(row + ix[j] * xs, gy * wx[j]);
      }
    }
    return;
  }

  // NCHW: entries merged by cell, so that each (channel, input cell) of the RoI gets one
  // atomic (small bins share cells: atomics to one address would serialise). A group
  // of G lanes takes one (channel, input row) and walks the distinct columns:
  // neighbouring lanes, neighbouring addresses.
  int* rent = t.nx + pw;  // rows: entries sorted by cell, their bin rows, run starts
  int* rbin = rent + ph * sh;
  int* rstart = rbin + ph * sh;
  int* cent = rstart + ph * sh + 1;  // columns, the same
  int* cbin = cent + pw * sw;
  int* cstart = cbin + pw * sw;
  if (threadIdx.x == 0) n_rows = merge_cells(t.iy, t.ny, ph, sh, rent, rbin, rstart);
  if (threadIdx.x == 32) n_cols = merge_cells(t.ix, t.nx, pw, sw, cent, cbin, cstart);
  __syncthreads();
  const int MY = n_rows, MX = n_cols;
  if (MY == 0 || MX == 0) return;
  int G = 32;  // lanes per (channel, row): the smallest power of 2 >= MX, at most 32
  while (G > 1 && G / 2 >= MX) G /= 2;
  const int per_warp = 32 / G, lane = threadIdx.x & 31, sub = lane / G, v0 = lane - sub * G;
  const int step = static_cast<int>(blockDim.x >> 5) * per_warp;
  const int tasks = nc * MY;
  for (int task = static_cast<int>(threadIdx.x >> 5) * per_warp + sub; task < tasks; task += step) {
    const int c = task / MY, u = task - c * MY;
    const int a0 = rstart[u], a1 = rstart[u + 1];
    T* row = img + (c0 + c) * HW + static_cast<int64_t>(t.iy[rent[a0]]) * r.W;
    const scalar_t* gc = g + static_cast<int64_t>(c) * nbins;
    for (int v = v0; v < MX; v += G) {
      const int b0 = cstart[v], b1 = cstart[v + 1];
      T val = T(0);
      for (int a = a0; a < a1; ++a) {
        const scalar_t* gr = gc + rbin[a] * pw;
        T sx = T(0);
        for (int b = b0; b < b1; ++b) sx += t.wx[cent[b]] * static_cast<T>(gr[cbin[b]]);
        val += t.wy[rent[a]] * sx;
      }
      atomicAdd(row + t.ix[cent[b0]], val);
    }
  }
}

// ------------------------------------------------------------------ backward, deterministic

// Conservative range of the cells the samples of a RoI can read along one axis: its
// extent widened for the interpolation and for rounding, clamped to the axis.
template <typename T>
__device__ __forceinline__ int2 cell_range(T start, T bin, int bins, int size) {
  const T end = start + static_cast<T>(bins) * bin;
  const T lim = static_cast<T>(size) + T(4);
  T lo = start < end ? start : end, hi = start < end ? end : start;
  lo = lo < T(-4) ? T(-4) : (lo > lim ? lim : lo);
  hi = hi < T(-4) ? T(-4) : (hi > lim ? lim : hi);
  const int a = static_cast<int>(floor(lo)) - 2, b = static_cast<int>(floor(hi)) + 3;
  return make_int2(a < 0 ? 0 : a, b > size - 1 ? size - 1 : b);
}

// Per RoI: the sort key level * N + image (n_levels * N for a RoI without gradient)
// and its footprint (y0, y1, x0, x1), inclusive.
template <typename T, typename L>
__global__ void roi_keys_kernel(const __grid_constant__ L lv, const T* __restrict__ rois,
                                const int64_t* __restrict__ roi_level, int64_t K, int64_t B, int ph, int pw, int sr,
                                bool aligned, int64_t* __restrict__ keys, int4* __restrict__ bounds) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= K) return;
  const Roi<T> r = load_roi(rois, roi_level, k, lv, B, ph, pw, sr, aligned);
  int4 bd = make_int4(0, -1, 0, -1);
  bool ok = r.ok;
  if (ok) {
    const int2 ry = cell_range(r.g.start_h, r.g.bin_h, ph, r.H), rx = cell_range(r.g.start_w, r.g.bin_w, pw, r.W);
    bd = make_int4(ry.x, ry.y, rx.x, rx.y);
    ok = ry.x <= ry.y && rx.x <= rx.y;
  }
  keys[k] = ok ? r.level * B + r.batch : static_cast<int64_t>(lv.n) * B;
  bounds[k] = bd;
}

// Weights of bin p along one axis restricted to the tile's cells [t0, t0 + kTile):
// the samples' weights summed per cell (in sample order, as the CPU tables) into
// w[(cell - t0) * stride], then times `scale`; lo_slot / hi_slot keep the lowest /
// highest slot (bin within the chunk) that touches each cell.
template <typename T>
__device__ void tile_weights(T start, T bin, int p, int grid, int size, int t0, T scale, T* w, int stride,
                             int slot, int* lo_slot, int* hi_slot) {
  unsigned touched = 0;
  for (int i = 0; i < grid; ++i) {
    int lo, hi;
    T wl, wh;
    if (!roi::axis_weights(roi::sample_pos(start, bin, p, i, grid), size, lo, hi, wl, wh)) continue;
    if (lo >= t0 && lo < t0 + kTile) {
      w[(lo - t0) * stride] += wl;
      touched |= 1u << (lo - t0);
    }
    if (hi >= t0 && hi < t0 + kTile) {
      w[(hi - t0) * stride] += wh;
      touched |= 1u << (hi - t0);
    }
  }
  for (int c = 0; c < kTile; ++c) {
    if (!((touched >> c) & 1u)) continue;
    w[c * stride] *= scale;
    atomicMin(lo_slot + c, slot);  // min / max: the result does not depend on the order
    atomicMax(hi_slot + c, slot);
  }
}

// Grid (tiles per image * N, channel chunks of kAcc). Writes every cell of every level.
// The hits of the tile are handled `hs` at a time: their tile weights are built in
// parallel (hs x (pc + qc) threads), then every thread adds their terms to its cell in
// hit order, reading grad through L1 (the threads of a warp mostly share the bin).
// pc x qc: bins per pass (all of them unless the pooled size is very large).
template <typename scalar_t, typename T, bool CL>
__global__ void __launch_bounds__(kThreads, sizeof(T) == 8 ? 1 : 2)
    backward_gather_kernel(const __grid_constant__ Levels<scalar_t*, T> lv, const __grid_constant__ TileMap tm,
                           const scalar_t* __restrict__ grad, const T* __restrict__ rois,
                           const int64_t* __restrict__ roi_level, const int64_t* __restrict__ order,
                           const int64_t* __restrict__ seg, const int4* __restrict__ bounds, int64_t B, int64_t C,
                           int ph, int pw, int sr, bool aligned, int pc, int qc, int hs, bool aligned16) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int64_t hits[kThreads];
  __shared__ int warp_hits[kThreads / 32];

  const int64_t tiles = tm.first[lv.n];
  const int64_t b = blockIdx.x / tiles, tile = blockIdx.x - b * tiles;
  int l = 0;
  while (l + 1 < lv.n && tile >= tm.first[l + 1]) ++l;
  const int H = lv.H[l], W = lv.W[l];
  const int64_t tl = tile - tm.first[l];
  const int ty0 = static_cast<int>(tl / tm.tiles_x[l]) * kTile, tx0 = static_cast<int>(tl % tm.tiles_x[l]) * kTile;
  const int ty1 = min(ty0 + kTile, H) - 1, tx1 = min(tx0 + kTile, W) - 1;  // inclusive
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kAcc;
  const int nc = static_cast<int>(min(static_cast<int64_t>(kAcc), C - c0));
  const int ly = threadIdx.x / kTile, lx = threadIdx.x % kTile;  // this thread's cell
  const bool mine = ty0 + ly <= ty1 && tx0 + lx <= tx1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nbins = static_cast<int64_t>(ph) * pw;
  // channels_last fp32: whole 32-channel chunks of 16-byte aligned rows load as float4
  const bool vec4 = CL && aligned16 && nc == kAcc;

  // Per hit h: wrow[h][cell row][bin row], wcol[h][cell column][bin column], and the
  // lowest / highest bin (within the pass) touching each cell row / column.
  T* wrow = reinterpret_cast<T*>(smem);
  T* wcol = wrow + hs * kTile * pc;
  int* rng = reinterpret_cast<int*>(wcol + hs * kTile * qc);  // [hs][4][kTile]
  T acc[kAcc];
#pragma unroll
  for (int a = 0; a < kAcc; ++a) acc[a] = T(0);

  const int64_t s = l * B + b, begin = seg[s], end = seg[s + 1];
  for (int64_t base = begin; base < end; base += kThreads) {
    // The RoIs of this batch whose footprint meets the tile, in order.
    const int64_t j = base + threadIdx.x;
    int64_t k = 0;
    bool hit = false;
    if (j < end) {
      k = order[j];
      const int4 bd = bounds[k];
      hit = bd.x <= ty1 && bd.y >= ty0 && bd.z <= tx1 && bd.w >= tx0;
    }
    const unsigned m = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) warp_hits[warp] = __popc(m);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      before += w < warp ? warp_hits[w] : 0;
      total += warp_hits[w];
    }
    if (hit) hits[before + __popc(m & ((1u << lane) - 1u))] = k;
    __syncthreads();

    for (int p0 = 0; p0 < ph; p0 += pc) {
      for (int q0 = 0; q0 < pw; q0 += qc) {
        const int np = min(pc, ph - p0), nq = min(qc, pw - q0);
        for (int h0 = 0; h0 < total; h0 += hs) {
          const int ns = min(hs, total - h0);
          for (int e = threadIdx.x; e < ns * kTile * pc; e += kThreads) wrow[e] = T(0);
          for (int e = threadIdx.x; e < ns * kTile * qc; e += kThreads) wcol[e] = T(0);
          for (int e = threadIdx.x; e < ns * 4 * kTile; e += kThreads) rng[e] = (e / kTile) % 2 ? -1 : INT_MAX;
          __syncthreads();
          for (int e = threadIdx.x; e < ns * (np + nq); e += kThreads) {
            const int h = e / (np + nq), jj = e - h * (np + nq);
            const Roi<T> r = load_roi(rois, roi_level, hits[h0 + h], lv, B, ph, pw, sr, aligned);
            int* rh = rng + h * 4 * kTile;
            if (jj < np) {
              tile_weights(r.g.start_h, r.g.bin_h, p0 + jj, r.g.grid_h, H, ty0, r.g.inv_count,
                           wrow + h * kTile * pc + jj, pc, jj, rh, rh + kTile);
            } else {
              tile_weights(r.g.start_w, r.g.bin_w, q0 + jj - np, r.g.grid_w, W, tx0, T(1),
                           wcol + h * kTile * qc + jj - np, qc, jj - np, rh + 2 * kTile, rh + 3 * kTile);
            }
          }
          __syncthreads();
          if (mine) {
            for (int h = 0; h < ns; ++h) {
              const int* rh = rng + h * 4 * kTile;
              const int pa = rh[ly], pb = rh[kTile + ly], qa = rh[2 * kTile + lx], qb = rh[3 * kTile + lx];
              if (pa > pb || qa > qb) continue;
              const int64_t kk = hits[h0 + h];
              const scalar_t* gk = grad + (CL ? kk * nbins * C + c0 : (kk * C + c0) * nbins);
              const int64_t gstep = CL ? 1 : nbins;  // channel stride of grad
              const T* wr = wrow + (h * kTile + ly) * pc;
              const T* wc = wcol + (h * kTile + lx) * qc;
              for (int p = pa; p <= pb; ++p) {
                if (wr[p] == T(0)) continue;  // a cell between two samples of the bin
                for (int q = qa; q <= qb; ++q) {
                  if (wc[q] == T(0)) continue;
                  const T w = wr[p] * wc[q];
                  const int64_t bin = static_cast<int64_t>(p0 + p) * pw + q0 + q;
                  const scalar_t* gp = gk + (CL ? bin * C : bin);
                  if constexpr (CL && std::is_same_v<scalar_t, float>) {
                    if (vec4) {  // 32 channels in 8 aligned 16-byte loads
#pragma unroll
                      for (int a = 0; a < kAcc; a += 4) {
                        const float4 v = *reinterpret_cast<const float4*>(gp + a);
                        acc[a] += w * v.x;
                        acc[a + 1] += w * v.y;
                        acc[a + 2] += w * v.z;
                        acc[a + 3] += w * v.w;
                      }
                      continue;
                    }
                  }
#pragma unroll
                  for (int a = 0; a < kAcc; ++a) {
                    if (a < nc) acc[a] += w * static_cast<T>(gp[a * gstep]);
                  }
                }
              }
            }
          }
          __syncthreads();
        }
      }
    }
  }

  scalar_t* out = lv.data[l];
  if (!CL) {
    if (!mine) return;
    const int64_t HW = static_cast<int64_t>(H) * W;
    scalar_t* o = out + (b * C + c0) * HW + static_cast<int64_t>(ty0 + ly) * W + tx0 + lx;
#pragma unroll
    for (int a = 0; a < kAcc; ++a) {
      if (a < nc) o[a * HW] = static_cast<scalar_t>(acc[a]);
    }
    return;
  }
  // channels_last: through shared memory, 8 channels at a time, so that consecutive
  // threads store consecutive channels.
  T* stage = reinterpret_cast<T*>(smem);  // [8][kThreads + 1]
#pragma unroll
  for (int a0 = 0; a0 < kAcc; a0 += 8) {
    if (a0 >= nc) break;
    __syncthreads();
#pragma unroll
    for (int a = 0; a < 8; ++a) stage[a * (kThreads + 1) + threadIdx.x] = acc[a0 + a];
    __syncthreads();
    for (int e = threadIdx.x; e < kThreads * 8; e += kThreads) {
      const int a = e & 7, cell = e >> 3;
      const int y = ty0 + cell / kTile, x = tx0 + cell % kTile;
      if (a0 + a < nc && y <= ty1 && x <= tx1) {
        out[((b * H + y) * static_cast<int64_t>(W) + x) * C + c0 + a0 + a] =
            static_cast<scalar_t>(stage[a * (kThreads + 1) + cell]);
      }
    }
  }
}

// ------------------------------------------------------------------ host

bool is_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

at::Tensor empty_format(at::IntArrayRef size, const at::TensorOptions& opts, bool channels_last) {
  return at::empty(size, opts.memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                          : at::MemoryFormat::Contiguous));
}

void check_rois(const char* op, const at::Tensor& rois, int64_t ph, int64_t pw, int64_t sampling_ratio,
                const at::Tensor& like) {
  roi::check_rois(op, rois, ph, pw, sampling_ratio);
  TORCH_CHECK(rois.device() == like.device(), op, ": rois must be on the device of the features");
  // Kernels step an int item index by the block size up to chunk * ph * pw (channel_chunk);
  // roi::check_rois bounds ph * pw for that.
  static_assert(kThreads <= 256, "roi::check_rois bounds ph * pw by INT_MAX - 256");
  TORCH_CHECK(rois.size(0) < INT_MAX, op, ": at most 2^31 - 1 RoIs on CUDA, got ", std::to_string(rois.size(0)));
}

void check_levels(const char* op, const at::Tensor& rois, const at::Tensor& levels, size_t n_levels, size_t n_scales) {
  roi::check_levels(op, rois, levels, n_levels, n_scales);
  TORCH_CHECK(n_levels <= static_cast<size_t>(kMaxLevels), op, ": at most ", std::to_string(kMaxLevels),
              " feature maps on CUDA, got ", std::to_string(n_levels));
}

// Channels per block such that chunk * ph * pw plus a block's step stays an int.
int channel_chunk(int64_t ph, int64_t pw) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kChunk, (INT_MAX - kThreads) / (ph * pw))));
}

at::Tensor pool(const std::vector<at::Tensor>& features, const at::Tensor& rois, const at::Tensor* roi_levels,
                const std::vector<double>& scales, int64_t ph, int64_t pw, int64_t sampling_ratio, bool aligned) {
  const at::Tensor& x0 = features[0];
  c10::cuda::CUDAGuard guard(x0.device());
  const int64_t K = rois.size(0), B = x0.size(0), C = x0.size(1);
  const bool cl = is_channels_last(x0);
  std::vector<at::Tensor> feats;
  int64_t max_h = 0, max_w = 0;
  for (const at::Tensor& f : features) {
    TORCH_CHECK(f.dim() == 4 && f.size(0) == B && f.size(1) == C,
                "roi_align: every feature map must be [N, C, H, W] with the N and C of the first");
    TORCH_CHECK(f.scalar_type() == x0.scalar_type(), "roi_align: feature maps must share one dtype");
    TORCH_CHECK(f.device() == x0.device(), "roi_align: feature maps must share one device");
    roi::check_size("roi_align", f.size(2), f.size(3));
    feats.push_back(cl ? f.contiguous(at::MemoryFormat::ChannelsLast) : f.contiguous());
    if (f.size(2) > 0 && f.size(3) > 0) max_h = std::max(max_h, f.size(2)), max_w = std::max(max_w, f.size(3));
  }
  at::Tensor out = empty_format({K, C, ph, pw}, x0.options(), cl);
  if (K == 0 || C == 0) return out;
  if (max_h == 0) return out.zero_();  // every map is empty
  const int chunk = channel_chunk(ph, pw);
  const int64_t chunks = (C + chunk - 1) / chunk;
  TORCH_CHECK(chunks <= 65535, "roi_align: too many channels for CUDA, got ", std::to_string(C));
  const at::Tensor lvl = roi_levels ? roi_levels->to(at::kLong).contiguous() : at::Tensor();
  const int sr = static_cast<int>(sampling_ratio);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "roi_align_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor r = rois.to(c10::CppTypeToScalarType<T>::value).contiguous();
    Levels<const scalar_t*, T> lv{};
    lv.n = static_cast<int>(feats.size());
    for (int l = 0; l < lv.n; ++l) {
      lv.data[l] = feats[l].const_data_ptr<scalar_t>();
      lv.H[l] = static_cast<int>(feats[l].size(2));
      lv.W[l] = static_cast<int>(feats[l].size(3));
      lv.scale[l] = static_cast<T>(scales[l]);
    }
    const TableShape ts = table_shape<T>(ph, pw, sr, max_h, max_w, 0, 0);
    const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>(chunks));
    const int64_t* lp = roi_levels ? lvl.const_data_ptr<int64_t>() : nullptr;
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, ts.smem, stream>>>(lv, r.const_data_ptr<T>(), lp, B, C, static_cast<int>(ph),
                                                   static_cast<int>(pw), sr, aligned, ts.sh, ts.sw, chunk,
                                                   out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (cl) {
      launch(forward_kernel<scalar_t, T, true>);
    } else {
      launch(forward_kernel<scalar_t, T, false>);
    }
  });
  return out;
}

// Gather kernel shared memory: bins per pass (pc x qc, all of them unless the pooled
// size is very large) and hits per round (hs) such that it fits kGatherBytes.
struct GatherShape {
  int pc, qc, hs;
  size_t smem;
};

GatherShape gather_shape(int64_t ph, int64_t pw, size_t elem, bool cl) {
  int64_t pc = ph, qc = pw;
  auto per_hit = [&] {
    return kTile * (pc + qc) * static_cast<int64_t>(elem) + 4 * kTile * static_cast<int64_t>(sizeof(int));
  };
  while (per_hit() > kGatherBytes) {
    if (pc >= qc) {
      pc = (pc + 1) / 2;
    } else {
      qc = (qc + 1) / 2;
    }
  }
  const int64_t hs = std::min<int64_t>(kHits, kGatherBytes / per_hit());
  const size_t stage = cl ? 8 * (kThreads + 1) * elem : 0;  // channels_last store through shared memory
  return {static_cast<int>(pc), static_cast<int>(qc), static_cast<int>(hs),
          std::max(static_cast<size_t>(hs * per_hit()), stage)};
}

template <typename scalar_t>
void unpool_deterministic(const at::Tensor& g, const at::Tensor& rois, const at::Tensor* lvl,
                          const std::vector<double>& scales, int64_t B, int64_t C, int64_t ph, int64_t pw, int sr,
                          bool aligned, bool cl, std::vector<at::Tensor>& grads) {
  using T = at::opmath_type<scalar_t>;
  const int64_t K = rois.size(0);
  const int L = static_cast<int>(grads.size());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor r = rois.to(c10::CppTypeToScalarType<T>::value).contiguous();
  const int64_t* lp = lvl ? lvl->const_data_ptr<int64_t>() : nullptr;
  Levels<scalar_t*, T> lv{};
  TileMap tm{};
  lv.n = L;
  for (int l = 0; l < L; ++l) {
    lv.data[l] = grads[l].mutable_data_ptr<scalar_t>();
    lv.H[l] = static_cast<int>(grads[l].size(2));
    lv.W[l] = static_cast<int>(grads[l].size(3));
    lv.scale[l] = static_cast<T>(scales[l]);
    tm.tiles_x[l] = (lv.W[l] + kTile - 1) / kTile;
    tm.first[l + 1] = tm.first[l] + static_cast<int64_t>((lv.H[l] + kTile - 1) / kTile) * tm.tiles_x[l];
  }
  const int64_t blocks = tm.first[L] * B;
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= INT_MAX, "roi_align_backward: feature maps too large for the deterministic CUDA kernel");
  const int64_t chunks = (C + kAcc - 1) / kAcc;
  TORCH_CHECK(chunks <= 65535, "roi_align_backward: too many channels for CUDA, got ", std::to_string(C));

  at::Tensor keys = at::empty({K}, rois.options().dtype(at::kLong));
  at::Tensor bounds = at::empty({K, 4}, rois.options().dtype(at::kInt));
  roi_keys_kernel<<<static_cast<unsigned>((K + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      lv, r.const_data_ptr<T>(), lp, K, B, static_cast<int>(ph), static_cast<int>(pw), sr, aligned,
      keys.mutable_data_ptr<int64_t>(), reinterpret_cast<int4*>(bounds.mutable_data_ptr<int>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& order = std::get<1>(sorted);
  const at::Tensor seg = at::searchsorted(std::get<0>(sorted), at::arange(L * B + 1, keys.options()));

  const GatherShape gs = gather_shape(ph, pw, sizeof(T), cl);
  // Every 32-channel chunk of a grad row starts on a 16-byte boundary.
  const bool aligned16 = C % 4 == 0 && reinterpret_cast<uintptr_t>(g.const_data_ptr()) % 16 == 0;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(chunks));
  auto launch = [&](auto kernel) {
    kernel<<<grid, kThreads, gs.smem, stream>>>(
        lv, tm, g.const_data_ptr<scalar_t>(), r.const_data_ptr<T>(), lp, order.const_data_ptr<int64_t>(),
        seg.const_data_ptr<int64_t>(), reinterpret_cast<const int4*>(bounds.const_data_ptr<int>()), B, C,
        static_cast<int>(ph), static_cast<int>(pw), sr, aligned, gs.pc, gs.qc, gs.hs, aligned16);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (cl) {
    launch(backward_gather_kernel<scalar_t, T, true>);
  } else {
    launch(backward_gather_kernel<scalar_t, T, false>);
  }
}

template <typename scalar_t>
void unpool_atomic(const at::Tensor& g, const at::Tensor& rois, const at::Tensor* lvl,
                   const std::vector<double>& scales, int64_t B, int64_t C, int64_t ph, int64_t pw, int sr,
                   bool aligned, bool cl, std::vector<at::Tensor>& grads) {
  using T = at::opmath_type<scalar_t>;
  constexpr bool direct = std::is_same_v<T, scalar_t>;  // fp32 / fp64: accumulate into the output
  const int64_t K = rois.size(0);
  const int L = static_cast<int>(grads.size());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor r = rois.to(c10::CppTypeToScalarType<T>::value).contiguous();
  std::vector<at::Tensor> bufs;
  Levels<T*, T> lv{};
  lv.n = L;
  int64_t max_h = 0, max_w = 0;
  for (int l = 0; l < L; ++l) {
    bufs.push_back(direct ? grads[l] : empty_format(grads[l].sizes(), grads[l].options().dtype(
                                                                          c10::CppTypeToScalarType<T>::value), cl));
    bufs[l].zero_();
    lv.data[l] = bufs[l].mutable_data_ptr<T>();
    lv.H[l] = static_cast<int>(grads[l].size(2));
    lv.W[l] = static_cast<int>(grads[l].size(3));
    lv.scale[l] = static_cast<T>(scales[l]);
    if (lv.H[l] > 0 && lv.W[l] > 0) max_h = std::max<int64_t>(max_h, lv.H[l]), max_w = std::max<int64_t>(max_w, lv.W[l]);
  }
  if (max_h > 0) {
    const int chunk = channel_chunk(ph, pw);
    const int64_t chunks = (C + chunk - 1) / chunk;
    TORCH_CHECK(chunks <= 65535, "roi_align_backward: too many channels for CUDA, got ", std::to_string(C));
    // NCHW also keeps the entries merged by cell (merge_cells): 3 ints per entry, 2 more.
    const TableShape ts = table_shape<T>(ph, pw, sr, max_h, max_w, cl ? 0 : 3 * sizeof(int), cl ? 0 : 2 * sizeof(int));
    const dim3 grid(static_cast<unsigned>(K), static_cast<unsigned>(chunks));
    const int64_t* lp = lvl ? lvl->const_data_ptr<int64_t>() : nullptr;
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, ts.smem, stream>>>(lv, g.const_data_ptr<scalar_t>(), r.const_data_ptr<T>(), lp, B, C,
                                                static_cast<int>(ph), static_cast<int>(pw), sr, aligned, ts.sh, ts.sw,
                                                chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (cl) {
      launch(backward_atomic_kernel<scalar_t, T, true>);
    } else {
      launch(backward_atomic_kernel<scalar_t, T, false>);
    }
  }
  if constexpr (!direct) {
    for (int l = 0; l < L; ++l) grads[l] = bufs[l].to(grads[l].scalar_type());
  }
}

std::vector<at::Tensor> unpool(const at::Tensor& grad, const at::Tensor& rois, const at::Tensor* roi_levels,
                               const std::vector<double>& scales, const std::vector<std::array<int64_t, 2>>& hw,
                               int64_t B, int64_t C, int64_t ph, int64_t pw, int64_t sampling_ratio, bool aligned) {
  const int64_t K = rois.size(0);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == K && grad.size(1) == C && grad.size(2) == ph && grad.size(3) == pw,
              "roi_align_backward: grad must be [K, C, pooled_height, pooled_width]");
  TORCH_CHECK(B >= 0 && C >= 0, "roi_align_backward: batch_size and channels must be >= 0");
  c10::cuda::CUDAGuard guard(grad.device());
  const bool cl = is_channels_last(grad);  // the layout of the result, as on the CPU
  // Both backward kernels are much faster channels_last (a warp's atomics or loads cover
  // 32 consecutive channels): with enough channels an NCHW grad is transposed, the
  // kernels run channels_last, and the result is transposed back (O(input) memory).
  const bool work_cl = cl || C >= kAcc;
  at::Tensor g = work_cl ? grad.contiguous(at::MemoryFormat::ChannelsLast) : grad.contiguous();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  std::vector<at::Tensor> grads;
  bool any_cells = false;
  for (const auto& s : hw) {
    roi::check_size("roi_align_backward", s[0], s[1]);
    any_cells = any_cells || (s[0] > 0 && s[1] > 0);
  }
  // Nothing to scatter: zeros in the result's layout (the fake kernel's), not the working one.
  const bool nothing = K == 0 || C == 0 || B == 0 || !any_cells;
  for (const auto& s : hw) {
    grads.push_back(empty_format({B, C, s[0], s[1]}, grad.options(), nothing ? cl : work_cl));
  }
  if (nothing) {
    for (auto& t : grads) t.zero_();
    return grads;
  }
  const at::Tensor lvl = roi_levels ? roi_levels->to(at::kLong).contiguous() : at::Tensor();
  const at::Tensor* lp = roi_levels ? &lvl : nullptr;
  const int sr = static_cast<int>(sampling_ratio);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "roi_align_backward_cuda", [&] {
    if (deterministic) {
      unpool_deterministic<scalar_t>(g, rois, lp, scales, B, C, ph, pw, sr, aligned, work_cl, grads);
    } else {
      unpool_atomic<scalar_t>(g, rois, lp, scales, B, C, ph, pw, sr, aligned, work_cl, grads);
    }
  });
  if (work_cl && !cl) {
    g.reset();  // a transposed copy of grad: free it before the transposes back
    for (auto& t : grads) t = t.contiguous();
  }
  return grads;
}

at::Tensor roi_align_cuda(const at::Tensor& input, const at::Tensor& rois, double spatial_scale, int64_t pooled_height,
                          int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  TORCH_CHECK(input.dim() == 4, "roi_align: input must be [N, C, H, W]");
  check_rois("roi_align", rois, pooled_height, pooled_width, sampling_ratio, input);
  return pool({input}, rois, nullptr, {spatial_scale}, pooled_height, pooled_width, sampling_ratio, aligned);
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, double spatial_scale,
                                   int64_t pooled_height, int64_t pooled_width, int64_t batch_size, int64_t channels,
                                   int64_t height, int64_t width, int64_t sampling_ratio, bool aligned) {
  check_rois("roi_align_backward", rois, pooled_height, pooled_width, sampling_ratio, grad);
  return unpool(grad, rois, nullptr, {spatial_scale}, {{height, width}}, batch_size, channels, pooled_height,
                pooled_width, sampling_ratio, aligned)[0];
}

at::Tensor multi_scale_roi_align_cuda(at::TensorList features, const at::Tensor& rois, const at::Tensor& levels,
                                      at::ArrayRef<double> spatial_scales, int64_t pooled_height,
                                      int64_t pooled_width, int64_t sampling_ratio, bool aligned) {
  check_levels("multi_scale_roi_align", rois, levels, features.size(), spatial_scales.size());
  check_rois("multi_scale_roi_align", rois, pooled_height, pooled_width, sampling_ratio, features[0]);
  return pool(features.vec(), rois, &levels, spatial_scales.vec(), pooled_height, pooled_width, sampling_ratio,
              aligned);
}

std::vector<at::Tensor> multi_scale_roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois,
                                                            const at::Tensor& levels,
                                                            at::ArrayRef<double> spatial_scales,
                                                            at::IntArrayRef heights, at::IntArrayRef widths,
                                                            int64_t batch_size, int64_t channels,
                                                            int64_t pooled_height, int64_t pooled_width,
                                                            int64_t sampling_ratio, bool aligned) {
  check_levels("multi_scale_roi_align_backward", rois, levels, heights.size(), spatial_scales.size());
  check_rois("multi_scale_roi_align_backward", rois, pooled_height, pooled_width, sampling_ratio, grad);
  TORCH_CHECK(widths.size() == heights.size(), "multi_scale_roi_align_backward: heights and widths differ in length");
  std::vector<std::array<int64_t, 2>> hw;
  for (size_t l = 0; l < heights.size(); ++l) hw.push_back({heights[l], widths[l]});
  return unpool(grad, rois, &levels, spatial_scales.vec(), hw, batch_size, channels, pooled_height, pooled_width,
                sampling_ratio, aligned);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvision_ops, CUDA, m) {
  m.impl("roi_align", &roi_align_cuda);
  m.impl("roi_align_backward", &roi_align_backward_cuda);
  m.impl("multi_scale_roi_align", &multi_scale_roi_align_cuda);
  m.impl("multi_scale_roi_align_backward", &multi_scale_roi_align_backward_cuda);
}

}  // namespace pyvision_ops

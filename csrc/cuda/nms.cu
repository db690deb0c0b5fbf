// NMS family, CUDA kernels.
//
// Boxes are sorted once by score (stable, descending, NaN first) and grouped by
// category (one group when idxs is None), as on the CPU. Hard NMS builds, per
// group only, a bitmask of "IoU > threshold" between each box and the 64-box
// blocks after it (work = sum over groups of n_c^2 / 2), then resolves it greedily
// on the device, one CUDA block per group. Soft-NMS runs one CUDA block per group:
// each step a block-wide argmax, then every thread decays its boxes, which it
// keeps in registers when the group is small enough.
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/unique_consecutive.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <vector>

#include "common/nms.h"

namespace pyvision_ops {
namespace {

using box::Box;
constexpr int kWord = 64;  // boxes per mask word

void check_inputs(const char* op, const at::Tensor& boxes, const at::Tensor& scores,
                  const std::optional<at::Tensor>& idxs) {
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
}

// Score order and category groups (see csrc/cpu/nms.cpp); `grouped[k]` is a position
// into `order`; group c is grouped[start[c] : start[c] + len[c]]. Lengths live on the host.
struct Groups {
  at::Tensor order, grouped;
  std::vector<int64_t> start, len;
};

Groups group_by_category(const at::Tensor& scores, const std::optional<at::Tensor>& idxs) {
  Groups g;
  const int64_t n = scores.size(0);
  g.order = std::get<1>(at::sort(scores, /*stable=*/true, /*dim=*/0, /*descending=*/true));
  if (!idxs) {
    g.grouped = at::arange(n, scores.options().dtype(at::kLong));
    g.start = {0};
    g.len = {n};
    return g;
  }
  const at::Tensor cats = idxs->to(at::kLong).index_select(0, g.order);
  auto [sorted_cats, perm] = at::sort(cats, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  g.grouped = perm;
  const at::Tensor counts = std::get<2>(at::unique_consecutive(sorted_cats, false, true)).cpu();  // syncs
  const int64_t* c = counts.const_data_ptr<int64_t>();
  int64_t s = 0;
  for (int64_t i = 0; i < counts.numel(); ++i) {
    g.start.push_back(s);
    g.len.push_back(c[i]);
    s += c[i];
  }
  return g;
}

at::Tensor to_device(const std::vector<int64_t>& v, const at::Tensor& like) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(like.device());
}

template <typename T>
__device__ __forceinline__ Box<T> load_box(const T* p, int64_t i) {
  return {p[i * 4], p[i * 4 + 1], p[i * 4 + 2], p[i * 4 + 3]};
}

// ---------------------------------------------------------------- hard NMS

// Where a group lies: with `start` null there is one group of `single` boxes (no idxs),
// and the kernels take its layout from the launch instead of from device tables.
struct Layout {
  const int64_t *start, *len, *mask_off, *removed_off, *grouped;
  int64_t single;
  __device__ int64_t s(int64_t c) const { return start ? start[c] : 0; }
  __device__ int64_t n(int64_t c) const { return start ? len[c] : single; }
  __device__ int64_t moff(int64_t c) const { return start ? mask_off[c] : 0; }
  __device__ int64_t roff(int64_t c) const { return start ? removed_off[c] : 0; }
  __device__ int64_t pos(int64_t i) const { return start ? grouped[i] : i; }
};

// One 64-thread block per tile (group, row block, column block >= row block): thread t
// sets bit c of word [row, column block] when IoU(row, column box c) > thr. Tiles come
// from a list, or for one group from the grid (x: column block, y: row block).
template <typename T>
__global__ void mask_kernel(const T* __restrict__ boxes, const int64_t* __restrict__ tiles, Layout L, T thr,
                            unsigned long long* __restrict__ mask) {
  int64_t c = 0, rb = blockIdx.y, cb = blockIdx.x;
  if (tiles) {
    const int64_t* tile = tiles + blockIdx.x * 3;
    c = tile[0], rb = tile[1], cb = tile[2];
  } else if (cb < rb) {
    return;
  }
  const int64_t s = L.s(c), n = L.n(c), words = (n + kWord - 1) / kWord;
  __shared__ T cols[kWord * 4];
  const int t = threadIdx.x;
  const int64_t col0 = cb * kWord;
  const int ncols = static_cast<int>(min(static_cast<int64_t>(kWord), n - col0));
  if (t < ncols) {
    for (int q = 0; q < 4; ++q) cols[t * 4 + q] = boxes[(s + col0 + t) * 4 + q];
  }
  __syncthreads();
  const int64_t row = rb * kWord + t;
  if (row >= n) return;
  const Box<T> a = load_box(boxes, s + row);
  unsigned long long bits = 0;
  for (int j = (rb == cb ? t + 1 : 0); j < ncols; ++j) {
    const Box<T> b{cols[j * 4], cols[j * 4 + 1], cols[j * 4 + 2], cols[j * 4 + 3]};
    if (box::pair_value<T, box::kIoU, false>(a, b, T(0), T(0), T(0)) > thr) bits |= 1ull << j;
  }
  mask[L.moff(c) + row * words + cb] = bits;
}

// One block per group: walk the 64-box blocks in order; thread 0 resolves the block's
// own boxes from the diagonal words (in shared memory), then all threads OR the masks
// of the kept boxes into the "removed" words of the later blocks.
__global__ void greedy_kernel(const unsigned long long* __restrict__ mask, Layout L,
                              unsigned long long* __restrict__ removed_all, uint8_t* __restrict__ keep) {
  const int64_t c = blockIdx.x;
  const int64_t s = L.s(c), n = L.n(c), words = (n + kWord - 1) / kWord;
  const unsigned long long* m = mask + L.moff(c);
  unsigned long long* removed = removed_all + L.roff(c);  // zeroed by the caller
  __shared__ unsigned long long diag[kWord];
  __shared__ unsigned long long kept;
  __shared__ int kept_rows[kWord], n_kept;
  for (int64_t rb = 0; rb < words; ++rb) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kWord), n - rb * kWord));
    if (threadIdx.x < rows) diag[threadIdx.x] = m[(rb * kWord + threadIdx.x) * words + rb];
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long rem = removed[rb], k = 0;
      int nk = 0;
      for (int r = 0; r < rows; ++r) {
        if (!((rem >> r) & 1ull)) {
          k |= 1ull << r;
          rem |= diag[r];
          kept_rows[nk++] = r;
        }
      }
      kept = k;
      n_kept = nk;
    }
    __syncthreads();
    const unsigned long long k = kept;
    const int nk = n_kept;
    if (threadIdx.x < rows && ((k >> threadIdx.x) & 1ull)) keep[L.pos(s + rb * kWord + threadIdx.x)] = 1;
    // OR the kept rows' masks into the later words; a counted loop, 4 independent loads at a
    // time, so that the loads overlap instead of waiting on each other.
    const unsigned long long* block_rows = m + rb * kWord * words;
    for (int64_t w = rb + 1 + threadIdx.x; w < words; w += blockDim.x) {
      const unsigned long long* col = block_rows + w;
      unsigned long long acc = removed[w];
      int i = 0;
      for (; i + 4 <= nk; i += 4) {
        acc |= (col[kept_rows[i] * words] | col[kept_rows[i + 1] * words]) |
               (col[kept_rows[i + 2] * words] | col[kept_rows[i + 3] * words]);
      }
      for (; i < nk; ++i) acc |= col[kept_rows[i] * words];
      removed[w] = acc;
    }
    __syncthreads();
  }
}

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, const std::optional<at::Tensor>& idxs,
                    double iou_threshold) {
  check_inputs("nms", boxes, scores, idxs);
  c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) return at::empty({0}, boxes.options().dtype(at::kLong));
  Groups g = group_by_category(scores, idxs);
  const int64_t groups = static_cast<int64_t>(g.len.size());

  // Host-side layout: mask and "removed" offsets per group, and the tile list; one group
  // (no idxs) needs neither tables nor list on the device.
  const bool single = !idxs.has_value();
  std::vector<int64_t> mask_off(groups), removed_off(groups), tiles;
  int64_t mask_words = 0, removed_words = 0;
  for (int64_t c = 0; c < groups; ++c) {
    const int64_t words = (g.len[c] + kWord - 1) / kWord;
    mask_off[c] = mask_words;
    removed_off[c] = removed_words;
    mask_words += g.len[c] * words;
    removed_words += words;
    if (single) continue;
    for (int64_t rb = 0; rb < words; ++rb)
      for (int64_t cb = rb; cb < words; ++cb) tiles.insert(tiles.end(), {c, rb, cb});
  }
  TORCH_CHECK(mask_words <= (int64_t(1) << 31),
              "nms: a category with ", std::to_string(*std::max_element(g.len.begin(), g.len.end())),
              " boxes needs a ", std::to_string(mask_words * 8 >> 20),
              " MiB suppression mask on the GPU; run this input on the CPU");
  at::Tensor d_tiles, d_start, d_len, d_mask_off, d_removed_off;
  Layout L{nullptr, nullptr, nullptr, nullptr, nullptr, n};
  if (!single) {
    d_tiles = to_device(tiles, boxes);
    d_start = to_device(g.start, boxes);
    d_len = to_device(g.len, boxes);
    d_mask_off = to_device(mask_off, boxes);
    d_removed_off = to_device(removed_off, boxes);
    L = Layout{d_start.const_data_ptr<int64_t>(), d_len.const_data_ptr<int64_t>(),
               d_mask_off.const_data_ptr<int64_t>(), d_removed_off.const_data_ptr<int64_t>(),
               g.grouped.const_data_ptr<int64_t>(), 0};
  }
  at::Tensor mask = at::empty({std::max<int64_t>(mask_words, 1)}, boxes.options().dtype(at::kLong));
  at::Tensor removed = at::zeros({removed_words}, boxes.options().dtype(at::kLong));
  at::Tensor keep = at::zeros({n}, boxes.options().dtype(at::kByte));
  const at::Tensor grouped_orig = single ? g.order : g.order.index_select(0, g.grouped);
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms_cuda", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor sorted = boxes.index_select(0, grouped_orig).to(c10::CppTypeToScalarType<T>::value).contiguous();
    const int64_t words = (n + kWord - 1) / kWord;  // < 65536: the mask check above bounds n
    const dim3 grid = single ? dim3(static_cast<unsigned>(words), static_cast<unsigned>(words))
                             : dim3(static_cast<unsigned>(tiles.size() / 3));
    mask_kernel<T><<<grid, kWord, 0, stream>>>(
        sorted.const_data_ptr<T>(), single ? nullptr : d_tiles.const_data_ptr<int64_t>(), L,
        nms::gt_threshold<T>(iou_threshold), reinterpret_cast<unsigned long long*>(mask.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  greedy_kernel<<<groups, 256, 0, stream>>>(
      reinterpret_cast<const unsigned long long*>(mask.const_data_ptr<int64_t>()), L,
      reinterpret_cast<unsigned long long*>(removed.mutable_data_ptr<int64_t>()), keep.mutable_data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return g.order.masked_select(keep.to(at::kBool));  // keep is indexed by position in order
}

// ---------------------------------------------------------------- Soft-NMS

// (value, index) ordering of Soft-NMS selection: NaN first (lowest index), then the
// highest value, ties to the lowest index; index INT_MAX is "none".
template <typename T>
__device__ __forceinline__ bool better(T av, int aj, T bv, int bj) {
  if (aj == INT_MAX) return false;
  if (bj == INT_MAX) return true;
  const bool an = av != av, bn = bv != bv;
  if (an != bn) return an;
  if (an || av == bv) return aj < bj;
  return av > bv;
}

template <typename T>
__device__ __forceinline__ void block_argmax(T& v, int& j, T* sv, int* sj) {
  for (int off = 16; off > 0; off >>= 1) {
    const T ov = __shfl_down_sync(0xffffffffu, v, off);
    const int oj = __shfl_down_sync(0xffffffffu, j, off);
    if (better(ov, oj, v, j)) v = ov, j = oj;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sv[warp] = v, sj[warp] = j;
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x >> 5;
    v = lane < nw ? sv[lane] : T(0);
    j = lane < nw ? sj[lane] : INT_MAX;
    for (int off = 16; off > 0; off >>= 1) {
      const T ov = __shfl_down_sync(0xffffffffu, v, off);
      const int oj = __shfl_down_sync(0xffffffffu, j, off);
      if (better(ov, oj, v, j)) v = ov, j = oj;
    }
    if (lane == 0) sv[32] = v, sj[32] = j;
  }
  __syncthreads();
  v = sv[32];
  j = sj[32];
}

// One block per group. K > 0: each thread keeps K boxes in registers (group length <=
// K * blockDim); K == 0: boxes and scores stay in global memory (any length).
template <typename T, int METHOD, int K>
__global__ void __launch_bounds__(1024) soft_nms_kernel(
    const T* __restrict__ boxes, T* __restrict__ scores, const int64_t* __restrict__ start,
    const int64_t* __restrict__ len, T thr, T inv_sigma, T score_thr, int32_t* __restrict__ alive_all,
    int64_t* __restrict__ out_pos, T* __restrict__ out_score, int64_t* __restrict__ out_count) {
  const int64_t c = blockIdx.x, s = start[c];
  const int n = static_cast<int>(len[c]);
  const int tid = threadIdx.x, nt = blockDim.x;
  __shared__ T sv[33];
  __shared__ int sj[33];
  __shared__ T sel[4];
  constexpr int R = K > 0 ? K : 1;
  Box<T> bx[R];
  T sc[R];
  bool alive[R];
  int32_t* alive_g = alive_all + s;
  if constexpr (K > 0) {
#pragma unroll
    for (int k = 0; k < R; ++k) {
      const int j = tid + k * nt;
      alive[k] = j < n;
      if (alive[k]) {
        bx[k] = load_box(boxes, s + j);
        sc[k] = scores[s + j];
        alive[k] = !(sc[k] < score_thr);
      }
    }
  } else {
    for (int j = tid; j < n; j += nt) alive_g[j] = !(scores[s + j] < score_thr);
    __syncthreads();
  }
  int64_t count = 0;
  while (true) {
    T v = T(0);
    int jbest = INT_MAX;
    if constexpr (K > 0) {
#pragma unroll
      for (int k = 0; k < R; ++k)
        if (alive[k] && better(sc[k], tid + k * nt, v, jbest)) v = sc[k], jbest = tid + k * nt;
    } else {
      for (int j = tid; j < n; j += nt)
        if (alive_g[j] && better(scores[s + j], j, v, jbest)) v = scores[s + j], jbest = j;
    }
    block_argmax(v, jbest, sv, sj);
    if (jbest == INT_MAX || (v == v && !(v >= score_thr))) break;
    if (tid == 0) {
      out_pos[s + count] = jbest;
      out_score[s + count] = v;
    }
    ++count;
    if constexpr (K > 0) {
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if (tid + k * nt == jbest) {
          sel[0] = bx[k].x1, sel[1] = bx[k].y1, sel[2] = bx[k].x2, sel[3] = bx[k].y2;
          alive[k] = false;
        }
      }
    } else if (tid == 0) {
      const Box<T> b = load_box(boxes, s + jbest);
      sel[0] = b.x1, sel[1] = b.y1, sel[2] = b.x2, sel[3] = b.y2;
      alive_g[jbest] = 0;
    }
    __syncthreads();
    const Box<T> a{sel[0], sel[1], sel[2], sel[3]};
    if constexpr (K > 0) {
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if (!alive[k]) continue;
        const T iou = box::pair_value<T, box::kIoU, false>(a, bx[k], T(0), T(0), T(0));
        sc[k] = sc[k] * nms::decay<T>(iou, METHOD, thr, inv_sigma);
        alive[k] = !(sc[k] < score_thr);
      }
    } else {
      for (int j = tid; j < n; j += nt) {
        if (!alive_g[j]) continue;
        const T iou = box::pair_value<T, box::kIoU, false>(a, load_box(boxes, s + j), T(0), T(0), T(0));
        const T v2 = scores[s + j] * nms::decay<T>(iou, METHOD, thr, inv_sigma);
        scores[s + j] = v2;
        alive_g[j] = !(v2 < score_thr);
      }
      __syncthreads();
    }
  }
  if (tid == 0) out_count[c] = count;
}

template <typename T, int METHOD>
void launch_soft(int64_t groups, int64_t max_len, cudaStream_t stream, const T* boxes, T* scores,
                 const int64_t* start, const int64_t* len, T thr, T inv_sigma, T score_thr, int32_t* alive,
                 int64_t* out_pos, T* out_score, int64_t* out_count) {
  const int threads = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, (max_len + 31) / 32 * 32)));
#define PVO_SOFT(KK) \
  soft_nms_kernel<T, METHOD, KK><<<groups, threads, 0, stream>>>(boxes, scores, start, len, thr, inv_sigma, \
                                                                 score_thr, alive, out_pos, out_score, out_count)
  if (max_len <= threads) {
    PVO_SOFT(1);
  } else if (max_len <= 4 * threads) {
    PVO_SOFT(4);
  } else if (max_len <= 8 * threads && sizeof(T) == 4) {  // 8 fp64 boxes per thread spill registers
    PVO_SOFT(8);
  } else {
    PVO_SOFT(0);
  }
#undef PVO_SOFT
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> soft_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                                                 const std::optional<at::Tensor>& idxs, double iou_threshold,
                                                 double sigma, double score_threshold, int64_t method) {
  check_inputs("soft_nms", boxes, scores, idxs);
  TORCH_CHECK(method >= 0 && method <= 2, "soft_nms: method must be 0 (gaussian), 1 (linear) or 2 (hard)");
  TORCH_CHECK(sigma > 0, "soft_nms: sigma must be > 0");
  c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) return {at::empty({0}, boxes.options().dtype(at::kLong)), at::empty({0}, scores.options())};
  TORCH_CHECK(n < INT_MAX, "soft_nms: more than 2^31 - 1 boxes");
  Groups g = group_by_category(scores, idxs);
  const int64_t groups = static_cast<int64_t>(g.len.size());
  const int64_t max_len = *std::max_element(g.len.begin(), g.len.end());
  const at::Tensor d_start = to_device(g.start, boxes), d_len = to_device(g.len, boxes);
  const at::Tensor grouped_orig = g.order.index_select(0, g.grouped);
  at::Tensor out_pos = at::empty({n}, boxes.options().dtype(at::kLong));
  at::Tensor out_count = at::empty({groups}, boxes.options().dtype(at::kLong));
  at::Tensor alive = at::empty({n}, boxes.options().dtype(at::kInt));
  at::Tensor out_score;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "soft_nms_cuda", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr auto acc = c10::CppTypeToScalarType<T>::value;
    const at::Tensor b = boxes.index_select(0, grouped_orig).to(acc).contiguous();
    at::Tensor sc = scores.index_select(0, grouped_orig).to(acc).contiguous();
    out_score = at::empty({n}, boxes.options().dtype(acc));
    const T thr = nms::ge_threshold<T>(iou_threshold), score_thr = nms::ge_threshold<T>(score_threshold);
    const T inv_sigma = T(1.0 / sigma);
    auto args = std::make_tuple(b.const_data_ptr<T>(), sc.mutable_data_ptr<T>(), d_start.const_data_ptr<int64_t>(),
                                d_len.const_data_ptr<int64_t>(), thr, inv_sigma, score_thr,
                                alive.mutable_data_ptr<int32_t>(), out_pos.mutable_data_ptr<int64_t>(),
                                out_score.mutable_data_ptr<T>(), out_count.mutable_data_ptr<int64_t>());
    auto run = [&](auto launcher) {
      std::apply([&](auto... a) { launcher(groups, max_len, stream.stream(), a...); }, args);
    };
    switch (method) {
      case nms::kGaussian: run(launch_soft<T, nms::kGaussian>); break;
      case nms::kLinear: run(launch_soft<T, nms::kLinear>); break;
      default: run(launch_soft<T, nms::kHard>); break;
    }
  });
  // Slot k of group c holds its (k - start[c])-th selection; keep the filled slots.
  const at::Tensor seg = at::repeat_interleave(at::arange(groups, out_count.options()), d_len);
  const at::Tensor rank = at::arange(n, out_count.options()) - d_start.index_select(0, seg);
  const at::Tensor filled = rank < out_count.index_select(0, seg);
  const at::Tensor pos = (out_pos.masked_fill(~filled, 0) + d_start.index_select(0, seg)).masked_select(filled);
  return nms::merge_groups(grouped_orig.index_select(0, pos), out_score.masked_select(filled), groups,
                           scores.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvision_ops, CUDA, m) {
  m.impl("nms", &nms_cuda);
  m.impl("soft_nms", &soft_nms_cuda);
}

}  // namespace pyvision_ops

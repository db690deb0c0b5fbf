// NMS family, CUDA kernels.
//
// Boxes are sorted once by score (stable, descending, NaN first) and grouped by
// category (one group when idxs is None), as on the CPU. Hard NMS builds, per
// group only, a bitmask of "IoU > threshold" between each box and the 64-box
// blocks after it (work = sum over groups of n_c^2 / 2), then resolves it greedily
// on the device, one CUDA block per group. Soft-NMS runs one CUDA block per group:
// each step one block-wide max of packed (score, position) keys, then the threads
// decay their boxes, kept in registers in spatial order when the group is small
// enough, so that a selection only visits the warps whose boxes it may overlap.
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
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "common/nms.h"

namespace pyvision_ops {
namespace {

using box::Box;
constexpr int kWord = 64;  // boxes per mask word

// Score order and category groups (see csrc/cpu/nms.cpp); `grouped[k]` is a position
// into `order`; group c is grouped[start[c] : start[c] + len[c]]. Lengths live on the host.
// Without idxs there is one group and `grouped` is left undefined (the identity).
struct Groups {
  at::Tensor order, grouped;
  std::vector<int64_t> start, len;
};

Groups group_by_category(const at::Tensor& scores, const std::optional<at::Tensor>& idxs) {
  Groups g;
  const int64_t n = scores.size(0);
  g.order = std::get<1>(at::sort(scores, /*stable=*/true, /*dim=*/0, /*descending=*/true));
  if (!idxs) {
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

// Box i of p, converted to T.
template <typename T, typename S>
__device__ __forceinline__ Box<T> load_box_as(const S* p, int64_t i) {
  return {static_cast<T>(p[i * 4]), static_cast<T>(p[i * 4 + 1]), static_cast<T>(p[i * 4 + 2]),
          static_cast<T>(p[i * 4 + 3])};
}

template <typename T>
__device__ __forceinline__ Box<T> load_box(const T* p, int64_t i) {
  return load_box_as<T>(p, i);
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
// from a list, or for one group from the grid (x: column block, y: row block). Boxes are
// read in the input's dtype through the score order and converted here.
template <typename S, typename T>
__global__ void mask_kernel(const S* __restrict__ boxes, const int64_t* __restrict__ order,
                            const int64_t* __restrict__ tiles, Layout L, T thr,
                            unsigned long long* __restrict__ mask) {
  int64_t c = 0, rb = blockIdx.y, cb = blockIdx.x;
  if (tiles) {
    const int64_t* tile = tiles + static_cast<int64_t>(blockIdx.x) * 3;
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
    const Box<T> b = load_box_as<T>(boxes, order[L.pos(s + col0 + t)]);
    cols[t * 4] = b.x1, cols[t * 4 + 1] = b.y1, cols[t * 4 + 2] = b.x2, cols[t * 4 + 3] = b.y2;
  }
  __syncthreads();
  const int64_t row = rb * kWord + t;
  if (row >= n) return;
  const Box<T> a = load_box_as<T>(boxes, order[L.pos(s + row)]);
  unsigned long long bits = 0;
  for (int j = (rb == cb ? t + 1 : 0); j < ncols; ++j) {
    const Box<T> b{cols[j * 4], cols[j * 4 + 1], cols[j * 4 + 2], cols[j * 4 + 3]};
    if (box::pair_value<T, box::kIoU, false>(a, b, T(0), T(0), T(0)) > thr) bits |= 1ull << j;
  }
  mask[L.moff(c) + row * words + cb] = bits;
}

// One block per group: walk the 64-box blocks in order; thread 0 resolves the block's
// own boxes from the diagonal words (in shared memory), then all threads OR the masks
// of the kept boxes into the "removed" words of the later blocks. Writes every keep flag.
__global__ void greedy_kernel(const unsigned long long* __restrict__ mask, Layout L,
                              unsigned long long* __restrict__ removed_all, bool* __restrict__ keep) {
  const int64_t c = blockIdx.x;
  const int64_t s = L.s(c), n = L.n(c), words = (n + kWord - 1) / kWord;
  const unsigned long long* m = mask + L.moff(c);
  unsigned long long* removed = removed_all + L.roff(c);
  __shared__ unsigned long long diag[kWord];
  __shared__ unsigned long long kept;
  __shared__ int kept_rows[kWord], n_kept;
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) removed[w] = 0;
  __syncthreads();
  for (int64_t rb = 0; rb < words; ++rb) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kWord), n - rb * kWord));
    if (threadIdx.x < rows) diag[threadIdx.x] = m[(rb * kWord + threadIdx.x) * words + rb];
    __syncthreads();
    if (threadIdx.x == 0) {
      // Jump from one surviving row to the next (rows in increasing order; diag[r] only has
      // bits above r): as many steps as kept rows, not 64.
      const unsigned long long in_block = rows == kWord ? ~0ull : (1ull << rows) - 1;
      unsigned long long rem = removed[rb], k = 0, cand = ~rem & in_block;
      int nk = 0;
      while (cand) {
        const int r = __ffsll(static_cast<long long>(cand)) - 1;
        k |= 1ull << r;
        rem |= diag[r];
        kept_rows[nk++] = r;
        cand = ~rem & in_block & ~((2ull << r) - 1);  // rows above r still standing (0 after r = 63)
      }
      kept = k;
      n_kept = nk;
    }
    __syncthreads();
    const unsigned long long k = kept;
    const int nk = n_kept;
    if (threadIdx.x < rows) keep[L.pos(s + rb * kWord + threadIdx.x)] = (k >> threadIdx.x) & 1ull;
    // OR the kept rows' masks into the later words; a counted loop, 4 independent loads at a
    // time, so that the loads overlap instead of waiting on each other.
    const unsigned long long* block_rows = m + rb * kWord * words;
    for (int64_t w = rb + 1 + threadIdx.x; nk > 0 && w < words; w += blockDim.x) {  // nothing kept: nothing to OR
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
  nms::check_inputs("nms", boxes, scores, idxs, iou_threshold);
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
  }
  TORCH_CHECK(mask_words <= (int64_t(1) << 31),
              "nms: a category with ", std::to_string(*std::max_element(g.len.begin(), g.len.end())),
              " boxes needs a ", std::to_string(mask_words * 8 >> 20),
              " MiB suppression mask on the GPU; run this input on the CPU");
  for (int64_t c = 0; c < groups && !single; ++c) {  // after the check: the list grows as the mask
    const int64_t words = (g.len[c] + kWord - 1) / kWord;
    for (int64_t rb = 0; rb < words; ++rb)
      for (int64_t cb = rb; cb < words; ++cb) tiles.insert(tiles.end(), {c, rb, cb});
  }
  at::Tensor tables;  // start, len, mask_off, removed_off, tiles: one copy to the device
  Layout L{nullptr, nullptr, nullptr, nullptr, nullptr, n};
  if (!single) {
    std::vector<int64_t> host;
    host.reserve(4 * groups + tiles.size());
    for (const auto* v : {&g.start, &g.len, &mask_off, &removed_off, &tiles})
      host.insert(host.end(), v->begin(), v->end());
    tables = to_device(host, boxes);
    const int64_t* t = tables.const_data_ptr<int64_t>();
    L = Layout{t, t + groups, t + 2 * groups, t + 3 * groups, g.grouped.const_data_ptr<int64_t>(), 0};
  }
  // Few device ops (what small inputs pay for): the kernels gather and convert the boxes
  // and zero their own buffers.
  at::Tensor mask = at::empty({std::max<int64_t>(mask_words, 1)}, boxes.options().dtype(at::kLong));
  at::Tensor removed = at::empty({removed_words}, boxes.options().dtype(at::kLong));
  at::Tensor keep = at::empty({n}, boxes.options().dtype(at::kBool));
  const at::Tensor input = boxes.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "nms_cuda", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const int64_t words = (n + kWord - 1) / kWord;  // < 65536: the mask check above bounds n
    const dim3 grid = single ? dim3(static_cast<unsigned>(words), static_cast<unsigned>(words))
                             : dim3(static_cast<unsigned>(tiles.size() / 3));
    mask_kernel<scalar_t, T><<<grid, kWord, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), g.order.const_data_ptr<int64_t>(),
        single ? nullptr : tables.const_data_ptr<int64_t>() + 4 * groups, L, nms::gt_threshold<T>(iou_threshold),
        reinterpret_cast<unsigned long long*>(mask.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  greedy_kernel<<<groups, 256, 0, stream>>>(
      reinterpret_cast<const unsigned long long*>(mask.const_data_ptr<int64_t>()), L,
      reinterpret_cast<unsigned long long*>(removed.mutable_data_ptr<int64_t>()), keep.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return g.order.masked_select(keep);  // keep is indexed by position in order
}

// ---------------------------------------------------------------- Soft-NMS

// Selection key of a live box: words compared as unsigned, most significant first, so a
// larger key is a better candidate: NaN scores first, then higher scores (-0 equal to +0),
// ties to the lower position in the group (the last word is ~position). A dead box has
// the all-zero key, below every live one. fp32 scores take one word, fp64 two.
template <typename T>
struct Key {
  static constexpr int W = sizeof(T) == 4 ? 2 : 3;
  uint32_t w[W];
};

template <typename T>
__device__ __forceinline__ Key<T> dead_key() {
  Key<T> k;
#pragma unroll
  for (int i = 0; i < Key<T>::W; ++i) k.w[i] = 0u;
  return k;
}

template <typename T>
__device__ __forceinline__ Key<T> live_key(T v, int pos) {
  Key<T> k;
  if constexpr (sizeof(T) == 4) {
    uint32_t b = v == 0.f ? 0u : __float_as_uint(v);
    b = (b >> 31) ? ~b : (b | 0x80000000u);
    k.w[0] = v != v ? 0xffffffffu : b;
  } else {
    unsigned long long b = v == 0.0 ? 0ull : static_cast<unsigned long long>(__double_as_longlong(v));
    b = (b >> 63) ? ~b : (b | (1ull << 63));
    if (v != v) b = ~0ull;
    k.w[0] = static_cast<uint32_t>(b >> 32);
    k.w[1] = static_cast<uint32_t>(b);
  }
  k.w[Key<T>::W - 1] = ~static_cast<uint32_t>(pos);
  return k;
}

// Lexicographic a > b, without branches (bitwise on the word comparisons).
template <typename T>
__device__ __forceinline__ bool key_greater(const Key<T>& a, const Key<T>& b) {
  bool gt = false, eq = true;
#pragma unroll
  for (int i = 0; i < Key<T>::W; ++i) {
    gt = gt | (eq & (a.w[i] > b.w[i]));
    eq = eq & (a.w[i] == b.w[i]);
  }
  return gt;
}

template <typename T>
__device__ __forceinline__ bool key_equal(const Key<T>& a, const Key<T>& b) {
  bool eq = true;
#pragma unroll
  for (int i = 0; i < Key<T>::W; ++i) eq = eq && a.w[i] == b.w[i];
  return eq;
}

// The largest key of the warp, in every lane; all 32 lanes call it.
template <typename T>
__device__ __forceinline__ Key<T> warp_max(Key<T> k) {
#if __CUDA_ARCH__ >= 800
  bool tied = true;  // word by word: the max among the lanes still equal to the max so far
#pragma unroll
  for (int i = 0; i < Key<T>::W; ++i) {
    const uint32_t m = __reduce_max_sync(0xffffffffu, tied ? k.w[i] : 0u);
    tied = tied && k.w[i] == m;
    k.w[i] = m;
  }
#else
  for (int off = 16; off > 0; off >>= 1) {
    Key<T> o;
#pragma unroll
    for (int i = 0; i < Key<T>::W; ++i) o.w[i] = __shfl_xor_sync(0xffffffffu, k.w[i], off);
    if (key_greater(o, k)) k = o;
  }
#endif
  return k;
}

// The largest key of the block, in every thread; every thread calls it with its warp's
// warp_max. One barrier: callers alternate between two `slots` buffers, so a warp that
// runs ahead never overwrites the slots a slower warp is still reading.
template <typename T>
__device__ __forceinline__ Key<T> block_max(const Key<T>& warp_best, uint32_t (*slots)[32]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < Key<T>::W; ++i) slots[i][warp] = warp_best.w[i];
  }
  __syncthreads();
  Key<T> k;
#pragma unroll
  for (int i = 0; i < Key<T>::W; ++i) k.w[i] = lane < nw ? slots[i][lane] : 0u;
  return warp_max(k);
}

// Union of the warp's boxes in every lane (fmin/fmax skip NaN coordinates: such a box
// has a NaN IoU, which never decays it).
template <typename T>
__device__ __forceinline__ Box<T> warp_union(Box<T> b) {
  for (int off = 16; off > 0; off >>= 1) {
    b.x1 = fmin(b.x1, __shfl_xor_sync(0xffffffffu, b.x1, off));
    b.y1 = fmin(b.y1, __shfl_xor_sync(0xffffffffu, b.y1, off));
    b.x2 = fmax(b.x2, __shfl_xor_sync(0xffffffffu, b.x2, off));
    b.y2 = fmax(b.y2, __shfl_xor_sync(0xffffffffu, b.y2, off));
  }
  return b;
}

template <typename T, int METHOD>
__device__ __forceinline__ T decayed(T score, const Box<T>& a, const Box<T>& b, T thr, T inv_sigma) {
  return nms::decay_score(score,
                          nms::decay<T>(box::pair_value<T, box::kIoU, false>(a, b, T(0), T(0), T(0)), METHOD, thr,
                                        inv_sigma));
}

// Best live box of a thread's K register slots (`pos` strided by 32: the thread's entries).
// Every slot's position is read and its key built whether it is alive or not, so that the
// K shared loads issue together and the chain is selects, not branches.
template <typename T, int K>
__device__ __forceinline__ Key<T> lane_best(const T (&sc)[K], uint32_t alive, const int32_t* pos, int& slot) {
  int32_t at[K];
#pragma unroll
  for (int k = 0; k < K; ++k) at[k] = pos[k * 32];
  Key<T> best = dead_key<T>();
  slot = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const Key<T> key = live_key(sc[k], at[k]);
    const bool take = (alive >> k & 1u) != 0u && key_greater(key, best);
#pragma unroll
    for (int i = 0; i < Key<T>::W; ++i) best.w[i] = take ? key.w[i] : best.w[i];
    slot = take ? k : slot;
  }
  return best;
}

// Most threads of a soft_nms_kernel block with K register slots (a box and a score each) per
// thread: more would make ptxas spill them for sm_90 (-Xptxas -v; fp64 with 8 slots spills
// 40-72 bytes even at 512).
template <typename T, int K>
constexpr int soft_threads() {
  if (K <= 1) return 1024;
  if (sizeof(T) == 4) return K <= 4 ? 1024 : K <= 8 ? 768 : 512;
  return 512;
}

// One block per group; each step one block-wide max of the keys (one barrier), then the
// decay. K > 0: the group's boxes sit in registers, K per thread, in the spatial order
// `place` gives, 32 placements (a chunk) per warp and slot: warp w, slot k holds chunk
// wK + k, or with `spread` chunk kW + w (W warps); a selection visits only the warps, and
// in them the slots, whose union box it may overlap: the other boxes keep their scores bit
// for bit. A warp walks its slots one after another, so a selection waits at least for
// the warp that overlaps the most slots: by chunk order, the few neighbouring chunks a box
// overlaps sit in one warp (on the benchmark's detections ~6.5 slots, as a CPU simulation
// of this layout counts); spread, in as many warps (~2.6). K == 0: boxes and scores stay
// in global memory (any length), thread t owns positions t, t + nt, ...
template <typename T, int METHOD, int K>
__global__ void __launch_bounds__(soft_threads<T, K>()) soft_nms_kernel(
    const T* __restrict__ boxes, T* __restrict__ scores, const int64_t* __restrict__ start,
    const int64_t* __restrict__ len, const int32_t* __restrict__ place, T thr, T inv_sigma, T score_thr,
    bool spread, int32_t* __restrict__ alive_all, int64_t* __restrict__ out_pos, T* __restrict__ out_score,
    int64_t* __restrict__ out_count) {
  const int64_t c = blockIdx.x, s = start[c];
  const int n = static_cast<int>(len[c]);
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
  const bool skip = !(METHOD == nms::kHard && thr <= T(0));  // that one drops boxes at IoU 0 too
  __shared__ uint32_t slots[2][Key<T>::W][32];
  int par = 0;
  int64_t count = 0;
  if constexpr (K > 0) {
    __shared__ int32_t pos_of[K * soft_threads<T, K>()];  // placement -> position; each thread reads its own
    __shared__ Box<T> slot_union[32 * K];
    const T inf = T(INFINITY);
    Box<T> bx[K];
    T sc[K];
    uint32_t alive = 0;
    Box<T> warp_u{inf, inf, -inf, -inf};
    int32_t* pos = pos_of + warp * K * 32 + lane;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int i = (spread ? k * (nt >> 5) + warp : warp * K + k) * 32 + lane;
      Box<T> u{inf, inf, -inf, -inf};
      bx[k] = {T(0), T(0), T(0), T(0)};
      sc[k] = T(0);
      pos[k * 32] = 0;
      if (i < n) {
        const int p = static_cast<int>(place[s + i] - s);
        pos[k * 32] = p;
        bx[k] = load_box(boxes, s + p);
        sc[k] = scores[s + p];
        if (!(sc[k] < score_thr)) {
          alive |= 1u << k;
          u = bx[k];
        }
      }
      u = warp_union(u);
      if (lane == 0) slot_union[warp * K + k] = u;
      warp_u = {fmin(warp_u.x1, u.x1), fmin(warp_u.y1, u.y1), fmax(warp_u.x2, u.x2), fmax(warp_u.y2, u.y2)};
    }
    __syncwarp();
    int lslot;
    Key<T> lbest = lane_best<T, K>(sc, alive, pos, lslot);
    Key<T> wbest = warp_max(lbest);
    while (true) {
      const Key<T> best = block_max(wbest, slots[par]);
      par ^= 1;
      if (best.w[0] == 0u) break;
      const int j = static_cast<int>(~best.w[Key<T>::W - 1]);
      const Box<T> a = load_box(boxes, s + j);
      bool touched = !skip || nms::may_overlap(a, warp_u);
      if (key_equal(wbest, best)) {  // the selected box is this warp's
        touched = true;
        if (key_equal(lbest, best)) {
#pragma unroll
          for (int k = 0; k < K; ++k)
            if (k == lslot) out_score[s + count] = sc[k];
          out_pos[s + count] = j;
          alive &= ~(1u << lslot);
        }
      }
      ++count;
      if (touched) {  // warp-uniform, as is every condition on a slot union
        // The slots `a` may overlap, all tested before any decay: their shared loads issue
        // together instead of one per step of the walk. Not with 16 slots, nor with 8 in fp64
        // or for the hard method: there ptxas spills more (-Xptxas -v, sm_90), so each slot is
        // tested on its step.
        constexpr bool kMaskFirst = K <= 4 || (K == 8 && sizeof(T) == 4 && METHOD != nms::kHard);
        uint32_t ov = ~0u;
        if constexpr (kMaskFirst) {
#pragma unroll
          for (int k = 0; k < K; ++k)
            if (skip && !nms::may_overlap(a, slot_union[warp * K + k])) ov &= ~(1u << k);
        }
#pragma unroll
        for (int k = 0; k < K; ++k) {
          if (kMaskFirst ? !(ov >> k & 1u) : skip && !nms::may_overlap(a, slot_union[warp * K + k])) continue;
          if (alive >> k & 1u) {
            sc[k] = decayed<T, METHOD>(sc[k], a, bx[k], thr, inv_sigma);
            if (sc[k] < score_thr) alive &= ~(1u << k);
          }
        }
        lbest = lane_best<T, K>(sc, alive, pos, lslot);
        wbest = warp_max(lbest);
      }
    }
  } else {
    int32_t* alive_g = alive_all + s;
    Key<T> lbest = dead_key<T>();
    for (int64_t j = tid; j < n; j += nt) {
      const T v = scores[s + j];
      alive_g[j] = !(v < score_thr);
      if (alive_g[j]) {
        const Key<T> key = live_key(v, static_cast<int>(j));
        if (key_greater(key, lbest)) lbest = key;
      }
    }
    while (true) {
      const Key<T> best = block_max(warp_max(lbest), slots[par]);
      par ^= 1;
      if (best.w[0] == 0u) break;
      const int jb = static_cast<int>(~best.w[Key<T>::W - 1]);
      const Box<T> a = load_box(boxes, s + jb);
      if (jb % nt == tid) {  // only its owner ever touches position jb
        out_pos[s + count] = jb;
        out_score[s + count] = scores[s + jb];
        alive_g[jb] = 0;
      }
      ++count;
      lbest = dead_key<T>();
      for (int64_t j = tid; j < n; j += nt) {
        if (!alive_g[j]) continue;
        T v = scores[s + j];
        const Box<T> b = load_box(boxes, s + j);
        if (!skip || nms::may_overlap(a, b)) {
          v = decayed<T, METHOD>(v, a, b, thr, inv_sigma);
          scores[s + j] = v;
          if (v < score_thr) {
            alive_g[j] = 0;
            continue;
          }
        }
        const Key<T> key = live_key(v, static_cast<int>(j));
        if (key_greater(key, lbest)) lbest = key;
      }
    }
  }
  if (tid == 0) out_count[c] = count;
}

// Per box (in group order): its group index above the Morton code of its centre, whose
// per-axis coordinate is the top 16 bits of the float's order-preserving integer image
// (monotone, finer near 0); NaN centres last. Sorting by it puts each group in spatial order.
__device__ __forceinline__ uint32_t order16(float f) {
  const uint32_t u = __float_as_uint(f);
  return ((u >> 31) ? ~u : (u | 0x80000000u)) >> 16;
}

template <typename T>
__global__ void morton_kernel(const T* __restrict__ boxes, const int64_t* __restrict__ seg, int64_t n,
                              int64_t* __restrict__ keys) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const Box<T> b = load_box(boxes, i);
  const float cx = static_cast<float>(b.x1 / 2 + b.x2 / 2), cy = static_cast<float>(b.y1 / 2 + b.y2 / 2);
  const uint32_t code =
      cx == cx && cy == cy ? nms::spread16(order16(cx)) | (nms::spread16(order16(cy)) << 1) : 0xffffffffu;
  keys[i] = (seg ? seg[i] << 32 : int64_t(0)) | static_cast<int64_t>(code);
}

// ---------------------------------------------------------------- Soft-NMS by rounds

// Opt-in (PYVISION_OPS_SOFT_NMS_KERNEL=rounds) while no GPU run has timed it: Soft-NMS as
// rounds of local maxima, one block per group. Two boxes interact when the selection of
// one can change the other's score (soft_interacts). With a positive score threshold a
// decay only lowers scores, so a live box whose key beats every live box it interacts
// with is selected before all of them in the sequential order, with its current score:
// each round selects every such box at once, then decays the live boxes they interact
// with (per box in Morton order of the selected ones; the sequential order may multiply
// the same factors in another order: same results to rounding, as exp already differs
// between devices). The selections, sorted by (score descending, position), are the
// sequential ones in their order. On the benchmark's detections (N = 5000, 1276
// selections) that is 107 rounds (a float64 model of it, checked against the CPU op).
// Boxes are in Morton order within the group (`place`), 64 to a chunk; a box's
// neighbours are bits of its row of a mask, whose words are computed only for the chunks
// whose union boxes meet its own (the rest are zero).
constexpr int kRoundsMaxChunks = 256;  // groups of up to 16384 boxes
constexpr int kFewWinners = 64;        // below this many selections a round tests them all

// True when the selection of one of `a`, `b` may decay the other (the decay factor can
// differ from exactly 1): IoU > 0, or IoU >= thr for the linear and hard methods with
// thr > 0. Callers pass the pair in one order, so the relation is symmetric.
template <typename T, int METHOD>
__device__ __forceinline__ bool soft_interacts(const Box<T>& a, const Box<T>& b, T thr) {
  const T iou = box::pair_value<T, box::kIoU, false>(a, b, T(0), T(0), T(0));
  return METHOD != nms::kGaussian && thr > T(0) ? iou >= thr : iou > T(0);
}

// Per group c (rows of the tables `off`: mask words, chunk lists and chunk counts before
// it, `groups` entries each); every per-box array is indexed s + Morton rank except
// `selected` and `out_score`, indexed by position in the group's score order.
template <typename T, int METHOD>
__global__ void __launch_bounds__(1024) soft_rounds_kernel(
    const T* __restrict__ boxes, const T* __restrict__ scores, const int64_t* __restrict__ start,
    const int64_t* __restrict__ len, const int32_t* __restrict__ place, const int64_t* __restrict__ off,
    int64_t groups, T thr, T inv_sigma, T score_thr, Box<T>* __restrict__ mbox, T* __restrict__ msc,
    int32_t* __restrict__ state, int32_t* __restrict__ win, int32_t* __restrict__ rank_of,
    int32_t* __restrict__ winners, unsigned long long* __restrict__ mask_all, int32_t* __restrict__ clist_all,
    int32_t* __restrict__ ccount_all, bool* __restrict__ selected, T* __restrict__ out_score) {
  constexpr int kLive = 0, kDead = 1, kSelected = 2;
  const int64_t c = blockIdx.x, s = start[c];
  const int n = static_cast<int>(len[c]), words = (n + kWord - 1) / kWord;
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
  unsigned long long* mask = mask_all + off[c];
  int32_t* clist = clist_all + off[groups + c];
  int32_t* ccount = ccount_all + off[2 * groups + c];
  __shared__ Box<T> chunk_u[kRoundsMaxChunks];
  __shared__ uint32_t slots[2][Key<T>::W][32];
  __shared__ int32_t warp_total[32];
  // Thread t owns the Morton ranks [lo, hi): contiguous, so the winners list below comes
  // out in Morton order.
  const int per = (n + nt - 1) / nt, lo = min(n, tid * per), hi = min(n, lo + per);
  const T inf = T(INFINITY);

  for (int m = tid; m < n; m += nt) {
    const int p = place[s + m] - static_cast<int>(s);
    mbox[s + m] = load_box(boxes, s + p);
    msc[s + m] = scores[s + p];
    state[s + m] = msc[s + m] < score_thr ? kDead : kLive;  // NaN scores stay
    win[s + m] = 0;
    rank_of[s + p] = m;
    selected[s + p] = false;
  }
  __syncthreads();
  // Union box of each chunk's live boxes (warp per chunk).
  for (int cb = warp; cb < words; cb += nw) {
    Box<T> u{inf, inf, -inf, -inf};
    for (int m = cb * kWord + lane; m < min(n, (cb + 1) * kWord); m += 32)
      if (state[s + m] == kLive) {
        const Box<T> b = mbox[s + m];
        u = {fmin(u.x1, b.x1), fmin(u.y1, b.y1), fmax(u.x2, b.x2), fmax(u.y2, b.y2)};
      }
    u = warp_union(u);
    if (lane == 0) chunk_u[cb] = u;
  }
  __syncthreads();
  // Per chunk, the chunks whose unions meet it, in increasing order.
  for (int rb = tid; rb < words; rb += nt) {
    int k = 0;
    for (int cb = 0; cb < words; ++cb)
      if (nms::may_overlap(chunk_u[rb], chunk_u[cb])) clist[rb * words + k++] = cb;
    ccount[rb] = k;
  }
  __syncthreads();
  // Mask words of the listed chunk pairs (the others stay zero); a warp per row chunk, two
  // rows per lane. The pair is tested in Morton order, lower rank first.
  for (int rb = warp; rb < words; rb += nw) {
    for (int k = 0; k < ccount[rb]; ++k) {
      const int cb = clist[rb * words + k];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = rb * kWord + h * 32 + lane;
        if (r >= n) continue;
        const Box<T> a = mbox[s + r];
        unsigned long long bits = 0;
        for (int j = 0; j < min(kWord, n - cb * kWord); ++j) {
          const int q = cb * kWord + j;
          if (q == r) continue;
          const Box<T> b = mbox[s + q];
          if (r < q ? soft_interacts<T, METHOD>(a, b, thr) : soft_interacts<T, METHOD>(b, a, thr)) bits |= 1ull << j;
        }
        mask[static_cast<int64_t>(r) * words + cb] = bits;
      }
    }
  }
  __syncthreads();

  auto key_of = [&](int m) { return live_key(msc[s + m], place[s + m] - static_cast<int>(s)); };
  auto linked = [&](int m, int q) { return (mask[static_cast<int64_t>(m) * words + (q >> 6)] >> (q & 63)) & 1ull; };
  int par = 0;
  for (int round = 1;; ++round) {
    // The best live key: always selected this round, and a box that interacts with it is not.
    Key<T> mine = dead_key<T>();
    for (int m = lo; m < hi; ++m) {
      if (state[s + m] != kLive) continue;
      const Key<T> k = key_of(m);
      if (key_greater(k, mine)) mine = k;
    }
    const Key<T> best = block_max(warp_max(mine), slots[par]);
    par ^= 1;
    if (best.w[0] == 0u) break;  // nothing live
    const int top = rank_of[s + static_cast<int>(~best.w[Key<T>::W - 1])];
    // Local maxima: no live box it interacts with has a larger key.
    int count = 0;
    for (int m = lo; m < hi; ++m) {
      if (state[s + m] != kLive) continue;
      bool wins = m == top;
      if (!wins && !linked(m, top)) {
        const Key<T> km = key_of(m);
        wins = true;
        const int rb = m / kWord;
        for (int k = 0; wins && k < ccount[rb]; ++k) {
          const int cb = clist[rb * words + k];
          for (unsigned long long w = mask[static_cast<int64_t>(m) * words + cb]; w; w &= w - 1) {
            const int q = cb * kWord + __ffsll(static_cast<long long>(w)) - 1;
            if (state[s + q] == kLive && key_greater(key_of(q), km)) {
              wins = false;
              break;
            }
          }
        }
      }
      if (wins) {
        win[s + m] = round;
        ++count;
      }
    }
    // The round's winners in Morton order: an exclusive scan of the per-thread counts.
    int incl = count;
    for (int d = 1; d < 32; d <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, d);
      if (lane >= d) incl += v;
    }
    if (lane == 31) warp_total[warp] = incl;
    __syncthreads();
    int before = incl - count, total = 0;
    for (int w = 0; w < nw; ++w) {
      before += w < warp ? warp_total[w] : 0;
      total += warp_total[w];
    }
    for (int m = lo; m < hi && count > 0; ++m)
      if (state[s + m] == kLive && win[s + m] == round) winners[s + before++] = m;
    __syncthreads();
    // Decay every other live box by the winners it interacts with, in Morton order: from
    // the winners list when it is short, else from the box's own neighbours (same order).
    for (int m = lo; m < hi; ++m) {
      if (state[s + m] != kLive) continue;
      if (win[s + m] == round) {
        state[s + m] = kSelected;
        continue;
      }
      const Box<T> b = mbox[s + m];
      T v = msc[s + m];
      if (total <= kFewWinners) {
        for (int i = 0; i < total; ++i) {
          const int q = winners[s + i];
          if (linked(m, q)) v = decayed<T, METHOD>(v, mbox[s + q], b, thr, inv_sigma);
        }
      } else {
        const int rb = m / kWord;
        for (int k = 0; k < ccount[rb]; ++k) {
          const int cb = clist[rb * words + k];
          for (unsigned long long w = mask[static_cast<int64_t>(m) * words + cb]; w; w &= w - 1) {
            const int q = cb * kWord + __ffsll(static_cast<long long>(w)) - 1;
            if (win[s + q] == round) v = decayed<T, METHOD>(v, mbox[s + q], b, thr, inv_sigma);
          }
        }
      }
      msc[s + m] = v;
      if (v < score_thr) state[s + m] = kDead;
    }
    __syncthreads();
  }
  for (int m = tid; m < n; m += nt) {
    if (state[s + m] != kSelected) continue;
    const int p = place[s + m] - static_cast<int>(s);
    selected[s + p] = true;
    out_score[s + p] = msc[s + m];
  }
}

// Register slots per thread for groups of up to `max_len` boxes (0: global memory).
template <typename T>
int soft_slots(int64_t max_len) {
  if (max_len <= soft_threads<T, 1>()) return 1;
  if (max_len <= 4 * soft_threads<T, 4>()) return 4;
  if (max_len <= 8 * soft_threads<T, 8>()) return 8;
  if (sizeof(T) == 4 && max_len <= 16 * soft_threads<T, 16>()) return 16;
  return 0;
}

template <typename T, int METHOD>
void launch_soft(int slots, int64_t groups, int64_t max_len, cudaStream_t stream, const T* boxes, T* scores,
                 const int64_t* start, const int64_t* len, const int32_t* place, T thr, T inv_sigma, T score_thr,
                 bool spread, int32_t* alive, int64_t* out_pos, T* out_score, int64_t* out_count) {
  const int64_t per_thread = slots > 0 ? (max_len + slots - 1) / slots : max_len;
  const int64_t threads_needed = std::max<int64_t>(32, (per_thread + 31) / 32 * 32);
  // soft_slots keeps a register layout's threads within its bound; the global one takes them all.
#define PVO_SOFT(KK)                                                                                      \
  soft_nms_kernel<T, METHOD, KK>                                                                          \
      <<<groups, static_cast<int>(std::min<int64_t>(soft_threads<T, KK>(), threads_needed)), 0, stream>>>( \
          boxes, scores, start, len, place, thr, inv_sigma, score_thr, spread, alive, out_pos, out_score, out_count)
  switch (slots) {
    case 1: PVO_SOFT(1); break;
    case 4: PVO_SOFT(4); break;
    case 8: PVO_SOFT(8); break;
    case 16:
      if constexpr (sizeof(T) == 4) PVO_SOFT(16);
      break;
    default: PVO_SOFT(0); break;
  }
#undef PVO_SOFT
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> soft_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                                                 const std::optional<at::Tensor>& idxs, double iou_threshold,
                                                 double sigma, double score_threshold, int64_t method) {
  nms::check_inputs("soft_nms", boxes, scores, idxs, iou_threshold);
  nms::check_soft_args(sigma, score_threshold, method);
  c10::cuda::CUDAGuard guard(boxes.device());
  const int64_t n = boxes.size(0);
  if (n == 0) return {at::empty({0}, boxes.options().dtype(at::kLong)), at::empty({0}, scores.options())};
  TORCH_CHECK(n < INT_MAX, "soft_nms: more than 2^31 - 1 boxes");
  // PYVISION_OPS_SOFT_NMS_KERNEL: "spread" (soft_nms_kernel's other chunk placement) or
  // "rounds" (soft_rounds_kernel, where it applies); same results. Both are off by default
  // until a GPU run has timed them (benchmarks/soft_nms_scaling.py).
  const char* variant_env = std::getenv("PYVISION_OPS_SOFT_NMS_KERNEL");
  const std::string variant = variant_env ? variant_env : "";
  const bool spread = variant == "spread";
  Groups g = group_by_category(scores, idxs);
  const int64_t groups = static_cast<int64_t>(g.len.size());
  const int64_t max_len = *std::max_element(g.len.begin(), g.len.end());
  // Rounds need decays that only lower scores (a positive score threshold) and interactions
  // that need overlap (not the hard method at a threshold <= 0); mask words, chunk lists
  // and chunk counts are laid out per group.
  std::vector<int64_t> round_off(3 * groups);
  int64_t mask_words = 0, list_words = 0, chunk_words = 0;
  for (int64_t c = 0; c < groups; ++c) {
    const int64_t words = (g.len[c] + kWord - 1) / kWord;
    round_off[c] = mask_words, round_off[groups + c] = list_words, round_off[2 * groups + c] = chunk_words;
    mask_words += g.len[c] * words, list_words += words * words, chunk_words += words;
  }
  const bool rounds = variant == "rounds" && score_threshold > 0 && !(method == nms::kHard && !(iou_threshold > 0)) &&
                      max_len <= kWord * kRoundsMaxChunks && mask_words <= (int64_t(1) << 26);
  const at::Tensor d_start = to_device(g.start, boxes), d_len = to_device(g.len, boxes);
  const at::Tensor grouped_orig = idxs ? g.order.index_select(0, g.grouped) : g.order;
  const at::Tensor seg = at::repeat_interleave(at::arange(groups, d_len.options()), d_len);
  at::Tensor out_pos = at::empty({n}, boxes.options().dtype(at::kLong));
  at::Tensor out_count = at::empty({groups}, boxes.options().dtype(at::kLong));
  at::Tensor alive = at::empty({n}, boxes.options().dtype(at::kInt));
  at::Tensor out_score, place, selected;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(), "soft_nms_cuda", [&] {
    using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr auto acc = c10::CppTypeToScalarType<T>::value;
    const at::Tensor b = boxes.index_select(0, grouped_orig).to(acc).contiguous();
    at::Tensor sc = scores.index_select(0, grouped_orig).to(acc).contiguous();
    out_score = at::empty({n}, boxes.options().dtype(acc));
    const int slots = rounds ? 0 : soft_slots<T>(max_len);
    if (slots > 0 || rounds) {
      at::Tensor keys = at::empty({n}, boxes.options().dtype(at::kLong));
      morton_kernel<T><<<(n + 255) / 256, 256, 0, stream.stream()>>>(
          b.const_data_ptr<T>(), groups > 1 ? seg.const_data_ptr<int64_t>() : nullptr, n,
          keys.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      place = std::get<1>(at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false)).to(at::kInt);
    }
    const T thr = nms::ge_threshold<T>(iou_threshold), score_thr = nms::ge_threshold<T>(score_threshold);
    const T inv_sigma = nms::inv_sigma<T>(sigma);
    if (rounds) {
      const at::Tensor off = to_device(round_off, boxes);
      const auto i32 = boxes.options().dtype(at::kInt);
      at::Tensor mbox = at::empty({4 * n}, boxes.options().dtype(acc)), msc = at::empty({n}, mbox.options());
      at::Tensor win = at::empty({n}, i32), rank_of = at::empty({n}, i32), winners = at::empty({n}, i32);
      at::Tensor mask = at::zeros({std::max<int64_t>(mask_words, 1)}, boxes.options().dtype(at::kLong));
      at::Tensor clist = at::empty({list_words}, i32), ccount = at::empty({chunk_words}, i32);
      selected = at::empty({n}, boxes.options().dtype(at::kBool));
      const int threads = static_cast<int>(std::min<int64_t>(1024, (max_len + 31) / 32 * 32));
      auto launch = [&](auto kernel) {
        kernel<<<groups, threads, 0, stream.stream()>>>(
            b.const_data_ptr<T>(), sc.const_data_ptr<T>(), d_start.const_data_ptr<int64_t>(),
            d_len.const_data_ptr<int64_t>(), place.const_data_ptr<int32_t>(), off.const_data_ptr<int64_t>(), groups,
            thr, inv_sigma, score_thr, reinterpret_cast<Box<T>*>(mbox.mutable_data_ptr<T>()),
            msc.mutable_data_ptr<T>(), alive.mutable_data_ptr<int32_t>(), win.mutable_data_ptr<int32_t>(),
            rank_of.mutable_data_ptr<int32_t>(), winners.mutable_data_ptr<int32_t>(),
            reinterpret_cast<unsigned long long*>(mask.mutable_data_ptr<int64_t>()), clist.mutable_data_ptr<int32_t>(),
            ccount.mutable_data_ptr<int32_t>(), selected.mutable_data_ptr<bool>(), out_score.mutable_data_ptr<T>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      switch (method) {
        case nms::kGaussian: launch(soft_rounds_kernel<T, nms::kGaussian>); break;
        case nms::kLinear: launch(soft_rounds_kernel<T, nms::kLinear>); break;
        default: launch(soft_rounds_kernel<T, nms::kHard>); break;
      }
      return;
    }
    auto args = std::make_tuple(b.const_data_ptr<T>(), sc.mutable_data_ptr<T>(), d_start.const_data_ptr<int64_t>(),
                                d_len.const_data_ptr<int64_t>(),
                                slots > 0 ? place.const_data_ptr<int32_t>() : nullptr, thr, inv_sigma,
                                score_thr, spread, alive.mutable_data_ptr<int32_t>(),
                                out_pos.mutable_data_ptr<int64_t>(), out_score.mutable_data_ptr<T>(),
                                out_count.mutable_data_ptr<int64_t>());
    auto run = [&](auto launcher) {
      std::apply([&](auto... a) { launcher(slots, groups, max_len, stream.stream(), a...); }, args);
    };
    switch (method) {
      case nms::kGaussian: run(launch_soft<T, nms::kGaussian>); break;
      case nms::kLinear: run(launch_soft<T, nms::kLinear>); break;
      default: run(launch_soft<T, nms::kHard>); break;
    }
  });
  if (rounds) {  // selected / out_score by position: (group, position) order, sorted by score below
    const at::Tensor pos = at::arange(n, d_len.options()).masked_select(selected);
    return nms::merge_groups(grouped_orig.index_select(0, pos), out_score.masked_select(selected), /*batched=*/true,
                             scores.scalar_type());
  }
  // Slot k of group c holds its (k - start[c])-th selection; keep the filled slots.
  const at::Tensor rank = at::arange(n, out_count.options()) - d_start.index_select(0, seg);
  const at::Tensor filled = rank < out_count.index_select(0, seg);
  const at::Tensor pos = (out_pos.masked_fill(~filled, 0) + d_start.index_select(0, seg)).masked_select(filled);
  return nms::merge_groups(grouped_orig.index_select(0, pos), out_score.masked_select(filled), idxs.has_value(),
                           scores.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvision_ops, CUDA, m) {
  m.impl("nms", &nms_cuda);
  m.impl("soft_nms", &soft_nms_cuda);
}

}  // namespace pyvision_ops

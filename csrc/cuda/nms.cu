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
#include "cuda/soft_nms.cuh"

namespace pyvision_ops {
namespace {

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

// A host table on like's device. Copied from pinned memory without waiting: a copy from
// pageable memory synchronises the stream, so the host would wait for the work queued before
// it (the score sort) instead of queueing the next. The caching host allocator keeps the
// pinned buffer until the copy has run.
at::Tensor to_device(const std::vector<int64_t>& v, const at::Tensor& like) {
  at::Tensor host =
      at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(v.begin(), v.end(), host.mutable_data_ptr<int64_t>());
  return host.to(like.device(), /*non_blocking=*/true);
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

// Register slots per thread for groups of up to `max_len` boxes (0: global memory).
template <typename T>
int soft_slots(int64_t max_len) {
  if (max_len <= soft_threads<T, 1>()) return 1;
  if (max_len <= 4 * soft_threads<T, 4>()) return 4;
  if (max_len <= 8 * soft_threads<T, 8>()) return 8;
  if (sizeof(T) == 4 && max_len <= 16 * soft_threads<T, 16>()) return 16;
  return 0;
}

// soft_nms_kernel, or with `multi` soft_multi_kernel (register slots; `lead`: its replay by
// one warp, fp32 only) or soft_multi_global_kernel.
template <typename T, int METHOD>
void launch_soft(int slots, int64_t groups, int64_t max_len, cudaStream_t stream, const T* boxes, T* scores,
                 const int64_t* start, const int64_t* len, const int32_t* place, T thr, T rsqrt_sig, T score_thr,
                 bool spread, bool multi, bool lead, int32_t* alive, int64_t* out_pos, T* out_score,
                 int64_t* out_count) {
  const int64_t per_thread = slots > 0 ? (max_len + slots - 1) / slots : max_len;
  const int64_t threads_needed = std::max<int64_t>(32, (per_thread + 31) / 32 * 32);
  // soft_slots keeps a register layout's threads within its bound; the global one takes them all.
#define PVO_SOFT(KK)                                                                                              \
  do {                                                                                                            \
    const int threads = static_cast<int>(std::min<int64_t>(soft_threads<T, KK>(), threads_needed));              \
    if (multi) {                                                                                                  \
      if constexpr (KK > 0) {                                                                                     \
        if constexpr (sizeof(T) == 4) { /* lead: fp32 only (fp64 takes multi) */                                  \
          if (lead) {                                                                                             \
            soft_multi_kernel<T, METHOD, KK, true><<<groups, threads, 0, stream>>>(                               \
                boxes, scores, start, len, place, thr, rsqrt_sig, score_thr, out_pos, out_score, out_count);      \
            break;                                                                                                \
          }                                                                                                       \
        }                                                                                                         \
        soft_multi_kernel<T, METHOD, KK><<<groups, threads, 0, stream>>>(                                        \
            boxes, scores, start, len, place, thr, rsqrt_sig, score_thr, out_pos, out_score, out_count);          \
      } else {                                                                                                    \
        soft_multi_global_kernel<T, METHOD><<<groups, threads, 0, stream>>>(                                     \
            boxes, scores, start, len, thr, rsqrt_sig, score_thr, alive, out_pos, out_score, out_count);          \
      }                                                                                                           \
      break;                                                                                                      \
    }                                                                                                             \
    soft_nms_kernel<T, METHOD, KK><<<groups, threads, 0, stream>>>(                                              \
        boxes, scores, start, len, place, thr, rsqrt_sig, score_thr, spread, alive, out_pos, out_score, out_count); \
  } while (0)
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

// Where the rounds kernels' per-group buffers start: mask words, chunk pairs (flags and
// lists) and chunks, `groups` entries each; then, with several groups, the mask tiles
// (group, row chunk, column chunk).
struct RoundsPlan {
  std::vector<int64_t> tables;
  int64_t mask_words = 0, pair_words = 0, chunk_words = 0;
};

// The tiles only when the mask fits in `max_mask_words` (the plan is not used otherwise).
RoundsPlan plan_rounds(const std::vector<int64_t>& len, int64_t max_mask_words) {
  const int64_t groups = static_cast<int64_t>(len.size());
  RoundsPlan p;
  p.tables.resize(3 * groups);
  for (int64_t c = 0; c < groups; ++c) {
    const int64_t words = (len[c] + kWord - 1) / kWord;
    p.tables[c] = p.mask_words, p.tables[groups + c] = p.pair_words, p.tables[2 * groups + c] = p.chunk_words;
    p.mask_words += len[c] * words, p.pair_words += words * words, p.chunk_words += words;
  }
  for (int64_t c = 0; c < groups && groups > 1 && p.mask_words <= max_mask_words; ++c) {
    const int64_t words = (len[c] + kWord - 1) / kWord;
    for (int64_t rb = 0; rb < words; ++rb)
      for (int64_t cb = 0; cb < words; ++cb) p.tables.insert(p.tables.end(), {c, rb, cb});
  }
  return p;
}

// The mask, then the rounds (soft_nms.cuh); fills `selected` and `out_score` by position.
template <typename T, int METHOD>
void launch_rounds(const RoundsPlan& plan, int64_t groups, int64_t max_len, const at::Tensor& b,
                   const at::Tensor& sc, const at::Tensor& start, const at::Tensor& len, const at::Tensor& place,
                   T thr, T rsqrt_sig, T score_thr, at::Tensor& state, at::Tensor& selected, at::Tensor& out_score,
                   cudaStream_t stream) {
  const int64_t n = sc.size(0);
  const at::Tensor tables = to_device(plan.tables, b);
  const int64_t* off = tables.const_data_ptr<int64_t>();
  const auto i32 = b.options().dtype(at::kInt);
  at::Tensor mask = at::zeros({std::max<int64_t>(plan.mask_words, 1)}, b.options().dtype(at::kLong));
  at::Tensor listed = at::empty({plan.pair_words}, b.options().dtype(at::kByte));
  const unsigned words = static_cast<unsigned>((max_len + kWord - 1) / kWord);
  const unsigned tiles = static_cast<unsigned>((plan.tables.size() - 3 * groups) / 3);
  const dim3 grid = groups > 1 ? dim3(tiles) : dim3(words, words);
  rounds_mask_kernel<T, METHOD><<<grid, kWord, 0, stream>>>(
      b.const_data_ptr<T>(), start.const_data_ptr<int64_t>(), len.const_data_ptr<int64_t>(),
      place.const_data_ptr<int32_t>(), off, groups, groups > 1 ? off + 3 * groups : nullptr, thr,
      reinterpret_cast<unsigned long long*>(mask.mutable_data_ptr<int64_t>()), listed.mutable_data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor mbox = at::empty({4 * n}, sc.options()), msc = at::empty({n}, sc.options());
  at::Tensor win = at::empty({n}, i32), rank_of = at::empty({n}, i32), winners = at::empty({n}, i32);
  at::Tensor clist = at::empty({plan.pair_words}, i32), ccount = at::empty({plan.chunk_words}, i32);
  const int threads = static_cast<int>(std::min<int64_t>(1024, (max_len + 31) / 32 * 32));
  soft_rounds_kernel<T, METHOD><<<groups, threads, 0, stream>>>(
      b.const_data_ptr<T>(), sc.const_data_ptr<T>(), start.const_data_ptr<int64_t>(), len.const_data_ptr<int64_t>(),
      place.const_data_ptr<int32_t>(), off, groups, thr, rsqrt_sig, score_thr,
      reinterpret_cast<const unsigned long long*>(mask.const_data_ptr<int64_t>()), listed.const_data_ptr<uint8_t>(),
      reinterpret_cast<Box<T>*>(mbox.mutable_data_ptr<T>()), msc.mutable_data_ptr<T>(),
      state.mutable_data_ptr<int32_t>(), win.mutable_data_ptr<int32_t>(), rank_of.mutable_data_ptr<int32_t>(),
      winners.mutable_data_ptr<int32_t>(), clist.mutable_data_ptr<int32_t>(), ccount.mutable_data_ptr<int32_t>(),
      selected.mutable_data_ptr<bool>(), out_score.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> soft_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                                                 const std::optional<at::Tensor>& idxs, double iou_threshold,
                                                 double sigma, double score_threshold, int64_t method) {
  nms::check_inputs("soft_nms", boxes, scores, idxs, iou_threshold);
  nms::check_soft_args(sigma, score_threshold, method);
  c10::cuda::CUDAGuard guard(boxes.device());
  // PYVISION_OPS_SOFT_NMS_KERNEL: "spread" or "chunks" (soft_nms_kernel, a selection a
  // block-wide step, with its two chunk placements), "multi" (soft_multi_kernel and
  // soft_multi_global_kernel: each warp posts its best, a block-wide step makes the
  // selections that beat every warp's second) or "rounds" (soft_rounds_kernel, where it
  // applies); the same boxes, scores equal to rounding. The default, "lead", is multi with
  // one warp's replay of a step's selections in fp32 (fp64 and the global layout take
  // multi's). On an H200 (benchmarks/soft_nms_scaling.py, 2026-11-28 19:21) lead's kernel
  // took 1.86 ms at N = 5000 against multi's 1.99 (spread 2.70 ms in all, rounds 21.5),
  // 1.12 against 1.33 at N = 4000, the same at 8000 and 12000. It runs clean under
  // ThreadSanitizer on CPU threads (tests/cuda_sim); not yet under racecheck.
  const char* variant_env = std::getenv("PYVISION_OPS_SOFT_NMS_KERNEL");
  const std::string variant = variant_env ? variant_env : "";
  const std::string what =
      "soft_nms: PYVISION_OPS_SOFT_NMS_KERNEL must be chunks, spread, multi, lead or rounds, got '" + variant + "'";
  TORCH_CHECK_VALUE(variant.empty() || variant == "chunks" || variant == "spread" || variant == "multi" ||
                        variant == "lead" || variant == "rounds",
                    what);
  const bool spread = variant != "chunks", lead = variant.empty() || variant == "lead",
             multi = variant == "multi" || lead;
  const int64_t n = boxes.size(0);
  if (n == 0) return {at::empty({0}, boxes.options().dtype(at::kLong)), at::empty({0}, scores.options())};
  TORCH_CHECK(n < INT_MAX, "soft_nms: more than 2^31 - 1 boxes");
  Groups g = group_by_category(scores, idxs);
  const int64_t groups = static_cast<int64_t>(g.len.size());
  const int64_t max_len = *std::max_element(g.len.begin(), g.len.end());
  // Rounds need decays that only lower scores (a positive score threshold), interactions
  // that need overlap (not the hard method at a threshold <= 0), groups within the chunk
  // limit and a mask of at most 2^26 words (512 MiB).
  bool rounds = variant == "rounds" && score_threshold > 0 && !(method == nms::kHard && !(iou_threshold > 0)) &&
                max_len <= kWord * kRoundsMaxChunks;
  RoundsPlan plan;
  if (rounds) {
    constexpr int64_t kMaxMaskWords = int64_t(1) << 26;
    plan = plan_rounds(g.len, kMaxMaskWords);
    rounds = plan.mask_words <= kMaxMaskWords;
  }
  std::vector<int64_t> start_len(g.start);
  start_len.insert(start_len.end(), g.len.begin(), g.len.end());
  const at::Tensor start_len_d = to_device(start_len, boxes);  // one copy
  const at::Tensor d_start = start_len_d.narrow(0, 0, groups), d_len = start_len_d.narrow(0, groups, groups);
  const at::Tensor grouped_orig = idxs ? g.order.index_select(0, g.grouped) : g.order;
  // each box's group (given its size, repeat_interleave does not read the lengths back)
  const at::Tensor seg = groups > 1 ? at::repeat_interleave(d_len, std::optional<int64_t>(n)) : at::Tensor();
  at::Tensor out_pos, out_count;  // the sequential kernel's outputs
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
    const T rsqrt_sig = nms::rsqrt_sig<T>(sigma);
    if (rounds) {
      selected = at::empty({n}, boxes.options().dtype(at::kBool));
      auto run = [&](auto launcher) {
        launcher(plan, groups, max_len, b, sc, d_start, d_len, place, thr, rsqrt_sig, score_thr, alive, selected,
                 out_score, stream.stream());
      };
      switch (method) {
        case nms::kGaussian: run(launch_rounds<T, nms::kGaussian>); break;
        case nms::kLinear: run(launch_rounds<T, nms::kLinear>); break;
        default: run(launch_rounds<T, nms::kHard>); break;
      }
      return;
    }
    out_pos = at::empty({n}, boxes.options().dtype(at::kLong));
    out_count = at::empty({groups}, boxes.options().dtype(at::kLong));
    auto args = std::make_tuple(b.const_data_ptr<T>(), sc.mutable_data_ptr<T>(), d_start.const_data_ptr<int64_t>(),
                                d_len.const_data_ptr<int64_t>(),
                                slots > 0 ? place.const_data_ptr<int32_t>() : nullptr, thr, rsqrt_sig,
                                score_thr, spread, multi, lead, alive.mutable_data_ptr<int32_t>(),
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
  // Slot k of group c holds its (k - start[c])-th selection; keep the filled slots. One
  // group: its first count slots, for one read-back (of the count) instead of the masks'.
  if (groups == 1) {
    const int64_t count = out_count.item<int64_t>();
    return nms::merge_groups(grouped_orig.index_select(0, out_pos.narrow(0, 0, count)),
                             out_score.narrow(0, 0, count).clone(), idxs.has_value(), scores.scalar_type());
  }
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

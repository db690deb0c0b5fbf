// Soft-NMS device code (csrc/cuda/nms.cu launches it): the sequential kernel and the rounds
// kernel with their helpers. A header of its own so that tests/cuda_sim runs the same code
// on CPU threads (tests/test_nms.py), on machines without a GPU.
#pragma once

#include <cstdint>

#include "common/nms.h"

namespace pyvision_ops {
namespace {

using box::Box;
constexpr int kWord = 64;  // boxes per mask word

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

// The union of two boxes; fmin/fmax skip a NaN coordinate.
template <typename T>
__device__ __forceinline__ Box<T> box_union(const Box<T>& a, const Box<T>& b) {
  return {fmin(a.x1, b.x1), fmin(a.y1, b.y1), fmax(a.x2, b.x2), fmax(a.y2, b.y2)};
}

// Union of the warp's boxes in every lane (fmin/fmax skip NaN coordinates: such a box
// has a NaN IoU, which never decays it).
template <typename T>
__device__ __forceinline__ Box<T> warp_union(Box<T> b) {
  for (int off = 16; off > 0; off >>= 1) {
    b = box_union(b, Box<T>{__shfl_xor_sync(0xffffffffu, b.x1, off), __shfl_xor_sync(0xffffffffu, b.y1, off),
                            __shfl_xor_sync(0xffffffffu, b.x2, off), __shfl_xor_sync(0xffffffffu, b.y2, off)});
  }
  return b;
}

template <typename T, int METHOD>
__device__ __forceinline__ T decayed(T score, const Box<T>& a, const Box<T>& b, T thr, T rsqrt_sig) {
  return nms::decay_score(score,
                          nms::decay<T>(box::pair_value<T, box::kIoU, false>(a, b, T(0), T(0), T(0)), METHOD, thr,
                                        rsqrt_sig));
}

// Best live box of a thread's K register slots (`pos` strided by 32: the thread's entries),
// and in `second` the next best. Every slot's position is read and its key built whether it
// is alive or not, so that the K shared loads issue together and the chain is selects, not
// branches.
template <typename T, int K>
__device__ __forceinline__ Key<T> lane_top2(const T (&sc)[K], uint32_t alive, const int32_t* pos, int& slot,
                                            Key<T>& second) {
  int32_t at[K];
#pragma unroll
  for (int k = 0; k < K; ++k) at[k] = pos[k * 32];
  Key<T> best = dead_key<T>();
  second = dead_key<T>();
  slot = 0;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const Key<T> key = live_key(sc[k], at[k]);
    const bool live = (alive >> k & 1u) != 0u;
    const bool first = live && key_greater(key, best);
    const bool next = live && !first && key_greater(key, second);
#pragma unroll
    for (int i = 0; i < Key<T>::W; ++i) {
      second.w[i] = first ? best.w[i] : next ? key.w[i] : second.w[i];
      best.w[i] = first ? key.w[i] : best.w[i];
    }
    slot = first ? k : slot;
  }
  return best;
}

template <typename T, int K>
__device__ __forceinline__ Key<T> lane_best(const T (&sc)[K], uint32_t alive, const int32_t* pos, int& slot) {
  Key<T> unused;  // the compiler drops its chain
  return lane_top2<T, K>(sc, alive, pos, slot, unused);
}

// Most threads of a soft_nms_kernel block with K register slots (a box and a score each) per
// thread: more would make ptxas spill them for sm_90 (-Xptxas -v; fp64 with 8 slots spills
// 40-72 bytes even at 512). soft_multi_kernel keeps more state and spills at these counts:
// fp32 20-52 bytes with 16 slots, fp64 74-114 with 8, none with 8 fp32 slots since
// decay_slots tests a union a lane (sm_90, 2026-11-28; 12-22 bytes before).
template <typename T, int K>
constexpr int soft_threads() {
  if (K <= 1) return 1024;
  if (sizeof(T) == 4) return K <= 4 ? 1024 : K <= 8 ? 768 : 512;
  return 512;
}

// A thread's K register slots of group s (n boxes): placement (k * W + warp) * 32 + lane
// (W warps; `spread`) or (warp * K + k) * 32 + lane holds the box at position
// place[s + placement] - s; `pos` (strided by 32) gets that position, `unions` (the warp's
// K entries) the union of each slot's live boxes across the warp, `warp_u` their union.
// A box whose score is below the threshold is not alive.
template <typename T, int K>
__device__ __forceinline__ void load_slots(const T* __restrict__ boxes, const T* __restrict__ scores, int64_t s,
                                           int n, const int32_t* __restrict__ place, bool spread, T score_thr,
                                           Box<T> (&bx)[K], T (&sc)[K], uint32_t& alive, Box<T>& warp_u,
                                           int32_t* pos, Box<T>* unions) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const T inf = T(INFINITY);
  alive = 0;
  warp_u = {inf, inf, -inf, -inf};
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int i = (spread ? k * nw + warp : warp * K + k) * 32 + lane;
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
    if (lane == 0) unions[k] = u;
    warp_u = box_union(warp_u, u);
  }
  __syncwarp();
}

// Decays a thread's live slots by the selected box `a`, skipping (with `skip`) the slots
// whose union `a` cannot overlap: their boxes keep their scores bit for bit. Returns the
// slots not skipped, a mask the same in every lane: 0 when nothing changed.
template <typename T, int METHOD, int K>
__device__ __forceinline__ uint32_t decay_slots(const Box<T>& a, bool skip, const Box<T> (&bx)[K], T (&sc)[K],
                                                uint32_t& alive, const Box<T>* unions, T thr, T rsqrt_sig,
                                                T score_thr) {
  // The slots `a` may overlap, all found before any decay: lane k tests slot k's union (the
  // warp's, so the mask is too), one shared load and test a lane instead of K. Not with 16
  // slots, nor with 8 in fp64: there ptxas spills more (-Xptxas -v, sm_90), so each slot is
  // tested on its step.
  constexpr bool kMaskFirst = K <= 4 || (K == 8 && sizeof(T) == 4);
  const int lane = threadIdx.x & 31;
  uint32_t ov = 0u;
  if constexpr (K == 1)  // every lane loads the one union anyway
    ov = !skip || nms::may_overlap(a, unions[0]);
  else if constexpr (kMaskFirst)
    ov = skip ? __ballot_sync(0xffffffffu, lane < K && nms::may_overlap(a, unions[lane])) : (1u << K) - 1u;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if constexpr (!kMaskFirst) {
      if (skip && !nms::may_overlap(a, unions[k])) continue;
      ov |= 1u << k;
    }
    if (!(ov >> k & 1u)) continue;
    if (alive >> k & 1u) {
      sc[k] = decayed<T, METHOD>(sc[k], a, bx[k], thr, rsqrt_sig);
      if (sc[k] < score_thr) alive &= ~(1u << k);
    }
  }
  return ov;
}

// One block per group; each step one block-wide max of the keys (one barrier), then the
// decay. K > 0: the group's boxes sit in registers, K per thread, in the spatial order
// `place` gives, 32 placements (a chunk) per warp and slot: warp w, slot k holds chunk
// kW + w (W warps: `spread`, which soft_multi_kernel takes too) or else wK + k; a selection
// visits only the warps, and in them the slots, whose union box it may overlap: the other
// boxes keep their scores bit for bit. A warp walks its slots one after another, so a
// selection waits at least for the warp that overlaps the most slots: spread puts the few
// neighbouring chunks a box overlaps in as many warps (on the benchmark's detections ~2.6
// slots, as a CPU simulation of this layout counts), chunk order in one warp (~6.5).
// K == 0: boxes and scores stay in global memory (any length), thread t owns positions t,
// t + nt, ...
template <typename T, int METHOD, int K>
__global__ void __launch_bounds__(soft_threads<T, K>()) soft_nms_kernel(
    const T* __restrict__ boxes, T* __restrict__ scores, const int64_t* __restrict__ start,
    const int64_t* __restrict__ len, const int32_t* __restrict__ place, T thr, T rsqrt_sig, T score_thr,
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
    Box<T> bx[K];
    T sc[K];
    uint32_t alive;
    Box<T> warp_u;
    int32_t* pos = pos_of + warp * K * 32 + lane;
    Box<T>* unions = slot_union + warp * K;
    load_slots<T, K>(boxes, scores, s, n, place, spread, score_thr, bx, sc, alive, warp_u, pos, unions);
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
        decay_slots<T, METHOD, K>(a, skip, bx, sc, alive, unions, thr, rsqrt_sig, score_thr);
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
          v = decayed<T, METHOD>(v, a, b, thr, rsqrt_sig);
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

// ---------------------------------------------------------------- Soft-NMS, several selections a step

template <typename T>
__device__ __forceinline__ Box<T> shfl_box(const Box<T>& b, int src) {
  return {__shfl_sync(0xffffffffu, b.x1, src), __shfl_sync(0xffffffffu, b.y1, src),
          __shfl_sync(0xffffffffu, b.x2, src), __shfl_sync(0xffffffffu, b.y2, src)};
}

// Multi (the default; PYVISION_OPS_SOFT_NMS_KERNEL=spread or chunks takes soft_nms_kernel
// instead): one block-wide step can make several
// selections. Each warp posts its best live box and its second best key; after the step's
// one barrier every warp replays the same selections on its own copy of the posts (lane l
// holds warp l's): the best posted key is the next selection and decays the other posted
// boxes, and then the best remaining posted key is the next selection too as long as it
// beats every warp's second key. No box that was not posted can rise above that bound:
// with a positive score threshold a decay never raises a live score (an IoU is in [0, 1]
// or NaN, so a factor is in [0, 1]). Each warp then decays its boxes by the step's
// selections in their order, as the sequential kernel would one step at a time. With a
// threshold <= 0 a step selects one box. A float64 model of this rule on the benchmark's
// detections (N = 5000: 20 warps) makes the 1276 selections in 290 steps.
// Posts are columns by warp (lane-indexed reads, no bank conflicts): key words (best, then
// second) and values (box, score), in two buffers: a warp that runs ahead writes the other.
template <typename T>
struct Posts {
  uint32_t key[2][2 * Key<T>::W][32];
  T val[2][5][32];
};

// Warp `warp`'s post in buffer `par`: the keys from lane 0, the box and score from the
// owner (the lane that holds the best live box; none when the warp has none).
template <typename T>
__device__ __forceinline__ void write_post(Posts<T>& posts, int par, const Key<T>& best, const Key<T>& second,
                                           bool owner, const Box<T>& b, T v) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < Key<T>::W; ++i) {
      posts.key[par][i][warp] = best.w[i];
      posts.key[par][Key<T>::W + i][warp] = second.w[i];
    }
  }
  if (owner) {
    posts.val[par][0][warp] = b.x1;
    posts.val[par][1][warp] = b.y1;
    posts.val[par][2][warp] = b.x2;
    posts.val[par][3][warp] = b.y2;
    posts.val[par][4][warp] = v;
  }
}

// The step's selections from buffer `par` (after the barrier; every warp the same): returns
// how many; lane l's candidate is warp l's post, its box in `cb`, its position in `cpos`
// and in `rank` the selection it became (-1: none). Warp 0 writes them to out_pos and
// out_score from `count` on, which advances.
template <typename T, int METHOD>
__device__ __forceinline__ int replay(const Posts<T>& posts, int par, bool multi, bool skip, T thr, T rsqrt_sig,
                                      T score_thr, int64_t* __restrict__ out_pos, T* __restrict__ out_score,
                                      int& count, Box<T>& cb, int& cpos, int& rank) {
  constexpr int W = Key<T>::W;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  Key<T> ck = dead_key<T>(), bound = dead_key<T>();
  cb = {T(0), T(0), T(0), T(0)};
  T cs = T(0);
  if (lane < nw) {
#pragma unroll
    for (int i = 0; i < W; ++i) {
      ck.w[i] = posts.key[par][i][lane];
      bound.w[i] = posts.key[par][W + i][lane];
    }
    if (ck.w[0] != 0u) {
      cb = {posts.val[par][0][lane], posts.val[par][1][lane], posts.val[par][2][lane], posts.val[par][3][lane]};
      cs = posts.val[par][4][lane];
    }
  }
  cpos = static_cast<int>(~ck.w[W - 1]);
  bound = warp_max(bound);
  if (!multi) {  // no key beats all ones: one selection a step
#pragma unroll
    for (int i = 0; i < W; ++i) bound.w[i] = ~0u;
  }
  rank = -1;
  int m = 0;
  while (true) {
    const Key<T> top = warp_max(ck);
    if (top.w[0] == 0u || (m > 0 && !key_greater(top, bound))) break;
    const bool me = key_equal(ck, top);
    const Box<T> a = shfl_box(cb, __ffs(__ballot_sync(0xffffffffu, me)) - 1);
    if (me) {
      rank = m;
      ck = dead_key<T>();
      if (warp == 0) {
        out_pos[count] = cpos;
        out_score[count] = cs;
      }
    }
    ++m;
    ++count;
    if (ck.w[0] != 0u && (!skip || nms::may_overlap(a, cb))) {
      cs = decayed<T, METHOD>(cs, a, cb, thr, rsqrt_sig);
      ck = cs < score_thr ? dead_key<T>() : live_key(cs, cpos);
    }
  }
  return m;
}

// Multi with soft_nms_kernel's register slots (spread placement). A warp whose slots did
// not change copies its previous post forward instead of keeping it in registers. With
// LEAD (opt-in, PYVISION_OPS_SOFT_NMS_KERNEL=lead) warp 0 alone replays a step's
// selections and hands them to the others through shared memory, after a second barrier:
// without it every warp replays them (about 130 instructions a selection a warp in the
// sm_90 code, so a step of 20 warps issues its replay 20 times over on the SM's four
// schedulers). A template argument, so that the default's code stays as timed (a runtime
// flag doubled its spills).
template <typename T, int METHOD, int K, bool LEAD = false>
__global__ void __launch_bounds__(soft_threads<T, K>()) soft_multi_kernel(
    const T* __restrict__ boxes, const T* __restrict__ scores, const int64_t* __restrict__ start,
    const int64_t* __restrict__ len, const int32_t* __restrict__ place, T thr, T rsqrt_sig, T score_thr,
    int64_t* __restrict__ out_pos, T* __restrict__ out_score, int64_t* __restrict__ out_count) {
  static_assert(K > 0, "register slots only");
  constexpr int W = Key<T>::W;
  const int64_t c = blockIdx.x, s = start[c];
  const int n = static_cast<int>(len[c]);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool skip = !(METHOD == nms::kHard && thr <= T(0));
  __shared__ int32_t pos_of[K * soft_threads<T, K>()];
  __shared__ Box<T> slot_union[32 * K];
  __shared__ Posts<T> posts;
  __shared__ Box<T> sel_box[LEAD ? 32 : 1];    // LEAD: the step's selections in order,
  __shared__ int32_t sel_rank[LEAD ? 32 : 1];  // the selection each warp's post became (-1: none),
  __shared__ int32_t sel_count;                // and how many
  Box<T> bx[K];
  T sc[K];
  uint32_t alive;
  Box<T> warp_u;
  int32_t* pos = pos_of + warp * K * 32 + lane;
  Box<T>* unions = slot_union + warp * K;
  load_slots<T, K>(boxes, scores, s, n, place, true, score_thr, bx, sc, alive, warp_u, pos, unions);
  const bool multi = score_thr > T(0);
  int par = 0, lslot = 0, count = 0;
  bool stale = true, owner = false;  // owner: this lane holds the warp's best live box, in slot lslot
  while (true) {
    if (stale) {
      Key<T> lsecond;
      const Key<T> lbest = lane_top2<T, K>(sc, alive, pos, lslot, lsecond);
      const Key<T> wbest = warp_max(lbest);
      const Key<T> wsecond = warp_max(key_equal(lbest, wbest) ? lsecond : lbest);
      owner = wbest.w[0] != 0u && key_equal(lbest, wbest);
      Box<T> b = bx[0];
      T v = sc[0];
#pragma unroll
      for (int k = 1; k < K; ++k) {
        b = k == lslot ? bx[k] : b;
        v = k == lslot ? sc[k] : v;
      }
      write_post(posts, par, wbest, wsecond, owner, b, v);
      stale = false;
    } else if (lane < 2 * W) {  // the post is unchanged: copy it from the other buffer
      posts.key[par][lane][warp] = posts.key[par ^ 1][lane][warp];
    } else if (lane < 2 * W + 5) {
      posts.val[par][lane - 2 * W][warp] = posts.val[par ^ 1][lane - 2 * W][warp];
    }
    __syncthreads();
    Box<T> cb;
    int cpos, rank = -1, m = 0, mine;
    if (!LEAD || warp == 0)
      m = replay<T, METHOD>(posts, par, multi, skip, thr, rsqrt_sig, score_thr, out_pos + s, out_score + s, count,
                            cb, cpos, rank);
    if constexpr (LEAD) {  // the other warps read the step's selections once warp 0 has written them
      if (warp == 0) {
        if (rank >= 0) sel_box[rank] = cb;
        sel_rank[lane] = rank;
        if (lane == 0) sel_count = m;
      }
      __syncthreads();
      m = sel_count;
      mine = sel_rank[warp];
    } else {
      mine = __shfl_sync(0xffffffffu, rank, warp);
    }
    par ^= 1;
    if (m == 0) break;
    if (mine >= 0) {  // this warp's post was selected
      stale = true;
      if (owner) alive &= ~(1u << lslot);
    }
    for (int i = 0; i < m; ++i) {
      const Box<T> a = LEAD ? sel_box[i] : shfl_box(cb, __ffs(__ballot_sync(0xffffffffu, rank == i)) - 1);
      if (skip && !nms::may_overlap(a, warp_u)) continue;  // warp-uniform
      // a warp none of whose slots `a` may overlap keeps its post (one slot: warp_u is its union)
      const uint32_t ov = decay_slots<T, METHOD, K>(a, skip, bx, sc, alive, unions, thr, rsqrt_sig, score_thr);
      if (K == 1 || ov != 0u) stale = true;
    }
  }
  if (threadIdx.x == 0) out_count[c] = count;
}

// Multi for groups beyond the register layouts: boxes and scores in global memory, thread
// t owns positions t, t + nt, ... (as soft_nms_kernel's K == 0), and every step each thread
// decays its live boxes by the step's selections (a copy per warp in shared memory) and
// finds its best two.
template <typename T, int METHOD>
__global__ void __launch_bounds__(1024) soft_multi_global_kernel(
    const T* __restrict__ boxes, T* __restrict__ scores, const int64_t* __restrict__ start,
    const int64_t* __restrict__ len, T thr, T rsqrt_sig, T score_thr, int32_t* __restrict__ alive_all,
    int64_t* __restrict__ out_pos, T* __restrict__ out_score, int64_t* __restrict__ out_count) {
  const int64_t c = blockIdx.x, s = start[c];
  const int n = static_cast<int>(len[c]);
  const int tid = threadIdx.x, nt = blockDim.x, warp = tid >> 5;
  const bool skip = !(METHOD == nms::kHard && thr <= T(0));
  __shared__ Posts<T> posts;
  __shared__ Box<T> sel_box[32][32];  // [warp][selection]
  __shared__ int32_t sel_pos[32][32];
  int32_t* alive_g = alive_all + s;
  T* sc = scores + s;
  const bool multi = score_thr > T(0);
  // This thread's best two live keys and where the best is.
  Key<T> lbest = dead_key<T>(), lsecond = dead_key<T>();
  int lpos = 0;
  auto consider = [&](T v, int j) {
    const Key<T> key = live_key(v, j);
    if (key_greater(key, lbest)) {
      lsecond = lbest;
      lbest = key;
      lpos = j;
    } else if (key_greater(key, lsecond)) {
      lsecond = key;
    }
  };
  for (int64_t j = tid; j < n; j += nt) {  // int64: j + nt may pass 2^31 - 1
    const T v = sc[j];
    alive_g[j] = !(v < score_thr);
    if (alive_g[j]) consider(v, static_cast<int>(j));
  }
  int par = 0, count = 0;
  while (true) {
    const Key<T> wbest = warp_max(lbest);
    const Key<T> wsecond = warp_max(key_equal(lbest, wbest) ? lsecond : lbest);
    const bool owner = wbest.w[0] != 0u && key_equal(lbest, wbest);
    Box<T> b{T(0), T(0), T(0), T(0)};
    T v = T(0);
    if (owner) {
      b = load_box(boxes, s + lpos);
      v = sc[lpos];
    }
    write_post(posts, par, wbest, wsecond, owner, b, v);
    __syncthreads();
    Box<T> cb;
    int cpos, rank;
    const int m = replay<T, METHOD>(posts, par, multi, skip, thr, rsqrt_sig, score_thr, out_pos + s, out_score + s,
                                    count, cb, cpos, rank);
    par ^= 1;
    if (m == 0) break;
    if (rank >= 0) {
      sel_box[warp][rank] = cb;
      sel_pos[warp][rank] = cpos;
    }
    __syncwarp();
    for (int i = 0; i < m; ++i) {  // the selected boxes die at their owners
      const int j = sel_pos[warp][i];
      if (j % nt == tid) alive_g[j] = 0;
    }
    lbest = lsecond = dead_key<T>();
    for (int64_t j = tid; j < n; j += nt) {
      if (!alive_g[j]) continue;
      T x = sc[j];
      const Box<T> bj = load_box(boxes, s + j);
      bool changed = false;
      for (int i = 0; i < m && !(x < score_thr); ++i) {
        const Box<T> a = sel_box[warp][i];
        if (!skip || nms::may_overlap(a, bj)) {
          x = decayed<T, METHOD>(x, a, bj, thr, rsqrt_sig);
          changed = true;
        }
      }
      if (changed) {
        sc[j] = x;
        if (x < score_thr) {
          alive_g[j] = 0;
          continue;
        }
      }
      consider(x, static_cast<int>(j));
    }
    __syncwarp();  // sel_box and sel_pos are rewritten next step
  }
  if (tid == 0) out_count[c] = count;
}

// ---------------------------------------------------------------- Soft-NMS by rounds

// Opt-in (PYVISION_OPS_SOFT_NMS_KERNEL=rounds): 1.6 to 6.4 times slower than the
// sequential kernel for N = 1000 to 12000 on an H200 (benchmarks/soft_nms_scaling.py,
// 2026-11-27; its rounds are few but each costs more). Soft-NMS as rounds of local maxima,
// one block per group. Two boxes interact when the selection of one can change the other's
// score (soft_interacts). With a positive score threshold a decay only lowers scores, so a
// live box whose key beats every live box it interacts with is selected before all of them
// in the sequential order, with its current score: each round selects every such box at
// once, then decays the live boxes they interact with, each by the round's selections in
// Morton order (the sequential kernel may multiply the same factors in another order: the
// same boxes, scores equal to rounding, as exp already differs between devices). The
// selections, sorted by (score descending, position), are the sequential ones in their
// order. On the benchmark's detections (N = 5000, 1276 selections) that is 107 rounds
// (tests/test_nms.py models it in float64).
// Boxes are in Morton order within the group (`place`), 64 to a chunk; a box's
// neighbours are the bits of its row of a mask (rounds_mask_kernel), ANDed with the
// chunks' live bits.
constexpr int kRoundsMaxChunks = 256;  // groups of up to 16384 boxes
constexpr int kFewWinners = 64;        // up to this many selections, a round tests each box against all

// True when the selection of one of `a`, `b` may decay the other (the decay factor can
// differ from exactly 1): IoU > 0, or IoU >= thr for the linear and hard methods with
// thr > 0. Callers pass the pair in one order, so the relation is symmetric.
template <typename T, int METHOD>
__device__ __forceinline__ bool soft_interacts(const Box<T>& a, const Box<T>& b, T thr) {
  const T iou = box::pair_value<T, box::kIoU, false>(a, b, T(0), T(0), T(0));
  return METHOD != nms::kGaussian && thr > T(0) ? iou >= thr : iou > T(0);
}

// Per group c, the tables `off` hold where its mask words, its chunk-pair flags (and chunk
// lists) and its chunk counts start, `groups` entries each.

// The interaction mask: one 64-thread block per (group, row chunk, column chunk) of Morton
// ranks, from a list of tiles or, for one group, from the grid (x: column, y: row chunk).
// Two boxes can only interact where they meet with positive area, so inside their chunks'
// union boxes: where those do not meet, the words stay zero (the mask starts zeroed) and
// `listed` says so. The pair is tested lower rank first.
template <typename T, int METHOD>
__global__ void rounds_mask_kernel(const T* __restrict__ boxes, const int64_t* __restrict__ start,
                                   const int64_t* __restrict__ len, const int32_t* __restrict__ place,
                                   const int64_t* __restrict__ off, int64_t groups, const int64_t* __restrict__ tiles,
                                   T thr, unsigned long long* __restrict__ mask, uint8_t* __restrict__ listed) {
  int64_t c = 0, rb = blockIdx.y, cb = blockIdx.x;
  if (tiles) {
    const int64_t* tile = tiles + static_cast<int64_t>(blockIdx.x) * 3;
    c = tile[0], rb = tile[1], cb = tile[2];
  }
  const int64_t s = start[c];
  const int n = static_cast<int>(len[c]), words = (n + kWord - 1) / kWord, t = threadIdx.x;
  const int r = static_cast<int>(rb) * kWord + t, q0 = static_cast<int>(cb) * kWord;
  const T inf = T(INFINITY);
  const Box<T> none{inf, inf, -inf, -inf};
  __shared__ Box<T> cols[kWord];
  __shared__ Box<T> unions[2][2];  // [rows, columns][warp]
  const Box<T> a = r < n ? load_box(boxes, place[s + r]) : none;
  cols[t] = q0 + t < n ? load_box(boxes, place[s + q0 + t]) : none;
  const Box<T> ua = warp_union(a), uc = warp_union(cols[t]);
  if ((t & 31) == 0) unions[0][t >> 5] = ua, unions[1][t >> 5] = uc;
  __syncthreads();
  const bool meet = nms::may_overlap(box_union(unions[0][0], unions[0][1]), box_union(unions[1][0], unions[1][1]));
  if (t == 0) listed[off[groups + c] + rb * words + cb] = meet;
  if (!meet || r >= n) return;
  unsigned long long bits = 0;
  for (int j = 0; j < min(kWord, n - q0); ++j) {
    const int q = q0 + j;
    if (q == r) continue;
    if (r < q ? soft_interacts<T, METHOD>(a, cols[j], thr) : soft_interacts<T, METHOD>(cols[j], a, thr))
      bits |= 1ull << j;
  }
  mask[off[c] + static_cast<int64_t>(r) * words + cb] = bits;
}

// The rounds; every per-box array is indexed s + Morton rank except `selected` and
// `out_score`, indexed by position in the group's score order.
template <typename T, int METHOD>
__global__ void __launch_bounds__(1024) soft_rounds_kernel(
    const T* __restrict__ boxes, const T* __restrict__ scores, const int64_t* __restrict__ start,
    const int64_t* __restrict__ len, const int32_t* __restrict__ place, const int64_t* __restrict__ off,
    int64_t groups, T thr, T rsqrt_sig, T score_thr, const unsigned long long* __restrict__ mask_all,
    const uint8_t* __restrict__ listed_all, Box<T>* __restrict__ mbox, T* __restrict__ msc,
    int32_t* __restrict__ state, int32_t* __restrict__ win, int32_t* __restrict__ rank_of,
    int32_t* __restrict__ winners, int32_t* __restrict__ clist_all, int32_t* __restrict__ ccount_all,
    bool* __restrict__ selected, T* __restrict__ out_score) {
  constexpr int kLive = 0, kDead = 1, kSelected = 2;
  const int64_t c = blockIdx.x, s = start[c];
  const int n = static_cast<int>(len[c]), words = (n + kWord - 1) / kWord;
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5, nw = nt >> 5;
  const unsigned long long* mask = mask_all + off[c];
  const uint8_t* listed = listed_all + off[groups + c];
  int32_t* clist = clist_all + off[groups + c];
  int32_t* ccount = ccount_all + off[2 * groups + c];
  __shared__ unsigned long long live[kRoundsMaxChunks];  // bit j of word cb: rank 64 cb + j is live
  __shared__ Key<T> chunk_best[kRoundsMaxChunks];        // the best live key of each chunk
  __shared__ uint32_t slots[2][Key<T>::W][32];
  __shared__ int32_t warp_total[32];
  // Thread t owns the Morton ranks [lo, hi): contiguous, so the winners list below comes
  // out in Morton order.
  const int per = (n + nt - 1) / nt, lo = min(n, tid * per), hi = min(n, lo + per);

  for (int m = tid; m < n; m += nt) {
    const int p = place[s + m] - static_cast<int>(s);
    mbox[s + m] = load_box(boxes, s + p);
    msc[s + m] = scores[s + p];
    state[s + m] = msc[s + m] < score_thr ? kDead : kLive;  // NaN scores stay
    win[s + m] = 0;
    rank_of[s + p] = m;
    selected[s + p] = false;
  }
  // Per chunk, the chunks it may interact with, in increasing order.
  for (int rb = tid; rb < words; rb += nt) {
    int k = 0;
    for (int cb = 0; cb < words; ++cb)
      if (listed[rb * words + cb]) clist[rb * words + k++] = cb;
    ccount[rb] = k;
  }
  __syncthreads();

  auto key_of = [&](int m) { return live_key(msc[s + m], place[s + m] - static_cast<int>(s)); };
  auto linked = [&](int m, int q) { return (mask[static_cast<int64_t>(m) * words + (q >> 6)] >> (q & 63)) & 1ull; };
  // visit(q) for the live boxes q that m interacts with, in Morton order, in the chunks
  // want(chunk) accepts, until visit returns false.
  auto neighbours = [&](int m, auto want, auto visit) {
    const int rb = m / kWord;
    for (int k = 0; k < ccount[rb]; ++k) {
      const int cb = clist[rb * words + k];
      if (!want(cb)) continue;
      for (unsigned long long w = mask[static_cast<int64_t>(m) * words + cb] & live[cb]; w; w &= w - 1)
        if (!visit(cb * kWord + __ffsll(static_cast<long long>(w)) - 1)) return;
    }
  };
  int par = 0;
  for (int round = 1;; ++round) {
    // Per chunk (a warp each) its live bits and best live key; the best of all is always
    // selected this round, and a box that interacts with it is not.
    Key<T> mine = dead_key<T>();
    for (int cb = warp; cb < words; cb += nw) {
      const int m0 = cb * kWord + lane, m1 = m0 + 32;
      const bool l0 = m0 < n && state[s + m0] == kLive, l1 = m1 < n && state[s + m1] == kLive;
      Key<T> k = l0 ? key_of(m0) : dead_key<T>();
      if (l1) {
        const Key<T> k1 = key_of(m1);
        if (key_greater(k1, k)) k = k1;
      }
      k = warp_max(k);
      const unsigned long long bits0 = __ballot_sync(0xffffffffu, l0), bits1 = __ballot_sync(0xffffffffu, l1);
      if (lane == 0) {
        chunk_best[cb] = k;
        live[cb] = bits0 | bits1 << 32;
      }
      if (key_greater(k, mine)) mine = k;
    }
    const Key<T> best = block_max(mine, slots[par]);  // its barrier also publishes `live` and `chunk_best`
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
        neighbours(
            m, [&](int cb) { return key_greater(chunk_best[cb], km); },  // else nothing live there outranks m
            [&](int q) { return wins = !key_greater(key_of(q), km); });
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
    // the winners list when it is short, else from the box's live neighbours (same order).
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
          if (linked(m, q)) v = decayed<T, METHOD>(v, mbox[s + q], b, thr, rsqrt_sig);
        }
      } else {
        neighbours(m, [](int) { return true; }, [&](int q) {
          if (win[s + q] == round) v = decayed<T, METHOD>(v, mbox[s + q], b, thr, rsqrt_sig);
          return true;
        });
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

}  // namespace
}  // namespace pyvision_ops

// The Soft-NMS CUDA kernels of csrc/cuda/soft_nms.cuh on CPU threads (cuda_sim.h), with
// C entry points for tests/test_nms.py (ctypes). The caller lays out the inputs as
// csrc/cuda/nms.cu:soft_nms_cuda does; these convert the thresholds the same way and launch.
#include "cuda_sim.h"
// clang-format off: the shim first
#ifdef PVO_SIM_ARCH
#include "common/nms.h"  // its own __CUDA_ARCH__ branches are device math: it takes the CPU side
#define __CUDA_ARCH__ PVO_SIM_ARCH
#endif
#include "cuda/soft_nms.cuh"
#undef __CUDA_ARCH__

using namespace pyvision_ops;

namespace {

template <typename T>
struct Args {
  T thr, rsqrt_sig, score_thr;
  Args(double iou_threshold, double sigma, double score_threshold)
      : thr(nms::ge_threshold<T>(iou_threshold)),
        rsqrt_sig(nms::rsqrt_sig<T>(sigma)),
        score_thr(nms::ge_threshold<T>(score_threshold)) {}
};

// As csrc/cuda/nms.cu:launch_rounds: the mask kernel over its tiles (several groups) or a
// words x words grid (one group), then the rounds kernel, a block per group.
template <typename T, int METHOD>
void rounds(int64_t groups, int64_t max_len, int64_t tiles, int threads, const void* boxes, const void* scores,
            const int64_t* start, const int64_t* len, const int32_t* place, const int64_t* tables,
            double iou_threshold, double sigma, double score_threshold, uint64_t* mask, uint8_t* listed, void* mbox,
            void* msc, int32_t* state, int32_t* win, int32_t* rank_of, int32_t* winners, int32_t* clist,
            int32_t* ccount, bool* selected, void* out_score) {
  const Args<T> a(iou_threshold, sigma, score_threshold);
  const T* b = static_cast<const T*>(boxes);
  auto* m = reinterpret_cast<unsigned long long*>(mask);
  const int words = static_cast<int>((max_len + kWord - 1) / kWord);
  const int64_t* tile_list = groups > 1 ? tables + 3 * groups : nullptr;
  cuda_sim::launch(groups > 1 ? static_cast<int>(tiles) : words, groups > 1 ? 1 : words, kWord, [&] {
    rounds_mask_kernel<T, METHOD>(b, start, len, place, tables, groups, tile_list, a.thr, m, listed);
  });
  cuda_sim::launch(static_cast<int>(groups), 1, threads, [&] {
    soft_rounds_kernel<T, METHOD>(b, static_cast<const T*>(scores), start, len, place, tables, groups, a.thr,
                                  a.rsqrt_sig, a.score_thr, m, listed, static_cast<Box<T>*>(mbox),
                                  static_cast<T*>(msc), state, win, rank_of, winners, clist, ccount, selected,
                                  static_cast<T*>(out_score));
  });
}

// variant: 0 chunks, 1 spread, 2 multi (soft_multi_kernel, or soft_multi_global_kernel for K == 0),
// 3 lead (soft_multi_kernel with one warp's replay, fp32; as multi for fp64 and K == 0, as
// the CUDA launcher).
template <typename T, int METHOD, int K>
void chunks(int64_t groups, int threads, const void* boxes, void* scores, const int64_t* start, const int64_t* len,
            const int32_t* place, double iou_threshold, double sigma, double score_threshold, int variant,
            int32_t* alive, int64_t* out_pos, void* out_score, int64_t* out_count) {
  const Args<T> a(iou_threshold, sigma, score_threshold);
  cuda_sim::launch(static_cast<int>(groups), 1, threads, [&] {
    if (variant >= 2) {
      if constexpr (K > 0) {
        auto run = [&](auto kernel) {
          kernel(static_cast<const T*>(boxes), static_cast<const T*>(scores), start, len, place, a.thr, a.rsqrt_sig,
                 a.score_thr, out_pos, static_cast<T*>(out_score), out_count);
        };
        if (variant == 3 && sizeof(T) == 4)
          run(soft_multi_kernel<T, METHOD, K, true>);
        else
          run(soft_multi_kernel<T, METHOD, K>);
      } else {
        soft_multi_global_kernel<T, METHOD>(static_cast<const T*>(boxes), static_cast<T*>(scores), start, len, a.thr,
                                            a.rsqrt_sig, a.score_thr, alive, out_pos, static_cast<T*>(out_score),
                                            out_count);
      }
      return;
    }
    soft_nms_kernel<T, METHOD, K>(static_cast<const T*>(boxes), static_cast<T*>(scores), start, len, place, a.thr,
                                  a.rsqrt_sig, a.score_thr, variant != 0, alive, out_pos, static_cast<T*>(out_score),
                                  out_count);
  });
}

template <typename T, int METHOD>
int chunks_k(int k, int64_t groups, int threads, const void* boxes, void* scores, const int64_t* start,
             const int64_t* len, const int32_t* place, double iou_threshold, double sigma, double score_threshold,
             int variant, int32_t* alive, int64_t* out_pos, void* out_score, int64_t* out_count) {
#define PVO_SIM(KK)                                                                                               \
  chunks<T, METHOD, KK>(groups, threads, boxes, scores, start, len, place, iou_threshold, sigma, score_threshold, \
                        variant, alive, out_pos, out_score, out_count)
  switch (k) {
    case 0: PVO_SIM(0); return 0;
    case 1: PVO_SIM(1); return 0;
    case 4: PVO_SIM(4); return 0;
    case 8: PVO_SIM(8); return 0;
    case 16:
      if constexpr (sizeof(T) == 4) {
        PVO_SIM(16);
        return 0;
      }
      return 1;
    default: return 1;
  }
#undef PVO_SIM
}

}  // namespace

extern "C" {

// fp64: 0 fp32, 1 fp64; method: 0 gaussian, 1 linear, 2 hard. Returns 0, or 1 for bad arguments.
int sim_soft_rounds(int fp64, int method, int64_t groups, int64_t max_len, int64_t tiles, int threads,
                    const void* boxes, const void* scores, const int64_t* start, const int64_t* len,
                    const int32_t* place, const int64_t* tables, double iou_threshold, double sigma,
                    double score_threshold, uint64_t* mask, uint8_t* listed, void* mbox, void* msc, int32_t* state,
                    int32_t* win, int32_t* rank_of, int32_t* winners, int32_t* clist, int32_t* ccount,
                    bool* selected, void* out_score) {
  if (threads % 32 || threads < 32 || threads > 1024 || method < 0 || method > 2) return 1;
#define PVO_SIM(TT, MM)                                                                                             \
  rounds<TT, MM>(groups, max_len, tiles, threads, boxes, scores, start, len, place, tables, iou_threshold, sigma, \
                 score_threshold, mask, listed, mbox, msc, state, win, rank_of, winners, clist, ccount, selected,  \
                 out_score)
  if (fp64) {
    if (method == 0) PVO_SIM(double, nms::kGaussian);
    if (method == 1) PVO_SIM(double, nms::kLinear);
    if (method == 2) PVO_SIM(double, nms::kHard);
  } else {
    if (method == 0) PVO_SIM(float, nms::kGaussian);
    if (method == 1) PVO_SIM(float, nms::kLinear);
    if (method == 2) PVO_SIM(float, nms::kHard);
  }
#undef PVO_SIM
  return 0;
}

int sim_soft_chunks(int fp64, int method, int k, int64_t groups, int threads, const void* boxes, void* scores,
                    const int64_t* start, const int64_t* len, const int32_t* place, double iou_threshold,
                    double sigma, double score_threshold, int variant, int32_t* alive, int64_t* out_pos,
                    void* out_score, int64_t* out_count) {
  if (threads % 32 || threads < 32 || threads > 1024 || method < 0 || method > 2) return 1;
#define PVO_SIM(TT, MM)                                                                                         \
  return chunks_k<TT, MM>(k, groups, threads, boxes, scores, start, len, place, iou_threshold, sigma,          \
                          score_threshold, variant, alive, out_pos, out_score, out_count)
  if (fp64) {
    if (method == 0) PVO_SIM(double, nms::kGaussian);
    if (method == 1) PVO_SIM(double, nms::kLinear);
    PVO_SIM(double, nms::kHard);
  }
  if (method == 0) PVO_SIM(float, nms::kGaussian);
  if (method == 1) PVO_SIM(float, nms::kLinear);
  PVO_SIM(float, nms::kHard);
#undef PVO_SIM
}

}  // extern "C"

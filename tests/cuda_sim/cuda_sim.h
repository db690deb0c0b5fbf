// Runs CUDA kernel source on CPU threads, for tests on machines without a GPU: one
// std::thread per CUDA thread, one block at a time. __shared__ variables become
// function-static (one block runs at a time, so they are the block's), __syncthreads and
// __syncwarp are barriers, and warp shuffles go through a per-warp exchange buffer
// between two warp barriers. Only what csrc/cuda/soft_nms.cuh uses is defined; code under
// `__CUDA_ARCH__ >= 800` takes its pre-sm_80 branch unless soft_nms_sim.cpp is built with
// PVO_SIM_ARCH (then the kernels see that __CUDA_ARCH__, and __reduce_max_sync below).
#pragma once

#include <algorithm>
#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

using std::fmax;
using std::fmin;
using std::max;
using std::min;

namespace cuda_sim {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

struct Block {
  explicit Block(int threads) : all(threads), shuffle((threads + 31) / 32) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<std::array<uint64_t, 32>> shuffle;
};

inline Block* block = nullptr;
inline Dim3 block_dim;
inline thread_local Dim3 thread_idx, block_idx;

// Runs body() as a grid of gx * gy blocks of `threads` threads (a multiple of 32), one
// block after another.
template <typename F>
void launch(int gx, int gy, int threads, F&& body) {
  block_dim.x = static_cast<unsigned>(threads);
  for (int by = 0; by < gy; ++by) {
    for (int bx = 0; bx < gx; ++bx) {
      Block blk(threads);
      block = &blk;
      std::vector<std::thread> ts;
      ts.reserve(threads);
      for (int t = 0; t < threads; ++t)
        ts.emplace_back([&body, t, bx, by] {
          thread_idx.x = static_cast<unsigned>(t);
          block_idx.x = static_cast<unsigned>(bx);
          block_idx.y = static_cast<unsigned>(by);
          body();
        });
      for (auto& t : ts) t.join();
      block = nullptr;
    }
  }
}

// Each lane of the caller's warp posts `bits`; f reads the 32 posted values between two
// warp barriers (the exchange behind shuffles, ballots and reductions).
template <typename F>
auto exchange(uint64_t bits, F&& f) {
  const int w = static_cast<int>(thread_idx.x >> 5);
  block->shuffle[w][thread_idx.x & 31] = bits;
  block->warps[w]->arrive_and_wait();
  const auto out = f(block->shuffle[w]);
  block->warps[w]->arrive_and_wait();
  return out;
}

template <typename T>
T shuffle(T v, int src) {  // src < 0: the caller's own value
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return exchange(bits, [&](const std::array<uint64_t, 32>& posted) {
    T out = v;
    if (src >= 0) std::memcpy(&out, &posted[src], sizeof(T));
    return out;
  });
}

}  // namespace cuda_sim

#define threadIdx cuda_sim::thread_idx
#define blockIdx cuda_sim::block_idx
#define blockDim cuda_sim::block_dim

inline void __syncthreads() { cuda_sim::block->all.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuda_sim::block->warps[threadIdx.x >> 5]->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  return cuda_sim::shuffle(v, static_cast<int>(threadIdx.x & 31) ^ lane_mask);
}

template <typename T>
T __shfl_sync(unsigned, T v, int src) {
  return cuda_sim::shuffle(v, src & 31);
}

template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned delta) {
  const int src = static_cast<int>(threadIdx.x & 31) - static_cast<int>(delta);
  return cuda_sim::shuffle(v, src);
}

// One exchange for all 32 lanes (not 32 shuffles).
inline unsigned __ballot_sync(unsigned, bool pred) {
  return cuda_sim::exchange(pred, [](const std::array<uint64_t, 32>& posted) {
    unsigned bits = 0;
    for (int src = 0; src < 32; ++src) bits |= static_cast<unsigned>(posted[src] != 0) << src;
    return bits;
  });
}

inline unsigned __reduce_max_sync(unsigned, unsigned v) {
  return cuda_sim::exchange(v, [](const std::array<uint64_t, 32>& posted) {
    unsigned m = 0;
    for (int src = 0; src < 32; ++src) m = std::max(m, static_cast<unsigned>(posted[src]));
    return m;
  });
}

inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline long long __double_as_longlong(double d) {
  long long u;
  std::memcpy(&u, &d, sizeof(u));
  return u;
}

inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }

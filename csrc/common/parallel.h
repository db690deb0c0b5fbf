// How the CPU kernels hand their tasks to at::parallel_for.
#pragma once

#include <algorithm>
#include <cstdint>

namespace pyvision_ops {

// Work (in multiply-adds; callers count an exp or a bilinear tap as several) below which a
// call stays on one thread. Waking the pool costs microseconds, more than a tiny input's
// whole work, and a fork()ed child whose parent ran OpenMP regions can hang in its first one.
constexpr int64_t kSerialWork = 32768;  // as at::internal::GRAIN_SIZE

// The grain for `tasks` tasks that hold `work` in all: chunks of at least kSerialWork (a
// task each once a task holds that much).
inline int64_t grain_for(int64_t tasks, int64_t work) {
  const int64_t per_task = std::max<int64_t>(work / std::max<int64_t>(tasks, 1), 1);
  return std::max<int64_t>(kSerialWork / per_task, 1);
}

}  // namespace pyvision_ops

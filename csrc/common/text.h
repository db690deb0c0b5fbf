// Numbers in error messages. Pass std::to_string(int) or real_text(x) to TORCH_CHECK, never
// the number itself: built with GCC 13 against torch 2.11 (the lent GPU machine), the
// extension's inlined ostream << long crashed (SIGSEGV) while c10::str formatted a message.
#pragma once

#include <cstdio>
#include <string>

namespace pyvision_ops {

inline std::string real_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);  // "inf", "nan", "-3", "1e-39"
  return buf;
}

}  // namespace pyvision_ops

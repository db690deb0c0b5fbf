// Numbers in error messages. Pass std::to_string(int) or real_text(x) to TORCH_CHECK, never
// the number itself: built with GCC 13 against torch 2.11 (the lent GPU machine), the
// extension's inlined ostream << long crashed (SIGSEGV) while c10::str formatted a message.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

namespace pyvision_ops {

// The shortest "%.Ng" that reads back as v: "inf", "nan", "-3", "1e-39", "2.0000000001".
inline std::string real_text(double v) {
  char buf[32];
  for (int digits = 6; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, v);
    if (!(v == v) || std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

}  // namespace pyvision_ops

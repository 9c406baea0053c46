// Run-time CPU feature checks. Code is compiled for baseline x86-64 (or aarch64); functions that use
// AVX2 carry LENS_FAST_TARGET_AVX2 and are only called when cpu_has_avx2() says so.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define LENS_FAST_X86 1
#include <immintrin.h>
#define LENS_FAST_TARGET_AVX2 __attribute__((target("avx2,bmi,bmi2,popcnt,lzcnt")))
#else
#define LENS_FAST_X86 0
#define LENS_FAST_TARGET_AVX2
#endif

namespace lens_fast {

inline bool cpu_has_avx2() {
#if LENS_FAST_X86
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2") &&
                          __builtin_cpu_supports("popcnt");
  return has;
#else
  return false;
#endif
}

}  // namespace lens_fast

// Run-time choice of the widest instruction set this CPU has, so one build of
// accelops._C runs on any x86-64 (the SIMD paths carry per-function target attributes).
#pragma once
#include <cstdlib>
#include <cstring>
#include <string>

namespace accelops {

enum class Isa { Scalar = 0, Avx2 = 1 };

inline bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

inline bool cpu_has(const char* feature) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (!std::strcmp(feature, "avx2")) return __builtin_cpu_supports("avx2");
  if (!std::strcmp(feature, "fma")) return __builtin_cpu_supports("fma");
  if (!std::strcmp(feature, "f16c")) return __builtin_cpu_supports("f16c");
  if (!std::strcmp(feature, "avx512f")) return __builtin_cpu_supports("avx512f");
  if (!std::strcmp(feature, "avx512bw")) return __builtin_cpu_supports("avx512bw");
  if (!std::strcmp(feature, "avx512vnni")) return __builtin_cpu_supports("avx512vnni");
  if (!std::strcmp(feature, "avxvnni")) return __builtin_cpu_supports("avxvnni");
#endif
  (void)feature;
  return false;
}

// ACCELOPS_CPU_ISA=scalar forces the portable path (tests run both paths on one machine).
inline Isa active_isa() {
  const char* forced = std::getenv("ACCELOPS_CPU_ISA");
  if (forced && std::string(forced) == "scalar") return Isa::Scalar;
  return cpu_has_avx2() ? Isa::Avx2 : Isa::Scalar;
}

inline const char* isa_name(Isa isa) { return isa == Isa::Avx2 ? "avx2" : "scalar"; }

}  // namespace accelops

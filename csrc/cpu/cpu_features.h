// Run-time choice of the widest instruction set this CPU has, so one build of
// accelops._C runs on any x86-64 (the SIMD paths carry per-function target attributes).
//
// Two questions, two functions:
// * active_isa(): the vector level every kernel may use, Scalar or Avx2 (the FFN and comm
//   kernels only have those two paths; the fake-quant kernels add an AVX-512 F/BW/VL path
//   of their own, taken when the cap allows avx512vnni: fq_isa() in fake_quant.cpp).
// * active_dot_isa(): the level of the int8 dot-product kernels (int8 and ternary GEMM),
//   Scalar, Avx2 or Avx512Vnni (512-bit vpdpbusd). AvxVnni is never returned (see
//   has_dot_kernels): AVX-VNNI's 256-bit vpdpbusd is used only by the ternary M = 1 GEMV,
//   which picks it inside the Avx2 level (gemv_vnni256 in ternary.cpp).
// ACCELOPS_CPU_ISA=scalar|avx2|avxvnni|avx512vnni caps both at that level (tests run every
// path the CPU has on one machine). A level the CPU lacks falls back to the best one it has
// below it, never above: cpu_isa() (accelops info) reports the level actually in use, and
// accelops._C.cpu_isas() the levels this CPU can run that have kernels. Any other value raises.
#pragma once
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace accelops {

// Ordered: a higher level implies the paths of every lower one.
enum class Isa { Scalar = 0, Avx2 = 1, AvxVnni = 2, Avx512Vnni = 3 };

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
  if (!std::strcmp(feature, "avx512vl")) return __builtin_cpu_supports("avx512vl");
  if (!std::strcmp(feature, "avx512vnni")) return __builtin_cpu_supports("avx512vnni");
  if (!std::strcmp(feature, "avx512vbmi")) return __builtin_cpu_supports("avx512vbmi");
  if (!std::strcmp(feature, "avxvnni")) return __builtin_cpu_supports("avxvnni");
#endif
  (void)feature;
  return false;
}

// True when this CPU (and OS: __builtin_cpu_supports checks XCR0 for AVX-512 state) can run
// the paths of `isa`.
inline bool cpu_supports(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return true;
    case Isa::Avx2:
      return cpu_has_avx2();
    case Isa::AvxVnni:
      return cpu_has_avx2() && cpu_has("avxvnni");
    case Isa::Avx512Vnni:
      return cpu_has_avx2() && cpu_has("avx512f") && cpu_has("avx512bw") && cpu_has("avx512vl") &&
             cpu_has("avx512vnni");
  }
  return false;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Vnni:
      return "avx512vnni";
    case Isa::AvxVnni:
      return "avxvnni";
    case Isa::Avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

// The level ACCELOPS_CPU_ISA asks for (Avx512Vnni, the highest, when unset).
inline Isa requested_isa() {
  const char* forced = std::getenv("ACCELOPS_CPU_ISA");
  if (!forced || !*forced) return Isa::Avx512Vnni;
  for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni})
    if (std::string(forced) == isa_name(isa)) return isa;
  throw std::invalid_argument(std::string("ACCELOPS_CPU_ISA must be one of scalar, avx2, avxvnni, avx512vnni, got '") +
                              forced + "'");
}

// Levels with a full set of dot kernels. AvxVnni (256-bit vpdpbusd, for CPUs with AVX-VNNI
// but no AVX-512) has only the ternary M = 1 GEMV: a CPU with it runs the Avx2 level, whose
// GEMV then takes the vpdpbusd path (also with ACCELOPS_CPU_ISA=avxvnni on an AVX-512 VNNI
// CPU, through the EVEX form), and cpu_isa() reports avx2.
inline bool has_dot_kernels(Isa isa) { return isa != Isa::AvxVnni; }

inline Isa active_dot_isa() {
  int level = static_cast<int>(requested_isa());
  while (level > 0 && !(cpu_supports(static_cast<Isa>(level)) && has_dot_kernels(static_cast<Isa>(level)))) --level;
  return static_cast<Isa>(level);
}

inline Isa active_isa() { return active_dot_isa() == Isa::Scalar ? Isa::Scalar : Isa::Avx2; }

}  // namespace accelops

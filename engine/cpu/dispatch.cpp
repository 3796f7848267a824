// Run-time choice of the kernel table: what CPUID reports AND what the OS has enabled (XGETBV), never CPUID alone —
// on some machines here AMX is listed but not granted, and AVX-512 may be absent altogether.
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace stb::cpu {

namespace {

struct CpuFeatures {
  bool avx2 = false;    // AVX2 + FMA + F16C with YMM state enabled
  bool avx512 = false;  // AVX-512 F/BW/VL/DQ with ZMM state enabled
  bool avx512_vnni = false;
};

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  if (!(osxsave && fma && f16c && avx)) return f;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0x6) != 0x6 || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
  f.avx2 = b & (1u << 5);
  const bool avx512_cpu = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));
  f.avx512 = f.avx2 && avx512_cpu && (xcr0_lo & 0xE0) == 0xE0;  // opmask, ZMM0-15 high halves, ZMM16-31
  f.avx512_vnni = f.avx512 && (c & (1u << 11));
#endif
  return f;
}

const CpuFeatures& features() {
  static const CpuFeatures f = detect();
  return f;
}

}  // namespace

bool cpu_has_avx512_vnni() { return features().avx512_vnni; }

const Kernels& best_kernels() {
  const CpuFeatures& f = features();
  const char* wanted = std::getenv("STBLLM_KERNELS");
  const std::string want = wanted ? wanted : "";
  if (want != "scalar" && want != "avx2" && f.avx512 && avx512_kernels()) return *avx512_kernels();
  if (want != "scalar" && f.avx2 && avx2_kernels()) return *avx2_kernels();
  return scalar_kernels();
}

}  // namespace stb::cpu

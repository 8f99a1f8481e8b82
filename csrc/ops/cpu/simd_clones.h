// RG_SIMD_CLONES: compile a CPU kernel's hot loop for AVX-512, AVX2 and the baseline and choose
// at load time (GCC's target_clones on x86-64 Linux; a no-op elsewhere). The build targets
// baseline x86-64, so without it the loops would not use the wider vectors.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RG_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RG_SIMD_CLONES
#endif

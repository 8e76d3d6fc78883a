// KERNEL_TARGETS: a function compiled once per instruction set (AVX-512, AVX2, baseline); the
// loader picks the best one for the running CPU. GCC on x86-64 only; elsewhere one plain build.
//
// ALWAYS_INLINE: for every helper a KERNEL_TARGETS function calls in its loops. One left out is
// compiled once, for the baseline target, and each call from an AVX-512 clone spills the live
// vector registers (a mask lookup left as a call made the convolution's backward 3x slower).
#pragma once

#define ALWAYS_INLINE __attribute__((always_inline)) inline

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KERNEL_TARGETS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KERNEL_TARGETS
#endif

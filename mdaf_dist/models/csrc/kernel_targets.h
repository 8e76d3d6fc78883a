// KERNEL_TARGETS: a function compiled once per instruction set (AVX-512, AVX2, baseline); the
// loader picks the best one for the running CPU. GCC on x86-64 only; elsewhere one plain build.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KERNEL_TARGETS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KERNEL_TARGETS
#endif

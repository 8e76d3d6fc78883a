// The Mamba block's CPU kernels: the selective scan, and the causal depthwise convolution + SiLU
// before it. Both run as torch ops (torch.ops.mdaf_dist.*), registered below; no Python.h needed.
//
// 1. The selective scan fused for the CPU: forward and backward in one pass over time per
// (batch, block of 16 channels). The 16 channels are the lanes of one vector, so each state n of
// the block is one vector, the N states are N independent recurrences for the out-of-order core to
// overlap, and C_t . h_t sums over n with vector multiply-adds (no sum across lanes per step).
// u, delta, z and the output are [batch, L, d_inner] in the Mamba block, so a block's 16 channels
// of one step are 16 contiguous floats. The D skip and the z gate are applied in the same pass.
// Forward and backward work is split over samples on torch's intra-op threads (at::parallel_for):
// a sample's channel blocks share its B and C rows, and in the backward add into its grad B, C.
//
// Semantics and layouts are those of mamba_ssm's selective_scan_fn with real A, delta_bias and the
// softplus included, plus a mask over steps (a padded step gets the step size 0, which carries the
// state over unchanged):
//   dt_t = softplus(delta_t + delta_bias) mask_t    (bias, softplus and mask each optional)
// where delta may come as its low-rank factor, delta = delta_proj @ delta_low (Mamba's dt_proj:
// delta_low [batch, R, L], delta_proj [d_inner, R]), so that [batch, d_inner, L] delta and its
// gradient are never formed, nor the two thin products that would make them.
//   h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,   y_t = C_t . h_t + D u_t,   out_t = y_t silu(z_t)
// u, delta, z: [batch, d_inner, L]; A: [d_inner, N] contiguous; B, C: [batch, N, L]; D, delta_bias:
// [d_inner]; mask: [batch, L]. Any strides are read as they are, so callers pass transposed views
// without copying them. Computing dt here spares the block its [batch, L, d_inner] tensors of
// delta + bias, its softplus and the masked product, forward and backward.
// With last_only the output is out_{L-1} alone, [batch, d_inner], what a reader of right-aligned
// sequences takes; its gradient then reaches the last step only.
//
// Nothing is saved between forward and backward but the inputs: the backward recomputes the states
// of one (batch, channel block, chunk of kChunk states) over the whole sequence into a per-thread
// [L + 1, kChunk] buffer of vectors, then runs the gradient of those states backwards in time. Its
// memory is O(threads L N).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <vector>

#include "kernel_targets.h"

// No NaNs or infinities reach the kernels' arithmetic (exp2_vec clamps its argument), so the
// clamps compile to one min or max instruction each instead of a compare and a blend.
#pragma GCC optimize("finite-math-only", "no-signed-zeros")

namespace {

// GCC vector-extension vectors of 16 floats; the compiler lowers each vector op to one AVX-512,
// two AVX2 or four SSE instructions, whichever clone runs. Channels past d_inner in the last block
// are zero lanes (delta = u = A = D = 0): their state stays 0 and adds nothing.
constexpr int64_t kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;

// 2^y: Cephes' exp2f (2^f by a degree-6 polynomial on f = y - round(y) in [-1/2, 1/2], 2^round(y)
// through the exponent bits; Cephes documents a relative error below 2e-7), with y clamped to
// [-125, 127] (below, 2^-125 ~ 2.4e-38 stands for 0); plain vector arithmetic where the library's
// exp2f would be one call per value. The scan keeps A in log2 units, A log2(e), so that its
// decays exp(delta A) are 2^(delta A log2 e) with no range reduction by ln 2.
ALWAYS_INLINE Vec exp2_vec(Vec y) {
  y = y < -125.0f ? Vec{} - 125.0f : y;
  y = y > 127.0f ? Vec{} + 127.0f : y;
  // adding 1.5 * 2^23 rounds y to an integer k, which lands in the low bits: bits(r) = 0x4b400000 + k
  const Vec r = y + 12582912.0f;
  const Vec f = y - (r - 12582912.0f);
  Vec p = f * 1.535336188319500e-4f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const IVec bits = (reinterpret_cast<const IVec&>(r) - (0x4b400000 - 127)) << 23;  // 2^k
  return p * reinterpret_cast<const Vec&>(bits);
}

ALWAYS_INLINE Vec sigmoid_vec(Vec x) { return 1.0f / (1.0f + exp2_vec(x * -kLog2e)); }

// ln(x) for x >= 1: Cephes' logf (x = m 2^e with m in [sqrt(1/2), sqrt(2)), ln(m) by a degree-9
// polynomial; Cephes documents a relative error below 1e-7 on the range).
ALWAYS_INLINE Vec log_vec(Vec x) {
  const IVec bits = reinterpret_cast<const IVec&>(x);
  Vec e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, Vec);
  const IVec mantissa_bits = (bits & 0x007fffff) | 0x3f000000;  // m in [1/2, 1)
  Vec m = reinterpret_cast<const Vec&>(mantissa_bits);
  const auto small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const Vec z = m * m;
  Vec p = m * 7.0376836292e-2f - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  Vec y = m * z * p + e * -2.12194440e-4f - 0.5f * z;
  return m + y + e * 0.693359375f;
}

// softplus(x) = max(x, 0) + ln(1 + exp(-|x|)), its logarithm as log1p (ln(w) y / (w - 1) with
// w = 1 + y keeps the relative precision of a tiny y). Above x = 20 it equals x in float32, as
// torch's softplus (threshold 20) returns.
ALWAYS_INLINE Vec softplus_vec(Vec x) {
  const Vec y = exp2_vec((x < 0.0f ? x : -x) * kLog2e);
  const Vec w = 1.0f + y;
  const Vec d = w - 1.0f;
  const Vec log1p = d == 0.0f ? y : log_vec(w) * y / (d == 0.0f ? Vec{} + 1.0f : d);  // no 0 / 0 in any lane
  return (x > 0.0f ? x : Vec{}) + log1p;
}

typedef float Half __attribute__((vector_size(kLanes / 2 * sizeof(float))));
typedef float Quarter __attribute__((vector_size(kLanes / 4 * sizeof(float))));

// A tree of halving sums: a chain of 4 additions where a loop over the lanes would chain 16.
ALWAYS_INLINE float sum_lanes(Vec v) {
  const Half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

ALWAYS_INLINE Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

ALWAYS_INLINE void store_vec(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// Flush-to-zero and denormals-are-zero on this thread while it lives. The gradient reaching
// a state decays backwards in time by exp(delta A) per step: from a loss on the last step alone
// (Mamba4Rec reads only that one) it falls below 1.2e-38 within a few steps, and every product
// with such a denormal value would take a microcode assist (the backward ran 10x slower).
class FlushDenormals {
 public:
#if defined(__SSE__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ (bit 15), DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

// A [batch, d, L] (or [batch, N, L]) tensor read through its strides.
struct Strided3 {
  float* data;
  int64_t s0, s1, s2;
  // An undefined or empty tensor (an absent z) reads as not defined().
  explicit Strided3(const at::Tensor& t) : data(nullptr), s0(0), s1(0), s2(0) {
    if (t.defined() && t.numel() > 0) {
      data = t.data_ptr<float>();
      s0 = t.stride(0), s1 = t.stride(1), s2 = t.stride(2);
    }
  }
  float& operator()(int64_t i, int64_t j, int64_t k) const { return data[i * s0 + j * s1 + k * s2]; }
  bool defined() const { return data != nullptr; }
};

// A [batch, L] (or [batch, d]) tensor read through its strides; an absent one is not defined().
struct Strided2 {
  float* data;
  int64_t s0, s1;
  explicit Strided2(const at::Tensor& t) : data(nullptr), s0(0), s1(0) {
    if (t.defined() && t.numel() > 0) {
      data = t.data_ptr<float>();
      s0 = t.stride(0), s1 = t.stride(1);
    }
  }
  float& operator()(int64_t i, int64_t j) const { return data[i * s0 + j * s1]; }
  bool defined() const { return data != nullptr; }
};

// Zeroed storage of whole vectors, 64-byte aligned for the AVX-512 clone: alignof(Vec) is
// capped by the baseline target (16 bytes with SSE2), so std::vector<Vec> is not enough.
class Rows {
 public:
  explicit Rows(int64_t count)
      : size_(count), data_(static_cast<Vec*>(std::aligned_alloc(sizeof(Vec), std::max<int64_t>(count, 1) * sizeof(Vec)))) {
    TORCH_CHECK(data_ != nullptr, "fused CPU scan: out of memory");
    std::fill(data_, data_ + size_, Vec{});
  }
  Rows(Rows&& other) noexcept : size_(other.size_), data_(other.data_) { other.data_ = nullptr; }
  Rows(const Rows&) = delete;
  Rows& operator=(const Rows&) = delete;
  ~Rows() { std::free(data_); }
  Vec* data() const { return data_; }
  int64_t size() const { return size_; }
  Vec& operator[](int64_t i) const { return data_[i]; }

 private:
  int64_t size_;
  Vec* data_;
};

struct Problem {
  int64_t batch, d_inner, length, n, blocks;  // blocks: channel blocks of kLanes
  Rows A2;                             // A log2(e), [blocks, N], a channel per lane
  Rows D;                              // [blocks], zero without D
  Rows delta_bias;                     // [blocks], zero without delta_bias
  int64_t rank;                        // R of a low-rank delta, 0 for a full one
  Rows delta_proj;                     // [blocks, R]
  bool softplus, last_only;
  Strided3 u, delta, B, C, z;          // delta: [batch, d_inner, L], or [batch, R, L] with rank > 0
  Strided2 mask;                       // [batch, L], or not defined()
  int64_t width(int64_t block) const { return std::min(kLanes, d_inner - block * kLanes); }
};

// x[b, block's channels, :] as L vectors (zero lanes past d_inner), and back.
ALWAYS_INLINE void load_block(const Strided3& x, int64_t b, int64_t c0, int64_t width, int64_t length, Vec* out) {
  if (x.s1 == 1 && width == kLanes) {  // the block's channels are contiguous
    for (int64_t t = 0; t < length; ++t) out[t] = load_vec(&x(b, c0, t));
    return;
  }
  for (int64_t t = 0; t < length; ++t) {
    Vec v{};
    for (int64_t j = 0; j < width; ++j) v[j] = x(b, c0 + j, t);
    out[t] = v;
  }
}

ALWAYS_INLINE void store_block(const Vec* in, int64_t b, int64_t c0, int64_t width, int64_t length, const Strided3& x) {
  if (x.s1 == 1 && width == kLanes) {
    for (int64_t t = 0; t < length; ++t) store_vec(&x(b, c0, t), in[t]);
    return;
  }
  for (int64_t t = 0; t < length; ++t)
    for (int64_t j = 0; j < width; ++j) x(b, c0 + j, t) = in[t][j];
}

// x[b, block's channels] of a [batch, d] tensor, and back.
ALWAYS_INLINE Vec load_channels(const Strided2& x, int64_t b, int64_t c0, int64_t width) {
  Vec v{};
  for (int64_t j = 0; j < width; ++j) v[j] = x(b, c0 + j);
  return v;
}

ALWAYS_INLINE void store_channels(Vec v, int64_t b, int64_t c0, int64_t width, const Strided2& x) {
  for (int64_t j = 0; j < width; ++j) x(b, c0 + j) = v[j];
}

// The step sizes dt of a block over time, and with `slope` their derivative d dt / d delta
// (sigmoid(delta + bias) mask under the softplus, mask without).
ALWAYS_INLINE void load_steps(const Problem& p, int64_t b, int64_t block, Vec* dt, Vec* slope) {
  const Vec bias = p.delta_bias[block];
  if (p.rank == 0) {
    load_block(p.delta, b, block * kLanes, p.width(block), p.length, dt);
  } else {
    const Vec* proj = p.delta_proj.data() + block * p.rank;
    for (int64_t t = 0; t < p.length; ++t) {
      Vec raw{};
      for (int64_t r = 0; r < p.rank; ++r) raw += proj[r] * p.delta(b, r, t);
      dt[t] = raw;
    }
  }
  for (int64_t t = 0; t < p.length; ++t) {
    const float m = p.mask.defined() ? p.mask(b, t) : 1.0f;
    const Vec x = dt[t] + bias;
    dt[t] = (p.softplus ? softplus_vec(x) : x) * m;
    if (slope != nullptr) slope[t] = p.softplus ? sigmoid_vec(x) * m : Vec{} + m;
  }
}

// x[b] ([N, L] through strides) as L rows of N floats.
ALWAYS_INLINE void load_rows(const Strided3& x, int64_t b, int64_t length, int64_t n, float* out) {
  for (int64_t t = 0; t < length; ++t)
    for (int64_t k = 0; k < n; ++k) out[t * n + k] = x(b, k, t);
}

// x[b] of every channel block, [blocks, L] vectors, and back. With contiguous channels the loops run
// step by step over the blocks: one sequential pass over the sample's [L, d_inner] rows, which the
// prefetcher follows, where a pass per block strides across them (a cache miss each step).
ALWAYS_INLINE bool whole_rows(const Problem& p, const Strided3& x) { return x.s1 == 1 && p.d_inner % kLanes == 0; }

ALWAYS_INLINE void load_blocks(const Problem& p, const Strided3& x, int64_t b, Vec* out) {
  const int64_t L = p.length;
  if (whole_rows(p, x)) {
    for (int64_t t = 0; t < L; ++t)
      for (int64_t block = 0; block < p.blocks; ++block) out[block * L + t] = load_vec(&x(b, block * kLanes, t));
    return;
  }
  for (int64_t block = 0; block < p.blocks; ++block) load_block(x, b, block * kLanes, p.width(block), L, out + block * L);
}

ALWAYS_INLINE void store_blocks(const Problem& p, const Vec* in, int64_t b, const Strided3& x) {
  const int64_t L = p.length;
  if (whole_rows(p, x)) {
    for (int64_t t = 0; t < L; ++t)
      for (int64_t block = 0; block < p.blocks; ++block) store_vec(&x(b, block * kLanes, t), in[block * L + t]);
    return;
  }
  for (int64_t block = 0; block < p.blocks; ++block) store_block(in + block * L, b, block * kLanes, p.width(block), L, x);
}

// The rows of the next sample's [batch, L, channels] inputs, fetched into L2 a part at a time while
// this sample computes, so that its loads find them there instead of waiting on memory.
class NextRows {
 public:
  ALWAYS_INLINE NextRows(const Problem& p, int64_t b, std::initializer_list<const Strided3*> inputs) {
    if (b + 1 >= p.batch) return;
    for (const Strided3* x : inputs) {
      if (!x->defined() || !whole_rows(p, *x)) continue;
      begin_[count_] = reinterpret_cast<const char*>(&(*x)(b + 1, 0, 0));
      lines_[count_++] = ((p.length - 1) * x->s2 + p.d_inner) * int64_t(sizeof(float)) / 64;
    }
  }
  ALWAYS_INLINE void fetch(int64_t part, int64_t parts) const {
    for (int i = 0; i < count_; ++i)
      for (int64_t line = lines_[i] * part / parts; line < lines_[i] * (part + 1) / parts; ++line)
        __builtin_prefetch(begin_[i] + line * 64, 0, 2);
  }

 private:
  const char* begin_[3];
  int64_t lines_[3];
  int count_ = 0;
};

// The states of a channel block are visited kChunk at a time (register blocking): the chunk's
// states, and in the backward their gradients and grad A, stay in registers over all L steps.
// The backward runs every channel block of a sample through one chunk before the next chunk, so
// that the chunk's kept states and its parts of grad B and grad C stay in L1.
constexpr int64_t kChunk = 4;

// One channel block's series over time ([L] vectors each); the sums over states are the backward's.
struct Series {
  Vec *dt, *u, *y, *z, *g, *slope, *sum_GB, *sum_decay;
};

// Per-thread buffers: B and C rows of one sample, series over time of every channel block of a
// sample, and the backward's chunk buffers.
struct Scratch {
  std::vector<float> B, C;
  Rows dt, u, y, z;  // [blocks, L] vectors
  Rows g;  // backward: [blocks, L] the output's gradient, then y's
  Rows slope;  // backward: [blocks, L] d dt / d delta
  Rows sum_GB, sum_decay;  // backward: [blocks, L] sums over the states of G B_n and w A_n
  Rows states, decays;  // backward: [L + 1, kChunk] states of one chunk (row 0: zero), [L, kChunk] exp(delta_t A)
  Rows gB, gC;          // backward: [L, kChunk] per-lane parts of a chunk's grad B, grad C
  Rows gA, gD, gbias;   // backward: [blocks, N], [blocks], [blocks]: this thread's parts of grad A, D, delta_bias
  Rows gproj;           // backward: [blocks, R]: this thread's part of grad delta_proj
  Rows glow;            // backward: [L, R] one sample's grad delta_low, per lane (summed over blocks)
  Scratch(const Problem& p, bool backward)
      : B(p.length * p.n), C(p.length * p.n), dt(series(p)), u(series(p)), y(series(p)), z(series(p)),
        g(backward ? series(p) : 0), slope(backward ? series(p) : 0),
        sum_GB(backward ? series(p) : 0), sum_decay(backward ? series(p) : 0),
        states(backward ? (p.length + 1) * kChunk : 0), decays(backward ? p.length * kChunk : 0),
        gB(backward ? p.length * kChunk : 0), gC(backward ? p.length * kChunk : 0),
        gA(backward ? p.blocks * p.n : 0), gD(backward ? p.blocks : 0), gbias(backward ? p.blocks : 0),
        gproj(backward ? p.blocks * p.rank : 0), glow(backward ? p.length * p.rank : 0) {}

  static int64_t series(const Problem& p) { return p.blocks * p.length; }

  ALWAYS_INLINE Series of(const Problem& p, int64_t block) {
    const int64_t at = block * p.length;
    Vec* none = nullptr;
    return {dt.data() + at, u.data() + at, y.data() + at, z.data() + at, g.size() ? g.data() + at : none,
            slope.size() ? slope.data() + at : none, sum_GB.size() ? sum_GB.data() + at : none,
            sum_decay.size() ? sum_decay.data() + at : none};
  }

  ALWAYS_INLINE void load_sample(const Problem& p, int64_t b) {
    load_rows(p.B, b, p.length, p.n, B.data());
    load_rows(p.C, b, p.length, p.n, C.data());
  }
};

// One step t of the states n0 .. n0 + K of a channel block: h <- exp(dt A) h + dt B u, and with kY
// y_t += C_t . h_t.
template <int kCount, bool keep, bool kY>
ALWAYS_INLINE void scan_step(const Problem& p, int64_t t, int64_t n0, int64_t K, const Vec* a, Vec* h, const Series& x,
                             Scratch& s) {
  const Vec dt = x.dt[t], du = dt * x.u[t];
  const float* Bt = s.B.data() + t * p.n + n0;
  const float* Ct = s.C.data() + t * p.n + n0;
  Vec y = kY ? x.y[t] : Vec{};
  for (int64_t j = 0; j < K; ++j) {
    const Vec decay = exp2_vec(dt * a[j]);
    h[j] = decay * h[j] + du * Bt[j];
    if (kY) y += h[j] * Ct[j];
    if (keep) {
      s.decays[t * kChunk + j] = decay;
      s.states[(t + 1) * kChunk + j] = h[j];
    }
  }
  if (kY) x.y[t] = y;
}

// The states n0 .. n0 + count of a channel block over time, adding C_t . h_t into x.y (at the
// last step only with last_only: no other y is read); with `keep`, the states and decays also go
// to s.states and s.decays for the backward.
// kCount: count at compile time (kChunk: the state loop unrolls into registers) or 0 (count < kChunk).
template <int kCount, bool keep>
ALWAYS_INLINE void scan_chunk(const Problem& p, const Vec* A2, int64_t n0, int64_t count, const Series& x, Scratch& s) {
  const int64_t K = kCount ? kCount : count, last = p.length - 1;
  Vec h[kChunk] = {}, a[kChunk];
  for (int64_t j = 0; j < K; ++j) a[j] = A2[n0 + j];
  if (keep) std::fill(s.states.data(), s.states.data() + kChunk, Vec{});
  for (int64_t t = 0; t < last; ++t) {
    if (p.last_only) {
      scan_step<kCount, keep, false>(p, t, n0, K, a, h, x, s);
    } else {
      scan_step<kCount, keep, true>(p, t, n0, K, a, h, x, s);
    }
  }
  scan_step<kCount, keep, true>(p, last, n0, K, a, h, x, s);
}

KERNEL_TARGETS
void forward_sample(const Problem& p, int64_t b, const Strided3& out, const Strided2& out_last, Scratch& s) {
  const int64_t L = p.length;
  s.load_sample(p, b);
  load_blocks(p, p.u, b, s.u.data());
  if (p.z.defined()) load_blocks(p, p.z, b, s.z.data());
  const NextRows next(p, b, {&p.u, &p.z});
  for (int64_t block = 0; block < p.blocks; ++block) {
    const Vec* A2 = p.A2.data() + block * p.n;
    const Vec D = p.D[block];
    const Series x = s.of(p, block);
    next.fetch(block, p.blocks);
    load_steps(p, b, block, x.dt, nullptr);
    for (int64_t t = 0; t < L; ++t) x.y[t] = D * x.u[t];
    // whole chunks unrolled, the rest generic (no lambdas: they would miss this function's target clones)
    int64_t n0 = 0;
    for (; n0 + kChunk <= p.n; n0 += kChunk) scan_chunk<kChunk, false>(p, A2, n0, kChunk, x, s);
    if (n0 < p.n) scan_chunk<0, false>(p, A2, n0, p.n - n0, x, s);
    if (p.z.defined()) {
      for (int64_t t = p.last_only ? L - 1 : 0; t < L; ++t) x.y[t] *= x.z[t] * sigmoid_vec(x.z[t]);  // silu(z)
    }
    if (p.last_only) store_channels(x.y[L - 1], b, block * kLanes, p.width(block), out_last);
  }
  if (!p.last_only) store_blocks(p, s.y.data(), b, out);
}

// The output's gradient of every block, [blocks, L] vectors: zero before the last step with last_only.
ALWAYS_INLINE void load_grads(const Problem& p, const Strided3& grad_out, const Strided2& grad_last, int64_t b, Vec* g) {
  if (!p.last_only) {
    load_blocks(p, grad_out, b, g);
    return;
  }
  const int64_t L = p.length;
  for (int64_t block = 0; block < p.blocks; ++block) {
    std::fill(g + block * L, g + block * L + L - 1, Vec{});
    g[block * L + L - 1] = load_channels(grad_last, b, block * kLanes, p.width(block));
  }
}

struct Grads {
  Strided3 u, delta, B, C, z;
};

// One step back in time: G_t = C_t gy_t + exp(delta_{t+1} A) G_{t+1} is the gradient reaching h_t
// (kGy false: gy_t is zero, as before the last step with last_only, and C_t's gradient too).
// h: the states h_t on entry (carried over from the step after, in registers), h_{t-1} on return.
template <int kCount, bool kGy>
ALWAYS_INLINE void grad_step(const Problem& p, int64_t t, int64_t n0, int64_t K, const Vec* a, Vec* G_next, Vec* gA_chunk,
                             Vec* h, const Series& x, Scratch& s) {
  const Vec dt = x.dt[t], gy = x.g[t], du = dt * x.u[t];
  const float* Bt = s.B.data() + t * p.n + n0;
  const float* Ct = s.C.data() + t * p.n + n0;
  Vec* gBt = s.gB.data() + t * kChunk;
  Vec* gCt = s.gC.data() + t * kChunk;
  const Vec* prev = s.states.data() + t * kChunk;
  const Vec* decay = s.decays.data() + t * kChunk;
  Vec sum_GB{}, sum_decay{};
  for (int64_t j = 0; j < K; ++j) {
    const Vec G = kGy ? G_next[j] + gy * Ct[j] : G_next[j];
    if (kGy) gCt[j] += gy * h[j];
    gBt[j] += G * du;
    sum_GB += G * Bt[j];
    h[j] = prev[j];
    const Vec decay_G = decay[j] * G;
    const Vec w = decay_G * h[j];  // through exp(delta_t A) h_{t-1}
    sum_decay += w * a[j];
    gA_chunk[j] += w * dt;
    G_next[j] = decay_G;
  }
  x.sum_GB[t] += sum_GB;
  x.sum_decay[t] += sum_decay;
}

// Reverse time over the states n0 .. n0 + count, after scan_chunk<.., true> kept them.
template <int kCount>
ALWAYS_INLINE void grad_chunk(const Problem& p, const Vec* A2, Vec* gA, int64_t n0, int64_t count, const Series& x,
                              Scratch& s) {
  const int64_t K = kCount ? kCount : count, last = p.length - 1;
  Vec G_next[kChunk] = {}, gA_chunk[kChunk] = {}, a[kChunk], h[kChunk];  // G_next: exp(delta_{t+1} A) G_{t+1}
  for (int64_t j = 0; j < K; ++j) a[j] = A2[n0 + j], h[j] = s.states[(last + 1) * kChunk + j];
  grad_step<kCount, true>(p, last, n0, K, a, G_next, gA_chunk, h, x, s);
  for (int64_t t = last - 1; t >= 0; --t) {
    if (p.last_only) {
      grad_step<kCount, false>(p, t, n0, K, a, G_next, gA_chunk, h, x, s);
    } else {
      grad_step<kCount, true>(p, t, n0, K, a, G_next, gA_chunk, h, x, s);
    }
  }
  for (int64_t j = 0; j < K; ++j) gA[n0 + j] += gA_chunk[j];
}

// One chunk of states through every channel block of sample b, then its grad B and grad C.
template <int kCount>
ALWAYS_INLINE void backward_chunk(const Problem& p, int64_t b, int64_t n0, int64_t count, const Grads& g, Scratch& s,
                                  const NextRows& next) {
  std::fill(s.gB.data(), s.gB.data() + s.gB.size(), Vec{});
  std::fill(s.gC.data(), s.gC.data() + s.gC.size(), Vec{});
  const int64_t chunks = (p.n + kChunk - 1) / kChunk;
  for (int64_t block = 0; block < p.blocks; ++block) {
    next.fetch(n0 / kChunk * p.blocks + block, chunks * p.blocks);
    const Vec* A2 = p.A2.data() + block * p.n;
    const Series x = s.of(p, block);
    scan_chunk<kCount, true>(p, A2, n0, count, x, s);
    grad_chunk<kCount>(p, A2, s.gA.data() + block * p.n, n0, count, x, s);
  }
  // the sums over channels, i.e. over lanes
  for (int64_t t = 0; t < p.length; ++t)
    for (int64_t j = 0; j < count; ++j) {
      g.B(b, n0 + j, t) = sum_lanes(s.gB[t * kChunk + j]);
      g.C(b, n0 + j, t) = sum_lanes(s.gC[t * kChunk + j]);
    }
}

KERNEL_TARGETS
void backward_sample(const Problem& p, int64_t b, const Strided3& grad_out, const Strided2& grad_last, const Grads& g,
                     Scratch& s) {
  const int64_t L = p.length;
  s.load_sample(p, b);
  load_blocks(p, p.u, b, s.u.data());
  load_grads(p, grad_out, grad_last, b, s.g.data());
  if (p.z.defined()) load_blocks(p, p.z, b, s.z.data());
  // Every block's step sizes, and the gradient of y before the gate (which needs only z); z's
  // buffer takes grad out silu'(z), which times y is grad z.
  for (int64_t block = 0; block < p.blocks; ++block) {
    const Vec D = p.D[block];
    const Series x = s.of(p, block);
    load_steps(p, b, block, x.dt, x.slope);
    if (p.z.defined()) {
      for (int64_t t = 0; t < L; ++t) {
        const Vec z = x.z[t], sz = sigmoid_vec(z);
        x.z[t] = x.g[t] * sz * (1.0f + z * (1.0f - sz));
        x.g[t] *= z * sz;
      }
    }
    for (int64_t t = 0; t < L; ++t) {
      x.y[t] = D * x.u[t];
      x.sum_GB[t] = x.sum_decay[t] = Vec{};
    }
  }
  // Per chunk of states: recompute them (and y_t), then their gradients backwards in time.
  const NextRows next(p, b, {&p.u, &grad_out, &p.z});
  int64_t n0 = 0;
  for (; n0 + kChunk <= p.n; n0 += kChunk) backward_chunk<kChunk>(p, b, n0, kChunk, g, s, next);
  if (n0 < p.n) backward_chunk<0>(p, b, n0, p.n - n0, g, s, next);
  std::fill(s.glow.data(), s.glow.data() + s.glow.size(), Vec{});
  for (int64_t block = 0; block < p.blocks; ++block) {
    const Vec D = p.D[block];
    const Series x = s.of(p, block);
    Vec gD{}, gbias{};
    for (int64_t t = 0; t < L; ++t) {
      const Vec dt = x.dt[t], u = x.u[t], gy = x.g[t];
      gD += gy * u;
      // grad delta (A = A2 ln 2) through dt's slope, in delta's buffer
      x.dt[t] = (u * x.sum_GB[t] + x.sum_decay[t] * kLn2) * x.slope[t];
      gbias += x.dt[t];
      x.u[t] = dt * x.sum_GB[t] + D * gy;  // grad u, in u's buffer
    }
    s.gD[block] += gD;
    s.gbias[block] += gbias;
    if (p.rank > 0) {  // through delta = delta_proj @ delta_low
      const Vec* proj = p.delta_proj.data() + block * p.rank;
      Vec* gproj = s.gproj.data() + block * p.rank;
      for (int64_t t = 0; t < L; ++t)
        for (int64_t r = 0; r < p.rank; ++r) {
          s.glow[t * p.rank + r] += x.dt[t] * proj[r];
          gproj[r] += x.dt[t] * p.delta(b, r, t);
        }
    }
    if (p.z.defined()) {
      for (int64_t t = 0; t < L; ++t) x.z[t] *= x.y[t];  // grad z, in z's buffer
    }
  }
  store_blocks(p, s.u.data(), b, g.u);
  if (p.rank == 0) store_blocks(p, s.dt.data(), b, g.delta);
  if (p.z.defined()) store_blocks(p, s.z.data(), b, g.z);
  for (int64_t t = 0; t < p.length; ++t)
    for (int64_t r = 0; r < p.rank; ++r) g.delta(b, r, t) = sum_lanes(s.glow[t * p.rank + r]);
}

// The scan's inputs as the ops take them; the optional ones may be absent.
struct ScanInputs {
  const at::Tensor &u, &delta, &A, &B, &C;
  const std::optional<at::Tensor>&D, &z, &delta_bias, &delta_proj;
  bool delta_softplus;
  const std::optional<at::Tensor>& mask;
  bool last_only;
};

void check_inputs(const ScanInputs& in) {
  for (const at::Tensor* t : {&in.u, &in.delta, &in.A, &in.B, &in.C}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "fused CPU scan: float32 CPU tensors only");
  }
  const at::Tensor& u = in.u;
  TORCH_CHECK(u.dim() == 3, "fused CPU scan: u must be [batch, d_inner, L]");
  if (in.delta_proj) {
    const at::Tensor& proj = *in.delta_proj;
    TORCH_CHECK(proj.dim() == 2 && proj.size(0) == u.size(1) && proj.is_contiguous() && proj.scalar_type() == at::kFloat,
                "fused CPU scan: delta_proj must be contiguous float32 [d_inner, R]");
    TORCH_CHECK(in.delta.dim() == 3 && in.delta.size(0) == u.size(0) && in.delta.size(1) == proj.size(1) &&
                    in.delta.size(2) == u.size(2),
                "fused CPU scan: a low-rank delta must be [batch, R, L]");
  } else {
    TORCH_CHECK(in.delta.sizes() == u.sizes(), "fused CPU scan: delta must be [batch, d_inner, L] like u");
  }
  TORCH_CHECK(u.size(2) > 0, "fused CPU scan: sequences of length 0");
  TORCH_CHECK(in.A.dim() == 2 && in.A.size(0) == u.size(1) && in.A.is_contiguous(),
              "fused CPU scan: A must be contiguous [d_inner, N]");
  for (const at::Tensor* t : {&in.B, &in.C}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == u.size(0) && t->size(1) == in.A.size(1) && t->size(2) == u.size(2),
                "fused CPU scan: B and C must be [batch, N, L]");
  }
  for (const auto* v : {&in.D, &in.delta_bias}) {
    if (*v) {
      TORCH_CHECK((*v)->is_contiguous() && (*v)->numel() == u.size(1) && (*v)->scalar_type() == at::kFloat,
                  "fused CPU scan: D and delta_bias must be contiguous float32 [d_inner]");
    }
  }
  if (in.z) TORCH_CHECK(in.z->sizes() == u.sizes() && in.z->scalar_type() == at::kFloat, "fused CPU scan: bad z");
  if (in.mask) {
    TORCH_CHECK(in.mask->dim() == 2 && in.mask->size(0) == u.size(0) && in.mask->size(1) == u.size(2) &&
                    in.mask->scalar_type() == at::kFloat,
                "fused CPU scan: mask must be float32 [batch, L]");
  }
}

Problem make_problem(const ScanInputs& in) {
  const at::Tensor& u = in.u;
  const int64_t d_inner = u.size(1), n = in.A.size(1), blocks = (d_inner + kLanes - 1) / kLanes;
  const int64_t rank = in.delta_proj ? in.delta_proj->size(1) : 0;
  Problem p{u.size(0), d_inner, u.size(2), n, blocks, Rows(blocks * n), Rows(blocks), Rows(blocks), rank, Rows(blocks * rank),
            in.delta_softplus, in.last_only, Strided3(u), Strided3(in.delta), Strided3(in.B), Strided3(in.C),
            Strided3(in.z ? *in.z : at::Tensor()), Strided2(in.mask ? *in.mask : at::Tensor())};
  const float* a = in.A.data_ptr<float>();
  for (int64_t d = 0; d < d_inner; ++d) {
    for (int64_t k = 0; k < n; ++k) p.A2[d / kLanes * n + k][d % kLanes] = a[d * n + k] * kLog2e;
    if (in.D) p.D[d / kLanes][d % kLanes] = in.D->data_ptr<float>()[d];
    if (in.delta_bias) p.delta_bias[d / kLanes][d % kLanes] = in.delta_bias->data_ptr<float>()[d];
    for (int64_t r = 0; r < rank; ++r) p.delta_proj[d / kLanes * rank + r][d % kLanes] = in.delta_proj->data_ptr<float>()[d * rank + r];
  }
  return p;
}

// [batch, L, d_inner] storage seen as [batch, d_inner, L]: the block's out_proj reads it without a copy.
at::Tensor empty_channels_last(const at::Tensor& u) {
  return at::empty({u.size(0), u.size(2), u.size(1)}, u.options()).transpose(1, 2);
}

// Sums the threads' parts of a gradient shared by the batch, [blocks, count] vectors, into
// out [d_inner, count].
void add_lanes(const Rows& part, int64_t d_inner, int64_t count, at::Tensor& out) {
  float* o = out.data_ptr<float>();
  for (int64_t d = 0; d < d_inner; ++d)
    for (int64_t k = 0; k < count; ++k) o[d * count + k] += part[d / kLanes * count + k][d % kLanes];
}

// out [batch, d_inner, L] (a view of [batch, L, d_inner] storage), or [batch, d_inner] with last_only.
at::Tensor selective_scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                              const at::Tensor& C, const std::optional<at::Tensor>& D,
                              const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
                              const std::optional<at::Tensor>& delta_proj, bool delta_softplus,
                              const std::optional<at::Tensor>& mask, bool last_only) {
  const ScanInputs in{u, delta, A, B, C, D, z, delta_bias, delta_proj, delta_softplus, mask, last_only};
  check_inputs(in);
  const Problem p = make_problem(in);
  at::Tensor out = last_only ? at::empty({u.size(0), u.size(1)}, u.options()) : empty_channels_last(u);
  const Strided3 out_view(last_only ? at::Tensor() : out);
  const Strided2 out_last(last_only ? out : at::Tensor());
  at::parallel_for(0, u.size(0), 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    Scratch scratch(p, /*backward=*/false);
    for (int64_t b = begin; b < end; ++b) forward_sample(p, b, out_view, out_last, scratch);
  });
  return out;
}

// grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z (size 0 without z), grad_delta_bias,
// grad_delta_proj (size 0 without delta_proj).
std::vector<at::Tensor> selective_scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                           const std::optional<at::Tensor>& delta_bias,
                                           const std::optional<at::Tensor>& delta_proj, bool delta_softplus,
                                           const std::optional<at::Tensor>& mask, bool last_only,
                                           const at::Tensor& grad_out) {
  const ScanInputs in{u, delta, A, B, C, D, z, delta_bias, delta_proj, delta_softplus, mask, last_only};
  check_inputs(in);
  const auto out_sizes = last_only ? at::IntArrayRef(u.sizes().data(), 2) : u.sizes();
  TORCH_CHECK(grad_out.sizes() == out_sizes && grad_out.scalar_type() == at::kFloat, "fused CPU scan: bad grad_out");
  const Problem p = make_problem(in);
  at::Tensor grad_u = empty_channels_last(u), grad_delta = empty_channels_last(delta);
  at::Tensor grad_B = at::empty_like(B), grad_C = at::empty_like(C);
  at::Tensor grad_z = z ? empty_channels_last(u) : at::empty({0}, u.options());
  at::Tensor grad_A = at::zeros_like(A), grad_D = at::zeros({p.d_inner}, u.options());
  at::Tensor grad_bias = at::zeros({p.d_inner}, u.options());
  at::Tensor grad_proj = at::zeros({p.d_inner, p.rank}, u.options());
  const Grads g{Strided3(grad_u), Strided3(grad_delta), Strided3(grad_B), Strided3(grad_C), Strided3(grad_z)};
  const Strided3 grad_out_view(last_only ? at::Tensor() : grad_out);
  const Strided2 grad_last(last_only ? grad_out : at::Tensor());
  std::mutex reduce;
  at::parallel_for(0, u.size(0), 1, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    Scratch scratch(p, /*backward=*/true);
    for (int64_t b = begin; b < end; ++b) backward_sample(p, b, grad_out_view, grad_last, g, scratch);
    std::lock_guard<std::mutex> lock(reduce);  // A, D and delta_bias are shared by the batch: sum the threads' parts
    add_lanes(scratch.gA, p.d_inner, p.n, grad_A);
    add_lanes(scratch.gD, p.d_inner, 1, grad_D);
    add_lanes(scratch.gbias, p.d_inner, 1, grad_bias);
    add_lanes(scratch.gproj, p.d_inner, p.rank, grad_proj);
  });
  return {grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias, grad_proj};
}

// ---------------------------------------------------------------------------------------------
// 2. The causal depthwise convolution and its SiLU, read in the [batch, L, channels] layout in_proj
// writes (torch's conv1d wants [batch, channels, L] and copies):
//   out[b, t, d] = silu(bias[d] + sum_k weight[d, k] x[b, t - K + 1 + k, d]),  x = 0 before t = 0
// and, with a mask [batch, L], on the steps it marks 0 (padding: the block's H_x is zero there).
// The output's gradient may come in two parts (the block's two readers of the output, x_proj and
// the scan), added here as they are read rather than by a pass of their own.
// The backward recomputes the pre-activation instead of saving it. Loops run over channels, which
// are contiguous, 16 at a time; batches are split over torch's threads.

struct Conv {
  int64_t length, channels, width;
  const float* x;  // [batch, L, channels], contiguous
  const float* weight_t;  // [width, channels]: weight transposed, one contiguous row per tap
  const float* bias;  // [channels]
  const float* mask;  // [batch, L], or nullptr
  // the input's step s of sample b counts (not before t = 0, not masked)
  ALWAYS_INLINE bool counts(int64_t b, int64_t s) const { return s >= 0 && (mask == nullptr || mask[b * length + s] != 0.0f); }
};

// pre[d] = bias[d] + sum_k weight[d, k] x[b, t - K + 1 + k, d]
ALWAYS_INLINE void pre_activation(const Conv& c, int64_t b, int64_t t, float* __restrict pre) {
  const int64_t D = c.channels;
  const float* xb = c.x + b * c.length * D;
  for (int64_t d = 0; d < D; ++d) pre[d] = c.bias[d];
  for (int64_t k = 0; k < c.width; ++k) {
    const int64_t s = t - c.width + 1 + k;
    if (!c.counts(b, s)) continue;
    const float* __restrict w = c.weight_t + k * D;
    const float* __restrict xs = xb + s * D;
    for (int64_t d = 0; d < D; ++d) pre[d] += w[d] * xs[d];
  }
}

KERNEL_TARGETS
void conv_forward_sample(const Conv& c, int64_t b, float* out) {
  const int64_t D = c.channels;
  for (int64_t t = 0; t < c.length; ++t) {
    float* __restrict o = out + (b * c.length + t) * D;
    pre_activation(c, b, t, o);
    int64_t d = 0;
    for (; d + kLanes <= D; d += kLanes) {
      const Vec v = load_vec(o + d);
      store_vec(o + d, v * sigmoid_vec(v));
    }
    for (; d < D; ++d) o[d] = o[d] / (1.0f + std::exp(-o[d]));
  }
}

KERNEL_TARGETS
void conv_backward_sample(const Conv& c, int64_t b, const float* grad_out, const float* grad_other, float* grad_x,
                          float* grad_w_t, float* grad_bias, float* pre) {
  const int64_t D = c.channels;
  const float* xb = c.x + b * c.length * D;
  float* gxb = grad_x + b * c.length * D;
  std::fill(gxb, gxb + c.length * D, 0.0f);
  for (int64_t t = 0; t < c.length; ++t) {
    pre_activation(c, b, t, pre);
    const float* __restrict g = grad_out + (b * c.length + t) * D;
    const float* __restrict g2 = grad_other == nullptr ? nullptr : grad_other + (b * c.length + t) * D;
    // through silu: its derivative is s (1 + pre (1 - s)), s = sigmoid(pre); pre becomes its gradient
    int64_t d = 0;
    for (; d + kLanes <= D; d += kLanes) {
      const Vec gout = g2 == nullptr ? load_vec(g + d) : load_vec(g + d) + load_vec(g2 + d);
      const Vec p = load_vec(pre + d), s = sigmoid_vec(p), gp = gout * s * (1.0f + p * (1.0f - s));
      store_vec(pre + d, gp);
      store_vec(grad_bias + d, load_vec(grad_bias + d) + gp);
    }
    for (; d < D; ++d) {
      const float s = 1.0f / (1.0f + std::exp(-pre[d]));
      pre[d] = (g2 == nullptr ? g[d] : g[d] + g2[d]) * s * (1.0f + pre[d] * (1.0f - s));
      grad_bias[d] += pre[d];
    }
    for (int64_t k = 0; k < c.width; ++k) {
      const int64_t s = t - c.width + 1 + k;
      if (!c.counts(b, s)) continue;  // a masked step's gradient stays 0
      const float* __restrict w = c.weight_t + k * D;
      const float* __restrict xs = xb + s * D;
      float* __restrict gw = grad_w_t + k * D;
      float* __restrict gxs = gxb + s * D;
      for (int64_t d = 0; d < D; ++d) {
        gw[d] += pre[d] * xs[d];
        gxs[d] += w[d] * pre[d];
      }
    }
  }
}

Conv make_conv(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& bias,
               const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.is_contiguous(),
              "fused causal conv: x must be a contiguous float32 CPU [batch, L, channels] tensor");
  TORCH_CHECK(weight_t.dim() == 2 && weight_t.size(1) == x.size(2) && weight_t.is_contiguous() &&
                  weight_t.scalar_type() == at::kFloat,
              "fused causal conv: weight must be contiguous float32 [width, channels]");
  TORCH_CHECK(bias.numel() == x.size(2) && bias.is_contiguous() && bias.scalar_type() == at::kFloat,
              "fused causal conv: bias must be contiguous float32 [channels]");
  if (mask) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == x.size(0) && mask->size(1) == x.size(1) && mask->is_contiguous() &&
                    mask->scalar_type() == at::kFloat,
                "fused causal conv: mask must be contiguous float32 [batch, L]");
  }
  return Conv{x.size(1), x.size(2), weight_t.size(0), x.data_ptr<float>(), weight_t.data_ptr<float>(),
              bias.data_ptr<float>(), mask ? mask->data_ptr<float>() : nullptr};
}

at::Tensor causal_conv_silu_fwd(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& bias,
                               const std::optional<at::Tensor>& mask) {
  const Conv c = make_conv(x, weight_t, bias, mask);
  at::Tensor out = at::empty_like(x);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) conv_forward_sample(c, b, o);
  });
  return out;
}

// grad_x [batch, L, channels], grad_weight_t [width, channels], grad_bias [channels]; the output's
// gradient is grad_out, plus grad_other where given.
std::vector<at::Tensor> causal_conv_silu_bwd(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& bias,
                                             const std::optional<at::Tensor>& mask, const at::Tensor& grad_out,
                                             const std::optional<at::Tensor>& grad_other) {
  const Conv c = make_conv(x, weight_t, bias, mask);
  for (const at::Tensor* g : {&grad_out, grad_other ? &*grad_other : &grad_out}) {
    TORCH_CHECK(g->sizes() == x.sizes() && g->is_contiguous() && g->scalar_type() == at::kFloat,
                "fused causal conv: the output's gradients must be contiguous float32 like x");
  }
  const float* other = grad_other ? grad_other->data_ptr<float>() : nullptr;
  at::Tensor grad_x = at::empty_like(x), grad_w_t = at::zeros_like(weight_t), grad_bias = at::zeros_like(bias);
  std::mutex reduce;
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gw(weight_t.numel(), 0.0f), gb(c.channels, 0.0f), pre(c.channels);
    for (int64_t b = begin; b < end; ++b)
      conv_backward_sample(c, b, grad_out.data_ptr<float>(), other, grad_x.data_ptr<float>(), gw.data(), gb.data(), pre.data());
    std::lock_guard<std::mutex> lock(reduce);  // weight and bias are shared by the batch: sum the threads' parts
    float* gw_all = grad_w_t.data_ptr<float>();
    for (size_t i = 0; i < gw.size(); ++i) gw_all[i] += gw[i];
    float* gb_all = grad_bias.data_ptr<float>();
    for (size_t i = 0; i < gb.size(); ++i) gb_all[i] += gb[i];
  });
  return {grad_x, grad_w_t, grad_bias};
}

}  // namespace

TORCH_LIBRARY(mdaf_dist, m) {
  m.def("selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, Tensor? delta_proj, bool delta_softplus, Tensor? mask, bool last_only) -> Tensor");
  m.def("selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? delta_bias, Tensor? delta_proj, bool delta_softplus, Tensor? mask, bool last_only, "
        "Tensor grad_out) -> Tensor[]");
  m.def("causal_conv_silu_fwd(Tensor x, Tensor weight_t, Tensor bias, Tensor? mask) -> Tensor");
  m.def("causal_conv_silu_bwd(Tensor x, Tensor weight_t, Tensor bias, Tensor? mask, Tensor grad_out, "
        "Tensor? grad_other) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mdaf_dist, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd);
  m.impl("selective_scan_bwd", &selective_scan_bwd);
  m.impl("causal_conv_silu_fwd", &causal_conv_silu_fwd);
  m.impl("causal_conv_silu_bwd", &causal_conv_silu_bwd);
}

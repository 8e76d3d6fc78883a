// The Mamba block's CPU kernels: the selective scan, and the causal depthwise convolution + SiLU
// before it. Both run as torch ops (torch.ops.mdaf_dist.*), registered below; no Python.h needed.
//
// 1. The selective scan fused for the CPU: forward and backward in one pass over time per
// (batch, channel), the N states of that channel in a small buffer that stays in L1, the loop over
// N vectorised by the compiler, batches split over torch's intra-op threads (at::parallel_for).
//
// Semantics and layouts are those of mamba_ssm's selective_scan_fn with real A, after the optional
// delta_bias and softplus (applied by the caller):
//   h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,   y_t = C_t . h_t + D u_t,   out_t = y_t silu(z_t)
// u, delta, z: [batch, d_inner, L]; A: [d_inner, N] contiguous; B, C: [batch, N, L]; D: [d_inner].
// Any strides are read as they are, so callers pass transposed views without copying them.
//
// Nothing is saved between forward and backward but the inputs: the backward recomputes the states
// of one (batch, channel) over the whole sequence into a per-thread [L + 1, N] buffer, then runs
// the gradient of the state backwards in time. Its memory is O(threads L N), not O(batch d_inner N).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

// Compiled once per instruction set; the loader picks the best one for the running CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KERNEL_TARGETS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KERNEL_TARGETS
#endif

// The state loop works on GCC vector-extension vectors of 16 floats, N zero-padded to a multiple
// of 16 (padded lanes have A = B = C = 0: their state stays 0 and adds nothing). The compiler lowers
// each vector op to one AVX-512, two AVX2 or four SSE instructions, whichever clone runs.
constexpr int64_t kLanes = 16;
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef float Half __attribute__((vector_size(kLanes / 2 * sizeof(float))));

#define ALWAYS_INLINE __attribute__((always_inline)) inline

constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;

// 2^y: Cephes' exp2f (2^f by a degree-6 polynomial on f = y - round(y) in [-1/2, 1/2], 2^round(y)
// through the exponent bits; Cephes documents a relative error below 2e-7), with y clamped to
// [-125, 127] (below, 2^-125 ~ 2.4e-38 stands for 0); plain vector arithmetic where the library's
// exp2f would be one call per value. The scan keeps A in log2 units, A log2(e), so that its
// decays exp(delta A) are 2^(delta A log2 e) with no range reduction by ln 2.
ALWAYS_INLINE Vec exp2_vec(Vec y) {
  y = y < -125.0f ? Vec{} - 125.0f : y;
  y = y > 127.0f ? Vec{} + 127.0f : y;
  const float round = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const Vec k = (y + round) - round;
  const Vec f = y - k;
  Vec p = f * 1.535336188319500e-4f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const IVec bits = (__builtin_convertvector(k, IVec) + 127) << 23;  // 2^k
  return p * reinterpret_cast<const Vec&>(bits);
}

typedef float Quarter __attribute__((vector_size(kLanes / 4 * sizeof(float))));

ALWAYS_INLINE float sum_lanes(Vec v) {
  const Half h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Quarter q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

ALWAYS_INLINE Vec sigmoid_vec(Vec x) { return 1.0f / (1.0f + exp2_vec(x * -kLog2e)); }

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

int64_t vectors_for(int64_t n) { return (n + kLanes - 1) / kLanes; }

struct Problem {
  int64_t d_inner, length, n, vecs;  // vecs: vectors per padded row of N
  Rows A2;                           // A log2(e), [d_inner, vecs]
  const float* D;                    // [d_inner] or null
  Strided3 u, delta, B, C, z;
};

// x[b] ([N, L] through strides) as L padded rows of N.
void gather_rows(const Strided3& x, int64_t b, int64_t length, int64_t n, int64_t vecs, Vec* out) {
  for (int64_t t = 0; t < length; ++t) {
    float* row = reinterpret_cast<float*>(out + t * vecs);
    for (int64_t k = 0; k < n; ++k) row[k] = x(b, k, t);
    std::fill(row + n, row + vecs * kLanes, 0.0f);
  }
}

void scatter_rows(const Vec* rows, int64_t b, int64_t length, int64_t n, int64_t vecs, const Strided3& x) {
  for (int64_t t = 0; t < length; ++t) {
    const float* row = reinterpret_cast<const float*>(rows + t * vecs);
    for (int64_t k = 0; k < n; ++k) x(b, k, t) = row[k];
  }
}

// x[b, d, :] into a contiguous row (zero-padded to whole vectors), and back.
ALWAYS_INLINE void load_series(const Strided3& x, int64_t b, int64_t d, int64_t length, float* out) {
  for (int64_t t = 0; t < length; ++t) out[t] = x(b, d, t);
  std::fill(out + length, out + vectors_for(length) * kLanes, 0.0f);
}

ALWAYS_INLINE void store_series(const float* in, int64_t b, int64_t d, int64_t length, const Strided3& x) {
  for (int64_t t = 0; t < length; ++t) x(b, d, t) = in[t];
}

// Per-thread buffers: B and C rows of one sample, and per-channel series over time.
struct Scratch {
  Rows B, C, gB, gC, states, decays, gA;
  Rows dt, u, y, z, g;  // series over time, whole vectors
  std::vector<float> gD;
  Scratch(const Problem& p, bool backward)
      : B(p.length * p.vecs), C(p.length * p.vecs), gB(backward ? p.length * p.vecs : 0),
        gC(backward ? p.length * p.vecs : 0), states(backward ? (p.length + 1) * p.vecs : p.vecs),
        decays(backward ? p.length * p.vecs : 0), gA(backward ? p.d_inner * p.vecs : 0),
        dt(vectors_for(p.length)), u(vectors_for(p.length)), y(vectors_for(p.length)), z(vectors_for(p.length)),
        g(vectors_for(p.length)), gD(backward ? p.d_inner : 0, 0.0f) {}
};

ALWAYS_INLINE float* f(Rows& r) { return reinterpret_cast<float*>(r.data()); }

// kM: vectors per state row known at compile time (1 or 2: N <= 32) or 0 (any, read from p.vecs).
// With kM fixed the state loop unrolls and the state stays in registers.
template <int kM>
ALWAYS_INLINE void forward_channel(const Problem& p, int64_t b, int64_t d, const Strided3& out, Scratch& s) {
  const int64_t L = p.length, M = kM ? kM : p.vecs;
  const Vec* A2d = p.A2.data() + d * M;
  const float Dd = p.D ? p.D[d] : 0.0f;
  float* dt = f(s.dt);
  float* u = f(s.u);
  float* y = f(s.y);
  load_series(p.delta, b, d, L, dt);
  load_series(p.u, b, d, L, u);
  Vec* h = s.states.data();
  std::fill(h, h + M, Vec{});
  for (int64_t t = 0; t < L; ++t) {
    const float du = dt[t] * u[t];
    const Vec* Bs = s.B.data() + t * M;
    const Vec* Cs = s.C.data() + t * M;
    Vec yt{};
    for (int64_t m = 0; m < M; ++m) {
      h[m] = exp2_vec(dt[t] * A2d[m]) * h[m] + du * Bs[m];
      yt += h[m] * Cs[m];
    }
    y[t] = sum_lanes(yt) + Dd * u[t];
  }
  if (p.z.defined()) {
    load_series(p.z, b, d, L, f(s.z));
    for (int64_t i = 0; i < s.y.size(); ++i) s.y[i] *= s.z[i] * sigmoid_vec(s.z[i]);  // silu(z)
  }
  store_series(y, b, d, L, out);
}

KERNEL_TARGETS
void forward_sample(const Problem& p, int64_t b, const Strided3& out, Scratch& s) {
  gather_rows(p.B, b, p.length, p.n, p.vecs, s.B.data());
  gather_rows(p.C, b, p.length, p.n, p.vecs, s.C.data());
  for (int64_t d = 0; d < p.d_inner; ++d) {
    switch (p.vecs) {
      case 1: forward_channel<1>(p, b, d, out, s); break;
      case 2: forward_channel<2>(p, b, d, out, s); break;
      default: forward_channel<0>(p, b, d, out, s);
    }
  }
}

struct Grads {
  Strided3 u, delta, B, C, z;
};

template <int kM>
ALWAYS_INLINE void backward_channel(const Problem& p, int64_t b, int64_t d, const Strided3& grad_out, const Grads& g,
                                    Scratch& s) {
  const int64_t L = p.length, M = kM ? kM : p.vecs;
  const Vec* A2d = p.A2.data() + d * M;
  const float Dd = p.D ? p.D[d] : 0.0f;
  Vec* gAd = s.gA.data() + d * M;
  float* dt = f(s.dt);
  float* u = f(s.u);
  float* y = f(s.y);
  float* gy = f(s.g);
  load_series(p.delta, b, d, L, dt);
  load_series(p.u, b, d, L, u);
  Vec* states = s.states.data();  // row t + 1: h_t; row 0: the zero initial state
  Vec* decays = s.decays.data();  // row t: exp(delta_t A)
  std::fill(states, states + M, Vec{});
  // Recompute the states, and y_t before the gate (for grad z).
  for (int64_t t = 0; t < L; ++t) {
    const float du = dt[t] * u[t];
    const Vec* Bs = s.B.data() + t * M;
    const Vec* Cs = s.C.data() + t * M;
    const Vec* prev = states + t * M;
    Vec* next = states + (t + 1) * M;
    Vec* decay = decays + t * M;
    Vec yt{};
    for (int64_t m = 0; m < M; ++m) {
      decay[m] = exp2_vec(dt[t] * A2d[m]);
      next[m] = decay[m] * prev[m] + du * Bs[m];
      yt += next[m] * Cs[m];
    }
    y[t] = sum_lanes(yt) + Dd * u[t];
  }
  // The gradient of y before the gate, and of z.
  load_series(grad_out, b, d, L, gy);
  if (p.z.defined()) {
    load_series(p.z, b, d, L, f(s.z));
    for (int64_t i = 0; i < s.g.size(); ++i) {
      const Vec z = s.z[i], sz = sigmoid_vec(z), go = s.g[i];
      s.g[i] = go * z * sz;
      s.z[i] = go * s.y[i] * sz * (1.0f + z * (1.0f - sz));  // grad z, in z's buffer
    }
    store_series(f(s.z), b, d, L, g.z);
  }
  // Reverse time: G_t = C_t gy_t + exp(delta_{t+1} A) G_{t+1}, the gradient reaching h_t.
  Vec carry[kM ? kM : 1];
  Rows carry_any(kM ? 0 : M);
  Vec* G_next = kM ? carry : carry_any.data();  // exp(delta_{t+1} A) G_{t+1}
  std::fill(G_next, G_next + M, Vec{});
  float gD = 0.0f;
  for (int64_t t = L - 1; t >= 0; --t) {
    const float du = dt[t] * u[t], gyt = gy[t];
    gD += gyt * u[t];
    const Vec* Bs = s.B.data() + t * M;
    const Vec* Cs = s.C.data() + t * M;
    Vec* gBs = s.gB.data() + t * M;
    Vec* gCs = s.gC.data() + t * M;
    const Vec* prev = states + t * M;
    const Vec* next = states + (t + 1) * M;
    const Vec* decay = decays + t * M;
    Vec sum_GB{}, sum_decay{};
    for (int64_t m = 0; m < M; ++m) {
      const Vec G = G_next[m] + Cs[m] * gyt;
      gCs[m] += gyt * next[m];
      gBs[m] += G * du;
      sum_GB += G * Bs[m];
      const Vec decay_G = decay[m] * G;
      const Vec w = decay_G * prev[m];  // through exp(delta_t A) h_{t-1}
      sum_decay += w * A2d[m];
      gAd[m] += w * dt[t];
      G_next[m] = decay_G;
    }
    const float GB = sum_lanes(sum_GB);
    y[t] = dt[t] * GB + Dd * gyt;               // grad u, in y's buffer (y is no longer needed)
    dt[t] = u[t] * GB + sum_lanes(sum_decay) * kLn2;  // grad delta (A = A2 ln 2), in delta's buffer
  }
  store_series(y, b, d, L, g.u);
  store_series(dt, b, d, L, g.delta);
  s.gD[d] += gD;
}

KERNEL_TARGETS
void backward_sample(const Problem& p, int64_t b, const Strided3& grad_out, const Grads& g, Scratch& s) {
  gather_rows(p.B, b, p.length, p.n, p.vecs, s.B.data());
  gather_rows(p.C, b, p.length, p.n, p.vecs, s.C.data());
  std::fill(s.gB.data(), s.gB.data() + s.gB.size(), Vec{});
  std::fill(s.gC.data(), s.gC.data() + s.gC.size(), Vec{});
  for (int64_t d = 0; d < p.d_inner; ++d) {
    switch (p.vecs) {
      case 1: backward_channel<1>(p, b, d, grad_out, g, s); break;
      case 2: backward_channel<2>(p, b, d, grad_out, g, s); break;
      default: backward_channel<0>(p, b, d, grad_out, g, s);
    }
  }
  scatter_rows(s.gB.data(), b, p.length, p.n, p.vecs, g.B);
  scatter_rows(s.gC.data(), b, p.length, p.n, p.vecs, g.C);
}

void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z) {
  for (const at::Tensor* t : {&u, &delta, &A, &B, &C}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "fused CPU scan: float32 CPU tensors only");
  }
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "fused CPU scan: u and delta must be [batch, d_inner, L]");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1) && A.is_contiguous(), "fused CPU scan: A must be contiguous [d_inner, N]");
  for (const at::Tensor* t : {&B, &C}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == u.size(0) && t->size(1) == A.size(1) && t->size(2) == u.size(2),
                "fused CPU scan: B and C must be [batch, N, L]");
  }
  if (D) TORCH_CHECK(D->is_contiguous() && D->numel() == u.size(1) && D->scalar_type() == at::kFloat, "fused CPU scan: bad D");
  if (z) TORCH_CHECK(z->sizes() == u.sizes() && z->scalar_type() == at::kFloat, "fused CPU scan: bad z");
}

Problem make_problem(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                     const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z) {
  const int64_t d_inner = u.size(1), n = A.size(1), vecs = vectors_for(n);
  Problem p{d_inner, u.size(2), n, vecs, Rows(d_inner * vecs), D ? D->data_ptr<float>() : nullptr,
            Strided3(u), Strided3(delta), Strided3(B), Strided3(C), Strided3(z ? *z : at::Tensor())};
  const float* a = A.data_ptr<float>();
  for (int64_t d = 0; d < d_inner; ++d)
    for (int64_t k = 0; k < n; ++k) reinterpret_cast<float*>(&p.A2[d * vecs])[k] = a[d * n + k] * kLog2e;
  return p;
}

// [batch, L, d_inner] storage seen as [batch, d_inner, L]: the block's out_proj reads it without a copy.
at::Tensor empty_channels_last(const at::Tensor& u) {
  return at::empty({u.size(0), u.size(2), u.size(1)}, u.options()).transpose(1, 2);
}

at::Tensor selective_scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                              const at::Tensor& C, const std::optional<at::Tensor>& D,
                              const std::optional<at::Tensor>& z) {
  check_inputs(u, delta, A, B, C, D, z);
  const Problem p = make_problem(u, delta, A, B, C, D, z);
  at::Tensor out = empty_channels_last(u);
  const Strided3 out_view(out);
  at::parallel_for(0, u.size(0), 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(p, /*backward=*/false);
    for (int64_t b = begin; b < end; ++b) forward_sample(p, b, out_view, scratch);
  });
  return out;
}

// grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z (size 0 without z).
std::vector<at::Tensor> selective_scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C,
                                           const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                           const at::Tensor& grad_out) {
  check_inputs(u, delta, A, B, C, D, z);
  TORCH_CHECK(grad_out.sizes() == u.sizes() && grad_out.scalar_type() == at::kFloat, "fused CPU scan: bad grad_out");
  const Problem p = make_problem(u, delta, A, B, C, D, z);
  at::Tensor grad_u = at::empty_like(u), grad_delta = at::empty_like(delta);
  at::Tensor grad_B = at::empty_like(B), grad_C = at::empty_like(C);
  at::Tensor grad_z = z ? at::empty_like(*z) : at::empty({0}, u.options());
  at::Tensor grad_A = at::zeros_like(A), grad_D = at::zeros({p.d_inner}, u.options());
  const Grads g{Strided3(grad_u), Strided3(grad_delta), Strided3(grad_B), Strided3(grad_C), Strided3(grad_z)};
  const Strided3 grad_out_view(grad_out);
  std::mutex reduce;
  at::parallel_for(0, u.size(0), 1, [&](int64_t begin, int64_t end) {
    Scratch scratch(p, /*backward=*/true);
    for (int64_t b = begin; b < end; ++b) backward_sample(p, b, grad_out_view, g, scratch);
    std::lock_guard<std::mutex> lock(reduce);  // A and D are shared by the batch: sum the threads' parts
    float* gA = grad_A.data_ptr<float>();
    for (int64_t d = 0; d < p.d_inner; ++d)
      for (int64_t k = 0; k < p.n; ++k) gA[d * p.n + k] += scratch.gA[d * p.vecs + k / kLanes][k % kLanes];
    float* gD = grad_D.data_ptr<float>();
    for (size_t i = 0; i < scratch.gD.size(); ++i) gD[i] += scratch.gD[i];
  });
  return {grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z};
}

// ---------------------------------------------------------------------------------------------
// 2. The causal depthwise convolution and its SiLU, read in the [batch, L, channels] layout in_proj
// writes (torch's conv1d wants [batch, channels, L] and copies):
//   out[b, t, d] = silu(bias[d] + sum_k weight[d, k] x[b, t - K + 1 + k, d]),  x = 0 before t = 0.
// The backward recomputes the pre-activation instead of saving it. Loops run over channels, which
// are contiguous, 16 at a time; batches are split over torch's threads.

struct Conv {
  int64_t length, channels, width;
  const float* x;  // [batch, L, channels], contiguous
  const float* weight_t;  // [width, channels]: weight transposed, one contiguous row per tap
  const float* bias;  // [channels]
};

// pre[d] = bias[d] + sum_k weight[d, k] x[b, t - K + 1 + k, d]
inline void pre_activation(const Conv& c, const float* xb, int64_t t, float* __restrict pre) {
  const int64_t D = c.channels;
  for (int64_t d = 0; d < D; ++d) pre[d] = c.bias[d];
  for (int64_t k = 0; k < c.width; ++k) {
    const int64_t s = t - c.width + 1 + k;
    if (s < 0) continue;
    const float* __restrict w = c.weight_t + k * D;
    const float* __restrict xs = xb + s * D;
    for (int64_t d = 0; d < D; ++d) pre[d] += w[d] * xs[d];
  }
}

ALWAYS_INLINE Vec load_vec(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

ALWAYS_INLINE void store_vec(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

KERNEL_TARGETS
void conv_forward_sample(const Conv& c, int64_t b, float* out) {
  const int64_t D = c.channels;
  const float* xb = c.x + b * c.length * D;
  for (int64_t t = 0; t < c.length; ++t) {
    float* __restrict o = out + (b * c.length + t) * D;
    pre_activation(c, xb, t, o);
    int64_t d = 0;
    for (; d + kLanes <= D; d += kLanes) {
      const Vec v = load_vec(o + d);
      store_vec(o + d, v * sigmoid_vec(v));
    }
    for (; d < D; ++d) o[d] = o[d] / (1.0f + std::exp(-o[d]));
  }
}

KERNEL_TARGETS
void conv_backward_sample(const Conv& c, int64_t b, const float* grad_out, float* grad_x, float* grad_w_t, float* grad_bias,
                     float* pre) {
  const int64_t D = c.channels;
  const float* xb = c.x + b * c.length * D;
  float* gxb = grad_x + b * c.length * D;
  std::fill(gxb, gxb + c.length * D, 0.0f);
  for (int64_t t = 0; t < c.length; ++t) {
    pre_activation(c, xb, t, pre);
    const float* __restrict g = grad_out + (b * c.length + t) * D;
    // through silu: its derivative is s (1 + pre (1 - s)), s = sigmoid(pre); pre becomes its gradient
    int64_t d = 0;
    for (; d + kLanes <= D; d += kLanes) {
      const Vec p = load_vec(pre + d), s = sigmoid_vec(p), gp = load_vec(g + d) * s * (1.0f + p * (1.0f - s));
      store_vec(pre + d, gp);
      store_vec(grad_bias + d, load_vec(grad_bias + d) + gp);
    }
    for (; d < D; ++d) {
      const float s = 1.0f / (1.0f + std::exp(-pre[d]));
      pre[d] = g[d] * s * (1.0f + pre[d] * (1.0f - s));
      grad_bias[d] += pre[d];
    }
    for (int64_t k = 0; k < c.width; ++k) {
      const int64_t s = t - c.width + 1 + k;
      if (s < 0) continue;
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

Conv make_conv(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.is_contiguous(),
              "fused causal conv: x must be a contiguous float32 CPU [batch, L, channels] tensor");
  TORCH_CHECK(weight_t.dim() == 2 && weight_t.size(1) == x.size(2) && weight_t.is_contiguous() &&
                  weight_t.scalar_type() == at::kFloat,
              "fused causal conv: weight must be contiguous float32 [width, channels]");
  TORCH_CHECK(bias.numel() == x.size(2) && bias.is_contiguous() && bias.scalar_type() == at::kFloat,
              "fused causal conv: bias must be contiguous float32 [channels]");
  return Conv{x.size(1), x.size(2), weight_t.size(0), x.data_ptr<float>(), weight_t.data_ptr<float>(),
              bias.data_ptr<float>()};
}

at::Tensor causal_conv_silu_fwd(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& bias) {
  const Conv c = make_conv(x, weight_t, bias);
  at::Tensor out = at::empty_like(x);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) conv_forward_sample(c, b, o);
  });
  return out;
}

// grad_x [batch, L, channels], grad_weight_t [width, channels], grad_bias [channels]
std::vector<at::Tensor> causal_conv_silu_bwd(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& bias,
                                             const at::Tensor& grad_out) {
  const Conv c = make_conv(x, weight_t, bias);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.is_contiguous() && grad_out.scalar_type() == at::kFloat,
              "fused causal conv: grad_out must be contiguous float32 like x");
  at::Tensor grad_x = at::empty_like(x), grad_w_t = at::zeros_like(weight_t), grad_bias = at::zeros_like(bias);
  std::mutex reduce;
  at::parallel_for(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gw(weight_t.numel(), 0.0f), gb(c.channels, 0.0f), pre(c.channels);
    for (int64_t b = begin; b < end; ++b)
      conv_backward_sample(c, b, grad_out.data_ptr<float>(), grad_x.data_ptr<float>(), gw.data(), gb.data(), pre.data());
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
  m.def("selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z) -> Tensor");
  m.def("selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor grad_out) -> Tensor[]");
  m.def("causal_conv_silu_fwd(Tensor x, Tensor weight_t, Tensor bias) -> Tensor");
  m.def("causal_conv_silu_bwd(Tensor x, Tensor weight_t, Tensor bias, Tensor grad_out) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mdaf_dist, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd);
  m.impl("selective_scan_bwd", &selective_scan_bwd);
  m.impl("causal_conv_silu_fwd", &causal_conv_silu_fwd);
  m.impl("causal_conv_silu_bwd", &causal_conv_silu_bwd);
}

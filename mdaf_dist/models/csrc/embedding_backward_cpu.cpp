// The tables' backward on CPU for non-pooled lookups (EmbeddingCollection), with row-wise Adagrad
// fused: a faster kernel for fbgemm's op
// fbgemm::split_embedding_nobag_backward_codegen_rowwise_adagrad_cpu, same schema, same update.
//
// fbgemm's own CPU kernel sums each row's gradient in nested hash maps (one map node and one
// vector per id and table, about 2 us per id); its pooled path has fast sparse kernels, the
// non-pooled path has not. Here the ids' rows are sorted once (a stable sort of int32 row keys,
// which torch runs as a radix sort), and each unique row then sums its gradient rows in the
// order they occur in the batch, as fbgemm does, and is updated in place, rows split over
// torch's intra-op threads. The arithmetic is fbgemm's, operation for operation in float, so
// weights and momentum come out bit for bit the same (tests/test_embedding_backward.py); that
// holds while the compiler fuses no multiply-add, as for the extension's x86-64 baseline target.
//
// Row-wise Adagrad as fbgemm 1.8's CPU kernel does it (codegen/genscript/optimizers.py,
// weight_decay_mode 0): per row, with g the row's summed gradient [D],
//   m += (sum_d g_d^2) / D   (the squares summed in the order of d),
//   w_d = w_d - g_d * multiplier,   multiplier = lr / (sqrt(m) + eps)
// with every quantity a float (learning rate and eps converted from the op's arguments; fbgemm's
// factor on w_d, `correction`, is exactly 1 without weight decay).
// What this kernel does not implement fails with one line naming the argument: weight decay
// (modes 1 and 2), max_norm, non-float weights or gradients.
//
// The kernel replaces fbgemm's only when `override_fbgemm_nobag_rowwise_adagrad` is called,
// after fbgemm_gpu registered its own (the last registration of a dispatch key wins).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace {

constexpr const char* kOp = "split_embedding_nobag_backward_codegen_rowwise_adagrad_cpu";
constexpr const char* kName = "row-wise Adagrad table backward (mdaf_dist)";
constexpr int64_t kAhead = 8;  // rows (ids) ahead whose table row (gradient row) is prefetched

// Every id's row key (its row in host_weights viewed as [rows, D]) and feature, in the order of
// the ids, checked against its table's size as fbgemm checks it.
template <typename index_t>
void row_keys(const at::Tensor& indices, const at::Tensor& offsets, const int64_t* weights_offsets,
              const int64_t* hash_size_cumsum, int64_t T, int64_t B, int64_t D, int32_t* keys, int32_t* features) {
  const index_t* ids = indices.data_ptr<index_t>();
  const index_t* offs = offsets.data_ptr<index_t>();
  bool covered = offs[0] == 0 && offs[T * B] == indices.numel();
  for (int64_t t = 0; t < T; ++t) covered = covered && offs[t * B] <= offs[(t + 1) * B];
  TORCH_CHECK(covered, kName, ": the features' offsets do not split the ", indices.numel(), " ids");
  for (int64_t t = 0; t < T; ++t) {
    // a table shared by several features gives its size to the last of them: the earlier ones
    // have a zero size, and take the next non-zero one
    int64_t hash_size = 0;
    for (int64_t next = t + 1; hash_size == 0 && next <= T; ++next) hash_size = hash_size_cumsum[next] - hash_size_cumsum[t];
    const int64_t first_row = weights_offsets[t] / D;
    for (int64_t i = offs[t * B]; i < offs[(t + 1) * B]; ++i) {
      const int64_t id = ids[i];
      TORCH_CHECK(id >= 0 && id < hash_size, kName, ": id ", id, " of feature ", t, " is outside its table of ", hash_size,
                  " rows");
      keys[i] = static_cast<int32_t>(first_row + id);
      features[i] = static_cast<int32_t>(t);
    }
  }
}

// fbgemm's signature, argument for argument; those without a name here mean nothing on CPU
// (placements, stochastic rounding of float weights) or are checked to be unused (weight_decay with
// weight_decay_mode 0)
void nobag_backward_rowwise_adagrad(at::Tensor grad_output, at::Tensor host_weights, at::Tensor /*weights_placements*/,
                                    at::Tensor weights_offsets, int64_t D, at::Tensor hash_size_cumsum,
                                    int64_t /*total_hash_size_bits*/, at::Tensor indices, at::Tensor offsets,
                                    bool /*stochastic_rounding*/, at::Tensor momentum1_host,
                                    at::Tensor /*momentum1_placements*/, at::Tensor momentum1_offsets,
                                    at::Tensor learning_rate_tensor, double eps, double /*weight_decay*/,
                                    int64_t weight_decay_mode, double max_norm) {
  TORCH_CHECK(weight_decay_mode == 0, kName, ": weight_decay_mode ", weight_decay_mode,
              " is not supported (only 0, no weight decay)");
  TORCH_CHECK(max_norm == 0.0, kName, ": max_norm ", max_norm, " is not supported (only 0)");
  TORCH_CHECK(host_weights.scalar_type() == at::kFloat && momentum1_host.scalar_type() == at::kFloat &&
                  grad_output.scalar_type() == at::kFloat,
              kName, ": only float32 weights, momentum and gradients are supported, got ", host_weights.scalar_type(),
              ", ", momentum1_host.scalar_type(), " and ", grad_output.scalar_type());
  TORCH_CHECK(host_weights.dim() == 1 && host_weights.is_contiguous() && momentum1_host.is_contiguous(), kName,
              ": weights and momentum must be contiguous 1-D tensors");
  TORCH_CHECK(indices.scalar_type() == offsets.scalar_type(), kName, ": indices and offsets must have the same dtype");
  const int64_t T = weights_offsets.numel();
  const int64_t N = indices.numel();
  TORCH_CHECK(T > 0 && D > 0, kName, ": no features or D = 0");
  TORCH_CHECK(host_weights.numel() / D <= INT32_MAX, kName, ": tables of more than 2^31 rows in all are not supported");
  const int64_t B = (offsets.numel() - 1) / T;
  TORCH_CHECK(offsets.numel() == T * B + 1, kName, ": ", offsets.numel(), " offsets for ", T, " features");
  grad_output = grad_output.contiguous();
  TORCH_CHECK(grad_output.numel() == N * D, kName, ": grad_output has ", grad_output.numel(), " values for ", N,
              " ids of dimension ", D);
  if (N == 0) return;

  const at::Tensor weights_offsets_cpu = weights_offsets.to(at::kLong).contiguous();
  const at::Tensor hash_size_cumsum_cpu = hash_size_cumsum.to(at::kLong).contiguous();
  const at::Tensor momentum1_offsets_cpu = momentum1_offsets.to(at::kLong).contiguous();
  at::Tensor keys = at::empty({N}, at::kInt);
  std::vector<int32_t> features(N);
  AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "mdaf_dist_row_keys", [&] {
    row_keys<index_t>(indices.contiguous(), offsets.contiguous(), weights_offsets_cpu.data_ptr<int64_t>(),
                      hash_size_cumsum_cpu.data_ptr<int64_t>(), T, B, D, keys.data_ptr<int32_t>(), features.data());
  });

  // the ids grouped by row, each row's ids in the order they occur
  const auto [sorted_keys, order] = keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const int32_t* sorted = sorted_keys.data_ptr<int32_t>();
  const int64_t* position = order.data_ptr<int64_t>();
  std::vector<int64_t> run_start;  // where each unique row's ids start in the sorted order, and N
  for (int64_t j = 0; j < N; ++j)
    if (j == 0 || sorted[j] != sorted[j - 1]) run_start.push_back(j);
  run_start.push_back(N);
  const int64_t rows = static_cast<int64_t>(run_start.size()) - 1;

  const float learning_rate = learning_rate_tensor.item<float>();
  const float eps_f = static_cast<float>(eps);
  const float* grad = grad_output.data_ptr<float>();
  float* weights = host_weights.data_ptr<float>();
  float* momentum = momentum1_host.data_ptr<float>();
  const int64_t* weights_offset = weights_offsets_cpu.data_ptr<int64_t>();
  const int64_t* momentum_offset = momentum1_offsets_cpu.data_ptr<int64_t>();
  // the table and the gradient are read at random, which memory latency dominates: prefetched
  auto prefetch = [D](const float* row) {
    for (int64_t d = 0; d < D; d += 64 / sizeof(float)) __builtin_prefetch(row + d);
  };
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row_grad(D);
    float* g = row_grad.data();
    for (int64_t r = begin; r < end; ++r) {
      if (r + kAhead < end) prefetch(weights + int64_t{sorted[run_start[r + kAhead]]} * D);
      std::fill(row_grad.begin(), row_grad.end(), 0.0f);
      for (int64_t j = run_start[r]; j < run_start[r + 1]; ++j) {
        if (j + kAhead < N) prefetch(grad + position[j + kAhead] * D);
        const float* source = grad + position[j] * D;
        for (int64_t d = 0; d < D; ++d) g[d] += source[d];
      }
      const int64_t key = sorted[run_start[r]];
      const int64_t t = features[position[run_start[r]]];
      float sum_square = 0.0f;
      for (int64_t d = 0; d < D; ++d) sum_square += g[d] * g[d];
      float& m = momentum[momentum_offset[t] + key - weights_offset[t] / D];
      m += sum_square / D;
      const float multiplier = learning_rate / (std::sqrt(m) + eps_f);
      float* w = weights + key * D;
      for (int64_t d = 0; d < D; ++d) w[d] = w[d] - g[d] * multiplier;
    }
  });
}

// Passes on every warning but the dispatcher's about the override below, which is its point.
class WithoutOverrideWarning : public c10::WarningHandler {
 public:
  explicit WithoutOverrideWarning(c10::WarningHandler* next) : next_(next) {}
  void process(const c10::Warning& warning) override {
    const std::string ours = std::string("Overriding a previously registered kernel for the same operator and the same "
                                         "dispatch key\n  operator: fbgemm::") + kOp + "(";
    if (warning.msg().find(ours) == std::string::npos) next_->process(warning);
  }

 private:
  c10::WarningHandler* next_;
};

// Makes the kernel above fbgemm's CPU kernel of the op, once per process.
void override_fbgemm_nobag_rowwise_adagrad() {
  static std::once_flag once;
  std::call_once(once, [] {
    WithoutOverrideWarning handler(c10::WarningUtils::get_warning_handler());
    c10::WarningUtils::WarningHandlerGuard guard(&handler);
    static torch::Library library(torch::Library::IMPL, "fbgemm", c10::DispatchKey::CPU, __FILE__, __LINE__);
    library.impl(kOp, TORCH_FN(nobag_backward_rowwise_adagrad));
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mdaf_dist, m) {
  m.def("override_fbgemm_nobag_rowwise_adagrad() -> ()", &override_fbgemm_nobag_rowwise_adagrad);
}

// The CPU backend: host memory, the reference ops, no stream (every op completes on return).
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include <octavo/error.h>

#include "backend/backend.h"

namespace octavo {
namespace {

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  DType act_dtype(DType) const override { return DType::kFloat32; }

  void* allocate(size_t bytes) override {
    constexpr size_t kAlignment = 256;
    void* pointer = std::aligned_alloc(kAlignment, (bytes + kAlignment - 1) / kAlignment * kAlignment);
    if (!pointer) {
      throw OutOfMemory("cpu: cannot allocate " + std::to_string(bytes >> 20) + " MiB of host memory");
    }
    return pointer;
  }
  void release(void* pointer) override { std::free(pointer); }
  void upload(void* device, const void* host, size_t bytes) override {
    if (bytes) std::memcpy(device, host, bytes);
  }
  void download(void* host, const void* device, size_t bytes) override {
    if (bytes) std::memcpy(host, device, bytes);
  }
  void synchronize() override {}

  void copy_blocks(const CopyBlocksParams& p) override { cpu::copy_blocks(p); }
  void embedding(const EmbeddingParams& p) override { cpu::embedding(p); }
  void norm(const NormParams& p) override { cpu::norm(p); }
  void gemm(const GemmParams& p) override { cpu::gemm(p); }
  void rotary(const RotaryParams& p) override { cpu::rotary(p); }
  void write_kv(const WriteKVParams& p) override { cpu::write_kv(p); }
  void paged_attention(const AttentionParams& p) override { cpu::paged_attention(p); }
  void activation(const ActivationParams& p) override { cpu::activation(p); }
  void gather_rows(const GatherRowsParams& p) override { cpu::gather_rows(p); }
  void add_logit_bias(const LogitBiasParams& p) override { cpu::add_logit_bias(p); }
  void update_token_counts(const TokenCountParams& p) override { cpu::update_token_counts(p); }
  void apply_penalties(const PenaltyParams& p) override { cpu::apply_penalties(p); }
  void token_logprobs(const TokenLogprobsParams& p) override { cpu::token_logprobs(p); }
  void sample(const SampleParams& p) override { cpu::sample(p); }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace octavo

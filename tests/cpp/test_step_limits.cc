// The automatic step limits on the CPU and on small and large GPUs (the device is only a size
// here, so both branches run without one).
#include "core/step_limits.h"

#include <gtest/gtest.h>

namespace octavo {
namespace {

EngineConfig with_len(int max_model_len) {
  EngineConfig c;
  c.max_model_len = max_model_len;
  return c;
}

TEST(StepLimits, CpuAndSmallGpuKeep256SequencesAndAtMost8192Tokens) {
  for (std::optional<size_t> device : {std::optional<size_t>{}, std::optional<size_t>{size_t{40} << 30}}) {
    EngineConfig c = with_len(2048);
    resolve_step_limits(c, device);
    EXPECT_EQ(c.max_num_seqs, 256);
    EXPECT_EQ(c.max_num_batched_tokens, 2048);
    EngineConfig longer = with_len(131072);
    resolve_step_limits(longer, device);
    EXPECT_EQ(longer.max_num_batched_tokens, 8192);
  }
}

TEST(StepLimits, LargeGpuTakesVllmThroughputDefaults) {
  EngineConfig c = with_len(1945);
  resolve_step_limits(c, size_t{80} << 30);
  EXPECT_EQ(c.max_num_seqs, 1024);
  EXPECT_EQ(c.max_num_batched_tokens, 16384);
}

TEST(StepLimits, GivenValuesStayAndTokensCoverTheSequences) {
  EngineConfig c = with_len(300);
  c.max_num_seqs = 512;
  resolve_step_limits(c, std::nullopt);
  EXPECT_EQ(c.max_num_seqs, 512);
  EXPECT_EQ(c.max_num_batched_tokens, 512);  // min(8192, 300) raised to max_num_seqs

  EngineConfig fixed = with_len(4096);
  fixed.max_num_seqs = 8;
  fixed.max_num_batched_tokens = 100;
  resolve_step_limits(fixed, size_t{80} << 30);
  EXPECT_EQ(fixed.max_num_seqs, 8);
  EXPECT_EQ(fixed.max_num_batched_tokens, 100);
}

}  // namespace
}  // namespace octavo

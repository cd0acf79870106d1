// Penalties and prompt-token logprobs on the GPU (contracts in backend/ops.h; the oracle is
// cpu/penalties.cc).
//
// update_token_counts: one block per reset row (zeroed with 16-byte stores), then one thread per
// entry (atomicAdd: a step may name the same cell twice). apply_penalties and token_logprobs: one
// block per row streaming over the row's logits; both are a single read of the row (plus the
// count row), so they cost about what one pass of the sampler does.
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include <octavo/error.h>

#include "compat.h"
#include "cuda_ops.h"

namespace octavo::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / gpu::kWarpSize;
constexpr int kMaxTop = 20;
constexpr int32_t kOutputCountMask = kPromptTokenBit - 1;

std::string str(long long value) { return std::to_string(value); }

void check_launch(const char* op) {
  gpu::Error error = gpu::get_last_error();
  if (error != gpu::kSuccess) {
    throw BackendError(std::string(op) + " launch failed: " + gpu::error_string(error));
  }
}

int ceil_div(long long a, long long b) { return int((a + b - 1) / b); }

// ---- token counts ----------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) reset_count_rows_kernel(const TokenCountParams p) {
  const int32_t slot = p.reset_slots[blockIdx.x];
  if (slot < 0 || slot >= p.num_slots) return;
  int32_t* row = p.counts + int64_t{slot} * p.vocab_size;
  // Rows start 16-byte aligned when vocab_size % 4 == 0 (the table is 256-byte aligned).
  if (p.vocab_size % 4 == 0) {
    int4* row4 = reinterpret_cast<int4*>(row);
    for (int32_t i = threadIdx.x; i < p.vocab_size / 4; i += kThreads) row4[i] = int4{0, 0, 0, 0};
  } else {
    for (int32_t i = threadIdx.x; i < p.vocab_size; i += kThreads) row[i] = 0;
  }
}

__global__ void __launch_bounds__(kThreads) add_token_counts_kernel(const TokenCountParams p) {
  const int64_t i = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (i >= p.num_entries) return;
  TokenCountEntry e = p.entries[i];
  if (e.token < 0 && p.deferred_token_ids != nullptr) {
    e.token = p.deferred_token_ids[-int64_t{e.token} - 1];
  }
  if (e.slot < 0 || e.slot >= p.num_slots || e.token < 0 || e.token >= p.vocab_size) return;
  atomicAdd(p.counts + int64_t{e.slot} * p.vocab_size + e.token, e.add);
}

// ---- penalties -------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) apply_penalties_kernel(const PenaltyParams p) {
  const PenaltyRow r = p.rows[blockIdx.x];
  if (r.slot < 0 || r.slot >= p.num_slots) return;
  float* logits = p.logits + int64_t{blockIdx.x} * p.vocab_size;
  const int32_t* counts = p.counts + int64_t{r.slot} * p.vocab_size;
  for (int32_t token = threadIdx.x; token < p.vocab_size; token += kThreads) {
    const int32_t entry = counts[token];
    if (entry == 0) continue;
    float x = logits[token];
    x = x > 0.0f ? x / r.repetition : x * r.repetition;
    const int32_t output_count = entry & kOutputCountMask;
    if (output_count > 0) x -= r.frequency * float(output_count) + r.presence;
    logits[token] = x;
  }
}

// ---- token logprobs --------------------------------------------------------------------------

struct Candidate {
  float value;
  int32_t id;
};

// Descending value, ties to the lower id; id INT_MAX marks an empty slot.
__device__ __forceinline__ bool before(Candidate a, Candidate b) {
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

struct TopShared {
  Candidate lists[kThreads][kMaxTop];  // each thread's own top-N, descending
  float max_part[kWarps];
  float sum_part[kWarps];
  int32_t count_part[kWarps];
  Candidate best_part[kWarps];
  int32_t best_thread_part[kWarps];
  float log_normaliser;
  int32_t winner;
};
static_assert(sizeof(TopShared) <= 48 * 1024, "token_logprobs shared memory");

__device__ __forceinline__ float capped(float x, float cap) {
  return cap > 0.0f ? cap * tanhf(x / cap) : x;
}

__global__ void __launch_bounds__(kThreads) token_logprobs_kernel(const TokenLogprobsParams p) {
  __shared__ TopShared shared;
  const int64_t row = blockIdx.x;
  const float* logits = p.logits + row * p.vocab_size;
  const int32_t target = p.targets[row];
  const bool valid_target = target >= 0 && target < p.vocab_size;
  const float target_value = valid_target ? capped(logits[target], p.final_softcap) : NAN;
  const int lane = threadIdx.x % gpu::kWarpSize, warp = threadIdx.x / gpu::kWarpSize;

  Candidate* mine = shared.lists[threadIdx.x];
  for (int j = 0; j < p.num_top; ++j) mine[j] = Candidate{-INFINITY, INT_MAX};
  float local_max = -INFINITY, local_sum = 0.0f;
  int32_t greater = 0;
  for (int32_t id = threadIdx.x; id < p.vocab_size; id += kThreads) {
    const float x = capped(logits[id], p.final_softcap);
    greater += x > target_value;
    if (x > local_max) {
      local_sum = local_sum * expf(local_max - x) + 1.0f;
      local_max = x;
    } else {
      local_sum += expf(x - local_max);
    }
    // Ids rise within a thread, so a tie never displaces an earlier (lower) id.
    if (p.num_top > 0 && x > mine[p.num_top - 1].value) {
      int j = p.num_top - 1;
      while (j > 0 && x > mine[j - 1].value) {
        mine[j] = mine[j - 1];
        --j;
      }
      mine[j] = Candidate{x, id};
    }
  }

  // Block-wide max, rescaled sum and count.
  float warp_max = local_max;
  for (int offset = gpu::kWarpSize / 2; offset > 0; offset /= 2) {
    warp_max = fmaxf(warp_max, gpu::shfl_xor(warp_max, offset));
  }
  if (lane == 0) shared.max_part[warp] = warp_max;
  __syncthreads();
  float block_max = shared.max_part[0];
  for (int w = 1; w < kWarps; ++w) block_max = fmaxf(block_max, shared.max_part[w]);
  float sum = local_max == -INFINITY ? 0.0f : local_sum * expf(local_max - block_max);
  for (int offset = gpu::kWarpSize / 2; offset > 0; offset /= 2) {
    sum += gpu::shfl_xor(sum, offset);
    greater += gpu::shfl_xor(greater, offset);
  }
  if (lane == 0) {
    shared.sum_part[warp] = sum;
    shared.count_part[warp] = greater;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    int32_t total_greater = 0;
    for (int w = 0; w < kWarps; ++w) {
      total += shared.sum_part[w];
      total_greater += shared.count_part[w];
    }
    shared.log_normaliser = block_max + logf(total);
    p.target_logprob[row] = valid_target ? target_value - shared.log_normaliser : NAN;
    p.target_rank[row] = valid_target ? total_greater + 1 : -1;
  }
  __syncthreads();
  if (p.num_top == 0) return;

  // Merge: num_top rounds of a block argmax over each thread's head.
  int head = 0;
  for (int j = 0; j < p.num_top; ++j) {
    Candidate best = head < p.num_top ? mine[head] : Candidate{-INFINITY, INT_MAX};
    int32_t best_thread = threadIdx.x;
    for (int offset = gpu::kWarpSize / 2; offset > 0; offset /= 2) {
      Candidate other{gpu::shfl_xor(best.value, offset), gpu::shfl_xor(best.id, offset)};
      const int32_t other_thread = gpu::shfl_xor(best_thread, offset);
      if (before(other, best)) {
        best = other;
        best_thread = other_thread;
      }
    }
    if (lane == 0) {
      shared.best_part[warp] = best;
      shared.best_thread_part[warp] = best_thread;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int w_best = 0;
      for (int w = 1; w < kWarps; ++w) {
        if (before(shared.best_part[w], shared.best_part[w_best])) w_best = w;
      }
      const Candidate c = shared.best_part[w_best];
      const bool found = c.id != INT_MAX;
      p.top_ids[row * p.num_top + j] = found ? c.id : -1;
      p.top_logprobs[row * p.num_top + j] = found ? c.value - shared.log_normaliser : -INFINITY;
      shared.winner = found ? shared.best_thread_part[w_best] : -1;
    }
    __syncthreads();
    if (threadIdx.x == shared.winner) ++head;
    __syncthreads();
  }
}

}  // namespace

void update_token_counts(const TokenCountParams& p, StreamHandle stream) {
  if (p.num_resets < 0 || p.num_entries < 0 || p.num_slots < 0 || p.vocab_size < 0) {
    throw InvalidArgument("update_token_counts: negative size (resets " + str(p.num_resets) +
                          ", entries " + str(p.num_entries) + ", slots " + str(p.num_slots) +
                          ", vocab " + str(p.vocab_size) + ")");
  }
  const auto s = static_cast<gpu::Stream>(stream);
  if (p.num_resets > 0) {
    reset_count_rows_kernel<<<p.num_resets, kThreads, 0, s>>>(p);
    check_launch("update_token_counts (reset)");
  }
  if (p.num_entries > 0) {
    add_token_counts_kernel<<<ceil_div(p.num_entries, kThreads), kThreads, 0, s>>>(p);
    check_launch("update_token_counts (add)");
  }
}

void apply_penalties(const PenaltyParams& p, StreamHandle stream) {
  if (p.num_rows < 0 || p.vocab_size < 0) {
    throw InvalidArgument("apply_penalties: num_rows " + str(p.num_rows) + " and vocab_size " +
                          str(p.vocab_size) + " must be >= 0");
  }
  if (p.num_rows == 0) return;
  apply_penalties_kernel<<<p.num_rows, kThreads, 0, static_cast<gpu::Stream>(stream)>>>(p);
  check_launch("apply_penalties");
}

// A target outside the vocabulary (the CPU throws) gives a NaN logprob and rank -1.
void token_logprobs(const TokenLogprobsParams& p, StreamHandle stream) {
  if (p.num_rows < 0 || p.vocab_size <= 0) {
    throw InvalidArgument("token_logprobs: num_rows " + str(p.num_rows) + " must be >= 0 and " +
                          "vocab_size " + str(p.vocab_size) + " > 0");
  }
  if (p.num_top < 0 || p.num_top > kMaxTop) {
    throw InvalidArgument("token_logprobs: num_top is " + str(p.num_top) + "; it must be in [0, " +
                          str(kMaxTop) + "]");
  }
  if (p.num_rows == 0) return;
  token_logprobs_kernel<<<p.num_rows, kThreads, 0, static_cast<gpu::Stream>(stream)>>>(p);
  check_launch("token_logprobs");
}

}  // namespace octavo::cuda

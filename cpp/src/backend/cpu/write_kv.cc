// CPU reference write_kv: scatters each token's K and V rows into its cache slot of one layer,
// converting fp32 activations to the cache dtype (round to nearest even). One OpenMP item per
// token; slots are distinct per step (the scheduler gives each new token its own slot), so items
// never write the same bytes.
#include <string>
#include <vector>

#include <octavo/error.h>

#include "backend/cpu/dtype.h"
#include "backend/row_scale.h"
#include "backend/ops.h"

namespace octavo::cpu {

void write_kv(const WriteKVParams& p) {
  require_fp32_activations(p.act_dtype, "write_kv");
  require_valid_dtype(p.cache_dtype, "write_kv", "cache");
  if (p.num_tokens < 0 || p.num_kv_heads <= 0 || p.head_dim <= 0 || p.block_size <= 0) {
    throw InvalidArgument("write_kv: num_tokens (" + std::to_string(p.num_tokens) +
                          ") must be >= 0 and num_kv_heads (" + std::to_string(p.num_kv_heads) +
                          "), head_dim (" + std::to_string(p.head_dim) + ") and block_size (" +
                          std::to_string(p.block_size) + ") positive");
  }
  // Slots are trusted (the pool size is not passed); -1 marks padding. Anything below -1 is a bug.
  for (int32_t t = 0; t < p.num_tokens; ++t) {
    if (p.slot_mapping[t] < -1) {
      throw InvalidArgument("write_kv: slot " + std::to_string(p.slot_mapping[t]) + " (token " +
                            std::to_string(t) + ") is negative; only -1 (skip) is allowed");
    }
  }
  check_row_scale(p.v_row_scale, "write_kv");
  const auto* k = static_cast<const float*>(p.k);
  const auto* v = static_cast<const float*>(p.v);
  const int64_t head_dim = p.head_dim;
  const int64_t head_run = int64_t{p.block_size} * head_dim;  // one KV head's part of a block
  const int64_t block_elements = 2 * p.num_kv_heads * head_run;
  // Decode writes one token per request: not worth waking the OpenMP team for small batches.
  const int64_t elements = int64_t{p.num_tokens} * p.num_kv_heads * head_dim;
#pragma omp parallel if (elements >= (int64_t{1} << 15))
  {
    std::vector<float> scaled_v;  // one token's v times its row scale: one buffer a thread
    if (p.v_row_scale.source != nullptr) scaled_v.resize(size_t(p.num_kv_heads) * head_dim);
#pragma omp for schedule(static)
    for (int32_t t = 0; t < p.num_tokens; ++t) {
      const int64_t slot = p.slot_mapping[t];
      if (slot == -1) continue;
      const int64_t block = slot / p.block_size;
      const int64_t offset = slot % p.block_size;
      const float* v_row = v + t * p.v_stride;
      if (p.v_row_scale.source != nullptr) {
        const float scale = row_rms_scale(p.v_row_scale, t);
        for (size_t i = 0; i < scaled_v.size(); ++i) scaled_v[i] = v_row[i] * scale;
        v_row = scaled_v.data();
      }
      for (int32_t h = 0; h < p.num_kv_heads; ++h) {
        const int64_t k_offset = block * block_elements + h * head_run + offset * head_dim;
        const int64_t v_offset = k_offset + p.num_kv_heads * head_run;
        store_row(k + t * p.k_stride + h * head_dim, head_dim, p.layer_cache, p.cache_dtype,
                  k_offset);
        store_row(v_row + h * head_dim, head_dim, p.layer_cache, p.cache_dtype, v_offset);
      }
    }
  }
}

}  // namespace octavo::cpu

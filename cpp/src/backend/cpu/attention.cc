// CPU reference paged attention (AttentionParams in backend/ops.h).
//
// Work decomposition: one OpenMP work item per (request, query head). An item converts the
// request's K and V for its KV head out of the paged cache into contiguous fp32 rows once, then
// for each of the request's queries computes all scores, a two-pass softmax (max, then exp and
// sum) in fp32 and the probability-weighted sum of V. Converting per item rather than per query
// keeps the cache reads at one pass per head, which bounds decode; prefill is bound by the
// q_len x context x head_dim dot products.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <octavo/error.h>

#include "backend/cpu/dtype.h"
#include "backend/ops.h"

namespace octavo::cpu {

namespace {

std::string str(long long value) { return std::to_string(value); }

void validate(const AttentionParams& p) {
  require_fp32_activations(p.act_dtype, "paged_attention");
  require_valid_dtype(p.cache_dtype, "paged_attention", "cache");
  if (p.num_requests < 0 || p.num_tokens < 0) {
    throw InvalidArgument("paged_attention: num_requests (" + str(p.num_requests) +
                          ") and num_tokens (" + str(p.num_tokens) + ") must be >= 0");
  }
  if (p.num_heads <= 0 || p.num_kv_heads <= 0 || p.num_heads % p.num_kv_heads != 0) {
    throw InvalidArgument("paged_attention: num_heads (" + str(p.num_heads) +
                          ") must be a positive multiple of num_kv_heads (" +
                          str(p.num_kv_heads) + ")");
  }
  if (p.head_dim <= 0 || p.block_size <= 0) {
    throw InvalidArgument("paged_attention: head_dim (" + str(p.head_dim) + ") and block_size (" +
                          str(p.block_size) + ") must be positive");
  }
  if (p.q_stride < int64_t{p.num_heads} * p.head_dim) {
    throw InvalidArgument("paged_attention: q_stride " + str(p.q_stride) +
                          " is below num_heads * head_dim (" +
                          str(int64_t{p.num_heads} * p.head_dim) + ")");
  }
  if (p.sliding_window < 0) {
    throw InvalidArgument("paged_attention: sliding_window is " + str(p.sliding_window) +
                          "; it must be >= 0 (0 = full attention)");
  }
  if (p.num_requests > 0 && p.query_start[0] != 0) {
    throw InvalidArgument("paged_attention: query_start[0] is " + str(p.query_start[0]) +
                          "; it must be 0");
  }
  for (int32_t r = 0; r < p.num_requests; ++r) {
    const int32_t q_len = p.query_start[r + 1] - p.query_start[r];
    const int32_t context = p.context_lens[r];
    if (q_len < 0 || p.query_start[r + 1] > p.num_tokens) {
      throw InvalidArgument("paged_attention: request " + str(r) + " has query rows [" +
                            str(p.query_start[r]) + ", " + str(p.query_start[r + 1]) +
                            "), outside the " + str(p.num_tokens) + " query tokens");
    }
    if (context < q_len) {
      throw InvalidArgument("paged_attention: request " + str(r) + " has context_len " +
                            str(context) + " below its " + str(q_len) +
                            " new tokens (write their K/V to the cache first)");
    }
    const int64_t blocks_needed = (int64_t{context} + p.block_size - 1) / p.block_size;
    if (blocks_needed > p.max_blocks_per_request) {
      throw InvalidArgument("paged_attention: request " + str(r) + " has context_len " +
                            str(context) + ", needing " + str(blocks_needed) +
                            " blocks; its block table holds " + str(p.max_blocks_per_request));
    }
  }
  if (p.request_order != nullptr) {  // a hint for the GPU's launch order; here only checked
    std::vector<bool> seen(size_t(p.num_requests), false);
    for (int32_t i = 0; i < p.num_requests; ++i) {
      const int32_t r = p.request_order[i];
      if (r < 0 || r >= p.num_requests || seen[size_t(r)]) {
        throw InvalidArgument("paged_attention: request_order[" + str(i) + "] is " + str(r) +
                              "; request_order must be a permutation of [0, " +
                              str(p.num_requests) + ")");
      }
      seen[size_t(r)] = true;
    }
  }
}

}  // namespace

void paged_attention(const AttentionParams& p) {
  validate(p);
  const int64_t head_dim = p.head_dim;
  const int32_t group = p.num_heads / p.num_kv_heads;
  const auto* q = static_cast<const float*>(p.q);
  auto* out = static_cast<float*>(p.out);
  // Element offsets inside one layer's pool [num_blocks][2][num_kv_heads][block_size][head_dim].
  const int64_t head_run = int64_t{p.block_size} * head_dim;  // one KV head's part of a block
  const int64_t block_elements = 2 * p.num_kv_heads * head_run;

#pragma omp parallel if (int64_t{p.num_requests} * p.num_heads > 1)
  {
    std::vector<float> keys, values, scores;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int32_t r = 0; r < p.num_requests; ++r) {
      for (int32_t h = 0; h < p.num_heads; ++h) {
        const int32_t q_begin = p.query_start[r];
        const int32_t q_len = p.query_start[r + 1] - q_begin;
        const int32_t context = p.context_lens[r];
        if (q_len == 0) continue;
        const int32_t kv_head = h / group;
        // The oldest position any query of this request can see: the first query's window start.
        const int32_t first_query_pos = context - q_len;
        const int32_t first_key =
            p.sliding_window > 0 ? std::max(0, first_query_pos - p.sliding_window + 1) : 0;
        const int32_t num_keys = context - first_key;
        keys.resize(size_t(num_keys) * head_dim);
        values.resize(size_t(num_keys) * head_dim);
        scores.resize(size_t(num_keys));
        const int32_t* block_table = p.block_tables + int64_t{r} * p.max_blocks_per_request;
        for (int32_t pos = first_key; pos < context; ++pos) {
          const int64_t block = block_table[pos / p.block_size];
          const int64_t k_offset = block * block_elements + kv_head * head_run +
                                   int64_t{pos % p.block_size} * head_dim;
          const int64_t v_offset = k_offset + p.num_kv_heads * head_run;
          const size_t row = size_t(pos - first_key) * head_dim;
          load_row(p.layer_cache, p.cache_dtype, k_offset, head_dim, keys.data() + row);
          load_row(p.layer_cache, p.cache_dtype, v_offset, head_dim, values.data() + row);
        }
        const float slope = p.alibi_slopes != nullptr ? p.alibi_slopes[h] : 0.0f;

        for (int32_t j = 0; j < q_len; ++j) {
          const int32_t token = q_begin + j;
          const int32_t query_pos = context - q_len + j;
          const int32_t lo =
              p.sliding_window > 0 ? std::max(0, query_pos - p.sliding_window + 1) : 0;
          const float* query = q + token * p.q_stride + h * head_dim;
          float max_score = -INFINITY;
          for (int32_t pos = lo; pos <= query_pos; ++pos) {
            const float* key = keys.data() + size_t(pos - first_key) * head_dim;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; ++d) dot += query[d] * key[d];
            float score = dot * p.scale;
            if (p.softcap > 0.0f) score = p.softcap * std::tanh(score / p.softcap);
            if (p.alibi_slopes != nullptr) score += slope * float(pos - query_pos);
            scores[pos - first_key] = score;
            max_score = std::max(max_score, score);
          }
          float* y = out + int64_t{token} * p.num_heads * head_dim + h * head_dim;
          std::fill(y, y + head_dim, 0.0f);
          float denominator = 0.0f;
          for (int32_t pos = lo; pos <= query_pos; ++pos) {
            const float weight = std::exp(scores[pos - first_key] - max_score);
            denominator += weight;
            const float* value = values.data() + size_t(pos - first_key) * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) y[d] += weight * value[d];
          }
          const float inv_denominator = 1.0f / denominator;
          for (int64_t d = 0; d < head_dim; ++d) y[d] *= inv_denominator;
        }
      }
    }
  }
}

}  // namespace octavo::cpu

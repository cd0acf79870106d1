// octavo._C.ops.paged_attention and decode_workspace_bytes over arrays, dispatched by device:
// numpy on the CPU (fp32 activations, the reference backend), torch CUDA tensors on the GPU
// (bf16/fp16): the decode kernel when max_query_len == 1, else the prefill kernel. Sizes come from
// the arrays' shapes; the checks here only keep a call inside its arrays, the ops check the rest.
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include <octavo/error.h>

#include "backend/ops.h"
#include "python/array_util.h"
#include "python/bindings.h"
#ifdef OCTAVO_WITH_CUDA
#include "cuda/cuda_ops.h"
#endif

namespace nb = nanobind;

namespace {

using octavo::DType;
using octavo::InvalidArgument;
using octavo::python::AnyArray;
using octavo::python::dtype_of;
using octavo::python::on_cuda;
using octavo::python::same_device_is_cuda;
using OptArray = std::optional<AnyArray>;

std::string str(long long value) { return std::to_string(value); }

void require_int32(const AnyArray& array, const char* what) {
  octavo::python::require_dtype(array, nb::dlpack::dtype_code::Int, 32, "paged_attention", what);
}

void require_size(const AnyArray& array, int64_t needed, const char* what) {
  if (int64_t(array.size()) < needed) {
    throw InvalidArgument(std::string("paged_attention: ") + what + " has " +
                          str(int64_t(array.size())) + " elements; the call needs " + str(needed));
  }
}

void paged_attention(AnyArray q, AnyArray cache_layer, AnyArray out, AnyArray query_start,
                     AnyArray context_lens, AnyArray block_tables, OptArray alibi_slopes,
                     int num_heads, int num_kv_heads, int head_dim, int block_size, float scale,
                     int sliding_window, float softcap, uintptr_t stream, int max_query_len,
                     int max_context_len, OptArray workspace, int64_t q_stride,
                     OptArray request_order, int num_decode_prefix) {
  const bool cuda =
      same_device_is_cuda("paged_attention", q, cache_layer, out, query_start, context_lens,
                          block_tables);
  if (alibi_slopes && on_cuda(*alibi_slopes) != cuda) {
    throw InvalidArgument("paged_attention: alibi_slopes is on another device than q");
  }
  if (request_order && on_cuda(*request_order) != cuda) {
    throw InvalidArgument("paged_attention: request_order is on another device than q");
  }
  require_int32(query_start, "query_start");
  require_int32(context_lens, "context_lens");
  require_int32(block_tables, "block_tables");
  if (num_heads <= 0 || head_dim <= 0) {
    throw InvalidArgument("paged_attention: num_heads and head_dim must be positive");
  }
  octavo::AttentionParams p{};
  const int64_t row = int64_t{num_heads} * head_dim;
  p.num_tokens = q.ndim() == 0 ? 0 : int32_t(q.shape(0));
  p.q_stride = q_stride > 0 ? q_stride : row;
  require_size(q, p.num_tokens == 0 ? 0 : (p.num_tokens - 1) * p.q_stride + row, "q");
  require_size(out, p.num_tokens * row, "out");
  p.num_requests = context_lens.ndim() == 0 ? 0 : int32_t(context_lens.shape(0));
  require_size(query_start, p.num_requests + 1, "query_start");
  if (block_tables.ndim() != 2 ||
      (p.num_requests > 0 && int64_t(block_tables.shape(0)) < p.num_requests)) {
    throw InvalidArgument("paged_attention: block_tables must be [num_requests, max_blocks]");
  }
  p.max_blocks_per_request = int32_t(block_tables.shape(1));
  if (alibi_slopes) {
    if (dtype_of(*alibi_slopes, "alibi_slopes") != DType::kFloat32) {
      throw InvalidArgument("paged_attention: alibi_slopes must be float32");
    }
    require_size(*alibi_slopes, num_heads, "alibi_slopes");
  }
  if (request_order) {
    require_int32(*request_order, "request_order");
    require_size(*request_order, p.num_requests, "request_order");
    p.request_order = static_cast<const int32_t*>(request_order->data());
  }
  if (num_decode_prefix < 0 || num_decode_prefix > p.num_requests) {
    throw InvalidArgument("paged_attention: num_decode_prefix " + str(num_decode_prefix) +
                          " is outside [0, " + str(p.num_requests) + "] requests");
  }
  p.num_decode_prefix = num_decode_prefix;
  p.q = q.data();
  p.layer_cache = cache_layer.data();
  p.out = out.data();
  p.query_start = static_cast<const int32_t*>(query_start.data());
  p.context_lens = static_cast<const int32_t*>(context_lens.data());
  p.block_tables = static_cast<const int32_t*>(block_tables.data());
  p.alibi_slopes = alibi_slopes ? static_cast<const float*>(alibi_slopes->data()) : nullptr;
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.block_size = block_size;
  p.sliding_window = sliding_window;
  p.scale = scale;
  p.softcap = softcap;
  p.act_dtype = dtype_of(q, "paged_attention q");
  p.cache_dtype = dtype_of(cache_layer, "paged_attention cache_layer");
  if (dtype_of(out, "paged_attention out") != p.act_dtype) {
    throw InvalidArgument("paged_attention: out must have q's dtype");
  }
  const int64_t block_elements = int64_t{2} * std::max(num_kv_heads, 1) * std::max(block_size, 1) *
                                 head_dim;
  if (int64_t(cache_layer.size()) % block_elements != 0) {
    throw InvalidArgument("paged_attention: cache_layer of " + str(int64_t(cache_layer.size())) +
                          " elements is not a whole number of [2, num_kv_heads, block_size, "
                          "head_dim] blocks");
  }

  if (!cuda) {
    // The host arrays give the per-step maxima when the caller did not pass them.
    const int32_t* starts = p.query_start;
    const int32_t* contexts = p.context_lens;
    for (int32_t r = 0; r < p.num_decode_prefix; ++r) {
      if (starts[r + 1] - starts[r] != 1 || starts[r] != r) {
        throw InvalidArgument("paged_attention: request " + str(r) + " of the decode prefix of " +
                              str(p.num_decode_prefix) + " does not have one query token at row " +
                              str(r));
      }
    }
    if (max_query_len < 0) {
      max_query_len = 0;
      for (int32_t r = 0; r < p.num_requests; ++r) {
        max_query_len = std::max(max_query_len, starts[r + 1] - starts[r]);
      }
    }
    if (max_context_len < 0) {
      max_context_len = 0;
      for (int32_t r = 0; r < p.num_requests; ++r) {
        max_context_len = std::max(max_context_len, contexts[r]);
      }
    }
    p.max_query_len = max_query_len;
    p.max_context_len = max_context_len;
    octavo::cpu::paged_attention(p);
    return;
  }
#ifdef OCTAVO_WITH_CUDA
  if (max_query_len < 0 || max_context_len < 0) {
    throw InvalidArgument(
        "paged_attention: CUDA arrays need max_query_len and max_context_len (the host knows "
        "them once per step; the GPU path never reads device memory back)");
  }
  p.max_query_len = max_query_len;
  p.max_context_len = max_context_len;
  const auto cuda_stream = octavo::python::as_stream(stream);
  auto decode = [&](const octavo::AttentionParams& d) {
    const size_t needed = octavo::cuda::decode_workspace_bytes(d);
    void* workspace_data = nullptr;
    if (needed > 0) {
      if (!workspace || !on_cuda(*workspace) || workspace->nbytes() < needed) {
        throw InvalidArgument("paged_attention: this decode batch needs a CUDA workspace of " +
                              str(int64_t(needed)) +
                              " bytes (octavo._C.ops.decode_workspace_bytes); got " +
                              (workspace ? str(int64_t(workspace->nbytes())) + " bytes" : "none"));
      }
      workspace_data = workspace->data();
    }
    octavo::cuda::paged_attention_decode(d, workspace_data, cuda_stream);
  };
  if (max_query_len == 1) {
    decode(p);
  } else if (octavo::cuda::splits_decode_prefix(p)) {
    const octavo::cuda::DecodePrefixSplit split = octavo::cuda::split_decode_prefix(p);
    decode(split.decode);
    octavo::cuda::paged_attention_prefill(split.prefill, cuda_stream);
  } else {
    octavo::cuda::paged_attention_prefill(p, cuda_stream);
  }
#else
  (void)stream;
  (void)workspace;
#endif
}

int64_t decode_workspace_bytes(int num_requests, int num_heads, int num_kv_heads, int head_dim,
                               int block_size, int max_context_len, int sliding_window) {
#ifdef OCTAVO_WITH_CUDA
  octavo::AttentionParams p{};
  p.num_requests = num_requests;
  p.num_tokens = num_requests;
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.block_size = block_size;
  p.max_query_len = 1;
  p.max_context_len = max_context_len;
  p.sliding_window = sliding_window;
  return int64_t(octavo::cuda::decode_workspace_bytes(p));
#else
  (void)num_requests, (void)num_heads, (void)num_kv_heads, (void)head_dim, (void)block_size;
  (void)max_context_len, (void)sliding_window;
  return 0;
#endif
}

std::string prefill_kernel(int head_dim, int max_query_len) {
#ifdef OCTAVO_WITH_CUDA
  octavo::AttentionParams p{};
  p.num_heads = p.num_kv_heads = 1;
  p.block_size = 16;
  p.head_dim = head_dim;
  p.max_query_len = max_query_len;
  return octavo::cuda::prefill_kernel_name(p);
#else
  (void)head_dim, (void)max_query_len;
  return "cpu";
#endif
}

}  // namespace

void bind_ops_attention(nb::module_& ops) {
  using nb::arg;
  ops.def("paged_attention", &paged_attention, arg("q"), arg("cache_layer"), arg("out"),
          arg("query_start"), arg("context_lens"), arg("block_tables"),
          arg("alibi_slopes").none(), arg("num_heads"), arg("num_kv_heads"), arg("head_dim"),
          arg("block_size"), arg("scale"), arg("sliding_window") = 0, arg("softcap") = 0.0f,
          arg("stream") = 0, arg("max_query_len") = -1, arg("max_context_len") = -1,
          arg("workspace").none() = nb::none(), arg("q_stride") = 0,
          arg("request_order").none() = nb::none(), arg("num_decode_prefix") = 0,
          "Paged attention (AttentionParams): out[t] = softmax(q[t] K^T * scale) V over the\n"
          "cached keys of t's request. q: [num_tokens, num_heads * head_dim] rows q_stride apart\n"
          "(default: contiguous); cache_layer: one layer's [num_blocks, 2, num_kv_heads,\n"
          "block_size, head_dim]; out: [num_tokens, num_heads * head_dim]; query_start,\n"
          "context_lens, block_tables: int32; alibi_slopes: float32 [num_heads] or None.\n"
          "CUDA arrays need max_query_len and max_context_len (host values; computed from the\n"
          "arrays on the CPU): 1 runs the decode kernel, which needs `workspace` (a CUDA byte\n"
          "buffer of decode_workspace_bytes(...) bytes) when that is > 0; larger runs prefill.\n"
          "request_order: optional int32 permutation of the requests, the order a decode launch\n"
          "starts them in (longest context first packs uneven batches); never changes the\n"
          "result. The CPU checks it is a permutation; on CUDA that is the caller's promise.\n"
          "num_decode_prefix: the first n requests have one query token each (rows 0 .. n-1);\n"
          "in a batch with prompt chunks CUDA runs them through the decode kernel (from\n"
          "kMinDecodePrefix = 16 on) and needs `workspace` for them. Never changes the result.");
  ops.def("decode_workspace_bytes", &decode_workspace_bytes, arg("num_requests"),
          arg("num_heads"), arg("num_kv_heads"), arg("head_dim"), arg("block_size"),
          arg("max_context_len"), arg("sliding_window") = 0,
          "Bytes of fp32 workspace the CUDA decode kernel needs for this batch shape (0: none;\n"
          "always 0 in builds without CUDA). Queries the current device's SM count.");
  ops.def("prefill_kernel", &prefill_kernel, arg("head_dim"), arg("max_query_len"),
          "Which CUDA prefill kernel a batch of this head dim and longest chunk runs on the\n"
          "current device: 'wgmma' (compute capability 9.0) or 'mma.sync'; 'cpu' in builds\n"
          "without CUDA.");
}

// octavo._C.ops: the row-wise model ops (embedding, norm, rotary, write_kv, rotary_write_kv,
// activation, gather_rows, add_logit_bias) and the few-row GEMM (gemv) over arrays, dispatched by device: numpy on the CPU
// (fp32 activations, the reference backend), torch CUDA tensors on the GPU (bf16/fp16). Sizes come
// from the arrays' shapes; strides and offsets (in elements) let q, k and v be views into one
// fused qkv buffer. The checks here only keep a call inside its arrays; the ops check the rest.
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <optional>
#include <string>

#include <octavo/error.h>
#include <octavo/model_spec.h>

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
#ifdef OCTAVO_WITH_CUDA
using octavo::python::as_stream;
#endif
using octavo::python::dtype_of;
using octavo::python::on_cuda;
using octavo::python::same_device_is_cuda;
using OptArray = std::optional<AnyArray>;

std::string str(long long value) { return std::to_string(value); }

void require_int(const AnyArray& array, int bits, const char* op, const char* what) {
  octavo::python::require_dtype(array, nb::dlpack::dtype_code::Int, bits, op, what);
}

void require_fp32(const AnyArray& array, const char* op, const char* what) {
  if (dtype_of(array, what) != DType::kFloat32) {
    throw InvalidArgument(std::string(op) + ": " + what + " must be a float32 array");
  }
}

void require_size(const AnyArray& array, int64_t needed, const char* op, const char* what) {
  if (int64_t(array.size()) < needed) {
    throw InvalidArgument(std::string(op) + ": " + what + " has " + str(int64_t(array.size())) +
                          " elements; the call needs " + str(needed));
  }
}

int64_t last_dim(const AnyArray& array) {
  return array.ndim() == 0 ? 1 : int64_t(array.shape(array.ndim() - 1));
}

/// The array's data `offset` elements in.
void* at(const AnyArray& array, int64_t offset) {
  return static_cast<char*>(array.data()) + offset * int64_t(array.itemsize());
}

/// Elements a [num_tokens] x [heads * head_dim] view at `stride` and `offset` reaches.
int64_t strided_extent(int64_t offset, int64_t num_tokens, int64_t stride, int64_t row) {
  return num_tokens == 0 ? 0 : offset + (num_tokens - 1) * stride + row;
}

void embedding(AnyArray token_ids, AnyArray table, AnyArray out, float scale, OptArray positions,
               OptArray position_ids, int position_offset, OptArray deferred_token_ids,
               uintptr_t stream) {
  const char* op = "embedding";
  const bool cuda = positions ? same_device_is_cuda(op, token_ids, table, out, *positions)
                              : same_device_is_cuda(op, token_ids, table, out);
  require_int(token_ids, 32, op, "token_ids");
  if (table.ndim() != 2) throw InvalidArgument("embedding: table must be [vocab_size, hidden]");
  octavo::EmbeddingParams p{};
  p.token_ids = static_cast<const int32_t*>(token_ids.data());
  p.table = table.data();
  p.out = out.data();
  p.num_tokens = int32_t(token_ids.size());
  p.hidden = int32_t(table.shape(1));
  p.vocab_size = int32_t(table.shape(0));
  p.scale = scale;
  p.weight_dtype = dtype_of(table, "embedding table");
  p.act_dtype = dtype_of(out, "embedding out");
  require_size(out, int64_t{p.num_tokens} * p.hidden, op, "out");
  if (positions.has_value() != position_ids.has_value()) {
    throw InvalidArgument("embedding: pass positions and position_ids together");
  }
  if (positions) {
    if (positions->ndim() != 2 || int64_t(positions->shape(1)) != p.hidden) {
      throw InvalidArgument("embedding: positions must be [num_positions, hidden]");
    }
    require_int(*position_ids, 32, op, "position_ids");
    require_size(*position_ids, p.num_tokens, op, "position_ids");
    if (dtype_of(*positions, "embedding positions") != p.weight_dtype) {
      throw InvalidArgument("embedding: positions and table must share a dtype");
    }
    p.positions = positions->data();
    p.position_ids = static_cast<const int32_t*>(position_ids->data());
    p.num_positions = int32_t(positions->shape(0));
    p.position_offset = position_offset;
  }
  if (deferred_token_ids) {
    require_int(*deferred_token_ids, 32, op, "deferred_token_ids");
    same_device_is_cuda(op, token_ids, *deferred_token_ids);  // throws when they differ
    p.deferred_token_ids = static_cast<const int32_t*>(deferred_token_ids->data());
    if (!cuda) {
      // Deferred ids index this array; the executor checks them when it packs a step.
      for (int32_t t = 0; t < p.num_tokens; ++t) {
        if (p.token_ids[t] < 0 && -int64_t{p.token_ids[t]} > int64_t(deferred_token_ids->size())) {
          throw InvalidArgument("embedding: token id " + std::to_string(p.token_ids[t]) +
                                " defers to entry " + std::to_string(-int64_t{p.token_ids[t]} - 1) +
                                " of " + std::to_string(deferred_token_ids->size()) +
                                " deferred_token_ids");
        }
      }
    }
  }
  if (cuda) return OCTAVO_ON_CUDA(embedding(p, as_stream(stream)));
  octavo::cpu::embedding(p);
}

void norm(AnyArray x, AnyArray out, OptArray weight, OptArray bias, OptArray residual, int kind,
          float eps, int64_t hidden, int64_t row_stride, int rows_per_group, int64_t group_stride,
          uintptr_t stream) {
  const char* op = "norm";
  const bool cuda = same_device_is_cuda(op, x, out);
  for (const OptArray* a : {&weight, &bias, &residual}) {
    if (*a && on_cuda(**a) != cuda) throw InvalidArgument("norm: arrays on different devices");
  }
  if (row_stride <= 0) row_stride = last_dim(x);
  if (hidden <= 0) hidden = row_stride;
  int64_t rows;
  if (rows_per_group > 0) {
    // As many groups as x holds; the last may end after its last row (x a flat view starting at
    // k inside a fused qkv matrix ends with one token's v). The op checks that groups don't overlap.
    if (group_stride <= 0) group_stride = last_dim(x);
    const int64_t group_extent = (rows_per_group - 1) * row_stride + hidden;
    if (group_stride <= 0 || int64_t(x.size()) < group_extent) {
      throw InvalidArgument("norm: x of " + str(int64_t(x.size())) + " elements holds no group of " +
                            str(rows_per_group) + " rows (" + str(group_extent) + " elements)");
    }
    rows = ((int64_t(x.size()) - group_extent) / group_stride + 1) * rows_per_group;
  } else {
    if (row_stride <= 0 || x.size() % row_stride != 0) {
      throw InvalidArgument("norm: x of " + str(int64_t(x.size())) +
                            " elements is not a whole number of rows of row_stride " + str(row_stride));
    }
    rows = int64_t(x.size()) / row_stride;
  }
  octavo::NormParams p{};
  p.in = x.data();
  p.out = out.data();
  p.rows = int32_t(rows);
  p.hidden = int32_t(hidden);
  p.row_stride = row_stride;
  p.rows_per_group = rows_per_group;
  p.group_stride = group_stride;
  p.eps = eps;
  p.kind = uint8_t(kind);
  p.act_dtype = dtype_of(x, "norm x");
  p.weight_dtype = p.act_dtype;
  if (dtype_of(out, "norm out") != p.act_dtype) throw InvalidArgument("norm: x and out dtypes differ");
  require_size(out, int64_t(x.size()), op, "out");
  if (weight) {
    require_size(*weight, hidden, op, "weight");
    p.weight = weight->data();
    p.weight_dtype = dtype_of(*weight, "norm weight");
  }
  if (bias) {
    require_size(*bias, hidden, op, "bias");
    if (dtype_of(*bias, "norm bias") != p.weight_dtype) {
      throw InvalidArgument("norm: weight and bias dtypes differ");
    }
    p.bias = bias->data();
  }
  if (residual) {
    require_size(*residual, int64_t{p.rows} * hidden, op, "residual");
    if (dtype_of(*residual, "norm residual") != p.act_dtype) {
      throw InvalidArgument("norm: x and residual dtypes differ");
    }
    p.residual = residual->data();
  }
  if (cuda) return OCTAVO_ON_CUDA(norm(p, as_stream(stream)));
  octavo::cpu::norm(p);
}

/// RotaryParams from the arrays; q or k may be absent. Strides default to dense heads.
octavo::RotaryParams rotary_params(const char* op, const OptArray& q, const OptArray& k,
                                   const AnyArray& positions, const AnyArray& cos_sin,
                                   int num_heads, int num_kv_heads, int head_dim, int rotary_dim,
                                   int pairing, int64_t q_stride, int64_t k_stride,
                                   int64_t q_offset, int64_t k_offset) {
  require_int(positions, 32, op, "positions");
  require_fp32(cos_sin, op, "cos_sin");
  if (rotary_dim <= 0) rotary_dim = head_dim;
  if (cos_sin.ndim() != 2 || int64_t(cos_sin.shape(1)) != rotary_dim) {
    throw InvalidArgument(std::string(op) + ": cos_sin must be [max_position, rotary_dim = " +
                          str(rotary_dim) + "]");
  }
  octavo::RotaryParams p{};
  p.positions = static_cast<const int32_t*>(positions.data());
  p.cos_sin = static_cast<const float*>(cos_sin.data());
  p.num_tokens = int32_t(positions.size());
  p.num_heads = num_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.rotary_dim = rotary_dim;
  p.max_position = int32_t(cos_sin.shape(0));
  p.pairing = uint8_t(pairing);
  p.q_stride = q_stride > 0 ? q_stride : int64_t{num_heads} * head_dim;
  p.k_stride = k_stride > 0 ? k_stride : int64_t{num_kv_heads} * head_dim;
  p.act_dtype = q ? dtype_of(*q, "q") : k ? dtype_of(*k, "k") : DType::kFloat32;
  if (q) {
    require_size(*q, strided_extent(q_offset, p.num_tokens, p.q_stride, int64_t{num_heads} * head_dim),
                 op, "q");
    p.q = at(*q, q_offset);
  }
  if (k) {
    require_size(*k, strided_extent(k_offset, p.num_tokens, p.k_stride, int64_t{num_kv_heads} * head_dim),
                 op, "k");
    if (dtype_of(*k, "k") != p.act_dtype) throw InvalidArgument(std::string(op) + ": q and k dtypes differ");
    p.k = at(*k, k_offset);
  }
  return p;
}

/// WriteKVParams from the arrays. The cache is one layer's pool,
/// [num_blocks][2][num_kv_heads][block_size][head_dim] (any shape with that many elements).
octavo::WriteKVParams write_kv_params(const char* op, const AnyArray& k, const AnyArray& v,
                                      const AnyArray& cache, const AnyArray& slot_mapping,
                                      int num_kv_heads, int head_dim, int block_size,
                                      int64_t k_stride, int64_t v_stride, int64_t k_offset,
                                      int64_t v_offset) {
  require_int(slot_mapping, 64, op, "slot_mapping");
  const int64_t block_elements = 2 * int64_t{num_kv_heads} * block_size * head_dim;
  if (block_elements <= 0 || cache.size() % block_elements != 0) {
    throw InvalidArgument(std::string(op) + ": a cache of " + str(int64_t(cache.size())) +
                          " elements is not a whole number of blocks of " + str(block_elements));
  }
  octavo::WriteKVParams p{};
  p.layer_cache = cache.data();
  p.slot_mapping = static_cast<const int64_t*>(slot_mapping.data());
  p.num_tokens = int32_t(slot_mapping.size());
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.block_size = block_size;
  const int64_t row = int64_t{num_kv_heads} * head_dim;
  p.k_stride = k_stride > 0 ? k_stride : row;
  p.v_stride = v_stride > 0 ? v_stride : row;
  require_size(k, strided_extent(k_offset, p.num_tokens, p.k_stride, row), op, "k");
  require_size(v, strided_extent(v_offset, p.num_tokens, p.v_stride, row), op, "v");
  p.k = at(k, k_offset);
  p.v = at(v, v_offset);
  p.act_dtype = dtype_of(k, "k");
  if (dtype_of(v, "v") != p.act_dtype) throw InvalidArgument(std::string(op) + ": k and v dtypes differ");
  p.cache_dtype = dtype_of(cache, "cache");
  return p;
}

/// RotaryParams' QK norm from the optional [head_dim] weights (both or neither).
void set_qk_norm(octavo::RotaryParams& p, const char* op, bool cuda, const OptArray& q_weight,
                 const OptArray& k_weight, float eps, bool plus_one) {
  if (!q_weight && !k_weight) return;
  if (!q_weight || !k_weight) {
    throw InvalidArgument(std::string(op) + ": pass q_norm_weight and k_norm_weight together");
  }
  for (const AnyArray* a : {&*q_weight, &*k_weight}) {
    if (on_cuda(*a) != cuda) throw InvalidArgument(std::string(op) + ": arrays on different devices");
    require_size(*a, p.head_dim, op, "QK norm weight");
  }
  p.norm_weight_dtype = dtype_of(*q_weight, "q_norm_weight");
  if (dtype_of(*k_weight, "k_norm_weight") != p.norm_weight_dtype) {
    throw InvalidArgument(std::string(op) + ": q_norm_weight and k_norm_weight dtypes differ");
  }
  p.q_norm_weight = q_weight->data();
  p.k_norm_weight = k_weight->data();
  p.qk_norm_eps = eps;
  p.qk_norm_plus_one = plus_one;
}

/// RowRmsScale over the rows of `source` ([num_tokens, width], contiguous, the act dtype), or
/// none when it is not given.
octavo::RowRmsScale row_scale_of(const char* op, bool cuda, const OptArray& source,
                                 int64_t num_tokens, float eps, octavo::DType act_dtype) {
  if (!source) return {};
  if (on_cuda(*source) != cuda) {
    throw InvalidArgument(std::string(op) + ": arrays on different devices");
  }
  const int64_t width = last_dim(*source);
  if (width <= 0 || int64_t(source->size()) != num_tokens * width) {
    throw InvalidArgument(std::string(op) + ": row_scale_source has " +
                          str(int64_t(source->size())) + " elements; expected [num_tokens = " +
                          str(num_tokens) + ", width > 0]");
  }
  if (dtype_of(*source, "row_scale_source") != act_dtype) {
    throw InvalidArgument(std::string(op) +
                          ": row_scale_source's dtype differs from the activations'");
  }
  return octavo::RowRmsScale{source->data(), width, int32_t(width), eps};
}

void rotary(OptArray q, OptArray k, AnyArray positions, AnyArray cos_sin, int num_heads,
            int num_kv_heads, int head_dim, int rotary_dim, int pairing, int64_t q_stride,
            int64_t k_stride, int64_t q_offset, int64_t k_offset, OptArray q_norm_weight,
            OptArray k_norm_weight, float qk_norm_eps, bool qk_norm_plus_one, uintptr_t stream) {
  const char* op = "rotary";
  const bool cuda = same_device_is_cuda(op, positions, cos_sin);
  for (const OptArray* a : {&q, &k}) {
    if (*a && on_cuda(**a) != cuda) throw InvalidArgument("rotary: arrays on different devices");
  }
  octavo::RotaryParams p =
      rotary_params(op, q, k, positions, cos_sin, num_heads, num_kv_heads, head_dim, rotary_dim,
                    pairing, q_stride, k_stride, q_offset, k_offset);
  set_qk_norm(p, op, cuda, q_norm_weight, k_norm_weight, qk_norm_eps, qk_norm_plus_one);
  if (cuda) return OCTAVO_ON_CUDA(rotary(p, as_stream(stream)));
  octavo::cpu::rotary(p);
}

void write_kv(AnyArray k, AnyArray v, AnyArray cache, AnyArray slot_mapping, int num_kv_heads,
              int head_dim, int block_size, int64_t k_stride, int64_t v_stride, int64_t k_offset,
              int64_t v_offset, uintptr_t stream) {
  const char* op = "write_kv";
  const bool cuda = same_device_is_cuda(op, k, v, cache, slot_mapping);
  const octavo::WriteKVParams p = write_kv_params(op, k, v, cache, slot_mapping, num_kv_heads,
                                                  head_dim, block_size, k_stride, v_stride,
                                                  k_offset, v_offset);
  if (cuda) return OCTAVO_ON_CUDA(write_kv(p, as_stream(stream)));
  octavo::cpu::write_kv(p);
}

void rotary_write_kv(AnyArray q, AnyArray k, AnyArray v, AnyArray positions, AnyArray cos_sin,
                     AnyArray cache, AnyArray slot_mapping, int num_heads, int num_kv_heads,
                     int head_dim, int block_size, int rotary_dim, int pairing, int64_t q_stride,
                     int64_t k_stride, int64_t v_stride, int64_t q_offset, int64_t k_offset,
                     int64_t v_offset, OptArray q_norm_weight, OptArray k_norm_weight,
                     float qk_norm_eps, bool qk_norm_plus_one, OptArray row_scale_source,
                     float row_scale_eps, uintptr_t stream) {
  const char* op = "rotary_write_kv";
  const bool cuda = same_device_is_cuda(op, q, k, v, positions, cos_sin, cache, slot_mapping);
  octavo::RotaryParams r =
      rotary_params(op, q, k, positions, cos_sin, num_heads, num_kv_heads, head_dim, rotary_dim,
                    pairing, q_stride, k_stride, q_offset, k_offset);
  set_qk_norm(r, op, cuda, q_norm_weight, k_norm_weight, qk_norm_eps, qk_norm_plus_one);
  octavo::WriteKVParams w = write_kv_params(op, k, v, cache, slot_mapping, num_kv_heads,
                                            head_dim, block_size, k_stride, v_stride, k_offset,
                                            v_offset);
  r.row_scale = w.v_row_scale =
      row_scale_of(op, cuda, row_scale_source, r.num_tokens, row_scale_eps, r.act_dtype);
  // The CPU reference has no fused op: rotary, then write_kv of the rotated k.
  if (cuda) return OCTAVO_ON_CUDA(rotary_write_kv(r, w, as_stream(stream)));
  octavo::cpu::rotary(r);
  octavo::cpu::write_kv(w);
}

void activation(AnyArray x, AnyArray out, int activation, OptArray row_scale_source,
                float row_scale_eps, uintptr_t stream) {
  const char* op = "activation";
  const bool cuda = same_device_is_cuda(op, x, out);
  octavo::ActivationParams p{};
  p.in = x.data();
  p.out = out.data();
  p.inter = int32_t(last_dim(out));
  p.num_tokens = p.inter == 0 ? 0 : int32_t(out.size() / p.inter);
  p.activation = uint8_t(activation);
  p.act_dtype = dtype_of(x, "activation x");
  if (dtype_of(out, "activation out") != p.act_dtype) {
    throw InvalidArgument("activation: x and out dtypes differ");
  }
  const bool glu = activation >= 0 && activation <= int(octavo::Activation::kRelu) &&
                   octavo::is_glu(octavo::Activation(activation));
  if (int64_t(x.size()) != int64_t{p.num_tokens} * p.inter * (glu ? 2 : 1)) {
    throw InvalidArgument("activation: x has " + str(int64_t(x.size())) + " elements; expected " +
                          str(int64_t{p.num_tokens} * p.inter * (glu ? 2 : 1)) +
                          (glu ? " (gate | up: twice out's)" : " (as out)"));
  }
  p.row_scale = row_scale_of(op, cuda, row_scale_source, p.num_tokens, row_scale_eps, p.act_dtype);
  if (cuda) return OCTAVO_ON_CUDA(activation(p, as_stream(stream)));
  octavo::cpu::activation(p);
}

void gather_rows(AnyArray x, AnyArray rows, AnyArray out, uintptr_t stream) {
  const char* op = "gather_rows";
  const bool cuda = same_device_is_cuda(op, x, rows, out);
  require_int(rows, 32, op, "rows");
  octavo::GatherRowsParams p{};
  p.in = x.data();
  p.rows = static_cast<const int32_t*>(rows.data());
  p.out = out.data();
  p.num_rows = int32_t(rows.size());
  p.width = int32_t(last_dim(x));
  p.act_dtype = dtype_of(x, "gather_rows x");
  if (dtype_of(out, "gather_rows out") != p.act_dtype) {
    throw InvalidArgument("gather_rows: x and out dtypes differ");
  }
  require_size(out, int64_t{p.num_rows} * p.width, op, "out");
  if (cuda) return OCTAVO_ON_CUDA(gather_rows(p, as_stream(stream)));
  octavo::cpu::gather_rows(p);
}

void add_logit_bias(AnyArray logits, AnyArray row_offsets, AnyArray token_ids, AnyArray bias,
                    uintptr_t stream) {
  const char* op = "add_logit_bias";
  const bool cuda = same_device_is_cuda(op, logits, row_offsets, token_ids, bias);
  require_fp32(logits, op, "logits");
  require_fp32(bias, op, "bias");
  require_int(row_offsets, 32, op, "row_offsets");
  require_int(token_ids, 32, op, "token_ids");
  if (row_offsets.size() < 1 || token_ids.size() != bias.size()) {
    throw InvalidArgument("add_logit_bias: row_offsets needs num_rows + 1 entries and token_ids "
                          "and bias one entry each per bias");
  }
  octavo::LogitBiasParams p{};
  p.logits = static_cast<float*>(logits.data());
  p.row_offsets = static_cast<const int32_t*>(row_offsets.data());
  p.token_ids = static_cast<const int32_t*>(token_ids.data());
  p.bias = static_cast<const float*>(bias.data());
  p.num_rows = int32_t(row_offsets.size() - 1);
  p.vocab_size = int32_t(last_dim(logits));
  require_size(logits, int64_t{p.num_rows} * p.vocab_size, op, "logits");
  if (cuda) return OCTAVO_ON_CUDA(add_logit_bias(p, as_stream(stream)));
  octavo::cpu::add_logit_bias(p);
}

void gemv(AnyArray x, AnyArray weight, AnyArray out, OptArray bias, bool accumulate,
          uintptr_t stream) {
  const char* op = "gemv";
  const bool cuda = same_device_is_cuda(op, x, weight, out);
  if (bias && on_cuda(*bias) != cuda) throw InvalidArgument("gemv: arrays on different devices");
  if (x.ndim() != 2 || weight.ndim() != 2 || out.ndim() != 2 ||
      x.shape(1) != weight.shape(1) || out.shape(0) != x.shape(0) ||
      out.shape(1) != weight.shape(0)) {
    throw InvalidArgument("gemv: needs x [m, k], weight [n, k] and out [m, n]");
  }
  octavo::GemmParams p{};
  p.in = x.data();
  p.weight = weight.data();
  p.out = out.data();
  p.m = int32_t(x.shape(0));
  p.n = int32_t(weight.shape(0));
  p.k = int32_t(x.shape(1));
  p.in_stride = p.k;
  p.out_stride = p.n;
  p.accumulate = accumulate;
  p.act_dtype = dtype_of(x, "gemv x");
  p.weight_dtype = dtype_of(weight, "gemv weight");
  p.out_dtype = dtype_of(out, "gemv out");
  if (bias) {
    require_size(*bias, p.n, op, "bias");
    if (dtype_of(*bias, "gemv bias") == DType::kFloat32 && p.out_dtype == DType::kFloat32) {
      p.bias_f32 = static_cast<const float*>(bias->data());
    } else {
      p.bias = bias->data();
    }
  }
  if (cuda) return OCTAVO_ON_CUDA(gemv(p, as_stream(stream)));
  octavo::cpu::gemm(p);
}

}  // namespace

void bind_ops_elementwise(nb::module_& ops) {
  using nb::arg;
  ops.def("embedding", &embedding, arg("token_ids"), arg("table"), arg("out"), arg("scale") = 1.0f,
          arg("positions").none() = nb::none(), arg("position_ids").none() = nb::none(),
          arg("position_offset") = 0, arg("deferred_token_ids").none() = nb::none(),
          arg("stream") = 0,
          "out[t] = table[token_ids[t]] * scale (+ positions[position_ids[t] + position_offset]).\n"
          "token_ids, position_ids: int32. On the GPU an out-of-range index gives a zero row.\n"
          "With deferred_token_ids, an id -1 - i stands for deferred_token_ids[i] (one outside\n"
          "the vocabulary gives a zero row on every device).");
  ops.def("norm", &norm, arg("x"), arg("out"), arg("weight").none() = nb::none(),
          arg("bias").none() = nb::none(), arg("residual").none() = nb::none(), arg("kind") = 0,
          arg("eps") = 1e-6f, arg("hidden") = 0, arg("row_stride") = 0, arg("rows_per_group") = 0,
          arg("group_stride") = 0, arg("stream") = 0,
          "Normalise each row of x into out (may be x). kind: a NormKind value. Rows are\n"
          "row_stride elements apart (default: x's last dim); the first `hidden` (default:\n"
          "row_stride) of each are normalised. With rows_per_group > 0, x is as many groups as\n"
          "it holds, group_stride elements apart (default: x's last dim), each rows_per_group rows\n"
          "from its start (per-head norm of q or k inside a fused qkv row). With residual\n"
          "([rows, hidden] contiguous): residual += x first and the sum is normalised.");
  ops.def("rotary", &rotary, arg("q").none(), arg("k").none(), arg("positions"), arg("cos_sin"),
          arg("num_heads"), arg("num_kv_heads"), arg("head_dim"), arg("rotary_dim") = 0,
          arg("pairing") = 0, arg("q_stride") = 0, arg("k_stride") = 0, arg("q_offset") = 0,
          arg("k_offset") = 0, arg("q_norm_weight").none() = nb::none(),
          arg("k_norm_weight").none() = nb::none(), arg("qk_norm_eps") = 1e-6f,
          arg("qk_norm_plus_one") = false, arg("stream") = 0,
          "Rotate q and k (either may be None) in place. Token t's heads start at\n"
          "offset + t * stride elements (strides default to heads * head_dim). cos_sin: float32\n"
          "[max_position, rotary_dim]; rotary_dim 0 means head_dim; pairing 0 NeoX, 1 GPT-J.\n"
          "With q_norm_weight and k_norm_weight ([head_dim]), every head is RMS-normalised\n"
          "first (weights applied as 1 + w when qk_norm_plus_one).");
  ops.def("write_kv", &write_kv, arg("k"), arg("v"), arg("cache"), arg("slot_mapping"),
          arg("num_kv_heads"), arg("head_dim"), arg("block_size"), arg("k_stride") = 0,
          arg("v_stride") = 0, arg("k_offset") = 0, arg("v_offset") = 0, arg("stream") = 0,
          "Write each token's k and v into its slot (int64; -1 skips) of one layer's cache,\n"
          "[num_blocks][2][num_kv_heads][block_size][head_dim].");
  ops.def("rotary_write_kv", &rotary_write_kv, arg("q"), arg("k"), arg("v"), arg("positions"),
          arg("cos_sin"), arg("cache"), arg("slot_mapping"), arg("num_heads"),
          arg("num_kv_heads"), arg("head_dim"), arg("block_size"), arg("rotary_dim") = 0,
          arg("pairing") = 0, arg("q_stride") = 0, arg("k_stride") = 0, arg("v_stride") = 0,
          arg("q_offset") = 0, arg("k_offset") = 0, arg("v_offset") = 0,
          arg("q_norm_weight").none() = nb::none(), arg("k_norm_weight").none() = nb::none(),
          arg("qk_norm_eps") = 1e-6f, arg("qk_norm_plus_one") = false,
          arg("row_scale_source").none() = nb::none(), arg("row_scale_eps") = 1e-6f,
          arg("stream") = 0,
          "rotary on q and k (QK norm first when the weights are given), then write_kv of the\n"
          "rotated k and v: one fused kernel on the GPU. With row_scale_source ([tokens, width]),\n"
          "token t's q, k and v are first multiplied by rsqrt(mean(row_t^2) + row_scale_eps).");
  ops.def("activation", &activation, arg("x"), arg("out"), arg("activation"),
          arg("row_scale_source").none() = nb::none(), arg("row_scale_eps") = 1e-6f,
          arg("stream") = 0,
          "out = act(x) (plain) or act(gate) * up for x = [tokens, 2 * inter] (GLU: gate | up).\n"
          "activation: an Activation value; inter is out's last dim. With row_scale_source\n"
          "([tokens, width]), row t of x is first multiplied by rsqrt(mean(row_t^2) + eps).");
  ops.def("gather_rows", &gather_rows, arg("x"), arg("rows"), arg("out"), arg("stream") = 0,
          "out[i] = x[rows[i]] (rows: int32); the row width is x's last dim.");
  ops.def("add_logit_bias", &add_logit_bias, arg("logits"), arg("row_offsets"), arg("token_ids"),
          arg("bias"), arg("stream") = 0,
          "logits[r, token_ids[i]] += bias[i] for i in [row_offsets[r], row_offsets[r + 1]).\n"
          "logits, bias: float32; row_offsets, token_ids: int32.");
  ops.def("gemv", &gemv, arg("x"), arg("weight"), arg("out"), arg("bias").none() = nb::none(),
          arg("accumulate") = false, arg("stream") = 0,
          "out = x . weight^T (+ bias) (+ out when accumulate) for x [m, k], weight [n, k]: on\n"
          "the GPU the kernel decode steps of at most 2 rows use (bf16/fp16; out in that dtype\n"
          "or float32, whose bias may be float32); on the CPU the reference gemm.");
}

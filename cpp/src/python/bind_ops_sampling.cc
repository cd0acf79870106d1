// octavo._C.ops: the sampler (SampleParams in backend/ops.h), the penalty ops and prompt-token
// logprobs over arrays, dispatched by device:
// numpy on the CPU (the reference), torch CUDA tensors on the GPU. The per-row settings travel as
// packed SamplingRow structs (pack_sampling_rows builds them on the host from per-row numpy
// arrays; copy the bytes to the GPU for a CUDA call), the layout the engine hands the op.
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string>

#include <octavo/error.h>

#include "backend/ops.h"
#include "python/array_util.h"
#include "python/bindings.h"

namespace nb = nanobind;

namespace {

using octavo::InvalidArgument;
using octavo::PenaltyRow;
using octavo::TokenCountEntry;
using octavo::SamplingRow;
using octavo::python::AnyArray;
#ifdef OCTAVO_WITH_CUDA
using octavo::python::as_stream;
#endif
using octavo::python::same_device_is_cuda;
using OptArray = std::optional<AnyArray>;

template <typename T>
using HostVector = nb::ndarray<const T, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using PackedRows = nb::ndarray<nb::numpy, uint8_t, nb::ndim<2>>;

std::string str(long long value) { return std::to_string(value); }

void require(const AnyArray& array, nb::dlpack::dtype_code code, int bits, const char* what) {
  octavo::python::require_dtype(array, code, bits, "sample", what);
}

PackedRows pack_sampling_rows(HostVector<float> temperature, HostVector<int32_t> top_k,
                              HostVector<float> top_p, HostVector<float> min_p,
                              HostVector<uint64_t> seed, HostVector<uint64_t> draw) {
  const size_t n = temperature.shape(0);
  if (top_k.shape(0) != n || top_p.shape(0) != n || min_p.shape(0) != n || seed.shape(0) != n ||
      draw.shape(0) != n) {
    throw InvalidArgument("pack_sampling_rows: the six arrays must have the same length (" +
                          str(int64_t(n)) + " temperatures)");
  }
  auto* rows = new SamplingRow[n > 0 ? n : 1];
  for (size_t i = 0; i < n; ++i) {
    rows[i] = SamplingRow{temperature(i), top_k(i), top_p(i), min_p(i), seed(i), draw(i)};
  }
  nb::capsule owner(rows, [](void* p) noexcept { delete[] static_cast<SamplingRow*>(p); });
  return PackedRows(rows, {n, sizeof(SamplingRow)}, owner);
}

void sample(AnyArray logits, AnyArray rows, AnyArray sampled, AnyArray sampled_logprob,
            OptArray top_ids, OptArray top_logprobs, float final_softcap, OptArray workspace,
            uintptr_t stream) {
  if (top_ids.has_value() != top_logprobs.has_value()) {
    throw InvalidArgument("sample: pass both top_ids and top_logprobs, or neither");
  }
  bool cuda = same_device_is_cuda("sample", logits, rows, sampled, sampled_logprob);
  if (top_ids) cuda = same_device_is_cuda("sample", logits, *top_ids, *top_logprobs);
  if (workspace) cuda = same_device_is_cuda("sample", logits, *workspace);

  using Code = nb::dlpack::dtype_code;
  require(logits, Code::Float, 32, "logits");
  require(rows, Code::UInt, 8, "rows (from pack_sampling_rows)");
  require(sampled, Code::Int, 32, "sampled");
  require(sampled_logprob, Code::Float, 32, "sampled_logprob");
  if (logits.ndim() != 2) throw InvalidArgument("sample: logits must be [num_rows, vocab]");
  const int64_t num_rows = int64_t(logits.shape(0));
  const int64_t vocab = int64_t(logits.shape(1));
  if (int64_t(rows.nbytes()) != num_rows * int64_t(sizeof(SamplingRow))) {
    throw InvalidArgument("sample: rows holds " + str(int64_t(rows.nbytes())) + " bytes; " +
                          str(num_rows) + " rows need " +
                          str(num_rows * int64_t(sizeof(SamplingRow))));
  }
  if (int64_t(sampled.size()) != num_rows || int64_t(sampled_logprob.size()) != num_rows) {
    throw InvalidArgument("sample: sampled and sampled_logprob need " + str(num_rows) +
                          " elements each");
  }
  int64_t num_top = 0;
  if (top_ids) {
    require(*top_ids, Code::Int, 32, "top_ids");
    require(*top_logprobs, Code::Float, 32, "top_logprobs");
    if (top_ids->ndim() != 2 || int64_t(top_ids->shape(0)) != num_rows ||
        top_logprobs->ndim() != 2 || top_logprobs->shape(0) != top_ids->shape(0) ||
        top_logprobs->shape(1) != top_ids->shape(1)) {
      throw InvalidArgument("sample: top_ids and top_logprobs must both be [num_rows, num_top]");
    }
    num_top = int64_t(top_ids->shape(1));
  }

  octavo::SampleParams params{};
  params.logits = static_cast<float*>(logits.data());
  params.rows = static_cast<const SamplingRow*>(rows.data());
  params.sampled = static_cast<int32_t*>(sampled.data());
  params.sampled_logprob = static_cast<float*>(sampled_logprob.data());
  params.top_ids = top_ids ? static_cast<int32_t*>(top_ids->data()) : nullptr;
  params.top_logprobs = top_logprobs ? static_cast<float*>(top_logprobs->data()) : nullptr;
  params.num_rows = int32_t(num_rows);
  params.vocab_size = int32_t(vocab);
  params.num_top = int32_t(num_top);
  params.final_softcap = final_softcap;

  if (cuda) {
#ifdef OCTAVO_WITH_CUDA
    // Without a workspace every row takes one block (small batches are slower, not wrong).
    const size_t needed = octavo::cuda::sample_workspace_bytes(params);
    if (workspace && workspace->nbytes() < needed) {
      throw InvalidArgument("sample: the workspace has " + str(int64_t(workspace->nbytes())) +
                            " bytes; it needs " + str(int64_t(needed)));
    }
    octavo::cuda::sample(params, workspace && needed > 0 ? workspace->data() : nullptr,
                         as_stream(stream));
#endif
    return;
  }
  octavo::cpu::sample(params);
}

size_t sample_workspace_bytes(int32_t num_rows, int32_t vocab_size, int32_t num_top) {
#ifdef OCTAVO_WITH_CUDA
  octavo::SampleParams params{};
  params.num_rows = num_rows;
  params.vocab_size = vocab_size;
  params.num_top = num_top;
  return octavo::cuda::sample_workspace_bytes(params);
#else
  (void)num_rows, (void)vocab_size, (void)num_top;
  return 0;
#endif
}

using Code = nb::dlpack::dtype_code;

void require_op(const AnyArray& array, Code code, int bits, const char* op, const char* what) {
  octavo::python::require_dtype(array, code, bits, op, what);
}

PackedRows pack_penalty_rows(HostVector<int32_t> slot, HostVector<float> repetition,
                             HostVector<float> frequency, HostVector<float> presence) {
  const size_t n = slot.shape(0);
  if (repetition.shape(0) != n || frequency.shape(0) != n || presence.shape(0) != n) {
    throw InvalidArgument("pack_penalty_rows: the four arrays must have the same length (" +
                          str(int64_t(n)) + " slots)");
  }
  auto* rows = new PenaltyRow[n > 0 ? n : 1];
  for (size_t i = 0; i < n; ++i) rows[i] = PenaltyRow{slot(i), repetition(i), frequency(i), presence(i)};
  nb::capsule owner(rows, [](void* p) noexcept { delete[] static_cast<PenaltyRow*>(p); });
  return PackedRows(rows, {n, sizeof(PenaltyRow)}, owner);
}

void update_token_counts(AnyArray counts, AnyArray reset_slots, AnyArray entries,
                         uintptr_t stream) {
  const char* op = "update_token_counts";
  const bool cuda = same_device_is_cuda(op, counts, reset_slots, entries);
  require_op(counts, Code::Int, 32, op, "counts");
  require_op(reset_slots, Code::Int, 32, op, "reset_slots");
  require_op(entries, Code::Int, 32, op, "entries");
  if (counts.ndim() != 2 || entries.ndim() != 2 || entries.shape(1) != 3) {
    throw InvalidArgument("update_token_counts: counts must be [num_slots, vocab] and entries "
                          "[num_entries, 3] (slot, token, add)");
  }
  octavo::TokenCountParams p{};
  p.counts = static_cast<int32_t*>(counts.data());
  p.reset_slots = static_cast<const int32_t*>(reset_slots.data());
  p.entries = static_cast<const TokenCountEntry*>(entries.data());
  p.num_resets = int32_t(reset_slots.size());
  p.num_entries = int32_t(entries.shape(0));
  p.num_slots = int32_t(counts.shape(0));
  p.vocab_size = int32_t(counts.shape(1));
  if (cuda) {
    OCTAVO_ON_CUDA(update_token_counts(p, as_stream(stream)));
    return;
  }
  octavo::cpu::update_token_counts(p);
}

void apply_penalties(AnyArray logits, AnyArray counts, AnyArray rows, uintptr_t stream) {
  const char* op = "apply_penalties";
  const bool cuda = same_device_is_cuda(op, logits, counts, rows);
  require_op(logits, Code::Float, 32, op, "logits");
  require_op(counts, Code::Int, 32, op, "counts");
  require_op(rows, Code::UInt, 8, op, "rows (from pack_penalty_rows)");
  if (logits.ndim() != 2 || counts.ndim() != 2 || counts.shape(1) != logits.shape(1)) {
    throw InvalidArgument("apply_penalties: logits must be [num_rows, vocab] and counts "
                          "[num_slots, vocab]");
  }
  octavo::PenaltyParams p{};
  p.logits = static_cast<float*>(logits.data());
  p.counts = static_cast<const int32_t*>(counts.data());
  p.rows = static_cast<const PenaltyRow*>(rows.data());
  p.num_rows = int32_t(logits.shape(0));
  p.num_slots = int32_t(counts.shape(0));
  p.vocab_size = int32_t(logits.shape(1));
  if (int64_t(rows.nbytes()) != int64_t(p.num_rows) * int64_t(sizeof(PenaltyRow))) {
    throw InvalidArgument("apply_penalties: rows holds " + str(int64_t(rows.nbytes())) +
                          " bytes; " + str(p.num_rows) + " rows need " +
                          str(int64_t(p.num_rows) * int64_t(sizeof(PenaltyRow))));
  }
  if (cuda) {
    OCTAVO_ON_CUDA(apply_penalties(p, as_stream(stream)));
    return;
  }
  octavo::cpu::apply_penalties(p);
}

void token_logprobs(AnyArray logits, AnyArray targets, AnyArray target_logprob,
                    AnyArray target_rank, OptArray top_ids, OptArray top_logprobs,
                    float final_softcap, uintptr_t stream) {
  const char* op = "token_logprobs";
  if (top_ids.has_value() != top_logprobs.has_value()) {
    throw InvalidArgument("token_logprobs: pass both top_ids and top_logprobs, or neither");
  }
  bool cuda = same_device_is_cuda(op, logits, targets, target_logprob, target_rank);
  if (top_ids) cuda = same_device_is_cuda(op, logits, *top_ids, *top_logprobs);
  require_op(logits, Code::Float, 32, op, "logits");
  require_op(targets, Code::Int, 32, op, "targets");
  require_op(target_logprob, Code::Float, 32, op, "target_logprob");
  require_op(target_rank, Code::Int, 32, op, "target_rank");
  if (logits.ndim() != 2) throw InvalidArgument("token_logprobs: logits must be [num_rows, vocab]");
  const int64_t num_rows = int64_t(logits.shape(0));
  if (int64_t(targets.size()) != num_rows || int64_t(target_logprob.size()) != num_rows ||
      int64_t(target_rank.size()) != num_rows) {
    throw InvalidArgument("token_logprobs: targets, target_logprob and target_rank need " +
                          str(num_rows) + " elements each");
  }
  int64_t num_top = 0;
  if (top_ids) {
    require_op(*top_ids, Code::Int, 32, op, "top_ids");
    require_op(*top_logprobs, Code::Float, 32, op, "top_logprobs");
    if (top_ids->ndim() != 2 || int64_t(top_ids->shape(0)) != num_rows ||
        top_logprobs->ndim() != 2 || top_logprobs->shape(0) != top_ids->shape(0) ||
        top_logprobs->shape(1) != top_ids->shape(1)) {
      throw InvalidArgument("token_logprobs: top_ids and top_logprobs must both be "
                            "[num_rows, num_top]");
    }
    num_top = int64_t(top_ids->shape(1));
  }
  octavo::TokenLogprobsParams p{};
  p.logits = static_cast<const float*>(logits.data());
  p.targets = static_cast<const int32_t*>(targets.data());
  p.target_logprob = static_cast<float*>(target_logprob.data());
  p.target_rank = static_cast<int32_t*>(target_rank.data());
  p.top_ids = top_ids ? static_cast<int32_t*>(top_ids->data()) : nullptr;
  p.top_logprobs = top_logprobs ? static_cast<float*>(top_logprobs->data()) : nullptr;
  p.num_rows = int32_t(num_rows);
  p.vocab_size = int32_t(logits.shape(1));
  p.num_top = int32_t(num_top);
  p.final_softcap = final_softcap;
  if (cuda) {
    OCTAVO_ON_CUDA(token_logprobs(p, as_stream(stream)));
    return;
  }
  octavo::cpu::token_logprobs(p);
}

}  // namespace

void bind_ops_sampling(nb::module_& ops) {
  ops.def("pack_sampling_rows", &pack_sampling_rows, nb::arg("temperature"), nb::arg("top_k"),
          nb::arg("top_p"), nb::arg("min_p"), nb::arg("seed"), nb::arg("draw"),
          "Per-row sampling settings (1-D numpy arrays: float32, int32, float32, float32, uint64,\n"
          "uint64) packed as SamplingRow structs: a uint8 numpy array [num_rows, 32]. Pass it to\n"
          "sample() as is for the CPU, or copied to the GPU (torch.from_numpy(...).cuda()).");
  ops.def("sample", &sample, nb::arg("logits"), nb::arg("rows"), nb::arg("sampled"),
          nb::arg("sampled_logprob"), nb::arg("top_ids") = nb::none(),
          nb::arg("top_logprobs") = nb::none(), nb::arg("final_softcap") = 0.0f,
          nb::arg("workspace") = nb::none(), nb::arg("stream") = 0,
          "Samples one token per row of fp32 logits [num_rows, vocab] (soft-capped in place on\n"
          "the CPU; read-only on the GPU). rows: pack_sampling_rows(...). Writes sampled (int32\n"
          "[num_rows]), sampled_logprob (float32, raw log-softmax) and, when given, the\n"
          "top_ids / top_logprobs [num_rows, num_top] report (num_top from their shape).\n"
          "workspace (GPU, optional): sample_workspace_bytes() bytes; with it, a small batch\n"
          "spreads each row over several blocks.");
  ops.def("sample_workspace_bytes", &sample_workspace_bytes, nb::arg("num_rows"),
          nb::arg("vocab_size"), nb::arg("num_top"),
          "Bytes of device workspace sample() can use on the GPU (0 on CPU-only builds).");
  ops.def("pack_penalty_rows", &pack_penalty_rows, nb::arg("slot"), nb::arg("repetition"),
          nb::arg("frequency"), nb::arg("presence"),
          "Per-row penalties (1-D numpy arrays: int32, float32, float32, float32) packed as\n"
          "PenaltyRow structs: a uint8 numpy array [num_rows, 16]; slot -1 means no penalties.");
  ops.def("update_token_counts", &update_token_counts, nb::arg("counts"), nb::arg("reset_slots"),
          nb::arg("entries"), nb::arg("stream") = 0,
          "Zeroes rows reset_slots of the int32 count table [num_slots, vocab], then adds each\n"
          "entry (int32 [n, 3]: slot, token, add) to its cell. add is 1 per output occurrence,\n"
          "or 1 << 30 once per distinct prompt token.");
  ops.def("apply_penalties", &apply_penalties, nb::arg("logits"), nb::arg("counts"),
          nb::arg("rows"), nb::arg("stream") = 0,
          "Applies repetition, frequency and presence penalties in place to fp32 logits\n"
          "[num_rows, vocab] from the count table; rows: pack_penalty_rows(...).");
  ops.def("token_logprobs", &token_logprobs, nb::arg("logits"), nb::arg("targets"),
          nb::arg("target_logprob"), nb::arg("target_rank"), nb::arg("top_ids") = nb::none(),
          nb::arg("top_logprobs") = nb::none(), nb::arg("final_softcap") = 0.0f,
          nb::arg("stream") = 0,
          "Per row: log-softmax of the (soft-capped) logits at targets[r], its rank (1 + tokens\n"
          "strictly more likely) and, when given, the top_ids / top_logprobs [num_rows, num_top]\n"
          "report. The logits are not modified.");
}

// The engine and its plain structs. Conversions only: Python builds a ModelSpec field by field,
// hands weights as (canonical name, dtype, contiguous host array) tuples and drives step().
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <octavo/engine.h>

#include "python/bindings.h"
#include "python/weights.h"

namespace nb = nanobind;
using namespace octavo;

namespace {

Engine* make_engine(const ModelSpec& spec, const EngineConfig& config,
                                    const std::vector<WeightTuple>& weights) {
  std::vector<HostTensor> tensors = to_host_tensors(weights);
  nb::gil_scoped_release release;  // the arrays stay alive: `weights` holds them
  return new Engine(spec, config, tensors);  // nb::new_ takes ownership
}

}  // namespace

void bind_engine(nb::module_& m) {
  nb::enum_<NormKind>(m, "NormKind")
      .value("rms_norm", NormKind::kRMSNorm)
      .value("rms_norm_plus_one", NormKind::kRMSNormPlusOne)
      .value("layer_norm", NormKind::kLayerNorm)
      .value("layer_norm_no_weight", NormKind::kLayerNormNoWeight);
  nb::enum_<Activation>(m, "Activation")
      .value("silu_glu", Activation::kSiluGlu)
      .value("gelu_glu", Activation::kGeluGlu)
      .value("gelu_tanh_glu", Activation::kGeluTanhGlu)
      .value("gelu", Activation::kGelu)
      .value("gelu_tanh", Activation::kGeluTanh)
      .value("relu", Activation::kRelu);
  nb::enum_<PositionKind>(m, "PositionKind")
      .value("rotary", PositionKind::kRotary)
      .value("alibi", PositionKind::kAlibi)
      .value("learned", PositionKind::kLearned)
      .value("none", PositionKind::kNone);
  nb::enum_<RotaryPairing>(m, "RotaryPairing")
      .value("neox", RotaryPairing::kNeox)
      .value("gptj", RotaryPairing::kGptj);
  nb::enum_<RopeScaling>(m, "RopeScaling")
      .value("none", RopeScaling::kNone)
      .value("linear", RopeScaling::kLinear)
      .value("dynamic_ntk", RopeScaling::kDynamicNtk)
      .value("llama3", RopeScaling::kLlama3)
      .value("yarn", RopeScaling::kYarn);
  nb::enum_<ResidualKind>(m, "ResidualKind")
      .value("sequential", ResidualKind::kSequential)
      .value("parallel_one_norm", ResidualKind::kParallelOneNorm)
      .value("parallel_two_norms", ResidualKind::kParallelTwoNorms);

  nb::class_<RopeConfig>(m, "RopeConfig")
      .def(nb::init<>())
      .def_rw("pairing", &RopeConfig::pairing)
      .def_rw("theta", &RopeConfig::theta)
      .def_rw("rotary_dim", &RopeConfig::rotary_dim)
      .def_rw("scaling", &RopeConfig::scaling)
      .def_rw("factor", &RopeConfig::factor)
      .def_rw("low_freq_factor", &RopeConfig::low_freq_factor)
      .def_rw("high_freq_factor", &RopeConfig::high_freq_factor)
      .def_rw("original_max_position", &RopeConfig::original_max_position)
      .def_rw("beta_fast", &RopeConfig::beta_fast)
      .def_rw("beta_slow", &RopeConfig::beta_slow)
      .def_rw("attention_factor", &RopeConfig::attention_factor);

  nb::class_<ModelSpec>(m, "ModelSpec", "One generic decoder described by data (model_spec.h).")
      .def(nb::init<>())
      .def_rw("architecture", &ModelSpec::architecture)
      .def_rw("vocab_size", &ModelSpec::vocab_size)
      .def_rw("hidden_size", &ModelSpec::hidden_size)
      .def_rw("num_layers", &ModelSpec::num_layers)
      .def_rw("num_heads", &ModelSpec::num_heads)
      .def_rw("num_kv_heads", &ModelSpec::num_kv_heads)
      .def_rw("num_kv_heads_per_layer", &ModelSpec::num_kv_heads_per_layer)
      .def_rw("head_dim", &ModelSpec::head_dim)
      .def_rw("intermediate_size", &ModelSpec::intermediate_size)
      .def_rw("max_position_embeddings", &ModelSpec::max_position_embeddings)
      .def_rw("norm", &ModelSpec::norm)
      .def_rw("norm_eps", &ModelSpec::norm_eps)
      .def_rw("norm_bias", &ModelSpec::norm_bias)
      .def_rw("activation", &ModelSpec::activation)
      .def_rw("positions", &ModelSpec::positions)
      .def_rw("rope", &ModelSpec::rope)
      .def_rw("position_offset", &ModelSpec::position_offset)
      .def_rw("residual", &ModelSpec::residual)
      .def_rw("qkv_bias", &ModelSpec::qkv_bias)
      .def_rw("o_bias", &ModelSpec::o_bias)
      .def_rw("mlp_bias", &ModelSpec::mlp_bias)
      .def_rw("qk_norm", &ModelSpec::qk_norm)
      .def_rw("tied_embeddings", &ModelSpec::tied_embeddings)
      .def_rw("lm_head_bias", &ModelSpec::lm_head_bias)
      .def_rw("embedding_norm", &ModelSpec::embedding_norm)
      .def_rw("sandwich_norms", &ModelSpec::sandwich_norms)
      .def_rw("embedding_scale", &ModelSpec::embedding_scale)
      .def_rw("attention_scale", &ModelSpec::attention_scale)
      .def_rw("attn_logit_softcap", &ModelSpec::attn_logit_softcap)
      .def_rw("final_logit_softcap", &ModelSpec::final_logit_softcap)
      .def_rw("alibi_slope_scale", &ModelSpec::alibi_slope_scale)
      .def_rw("sliding_window", &ModelSpec::sliding_window)
      .def("validate", &ModelSpec::validate);

  nb::class_<EngineConfig>(m, "EngineConfig")
      .def(nb::init<>())
      .def_rw("model", &EngineConfig::model)
      .def_rw("device", &EngineConfig::device)
      .def_rw("dtype", &EngineConfig::dtype)
      .def_rw("max_model_len", &EngineConfig::max_model_len)
      .def_rw("max_num_seqs", &EngineConfig::max_num_seqs)
      .def_rw("max_num_batched_tokens", &EngineConfig::max_num_batched_tokens)
      .def_rw("block_size", &EngineConfig::block_size)
      .def_rw("enable_prefix_caching", &EngineConfig::enable_prefix_caching)
      .def_rw("num_kv_blocks", &EngineConfig::num_kv_blocks)
      .def_rw("cpu_kv_cache_bytes", &EngineConfig::cpu_kv_cache_bytes)
      .def_rw("gpu_memory_utilization", &EngineConfig::gpu_memory_utilization)
      .def_rw("seed", &EngineConfig::seed)
      .def_rw("enforce_eager", &EngineConfig::enforce_eager)
      .def_rw("async_scheduling", &EngineConfig::async_scheduling)
      .def_rw("eos_token_ids", &EngineConfig::eos_token_ids);

  nb::class_<SamplingParams>(m, "SamplingParams")
      .def(nb::init<>())
      .def_rw("n", &SamplingParams::n)
      .def_rw("temperature", &SamplingParams::temperature)
      .def_rw("top_p", &SamplingParams::top_p)
      .def_rw("top_k", &SamplingParams::top_k)
      .def_rw("min_p", &SamplingParams::min_p)
      .def_rw("seed", &SamplingParams::seed)
      .def_rw("max_tokens", &SamplingParams::max_tokens)
      .def_rw("min_tokens", &SamplingParams::min_tokens)
      .def_rw("stop_token_ids", &SamplingParams::stop_token_ids)
      .def_rw("ignore_eos", &SamplingParams::ignore_eos)
      .def_rw("logprobs", &SamplingParams::logprobs)
      .def_rw("want_logprobs", &SamplingParams::want_logprobs)
      .def_rw("logit_bias", &SamplingParams::logit_bias)
      .def_rw("presence_penalty", &SamplingParams::presence_penalty)
      .def_rw("frequency_penalty", &SamplingParams::frequency_penalty)
      .def_rw("repetition_penalty", &SamplingParams::repetition_penalty)
      .def_rw("prompt_logprobs", &SamplingParams::prompt_logprobs)
      .def_rw("beam_width", &SamplingParams::beam_width)
      .def_rw("length_penalty", &SamplingParams::length_penalty);

  nb::class_<TokenLogprobs>(m, "TokenLogprobs")
      .def_ro("logprob", &TokenLogprobs::logprob)
      .def_ro("rank", &TokenLogprobs::rank)
      .def_ro("top_ids", &TokenLogprobs::top_ids)
      .def_ro("top_logprobs", &TokenLogprobs::top_logprobs);

  nb::class_<RequestOutput>(m, "EngineOutput", "What one step added to one request.")
      .def_ro("id", &RequestOutput::id)
      .def_ro("group_id", &RequestOutput::group_id)
      .def_ro("index", &RequestOutput::index)
      .def_ro("new_token_ids", &RequestOutput::new_token_ids)
      .def_ro("new_logprobs", &RequestOutput::new_logprobs)
      .def_ro("new_prompt_logprobs", &RequestOutput::new_prompt_logprobs)
      .def_ro("cumulative_logprob", &RequestOutput::cumulative_logprob)
      .def_ro("finished", &RequestOutput::finished)
      .def_prop_ro("finish_reason",
                   [](const RequestOutput& o) -> std::optional<std::string> {
                     if (o.finish_reason == FinishReason::kNone) return std::nullopt;
                     return std::string(to_string(o.finish_reason));
                   })
      .def_ro("stop_token_id", &RequestOutput::stop_token_id)
      .def_ro("error", &RequestOutput::error);

  nb::class_<EngineStats>(m, "EngineStats")
      .def_ro("num_running", &EngineStats::num_running)
      .def_ro("num_waiting", &EngineStats::num_waiting)
      .def_ro("num_kv_blocks", &EngineStats::num_kv_blocks)
      .def_ro("num_free_kv_blocks", &EngineStats::num_free_kv_blocks)
      .def_ro("num_evictable_kv_blocks", &EngineStats::num_evictable_kv_blocks)
      .def_ro("num_preemptions", &EngineStats::num_preemptions)
      .def_ro("prefix_cache_queries", &EngineStats::prefix_cache_queries)
      .def_ro("prefix_cache_hits", &EngineStats::prefix_cache_hits)
      .def_ro("prompt_tokens", &EngineStats::prompt_tokens)
      .def_ro("generation_tokens", &EngineStats::generation_tokens)
      .def_ro("num_steps", &EngineStats::num_steps)
      .def_ro("schedule_seconds", &EngineStats::schedule_seconds)
      .def_ro("execute_seconds", &EngineStats::execute_seconds)
      .def_ro("output_seconds", &EngineStats::output_seconds)
      .def_ro("device_wait_seconds", &EngineStats::device_wait_seconds)
      .def_ro("graph_captures", &EngineStats::graph_captures)
      .def_ro("async_steps", &EngineStats::async_steps)
      .def_ro("graph_capture_seconds", &EngineStats::graph_capture_seconds)
      .def_ro("startup_graph_captures", &EngineStats::startup_graph_captures)
      .def_ro("startup_graph_capture_seconds", &EngineStats::startup_graph_capture_seconds);

  nb::class_<Engine>(m, "Engine", "The synchronous engine: add_request, step, abort.")
      .def(nb::new_(&make_engine), nb::arg("spec"), nb::arg("config"), nb::arg("weights"))
      .def("add_request", &Engine::add_request, nb::arg("prompt_token_ids"), nb::arg("params"))
      .def("step", &Engine::step, nb::call_guard<nb::gil_scoped_release>())
      .def("abort", &Engine::abort, nb::arg("request_id"), nb::arg("whole_group") = true)
      .def("has_unfinished", &Engine::has_unfinished)
      .def("stats", &Engine::stats)
      .def_prop_ro("config", &Engine::config)
      .def_prop_ro("spec", &Engine::spec);
}

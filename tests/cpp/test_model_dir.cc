// octavo's model directory: ModelSpec <-> JSON, octavo.json, save_model_dir, and
// Engine(EngineConfig) loading a directory (the same tokens as the engine given the weights in
// memory), plus the log sink.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <octavo/engine.h>
#include <octavo/error.h>
#include <octavo/log.h>
#include <octavo/model_dir.h>

#include "model/random_weights.h"

namespace octavo {
namespace {

namespace fs = std::filesystem;

ModelSpec tiny_spec() {
  ModelSpec s;
  s.architecture = "LlamaForCausalLM";
  s.vocab_size = 96;
  s.hidden_size = 32;
  s.num_layers = 2;
  s.num_heads = 4;
  s.num_kv_heads = 2;
  s.head_dim = 8;
  s.intermediate_size = 48;
  s.max_position_embeddings = 128;
  s.norm_eps = 1e-6f;
  s.qk_norm = true;
  return s;
}

// Every field away from its default, so a field the JSON forgets cannot round-trip by luck.
ModelSpec unusual_spec() {
  ModelSpec s = tiny_spec();
  s.architecture = "Exotic\"Model\\\n";
  s.num_kv_heads_per_layer = {2, 1};
  s.norm = NormKind::kLayerNorm;
  s.norm_eps = 1.0e-5f;
  s.norm_bias = true;
  s.activation = Activation::kGeluTanh;
  s.positions = PositionKind::kRotary;
  s.rope.pairing = RotaryPairing::kGptj;
  s.rope.theta = 500000.0f;
  s.rope.rotary_dim = 4;
  s.rope.scaling = RopeScaling::kYarn;
  s.rope.factor = 4.0f;
  s.rope.low_freq_factor = 1.5f;
  s.rope.high_freq_factor = 3.25f;
  s.rope.original_max_position = 32;
  s.rope.beta_fast = 16.0f;
  s.rope.beta_slow = 0.5f;
  s.rope.attention_factor = 0.1f;  // not exactly representable: checks the shortest round trip
  s.position_offset = 2;
  s.residual = ResidualKind::kSequential;
  s.qkv_bias = true;
  s.o_bias = true;
  s.mlp_bias = true;
  s.qk_norm = false;
  s.tied_embeddings = true;
  s.lm_head_bias = true;
  s.embedding_norm = true;
  s.sandwich_norms = true;
  s.embedding_scale = 5.656854249f;
  s.attention_scale = 0.3f;
  s.attn_logit_softcap = 50.0f;
  s.final_logit_softcap = 30.0f;
  s.alibi_slope_scale = 0.125f;
  s.sliding_window = {0, 16};
  return s;
}

uint32_t bits(float value) {
  uint32_t out;
  std::memcpy(&out, &value, sizeof out);
  return out;
}

void expect_same_spec(const ModelSpec& a, const ModelSpec& b) {
  EXPECT_EQ(a.architecture, b.architecture);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.num_layers, b.num_layers);
  EXPECT_EQ(a.num_heads, b.num_heads);
  EXPECT_EQ(a.num_kv_heads, b.num_kv_heads);
  EXPECT_EQ(a.num_kv_heads_per_layer, b.num_kv_heads_per_layer);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.norm, b.norm);
  EXPECT_EQ(bits(a.norm_eps), bits(b.norm_eps));
  EXPECT_EQ(a.norm_bias, b.norm_bias);
  EXPECT_EQ(a.activation, b.activation);
  EXPECT_EQ(a.positions, b.positions);
  EXPECT_EQ(a.rope.pairing, b.rope.pairing);
  EXPECT_EQ(bits(a.rope.theta), bits(b.rope.theta));
  EXPECT_EQ(a.rope.rotary_dim, b.rope.rotary_dim);
  EXPECT_EQ(a.rope.scaling, b.rope.scaling);
  EXPECT_EQ(bits(a.rope.factor), bits(b.rope.factor));
  EXPECT_EQ(bits(a.rope.low_freq_factor), bits(b.rope.low_freq_factor));
  EXPECT_EQ(bits(a.rope.high_freq_factor), bits(b.rope.high_freq_factor));
  EXPECT_EQ(a.rope.original_max_position, b.rope.original_max_position);
  EXPECT_EQ(bits(a.rope.beta_fast), bits(b.rope.beta_fast));
  EXPECT_EQ(bits(a.rope.beta_slow), bits(b.rope.beta_slow));
  EXPECT_EQ(bits(a.rope.attention_factor), bits(b.rope.attention_factor));
  EXPECT_EQ(a.position_offset, b.position_offset);
  EXPECT_EQ(a.residual, b.residual);
  EXPECT_EQ(a.qkv_bias, b.qkv_bias);
  EXPECT_EQ(a.o_bias, b.o_bias);
  EXPECT_EQ(a.mlp_bias, b.mlp_bias);
  EXPECT_EQ(a.qk_norm, b.qk_norm);
  EXPECT_EQ(a.tied_embeddings, b.tied_embeddings);
  EXPECT_EQ(a.lm_head_bias, b.lm_head_bias);
  EXPECT_EQ(a.embedding_norm, b.embedding_norm);
  EXPECT_EQ(a.sandwich_norms, b.sandwich_norms);
  EXPECT_EQ(bits(a.embedding_scale), bits(b.embedding_scale));
  EXPECT_EQ(bits(a.attention_scale), bits(b.attention_scale));
  EXPECT_EQ(bits(a.attn_logit_softcap), bits(b.attn_logit_softcap));
  EXPECT_EQ(bits(a.final_logit_softcap), bits(b.final_logit_softcap));
  EXPECT_EQ(bits(a.alibi_slope_scale), bits(b.alibi_slope_scale));
  EXPECT_EQ(a.sliding_window, b.sliding_window);
}

// Expects `f` to throw E with a message containing every one of `parts`.
template <typename E, typename F>
void expect_error(F&& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no exception; expected one mentioning " << parts.front();
  } catch (const E& e) {
    for (const std::string& part : parts) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
          << "message \"" << e.what() << "\" lacks \"" << part << "\"";
    }
  }
}

std::string replace(std::string text, const std::string& from, const std::string& to) {
  const size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  if (at != std::string::npos) text.replace(at, from.size(), to);
  return text;
}

class TempDir {
 public:
  TempDir() {
    std::string pattern = (fs::temp_directory_path() / "octavo-model-dir-XXXXXX").string();
    path_ = ::mkdtemp(pattern.data());
  }
  ~TempDir() {
    std::error_code ignored;
    fs::remove_all(path_, ignored);
  }
  const std::string& path() const { return path_; }
  std::string sub(const std::string& name) const { return (fs::path(path_) / name).string(); }

 private:
  std::string path_;
};

void write_text(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// ---- JSON -------------------------------------------------------------------------------------

TEST(ModelSpecJson, EveryFieldRoundTripsExactly) {
  const ModelSpec spec = unusual_spec();
  spec.validate();
  const std::string json = to_json(spec);
  const ModelSpec back = model_spec_from_json(json);
  expect_same_spec(spec, back);
  EXPECT_EQ(to_json(back), json);
}

TEST(ModelSpecJson, ReadsWhatPythonWrites) {
  // Python's json.dumps of the spec dict: different spacing, floats as doubles, enums by name.
  const std::string json = R"({"architecture": "Qwen3ForCausalLM", "vocab_size": 96,
    "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8,
    "intermediate_size": 48, "max_position_embeddings": 128, "norm": "rms_norm",
    "norm_eps": 1e-06, "rope": {"theta": 1000000.0, "scaling": "none"}, "qk_norm": true,
    "sliding_window": [0, 0]})";
  const ModelSpec spec = model_spec_from_json(json);
  EXPECT_EQ(spec.architecture, "Qwen3ForCausalLM");
  EXPECT_EQ(bits(spec.norm_eps), bits(1e-6f));
  EXPECT_EQ(bits(spec.rope.theta), bits(1e6f));
  EXPECT_TRUE(spec.qk_norm);
  EXPECT_EQ(spec.sliding_window, (std::vector<int>{0, 0}));
  EXPECT_EQ(spec.activation, Activation::kSiluGlu);  // absent: the default
}

TEST(ModelSpecJson, ErrorsNameTheField) {
  const std::string good = to_json(tiny_spec());
  expect_error<FormatError>([&] { model_spec_from_json(replace(good, "\"num_layers\": 2", "\"num_layers\": 2.5")); },
                            {"num_layers", "expected an integer"});
  expect_error<FormatError>([&] { model_spec_from_json(replace(good, "\"num_layers\": 2", "\"num_layers\": \"2\"")); },
                            {"num_layers", "a string", "expected an integer"});
  expect_error<FormatError>([&] { model_spec_from_json(replace(good, "\"num_layers\": 2", "\"num_layers\": 4294967296")); },
                            {"num_layers", "32-bit"});
  expect_error<FormatError>([&] { model_spec_from_json(replace(good, "\"norm\": \"rms_norm\"", "\"norm\": \"batch_norm\"")); },
                            {"norm", "batch_norm", "rms_norm_plus_one"});
  expect_error<FormatError>([&] { model_spec_from_json(replace(good, "\"qk_norm\": true", "\"qk_norm\": 1")); },
                            {"qk_norm", "true or false"});
  expect_error<FormatError>([&] { model_spec_from_json(replace(good, "\"theta\": 10000.0", "\"theta\": 1e39")); },
                            {"rope.theta", "32-bit float"});
  expect_error<FormatError>([&] { model_spec_from_json(replace(good, "\"theta\": 10000.0", "\"thetta\": 10000.0")); },
                            {"rope.thetta", "unknown", "theta"});
  expect_error<FormatError>([&] { model_spec_from_json(replace(good, "\"qk_norm\": true", "\"qk_norm\": true, \"mystery\": 1")); },
                            {"'mystery'", "unknown", "newer octavo"});
  expect_error<FormatError>([&] { model_spec_from_json(replace(good, "\"qk_norm\": true", "\"qk_norm\": true, \"qk_norm\": false")); },
                            {"qk_norm", "twice"});
  expect_error<FormatError>([&] { model_spec_from_json(replace(good, "\"sliding_window\": []", "\"sliding_window\": [0, -1.5]")); },
                            {"sliding_window[1]"});
  expect_error<FormatError>([&] { model_spec_from_json(replace(good, "  \"hidden_size\": 32,\n", "")); },
                            {"hidden_size", "missing"});
  // Valid JSON, invalid model: validate()'s message, as a FormatError.
  expect_error<FormatError>([&] { model_spec_from_json(replace(good, "\"num_kv_heads\": 2", "\"num_kv_heads\": 3")); },
                            {"num_heads (4) must be a multiple of num_kv_heads (3)"});
  expect_error<FormatError>([&] { model_spec_from_json(good.substr(0, good.size() / 2)); }, {"invalid JSON"});
  expect_error<FormatError>([&] { model_spec_from_json("[1, 2]"); }, {"not a JSON object"});
}

TEST(ModelSpecJson, NonFiniteFloatsAreRefusedOnWrite) {
  ModelSpec spec = tiny_spec();
  spec.attention_scale = std::numeric_limits<float>::quiet_NaN();
  expect_error<InvalidArgument>([&] { to_json(spec); }, {"attention_scale", "finite"});
}

TEST(ModelDirConfigJson, RoundTripAndErrors) {
  ModelDirConfig config{unusual_spec(), "bfloat16", {1, 7}};
  const std::string json = to_json(config);
  const ModelDirConfig back = model_dir_config_from_json(json);
  expect_same_spec(config.spec, back.spec);
  EXPECT_EQ(back.dtype, "bfloat16");
  EXPECT_EQ(back.eos_token_ids, (std::vector<int32_t>{1, 7}));

  expect_error<FormatError>([&] { model_dir_config_from_json(replace(json, "\"format_version\": 1", "\"format_version\": 2")); },
                            {"format_version 2", "newer", "upgrade octavo"});
  expect_error<FormatError>([&] { model_dir_config_from_json(replace(json, "\"format_version\": 1,\n", "")); },
                            {"format_version", "missing"});
  expect_error<FormatError>([&] { model_dir_config_from_json(replace(json, "\"bfloat16\"", "\"int8\"")); },
                            {"dtype", "int8", "float32, float16 or bfloat16"});
  expect_error<FormatError>([&] { model_dir_config_from_json(replace(json, "[1, 7]", "[1, 96]")); },
                            {"eos token id 96", "[0, 96)"});
  expect_error<FormatError>([&] { model_dir_config_from_json(replace(json, "[1, 7]", "[1, -7]")); },
                            {"eos_token_ids[1]"});
  expect_error<FormatError>([&] { model_dir_config_from_json(replace(json, "\"dtype\"", "\"weights\": 1, \"dtype\"")); },
                            {"'weights'", "unknown"});
  expect_error<FormatError>([&] { model_dir_config_from_json(replace(json, "\"num_layers\": 2", "\"num_layers\": false")); },
                            {"model_spec", "num_layers"});
  config.dtype = "int4";
  expect_error<InvalidArgument>([&] { to_json(config); }, {"int4"});
}

// ---- directories and the engine -----------------------------------------------------------------

std::vector<int32_t> greedy(Engine& engine, const std::vector<int32_t>& prompt, int max_tokens) {
  SamplingParams params;
  params.temperature = 0.0f;
  params.max_tokens = max_tokens;
  params.ignore_eos = true;
  const RequestId id = engine.add_request(prompt, params);
  std::vector<int32_t> tokens;
  while (engine.has_unfinished()) {
    for (const RequestOutput& out : engine.step()) {
      EXPECT_EQ(out.id, id);
      EXPECT_TRUE(out.error.empty()) << out.error;
      tokens.insert(tokens.end(), out.new_token_ids.begin(), out.new_token_ids.end());
    }
  }
  return tokens;
}

EngineConfig small_config() {
  EngineConfig config;
  config.num_kv_blocks = 64;
  config.max_num_seqs = 4;
  return config;
}

TEST(ModelDir, SavedModelLoadsAndGeneratesTheSameTokens) {
  TempDir dir;
  const ModelSpec spec = tiny_spec();
  const RandomWeights weights = make_random_weights(spec, DType::kBFloat16, 7, 0.1f);
  save_model_dir(dir.path(), ModelDirConfig{spec, "bfloat16", {5}}, weights.tensors);
  EXPECT_TRUE(fs::is_regular_file(dir.sub("octavo.json")));
  EXPECT_TRUE(fs::is_regular_file(dir.sub("model.safetensors")));

  const ModelDirConfig stored = read_model_dir_config(dir.path());
  expect_same_spec(spec, stored.spec);
  EXPECT_EQ(stored.dtype, "bfloat16");

  EngineConfig config = small_config();
  Engine in_memory(spec, config, weights.tensors);
  config.model = dir.path();
  Engine loaded(config);
  EXPECT_EQ(loaded.config().dtype, "bfloat16");  // "auto" took the stored dtype
  EXPECT_EQ(loaded.config().eos_token_ids, (std::vector<int32_t>{5}));
  expect_same_spec(spec, loaded.spec());

  const std::vector<int32_t> prompt = {3, 17, 42, 8, 91, 23, 4};
  const std::vector<int32_t> expected = greedy(in_memory, prompt, 12);
  ASSERT_EQ(expected.size(), 12u);
  EXPECT_EQ(greedy(loaded, prompt, 12), expected);

  // The same directory through MappedModelDir, for constructors that take (spec, config, weights);
  // the mapping may go once the engine is built.
  std::unique_ptr<Engine> from_mapping;
  {
    MappedModelDir mapped(config);
    EXPECT_EQ(mapped.config().dtype, "bfloat16");
    EXPECT_EQ(mapped.weights().size(), weights.tensors.size());
    from_mapping = std::make_unique<Engine>(mapped.spec(), mapped.config(), mapped.weights());
  }
  EXPECT_EQ(greedy(*from_mapping, prompt, 12), expected);
}

TEST(ModelDir, ConfigOverridesTheDirectory) {
  TempDir dir;
  const ModelSpec spec = tiny_spec();
  const RandomWeights weights = make_random_weights(spec, DType::kFloat32, 3, 0.1f);
  save_model_dir(dir.path(), ModelDirConfig{spec, "float32", {5}}, weights.tensors);
  EngineConfig config = small_config();
  config.model = dir.path();
  config.dtype = "bfloat16";
  config.eos_token_ids = {9, 10};
  Engine engine(config);
  EXPECT_EQ(engine.config().dtype, "bfloat16");
  EXPECT_EQ(engine.config().eos_token_ids, (std::vector<int32_t>{9, 10}));
  EXPECT_EQ(engine.config().model, dir.path());
}

TEST(ModelDir, ShardsAreFoundThroughTheIndex) {
  TempDir dir;
  const ModelSpec spec = tiny_spec();
  const RandomWeights weights = make_random_weights(spec, DType::kFloat32, 11, 0.1f);
  // Two shards: embeddings and layer 0 in one, the rest in the other, as export writes them.
  std::vector<HostTensor> first, second;
  for (const HostTensor& t : weights.tensors) {
    (t.name.rfind("embed", 0) == 0 || t.name.rfind("layers.0.", 0) == 0 ? first : second).push_back(t);
  }
  write_text(dir.sub("octavo.json"), to_json(ModelDirConfig{spec, "float32", {}}));
  // A shard written by hand, F32 tensors back to back, as Hugging Face's writer lays them out.
  auto write_shard = [&](const std::vector<HostTensor>& tensors, const std::string& name) {
    std::string header = "{";
    uint64_t offset = 0;
    for (const HostTensor& t : tensors) {
      uint64_t count = 1;
      for (int64_t d : t.shape) count *= uint64_t(d);
      header += std::string(header.size() > 1 ? "," : "") + "\"" + t.name +
                "\":{\"dtype\":\"F32\",\"shape\":[";
      for (size_t i = 0; i < t.shape.size(); ++i) header += (i ? "," : "") + std::to_string(t.shape[i]);
      header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + count * 4) + "]}";
      offset += count * 4;
    }
    header += "}";
    std::ofstream out(dir.sub(name), std::ios::binary);
    const uint64_t length = header.size();
    out.write(reinterpret_cast<const char*>(&length), 8);
    out << header;
    for (const HostTensor& t : tensors) {
      uint64_t count = 1;
      for (int64_t d : t.shape) count *= uint64_t(d);
      out.write(static_cast<const char*>(t.data), std::streamsize(count * 4));
    }
  };
  write_shard(first, "model-00001-of-00002.safetensors");
  write_shard(second, "model-00002-of-00002.safetensors");
  std::string index = "{\"metadata\": {}, \"weight_map\": {";
  for (size_t i = 0; i < weights.tensors.size(); ++i) {
    const std::string& name = weights.tensors[i].name;
    const bool in_first = name.rfind("embed", 0) == 0 || name.rfind("layers.0.", 0) == 0;
    index += std::string(i ? ", " : "") + "\"" + name + "\": \"model-0000" + (in_first ? "1" : "2") +
             "-of-00002.safetensors\"";
  }
  write_text(dir.sub("model.safetensors.index.json"), index + "}}");

  EngineConfig config = small_config();
  Engine in_memory(spec, config, weights.tensors);
  config.model = dir.path();
  Engine loaded(config);
  const std::vector<int32_t> prompt = {1, 2, 3, 4, 5};
  EXPECT_EQ(greedy(loaded, prompt, 8), greedy(in_memory, prompt, 8));

  // The same tensor in two shards is refused rather than silently picking one.
  write_shard(weights.tensors, "model-00002-of-00002.safetensors");
  expect_error<FormatError>([&] { Engine again(config); }, {"appears in both"});
}

TEST(ModelDir, LoadErrorsSayWhatToDo) {
  EngineConfig config = small_config();
  expect_error<InvalidArgument>([&] { Engine engine(config); }, {"EngineConfig.model is empty", "octavo export"});

  TempDir dir;
  config.model = dir.sub("missing");
  expect_error<FormatError>([&] { Engine engine(config); }, {"not a directory"});

  config.model = dir.path();
  write_text(dir.sub("config.json"), "{}");
  expect_error<FormatError>([&] { Engine engine(config); }, {"no octavo.json", "Hugging Face", "octavo export"});

  const ModelSpec spec = tiny_spec();
  const RandomWeights weights = make_random_weights(spec, DType::kFloat32, 1, 0.1f);
  save_model_dir(dir.path(), ModelDirConfig{spec, "float32", {}}, weights.tensors);
  Engine fine(config);  // the directory as saved loads

  // octavo.json that no longer matches the weights: the executor names the weight and shapes.
  ModelSpec wider = spec;
  wider.intermediate_size = 64;
  write_text(dir.sub("octavo.json"), to_json(ModelDirConfig{wider, "float32", {}}));
  expect_error<FormatError>([&] { Engine engine(config); }, {"layers.0.gate_up.weight", "[128, 32]"});

  // A malformed octavo.json names the directory and the field.
  write_text(dir.sub("octavo.json"), replace(to_json(ModelDirConfig{spec, "float32", {}}), "\"head_dim\": 8", "\"head_dim\": null"));
  expect_error<FormatError>([&] { Engine engine(config); }, {dir.path(), "head_dim", "null"});

  // A truncated weights file is caught when it is mapped.
  write_text(dir.sub("octavo.json"), to_json(ModelDirConfig{spec, "float32", {}}));
  const auto size = fs::file_size(dir.sub("model.safetensors"));
  fs::resize_file(dir.sub("model.safetensors"), size - 4);
  expect_error<FormatError>([&] { Engine engine(config); }, {"model.safetensors", "truncated"});
}

TEST(ModelDir, SaveChecksTheWeights) {
  TempDir dir;
  const ModelSpec spec = tiny_spec();
  RandomWeights weights = make_random_weights(spec, DType::kFloat32, 1, 0.1f);
  std::vector<HostTensor> missing(weights.tensors.begin() + 1, weights.tensors.end());
  expect_error<InvalidArgument>([&] { save_model_dir(dir.path(), {spec, "float32", {}}, missing); },
                                {"missing weight 'embed_tokens.weight'"});
  std::vector<HostTensor> misshaped = weights.tensors;
  misshaped[0].shape = {96, 33};
  expect_error<InvalidArgument>([&] { save_model_dir(dir.path(), {spec, "float32", {}}, misshaped); },
                                {"embed_tokens.weight", "[96, 33]", "[96, 32]"});
  std::vector<HostTensor> extra = weights.tensors;
  extra.push_back(HostTensor{"rotary.inv_freq", "float32", {4}, weights.tensors[0].data});
  expect_error<InvalidArgument>([&] { save_model_dir(dir.path(), {spec, "float32", {}}, extra); },
                                {"rotary.inv_freq"});
  EXPECT_FALSE(fs::exists(dir.sub("octavo.json")));  // nothing written when the input is bad
}

// ---- logging ----------------------------------------------------------------------------------

TEST(Log, SilentByDefaultAndTheEngineReportsItsPool) {
  const ModelSpec spec = tiny_spec();
  const RandomWeights weights = make_random_weights(spec, DType::kFloat32, 1, 0.1f);
  testing::internal::CaptureStderr();
  testing::internal::CaptureStdout();
  { Engine engine(spec, small_config(), weights.tensors); }
  EXPECT_EQ(testing::internal::GetCapturedStdout(), "");
  EXPECT_EQ(testing::internal::GetCapturedStderr(), "");

  std::vector<std::pair<LogLevel, std::string>> lines;
  LogSink previous = set_log_sink([&](LogLevel level, std::string_view message) {
    lines.emplace_back(level, std::string(message));
  });
  EXPECT_FALSE(previous);
  { Engine engine(spec, small_config(), weights.tensors); }
  set_log_level(LogLevel::kWarning);
  { Engine engine(spec, small_config(), weights.tensors); }  // INFO now filtered
  set_log_level(LogLevel::kInfo);
  set_log_sink([](LogLevel, std::string_view) { throw std::runtime_error("sink failure"); });
  { Engine engine(spec, small_config(), weights.tensors); }  // a throwing sink changes nothing
  EXPECT_TRUE(set_log_sink(nullptr));

  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0].first, LogLevel::kInfo);
  EXPECT_EQ(lines[0].second,
            "LlamaForCausalLM on cpu, float32; KV pool 64 blocks x 16 tokens = 1,024 tokens; "
            "max_model_len 128");
  EXPECT_STREQ(to_string(LogLevel::kWarning), "WARNING");
}

}  // namespace
}  // namespace octavo

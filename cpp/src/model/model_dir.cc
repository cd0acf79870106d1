// octavo.json <-> ModelSpec, and writing a model directory. One visitor lists the ModelSpec fields
// in model_spec.h order; the writer and the reader both walk it, so they cannot drift apart.
#include <octavo/model_dir.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <system_error>
#include <type_traits>
#include <unordered_map>
#include <utility>

#include <octavo/error.h>

#include "model/dtype_convert.h"
#include "model/expected_weights.h"
#include "model/json.h"

namespace octavo {
namespace {

// ---- enums as the snake_case names the Python side and the bindings use ------------------------

template <typename E>
struct EnumName {
  E value;
  const char* name;
};

constexpr EnumName<NormKind> kNormNames[] = {{NormKind::kRMSNorm, "rms_norm"},
                                             {NormKind::kRMSNormPlusOne, "rms_norm_plus_one"},
                                             {NormKind::kLayerNorm, "layer_norm"},
                                             {NormKind::kLayerNormNoWeight, "layer_norm_no_weight"}};
constexpr EnumName<Activation> kActivationNames[] = {
    {Activation::kSiluGlu, "silu_glu"}, {Activation::kGeluGlu, "gelu_glu"},
    {Activation::kGeluTanhGlu, "gelu_tanh_glu"}, {Activation::kGelu, "gelu"},
    {Activation::kGeluTanh, "gelu_tanh"}, {Activation::kRelu, "relu"}};
constexpr EnumName<PositionKind> kPositionNames[] = {{PositionKind::kRotary, "rotary"},
                                                     {PositionKind::kAlibi, "alibi"},
                                                     {PositionKind::kLearned, "learned"},
                                                     {PositionKind::kNone, "none"}};
constexpr EnumName<RotaryPairing> kPairingNames[] = {{RotaryPairing::kNeox, "neox"},
                                                     {RotaryPairing::kGptj, "gptj"}};
constexpr EnumName<RopeScaling> kScalingNames[] = {{RopeScaling::kNone, "none"},
                                                   {RopeScaling::kLinear, "linear"},
                                                   {RopeScaling::kDynamicNtk, "dynamic_ntk"},
                                                   {RopeScaling::kLlama3, "llama3"},
                                                   {RopeScaling::kYarn, "yarn"}};
constexpr EnumName<ResidualKind> kResidualNames[] = {
    {ResidualKind::kSequential, "sequential"},
    {ResidualKind::kParallelOneNorm, "parallel_one_norm"},
    {ResidualKind::kParallelTwoNorms, "parallel_two_norms"}};

template <typename E>
constexpr auto& enum_names() {
  if constexpr (std::is_same_v<E, NormKind>) return kNormNames;
  else if constexpr (std::is_same_v<E, Activation>) return kActivationNames;
  else if constexpr (std::is_same_v<E, PositionKind>) return kPositionNames;
  else if constexpr (std::is_same_v<E, RotaryPairing>) return kPairingNames;
  else if constexpr (std::is_same_v<E, RopeScaling>) return kScalingNames;
  else return kResidualNames;
}

template <typename E>
const char* enum_name(E value, const std::string& field) {
  for (const auto& entry : enum_names<E>()) {
    if (entry.value == value) return entry.name;
  }
  throw InvalidArgument("model spec field '" + field + "' holds an unknown value " +
                        std::to_string(int(value)));
}

// ---- the fields -------------------------------------------------------------------------------

template <typename Rope, typename Visitor>
void visit_rope(Rope& r, Visitor&& v) {
  v("pairing", r.pairing);
  v("theta", r.theta);
  v("rotary_dim", r.rotary_dim);
  v("scaling", r.scaling);
  v("factor", r.factor);
  v("low_freq_factor", r.low_freq_factor);
  v("high_freq_factor", r.high_freq_factor);
  v("original_max_position", r.original_max_position);
  v("beta_fast", r.beta_fast);
  v("beta_slow", r.beta_slow);
  v("attention_factor", r.attention_factor);
}

// Every ModelSpec field. A field added to model_spec.h must be added here (the Python test
// test_export.py checks this list against the bindings' fields).
template <typename Spec, typename Visitor>
void visit_spec(Spec& s, Visitor&& v) {
  v("architecture", s.architecture);
  v("vocab_size", s.vocab_size);
  v("hidden_size", s.hidden_size);
  v("num_layers", s.num_layers);
  v("num_heads", s.num_heads);
  v("num_kv_heads", s.num_kv_heads);
  v("num_kv_heads_per_layer", s.num_kv_heads_per_layer);
  v("head_dim", s.head_dim);
  v("intermediate_size", s.intermediate_size);
  v("max_position_embeddings", s.max_position_embeddings);
  v("norm", s.norm);
  v("norm_eps", s.norm_eps);
  v("norm_bias", s.norm_bias);
  v("activation", s.activation);
  v("positions", s.positions);
  v("rope", s.rope);
  v("position_offset", s.position_offset);
  v("residual", s.residual);
  v("qkv_bias", s.qkv_bias);
  v("o_bias", s.o_bias);
  v("mlp_bias", s.mlp_bias);
  v("qk_norm", s.qk_norm);
  v("tied_embeddings", s.tied_embeddings);
  v("lm_head_bias", s.lm_head_bias);
  v("embedding_norm", s.embedding_norm);
  v("sandwich_norms", s.sandwich_norms);
  v("embedding_scale", s.embedding_scale);
  v("attention_scale", s.attention_scale);
  v("attn_logit_softcap", s.attn_logit_softcap);
  v("final_logit_softcap", s.final_logit_softcap);
  v("alibi_slope_scale", s.alibi_slope_scale);
  v("sliding_window", s.sliding_window);
}

// Sizes without which a spec means nothing: absent, they are an error rather than a default 0.
constexpr const char* kRequiredFields[] = {"vocab_size", "hidden_size", "num_layers", "num_heads",
                                           "num_kv_heads", "head_dim", "intermediate_size"};

// ---- writing ----------------------------------------------------------------------------------

class ObjectWriter {
 public:
  explicit ObjectWriter(int indent) : indent_(indent) {}

  void member(std::string_view key, const std::string& value_json) {
    out_ += first_ ? "{\n" : ",\n";
    first_ = false;
    out_ += std::string(indent_ + 2, ' ') + json_quote(key) + ": " + value_json;
  }

  std::string finish() {
    if (first_) return "{}";
    return out_ + "\n" + std::string(indent_, ' ') + "}";
  }

 private:
  int indent_;
  bool first_ = true;
  std::string out_;
};

template <typename T>
std::string int_list(const std::vector<T>& values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

struct ValueWriter {
  int indent;
  std::string path;  // for messages: "rope.theta"

  std::string operator()(const std::string& v) const { return json_quote(v); }
  std::string operator()(int v) const { return std::to_string(v); }
  std::string operator()(bool v) const { return v ? "true" : "false"; }
  std::string operator()(float v) const { return json_number(v, "model spec field '" + path + "'"); }
  std::string operator()(const std::vector<int>& v) const { return int_list(v); }
  std::string operator()(const RopeConfig& rope) const {
    ObjectWriter object(indent);
    visit_rope(rope, [&](const char* key, const auto& value) {
      object.member(key, ValueWriter{indent + 2, path + "." + key}(value));
    });
    return object.finish();
  }
  template <typename E, typename = std::enable_if_t<std::is_enum_v<E>>>
  std::string operator()(E v) const {
    return json_quote(enum_name(v, path));
  }
};

std::string spec_json(const ModelSpec& spec, int indent) {
  ObjectWriter object(indent);
  visit_spec(spec, [&](const char* key, const auto& value) {
    object.member(key, ValueWriter{indent + 2, key}(value));
  });
  return object.finish();
}

// ---- reading ----------------------------------------------------------------------------------

std::string known_list(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& name : names) out += (out.empty() ? "" : ", ") + name;
  return out;
}

// What a JSON value is, for "expected X, found Y" messages.
std::string found(JsonReader& json) {
  switch (json.peek()) {
    case '{': return "an object";
    case '[': return "an array";
    case '"': return "a string";
    case 't':
    case 'f': return "a boolean";
    case 'n': return "null";
    default: return "a number";
  }
}

class SpecReader {
 public:
  SpecReader(JsonReader& json, std::string context) : json_(json), context_(std::move(context)) {}

  [[noreturn]] void fail(const std::string& field, const std::string& problem) const {
    throw FormatError(context_ + "field '" + field + "' " + problem);
  }

  void read(const std::string& field, std::string& out) {
    if (!json_.next_is_string()) fail(field, "is " + found(json_) + "; expected a string");
    out = json_.read_string();
  }

  void read(const std::string& field, int& out) { out = read_int(field); }

  void read(const std::string& field, bool& out) {
    const char c = json_.peek();
    if (c != 't' && c != 'f') fail(field, "is " + found(json_) + "; expected true or false");
    json_.skip_value();  // validates the literal
    out = c == 't';
  }

  void read(const std::string& field, float& out) {
    if (!json_.next_is_number()) fail(field, "is " + found(json_) + "; expected a number");
    const double value = json_.read_number().value;
    if (!std::isfinite(value) || std::fabs(value) > double(std::numeric_limits<float>::max())) {
      fail(field, "is out of the range of a 32-bit float");
    }
    out = float(value);
  }

  void read(const std::string& field, std::vector<int>& out) {
    if (json_.peek() != '[') fail(field, "is " + found(json_) + "; expected an array of integers");
    out.clear();
    json_.read_array([&](size_t index) {
      out.push_back(read_int(field + "[" + std::to_string(index) + "]"));
    });
  }

  void read(const std::string& field, RopeConfig& rope) {
    if (json_.peek() != '{') fail(field, "is " + found(json_) + "; expected an object");
    read_members(field + ".", [&](auto&& visitor) { visit_rope(rope, visitor); });
  }

  template <typename E, typename = std::enable_if_t<std::is_enum_v<E>>>
  void read(const std::string& field, E& out) {
    if (!json_.next_is_string()) fail(field, "is " + found(json_) + "; expected a name");
    const std::string name = json_.read_string();
    std::vector<std::string> known;
    for (const auto& entry : enum_names<E>()) {
      if (name == entry.name) {
        out = entry.value;
        return;
      }
      known.push_back(entry.name);
    }
    fail(field, "is '" + name + "'; expected one of " + known_list(known));
  }

  // Reads an object whose members are the fields `visit` lists; returns the names seen.
  template <typename Visit>
  std::vector<std::string> read_members(const std::string& prefix, Visit&& visit) {
    std::vector<std::string> seen;
    json_.read_object([&](const std::string& key) {
      if (std::find(seen.begin(), seen.end(), key) != seen.end()) {
        fail(prefix + key, "appears twice");
      }
      bool known = false;
      visit([&](const char* name, auto& value) {
        if (!known && key == name) {
          known = true;
          read(prefix + key, value);
        }
      });
      if (!known) {
        std::vector<std::string> names;
        visit([&](const char* name, auto&) { names.push_back(name); });
        fail(prefix + key, "is unknown to this build of octavo (known: " + known_list(names) +
                               "); the file may come from a newer octavo");
      }
      seen.push_back(key);
    });
    return seen;
  }

 private:
  int read_int(const std::string& field) {
    if (!json_.next_is_number()) fail(field, "is " + found(json_) + "; expected an integer");
    const JsonNumber number = json_.read_number();
    if (!number.is_integer) fail(field, "is " + std::to_string(number.value) + "; expected an integer");
    if (!number.is_int64() || number.as_int64() < std::numeric_limits<int>::min() ||
        number.as_int64() > std::numeric_limits<int>::max()) {
      fail(field, "is out of the range of a 32-bit integer");
    }
    return int(number.as_int64());
  }

  JsonReader& json_;
  std::string context_;
};

ModelSpec read_spec(JsonReader& json, const std::string& context) {
  if (json.peek() != '{') throw FormatError(context + "is " + found(json) + "; expected an object");
  ModelSpec spec;
  SpecReader reader(json, context);
  const std::vector<std::string> seen =
      reader.read_members("", [&](auto&& visitor) { visit_spec(spec, visitor); });
  for (const char* required : kRequiredFields) {
    if (std::find(seen.begin(), seen.end(), required) == seen.end()) {
      throw FormatError(context + "field '" + required + "' is missing");
    }
  }
  try {
    spec.validate();
  } catch (const InvalidArgument& e) {
    throw FormatError(context + e.what());
  }
  return spec;
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FormatError(path.string() + ": cannot open");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw FormatError(path.string() + ": cannot read");
  return text;
}

// ---- safetensors writing ----------------------------------------------------------------------

const char* safetensors_dtype(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "F32";
    case DType::kFloat16: return "F16";
    case DType::kBFloat16: return "BF16";
  }
  return "?";
}

std::string shape_text(const std::vector<int64_t>& shape) { return int_list(shape); }

// Writes `bytes` or throws naming the file.
void write_all(std::ofstream& out, const void* bytes, size_t size, const std::string& path) {
  out.write(static_cast<const char*>(bytes), std::streamsize(size));
  if (!out) throw Error(path + ": write failed (disk full?)");
}

// One safetensors file. Tensors are laid out by element size, largest first, so every tensor
// starts aligned to its element size (the data section starts 8-aligned) without gaps between
// tensors, which the safetensors library would reject.
void write_safetensors(const std::string& path, const std::vector<HostTensor>& tensors) {
  struct Placed {
    const HostTensor* tensor;
    DType dtype;
    uint64_t bytes;
  };
  std::vector<Placed> placed;
  for (const HostTensor& t : tensors) {
    const DType dtype = parse_dtype(t.dtype, "weight '" + t.name + "'");
    uint64_t count = 1;
    for (int64_t d : t.shape) count *= uint64_t(d);
    placed.push_back({&t, dtype, count * dtype_size(dtype)});
  }
  std::stable_sort(placed.begin(), placed.end(), [](const Placed& a, const Placed& b) {
    return dtype_size(a.dtype) > dtype_size(b.dtype);
  });
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}";
  uint64_t offset = 0;
  for (const Placed& p : placed) {
    header += "," + json_quote(p.tensor->name) + ":{\"dtype\":\"" + safetensors_dtype(p.dtype) +
              "\",\"shape\":" + shape_text(p.tensor->shape) + ",\"data_offsets\":[" +
              std::to_string(offset) + "," + std::to_string(offset + p.bytes) + "]}";
    offset += p.bytes;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');  // data section 8-aligned, as safetensors pads

  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw Error(path + ": cannot create");
  unsigned char length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>(uint64_t(header.size()) >> (8 * i));
  write_all(out, length, sizeof length, path);
  write_all(out, header.data(), header.size(), path);
  for (const Placed& p : placed) write_all(out, p.tensor->data, size_t(p.bytes), path);
  out.close();
  if (!out) throw Error(path + ": write failed");
}

}  // namespace

std::string to_json(const ModelSpec& spec) { return spec_json(spec, 0) + "\n"; }

ModelSpec model_spec_from_json(std::string_view text) {
  JsonReader json(text, "model spec: ");
  json.require_object();
  ModelSpec spec = read_spec(json, "model spec: ");
  json.expect_end();
  return spec;
}

std::string to_json(const ModelDirConfig& config) {
  parse_dtype(config.dtype, "octavo.json");  // refuse to write what no reader accepts
  ObjectWriter object(0);
  object.member("format_version", std::to_string(kModelDirFormatVersion));
  object.member("dtype", json_quote(config.dtype));
  object.member("eos_token_ids", int_list(config.eos_token_ids));
  object.member("model_spec", spec_json(config.spec, 2));
  return object.finish() + "\n";
}

ModelDirConfig model_dir_config_from_json(std::string_view text) {
  const std::string context = "octavo.json: ";
  JsonReader json(text, context);
  json.require_object();
  ModelDirConfig config;
  bool has_version = false, has_dtype = false, has_spec = false;
  std::vector<std::string> seen;
  json.read_object([&](const std::string& key) {
    if (std::find(seen.begin(), seen.end(), key) != seen.end()) {
      throw FormatError(context + "field '" + key + "' appears twice");
    }
    seen.push_back(key);
    if (key == "format_version") {
      const JsonNumber version = json.next_is_number() ? json.read_number() : JsonNumber{};
      if (!version.is_uint64() || version.magnitude == 0) {
        throw FormatError(context + "field 'format_version' is not a positive integer");
      }
      if (version.magnitude > uint64_t(kModelDirFormatVersion)) {
        throw FormatError(context + "format_version " + std::to_string(version.magnitude) +
                          " is newer than this build of octavo reads (" +
                          std::to_string(kModelDirFormatVersion) +
                          "); upgrade octavo or export the model again with this version");
      }
      has_version = true;
    } else if (key == "dtype") {
      if (!json.next_is_string()) throw FormatError(context + "field 'dtype' is not a string");
      config.dtype = json.read_string();
      try {
        parse_dtype(config.dtype, "dtype");
      } catch (const InvalidArgument& e) {
        throw FormatError(context + "field " + e.what());
      }
      has_dtype = true;
    } else if (key == "eos_token_ids") {
      if (json.peek() != '[') throw FormatError(context + "field 'eos_token_ids' is not an array");
      json.read_array([&](size_t index) {
        const JsonNumber id = json.next_is_number() ? json.read_number() : JsonNumber{true, false};
        if (!id.is_uint64() || id.magnitude > uint64_t(std::numeric_limits<int32_t>::max())) {
          throw FormatError(context + "field 'eos_token_ids[" + std::to_string(index) +
                            "]' is not a token id (a non-negative 32-bit integer)");
        }
        config.eos_token_ids.push_back(int32_t(id.magnitude));
      });
    } else if (key == "model_spec") {
      config.spec = read_spec(json, context + "model_spec: ");
      has_spec = true;
    } else {
      throw FormatError(context + "field '" + key +
                        "' is unknown to this build of octavo (known: format_version, dtype, "
                        "eos_token_ids, model_spec)");
    }
  });
  json.expect_end();
  if (!has_version) throw FormatError(context + "field 'format_version' is missing");
  if (!has_dtype) throw FormatError(context + "field 'dtype' is missing");
  if (!has_spec) throw FormatError(context + "field 'model_spec' is missing");
  for (int32_t id : config.eos_token_ids) {
    if (id >= config.spec.vocab_size) {
      throw FormatError(context + "eos token id " + std::to_string(id) +
                        " is outside the vocabulary [0, " + std::to_string(config.spec.vocab_size) +
                        ")");
    }
  }
  return config;
}

ModelDirConfig read_model_dir_config(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code error;
  if (!fs::is_directory(dir, error)) {
    throw FormatError(dir + ": not a directory (expected an octavo model directory, written by "
                      "`octavo export HF_DIR OUT_DIR`)");
  }
  const fs::path path = fs::path(dir) / "octavo.json";
  if (!fs::is_regular_file(path, error)) {
    const bool hf = fs::is_regular_file(fs::path(dir) / "config.json", error);
    throw FormatError(dir + ": no octavo.json" +
                      (hf ? std::string(" (this is a Hugging Face checkpoint: convert it once with "
                                        "`octavo export ") + dir + " OUT_DIR` and load OUT_DIR)"
                          : std::string(" (not an octavo model directory; write one with "
                                        "`octavo export HF_DIR OUT_DIR`)")));
  }
  const std::string text = read_file(path);
  try {
    return model_dir_config_from_json(text);
  } catch (const FormatError& e) {
    throw FormatError(dir + "/" + e.what());
  }
}

void save_model_dir(const std::string& dir, const ModelDirConfig& config,
                    const std::vector<HostTensor>& weights) {
  namespace fs = std::filesystem;
  config.spec.validate();
  std::unordered_map<std::string, const HostTensor*> by_name;
  for (const HostTensor& t : weights) {
    if (!by_name.emplace(t.name, &t).second) {
      throw InvalidArgument("weight '" + t.name + "' is given twice");
    }
    parse_dtype(t.dtype, "weight '" + t.name + "'");
    if (t.data == nullptr) throw InvalidArgument("weight '" + t.name + "' has no data");
  }
  for (const ExpectedWeight& e : expected_weights(config.spec)) {
    auto it = by_name.find(e.name);
    if (it == by_name.end()) {
      throw InvalidArgument("missing weight '" + e.name + "' (shape " + shape_text(e.shape) +
                            ") for " + config.spec.architecture);
    }
    if (it->second->shape != e.shape) {
      throw InvalidArgument("weight '" + e.name + "' has shape " + shape_text(it->second->shape) +
                            "; the spec needs " + shape_text(e.shape));
    }
    by_name.erase(it);
  }
  if (!by_name.empty()) {
    throw InvalidArgument("weight '" + by_name.begin()->first + "' is not one the spec uses");
  }
  const std::string json = to_json(config);

  std::error_code error;
  fs::create_directories(dir, error);
  if (error) throw Error(dir + ": cannot create the directory: " + error.message());
  write_safetensors((fs::path(dir) / "model.safetensors").string(), weights);
  std::ofstream out(fs::path(dir) / "octavo.json", std::ios::binary | std::ios::trunc);
  if (!out) throw Error(dir + "/octavo.json: cannot create");
  write_all(out, json.data(), json.size(), dir + "/octavo.json");
  out.close();
  if (!out) throw Error(dir + "/octavo.json: write failed");
}

}  // namespace octavo

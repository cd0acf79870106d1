// octavo's own model directory, which the C++ API loads with no Python involved:
//
//   octavo.json                        format version, storage dtype, EOS ids and the ModelSpec
//   model.safetensors                  the weights under their canonical names (model_spec.h), or
//   model-0000N-of-0000M.safetensors   shards listed by model.safetensors.index.json
//   tokenizer files                    copied from the checkpoint (octavo itself reads none)
//
// `octavo export HF_DIR OUT_DIR` writes one from any supported Hugging Face checkpoint (the Python
// loader's name mapping and fusing, done once); Engine(EngineConfig) with `model` set loads it,
// mapping the safetensors files rather than reading them.
//
// octavo.json:
//   {
//     "format_version": 1,
//     "dtype": "bfloat16",             storage dtype of the weights
//     "eos_token_ids": [151645],
//     "model_spec": { ...every ModelSpec field, enums as snake_case names ("rms_norm")... }
//   }
// Readers reject unknown fields (a file from a newer octavo that needs a feature this build lacks
// fails loudly instead of running a different model) and take absent ModelSpec fields as their
// defaults, except the sizes, which are required.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <octavo/engine.h>
#include <octavo/model_spec.h>

namespace octavo {

/// The octavo.json format this build writes and the newest it reads.
constexpr int kModelDirFormatVersion = 1;

/// What octavo.json holds.
struct ModelDirConfig {
  ModelSpec spec;
  std::string dtype = "float32";  // "float32", "float16" or "bfloat16": how the weights are stored
  std::vector<int32_t> eos_token_ids;
};

/// The spec as a JSON object (pretty-printed, fields in model_spec.h order). Floats are written as
/// the shortest decimal that reads back to the same float. Throws InvalidArgument for a
/// non-finite float field.
std::string to_json(const ModelSpec& spec);

/// Parses what to_json(ModelSpec) writes and validates the result. Throws FormatError naming the
/// field and the problem ("model_spec: field 'num_layers' is 2.5; expected an integer").
ModelSpec model_spec_from_json(std::string_view json);

/// The whole octavo.json.
std::string to_json(const ModelDirConfig& config);

/// Parses octavo.json. Throws FormatError naming the field and the problem, or the format version
/// when the file is newer than this build.
ModelDirConfig model_dir_config_from_json(std::string_view json);

/// Reads DIR/octavo.json. Throws FormatError when DIR is not an octavo model directory (a Hugging
/// Face checkpoint gets told to run `octavo export`).
ModelDirConfig read_model_dir_config(const std::string& dir);

/// An octavo model directory opened for loading, for the constructors that take (spec, config,
/// weights), such as AsyncEngine's:
///
///   octavo::MappedModelDir model(config);  // config.model names the directory
///   octavo::AsyncEngine engine(model.spec(), model.config(), model.weights());
///
/// The safetensors files are mapped read-only, not read: the weights are views into the mappings,
/// valid while this object lives (an engine copies them during construction, so it may be
/// destroyed right after). Engine(const EngineConfig&) does the same in one call.
class MappedModelDir {
 public:
  /// Reads config.model's octavo.json and maps its weights. Throws InvalidArgument when
  /// config.model is empty, FormatError for a missing or malformed directory or weights file (or
  /// a weight stored in two files).
  explicit MappedModelDir(const EngineConfig& config);
  ~MappedModelDir();
  MappedModelDir(MappedModelDir&&) noexcept;
  MappedModelDir& operator=(MappedModelDir&&) noexcept;
  MappedModelDir(const MappedModelDir&) = delete;
  MappedModelDir& operator=(const MappedModelDir&) = delete;

  const ModelSpec& spec() const;
  /// The caller's config with what the directory settles: dtype "auto" becomes the stored dtype
  /// (float32 runs as bfloat16 on a GPU, as in the Python engine and vLLM), and empty
  /// eos_token_ids become octavo.json's.
  const EngineConfig& config() const;
  /// Every tensor of the directory under its canonical name, in file order.
  const std::vector<HostTensor>& weights() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Writes a model directory: DIR/octavo.json and DIR/model.safetensors holding `weights` as given
/// (each keeps its dtype). DIR is created if missing; existing files of those names are
/// replaced. For programs that build or transform weights natively; Hugging Face checkpoints go
/// through `octavo export`. Throws InvalidArgument for a bad spec or weight, Error on I/O failure.
void save_model_dir(const std::string& dir, const ModelDirConfig& config,
                    const std::vector<HostTensor>& weights);

}  // namespace octavo

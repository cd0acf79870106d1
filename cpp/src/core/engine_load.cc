// Engine(EngineConfig): an octavo model directory (octavo/model_dir.h) loaded with no Python. The
// safetensors files are mapped, not read: the executor converts and uploads each weight straight
// from the mapping, so the host holds no second copy of the model.
#include <octavo/engine.h>

#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <octavo/error.h>
#include <octavo/model_dir.h>

#include "core/log.h"
#include "model/safetensors.h"

namespace octavo {
namespace {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "?";
}

ModelDirConfig read_model(const EngineConfig& config) {
  if (config.model.empty()) {
    throw InvalidArgument("EngineConfig.model is empty; set it to an octavo model directory "
                          "(write one from a Hugging Face checkpoint with `octavo export HF_DIR "
                          "OUT_DIR`)");
  }
  return read_model_dir_config(config.model);
}

// The configuration the directory implies where the caller left it open: the stored dtype (a
// float32 model runs in bfloat16 on a GPU, as the Python engine and vLLM do) and the EOS ids.
EngineConfig resolve_config(const EngineConfig& config) {
  const ModelDirConfig model = read_model(config);
  EngineConfig resolved = config;
  if (resolved.dtype == "auto") {
    resolved.dtype = model.dtype;
    if (model.dtype == "float32" && config.device.rfind("cuda", 0) == 0) {
      resolved.dtype = "bfloat16";
      log(LogLevel::kInfo, config.model + ": float32 weights on " + config.device +
                               ": running in bfloat16 (set dtype to override)");
    }
  }
  if (resolved.eos_token_ids.empty()) resolved.eos_token_ids = model.eos_token_ids;
  return resolved;
}

// The weights of a model directory as HostTensors pointing into the mapped files. Lives for the
// duration of the Engine constructor call (a temporary of the delegating call), which is as long
// as the executor needs the host copies.
class MappedWeights {
 public:
  explicit MappedWeights(const std::string& dir) {
    std::unordered_map<std::string, std::string> file_of;
    for (const std::string& path : find_safetensors_files(dir)) {
      files_.emplace_back(path);
      for (const SafetensorsEntry& entry : files_.back().entries()) {
        auto [it, inserted] = file_of.emplace(entry.name, path);
        if (!inserted) {
          throw FormatError(dir + ": weight '" + entry.name + "' appears in both " + it->second +
                            " and " + path);
        }
        const TensorView view = files_.back().tensor(entry.name);  // F32/F16/BF16 only
        tensors_.push_back(HostTensor{view.name, dtype_name(view.dtype), view.shape, view.data});
      }
    }
  }

  operator const std::vector<HostTensor>&() const { return tensors_; }

 private:
  std::vector<SafetensorsFile> files_;
  std::vector<HostTensor> tensors_;
};

}  // namespace

// octavo.json is read twice (for the spec and for the config; a few KB) so that the delegated
// constructor gets three independent arguments; braces evaluate them in order, so a bad
// directory is reported by read_model() first.
Engine::Engine(const EngineConfig& config)
    : Engine{read_model(config).spec, resolve_config(config), MappedWeights(config.model)} {}

}  // namespace octavo

// Engine(EngineConfig) and MappedModelDir: an octavo model directory (octavo/model_dir.h) loaded
// with no Python. The safetensors files are mapped, not read: the executor converts and uploads
// each weight straight from the mapping, so the host holds no second copy of the model.
#include <octavo/engine.h>

#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <octavo/error.h>
#include <octavo/model_dir.h>

#include "backend/cpu/dtype.h"
#include "core/log.h"
#include "model/safetensors.h"

namespace octavo {
namespace {

ModelDirConfig read_model(const EngineConfig& config) {
  if (config.model.empty()) {
    throw InvalidArgument("EngineConfig.model is empty; set it to an octavo model directory "
                          "(write one from a Hugging Face checkpoint with `octavo export HF_DIR "
                          "OUT_DIR`)");
  }
  return read_model_dir_config(config.model);
}

EngineConfig resolve_config(const EngineConfig& config, const ModelDirConfig& model) {
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

// The weights of a model directory as HostTensors pointing into the mapped files.
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
        tensors_.push_back(HostTensor{view.name, cpu::dtype_name(view.dtype), view.shape, view.data});
      }
    }
  }

  const std::vector<HostTensor>& tensors() const { return tensors_; }

 private:
  std::vector<SafetensorsFile> files_;  // the mappings the tensors point into
  std::vector<HostTensor> tensors_;
};

}  // namespace

struct MappedModelDir::Impl {
  explicit Impl(const EngineConfig& requested)
      : model(read_model(requested)),
        config(resolve_config(requested, model)),
        weights(requested.model) {}

  ModelDirConfig model;
  EngineConfig config;
  MappedWeights weights;
};

MappedModelDir::MappedModelDir(const EngineConfig& config) : impl_(std::make_unique<Impl>(config)) {}
MappedModelDir::~MappedModelDir() = default;
MappedModelDir::MappedModelDir(MappedModelDir&&) noexcept = default;
MappedModelDir& MappedModelDir::operator=(MappedModelDir&&) noexcept = default;
const ModelSpec& MappedModelDir::spec() const { return impl_->model.spec; }
const EngineConfig& MappedModelDir::config() const { return impl_->config; }
const std::vector<HostTensor>& MappedModelDir::weights() const { return impl_->weights.tensors(); }

// The mapped directory is a temporary of the delegating call: it lives until the engine has
// uploaded the weights.
Engine::Engine(const EngineConfig& config) : Engine(MappedModelDir(config)) {}

Engine::Engine(const MappedModelDir& model)
    : Engine(model.spec(), model.config(), model.weights()) {}

}  // namespace octavo

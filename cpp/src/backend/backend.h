// A backend: device memory plus the ops of ops.h on one stream. The executor drives a model
// through this interface only, so it never knows which device it runs on.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <octavo/error.h>

#include "backend/ops.h"

namespace octavo {

/// The largest step a backend must be ready for, so that it sizes its scratch once.
struct BackendLimits {
  int max_num_tokens = 0;
  int max_num_seqs = 0;
  int max_model_len = 0;
  int num_heads = 0;
  std::vector<int> kv_head_counts;  // every count of KV heads some layer has
  int head_dim = 0;
  int vocab_size = 0;
  int max_top_logprobs = 0;
};

struct MemoryInfo {
  size_t free_bytes = 0;
  size_t total_bytes = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;  // "cpu", "cuda:0"
  /// The activation dtype this backend computes in for a model stored in `weight_dtype`.
  virtual DType act_dtype(DType weight_dtype) const = 0;

  // Memory. allocate() returns memory aligned to at least 256 bytes or throws OutOfMemory.
  virtual void* allocate(size_t bytes) = 0;
  virtual void release(void* pointer) = 0;
  /// Host -> device and device -> host copies, ordered with the ops on this backend's stream.
  virtual void upload(void* device, const void* host, size_t bytes) = 0;
  virtual void download(void* host, const void* device, size_t bytes) = 0;
  /// Blocks until every op issued so far has finished (and every download has landed).
  virtual void synchronize() = 0;
  /// A download that does not wait for later work: the copy is queued behind the ops issued so
  /// far and the call returns a ticket; the bytes are in `host` once wait_download(ticket) returns,
  /// which waits for that copy (and the downloads before it) only, not for ops issued after it.
  /// Backends whose ops complete on return copy at once.
  virtual uint64_t download_async(void* host, const void* device, size_t bytes) {
    download(host, device, bytes);
    synchronize();
    return 0;
  }
  virtual void wait_download(uint64_t ticket) { (void)ticket; }
  /// Ops return before the device runs them (a stream): the host can prepare the next step
  /// meanwhile. False where every op completes on return (the CPU).
  virtual bool queues_work() const { return false; }
  /// Device memory now (GPU backends); nullopt where memory is the host's (CPU).
  virtual std::optional<MemoryInfo> memory_info() const { return std::nullopt; }
  /// Allocates the scratch the ops need for steps up to `limits` (attention splits, sampling),
  /// so that no op allocates while a step runs.
  virtual void reserve_workspace(const BackendLimits& limits) { (void)limits; }

  /// Graphs (CUDA graphs): the ops issued between begin_capture() and end_capture() are recorded,
  /// not run; replay(id) runs them again with the same arguments (so every pointer they read must
  /// hold that step's inputs). Backends without graphs return false from supports_graphs() and
  /// throw from the rest.
  virtual bool supports_graphs() const { return false; }
  virtual void begin_capture() { throw Error(name() + " has no graph capture"); }
  virtual int end_capture() { throw Error(name() + " has no graph capture"); }
  virtual void replay(int graph) {
    (void)graph;
    throw Error(name() + " has no graph capture");
  }

  // The ops (contracts in ops.h).
  virtual void copy_blocks(const CopyBlocksParams& p) = 0;
  virtual void embedding(const EmbeddingParams& p) = 0;
  virtual void norm(const NormParams& p) = 0;
  virtual void gemm(const GemmParams& p) = 0;
  virtual void rotary(const RotaryParams& p) = 0;
  virtual void write_kv(const WriteKVParams& p) = 0;
  /// Rotary on q and k, then k and v into their cache slots (r.k and w.k are the same array).
  /// A backend may fuse the two; by default they run in turn.
  virtual void rotary_write_kv(const RotaryParams& r, const WriteKVParams& w) {
    rotary(r);
    write_kv(w);
  }
  virtual void paged_attention(const AttentionParams& p) = 0;
  virtual void activation(const ActivationParams& p) = 0;
  virtual void gather_rows(const GatherRowsParams& p) = 0;
  virtual void add_logit_bias(const LogitBiasParams& p) = 0;
  virtual void sample(const SampleParams& p) = 0;
  virtual void update_token_counts(const TokenCountParams& p) = 0;
  virtual void apply_penalties(const PenaltyParams& p) = 0;
  virtual void token_logprobs(const TokenLogprobsParams& p) = 0;
};

/// Owns one allocation of a backend; moves, never copies.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend& backend, size_t bytes)
      : backend_(&backend), data_(bytes ? backend.allocate(bytes) : nullptr), bytes_(bytes) {}
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept {
    reset();
    backend_ = other.backend_;
    data_ = other.data_;
    bytes_ = other.bytes_;
    other.data_ = nullptr;
    other.bytes_ = 0;
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { reset(); }

  void* data() const { return data_; }
  template <typename T>
  T* as() const { return static_cast<T*>(data_); }
  size_t bytes() const { return bytes_; }

 private:
  void reset() {
    if (data_) backend_->release(data_);
    data_ = nullptr;
  }
  Backend* backend_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

/// Makes the backend for a device string: "cpu", "cuda" or "cuda:N". Throws InvalidArgument for
/// an unknown device or one this build lacks, naming the devices it has.
std::unique_ptr<Backend> make_backend(const std::string& device);

}  // namespace octavo

// The CUDA backend: one device, one stream, plain cudaMalloc, pinned staging for the per-step
// upload and download, cuBLASLt for GEMMs and octavo's kernels for the rest.
#include "cuda/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <deque>
#include <string>
#include <vector>

#include <octavo/error.h>

#include "cuda/cuda_ops.h"
#include "cuda/gemm.h"

namespace octavo::cuda {
namespace {

void check(cudaError_t error, const std::string& what) {
  if (error != cudaSuccess) {
    throw BackendError("cuda: " + what + " failed: " + cudaGetErrorString(error));
  }
}

std::string mib(size_t bytes) { return std::to_string(bytes >> 20) + " MiB"; }

constexpr size_t kGemmWorkspaceBytes = size_t{32} << 20;
// Pinned staging for step inputs and sampled outputs; larger transfers (weights at load) go
// straight from pageable memory.
constexpr size_t kPinnedBytes = size_t{8} << 20;

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    const int count = device_count();
    if (device < 0 || device >= count) {
      throw InvalidArgument("device 'cuda:" + std::to_string(device) + "': this machine has " +
                            std::to_string(count) + " CUDA device(s)");
    }
    check(cudaSetDevice(device_), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "stream create");
    check(cudaMallocHost(&pinned_upload_, kPinnedBytes), "pinned alloc");
    check(cudaMallocHost(&pinned_download_, kPinnedBytes), "pinned alloc");
    check(cudaEventCreateWithFlags(&upload_done_, cudaEventDisableTiming), "event create");
    gemm_workspace_ = allocate(kGemmWorkspaceBytes);
    gemm_ = std::make_unique<GemmRunner>(gemm_workspace_, kGemmWorkspaceBytes);
    cudaDeviceProp props{};
    check(cudaGetDeviceProperties(&props, device_), "device properties");
    name_ = "cuda:" + std::to_string(device_) + " (" + props.name + ")";
  }

  ~CudaBackend() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    gemm_.reset();
    for (void* p : {gemm_workspace_, decode_workspace_, sample_workspace_}) {
      if (p) cudaFree(p);
    }
    for (cudaGraphExec_t graph : graphs_) cudaGraphExecDestroy(graph);
    cudaFreeHost(pinned_upload_);
    cudaFreeHost(pinned_download_);
    cudaEventDestroy(upload_done_);
    for (const PendingDownload& d : pending_downloads_) cudaEventDestroy(d.done);
    for (cudaEvent_t event : spare_events_) cudaEventDestroy(event);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return name_; }

  DType act_dtype(DType weight_dtype) const override {
    if (weight_dtype == DType::kFloat32) {
      throw InvalidArgument("the CUDA backend computes in bfloat16 or float16; pass "
                            "dtype='bfloat16' (or 'float16') for this float32 checkpoint");
    }
    return weight_dtype;
  }

  void* allocate(size_t bytes) override {
    void* pointer = nullptr;
    const cudaError_t error = cudaMalloc(&pointer, std::max<size_t>(bytes, 256));
    if (error != cudaSuccess) {
      cudaGetLastError();
      size_t free = 0, total = 0;
      cudaMemGetInfo(&free, &total);
      throw OutOfMemory("cuda: cannot allocate " + mib(bytes) + " (" + mib(free) + " free of " +
                        mib(total) + ")");
    }
    return pointer;
  }
  void release(void* pointer) override { cudaFree(pointer); }

  void upload(void* device, const void* host, size_t bytes) override {
    if (bytes == 0) return;
    if (bytes > kPinnedBytes) {
      check(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice), "upload");
      return;
    }
    // Uploads fill the pinned buffer front to back, so a step's several uploads never wait for
    // each other; one that would run past the end waits for every copy before it (stream order:
    // the last one's event) and starts again at the front.
    size_t offset = (upload_cursor_ + 15) / 16 * 16;
    if (offset + bytes > kPinnedBytes) {
      check(cudaEventSynchronize(upload_done_), "upload wait");
      offset = 0;
    }
    std::byte* const staging = static_cast<std::byte*>(pinned_upload_) + offset;
    std::memcpy(staging, host, bytes);
    check(cudaMemcpyAsync(device, staging, bytes, cudaMemcpyHostToDevice, stream_), "upload");
    check(cudaEventRecord(upload_done_, stream_), "upload event");
    upload_cursor_ = offset + bytes;
  }

  void download(void* host, const void* device, size_t bytes) override {
    download_async(host, device, bytes);
  }

  void synchronize() override {
    check(cudaStreamSynchronize(stream_), "synchronize");
    finish_downloads(next_ticket_);
  }

  // Downloads fill the pinned buffer front to back, each with its own event, so the results of
  // one step can land while the next step's work is already queued behind them. One that would
  // run past the end first finishes every pending download (their regions free up) and starts
  // again at the front.
  uint64_t download_async(void* host, const void* device, size_t bytes) override {
    const uint64_t ticket = ++next_ticket_;
    if (bytes == 0) return ticket;
    if (bytes > kPinnedBytes) {
      check(cudaStreamSynchronize(stream_), "download sync");
      finish_downloads(ticket - 1);
      check(cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost), "download");
      return ticket;
    }
    size_t offset = (download_cursor_ + 15) / 16 * 16;
    if (offset + bytes > kPinnedBytes) {
      finish_downloads(ticket - 1);
      offset = 0;
    }
    PendingDownload pending{ticket, host, offset, bytes, take_event()};
    check(cudaMemcpyAsync(static_cast<std::byte*>(pinned_download_) + offset, device, bytes,
                          cudaMemcpyDeviceToHost, stream_),
          "download");
    check(cudaEventRecord(pending.done, stream_), "download event");
    pending_downloads_.push_back(pending);
    download_cursor_ = offset + bytes;
    return ticket;
  }

  void wait_download(uint64_t ticket) override { finish_downloads(ticket); }

  std::optional<MemoryInfo> memory_info() const override {
    size_t free = 0, total = 0;
    check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
    return MemoryInfo{free, total};
  }

  void reserve_workspace(const BackendLimits& limits) override {
    AttentionParams a{};
    a.num_requests = a.num_tokens = limits.max_num_seqs;
    a.num_heads = limits.num_heads;
    a.head_dim = limits.head_dim;
    a.max_query_len = 1;
    a.max_context_len = limits.max_model_len;
    a.block_size = 16;
    // Layers with fewer KV heads (larger query groups) split their keys more ways.
    decode_workspace_bytes_ = 0;
    for (int kv_heads : limits.kv_head_counts) {
      a.num_kv_heads = kv_heads;
      decode_workspace_bytes_ = std::max(decode_workspace_bytes_, decode_workspace_bytes(a));
    }
    if (decode_workspace_bytes_) decode_workspace_ = allocate(decode_workspace_bytes_);
    SampleParams s{};
    s.num_rows = limits.max_num_seqs;
    s.vocab_size = limits.vocab_size;
    s.num_top = limits.max_top_logprobs;
    sample_workspace_bytes_ = sample_workspace_bytes(s);
    if (sample_workspace_bytes_) sample_workspace_ = allocate(sample_workspace_bytes_);
  }

  bool supports_graphs() const override { return true; }
  bool queues_work() const override { return true; }

  void begin_capture() override {
    // Thread-local mode: other threads (Python's) may call CUDA meanwhile without breaking it.
    check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "begin capture");
  }

  int end_capture() override {
    cudaGraph_t graph = nullptr;
    check(cudaStreamEndCapture(stream_, &graph), "end capture");
    cudaGraphExec_t exec = nullptr;
    cudaError_t error = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    if (error == cudaSuccess) {
      graphs_.push_back(exec);
      // Its device-side resources now rather than at its first replay, mid-run.
      error = cudaGraphUpload(exec, stream_);
    }
    if (error == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // not sticky: the context stays usable
      size_t free = 0, total = 0;
      cudaMemGetInfo(&free, &total);
      throw OutOfMemory("cuda: a decode graph needs more device memory than is free (" +
                        mib(free) + "); lower gpu_memory_utilization, or pass enforce_eager to "
                        "run without graphs");
    }
    check(error, "graph instantiate");
    return int(graphs_.size()) - 1;
  }

  void replay(int graph) override {
    if (graph < 0 || graph >= int(graphs_.size())) {
      throw InvalidArgument("replay: no graph " + std::to_string(graph));
    }
    check(cudaGraphLaunch(graphs_[graph], stream_), "graph launch");
  }

  void copy_blocks(const CopyBlocksParams& p) override { cuda::copy_blocks(p, stream_); }
  void embedding(const EmbeddingParams& p) override { cuda::embedding(p, stream_); }
  void norm(const NormParams& p) override { cuda::norm(p, stream_); }
  void gemm(const GemmParams& p) override { gemm_->run(p, stream_); }
  void rotary(const RotaryParams& p) override { cuda::rotary(p, stream_); }
  void write_kv(const WriteKVParams& p) override { cuda::write_kv(p, stream_); }
  void rotary_write_kv(const RotaryParams& r, const WriteKVParams& w) override {
    cuda::rotary_write_kv(r, w, stream_);
  }
  void activation(const ActivationParams& p) override { cuda::activation(p, stream_); }
  void gather_rows(const GatherRowsParams& p) override { cuda::gather_rows(p, stream_); }
  void add_logit_bias(const LogitBiasParams& p) override { cuda::add_logit_bias(p, stream_); }
  void update_token_counts(const TokenCountParams& p) override { cuda::update_token_counts(p, stream_); }
  void apply_penalties(const PenaltyParams& p) override { cuda::apply_penalties(p, stream_); }
  void token_logprobs(const TokenLogprobsParams& p) override { cuda::token_logprobs(p, stream_); }

  void paged_attention(const AttentionParams& p) override {
    // Decode-only steps take the split-K kernel; anything with a prompt chunk takes the
    // tensor-core kernel, which handles single-token requests in the same launch unless they
    // lead the batch in numbers (splits_decode_prefix).
    if (p.max_query_len == 1 && p.num_tokens == p.num_requests) {
      decode(p);
    } else if (splits_decode_prefix(p)) {
      const DecodePrefixSplit split = split_decode_prefix(p);
      decode(split.decode);
      paged_attention_prefill(split.prefill, stream_);
    } else {
      paged_attention_prefill(p, stream_);
    }
  }

  void sample(const SampleParams& p) override {
    const size_t needed = sample_workspace_bytes(p);
    if (needed > sample_workspace_bytes_) {
      throw InvalidArgument("sample: the step needs " + mib(needed) + " of workspace; " +
                            mib(sample_workspace_bytes_) + " was reserved");
    }
    cuda::sample(p, sample_workspace_, stream_);
  }

 private:
  int device_;
  std::string name_;
  cudaStream_t stream_ = nullptr;
  void* pinned_upload_ = nullptr;
  size_t upload_cursor_ = 0;  // where the next upload's staging starts in pinned_upload_
  void* pinned_download_ = nullptr;
  cudaEvent_t upload_done_ = nullptr;
  struct PendingDownload {
    uint64_t ticket;
    void* host;
    size_t offset;  // in pinned_download_
    size_t bytes;
    cudaEvent_t done;
  };
  std::deque<PendingDownload> pending_downloads_;  // in ticket order
  std::vector<cudaEvent_t> spare_events_;
  uint64_t next_ticket_ = 0;
  size_t download_cursor_ = 0;  // where the next download lands in pinned_download_

  cudaEvent_t take_event() {
    if (spare_events_.empty()) {
      cudaEvent_t event = nullptr;
      check(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "event create");
      return event;
    }
    cudaEvent_t event = spare_events_.back();
    spare_events_.pop_back();
    return event;
  }

  /// The decode kernel in the workspace reserved for the engine's limits.
  void decode(const AttentionParams& p) {
    const size_t needed = decode_workspace_bytes(p);
    if (needed > decode_workspace_bytes_) {
      throw InvalidArgument("paged_attention: the step needs " + mib(needed) +
                            " of decode workspace; " + mib(decode_workspace_bytes_) +
                            " was reserved for the engine's limits");
    }
    paged_attention_decode(p, decode_workspace_, stream_);
  }

  /// Waits for the pending downloads up to `ticket`, oldest first, and copies each out.
  void finish_downloads(uint64_t ticket) {
    while (!pending_downloads_.empty() && pending_downloads_.front().ticket <= ticket) {
      const PendingDownload d = pending_downloads_.front();
      check(cudaEventSynchronize(d.done), "download wait");
      std::memcpy(d.host, static_cast<const std::byte*>(pinned_download_) + d.offset, d.bytes);
      pending_downloads_.pop_front();
      spare_events_.push_back(d.done);
    }
  }
  void* gemm_workspace_ = nullptr;
  std::unique_ptr<GemmRunner> gemm_;
  void* decode_workspace_ = nullptr;
  size_t decode_workspace_bytes_ = 0;
  void* sample_workspace_ = nullptr;
  size_t sample_workspace_bytes_ = 0;
  std::vector<cudaGraphExec_t> graphs_;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device) {
  return std::make_unique<CudaBackend>(device);
}

}  // namespace octavo::cuda

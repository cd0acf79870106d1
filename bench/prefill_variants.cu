// Times versions of the prefill attention kernel side by side on the GPU machine, without building
// the package: this file includes a copy of cuda/attention_prefill.cu (KERNEL_SOURCE), builds a
// paged cache (bf16, head dim 128, block 16, shuffled block table, random values from a fixed
// seed), runs paged_attention_prefill (3 warm-up launches, then the median of 20, CUDA events)
// and prints one JSON line with the time and a hash of the output bits. Two versions that must
// agree print the same hash; a change meant to be exact is checked that way over many shapes
// before the tests run. Not built by CMake.
//
//   nvcc -std=c++20 -O3 -DNDEBUG -DOCTAVO_WITH_CUDA=1 -DOCTAVO_CUDA_SM90A=1 --expt-relaxed-constexpr
//     --generate-code=arch=compute_90a,code=[sm_90a] -Icpp/include -Icpp/src -I. -Icuda
//     -DKERNEL_SOURCE='"attention_prefill.cu"' bench/prefill_variants.cu cuda/attention_decode.cu
//     cuda/device_counters.cc -o /tmp/prefill_variants
//   (attention_decode.cu defines current_sm_count and current_device_is_sm90, which the kernel
//   file calls; device_counters.cc its scheduling counters.)
//   /tmp/prefill_variants --batch 4 --seq 4096 [--mixed] [--heads 32 --kv-heads 8] [--window W]
//                         [--softcap C] [--timeline FILE]
//
// --timeline (a build with -DOCTAVO_PREFILL_TIMELINE): after the timed launches, one more
// launch records each work item's clock stamps (TimelineSlot in the kernel file) and writes
// them to FILE for `python bench/prefill_timeline.py FILE`, which says where a CTA's time goes.
//
// --mixed draws each prompt's length from U[64, seq]; every prompt is a whole prefill (context =
// prompt length), causal.
#include KERNEL_SOURCE

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

void check(cudaError_t error, const char* what) {
  if (error != cudaSuccess) {
    std::fprintf(stderr, "prefill_variants: %s: %s\n", what, cudaGetErrorString(error));
    std::exit(1);
  }
}

uint16_t to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return uint16_t((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

template <typename V>
V* to_device(const std::vector<V>& host) {
  V* device = nullptr;
  check(cudaMalloc(&device, host.size() * sizeof(V)), "cudaMalloc");
  check(cudaMemcpy(device, host.data(), host.size() * sizeof(V), cudaMemcpyHostToDevice), "copy");
  return device;
}

}  // namespace

int main(int argc, char** argv) {
  int batch = 4, seq = 4096, heads = 32, kv_heads = 8, window = 0;
  bool mixed = false;
  float softcap = 0.0f;
  const char* timeline_path = nullptr;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--mixed") {
      mixed = true;
    } else if (has_value && arg == "--batch") {
      batch = std::atoi(argv[++i]);
    } else if (has_value && arg == "--seq") {
      seq = std::atoi(argv[++i]);
    } else if (has_value && arg == "--heads") {
      heads = std::atoi(argv[++i]);
    } else if (has_value && arg == "--kv-heads") {
      kv_heads = std::atoi(argv[++i]);
    } else if (has_value && arg == "--window") {
      window = std::atoi(argv[++i]);
    } else if (has_value && arg == "--softcap") {
      softcap = float(std::atof(argv[++i]));
    } else if (has_value && arg == "--timeline") {
      timeline_path = argv[++i];
    } else {
      std::fprintf(stderr, "prefill_variants: unknown or incomplete argument %s\n", arg.c_str());
      return 2;
    }
  }
  constexpr int kHeadDim = 128, kBlockSize = 16;
  std::mt19937 rng(1234);
  std::vector<int32_t> lengths(batch, seq);
  if (mixed) {
    std::uniform_int_distribution<int> length(64, seq);
    for (auto& x : lengths) x = length(rng);
  }
  const int blocks_per_request = (seq + kBlockSize - 1) / kBlockSize;
  const int num_blocks = batch * blocks_per_request;
  std::vector<int32_t> query_start(batch + 1, 0);
  double flops = 0.0;  // 4 * head_dim per visible (query, key) pair and head
  for (int b = 0; b < batch; ++b) {
    query_start[b + 1] = query_start[b] + lengths[b];
    for (int i = 0; i < lengths[b]; ++i) {
      flops += 4.0 * kHeadDim * heads * (window > 0 ? std::min(i + 1, window) : i + 1);
    }
  }
  const int tokens = query_start[batch];
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<uint16_t> cache(size_t(num_blocks) * 2 * kv_heads * kBlockSize * kHeadDim);
  std::vector<uint16_t> q(size_t(tokens) * heads * kHeadDim);
  for (auto& x : cache) x = to_bf16(uniform(rng));
  for (auto& x : q) x = to_bf16(2.0f * uniform(rng));
  std::vector<int32_t> block_table(num_blocks);
  for (int i = 0; i < num_blocks; ++i) block_table[i] = i;
  std::shuffle(block_table.begin(), block_table.end(), rng);

  uint16_t* out = nullptr;
  check(cudaMalloc(&out, q.size() * 2), "cudaMalloc");
  octavo::AttentionParams p{};
  p.q = to_device(q);
  p.layer_cache = to_device(cache);
  p.out = out;
  p.query_start = to_device(query_start);
  p.context_lens = to_device(lengths);
  p.block_tables = to_device(block_table);
  p.num_requests = batch;
  p.num_tokens = tokens;
  p.num_heads = heads;
  p.num_kv_heads = kv_heads;
  p.head_dim = kHeadDim;
  p.block_size = kBlockSize;
  p.max_blocks_per_request = blocks_per_request;
  p.q_stride = int64_t{heads} * kHeadDim;
  p.sliding_window = window;
  p.max_query_len = *std::max_element(lengths.begin(), lengths.end());
  p.max_context_len = p.max_query_len;
  p.scale = 1.0f / std::sqrt(float(kHeadDim));
  p.softcap = softcap;
  p.act_dtype = p.cache_dtype = octavo::DType::kBFloat16;

  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  for (int i = 0; i < 3; ++i) octavo::cuda::paged_attention_prefill(p, nullptr);
  std::vector<float> ms(20);
  for (auto& t : ms) {
    check(cudaEventRecord(start), "cudaEventRecord");
    octavo::cuda::paged_attention_prefill(p, nullptr);
    check(cudaEventRecord(stop), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "kernel");
    check(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
  }
  std::sort(ms.begin(), ms.end());
  if (timeline_path != nullptr) {
#if defined(OCTAVO_PREFILL_TIMELINE)
    using octavo::cuda::kTimelineItems;
    using octavo::cuda::kTimelineSlots;
    void* stamps = nullptr;
    check(cudaGetSymbolAddress(&stamps, octavo::cuda::prefill_timeline), "timeline symbol");
    const size_t bytes = size_t(kTimelineItems) * kTimelineSlots * sizeof(uint64_t);
    check(cudaMemset(stamps, 0, bytes), "timeline reset");
    octavo::cuda::paged_attention_prefill(p, nullptr);
    std::vector<uint64_t> host(bytes / sizeof(uint64_t));
    check(cudaMemcpy(host.data(), stamps, bytes, cudaMemcpyDeviceToHost), "timeline copy");
    FILE* file = std::fopen(timeline_path, "wb");
    if (file == nullptr || std::fwrite(host.data(), 1, bytes, file) != bytes) {
      std::fprintf(stderr, "prefill_variants: cannot write %s\n", timeline_path);
      return 1;
    }
    std::fclose(file);
#else
    std::fprintf(stderr, "prefill_variants: --timeline needs a build with -DOCTAVO_PREFILL_TIMELINE\n");
    return 2;
#endif
  }
  std::vector<uint16_t> result(q.size());
  check(cudaMemcpy(result.data(), out, result.size() * 2, cudaMemcpyDeviceToHost), "copy back");
  uint64_t hash = 1469598103934665603ull;  // FNV-1a over the output's bf16 bits
  for (uint16_t x : result) hash = (hash ^ x) * 1099511628211ull;
  const float median = ms[ms.size() / 2];
  std::printf(
      "{\"batch\": %d, \"seq\": %d, \"mixed\": %s, \"heads\": %d, \"kv_heads\": %d, \"window\": %d, "
      "\"softcap\": %g, \"kernel\": \"%s\", \"median_ms\": %.4f, \"min_ms\": %.4f, "
      "\"TFLOPs\": %.1f, \"hash\": \"%016llx\"}\n",
      batch, seq, mixed ? "true" : "false", heads, kv_heads, window, softcap,
      octavo::cuda::prefill_kernel_name(p), median, ms.front(), flops / (median * 1e-3) / 1e12,
      static_cast<unsigned long long>(hash));
  return 0;
}

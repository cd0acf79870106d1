// octavo_bench: BENCH.md's throughput and latency workloads with no Python at all.
//
//   octavo_bench --workload nano --device cuda                      random Qwen3-0.6B, 256 requests
//   octavo_bench --model DIR --workload custom --num-prompts 64 --input-len 100:1024 --output-len 256
//   octavo_bench --random-model SPEC.json --workload custom --num-prompts 4 --input-len 8 --output-len 8
//
// The requests are bench/throughput.py's, draw for draw (cpp/tools/bench_workload.h): the same
// prompt lengths, token ids and per-request sampling seeds, every output run to its length. All
// requests are added at once and the engine is stepped until none is left; the figures are
// throughput.py's (output and total tokens per second over the wall time from the first
// add_request to the last token, and the engine's step-time split) plus time to first token and
// time per output token percentiles, KV pool usage and peak memory. --json prints one JSON object.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <octavo/engine.h>
#include <octavo/error.h>
#include <octavo/log.h>
#include <octavo/model_dir.h>
#include <octavo/version.h>

#include "backend/backend.h"
#include "bench_workload.h"
#include "model/dtype_convert.h"
#include "model/executor.h"
#include "model/json.h"
#include "model/random_weights.h"

namespace {

using namespace octavo;
using namespace octavo::bench;
using Clock = std::chrono::steady_clock;

constexpr const char* kUsage = R"(usage: octavo_bench (--model DIR | --random-model NAME|SPEC.json) [options]

  --model DIR               an octavo model directory (written by `octavo export`)
  --random-model M          random weights: qwen3-0.6b, llama-3.1-8b, or a ModelSpec JSON file
                            (octavo.json's model_spec, or an octavo.json); default: the workload's
  --workload W              nano | llama8b | latency | custom (default custom; BENCH.md)
  --num-prompts N           requests (default: the workload's)
  --input-len N|LO:HI       prompt lengths, uniform in [LO, HI] (default: the workload's)
  --output-len N|LO:HI      output lengths (default: the workload's)
  --seed S                  lengths from Python's random.Random(S), tokens from Random(S + 1) (0)
  --device D                cpu | cuda | cuda:N (default cpu)
  --dtype T                 auto | float32 | float16 | bfloat16 (auto: bfloat16 for random
                            weights, the directory's dtype otherwise)
  --max-num-seqs N          running requests per step (default: the engine's)
  --max-num-batched-tokens N  tokens per step (default: the engine's)
  --max-model-len N         default: the longest request + 1, as bench/throughput.py sets it
  --block-size N            tokens per KV block (default 16)
  --num-kv-blocks N         fix the KV pool size (default: from memory)
  --gpu-memory-utilization F  (default 0.9)
  --enforce-eager           no CUDA graphs
  --[no-]async-scheduling   launch each step while the one before it runs (default: on GPUs)
  --json                    print one JSON object instead of the report
)";

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "octavo_bench: " << message << "\n\n" << kUsage;
  std::exit(2);
}

struct Options {
  std::string model_dir;
  std::string random_model;
  std::string workload = "custom";
  std::optional<int> num_prompts;
  std::optional<LengthRange> input_len, output_len;
  uint64_t seed = 0;
  std::string device = "cpu";
  std::string dtype = "auto";
  int max_num_seqs = 0;  // 0: the engine's default
  int max_num_batched_tokens = 0;
  int max_model_len = 0;
  int block_size = 16;
  int num_kv_blocks = 0;
  float gpu_memory_utilization = 0.9f;
  bool enforce_eager = false;
  std::optional<bool> async_scheduling;  // unset: the engine's default
  bool json = false;
};

long long parse_int(const std::string& flag, const std::string& text, long long low, long long high) {
  try {
    size_t used = 0;
    const long long value = std::stoll(text, &used);
    if (used == text.size() && value >= low && value <= high) return value;
  } catch (const std::exception&) {
  }
  usage_error(flag + " is '" + text + "'; expected an integer in [" + std::to_string(low) + ", " +
              std::to_string(high) + "]");
}

LengthRange parse_range(const std::string& flag, const std::string& text) {
  const size_t colon = text.find(':');
  const int64_t low = parse_int(flag, text.substr(0, colon), 1, 1 << 24);
  const int64_t high = colon == std::string::npos ? low : parse_int(flag, text.substr(colon + 1), 1, 1 << 24);
  if (high < low) usage_error(flag + " is '" + text + "'; LO must not exceed HI");
  return {low, high};
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> args(argv + 1, argv + argc);
  for (size_t i = 0; i < args.size(); ++i) {
    std::string flag = args[i], value;
    const size_t eq = flag.find('=');
    const bool inline_value = flag.rfind("--", 0) == 0 && eq != std::string::npos;
    if (inline_value) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
    }
    auto next = [&]() -> std::string {
      if (inline_value) return value;
      if (i + 1 >= args.size()) usage_error(flag + " needs a value");
      return args[++i];
    };
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (flag == "--model") {
      o.model_dir = next();
    } else if (flag == "--random-model") {
      o.random_model = next();
    } else if (flag == "--workload") {
      o.workload = next();
    } else if (flag == "--num-prompts") {
      o.num_prompts = int(parse_int(flag, next(), 1, 1 << 20));
    } else if (flag == "--input-len") {
      o.input_len = parse_range(flag, next());
    } else if (flag == "--output-len") {
      o.output_len = parse_range(flag, next());
    } else if (flag == "--seed") {
      o.seed = uint64_t(parse_int(flag, next(), 0, (1ll << 62)));
    } else if (flag == "--device") {
      o.device = next();
    } else if (flag == "--dtype") {
      o.dtype = next();
    } else if (flag == "--max-num-seqs") {
      o.max_num_seqs = int(parse_int(flag, next(), 1, 1 << 20));
    } else if (flag == "--max-num-batched-tokens") {
      o.max_num_batched_tokens = int(parse_int(flag, next(), 1, 1 << 30));
    } else if (flag == "--max-model-len") {
      o.max_model_len = int(parse_int(flag, next(), 2, 1 << 30));
    } else if (flag == "--block-size") {
      o.block_size = int(parse_int(flag, next(), 1, 256));
    } else if (flag == "--num-kv-blocks") {
      o.num_kv_blocks = int(parse_int(flag, next(), 1, 1 << 30));
    } else if (flag == "--gpu-memory-utilization") {
      const std::string text = next();
      char* end = nullptr;
      o.gpu_memory_utilization = std::strtof(text.c_str(), &end);
      if (end == text.c_str() || *end != '\0') usage_error(flag + " is '" + text + "'; expected a number");
    } else if (flag == "--enforce-eager") {
      o.enforce_eager = true;
    } else if (flag == "--async-scheduling") {
      o.async_scheduling = true;
    } else if (flag == "--no-async-scheduling") {
      o.async_scheduling = false;
    } else if (flag == "--json") {
      o.json = true;
    } else {
      usage_error("unknown argument '" + args[i] + "'");
    }
  }
  if (!o.model_dir.empty() && !o.random_model.empty()) {
    usage_error("give --model or --random-model, not both");
  }
  return o;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InvalidArgument("cannot open '" + path + "'");
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// A named random model, or a ModelSpec JSON file (a bare spec, or a whole octavo.json).
ModelSpec random_model_spec(const std::string& name) {
  if (std::optional<ModelSpec> spec = named_model_spec(name)) return *spec;
  if (name.size() < 5 || name.substr(name.size() - 5) != ".json") {
    throw InvalidArgument("unknown random model '" + name +
                          "'; use qwen3-0.6b, llama-3.1-8b or a ModelSpec .json file");
  }
  const std::string text = read_text(name);
  try {
    if (text.find("\"model_spec\"") != std::string::npos) return model_dir_config_from_json(text).spec;
    return model_spec_from_json(text);
  } catch (const FormatError& e) {
    throw FormatError(name + ": " + e.what());
  }
}

struct Stats {
  double mean = 0, p50 = 0, p90 = 0, p99 = 0;
};

Stats summarize(std::vector<double> values) {
  Stats s;
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  for (double v : values) s.mean += v;
  s.mean /= double(values.size());
  s.p50 = percentile(values, 50);
  s.p90 = percentile(values, 90);
  s.p99 = percentile(values, 99);
  return s;
}

std::string fixed(double value, int digits) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, "%.*f", digits, value);
  return buffer;
}

std::string grouped(double value) {
  std::string digits = fixed(value, 0);
  const bool negative = !digits.empty() && digits[0] == '-';
  for (int i = int(digits.size()) - 3; i > (negative ? 1 : 0); i -= 3) digits.insert(size_t(i), ",");
  return digits;
}

std::string gib(double bytes) { return fixed(bytes / double(1ull << 30), 2) + " GiB"; }

std::string stats_json(const Stats& s) {
  return "{\"mean\": " + fixed(s.mean, 3) + ", \"p50\": " + fixed(s.p50, 3) + ", \"p90\": " +
         fixed(s.p90, 3) + ", \"p99\": " + fixed(s.p99, 3) + "}";
}

std::string stats_text(const Stats& s) {
  return "mean " + fixed(s.mean, 2) + ", p50 " + fixed(s.p50, 2) + ", p90 " + fixed(s.p90, 2) +
         ", p99 " + fixed(s.p99, 2);
}

int run(const Options& options) {
  const Workload workload = [&] {
    try {
      return named_workload(options.workload);
    } catch (const std::invalid_argument& e) {
      usage_error(e.what());
    }
  }();
  std::string random_model = options.random_model;
  if (options.model_dir.empty() && random_model.empty()) {
    if (workload.default_model.empty()) {
      usage_error("the custom workload needs --model DIR or --random-model M");
    }
    random_model = workload.default_model;
  }
  const int num_prompts = options.num_prompts.value_or(workload.num_prompts);
  const LengthRange input = options.input_len.value_or(workload.input);
  const LengthRange output = options.output_len.value_or(workload.output);

  // A backend of our own for the device's memory figures; made before the engine, so the
  // baseline holds everything that is not the engine's (the CUDA context, this backend).
  std::unique_ptr<Backend> probe = make_backend(options.device);
  const std::optional<MemoryInfo> memory_before = probe->memory_info();

  EngineConfig config;
  config.device = options.device;
  config.dtype = options.dtype;
  config.max_num_seqs = options.max_num_seqs;
  config.max_num_batched_tokens = options.max_num_batched_tokens;
  config.block_size = options.block_size;
  config.num_kv_blocks = options.num_kv_blocks;
  config.gpu_memory_utilization = options.gpu_memory_utilization;
  config.enforce_eager = options.enforce_eager;
  config.async_scheduling = options.async_scheduling;

  // Lengths do not depend on the model; the longest request sets max_model_len as in
  // throughput.py.
  int64_t longest = 0;
  for (const auto& [in, out] : make_lengths(options.seed, num_prompts, input, output)) {
    longest = std::max(longest, in + out);
  }
  config.max_model_len = options.max_model_len > 0 ? options.max_model_len : int(longest + 1);

  const Clock::time_point load_start = Clock::now();
  double weights_seconds = 0.0;  // making random weights on the host: not part of engine start
  std::unique_ptr<Engine> engine;
  std::string model_name, model_source;
  if (!options.model_dir.empty()) {
    config.model = options.model_dir;
    engine = std::make_unique<Engine>(config);
    model_name = options.model_dir;
    model_source = "directory";
  } else {
    const ModelSpec spec = random_model_spec(random_model);
    if (config.dtype == "auto") config.dtype = "bfloat16";  // BENCH.md: random bf16 weights
    const DType dtype = parse_dtype(config.dtype, "--dtype");
    RandomWeights weights = make_random_weights(spec, dtype, /*seed=*/0);
    weights_seconds = std::chrono::duration<double>(Clock::now() - load_start).count();
    engine = std::make_unique<Engine>(spec, config, weights.tensors);
    model_name = random_model;
    model_source = "random";
  }
  const double load_seconds = std::chrono::duration<double>(Clock::now() - load_start).count();
  const EngineConfig& resolved = engine->config();
  const ModelSpec& spec = engine->spec();
  const std::vector<BenchRequest> requests =
      make_requests(options.seed, num_prompts, input, output, spec.vocab_size);

  // The run: every request added at once, then steps until all have finished.
  struct Progress {
    Clock::time_point first, last;
    int tokens = 0;
  };
  std::map<RequestId, Progress> progress;
  size_t peak_used_blocks = 0;
  size_t peak_device_used = memory_before ? memory_before->total_bytes - memory_before->free_bytes : 0;
  const Clock::time_point start = Clock::now();
  for (const BenchRequest& r : requests) {
    SamplingParams params;
    params.temperature = 1.0f;
    params.max_tokens = r.output_len;
    params.ignore_eos = true;
    params.seed = r.seed;
    progress[engine->add_request(r.prompt_token_ids, params)] = Progress{};
  }
  uint64_t failed = 0;
  while (engine->has_unfinished()) {
    std::vector<RequestOutput> outputs = engine->step();
    const Clock::time_point now = Clock::now();
    for (const RequestOutput& out : outputs) {
      if (!out.error.empty()) {
        ++failed;
        std::cerr << "octavo_bench: request " << out.id << " failed: " << out.error << "\n";
      }
      if (out.new_token_ids.empty()) continue;
      Progress& p = progress[out.group_id];
      if (p.tokens == 0) p.first = now;
      p.last = now;
      p.tokens += int(out.new_token_ids.size());
    }
    const EngineStats stats = engine->stats();
    peak_used_blocks = std::max(peak_used_blocks, size_t(stats.num_kv_blocks - stats.num_free_kv_blocks));
  }
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();
  // The engine allocates its pool and buffers up front and keeps every graph it captured, so its
  // device use at the end is its peak (read once: cudaMemGetInfo has no place in the timed loop).
  if (std::optional<MemoryInfo> memory = probe->memory_info()) {
    peak_device_used = std::max(peak_device_used, memory->total_bytes - memory->free_bytes);
  }
  const EngineStats stats = engine->stats();

  uint64_t prompt_tokens = 0, output_tokens = 0;
  std::vector<double> ttft_ms, tpot_ms;
  for (const BenchRequest& r : requests) prompt_tokens += r.prompt_token_ids.size();
  for (const auto& [id, p] : progress) {
    output_tokens += uint64_t(p.tokens);
    if (p.tokens == 0) continue;
    ttft_ms.push_back(std::chrono::duration<double, std::milli>(p.first - start).count());
    if (p.tokens > 1) {
      tpot_ms.push_back(std::chrono::duration<double, std::milli>(p.last - p.first).count() /
                        double(p.tokens - 1));
    }
  }
  const Stats ttft = summarize(ttft_ms), tpot = summarize(tpot_ms);
  const DType kv_dtype = parse_dtype(resolved.dtype, "the engine's dtype");
  const double block_bytes = double(Executor::kv_block_bytes(spec, resolved.block_size, kv_dtype));
  const double kv_pool_bytes = block_bytes * resolved.num_kv_blocks;
  const double peak_kv_usage = double(peak_used_blocks) / double(std::max(1, resolved.num_kv_blocks));
  // GPU: the device's use after the run (cudaMemGetInfo through the backend);
  // CPU: the process's peak resident set.
  double peak_memory = 0, engine_memory = 0;
  std::string memory_source;
  if (memory_before) {
    peak_memory = double(peak_device_used);
    engine_memory = double(peak_device_used) - double(memory_before->total_bytes - memory_before->free_bytes);
    memory_source = "device";
  } else {
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    peak_memory = double(usage.ru_maxrss) * 1024.0;
    memory_source = "max_rss";
  }
  const char* commit = std::getenv("OCTAVO_COMMIT");

  if (options.json) {
    std::string j = "{\"bench\": \"octavo_bench\", \"workload\": " + json_quote(workload.name) +
                    ", \"model\": " + json_quote(model_name) + ", \"model_source\": " +
                    json_quote(model_source) + ", \"architecture\": " + json_quote(spec.architecture) +
                    ", \"device\": " + json_quote(probe->name()) + ", \"dtype\": " +
                    json_quote(resolved.dtype) + ", \"requests\": " + std::to_string(num_prompts) +
                    ", \"prompt_tokens\": " + std::to_string(prompt_tokens) +
                    ", \"output_tokens\": " + std::to_string(output_tokens) +
                    ", \"failed_requests\": " + std::to_string(failed) +
                    ", \"wall_s\": " + fixed(wall, 3) +
                    ", \"output_tok_s\": " + fixed(double(output_tokens) / wall, 1) +
                    ", \"total_tok_s\": " + fixed(double(prompt_tokens + output_tokens) / wall, 1) +
                    ", \"steps\": " + std::to_string(stats.num_steps) +
                    ", \"schedule_s\": " + fixed(stats.schedule_seconds, 3) +
                    ", \"execute_s\": " + fixed(stats.execute_seconds, 3) +
                    ", \"step_output_s\": " + fixed(stats.output_seconds, 3) +
                    ", \"device_wait_s\": " + fixed(stats.device_wait_seconds, 3) +
                    ", \"graph_captures\": " + std::to_string(stats.graph_captures) +
                    ", \"async_steps\": " + std::to_string(stats.async_steps) +
                    ", \"graph_capture_s\": " + fixed(stats.graph_capture_seconds, 3) +
                    ", \"startup_graph_captures\": " + std::to_string(stats.startup_graph_captures) +
                    ", \"startup_graph_capture_s\": " + fixed(stats.startup_graph_capture_seconds, 3) +
                    ", \"ttft_ms\": " + stats_json(ttft) + ", \"tpot_ms\": " + stats_json(tpot) +
                    ", \"kv_blocks\": " + std::to_string(resolved.num_kv_blocks) +
                    ", \"block_size\": " + std::to_string(resolved.block_size) +
                    ", \"kv_pool_bytes\": " + fixed(kv_pool_bytes, 0) +
                    ", \"peak_kv_usage\": " + fixed(peak_kv_usage, 4) +
                    ", \"preemptions\": " + std::to_string(stats.num_preemptions) +
                    ", \"peak_memory_bytes\": " + fixed(peak_memory, 0) +
                    ", \"peak_memory_source\": " + json_quote(memory_source) +
                    (memory_before ? ", \"engine_memory_bytes\": " + fixed(engine_memory, 0) +
                                         ", \"device_memory_bytes\": " +
                                         std::to_string(memory_before->total_bytes)
                                   : std::string()) +
                    ", \"max_model_len\": " + std::to_string(resolved.max_model_len) +
                    ", \"max_num_seqs\": " + std::to_string(resolved.max_num_seqs) +
                    ", \"max_num_batched_tokens\": " + std::to_string(resolved.max_num_batched_tokens) +
                    ", \"enforce_eager\": " + (resolved.enforce_eager ? "true" : "false") +
                    ", \"async_scheduling\": " + (resolved.async_scheduling == true ? "true" : "false") +
                    ", \"seed\": " + std::to_string(options.seed) +
                    ", \"load_s\": " + fixed(load_seconds, 3) +
                    ", \"random_weights_s\": " + fixed(weights_seconds, 3) +
                    ", \"engine_start_s\": " + fixed(load_seconds - weights_seconds, 3) +
                    ", \"version\": " + json_quote(build_info().version) +
                    ", \"commit\": " + json_quote(commit ? commit : "unknown") + "}";
    std::cout << j << std::endl;
  } else {
    std::cout << "octavo_bench: " << workload.name << " workload, " << model_source << " "
              << model_name << " (" << spec.architecture << ", " << resolved.dtype << ") on "
              << probe->name() << "; loaded in " << fixed(load_seconds, 1) << " s\n"
              << "  requests " << num_prompts << ", prompt tokens " << grouped(double(prompt_tokens))
              << ", output tokens " << grouped(double(output_tokens))
              << (failed ? ", FAILED " + std::to_string(failed) : std::string()) << "\n"
              << "  wall " << fixed(wall, 2) << " s: " << grouped(double(output_tokens) / wall)
              << " output tok/s, " << grouped(double(prompt_tokens + output_tokens) / wall)
              << " total tok/s\n"
              << "  " << stats.num_steps << " steps (" << stats.async_steps
              << " launched behind the one before): schedule " << fixed(stats.schedule_seconds, 2)
              << " s, execute " << fixed(stats.execute_seconds, 2) << " s, output "
              << fixed(stats.output_seconds, 2) << " s (device wait "
              << fixed(stats.device_wait_seconds, 2) << " s; " << stats.graph_captures
              << " graph captures, " << fixed(stats.graph_capture_seconds, 2) << " s; "
              << stats.startup_graph_captures << " captured at start in "
              << fixed(stats.startup_graph_capture_seconds, 2) << " s)\n"
              << "  TTFT ms: " << stats_text(ttft) << "\n"
              << "  TPOT ms: " << stats_text(tpot) << "\n"
              << "  KV pool " << grouped(resolved.num_kv_blocks) << " blocks x "
              << resolved.block_size << " tokens (" << gib(kv_pool_bytes) << "), peak usage "
              << fixed(100.0 * peak_kv_usage, 1) << "%, " << stats.num_preemptions
              << " preemptions\n";
    if (memory_before) {
      std::cout << "  peak device memory " << gib(peak_memory) << " of "
                << gib(double(memory_before->total_bytes)) << " (engine " << gib(engine_memory)
                << ")\n";
    } else {
      std::cout << "  peak resident memory " << gib(peak_memory) << "\n";
    }
  }
  return failed == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse_args(argc, argv);
  // A program, unlike the library, may print: the engine's lines go to stderr, apart from --json.
  octavo::set_log_sink(octavo::stderr_log_sink());
  try {
    return run(options);
  } catch (const octavo::Error& e) {
    std::cerr << "octavo_bench: error: " << e.what() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "octavo_bench: error: " << e.what() << "\n";
    return 1;
  }
}

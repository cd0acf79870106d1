// AsyncEngine: concurrent submission gives the synchronous Engine's tokens, outputs stream in
// order to callbacks and the queue, abort and shutdown end requests with kAbort outputs and
// return their blocks, errors are synchronous, a failed step fails every request and nothing
// hangs. The model is a tiny random-weight Llama-style decoder on the CPU backend, built here.
//
// Tests that need the loop at a known point pause it inside an output callback (Gate): the loop
// thread runs callbacks between steps, so while one blocks no step runs.
#include <octavo/async_engine.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include <octavo/engine.h>
#include <octavo/error.h>

#include "core/async_engine_testing.h"

namespace octavo {
namespace {

using namespace std::chrono_literals;
constexpr auto kPatience = 30s;  // far beyond any test's need; a deadline instead of a hang

// ---- the tiny model -----------------------------------------------------------------------------

struct TinyModel {
  ModelSpec spec;
  std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>> tensors;
  std::vector<HostTensor> weights() const {
    std::vector<HostTensor> out;
    for (const auto& [name, tensor] : tensors) {
      out.push_back(HostTensor{name, "float32", tensor.first, tensor.second.data()});
    }
    return out;
  }
};

// Llama layout (model_spec.h): 2 layers, GQA 4 query heads over 2 KV heads, SiLU-GLU MLP, rotary.
const TinyModel& tiny_llama() {
  static const TinyModel model = [] {
    TinyModel m;
    ModelSpec& s = m.spec;
    s.architecture = "LlamaForCausalLM";
    s.vocab_size = 96;
    s.hidden_size = 32;
    s.num_layers = 2;
    s.num_heads = 4;
    s.num_kv_heads = 2;
    s.head_dim = 8;
    s.intermediate_size = 48;
    s.max_position_embeddings = 128;
    s.norm_eps = 1e-5f;
    std::mt19937 rng(20261127);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto random = [&](const std::string& name, std::vector<int64_t> shape) {
      int64_t count = 1;
      for (int64_t d : shape) count *= d;
      // Scaled so that every layer keeps O(1) activations and logits are well separated.
      const float scale = 1.0f / std::sqrt(float(shape.back()));
      std::vector<float> data(static_cast<size_t>(count));
      for (float& x : data) x = normal(rng) * scale;
      m.tensors[name] = {std::move(shape), std::move(data)};
    };
    auto ones = [&](const std::string& name, int64_t size) {
      m.tensors[name] = {{size}, std::vector<float>(size_t(size), 1.0f)};
    };
    const int64_t hidden = s.hidden_size, qkv_rows = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim;
    random("embed_tokens.weight", {s.vocab_size, hidden});
    for (int layer = 0; layer < s.num_layers; ++layer) {
      const std::string p = "layers." + std::to_string(layer) + ".";
      ones(p + "input_norm.weight", hidden);
      random(p + "qkv.weight", {qkv_rows, hidden});
      random(p + "o.weight", {hidden, s.num_heads * s.head_dim});
      ones(p + "post_attn_norm.weight", hidden);
      random(p + "gate_up.weight", {2 * s.intermediate_size, hidden});
      random(p + "down.weight", {hidden, s.intermediate_size});
    }
    ones("final_norm.weight", hidden);
    random("lm_head.weight", {s.vocab_size, hidden});
    return m;
  }();
  return model;
}

EngineConfig tiny_config() {
  EngineConfig c;
  c.device = "cpu";
  c.dtype = "float32";
  c.max_model_len = 128;
  c.max_num_seqs = 32;
  c.block_size = 8;
  c.num_kv_blocks = 256;
  return c;
}

std::unique_ptr<AsyncEngine> make_async(const EngineConfig& config = tiny_config()) {
  return std::make_unique<AsyncEngine>(tiny_llama().spec, config, tiny_llama().weights());
}

SamplingParams greedy(int max_tokens) {
  SamplingParams p;
  p.temperature = 0.0f;
  p.max_tokens = max_tokens;
  return p;
}

std::vector<int32_t> random_prompt(std::mt19937& rng, int length) {
  std::uniform_int_distribution<int32_t> token(0, tiny_llama().spec.vocab_size - 1);
  std::vector<int32_t> prompt(static_cast<size_t>(length));
  for (int32_t& t : prompt) t = token(rng);
  return prompt;
}

// ---- collecting outputs ---------------------------------------------------------------------

// Everything one sequence received, checked for order as it arrives.
struct SequenceLog {
  std::vector<int32_t> tokens;
  int index = 0;
  int num_outputs = 0;
  int num_finished = 0;
  bool output_after_finish = false;
  FinishReason finish_reason = FinishReason::kNone;
  std::string error;
};

// Outputs from callbacks (any thread) and from the queue, by (request, sequence).
class Sink {
 public:
  void add(const RequestOutput& out) {
    std::lock_guard<std::mutex> lock(mutex_);
    SequenceLog& log = requests_[out.group_id][out.id];
    if (log.num_finished > 0) log.output_after_finish = true;
    log.tokens.insert(log.tokens.end(), out.new_token_ids.begin(), out.new_token_ids.end());
    log.index = out.index;
    ++log.num_outputs;
    if (out.finished) {
      ++log.num_finished;
      log.finish_reason = out.finish_reason;
      log.error = out.error;
    }
    cv_.notify_all();
  }
  void add_all(const std::vector<RequestOutput>& outputs) {
    for (const RequestOutput& out : outputs) add(out);
  }
  AsyncEngine::OutputCallback callback() {
    return [this](const RequestOutput& out) { add(out); };
  }
  /// Waits until `pred(requests)` holds; false on timeout.
  template <typename Pred>
  bool wait(Pred pred) {
    std::unique_lock<std::mutex> lock(mutex_);
    return cv_.wait_for(lock, kPatience, [&] { return pred(requests_); });
  }
  std::map<RequestId, std::map<RequestId, SequenceLog>> snapshot() {
    std::lock_guard<std::mutex> lock(mutex_);
    return requests_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  std::map<RequestId, std::map<RequestId, SequenceLog>> requests_;  // request -> sequence -> log
};

using Requests = std::map<RequestId, std::map<RequestId, SequenceLog>>;

bool all_finished(const Requests& requests, const std::vector<RequestId>& ids, int sequences = 1) {
  for (RequestId id : ids) {
    auto it = requests.find(id);
    if (it == requests.end() || int(it->second.size()) < sequences) return false;
    for (const auto& [sequence, log] : it->second) {
      if (log.num_finished == 0) return false;
    }
  }
  return true;
}

// Drains the shared queue on its own thread into a Sink until stopped.
class QueueDrain {
 public:
  QueueDrain(AsyncEngine& engine, Sink& sink)
      : thread_([this, &engine, &sink] {
          while (!stop_) sink.add_all(engine.wait_outputs(5ms));
        }) {}
  ~QueueDrain() {
    stop_ = true;
    thread_.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Pauses the loop thread inside an output callback: every output of the gated request waits
// for a permit (none needed once open()).
class Gate {
 public:
  void pass() {
    std::unique_lock<std::mutex> lock(mutex_);
    ++arrived_;
    cv_.notify_all();
    cv_.wait(lock, [&] { return open_ || permits_ > 0; });
    if (!open_) --permits_;
  }
  bool wait_arrived(int count) {
    std::unique_lock<std::mutex> lock(mutex_);
    return cv_.wait_for(lock, kPatience, [&] { return arrived_ >= count; });
  }
  void permit() {
    std::lock_guard<std::mutex> lock(mutex_);
    ++permits_;
    cv_.notify_all();
  }
  void open() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int permits_ = 0;
  bool open_ = false;
};

bool wait_until(const std::function<bool()>& pred) {
  const auto deadline = std::chrono::steady_clock::now() + kPatience;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

// The synchronous Engine's outputs for the same requests, added in the same order:
// request index -> sequence index -> tokens.
std::vector<std::map<int, std::vector<int32_t>>> run_sync(
    const std::vector<std::vector<int32_t>>& prompts, const std::vector<SamplingParams>& params) {
  Engine engine(tiny_llama().spec, tiny_config(), tiny_llama().weights());
  std::map<RequestId, size_t> order;
  for (size_t i = 0; i < prompts.size(); ++i) order[engine.add_request(prompts[i], params[i])] = i;
  std::vector<std::map<int, std::vector<int32_t>>> result(prompts.size());
  while (engine.has_unfinished()) {
    for (const RequestOutput& out : engine.step()) {
      auto& tokens = result[order.at(out.group_id)][out.index];
      tokens.insert(tokens.end(), out.new_token_ids.begin(), out.new_token_ids.end());
    }
  }
  return result;
}

void expect_all_blocks_free(const AsyncEngine& engine) {
  const EngineStats stats = engine.stats();
  EXPECT_EQ(stats.num_running, 0);
  EXPECT_EQ(stats.num_waiting, 0);
  EXPECT_EQ(stats.num_free_kv_blocks, stats.num_kv_blocks);
}

// ---- tests ------------------------------------------------------------------------------------

TEST(AsyncEngine, ConcurrentSubmissionMatchesSynchronousEngine) {
  constexpr int kThreads = 8, kPerThread = 20;
  std::mt19937 rng(7);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<SamplingParams> params;
  for (int i = 0; i < kThreads * kPerThread; ++i) {
    prompts.push_back(random_prompt(rng, 1 + i % 23));
    params.push_back(greedy(1 + i % 9));
  }
  const auto expected = run_sync(prompts, params);

  auto engine = make_async();
  Sink sink;
  QueueDrain drain(*engine, sink);
  // Threads of even rank stream through callbacks, the others through the queue.
  std::vector<std::vector<std::pair<RequestId, int>>> submitted(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < kPerThread; ++k) {
        const int i = t * kPerThread + k;
        AsyncEngine::OutputCallback callback;
        if (t % 2 == 0) callback = [&sink](const RequestOutput& out) { sink.add(out); };
        submitted[t].emplace_back(engine->add_request(prompts[i], params[i], callback), i);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  std::vector<RequestId> ids;
  std::map<RequestId, int> prompt_of;
  for (const auto& list : submitted) {
    for (const auto& [id, i] : list) {
      ids.push_back(id);
      prompt_of[id] = i;
    }
  }
  ASSERT_EQ(prompt_of.size(), size_t(kThreads * kPerThread)) << "ids must be unique";
  ASSERT_TRUE(sink.wait([&](const Requests& r) { return all_finished(r, ids); }));
  ASSERT_TRUE(wait_until([&] { return engine->num_unfinished() == 0; }));

  const Requests got = sink.snapshot();
  for (RequestId id : ids) {
    ASSERT_EQ(got.at(id).size(), 1u);
    const SequenceLog& log = got.at(id).at(id);
    EXPECT_EQ(log.tokens, expected[prompt_of[id]].at(0)) << "request " << id;
    EXPECT_EQ(log.num_finished, 1);
    EXPECT_FALSE(log.output_after_finish);
    EXPECT_EQ(log.finish_reason, FinishReason::kLength);
    EXPECT_EQ(log.num_outputs, int(log.tokens.size())) << "one output per decoded token";
  }
  expect_all_blocks_free(*engine);
  EXPECT_EQ(engine->stats().generation_tokens,
            [&] {
              uint64_t total = 0;
              for (const SamplingParams& p : params) total += uint64_t(*p.max_tokens);
              return total;
            }());
}

TEST(AsyncEngine, ParallelSamplingAndBeamSearchRouteByGroup) {
  std::mt19937 rng(11);
  SamplingParams sampled;
  sampled.n = 3;
  sampled.temperature = 1.0f;
  sampled.seed = 5;
  sampled.max_tokens = 6;
  SamplingParams beams = greedy(4);
  beams.beam_width = 2;
  const std::vector<std::vector<int32_t>> prompts = {random_prompt(rng, 9), random_prompt(rng, 5)};
  const std::vector<SamplingParams> params = {sampled, beams};
  const auto expected = run_sync(prompts, params);

  auto engine = make_async();
  Sink by_callback;
  const RequestId parallel = engine->add_request(prompts[0], sampled, by_callback.callback());
  const RequestId beam = engine->add_request(prompts[1], beams);
  ASSERT_TRUE(by_callback.wait([&](const Requests& r) { return all_finished(r, {parallel}, 3); }));
  std::vector<RequestOutput> beam_outputs;
  ASSERT_TRUE(wait_until([&] {
    for (RequestOutput& out : engine->wait_outputs(1ms)) beam_outputs.push_back(std::move(out));
    return std::count_if(beam_outputs.begin(), beam_outputs.end(),
                         [](const RequestOutput& o) { return o.finished; }) == 2;
  }));
  ASSERT_TRUE(wait_until([&] { return engine->num_unfinished() == 0; }));

  const auto sequences = by_callback.snapshot().at(parallel);
  ASSERT_EQ(sequences.size(), 3u);
  std::map<int, std::vector<int32_t>> by_index;
  for (const auto& [id, log] : sequences) {
    EXPECT_EQ(log.num_finished, 1);
    EXPECT_FALSE(log.output_after_finish);
    by_index[log.index] = log.tokens;
  }
  EXPECT_EQ(by_index, expected[0]);
  std::map<int, std::vector<int32_t>> beam_by_index;
  for (const RequestOutput& out : beam_outputs) {
    EXPECT_EQ(out.group_id, beam);
    beam_by_index[out.index] = out.new_token_ids;
  }
  EXPECT_EQ(beam_by_index, expected[1]);
  expect_all_blocks_free(*engine);
}

TEST(AsyncEngine, RequestFinishesWithItsLastSequence) {
  auto engine = make_async();
  SamplingParams params = greedy(6);
  params.n = 3;
  params.temperature = 1.0f;
  params.seed = 1;
  Sink sink;
  std::map<RequestId, int> tokens;  // the loop thread's only
  std::atomic<int> unfinished_when_one_ended{-1};
  const RequestId id = engine->add_request({7, 8, 9}, params, [&](const RequestOutput& out) {
    sink.add(out);
    if (out.index == 1 && (tokens[out.id] += int(out.new_token_ids.size())) == 2 && !out.finished) {
      engine->abort(out.id, /*whole_group=*/false);  // only this sequence
    }
    if (out.index == 1 && out.finished) unfinished_when_one_ended = engine->num_unfinished();
  });
  ASSERT_TRUE(sink.wait([&](const Requests& r) { return all_finished(r, {id}, 3); }));
  ASSERT_TRUE(wait_until([&] { return engine->num_unfinished() == 0; }));
  EXPECT_EQ(unfinished_when_one_ended.load(), 1) << "two sequences still run";
  const Requests got = sink.snapshot();
  for (const auto& [sequence, log] : got.at(id)) {
    EXPECT_EQ(log.num_finished, 1);
    EXPECT_FALSE(log.output_after_finish);
    EXPECT_EQ(log.finish_reason, log.index == 1 ? FinishReason::kAbort : FinishReason::kLength);
    EXPECT_EQ(log.tokens.size(), log.index == 1 ? 2u : 6u);
  }

  // Aborted right away: before or after the fork, the request ends all the same.
  params.n = 2;
  const RequestId early = engine->add_request({7, 8}, params);
  engine->abort(early);
  std::vector<RequestOutput> outputs;
  ASSERT_TRUE(wait_until([&] {
    for (RequestOutput& out : engine->wait_outputs(1ms)) outputs.push_back(std::move(out));
    return engine->num_unfinished() == 0;
  }));
  for (RequestOutput& out : engine->wait_outputs(0ms)) outputs.push_back(std::move(out));
  for (const RequestOutput& out : outputs) EXPECT_EQ(out.group_id, early);
  EXPECT_FALSE(outputs.empty());
  EXPECT_TRUE(outputs.back().finished);
  EXPECT_EQ(outputs.back().finish_reason, FinishReason::kAbort);
  expect_all_blocks_free(*engine);
}

TEST(AsyncEngine, AbortFromCallbackEndsTheRequestWithinOneStepAndFreesItsBlocks) {
  auto engine = make_async();
  const int total = engine->stats().num_kv_blocks;
  Sink sink;
  std::atomic<int> free_blocks_while_running{-1};
  int tokens = 0;  // the loop thread's only
  std::mt19937 rng(3);
  const RequestId id = engine->add_request(
      random_prompt(rng, 20), greedy(100), [&](const RequestOutput& out) {
        sink.add(out);
        tokens += int(out.new_token_ids.size());
        if (tokens == 3 && !out.finished) {
          free_blocks_while_running = engine->stats().num_free_kv_blocks;
          engine->abort(out.group_id);
        }
      });
  ASSERT_TRUE(sink.wait([&](const Requests& r) { return all_finished(r, {id}); }));
  ASSERT_TRUE(wait_until([&] { return engine->num_unfinished() == 0; }));
  const SequenceLog log = sink.snapshot().at(id).at(id);
  EXPECT_EQ(log.tokens.size(), 3u) << "the abort applies before the next step";
  EXPECT_EQ(log.finish_reason, FinishReason::kAbort);
  EXPECT_TRUE(log.error.empty());
  EXPECT_LT(free_blocks_while_running.load(), total);
  expect_all_blocks_free(*engine);
}

// With async scheduling the engine runs one step ahead of what it delivers: when the gate
// holds the loop after a step's outputs, the next step is already on the device, so B's tokens
// trail its steps by one, and the token its last step computed is discarded by the abort.
void abort_from_another_thread_leaves_other_requests_running(bool async_scheduling) {
  EngineConfig config = tiny_config();
  config.async_scheduling = async_scheduling;
  auto engine = make_async(config);
  Gate gate;
  Sink gated;
  std::mt19937 rng(4);
  const std::vector<int32_t> gate_prompt = random_prompt(rng, 6);
  const RequestId g = engine->add_request(gate_prompt, greedy(12), [&](const RequestOutput& out) {
    gated.add(out);
    if (!out.finished) gate.pass();
  });
  ASSERT_TRUE(gate.wait_arrived(1));  // the loop is paused after G's first token
  const RequestId b = engine->add_request(random_prompt(rng, 10), greedy(100));
  for (int step = 0; step < 3; ++step) {  // three steps: B's prefill and two decodes
    gate.permit();
    ASSERT_TRUE(gate.wait_arrived(2 + step));
  }
  engine->abort(b);
  gate.open();
  std::vector<RequestOutput> b_outputs;
  ASSERT_TRUE(wait_until([&] {
    for (RequestOutput& out : engine->wait_outputs(1ms)) b_outputs.push_back(std::move(out));
    return !b_outputs.empty() && b_outputs.back().finished;
  }));
  const size_t b_tokens = async_scheduling ? 2 : 3;
  ASSERT_EQ(b_outputs.size(), b_tokens + 1);
  for (size_t i = 0; i < b_tokens; ++i) EXPECT_EQ(b_outputs[i].new_token_ids.size(), 1u);
  EXPECT_EQ(b_outputs.back().finish_reason, FinishReason::kAbort);
  EXPECT_TRUE(b_outputs.back().new_token_ids.empty());

  ASSERT_TRUE(gated.wait([&](const Requests& r) { return all_finished(r, {g}); }));
  const SequenceLog log = gated.snapshot().at(g).at(g);
  EXPECT_EQ(log.finish_reason, FinishReason::kLength);
  EXPECT_EQ(log.tokens, run_sync({gate_prompt}, {greedy(12)})[0].at(0));
  ASSERT_TRUE(wait_until([&] { return engine->num_unfinished() == 0; }));
  expect_all_blocks_free(*engine);
  engine->abort(b);  // finished: ignored
  engine->abort(987654);
  EXPECT_TRUE(engine->wait_outputs(0ms).empty());
}

TEST(AsyncEngine, AbortFromAnotherThreadLeavesOtherRequestsRunning) {
  abort_from_another_thread_leaves_other_requests_running(/*async_scheduling=*/false);
}

TEST(AsyncEngine, AbortFromAnotherThreadWithAsyncSchedulingDropsTheTokenInFlight) {
  abort_from_another_thread_leaves_other_requests_running(/*async_scheduling=*/true);
}

TEST(AsyncEngine, ShutdownFinishingInFlightCompletesEverything) {
  auto engine = make_async();
  Sink sink;
  std::mt19937 rng(5);
  std::vector<RequestId> ids;
  for (int i = 0; i < 10; ++i) {
    AsyncEngine::OutputCallback callback;
    if (i % 2 == 0) callback = sink.callback();
    ids.push_back(engine->add_request(random_prompt(rng, 3 + i), greedy(10), callback));
  }
  engine->shutdown(/*finish_in_flight=*/true);
  EXPECT_EQ(engine->num_unfinished(), 0);
  sink.add_all(engine->wait_outputs(0ms));
  const Requests got = sink.snapshot();
  ASSERT_TRUE(all_finished(got, ids));
  for (RequestId id : ids) {
    EXPECT_EQ(got.at(id).at(id).finish_reason, FinishReason::kLength);
    EXPECT_EQ(got.at(id).at(id).tokens.size(), 10u);
  }
  expect_all_blocks_free(*engine);

  EXPECT_THROW(engine->add_request({1, 2, 3}, greedy(4)), Error);
  engine->abort(ids[0]);  // ignored
  const auto start = std::chrono::steady_clock::now();
  EXPECT_TRUE(engine->wait_outputs(10s).empty());
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s) << "a stopped engine does not wait";
  engine->shutdown(true);  // idempotent
  engine->shutdown(false);
}

TEST(AsyncEngine, ShutdownWithoutFinishingAbortsEverything) {
  auto engine = make_async();
  Gate gate;
  Sink sink;
  std::mt19937 rng(6);
  std::vector<RequestId> ids;
  ids.push_back(engine->add_request(random_prompt(rng, 4), greedy(100), [&](const RequestOutput& out) {
    sink.add(out);
    if (!out.finished) gate.pass();
  }));
  ASSERT_TRUE(gate.wait_arrived(1));
  for (int i = 0; i < 9; ++i) {
    AsyncEngine::OutputCallback callback;
    if (i % 2 == 0) callback = sink.callback();
    SamplingParams params = greedy(100);
    if (i == 4) params.n = 3;
    ids.push_back(engine->add_request(random_prompt(rng, 5 + i), params, callback));
  }
  for (int step = 0; step < 2; ++step) {  // everyone has tokens now
    gate.permit();
    ASSERT_TRUE(gate.wait_arrived(2 + step));
  }
  std::thread stopper([&] { engine->shutdown(/*finish_in_flight=*/false); });
  // The loop is paused, so these land either before shutdown (and are aborted with the rest)
  // or are refused: the probe ends when shutdown has begun.
  std::vector<RequestId> late;
  ASSERT_TRUE(wait_until([&] {
    try {
      late.push_back(engine->add_request({1, 2}, greedy(100)));
      return false;
    } catch (const Error&) {
      return true;
    }
  }));
  gate.open();
  stopper.join();

  EXPECT_EQ(engine->num_unfinished(), 0);
  sink.add_all(engine->wait_outputs(0ms));
  ids.insert(ids.end(), late.begin(), late.end());
  const Requests got = sink.snapshot();
  ASSERT_TRUE(all_finished(got, ids));
  for (RequestId id : ids) {
    for (const auto& [sequence, log] : got.at(id)) {
      EXPECT_EQ(log.finish_reason, FinishReason::kAbort) << "request " << id;
      EXPECT_EQ(log.num_finished, 1);
      EXPECT_FALSE(log.output_after_finish);
      EXPECT_LT(log.tokens.size(), 100u);
    }
  }
  EXPECT_EQ(got.at(ids[5]).size(), 3u) << "each forked sequence ends with its own output";
  expect_all_blocks_free(*engine);
}

TEST(AsyncEngine, InvalidRequestsThrowAtSubmission) {
  auto engine = make_async();
  SamplingParams bad_top_p = greedy(4);
  bad_top_p.top_p = 0.0f;
  SamplingParams too_many = greedy(4);
  too_many.n = 33;
  EXPECT_THROW(engine->add_request({}, greedy(4)), InvalidArgument);
  EXPECT_THROW(engine->add_request({1, 96}, greedy(4)), InvalidArgument);
  EXPECT_THROW(engine->add_request(std::vector<int32_t>(128, 1), greedy(4)), InvalidArgument);
  EXPECT_THROW(engine->add_request({1}, bad_top_p), InvalidArgument);
  EXPECT_THROW(engine->add_request({1}, too_many), InvalidArgument);
  EXPECT_EQ(engine->num_unfinished(), 0);
  EXPECT_TRUE(engine->wait_outputs(0ms).empty());
  // The engine goes on serving.
  const RequestId id = engine->add_request({1, 2, 3}, greedy(3));
  std::vector<RequestOutput> outputs;
  ASSERT_TRUE(wait_until([&] {
    for (RequestOutput& out : engine->wait_outputs(1ms)) outputs.push_back(std::move(out));
    return !outputs.empty() && outputs.back().finished;
  }));
  EXPECT_EQ(outputs.size(), 3u);
  for (const RequestOutput& out : outputs) EXPECT_EQ(out.group_id, id);
}

TEST(AsyncEngine, FailedStepAbortsEveryRequestAndRefusesNewOnes) {
  auto engine = make_async();
  Gate gate;
  Sink sink;
  std::mt19937 rng(8);
  std::vector<RequestId> ids;
  ids.push_back(engine->add_request(random_prompt(rng, 4), greedy(50), [&](const RequestOutput& out) {
    sink.add(out);
    if (!out.finished) gate.pass();
  }));
  ASSERT_TRUE(gate.wait_arrived(1));
  SamplingParams forking = greedy(50);
  forking.n = 2;
  ids.push_back(engine->add_request(random_prompt(rng, 7), forking));  // not stepped yet
  ids.push_back(engine->add_request(random_prompt(rng, 9), greedy(50), sink.callback()));
  AsyncEngineTesting::fail_next_step(*engine, "simulated device failure");
  gate.open();
  std::vector<RequestOutput> queued;
  ASSERT_TRUE(wait_until([&] {
    for (RequestOutput& out : engine->wait_outputs(1ms)) queued.push_back(std::move(out));
    return engine->num_unfinished() == 0;
  }));
  sink.add_all(queued);
  sink.add_all(engine->wait_outputs(0ms));
  const Requests got = sink.snapshot();
  ASSERT_TRUE(all_finished(got, ids));
  for (RequestId id : ids) {
    for (const auto& [sequence, log] : got.at(id)) {
      EXPECT_EQ(log.finish_reason, FinishReason::kAbort);
      EXPECT_EQ(log.error, "simulated device failure");
      EXPECT_EQ(log.num_finished, 1);
    }
  }
  try {
    engine->add_request({1, 2, 3}, greedy(4));
    ADD_FAILURE() << "add_request after a failed step must throw";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "simulated device failure");
  }
  engine->abort(ids[0]);  // ignored
  const auto start = std::chrono::steady_clock::now();
  engine->shutdown(true);  // nothing left to finish: returns at once
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
}

TEST(AsyncEngine, ThrowingCallbackAbortsOnlyItsRequest) {
  auto engine = make_async();
  std::atomic<int> calls{0};
  std::mt19937 rng(9);
  const RequestId bad = engine->add_request(random_prompt(rng, 5), greedy(60),
                                            [&](const RequestOutput&) {
                                              ++calls;
                                              throw std::runtime_error("callback bug");
                                            });
  const std::vector<int32_t> good_prompt = random_prompt(rng, 6);
  const RequestId good = engine->add_request(good_prompt, greedy(8));
  std::vector<int32_t> tokens;
  auto drain = [&](std::chrono::milliseconds timeout) {
    for (const RequestOutput& out : engine->wait_outputs(timeout)) {
      EXPECT_EQ(out.group_id, good);
      tokens.insert(tokens.end(), out.new_token_ids.begin(), out.new_token_ids.end());
    }
  };
  ASSERT_TRUE(wait_until([&] {
    drain(1ms);
    return engine->num_unfinished() == 0;
  }));
  drain(0ms);  // what was queued between the last drain and the count reaching 0
  EXPECT_EQ(calls.load(), 1);
  EXPECT_EQ(engine->stats().generation_tokens, 1u + 8u) << "aborted after its first token";
  EXPECT_EQ(tokens, run_sync({good_prompt}, {greedy(8)})[0].at(0));
  expect_all_blocks_free(*engine);
  (void)bad;
}

TEST(AsyncEngine, ShutdownFromACallbackThrows) {
  auto engine = make_async();
  std::atomic<bool> threw{false};
  Sink sink;
  const RequestId id = engine->add_request({4, 5, 6}, greedy(2), [&](const RequestOutput& out) {
    if (!out.finished) {
      try {
        engine->shutdown(true);
      } catch (const Error&) {
        threw = true;
      }
    }
    sink.add(out);
  });
  ASSERT_TRUE(sink.wait([&](const Requests& r) { return all_finished(r, {id}); }));
  EXPECT_TRUE(threw.load());
  EXPECT_EQ(sink.snapshot().at(id).at(id).finish_reason, FinishReason::kLength);
}

TEST(AsyncEngine, DestructorWithWorkInFlightAbortsAndReturns) {
  Sink sink;
  std::vector<RequestId> with_callback;
  std::atomic<bool> destroyed{false};
  // A watchdog, so that a hang fails the test instead of stalling the suite.
  std::thread watchdog([&] {
    const auto deadline = std::chrono::steady_clock::now() + kPatience;
    while (!destroyed && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(5ms);
    if (!destroyed) {
      ADD_FAILURE() << "~AsyncEngine did not return";
      std::_Exit(1);
    }
  });
  {
    auto engine = make_async();
    std::mt19937 rng(10);
    for (int i = 0; i < 20; ++i) {
      AsyncEngine::OutputCallback callback;
      if (i % 2 == 0) callback = sink.callback();
      const RequestId id = engine->add_request(random_prompt(rng, 4 + i), greedy(120), callback);
      if (i % 2 == 0) with_callback.push_back(id);
    }
  }
  destroyed = true;
  watchdog.join();
  const Requests got = sink.snapshot();
  EXPECT_TRUE(all_finished(got, with_callback)) << "callbacks receive their final output";
  for (RequestId id : with_callback) {
    EXPECT_EQ(got.at(id).at(id).finish_reason, FinishReason::kAbort);
  }
}

TEST(AsyncEngine, ConstructorErrorsPropagate) {
  EngineConfig config = tiny_config();
  config.block_size = 3;
  EXPECT_THROW(AsyncEngine(tiny_llama().spec, config, tiny_llama().weights()), InvalidArgument);
  std::vector<HostTensor> missing = tiny_llama().weights();
  missing.pop_back();
  EXPECT_THROW(AsyncEngine(tiny_llama().spec, tiny_config(), missing), Error);
  auto engine = make_async();
  EXPECT_EQ(engine->config().num_kv_blocks, 256);
  EXPECT_EQ(engine->spec().vocab_size, 96);
}

}  // namespace
}  // namespace octavo

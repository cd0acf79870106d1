// async_client: serves an exported model (`octavo export HF_DIR OUT_DIR`) through
// octavo::AsyncEngine to several submitting threads, and checks each request's streamed tokens
// against the ones a file expects (tests/python/test_export.py writes that file from
// LLM.generate's greedy output).
//
//   async_client MODEL_DIR EXPECTED_FILE [--threads N] [--repeat R] [--device D]
//
// EXPECTED_FILE holds one request per line, "prompt ids ; expected output ids", '#' comments.
// Every request runs greedily with ignore_eos for as many tokens as it expects. Exit status: 0
// when every request streamed exactly its expected tokens, 1 when any differs, 2 on an error.
#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <future>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <octavo/async_engine.h>
#include <octavo/error.h>
#include <octavo/log.h>
#include <octavo/model_dir.h>

namespace {

struct Expected {
  int line = 0;
  std::vector<int32_t> prompt;
  std::vector<int32_t> output;
};

std::vector<int32_t> parse_ids(const std::string& text, const std::string& where) {
  std::istringstream in(text);
  std::vector<int32_t> ids;
  long long id = 0;
  while (in >> id) ids.push_back(int32_t(id));
  if (!in.eof()) throw std::runtime_error(where + ": expected token ids, found '" + text + "'");
  return ids;
}

std::vector<Expected> read_expected(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<Expected> requests;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.empty() || line[0] == '#') continue;
    const size_t split = line.find(';');
    const std::string where = path + ":" + std::to_string(number);
    if (split == std::string::npos) throw std::runtime_error(where + ": no ';' between prompt and output");
    Expected e{number, parse_ids(line.substr(0, split), where), parse_ids(line.substr(split + 1), where)};
    if (e.prompt.empty() || e.output.empty()) throw std::runtime_error(where + ": empty prompt or output");
    requests.push_back(std::move(e));
  }
  if (requests.empty()) throw std::runtime_error(path + " holds no request");
  return requests;
}

// What one request streamed: filled by the callback on the engine's loop thread, read by the
// submitting thread once `done` is set.
struct Stream {
  std::vector<int32_t> tokens;
  octavo::FinishReason finish_reason = octavo::FinishReason::kNone;
  std::string error;
  std::promise<void> done;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: async_client MODEL_DIR EXPECTED_FILE [--threads N] [--repeat R] [--device D]\n";
    return 2;
  }
  int num_threads = 4, repeat = 1;
  octavo::EngineConfig config;
  config.model = argv[1];
  config.num_kv_blocks = 256;  // a small model: a fixed pool instead of 4 GiB of host memory
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--threads") num_threads = std::max(1, std::atoi(argv[i + 1]));
    else if (flag == "--repeat") repeat = std::max(1, std::atoi(argv[i + 1]));
    else if (flag == "--device") config.device = argv[i + 1];
    else {
      std::cerr << "async_client: unknown flag " << flag << "\n";
      return 2;
    }
  }
  octavo::set_log_sink(octavo::stderr_log_sink());  // a program may print; the library does not

  try {
    const std::vector<Expected> expected = read_expected(argv[2]);
    const size_t total = expected.size() * size_t(repeat);
    // Declared before the engine, so that it outlives the callbacks writing into it (the engine's
    // destructor aborts what is still in flight and delivers those last outputs).
    std::vector<Stream> streams(total);
    std::unique_ptr<octavo::AsyncEngine> engine;
    {
      // The mapping is needed only while the engine copies the weights.
      octavo::MappedModelDir model(config);
      engine = std::make_unique<octavo::AsyncEngine>(model.spec(), model.config(), model.weights());
    }

    // Request k (each expected line `repeat` times) is submitted by thread k % num_threads; all
    // threads submit at once while the loop thread is already stepping earlier requests.
    std::vector<std::thread> submitters;
    std::vector<std::string> submit_errors(static_cast<size_t>(num_threads));
    for (int t = 0; t < num_threads; ++t) {
      submitters.emplace_back([&, t] {
        try {
          for (size_t k = size_t(t); k < total; k += size_t(num_threads)) {
            const Expected& e = expected[k % expected.size()];
            octavo::SamplingParams params;
            params.temperature = 0.0f;
            params.max_tokens = int(e.output.size());
            params.ignore_eos = true;
            Stream& stream = streams[k];
            engine->add_request(e.prompt, params, [&stream](const octavo::RequestOutput& out) {
              stream.tokens.insert(stream.tokens.end(), out.new_token_ids.begin(), out.new_token_ids.end());
              if (!out.finished) return;
              stream.finish_reason = out.finish_reason;
              stream.error = out.error;
              stream.done.set_value();
            });
          }
          for (size_t k = size_t(t); k < total; k += size_t(num_threads)) streams[k].done.get_future().wait();
        } catch (const std::exception& e) {
          submit_errors[size_t(t)] = e.what();
        }
      });
    }
    for (std::thread& t : submitters) t.join();
    for (const std::string& error : submit_errors) {
      if (!error.empty()) throw std::runtime_error("submitting failed: " + error);
    }
    engine->shutdown(/*finish_in_flight=*/true);

    int mismatches = 0;
    size_t tokens = 0;
    for (size_t k = 0; k < total; ++k) {
      const Expected& e = expected[k % expected.size()];
      const Stream& s = streams[k];
      tokens += s.tokens.size();
      if (s.tokens == e.output && s.finish_reason == octavo::FinishReason::kLength) continue;
      ++mismatches;
      size_t at = 0;
      while (at < s.tokens.size() && at < e.output.size() && s.tokens[at] == e.output[at]) ++at;
      std::cout << "request " << k << " (line " << e.line << "): tokens differ from position " << at
                << " (got " << s.tokens.size() << " tokens, finish reason '"
                << octavo::to_string(s.finish_reason) << "'" << (s.error.empty() ? "" : ", error: " + s.error)
                << ")\n";
    }
    std::cout << "async_client: " << total << " requests from " << num_threads << " threads, "
              << tokens << " tokens; " << (mismatches ? std::to_string(mismatches) + " differ"
                                                      : std::string("all as expected"))
              << "\n";
    return mismatches ? 1 : 0;
  } catch (const octavo::Error& e) {
    std::cerr << "async_client: octavo error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "async_client: " << e.what() << "\n";
    return 2;
  }
}

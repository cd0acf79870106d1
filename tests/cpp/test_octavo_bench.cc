// octavo_bench's workloads draw exactly what bench/throughput.py draws. The expected values come
// from CPython 3.11's random module:
//   r = random.Random(0); L = [(r.randint(100, 1024), r.randint(100, 1024)) for _ in range(256)]
//   t = random.Random(1); P = [[t.randrange(151936) for _ in range(i)] for i, _ in L]
#include <gtest/gtest.h>

#include <numeric>

#include "bench_workload.h"
#include "python_random.h"

namespace octavo::bench {
namespace {

TEST(PythonRandom, MatchesCPython) {
  PythonRandom big(12345678901234567890ull);  // a two-word seed key
  const uint32_t expected_bits[] = {2199100970u, 3695432519u, 4002396509u, 2348474455u};
  for (uint32_t bits : expected_bits) EXPECT_EQ(big.getrandbits(32), bits);

  PythonRandom r(12345678901234567890ull);
  const int64_t expected_ints[] = {8, 8, 10, 7, 5};  // randint(0, 10)
  for (int64_t v : expected_ints) EXPECT_EQ(r.randint(0, 10), v);
  // randint(1, 1) still draws (getrandbits(1) until it is 0), as CPython does.
  EXPECT_EQ(r.randint(1, 1), 1);
  EXPECT_EQ(r.randint(1, 1), 1);
  EXPECT_EQ(r.randbelow(2147483647), 1227085266u);
  EXPECT_THROW(r.randint(3, 2), std::invalid_argument);
}

TEST(Workload, NanoIsThroughputPysWorkload) {
  const Workload nano = named_workload("nano");
  EXPECT_EQ(nano.num_prompts, 256);
  const std::vector<BenchRequest> requests =
      make_requests(0, nano.num_prompts, nano.input, nano.output, 151936);
  ASSERT_EQ(requests.size(), 256u);
  EXPECT_EQ(requests[0].prompt_token_ids.size(), 964u);
  EXPECT_EQ(requests[0].output_len, 494);
  EXPECT_EQ(requests[1].prompt_token_ids.size(), 876u);
  EXPECT_EQ(requests[1].output_len, 1011);
  int64_t prompt_tokens = 0, output_tokens = 0, token_sum = 0, longest = 0;
  for (const BenchRequest& r : requests) {
    prompt_tokens += int64_t(r.prompt_token_ids.size());
    output_tokens += r.output_len;
    token_sum = std::accumulate(r.prompt_token_ids.begin(), r.prompt_token_ids.end(), token_sum);
    longest = std::max<int64_t>(longest, int64_t(r.prompt_token_ids.size()) + r.output_len);
  }
  EXPECT_EQ(prompt_tokens, 148194);
  EXPECT_EQ(output_tokens, 140797);
  EXPECT_EQ(longest, 1935);  // max_model_len 1936
  EXPECT_EQ(token_sum, 11272675608);
  const std::vector<int32_t> first = {35222, 149213, 16543, 66864, 30911};
  EXPECT_EQ(std::vector<int32_t>(requests[0].prompt_token_ids.begin(),
                                 requests[0].prompt_token_ids.begin() + 5), first);
  const std::vector<int32_t> last = {58326, 124860, 61548};
  EXPECT_EQ(std::vector<int32_t>(requests[255].prompt_token_ids.end() - 3,
                                 requests[255].prompt_token_ids.end()), last);
  EXPECT_EQ(requests[17].seed, 17u);
}

TEST(Workload, Llama8bLengths) {
  const Workload w = named_workload("llama8b");
  const std::vector<BenchRequest> requests = make_requests(0, w.num_prompts, w.input, w.output, 128256);
  int64_t prompt_tokens = 0, output_tokens = 0;
  for (const BenchRequest& r : requests) {
    prompt_tokens += int64_t(r.prompt_token_ids.size());
    output_tokens += r.output_len;
  }
  EXPECT_EQ(prompt_tokens, 282499);
  EXPECT_EQ(output_tokens, 290614);
  EXPECT_THROW(named_workload("huge"), std::invalid_argument);
}

TEST(Workload, NamedModelsAreValid) {
  for (const char* name : {"qwen3-0.6b", "llama-3.1-8b"}) {
    std::optional<ModelSpec> spec = named_model_spec(name);
    ASSERT_TRUE(spec.has_value()) << name;
    EXPECT_NO_THROW(spec->validate());
  }
  EXPECT_FALSE(named_model_spec("gpt-5").has_value());
}

TEST(Workload, PercentilesInterpolateAsNumpy) {
  const std::vector<double> v = {1, 2, 3, 4, 10};
  EXPECT_DOUBLE_EQ(percentile(v, 50), 3.0);
  EXPECT_DOUBLE_EQ(percentile(v, 90), 7.6);  // numpy.percentile([1,2,3,4,10], 90)
  EXPECT_DOUBLE_EQ(percentile(v, 100), 10.0);
  EXPECT_DOUBLE_EQ(percentile({5.0}, 99), 5.0);
}

}  // namespace
}  // namespace octavo::bench

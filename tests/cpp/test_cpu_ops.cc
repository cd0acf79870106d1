// The CPU reference backend against naive double-precision references written here, plus the
// error paths of each op. backend/cpu is the oracle for the GPU kernels, so these references are
// deliberately the dumbest possible loops, indexing the documented layouts directly.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numbers>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <octavo/error.h>
#include <octavo/model_spec.h>

#include "backend/cpu/dtype.h"
#include "backend/sampling_rng.h"
#include "backend/ops.h"
#include "model/rope.h"

namespace octavo {
namespace {

using cpu::bf16_to_float;
using cpu::float_bits;
using cpu::float_to_bf16;
using cpu::float_to_fp16;
using cpu::fp16_to_float;

constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

std::vector<float> random_floats(size_t count, std::mt19937& rng, float lo = -1.0f,
                                 float hi = 1.0f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> values(count);
  for (float& v : values) v = dist(rng);
  return values;
}

/// An array stored in `dtype`, and the values as stored (rounded) back in fp32: what the op reads.
struct TypedArray {
  DType dtype;
  std::vector<float> f32;
  std::vector<uint16_t> f16;  // fp16 or bf16 bits
  std::vector<float> rounded;

  TypedArray(const std::vector<float>& values, DType type) : dtype(type), rounded(values.size()) {
    if (dtype == DType::kFloat32) {
      f32 = values;
    } else {
      f16.resize(values.size());
    }
    for (size_t i = 0; i < values.size(); ++i) {
      cpu::store_element(data(), dtype, int64_t(i), values[i]);
      rounded[i] = cpu::load_element(data(), dtype, int64_t(i));
    }
  }
  void* data() {
    return dtype == DType::kFloat32 ? static_cast<void*>(f32.data())
                                    : static_cast<void*>(f16.data());
  }
  const void* data() const {
    return dtype == DType::kFloat32 ? static_cast<const void*>(f32.data())
                                    : static_cast<const void*>(f16.data());
  }
};

/// Runs `call`, expects InvalidArgument, and checks its message contains every fragment.
void expect_invalid(const std::function<void()>& call, const std::vector<std::string>& fragments) {
  try {
    call();
    ADD_FAILURE() << "expected InvalidArgument";
  } catch (const InvalidArgument& error) {
    const std::string message = error.what();
    for (const std::string& fragment : fragments) {
      EXPECT_NE(message.find(fragment), std::string::npos)
          << "message \"" << message << "\" lacks \"" << fragment << "\"";
    }
  }
}

// ---- dtype conversions --------------------------------------------------------------------

#ifdef __FLT16_MAX__
uint16_t compiler_half_bits(float value) {
  const _Float16 half = static_cast<_Float16>(value);
  uint16_t bits;
  std::memcpy(&bits, &half, sizeof bits);
  return bits;
}

TEST(DType, Fp16ToFloatMatchesCompilerHalfForEveryValue) {
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {
    _Float16 half;
    const uint16_t narrow = uint16_t(bits);
    std::memcpy(&half, &narrow, sizeof half);
    const float expected = static_cast<float>(half);
    const float actual = fp16_to_float(narrow);
    if (std::isnan(expected)) {
      EXPECT_TRUE(std::isnan(actual)) << std::hex << bits;
    } else {
      ASSERT_EQ(float_bits(actual), float_bits(expected)) << std::hex << bits;
    }
  }
}

TEST(DType, FloatToFp16MatchesCompilerHalfOnTiesNeighboursAndRandomBits) {
  std::vector<float> probes = {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, 1e9f, -1e9f,
                               INFINITY, -INFINITY, 0x1p-24f, 0x1p-25f, 0x1.000002p-25f,
                               0x1p-26f, 0x1.8p-24f, 0x1p-14f, 0x1.ffcp-15f, 3.0e-8f};
  // Every value halfway between consecutive finite halves (the ties), and a float-ulp each side.
  for (uint32_t bits = 0; bits < 0x7c00; ++bits) {
    const double lo = fp16_to_float(uint16_t(bits));
    const double hi = fp16_to_float(uint16_t(bits + 1));
    const float mid = float((lo + hi) / 2);
    for (float v : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)}) {
      probes.push_back(v);
      probes.push_back(-v);
    }
  }
  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) probes.push_back(cpu::bits_float(uint32_t(rng())));
  for (float v : probes) {
    if (std::isnan(v)) {
      EXPECT_TRUE(std::isnan(fp16_to_float(float_to_fp16(v))));
      continue;
    }
    ASSERT_EQ(float_to_fp16(v), compiler_half_bits(v)) << std::hexfloat << v;
  }
}
#endif

TEST(DType, Fp16KnownValues) {
  EXPECT_EQ(float_to_fp16(1.0f), 0x3c00);
  EXPECT_EQ(float_to_fp16(-2.0f), 0xc000);
  EXPECT_EQ(float_to_fp16(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_fp16(65520.0f), 0x7c00);       // tie above the largest half: to inf
  EXPECT_EQ(float_to_fp16(0x1p-24f), 0x0001);       // smallest subnormal
  EXPECT_EQ(float_to_fp16(0x1p-25f), 0x0000);       // tie to even zero
  EXPECT_EQ(float_to_fp16(0x1.8p-24f), 0x0002);     // 1.5 units: tie to even 2
  EXPECT_EQ(float_to_fp16(1.0f + 0x1p-11f), 0x3c00);  // tie at 1: to even
  EXPECT_EQ(float_to_fp16(1.0f + 0x1.8p-10f), 0x3c02);
  EXPECT_TRUE(std::isnan(fp16_to_float(float_to_fp16(NAN))));
  EXPECT_EQ(fp16_to_float(0x0001), 0x1p-24f);
  EXPECT_EQ(fp16_to_float(0x7c00), INFINITY);
}

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(float_to_bf16(cpu::bits_float(0x3f808000u)), 0x3f80);  // tie, even below
  EXPECT_EQ(float_to_bf16(cpu::bits_float(0x3f818000u)), 0x3f82);  // tie, even above
  EXPECT_EQ(float_to_bf16(cpu::bits_float(0x3f808001u)), 0x3f81);
  EXPECT_EQ(float_to_bf16(cpu::bits_float(0x3f807fffu)), 0x3f80);
  EXPECT_EQ(float_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(float_to_bf16(INFINITY), 0x7f80);
  EXPECT_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds to inf
  EXPECT_EQ(float_to_bf16(cpu::bits_float(0x00018000u)), 0x0002);       // subnormal tie
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(cpu::bits_float(0x7f800001u)))));
  for (uint32_t bits = 0; bits <= 0xffff; ++bits) {  // every bf16 survives the round trip
    const float value = bf16_to_float(uint16_t(bits));
    if (!std::isnan(value)) {
      ASSERT_EQ(float_to_bf16(value), bits);
    }
  }
}

// ---- embedding ----------------------------------------------------------------------------

TEST(Embedding, MatchesScaledTablePlusLearnedPositions) {
  std::mt19937 rng(1);
  const int vocab = 37, hidden = 48, tokens = 9, num_positions = 20, offset = 2;
  for (DType dtype : kAllDTypes) {
    for (bool learned : {false, true}) {
      TypedArray table(random_floats(size_t(vocab) * hidden, rng), dtype);
      TypedArray positions(random_floats(size_t(num_positions) * hidden, rng), dtype);
      std::vector<int32_t> ids = {0, 36, 5, 5, 17, 1, 2, 30, 12};
      std::vector<int32_t> position_ids = {0, 1, 2, 3, 4, 5, 6, 17, 10};
      std::vector<float> out(size_t(tokens) * hidden, -7.0f);
      EmbeddingParams p{};
      p.token_ids = ids.data();
      p.table = table.data();
      p.position_ids = position_ids.data();
      p.positions = learned ? positions.data() : nullptr;
      p.out = out.data();
      p.num_tokens = tokens;
      p.hidden = hidden;
      p.vocab_size = vocab;
      p.num_positions = num_positions;
      p.position_offset = offset;
      p.scale = 1.7f;
      p.weight_dtype = dtype;
      p.act_dtype = DType::kFloat32;
      cpu::embedding(p);
      for (int t = 0; t < tokens; ++t) {
        for (int i = 0; i < hidden; ++i) {
          double expected = double(table.rounded[ids[t] * hidden + i]) * 1.7f;
          if (learned) expected += positions.rounded[(position_ids[t] + offset) * hidden + i];
          ASSERT_NEAR(out[t * hidden + i], expected, 1e-6) << t << "," << i;
        }
      }
    }
  }
}

TEST(Embedding, RejectsTokenOutsideVocabAndPositionOutsideTable) {
  std::vector<float> table(10 * 4), out(2 * 4), positions(5 * 4);
  std::vector<int32_t> ids = {3, 10}, position_ids = {0, 4};
  EmbeddingParams p{};
  p.token_ids = ids.data();
  p.table = table.data();
  p.position_ids = position_ids.data();
  p.out = out.data();
  p.num_tokens = 2;
  p.hidden = 4;
  p.vocab_size = 10;
  p.num_positions = 5;
  p.scale = 1.0f;
  p.weight_dtype = DType::kFloat32;
  p.act_dtype = DType::kFloat32;
  expect_invalid([&] { cpu::embedding(p); }, {"token id 10", "10 tokens"});
  ids[1] = -1;
  expect_invalid([&] { cpu::embedding(p); }, {"token id -1"});
  ids[1] = 9;
  p.positions = positions.data();
  p.position_offset = 1;  // 4 + 1 is outside the 5 rows
  expect_invalid([&] { cpu::embedding(p); }, {"position 4", "5 learned positions"});
  p.positions = nullptr;
  p.act_dtype = DType::kBFloat16;
  expect_invalid([&] { cpu::embedding(p); }, {"bfloat16", "float32"});
}

// ---- norm ---------------------------------------------------------------------------------

std::vector<double> reference_norm(const std::vector<double>& x, NormKind kind,
                                   const std::vector<float>& weight, const std::vector<float>* bias,
                                   double eps) {
  const size_t n = x.size();
  std::vector<double> y(n);
  if (kind == NormKind::kRMSNorm || kind == NormKind::kRMSNormPlusOne) {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / n + eps);
    for (size_t i = 0; i < n; ++i) {
      const double w = kind == NormKind::kRMSNorm ? weight[i] : 1.0 + weight[i];
      y[i] = x[i] * inv * w;
    }
  } else {
    double mean = 0;
    for (double v : x) mean += v;
    mean /= n;
    double var = 0;
    for (double v : x) var += (v - mean) * (v - mean);
    var /= n;
    const double inv = 1.0 / std::sqrt(var + eps);
    for (size_t i = 0; i < n; ++i) {
      y[i] = (x[i] - mean) * inv;
      if (kind == NormKind::kLayerNorm) {
        y[i] = y[i] * weight[i] + (bias ? (*bias)[i] : 0.0);
      }
    }
  }
  return y;
}

TEST(Norm, EveryKindWithAndWithoutResidualStridedAndInPlace) {
  std::mt19937 rng(2);
  const NormKind kinds[] = {NormKind::kRMSNorm, NormKind::kRMSNormPlusOne, NormKind::kLayerNorm,
                            NormKind::kLayerNormNoWeight};
  for (int hidden : {48, 7}) {
    const int rows = 5;
    const int64_t stride = hidden + 5;
    for (NormKind kind : kinds) {
      for (DType dtype : kAllDTypes) {
        for (bool with_residual : {false, true}) {
          for (bool with_bias : {false, true}) {
            for (bool in_place : {false, true}) {
              std::vector<float> in = random_floats(rows * stride, rng, -3.0f, 3.0f);
              std::vector<float> residual = random_floats(size_t(rows) * hidden, rng);
              TypedArray weight(random_floats(hidden, rng, 0.5f, 1.5f), dtype);
              TypedArray bias(random_floats(hidden, rng), dtype);
              std::vector<float> out(rows * stride, 99.0f);
              const std::vector<float> in_before = in, residual_before = residual;
              NormParams p{};
              p.in = in.data();
              p.residual = with_residual ? residual.data() : nullptr;
              p.out = in_place ? in.data() : out.data();
              p.weight = kind == NormKind::kLayerNormNoWeight ? nullptr : weight.data();
              p.bias = with_bias ? bias.data() : nullptr;
              p.rows = rows;
              p.hidden = hidden;
              p.row_stride = stride;
              p.eps = 1e-5f;
              p.kind = uint8_t(kind);
              p.weight_dtype = dtype;
              p.act_dtype = DType::kFloat32;
              cpu::norm(p);
              const std::vector<float>& result = in_place ? in : out;
              for (int r = 0; r < rows; ++r) {
                std::vector<double> x(hidden);
                for (int i = 0; i < hidden; ++i) {
                  x[i] = in_before[r * stride + i];
                  if (with_residual) {
                    x[i] = float(residual_before[r * hidden + i] + in_before[r * stride + i]);
                    ASSERT_EQ(residual[r * hidden + i], float(x[i]));
                  }
                }
                const std::vector<double> y = reference_norm(
                    x, kind, weight.rounded, with_bias ? &bias.rounded : nullptr, 1e-5);
                for (int i = 0; i < hidden; ++i) {
                  ASSERT_NEAR(result[r * stride + i], y[i], 2e-6 * (1 + std::abs(y[i])))
                      << "kind " << int(kind) << " hidden " << hidden << " row " << r;
                }
                // The gap between rows is neither read into the result nor written.
                for (int64_t i = hidden; i < stride && r + 1 < rows; ++i) {
                  ASSERT_EQ(result[r * stride + i], in_place ? in_before[r * stride + i] : 99.0f);
                }
              }
            }
          }
        }
      }
    }
  }
}

TEST(Norm, GroupedRowsInsideWiderRowsLeaveEverythingElseUntouched) {
  // The QK norm layout: q's heads, then k's, of a fused [tokens, q | k | v] matrix, normalised in
  // place per head. row_stride > hidden puts gaps inside a group too; `width` ends with a gap.
  std::mt19937 rng(12);
  const int tokens = 4, head_dim = 6, row_stride = 7, heads = 3, kv_heads = 2;
  const int q_size = heads * row_stride, kv_size = kv_heads * row_stride;
  const int64_t width = q_size + 2 * kv_size + 3;
  for (NormKind kind : {NormKind::kRMSNorm, NormKind::kLayerNorm}) {
    for (bool with_residual : {false, true}) {
      for (int group : {heads, kv_heads}) {
        const int64_t offset = group == heads ? 0 : q_size;
        const int rows = tokens * group;
        std::vector<float> qkv = random_floats(tokens * width, rng, -3.0f, 3.0f);
        std::vector<float> residual = random_floats(size_t(rows) * head_dim, rng);
        const std::vector<float> weight = random_floats(head_dim, rng, 0.5f, 1.5f);
        const std::vector<float> bias = random_floats(head_dim, rng);
        const std::vector<float> before = qkv, residual_before = residual;
        NormParams p{};
        p.in = p.out = qkv.data() + offset;
        p.residual = with_residual ? residual.data() : nullptr;
        p.weight = weight.data();
        p.bias = kind == NormKind::kLayerNorm ? bias.data() : nullptr;
        p.rows = rows;
        p.hidden = head_dim;
        p.row_stride = row_stride;
        p.rows_per_group = group;
        p.group_stride = width;
        p.eps = 1e-5f;
        p.kind = uint8_t(kind);
        p.weight_dtype = DType::kFloat32;
        p.act_dtype = DType::kFloat32;
        cpu::norm(p);
        std::vector<bool> normalised(qkv.size(), false);
        for (int t = 0; t < tokens; ++t) {
          for (int h = 0; h < group; ++h) {
            const int r = t * group + h;
            const int64_t start = offset + t * width + h * row_stride;
            std::vector<double> x(head_dim);
            for (int i = 0; i < head_dim; ++i) {
              x[i] = before[start + i];
              if (with_residual) {
                x[i] = float(residual_before[r * head_dim + i] + before[start + i]);
                ASSERT_EQ(residual[r * head_dim + i], float(x[i]));
              }
            }
            const std::vector<double> y = reference_norm(
                x, kind, weight, kind == NormKind::kLayerNorm ? &bias : nullptr, 1e-5);
            for (int i = 0; i < head_dim; ++i) {
              ASSERT_NEAR(qkv[start + i], y[i], 2e-6 * (1 + std::abs(y[i])))
                  << "kind " << int(kind) << " group " << group << " token " << t << " head " << h;
              normalised[start + i] = true;
            }
          }
        }
        for (size_t i = 0; i < qkv.size(); ++i) {
          if (!normalised[i]) ASSERT_EQ(qkv[i], before[i]) << "element " << i << " group " << group;
        }
      }
    }
  }
}

// An fp32 RMSNorm of `rows` rows of `hidden` at `row_stride`, in place in x.
NormParams fp32_norm_in_place(std::vector<float>& x, const std::vector<float>& w, int rows,
                              int hidden, int64_t row_stride) {
  NormParams p{};
  p.in = p.out = x.data();
  p.weight = w.data();
  p.rows = rows;
  p.hidden = hidden;
  p.row_stride = row_stride;
  p.eps = 1e-6f;
  p.kind = uint8_t(NormKind::kRMSNorm);
  p.weight_dtype = DType::kFloat32;
  p.act_dtype = DType::kFloat32;
  return p;
}

TEST(Norm, RejectsGroupingThatOverlapsOrIsHalfSet) {
  std::vector<float> x(64), w(4, 1.0f);
  NormParams p = fp32_norm_in_place(x, w, 4, 4, 5);
  p.rows_per_group = -1;
  p.group_stride = 16;
  expect_invalid([&] { cpu::norm(p); }, {"rows_per_group is -1", ">= 0"});
  p.rows_per_group = 0;
  expect_invalid([&] { cpu::norm(p); }, {"group_stride is 16", "rows_per_group is 0"});
  // Two rows of 4 at stride 5 span 9 elements: a group_stride of 8 would overlap the next group.
  p.rows_per_group = 2;
  p.group_stride = 8;
  expect_invalid([&] { cpu::norm(p); }, {"group_stride 8", "9 elements", "overlap"});
  p.group_stride = 9;
  cpu::norm(p);  // the tightest layout that fits
}

TEST(Norm, RejectsUnknownKindMissingWeightAndHalfActivations) {
  std::vector<float> x(8), w(8, 1.0f);
  NormParams p = fp32_norm_in_place(x, w, 1, 8, 8);
  p.kind = 9;
  expect_invalid([&] { cpu::norm(p); }, {"NormKind value 9"});
  p.kind = uint8_t(NormKind::kRMSNorm);
  p.weight = nullptr;
  expect_invalid([&] { cpu::norm(p); }, {"weight is null"});
  p.weight = w.data();
  p.act_dtype = DType::kFloat16;
  expect_invalid([&] { cpu::norm(p); }, {"float16", "float32"});
}

// ---- gemm ---------------------------------------------------------------------------------

TEST(Gemm, MatchesDoubleReferenceAcrossTilesDtypesBiasAndAccumulate) {
  std::mt19937 rng(3);
  struct Shape { int m, n, k; };
  const Shape shapes[] = {{1, 1, 1}, {1, 200, 300}, {5, 70, 48}, {67, 131, 260}, {130, 64, 129}};
  for (const Shape& s : shapes) {
    for (DType dtype : kAllDTypes) {
      for (int variant = 0; variant < 3; ++variant) {
        const bool with_bias = variant >= 1, accumulate = variant == 2;
        const int64_t in_stride = s.k + 3, out_stride = s.n + 2;
        std::vector<float> in = random_floats(size_t(s.m) * in_stride, rng);
        TypedArray weight(random_floats(size_t(s.n) * s.k, rng), dtype);
        TypedArray bias(random_floats(s.n, rng), dtype);
        std::vector<float> out = random_floats(size_t(s.m) * out_stride, rng);
        const std::vector<float> out_before = out;
        GemmParams p{};
        p.in = in.data();
        p.weight = weight.data();
        p.bias = with_bias ? bias.data() : nullptr;
        p.out = out.data();
        p.m = s.m;
        p.n = s.n;
        p.k = s.k;
        p.in_stride = in_stride;
        p.out_stride = out_stride;
        p.accumulate = accumulate;
        p.weight_dtype = dtype;
        p.act_dtype = DType::kFloat32;
        cpu::gemm(p);
        for (int m = 0; m < s.m; ++m) {
          for (int n = 0; n < s.n; ++n) {
            double expected = 0, magnitude = 0;
            for (int k = 0; k < s.k; ++k) {
              const double product = double(in[m * in_stride + k]) * weight.rounded[n * s.k + k];
              expected += product;
              magnitude += std::abs(product);
            }
            if (with_bias) expected += bias.rounded[n];
            if (accumulate) expected += out_before[m * out_stride + n];
            ASSERT_NEAR(out[m * out_stride + n], expected, 1e-6 * (1 + magnitude))
                << "m=" << s.m << " n=" << s.n << " k=" << s.k << " at " << m << "," << n;
          }
          for (int64_t n = s.n; n < out_stride; ++n) {  // padding columns untouched
            ASSERT_EQ(out[m * out_stride + n], out_before[m * out_stride + n]);
          }
        }
      }
    }
  }
}

// Each output sums its products in k order whatever m, the tiling or the thread count, so a row
// computed alone has the same bits as inside a batch: engine tests on the CPU backend can demand
// that batched and one-at-a-time generation give identical tokens.
TEST(Gemm, RowBitsDoNotDependOnTheBatch) {
  std::mt19937 rng(13);
  const int m = 70, n = 130, k = 300;
  std::vector<float> in = random_floats(size_t(m) * k, rng);
  TypedArray weight(random_floats(size_t(n) * k, rng), DType::kBFloat16);
  std::vector<float> batched(size_t(m) * n), alone(n);
  GemmParams p{};
  p.in = in.data();
  p.weight = weight.data();
  p.out = batched.data();
  p.m = m;
  p.n = n;
  p.k = k;
  p.in_stride = k;
  p.out_stride = n;
  p.weight_dtype = DType::kBFloat16;
  p.act_dtype = DType::kFloat32;
  cpu::gemm(p);
  for (int row : {0, 37, 69}) {
    p.in = in.data() + size_t(row) * k;
    p.out = alone.data();
    p.m = 1;
    cpu::gemm(p);
    for (int j = 0; j < n; ++j) ASSERT_EQ(float_bits(alone[j]), float_bits(batched[row * n + j]));
  }
}

TEST(Gemm, RejectsBadShapesAndHalfActivations) {
  std::vector<float> a(16), w(16), c(16);
  GemmParams p{};
  p.in = a.data();
  p.weight = w.data();
  p.out = c.data();
  p.m = 2;
  p.n = 2;
  p.k = 4;
  p.in_stride = 3;
  p.out_stride = 2;
  p.weight_dtype = DType::kFloat32;
  p.act_dtype = DType::kFloat32;
  expect_invalid([&] { cpu::gemm(p); }, {"in_stride 3", "k (4)"});
  p.in_stride = 4;
  p.m = -1;
  expect_invalid([&] { cpu::gemm(p); }, {"m=-1"});
  p.m = 2;
  p.act_dtype = DType::kBFloat16;
  expect_invalid([&] { cpu::gemm(p); }, {"float32"});
  p.act_dtype = DType::kFloat32;
  p.weight_dtype = DType(7);
  expect_invalid([&] { cpu::gemm(p); }, {"unknown value 7"});
}

// ---- rotary -------------------------------------------------------------------------------

TEST(Rotary, NeoxAndGptjFullAndPartialOnStridedQkv) {
  std::mt19937 rng(4);
  struct Case { int head_dim, rotary_dim; };
  for (const Case c : {Case{48, 48}, Case{48, 32}, Case{64, 64}, Case{80, 40}}) {
    for (RotaryPairing pairing : {RotaryPairing::kNeox, RotaryPairing::kGptj}) {
      const int tokens = 6, heads = 6, kv_heads = 2, max_position = 300;
      const int64_t width = int64_t(heads + 2 * kv_heads) * c.head_dim;  // a fused qkv row
      RopeConfig rope;
      rope.rotary_dim = c.rotary_dim;
      const std::vector<float> table = rope_cos_sin_table(rope, c.head_dim, max_position);
      std::vector<float> qkv = random_floats(tokens * width, rng);
      const std::vector<float> before = qkv;
      std::vector<int32_t> positions = {0, 1, 7, 299, 150, 3};
      RotaryParams p{};
      p.q = qkv.data();
      p.k = qkv.data() + heads * c.head_dim;
      p.positions = positions.data();
      p.cos_sin = table.data();
      p.num_tokens = tokens;
      p.num_heads = heads;
      p.num_kv_heads = kv_heads;
      p.head_dim = c.head_dim;
      p.rotary_dim = c.rotary_dim;
      p.max_position = max_position;
      p.q_stride = width;
      p.k_stride = width;
      p.pairing = uint8_t(pairing);
      p.act_dtype = DType::kFloat32;
      cpu::rotary(p);
      const int half = c.rotary_dim / 2;
      for (int t = 0; t < tokens; ++t) {
        const float* cos = table.data() + positions[t] * c.rotary_dim;
        for (int h = 0; h < heads + 2 * kv_heads; ++h) {
          const int64_t base = t * width + int64_t(h) * c.head_dim;
          const bool rotates = h < heads + kv_heads;  // q and k heads; v passes through
          for (int d = 0; d < c.head_dim; ++d) {
            double expected = before[base + d];
            if (rotates && d < c.rotary_dim) {
              int i, partner;
              bool first;
              if (pairing == RotaryPairing::kNeox) {
                i = d % half, first = d < half, partner = first ? d + half : d - half;
              } else {
                i = d / 2, first = d % 2 == 0, partner = first ? d + 1 : d - 1;
              }
              const double x = before[base + d], y = before[base + partner];
              expected = first ? x * cos[i] - y * cos[half + i] : x * cos[i] + y * cos[half + i];
            }
            ASSERT_NEAR(qkv[base + d], expected, 1e-6)
                << "head_dim " << c.head_dim << " rotary " << c.rotary_dim << " t" << t << " h"
                << h << " d" << d;
          }
        }
      }
    }
  }
}

TEST(Rotary, RejectsPositionOutsideTableAndBadRotaryDim) {
  std::vector<float> q(8), k(8), table(4 * 8);
  std::vector<int32_t> positions = {4};
  RotaryParams p{};
  p.q = q.data();
  p.k = k.data();
  p.positions = positions.data();
  p.cos_sin = table.data();
  p.num_tokens = 1;
  p.num_heads = 1;
  p.num_kv_heads = 1;
  p.head_dim = 8;
  p.rotary_dim = 8;
  p.max_position = 4;
  p.q_stride = 8;
  p.k_stride = 8;
  p.act_dtype = DType::kFloat32;
  expect_invalid([&] { cpu::rotary(p); }, {"position 4", "4 positions"});
  positions[0] = -2;
  expect_invalid([&] { cpu::rotary(p); }, {"position -2"});
  positions[0] = 1;
  p.rotary_dim = 5;
  expect_invalid([&] { cpu::rotary(p); }, {"rotary_dim is 5"});
  p.rotary_dim = 8;
  p.pairing = 4;
  expect_invalid([&] { cpu::rotary(p); }, {"RotaryPairing value 4"});
}

// ---- KV cache: layout, write_kv and paged attention -----------------------------------------

/// Element index in one layer's pool [num_blocks][2][num_kv_heads][block_size][head_dim].
int64_t cache_index(int block, int kv, int head, int offset, int d, int num_kv_heads,
                    int block_size, int head_dim) {
  return ((((int64_t(block) * 2 + kv) * num_kv_heads + head) * block_size + offset) * head_dim) + d;
}

TEST(WriteKV, ScattersToSlotsConvertsAndSkipsPadding) {
  std::mt19937 rng(5);
  const int kv_heads = 2, head_dim = 48, block_size = 16, num_blocks = 4, tokens = 7;
  for (DType dtype : kAllDTypes) {
    const int64_t stride = 3 * kv_heads * head_dim;  // k and v inside a wider row
    std::vector<float> kv = random_floats(tokens * stride, rng);
    const size_t pool = size_t(num_blocks) * 2 * kv_heads * block_size * head_dim;
    TypedArray cache(std::vector<float>(pool, 0.25f), dtype);
    std::vector<int64_t> slots = {0, 17, -1, 63, 31, 32, 5};
    WriteKVParams p{};
    p.k = kv.data();
    p.v = kv.data() + kv_heads * head_dim;
    p.layer_cache = cache.data();
    p.slot_mapping = slots.data();
    p.num_tokens = tokens;
    p.num_kv_heads = kv_heads;
    p.head_dim = head_dim;
    p.block_size = block_size;
    p.k_stride = stride;
    p.v_stride = stride;
    p.act_dtype = DType::kFloat32;
    p.cache_dtype = dtype;
    cpu::write_kv(p);
    std::vector<bool> written(pool, false);
    for (int t = 0; t < tokens; ++t) {
      if (slots[t] < 0) continue;
      const int block = int(slots[t] / block_size), offset = int(slots[t] % block_size);
      for (int which = 0; which < 2; ++which) {
        for (int h = 0; h < kv_heads; ++h) {
          for (int d = 0; d < head_dim; ++d) {
            const int64_t at =
                cache_index(block, which, h, offset, d, kv_heads, block_size, head_dim);
            const float source = kv[t * stride + which * kv_heads * head_dim + h * head_dim + d];
            TypedArray expected({source}, dtype);
            ASSERT_EQ(cpu::load_element(cache.data(), dtype, at), expected.rounded[0]);
            written[at] = true;
          }
        }
      }
    }
    for (size_t i = 0; i < pool; ++i) {
      if (!written[i]) {
        ASSERT_EQ(cpu::load_element(cache.data(), dtype, int64_t(i)), 0.25f) << i;
      }
    }
  }
}

TEST(WriteKV, RejectsNegativeSlotOtherThanSkip) {
  std::vector<float> k(4), v(4), cache(64);
  std::vector<int64_t> slots = {-2};
  WriteKVParams p{};
  p.k = k.data();
  p.v = v.data();
  p.layer_cache = cache.data();
  p.slot_mapping = slots.data();
  p.num_tokens = 1;
  p.num_kv_heads = 1;
  p.head_dim = 4;
  p.block_size = 4;
  p.k_stride = 4;
  p.v_stride = 4;
  p.act_dtype = DType::kFloat32;
  p.cache_dtype = DType::kBFloat16;
  expect_invalid([&] { cpu::write_kv(p); }, {"slot -2"});
  p.act_dtype = DType::kFloat16;
  expect_invalid([&] { cpu::write_kv(p); }, {"float32"});
}

struct AttentionCase {
  std::string name;
  int num_heads, num_kv_heads, head_dim, block_size;
  std::vector<std::pair<int, int>> requests;  // (context_len, q_len)
  int sliding_window = 0;
  float softcap = 0.0f;
  bool alibi = false;
  DType cache_dtype = DType::kFloat32;
  float q_amplitude = 1.0f;
};

void run_attention_case(const AttentionCase& c, std::mt19937& rng) {
  SCOPED_TRACE(c.name);
  const int num_requests = int(c.requests.size());
  const int max_blocks = 1 + std::max_element(c.requests.begin(), c.requests.end())->first /
                                 c.block_size;
  // Each request's blocks are scattered over a pool with spare blocks, in shuffled order.
  const int num_blocks = num_requests * max_blocks + 3;
  std::vector<int32_t> block_ids(num_blocks);
  std::iota(block_ids.begin(), block_ids.end(), 0);
  std::shuffle(block_ids.begin(), block_ids.end(), rng);
  std::vector<int32_t> block_tables(size_t(num_requests) * max_blocks, -1);
  std::vector<int32_t> query_start = {0}, context_lens;
  for (int r = 0; r < num_requests; ++r) {
    const auto [context, q_len] = c.requests[r];
    const int used = (context + c.block_size - 1) / c.block_size;
    for (int b = 0; b < used; ++b) block_tables[r * max_blocks + b] = block_ids[r * max_blocks + b];
    query_start.push_back(query_start.back() + q_len);
    context_lens.push_back(context);
  }
  const int num_tokens = query_start.back();
  const size_t pool = size_t(num_blocks) * 2 * c.num_kv_heads * c.block_size * c.head_dim;
  TypedArray cache(random_floats(pool, rng), c.cache_dtype);
  const int64_t q_stride = int64_t(c.num_heads) * c.head_dim + 8;
  std::vector<float> q =
      random_floats(std::max(1, num_tokens) * q_stride, rng, -c.q_amplitude, c.q_amplitude);
  std::vector<float> slopes(c.num_heads);
  for (int h = 0; h < c.num_heads; ++h) slopes[h] = std::pow(2.0f, -8.0f * (h + 1) / c.num_heads);
  const int width = c.num_heads * c.head_dim;
  std::vector<float> out(std::max(1, num_tokens) * width, NAN);
  const float scale = 1.0f / std::sqrt(float(c.head_dim));

  AttentionParams p{};
  p.q = q.data();
  p.layer_cache = cache.data();
  p.out = out.data();
  p.query_start = query_start.data();
  p.context_lens = context_lens.data();
  p.block_tables = block_tables.data();
  p.alibi_slopes = c.alibi ? slopes.data() : nullptr;
  p.num_requests = num_requests;
  p.num_tokens = num_tokens;
  p.num_heads = c.num_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.head_dim = c.head_dim;
  p.block_size = c.block_size;
  p.max_blocks_per_request = max_blocks;
  p.q_stride = q_stride;
  p.sliding_window = c.sliding_window;
  p.scale = scale;
  p.softcap = c.softcap;
  p.act_dtype = DType::kFloat32;
  p.cache_dtype = c.cache_dtype;
  cpu::paged_attention(p);

  const int group = c.num_heads / c.num_kv_heads;
  auto cached = [&](int r, int pos, int kv, int head, int d) {
    const int block = block_tables[r * max_blocks + pos / c.block_size];
    return double(cache.rounded[cache_index(block, kv, head, pos % c.block_size, d,
                                            c.num_kv_heads, c.block_size, c.head_dim)]);
  };
  for (int r = 0; r < num_requests; ++r) {
    const auto [context, q_len] = c.requests[r];
    for (int j = 0; j < q_len; ++j) {
      const int token = query_start[r] + j;
      const int query_pos = context - q_len + j;
      for (int h = 0; h < c.num_heads; ++h) {
        const int kv_head = h / group;
        std::vector<double> scores;
        std::vector<int> keys;
        for (int pos = 0; pos <= query_pos; ++pos) {
          if (c.sliding_window > 0 && pos <= query_pos - c.sliding_window) continue;
          double dot = 0;
          for (int d = 0; d < c.head_dim; ++d) {
            dot += double(q[token * q_stride + h * c.head_dim + d]) * cached(r, pos, 0, kv_head, d);
          }
          double score = dot * scale;
          if (c.softcap > 0) score = c.softcap * std::tanh(score / c.softcap);
          if (c.alibi) score += double(slopes[h]) * (pos - query_pos);
          scores.push_back(score);
          keys.push_back(pos);
        }
        const double max_score = *std::max_element(scores.begin(), scores.end());
        double sum = 0;
        for (double& s : scores) sum += (s = std::exp(s - max_score));
        for (int d = 0; d < c.head_dim; ++d) {
          double expected = 0;
          for (size_t i = 0; i < keys.size(); ++i) {
            expected += scores[i] / sum * cached(r, keys[i], 1, kv_head, d);
          }
          ASSERT_NEAR(out[token * width + h * c.head_dim + d], expected, 2e-5)
              << "request " << r << " query " << j << " head " << h << " d " << d;
        }
      }
    }
  }
}

TEST(PagedAttention, MatchesDoubleReference) {
  std::mt19937 rng(6);
  const std::vector<AttentionCase> cases = {
      {"mha decode, varied contexts", 4, 4, 64, 16, {{1, 1}, {17, 1}, {200, 1}, {16, 1}}},
      {"gqa3 prefill bf16", 6, 2, 48, 32, {{37, 37}, {64, 64}}, 0, 0, false, DType::kBFloat16},
      {"gqa3 chunked prefill fp16, head_dim 80", 6, 2, 80, 16, {{150, 20}, {33, 5}, {1, 1}}, 0, 0,
       false, DType::kFloat16},
      {"mqa, a request with no new tokens", 8, 1, 64, 32, {{65, 3}, {10, 0}, {32, 2}}},
      {"sliding window", 4, 2, 64, 16, {{100, 30}, {40, 1}, {10, 10}, {25, 25}}, 24},
      {"softcap", 4, 2, 48, 16, {{70, 9}, {5, 1}}, 0, 20.0f, false, DType::kFloat32, 8.0f},
      {"alibi", 6, 6, 64, 32, {{90, 12}, {31, 31}}, 0, 0, true},
      {"window + softcap + alibi, bf16", 6, 2, 64, 16, {{120, 17}, {48, 1}}, 16, 30.0f, true,
       DType::kBFloat16, 4.0f},
  };
  for (const AttentionCase& c : cases) run_attention_case(c, rng);
}

TEST(PagedAttention, RejectsInconsistentBatch) {
  std::vector<float> q(64), cache(1024), out(64);
  std::vector<int32_t> query_start = {0, 2}, context_lens = {1}, block_tables = {0};
  AttentionParams p{};
  p.q = q.data();
  p.layer_cache = cache.data();
  p.out = out.data();
  p.query_start = query_start.data();
  p.context_lens = context_lens.data();
  p.block_tables = block_tables.data();
  p.num_requests = 1;
  p.num_tokens = 2;
  p.num_heads = 2;
  p.num_kv_heads = 1;
  p.head_dim = 8;
  p.block_size = 16;
  p.max_blocks_per_request = 1;
  p.q_stride = 16;
  p.scale = 1.0f;
  p.act_dtype = DType::kFloat32;
  p.cache_dtype = DType::kFloat32;
  expect_invalid([&] { cpu::paged_attention(p); }, {"context_len 1", "2 new tokens"});
  context_lens[0] = 17;
  expect_invalid([&] { cpu::paged_attention(p); }, {"context_len 17", "2 blocks", "holds 1"});
  context_lens[0] = 2;
  p.num_kv_heads = 3;
  expect_invalid([&] { cpu::paged_attention(p); }, {"num_heads (2)", "num_kv_heads (3)"});
  p.num_kv_heads = 1;
  p.act_dtype = DType::kFloat16;
  expect_invalid([&] { cpu::paged_attention(p); }, {"float32"});
  p.act_dtype = DType::kFloat32;
  std::vector<int32_t> order = {1};
  p.request_order = order.data();
  expect_invalid([&] { cpu::paged_attention(p); },
                 {"request_order[0] is 1", "permutation of [0, 1)"});
  order[0] = 0;
  cpu::paged_attention(p);
}

// ---- activation and gather ----------------------------------------------------------------

double reference_activation(Activation a, double x) {
  switch (a) {
    case Activation::kSiluGlu: return x / (1 + std::exp(-x));
    case Activation::kGeluGlu:
    case Activation::kGelu: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case Activation::kGeluTanhGlu:
    case Activation::kGeluTanh:
      return 0.5 * x *
             (1 + std::tanh(std::sqrt(2 / std::numbers::pi) * (x + 0.044715 * x * x * x)));
    case Activation::kRelu: return x > 0 ? x : 0;
  }
  return NAN;
}

TEST(Activation, EveryKindGluAndPlain) {
  std::mt19937 rng(8);
  const Activation kinds[] = {Activation::kSiluGlu,  Activation::kGeluGlu,
                              Activation::kGeluTanhGlu, Activation::kGelu,
                              Activation::kGeluTanh, Activation::kRelu};
  for (int inter : {48, 7}) {
    for (Activation a : kinds) {
      const int tokens = 5;
      const bool glu = is_glu(a);
      std::vector<float> in = random_floats(size_t(tokens) * inter * (glu ? 2 : 1), rng, -6, 6);
      const std::vector<float> before = in;
      std::vector<float> separate(size_t(tokens) * inter);
      ActivationParams p{};
      p.in = in.data();
      p.out = glu ? separate.data() : in.data();  // plain activations run in place
      p.num_tokens = tokens;
      p.inter = inter;
      p.activation = uint8_t(a);
      p.act_dtype = DType::kFloat32;
      cpu::activation(p);
      const float* out = glu ? separate.data() : in.data();
      for (int t = 0; t < tokens; ++t) {
        for (int i = 0; i < inter; ++i) {
          double expected;
          if (glu) {
            expected = reference_activation(a, before[t * 2 * inter + i]) *
                       before[t * 2 * inter + inter + i];
          } else {
            expected = reference_activation(a, before[t * inter + i]);
          }
          ASSERT_NEAR(out[t * inter + i], expected, 1e-6 * (1 + std::abs(expected)))
              << "activation " << int(a) << " inter " << inter;
        }
      }
    }
  }
}

TEST(Activation, SpotValuesAndUnknownKind) {
  std::vector<float> x = {1.0f, 1.0f, 1.0f};
  std::vector<float> y(1);
  ActivationParams p{};
  p.in = x.data();
  p.out = y.data();
  p.num_tokens = 1;
  p.inter = 1;
  p.act_dtype = DType::kFloat32;
  const std::pair<Activation, float> spots[] = {{Activation::kGelu, 0.8413447461f},
                                                {Activation::kGeluTanh, 0.8411919906f},
                                                {Activation::kRelu, 1.0f}};
  for (const auto& [a, expected] : spots) {
    p.activation = uint8_t(a);
    cpu::activation(p);
    EXPECT_NEAR(y[0], expected, 1e-7);
  }
  x[1] = 2.0f;  // GLU: silu(1) * 2
  p.activation = uint8_t(Activation::kSiluGlu);
  cpu::activation(p);
  EXPECT_NEAR(y[0], 2 * 0.7310585786f, 1e-7);
  p.activation = 42;
  expect_invalid([&] { cpu::activation(p); }, {"Activation value 42"});
}

TEST(GatherRows, PicksRows) {
  std::mt19937 rng(9);
  const int width = 48;
  std::vector<float> in = random_floats(10 * width, rng);
  std::vector<int32_t> rows = {9, 0, 4, 4};
  std::vector<float> out(rows.size() * width);
  GatherRowsParams p{};
  p.in = in.data();
  p.rows = rows.data();
  p.out = out.data();
  p.num_rows = int32_t(rows.size());
  p.width = width;
  p.act_dtype = DType::kFloat32;
  cpu::gather_rows(p);
  for (size_t i = 0; i < rows.size(); ++i) {
    for (int j = 0; j < width; ++j) ASSERT_EQ(out[i * width + j], in[rows[i] * width + j]);
  }
  rows[2] = -3;
  expect_invalid([&] { cpu::gather_rows(p); }, {"row index -3"});
}

// ---- sample -------------------------------------------------------------------------------

struct SampleRun {
  std::vector<int32_t> sampled;
  std::vector<float> sampled_logprob;
  std::vector<int32_t> top_ids;
  std::vector<float> top_logprobs;
};

SampleRun run_sample(std::vector<float> logits, const std::vector<SamplingRow>& rows, int vocab,
                     int num_top = 0, float final_softcap = 0.0f) {
  SampleRun run;
  const int n = int(rows.size());
  run.sampled.assign(n, -1);
  run.sampled_logprob.assign(n, NAN);
  run.top_ids.assign(size_t(n) * std::max(num_top, 1), -1);
  run.top_logprobs.assign(size_t(n) * std::max(num_top, 1), NAN);
  SampleParams p{};
  p.logits = logits.data();
  p.rows = rows.data();
  p.sampled = run.sampled.data();
  p.sampled_logprob = run.sampled_logprob.data();
  p.top_ids = run.top_ids.data();
  p.top_logprobs = run.top_logprobs.data();
  p.num_rows = n;
  p.vocab_size = vocab;
  p.num_top = num_top;
  p.final_softcap = final_softcap;
  cpu::sample(p);
  return run;
}

SamplingRow row_with(float temperature, uint64_t seed = 1, uint64_t draw = 0, int top_k = 0,
                     float top_p = 1.0f, float min_p = 0.0f) {
  return SamplingRow{temperature, top_k, top_p, min_p, seed, draw};
}

std::vector<double> reference_log_softmax(const std::vector<float>& logits) {
  double max = *std::max_element(logits.begin(), logits.end()), sum = 0;
  for (float x : logits) sum += std::exp(x - max);
  std::vector<double> out;
  for (float x : logits) out.push_back(x - max - std::log(sum));
  return out;
}

TEST(Sample, SplitMix64IsTheStandardOne) {
  // SplitMix64's first output for state 0 (Vigna's reference implementation); a GPU sampler must
  // reproduce these bits exactly.
  EXPECT_EQ(splitmix64(0), 0xe220a8397b1dcdafull);
  static_assert(sampling_uniform(3, 4) >= 0.0 && sampling_uniform(3, 4) < 1.0);
  EXPECT_EQ(sampling_uniform(~0ull, 0), double(splitmix64(~0ull ^ splitmix64(0)) >> 11) * 0x1p-53);
}

TEST(Sample, GumbelNoiseIsFiniteAtTheExtremesAndStandard) {
  // The ids whose hash is the smallest and the largest 23-bit value still give finite noise.
  const uint64_t key = draw_key(5, 6);
  int found_low = 0, found_high = 0;
  for (uint64_t id = 0; id < (1ull << 31) && (found_low == 0 || found_high == 0); ++id) {
    const float u = token_uniform(key, int32_t(id));
    if (u < 0x1p-23f) found_low += 1;
    if (u > 1.0f - 0x1p-23f) found_high += 1;
    if (u < 0x1p-23f || u > 1.0f - 0x1p-23f) {
      ASSERT_GT(u, 0.0f);
      ASSERT_LT(u, 1.0f);
      ASSERT_TRUE(std::isfinite(gumbel_noise(key, int32_t(id)))) << id;
    }
  }
  EXPECT_GT(found_low, 0);
  EXPECT_GT(found_high, 0);
  // Mean and variance of a standard Gumbel: Euler's gamma and pi^2 / 6.
  double sum = 0, sum_sq = 0;
  const int n = 1 << 20;
  for (int id = 0; id < n; ++id) {
    const double g = gumbel_noise(draw_key(7, 0), id);
    sum += g;
    sum_sq += g * g;
  }
  const double mean = sum / n, variance = sum_sq / n - mean * mean;
  EXPECT_NEAR(mean, 0.5772, 0.01);
  EXPECT_NEAR(variance, 1.6449, 0.02);
}

TEST(Sample, GreedyTakesArgmaxWithLowestIdOnTies) {
  std::vector<float> logits = {0.5f, 2.0f, -1.0f, 3.0f, 1.0f, 0.0f, 2.5f, 3.0f};
  for (float temperature : {0.0f, 5e-6f}) {
    const SampleRun run = run_sample(logits, {row_with(temperature)}, 8);
    EXPECT_EQ(run.sampled[0], 3);
    EXPECT_NEAR(run.sampled_logprob[0], reference_log_softmax(logits)[3], 1e-6);
  }
}

TEST(Sample, LogprobsAreRawLogSoftmaxSumToOneAndTopNIsOrdered) {
  std::mt19937 rng(10);
  const int vocab = 1000;
  std::vector<float> logits = random_floats(vocab, rng, -5, 5);
  logits[17] = logits[400] = logits[999] = 6.0f;  // a three-way tie at the top
  const std::vector<double> expected = reference_log_softmax(logits);
  // Temperature and filters must not change the reported (raw) log-probabilities.
  const SampleRun run =
      run_sample(logits, {row_with(0.7f, 3, 9, 50, 0.9f, 0.05f)}, vocab, vocab);
  double probability_sum = 0;
  for (int i = 0; i < vocab; ++i) {
    const int id = run.top_ids[i];
    ASSERT_NEAR(run.top_logprobs[i], expected[id], 1e-5);
    probability_sum += std::exp(double(run.top_logprobs[i]));
    if (i > 0) {
      const int previous = run.top_ids[i - 1];
      ASSERT_TRUE(logits[previous] > logits[id] ||
                  (logits[previous] == logits[id] && previous < id))
          << "rank " << i;
    }
  }
  EXPECT_NEAR(probability_sum, 1.0, 1e-5);
  EXPECT_EQ(run.top_ids[0], 17);
  EXPECT_EQ(run.top_ids[1], 400);
  EXPECT_EQ(run.top_ids[2], 999);
  EXPECT_NEAR(run.sampled_logprob[0], expected[run.sampled[0]], 1e-5);
}

TEST(Sample, TopKOneAndTinyTopPEqualGreedy) {
  std::mt19937 rng(11);
  const int vocab = 300;
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<float> logits = random_floats(vocab, rng, -3, 3);
    if (trial % 2 == 0) logits[250] = logits[40] = 4.0f;  // tied maxima: lowest id wins
    const int greedy = run_sample(logits, {row_with(0.0f)}, vocab).sampled[0];
    for (uint64_t draw = 0; draw < 10; ++draw) {
      EXPECT_EQ(run_sample(logits, {row_with(1.3f, 5, draw, 1)}, vocab).sampled[0], greedy);
      EXPECT_EQ(run_sample(logits, {row_with(1.3f, 5, draw, 0, 1e-7f)}, vocab).sampled[0], greedy);
    }
  }
}

// Draws `draws` tokens from one row and returns the counts per token.
std::vector<int> histogram(const std::vector<float>& logits, SamplingRow row, int draws) {
  const int vocab = int(logits.size());
  std::vector<float> batch;
  std::vector<SamplingRow> rows;
  for (int d = 0; d < draws; ++d) {
    batch.insert(batch.end(), logits.begin(), logits.end());
    row.draw = uint64_t(d);
    rows.push_back(row);
  }
  const SampleRun run = run_sample(batch, rows, vocab);
  std::vector<int> counts(vocab, 0);
  for (int token : run.sampled) ++counts[token];
  return counts;
}

double chi_square(const std::vector<int>& counts, const std::vector<double>& probabilities) {
  const double total = std::accumulate(counts.begin(), counts.end(), 0.0);
  double chi = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (probabilities[i] == 0) {
      EXPECT_EQ(counts[i], 0) << "token " << i << " was filtered out";
      continue;
    }
    const double expected = total * probabilities[i];
    chi += (counts[i] - expected) * (counts[i] - expected) / expected;
  }
  return chi;
}

TEST(Sample, DrawsFollowTheFilteredDistribution) {
  const std::vector<float> logits = {std::log(0.1f), std::log(0.4f), std::log(0.2f),
                                     std::log(0.3f)};  // probabilities 0.1 0.4 0.2 0.3
  const int draws = 2000;
  // The chi-square 99.9% quantile is 16.3 for 3 degrees of freedom; draws are deterministic in
  // (seed, draw), so this never flakes: it only fails if the sampler is wrong.
  EXPECT_LT(chi_square(histogram(logits, row_with(1.0f, 42), draws), {0.1, 0.4, 0.2, 0.3}), 16.3);
  // Temperature 2 flattens: p ~ sqrt(p).
  {
    std::vector<double> flat = {std::sqrt(0.1), std::sqrt(0.4), std::sqrt(0.2), std::sqrt(0.3)};
    const double sum = std::accumulate(flat.begin(), flat.end(), 0.0);
    for (double& f : flat) f /= sum;
    EXPECT_LT(chi_square(histogram(logits, row_with(2.0f, 43), draws), flat), 16.3);
  }
  // top-k 2 keeps 0.4 and 0.3; top-p 0.65 keeps the same two (0.4 < 0.65 <= 0.7).
  const std::vector<double> top_two = {0, 0.4 / 0.7, 0, 0.3 / 0.7};
  EXPECT_LT(chi_square(histogram(logits, row_with(1.0f, 44, 0, 2), draws), top_two), 10.8);
  EXPECT_LT(chi_square(histogram(logits, row_with(1.0f, 45, 0, 0, 0.65f), draws), top_two), 10.8);
  // min-p 0.4: keep prob >= 0.16 -> 0.4, 0.3, 0.2.
  const std::vector<double> three = {0, 0.4 / 0.9, 0.2 / 0.9, 0.3 / 0.9};
  EXPECT_LT(chi_square(histogram(logits, row_with(1.0f, 46, 0, 0, 1.0f, 0.4f), draws), three),
            13.8);
  // Order top-k -> top-p -> min-p: top-k 3 (0.4 0.3 0.2, renormalised 4/9 3/9 2/9), then top-p
  // 0.75 keeps 4/9 + 3/9 = 7/9 >= 0.75, then min-p 0.8 keeps 3/9 >= 0.8 * 4/9? no: only token 1.
  const std::vector<int> only_one =
      histogram(logits, row_with(1.0f, 47, 0, 3, 0.75f, 0.8f), 200);
  EXPECT_EQ(only_one[1], 200);
  const std::vector<int> two = histogram(logits, row_with(1.0f, 48, 0, 3, 0.75f, 0.7f), draws);
  EXPECT_LT(chi_square(two, top_two), 10.8);
}

// The sampler as SampleParams specifies it, with a full sort: the op sorts lazily and must agree.
int reference_draw(const std::vector<float>& logits, const SamplingRow& row) {
  const int vocab = int(logits.size());
  std::vector<float> scaled(vocab);
  for (int i = 0; i < vocab; ++i) scaled[i] = logits[i] / row.temperature;
  std::vector<int> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int a, int b) {
    return scaled[a] > scaled[b] || (scaled[a] == scaled[b] && a < b);
  });
  std::vector<double> w(vocab);
  for (int i = 0; i < vocab; ++i) w[i] = std::exp(double(scaled[order[i]]) - scaled[order[0]]);
  int kept = row.top_k > 0 && row.top_k < vocab ? row.top_k : vocab;
  auto prefix_sum = [&](int n) { return std::accumulate(w.begin(), w.begin() + n, 0.0); };
  if (row.top_p < 1) {
    const double total = prefix_sum(kept);
    int n = 1;
    double cumulative = w[0];
    while (n < kept && cumulative < row.top_p * total) cumulative += w[n++];
    kept = n;
  }
  if (row.min_p > 0) {
    int n = 1;
    while (n < kept && w[n] >= row.min_p * w[0]) ++n;
    kept = n;
  }
  // The Gumbel-max draw over the kept prefix, ties to the lower id.
  const uint64_t key = draw_key(row.seed, row.draw);
  int best = order[0];
  for (int i = 1; i < kept; ++i) {
    const float value = scaled[order[i]] + gumbel_noise(key, order[i]);
    const float best_value = scaled[best] + gumbel_noise(key, best);
    if (value > best_value || (value == best_value && order[i] < best)) best = order[i];
  }
  return best;
}

TEST(Sample, LazilySortedDrawsMatchAFullSortReference) {
  std::mt19937 rng(14);
  const int vocab = 3000;  // flat logits: draws walk deep, past several lazy-sort stages
  std::vector<float> logits(vocab);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& x : logits) x = normal(rng);
  logits[100] = logits[2000] = logits[5];  // ties order by id
  const SamplingRow settings[] = {row_with(1.0f, 1), row_with(0.6f, 2, 0, 700),
                                  row_with(1.5f, 3, 0, 0, 0.97f),
                                  row_with(1.0f, 4, 0, 0, 1.0f, 0.05f),
                                  row_with(0.9f, 5, 0, 2500, 0.9f, 0.01f)};
  for (const SamplingRow& setting : settings) {
    std::vector<float> batch;
    std::vector<SamplingRow> rows;
    for (uint64_t d = 0; d < 100; ++d) {
      batch.insert(batch.end(), logits.begin(), logits.end());
      rows.push_back(setting);
      rows.back().draw = d;
    }
    const SampleRun run = run_sample(batch, rows, vocab);
    for (size_t i = 0; i < rows.size(); ++i) {
      ASSERT_EQ(run.sampled[i], reference_draw(logits, rows[i])) << "seed " << setting.seed
                                                                  << " draw " << i;
    }
  }
}

TEST(Sample, SameSeedAndDrawGiveTheSameTokenWhateverTheBatch) {
  std::mt19937 rng(12);
  const int vocab = 500;
  const std::vector<float> logits = random_floats(vocab, rng, -2, 2);
  const SamplingRow target = row_with(1.0f, 1234, 77, 0, 0.95f);
  const int alone = run_sample(logits, {target}, vocab).sampled[0];
  std::vector<float> batch;
  std::vector<SamplingRow> rows;
  for (int r = 0; r < 7; ++r) {
    const std::vector<float> other = random_floats(vocab, rng, -2, 2);
    batch.insert(batch.end(), (r == 4 ? logits : other).begin(), (r == 4 ? logits : other).end());
    rows.push_back(r == 4 ? target : row_with(0.8f, uint64_t(r), uint64_t(r)));
  }
  EXPECT_EQ(run_sample(batch, rows, vocab).sampled[4], alone);
  EXPECT_EQ(run_sample(logits, {target}, vocab).sampled[0], alone);
  // Different draws of the same stream spread over several tokens.
  std::vector<int> seen;
  for (uint64_t d = 0; d < 50; ++d) {
    seen.push_back(run_sample(logits, {row_with(1.0f, 1234, d)}, vocab).sampled[0]);
  }
  std::sort(seen.begin(), seen.end());
  EXPECT_GT(std::unique(seen.begin(), seen.end()) - seen.begin(), 20);
}

TEST(Sample, FinalSoftcapShapesLogprobs) {
  const std::vector<float> logits = {100.0f, 10.0f, -50.0f, 0.0f};
  std::vector<float> capped;
  for (float x : logits) capped.push_back(float(30.0 * std::tanh(x / 30.0)));
  const std::vector<double> expected = reference_log_softmax(capped);
  const SampleRun run = run_sample(logits, {row_with(0.0f)}, 4, 4, 30.0f);
  EXPECT_EQ(run.sampled[0], 0);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(run.top_logprobs[i], expected[run.top_ids[i]], 1e-5);
}

TEST(Sample, RejectsBadSettingsAndNanLogits) {
  const std::vector<float> logits = {1, 2, 3};
  expect_invalid([&] { run_sample(logits, {row_with(1.0f, 1, 0, 0, 0.0f)}, 3); }, {"top_p is 0"});
  expect_invalid([&] { run_sample(logits, {row_with(1.0f, 1, 0, 0, 1.5f)}, 3); }, {"top_p is 1.5"});
  expect_invalid([&] { run_sample(logits, {row_with(-1.0f)}, 3); }, {"temperature is -1"});
  expect_invalid([&] { run_sample(logits, {row_with(1.0f, 1, 0, 0, 1.0f, 2.0f)}, 3); },
                 {"min_p is 2"});
  expect_invalid([&] { run_sample(logits, {row_with(1.0f)}, 3, 4); }, {"num_top is 4"});
  expect_invalid([&] { run_sample({1, NAN, 3, 0, 0, 0}, {row_with(0.0f), row_with(0.0f)}, 3); },
                 {"row 0", "NaN"});
}

// ---- rope tables --------------------------------------------------------------------------

TEST(Rope, DefaultTableIsCosSinOfPositionTimesThetaPower) {
  RopeConfig rope;
  const int head_dim = 64, max_position = 2048;
  const std::vector<float> table = rope_cos_sin_table(rope, head_dim, max_position);
  ASSERT_EQ(table.size(), size_t(max_position) * head_dim);
  for (int pos : {0, 1, 2, 63, 500, 2047}) {
    for (int i = 0; i < head_dim / 2; ++i) {
      const double angle = pos * std::pow(10000.0, -2.0 * i / head_dim);
      // The table's angle is HF's fp32 product pos * inv_freq: off by up to ~pos * 2^-23.
      const double tolerance = 2e-7 + pos * 1.5e-7;
      ASSERT_NEAR(table[pos * head_dim + i], std::cos(angle), tolerance) << pos << " " << i;
      ASSERT_NEAR(table[pos * head_dim + head_dim / 2 + i], std::sin(angle), tolerance);
    }
  }
  // Spot values printed by transformers 5.24 LlamaRotaryEmbedding (theta 1e4, head_dim 64).
  EXPECT_NEAR(table[1 * 64 + 1], 0.731760979, 1e-7);
  EXPECT_NEAR(table[1 * 64 + 32 + 1], 0.681561351, 1e-7);
  EXPECT_NEAR(table[100 * 64 + 5], 0.151208460, 1e-7);
  EXPECT_NEAR(table[100 * 64 + 32 + 5], -0.988501906, 1e-7);
}

TEST(Rope, PartialRotaryUsesRotaryDimInTheExponent) {
  RopeConfig rope;
  rope.rotary_dim = 32;
  const std::vector<float> inv_freq = rope_inverse_frequencies(rope, 80);
  ASSERT_EQ(inv_freq.size(), 16u);
  for (int i = 0; i < 16; ++i) EXPECT_NEAR(inv_freq[i], std::pow(1e4, -2.0 * i / 32), 1e-7);
  EXPECT_EQ(rope_cos_sin_table(rope, 80, 10).size(), 10u * 32);
}

TEST(Rope, LinearDividesPositionsByFactor) {
  RopeConfig rope;
  rope.scaling = RopeScaling::kLinear;
  rope.factor = 4.0f;
  const std::vector<float> table = rope_cos_sin_table(rope, 64, 200);
  for (int pos : {1, 100, 199}) {
    for (int i = 0; i < 32; ++i) {
      const double angle = (pos / 4.0) * std::pow(10000.0, -2.0 * i / 64);
      const double tolerance = 2e-7 + pos * 1.5e-7;  // fp32 angle, as in the default case
      ASSERT_NEAR(table[pos * 64 + i], std::cos(angle), tolerance);
      ASSERT_NEAR(table[pos * 64 + 32 + i], std::sin(angle), tolerance);
    }
  }
  EXPECT_NEAR(table[100 * 64 + 0], 0.991202831, 1e-7);  // transformers 5.24
  EXPECT_NEAR(table[100 * 64 + 32 + 5], -0.347357273, 1e-7);
}

TEST(Rope, Llama3MatchesTheHfFormula) {
  RopeConfig rope;
  rope.theta = 500000.0f;
  rope.scaling = RopeScaling::kLlama3;
  rope.factor = 8.0f;
  rope.low_freq_factor = 1.0f;
  rope.high_freq_factor = 4.0f;
  rope.original_max_position = 8192;
  const int dim = 128;
  const std::vector<float> inv_freq = rope_inverse_frequencies(rope, dim);
  int low = 0, medium = 0, high = 0;
  for (int i = 0; i < dim / 2; ++i) {
    const double base = std::pow(500000.0, -2.0 * i / dim);
    const double wavelen = 2 * std::numbers::pi / base;
    double expected;
    if (wavelen < 8192.0 / 4) {
      expected = base, ++high;
    } else if (wavelen > 8192.0 / 1) {
      expected = base / 8, ++low;
    } else {
      const double smooth = (8192.0 / wavelen - 1) / (4 - 1);
      expected = (1 - smooth) * base / 8 + smooth * base, ++medium;
    }
    EXPECT_NEAR(inv_freq[i], expected, 2e-6 * expected) << i;
  }
  EXPECT_GT(low, 0);
  EXPECT_GT(medium, 0);
  EXPECT_GT(high, 0);
  const std::vector<float> table = rope_cos_sin_table(rope, dim, 1001);
  // transformers 5.24: a high-, a medium- and a low-frequency pair at position 1000.
  EXPECT_NEAR(inv_freq[32], 5.248460220e-04, 1e-12);
  EXPECT_NEAR(table[1000 * 128 + 10], -0.993055403, 2e-7);
  EXPECT_NEAR(table[1000 * 128 + 32], 0.865401089, 2e-7);
  EXPECT_NEAR(table[1000 * 128 + 64 + 32], 0.501079738, 2e-7);
  EXPECT_NEAR(table[1000 * 128 + 64 + 50], 0.004411520, 2e-7);
}

TEST(Rope, YarnMatchesTheHfFormulaWithAttentionFactor) {
  RopeConfig rope;
  rope.scaling = RopeScaling::kYarn;
  rope.factor = 16.0f;
  rope.original_max_position = 4096;
  const int dim = 64;
  // find_correction_range(32, 1, 64, 1e4, 4096) with truncation, then the linear ramp.
  auto correction_dim = [&](double rotations) {
    return dim * std::log(4096 / (rotations * 2 * std::numbers::pi)) / (2 * std::log(10000.0));
  };
  const double low = std::max(0.0, std::floor(correction_dim(32)));
  const double high = std::min(double(dim - 1), std::ceil(correction_dim(1)));
  EXPECT_EQ(low, 10);
  EXPECT_EQ(high, 23);
  const std::vector<float> inv_freq = rope_inverse_frequencies(rope, dim);
  for (int i = 0; i < dim / 2; ++i) {
    const double base = std::pow(10000.0, -2.0 * i / dim);
    const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
    const double expected = base / 16 * ramp + base * (1 - ramp);
    EXPECT_NEAR(inv_freq[i], expected, 2e-6 * expected) << i;
  }
  const double attention = 0.1 * std::log(16.0) + 1;
  EXPECT_NEAR(rope_attention_factor(rope), attention, 1e-7);
  const std::vector<float> table = rope_cos_sin_table(rope, dim, 5001);
  EXPECT_NEAR(table[3 * 64 + 0], std::cos(3.0) * attention, 1e-6);
  // transformers 5.24 at position 5000 (cos and sin include the attention factor 1.27726).
  EXPECT_NEAR(table[5000 * 64 + 12], -1.246328115, 3e-7);
  EXPECT_NEAR(table[5000 * 64 + 32 + 20], -1.218904614, 3e-7);
  EXPECT_NEAR(table[5000 * 64 + 31], 1.276149988, 3e-7);
  rope.attention_factor = 1.3f;  // an explicit factor wins
  EXPECT_NEAR(rope_cos_sin_table(rope, dim, 1)[0], 1.3f, 1e-7);
}

TEST(Rope, RejectsUnsupportedAndInconsistentConfigs) {
  RopeConfig rope;
  rope.scaling = RopeScaling::kDynamicNtk;
  expect_invalid([&] { rope_cos_sin_table(rope, 64, 16); },
                 {"dynamic NTK rope scaling is not supported yet"});
  rope.scaling = RopeScaling::kYarn;
  rope.factor = 4.0f;
  expect_invalid([&] { rope_cos_sin_table(rope, 64, 16); }, {"original_max_position"});
  rope.scaling = RopeScaling::kNone;
  rope.rotary_dim = 66;
  expect_invalid([&] { rope_cos_sin_table(rope, 64, 16); }, {"rotary_dim is 66"});
  rope.rotary_dim = 0;
  expect_invalid([&] { rope_cos_sin_table(rope, 64, 0); }, {"max_position is 0"});
}

}  // namespace
}  // namespace octavo

// CPU reference GEMM: out[m, n] = sum_k in[m, k] * weight[n, k] (+ bias[n]) (+ out[m, n]).
//
// Work decomposition: the output is cut into kTileM x kTileN tiles, spread over OpenMP threads
// (collapsed over both axes, so decode's single row still splits over n and a narrow projection
// still splits over m). For each tile, k is walked in kTileK slices; each slice of the weight is
// converted to fp32 and transposed into a per-thread [kTileK][kTileN] panel (bf16/fp16 weights are
// converted on the fly, a panel at a time, never as a whole matrix), then a register-blocked
// kRowsPerStep x kColsPerStep micro-kernel accumulates in fp32 with the panel row as the
// contiguous, vectorised axis.
//
// Every output element sums its k products in increasing k order, one fp32 add at a time (then
// adds bias, then the old out), so its bits depend neither on the thread count and tiling nor on
// the other rows of the batch: a request computed alone matches the same request batched.
// Bounded by the fp32 multiply-add rate of the baseline vector ISA (the build sets no -march) for
// large m, and by packing (converting and transposing) the weight panels for decode's small m.
// `in` and `out` must not overlap.
#include <algorithm>
#include <string>
#include <vector>

#include <octavo/error.h>

#include "backend/cpu/dtype.h"
#include "backend/ops.h"

namespace octavo::cpu {

namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 128;  // a 128 x 64 fp32 panel is 32 KiB: stays in L1/L2 across the m rows
constexpr int kRowsPerStep = 4;
constexpr int kColsPerStep = 16;
static_assert(kTileN % kColsPerStep == 0);

// acc[r][0:kColsPerStep] += sum_kk a_r[kk] * panel[kk][0:kColsPerStep] for kRows rows. `panel`
// points at the first column of this column block in a [kTileK][kTileN] panel.
template <int kRows>
void micro_kernel(const float* const* a, int kb, const float* panel, float* acc, int acc_stride) {
  float c[kRows][kColsPerStep];
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kColsPerStep; ++j) c[r][j] = acc[r * acc_stride + j];
  }
  for (int kk = 0; kk < kb; ++kk) {
    const float* b = panel + kk * kTileN;
    for (int r = 0; r < kRows; ++r) {
      const float av = a[r][kk];
#pragma omp simd
      for (int j = 0; j < kColsPerStep; ++j) c[r][j] += av * b[j];
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int j = 0; j < kColsPerStep; ++j) acc[r * acc_stride + j] = c[r][j];
  }
}

// Converts weight rows [n0, n0 + nb) x columns [k0, k0 + kb) to fp32, transposed into
// panel[kk][j]; columns j >= nb are zero so the micro-kernel always runs full width.
void pack_weight_panel(const void* weight, DType dtype, int64_t k, int64_t n0, int nb, int64_t k0,
                       int kb, float* row_buffer, float* panel) {
  for (int j = 0; j < nb; ++j) {
    load_row(weight, dtype, (n0 + j) * k + k0, kb, row_buffer);
    for (int kk = 0; kk < kb; ++kk) panel[kk * kTileN + j] = row_buffer[kk];
  }
  if (nb < kTileN) {
    for (int kk = 0; kk < kb; ++kk) {
      std::fill(panel + kk * kTileN + nb, panel + (kk + 1) * kTileN, 0.0f);
    }
  }
}

std::string str(long long value) { return std::to_string(value); }

}  // namespace

void gemm(const GemmParams& p) {
  require_fp32_activations(p.act_dtype, "gemm");
  require_fp32_activations(p.out_dtype, "gemm output");
  require_valid_dtype(p.weight_dtype, "gemm", "weight");
  if (p.m < 0 || p.n < 0 || p.k < 0) {
    throw InvalidArgument("gemm: shape m=" + str(p.m) + " n=" + str(p.n) + " k=" + str(p.k) +
                          " has a negative dimension");
  }
  if (p.in_stride < p.k || p.out_stride < p.n) {
    throw InvalidArgument("gemm: in_stride " + str(p.in_stride) + " must be >= k (" + str(p.k) +
                          ") and out_stride " + str(p.out_stride) + " >= n (" + str(p.n) + ")");
  }
  if (p.m == 0 || p.n == 0) return;

  const auto* in = static_cast<const float*>(p.in);
  auto* out = static_cast<float*>(p.out);
  std::vector<float> bias;
  if (p.bias_f32 != nullptr) {
    bias.assign(p.bias_f32, p.bias_f32 + p.n);
  } else if (p.bias != nullptr) {
    bias.resize(p.n);
    load_row(p.bias, p.weight_dtype, 0, p.n, bias.data());
  }
  const int num_m_tiles = (p.m + kTileM - 1) / kTileM;
  const int num_n_tiles = (p.n + kTileN - 1) / kTileN;

  // Tiny products (a test's, a toy model's) run on the calling thread.
  const int64_t flops = int64_t{p.m} * p.n * p.k;
#pragma omp parallel if (flops >= (int64_t{1} << 16))
  {
    std::vector<float> panel(size_t{kTileK} * kTileN);
    std::vector<float> row_buffer(kTileK);
    std::vector<float> acc(size_t{kTileM} * kTileN);
#pragma omp for collapse(2) schedule(static)
    for (int tn = 0; tn < num_n_tiles; ++tn) {
      for (int tm = 0; tm < num_m_tiles; ++tm) {
        const int64_t n0 = int64_t{tn} * kTileN;
        const int64_t m0 = int64_t{tm} * kTileM;
        const int nb = int(std::min<int64_t>(kTileN, p.n - n0));
        const int mb = int(std::min<int64_t>(kTileM, p.m - m0));
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t k0 = 0; k0 < p.k; k0 += kTileK) {
          const int kb = int(std::min<int64_t>(kTileK, p.k - k0));
          pack_weight_panel(p.weight, p.weight_dtype, p.k, n0, nb, k0, kb, row_buffer.data(),
                            panel.data());
          for (int r0 = 0; r0 < mb; r0 += kRowsPerStep) {
            const int rows = std::min(kRowsPerStep, mb - r0);
            const float* a[kRowsPerStep];
            for (int r = 0; r < rows; ++r) a[r] = in + (m0 + r0 + r) * p.in_stride + k0;
            for (int j0 = 0; j0 < nb; j0 += kColsPerStep) {
              float* acc_block = acc.data() + r0 * kTileN + j0;
              const float* panel_block = panel.data() + j0;
              switch (rows) {
                case 4: micro_kernel<4>(a, kb, panel_block, acc_block, kTileN); break;
                case 3: micro_kernel<3>(a, kb, panel_block, acc_block, kTileN); break;
                case 2: micro_kernel<2>(a, kb, panel_block, acc_block, kTileN); break;
                default: micro_kernel<1>(a, kb, panel_block, acc_block, kTileN); break;
              }
            }
          }
        }
        for (int r = 0; r < mb; ++r) {
          float* y = out + (m0 + r) * p.out_stride + n0;
          const float* sum = acc.data() + r * kTileN;
          for (int j = 0; j < nb; ++j) {
            float value = sum[j];
            if (!bias.empty()) value += bias[n0 + j];
            if (p.accumulate) value += y[j];
            y[j] = value;
          }
        }
      }
    }
  }
}

}  // namespace octavo::cpu

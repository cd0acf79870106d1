// GEMM through cuBLASLt: out[m, n] = in[m, k] . weight[n, k]^T (+ bias) (+ out), bf16/fp16 in,
// fp32 accumulation, out in the act dtype or fp32 (logits). The algorithm is chosen once per
// shape by cuBLASLt's heuristic and cached; the bias rides in the epilogue. Calls of a few rows
// (decode at small batches) go to cuda/gemv.cu instead.
//
// cuBLASLt is column-major: a row-major [m, n] output is a column-major [n, m] matrix, so the
// call computes out^T = weight . in^T with weight as A (transposed) and in as B.
#include "cuda/gemm.h"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <string>

#include <octavo/error.h>

#include "cuda/cuda_ops.h"

namespace octavo::cuda {
namespace {

void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw BackendError(std::string("cuBLASLt ") + what + " failed: " +
                       cublasLtGetStatusString(status));
  }
}

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return CUDA_R_32F;
    case DType::kFloat16: return CUDA_R_16F;
    case DType::kBFloat16: return CUDA_R_16BF;
  }
  return CUDA_R_32F;
}

// Owns the descriptors of one call shape.
struct Descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  ~Descriptors() {
    if (op) cublasLtMatmulDescDestroy(op);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (c) cublasLtMatrixLayoutDestroy(c);
  }
};

}  // namespace

struct GemmRunner::Plan {
  Descriptors descriptors;
  cublasLtMatmulAlgo_t algo;
};

GemmRunner::GemmRunner(void* workspace, size_t workspace_bytes)
    : workspace_(workspace), workspace_bytes_(workspace_bytes) {
  check(cublasLtCreate(reinterpret_cast<cublasLtHandle_t*>(&handle_)), "create");
}

GemmRunner::~GemmRunner() {
  plans_.clear();
  if (handle_) cublasLtDestroy(static_cast<cublasLtHandle_t>(handle_));
}

const GemmRunner::Plan& GemmRunner::plan(const GemmParams& p) {
  const int bias_kind = p.bias_f32 ? 2 : p.bias ? 1 : 0;
  const Key key{p.m, p.n, p.k, p.in_stride, p.out_stride, bias_kind, p.accumulate,
                uint8_t(p.act_dtype), uint8_t(p.out_dtype)};
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;

  auto plan = std::make_unique<Plan>();
  Descriptors& d = plan->descriptors;
  check(cublasLtMatmulDescCreate(&d.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmul desc");
  const cublasOperation_t transa = CUBLAS_OP_T, transb = CUBLAS_OP_N;
  check(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &transa, sizeof transa),
        "set transa");
  check(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &transb, sizeof transb),
        "set transb");
  if (bias_kind != 0) {
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
    check(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue,
                                         sizeof epilogue),
          "set epilogue");
    const cudaDataType_t bias_type = bias_kind == 2 ? CUDA_R_32F : cuda_type(p.weight_dtype);
    check(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                         sizeof bias_type),
          "set bias type");
  }
  // A = weight: column-major [k, n] (row-major [n, k]), used transposed.
  check(cublasLtMatrixLayoutCreate(&d.a, cuda_type(p.weight_dtype), p.k, p.n, p.k), "layout A");
  // B = in: column-major [k, m] with leading dimension in_stride.
  check(cublasLtMatrixLayoutCreate(&d.b, cuda_type(p.act_dtype), p.k, p.m, p.in_stride), "layout B");
  // C = D = out: column-major [n, m] with leading dimension out_stride.
  check(cublasLtMatrixLayoutCreate(&d.c, cuda_type(p.out_dtype), p.n, p.m, p.out_stride), "layout C");

  cublasLtMatmulPreference_t preference = nullptr;
  check(cublasLtMatmulPreferenceCreate(&preference), "preference");
  check(cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &workspace_bytes_, sizeof workspace_bytes_),
        "set workspace");
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      static_cast<cublasLtHandle_t>(handle_), d.op, d.a, d.b, d.c, d.c, preference, 1, &result,
      &found);
  cublasLtMatmulPreferenceDestroy(preference);
  check(status, "heuristic");
  if (found == 0) {
    throw BackendError("cuBLASLt has no algorithm for gemm m=" + std::to_string(p.m) +
                       " n=" + std::to_string(p.n) + " k=" + std::to_string(p.k));
  }
  plan->algo = result.algo;
  return *plans_.emplace(key, std::move(plan)).first->second;
}

void GemmRunner::run(const GemmParams& p, void* stream) {
  if (p.m == 0 || p.n == 0) return;
  if (p.act_dtype == DType::kFloat32 || p.weight_dtype != p.act_dtype) {
    throw InvalidArgument("gemm: the CUDA backend multiplies bf16 or fp16 activations by weights of "
                          "the same dtype");
  }
  if (p.bias_f32 && p.out_dtype != DType::kFloat32) {
    throw InvalidArgument("gemm: an fp32 bias (bias_f32) needs a float32 output");
  }
  if (p.out_dtype != p.act_dtype && p.out_dtype != DType::kFloat32) {
    throw InvalidArgument("gemm: the output must be in the activation dtype or float32");
  }
  if (gemv_supports(p)) return gemv(p, stream);
  const Plan& plan = this->plan(p);
  const float alpha = 1.0f, beta = p.accumulate ? 1.0f : 0.0f;
  if (p.bias_f32 || p.bias) {
    const void* bias = p.bias_f32 ? static_cast<const void*>(p.bias_f32) : p.bias;
    check(cublasLtMatmulDescSetAttribute(plan.descriptors.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                         &bias, sizeof bias),
          "set bias");
  }
  check(cublasLtMatmul(static_cast<cublasLtHandle_t>(handle_), plan.descriptors.op, &alpha,
                       p.weight, plan.descriptors.a, p.in, plan.descriptors.b, &beta, p.out,
                       plan.descriptors.c, p.out, plan.descriptors.c, &plan.algo, workspace_,
                       workspace_bytes_, static_cast<cudaStream_t>(stream)),
        "matmul");
}

}  // namespace octavo::cuda

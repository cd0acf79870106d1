// Hopper (sm_90a only) building blocks for the attention kernels: warpgroup MMA (shared memory
// descriptors for the 128-byte swizzled layout, the issue/commit/wait sequence, the two
// m64n128k16 shapes the prefill kernel needs), shared-memory barriers, tensor copies and
// register reallocation between warpgroups. Every wrapper compiles to nothing outside the sm_90a
// pass (OCTAVO_WGMMA is 0 there), so callers guard their bodies with the same macro and the host
// must launch them only on a compute-capability 9.0 device of a build that includes 90a.
//
// Layout contract (one "tile" = rows of 64 16-bit elements, 128 bytes each): row r's 16-byte
// chunk c lives at row * 128 + ((c ^ (r % 8)) * 16), tiles start 1024-byte aligned. Wider rows
// (head dim 128) are stored as consecutive 64-column tiles. Read K-major (rows = M or N, columns
// = K) this is the canonical 128B-swizzle layout with 8-row groups 1024 bytes apart; read
// MN-major (rows = K, columns = N) the 64-column tiles are the N blocks.
#pragma once

#include <cstdint>
#include <type_traits>

#include "compat.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define OCTAVO_WGMMA 1
#else
#define OCTAVO_WGMMA 0
#endif

namespace octavo::cuda::wgmma {

inline constexpr int kRowBytes = 128;  // one swizzled row: 64 16-bit elements
inline constexpr int kGroupBytes = 8 * kRowBytes;

/// Byte offset of 16-byte chunk `chunk` (0-7) of row `row` inside a swizzled 64-column tile.
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  return uint32_t(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

/// Descriptor of a 128B-swizzled operand starting at shared address `address` (16-byte units in
/// the fields). `leading` is the byte distance between 64-column tiles along N for an MN-major
/// operand (unused for K-major); `stride` the distance between 8-row groups.
__device__ __forceinline__ uint64_t descriptor(uint32_t address, uint32_t leading, uint32_t stride) {
  uint64_t d = (address & 0x3FFFFu) >> 4;
  d |= uint64_t((leading >> 4) & 0x3FFFu) << 16;
  d |= uint64_t((stride >> 4) & 0x3FFFu) << 32;
  d |= uint64_t(1) << 62;  // 128-byte swizzle
  return d;
}

/// Orders this thread's earlier register writes before the next wgmma reads them.
__device__ __forceinline__ void fence() {
#if OCTAVO_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void commit() {
#if OCTAVO_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
/// Waits until at most `Pending` committed groups of this warpgroup are still running.
template <int Pending>
__device__ __forceinline__ void wait() {
#if OCTAVO_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
#endif
}
/// Shared memory written by ordinary stores or cp.async becomes visible to the tensor cores'
/// (async proxy) reads after this, once a barrier follows.
__device__ __forceinline__ void fence_shared_for_async_reads() {
#if OCTAVO_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// ---- shared-memory barriers (mbarrier) and register reallocation, sm_90 ---------------------------

__device__ __forceinline__ void barrier_init(uint32_t address, int count) {
#if OCTAVO_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(address), "r"(count) : "memory");
#endif
}
/// One arrival on the barrier's current phase (release semantics: this thread's earlier shared
/// memory accesses are visible to a thread that waits out the phase).
__device__ __forceinline__ void barrier_arrive(uint32_t address) {
#if OCTAVO_WGMMA
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(address)
               : "memory");
#endif
}
/// One arrival on the barrier once every cp.async this thread issued so far has landed; the
/// thread goes on at once. The arrival counts toward the count given at init (.noinc).
__device__ __forceinline__ void barrier_arrive_on_copies(uint32_t address) {
#if OCTAVO_WGMMA
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(address) : "memory");
#endif
}
/// One arrival that also expects `bytes` more of tensor-copy data before the phase completes.
__device__ __forceinline__ void barrier_arrive_expect_bytes(uint32_t address, uint32_t bytes) {
#if OCTAVO_WGMMA
  asm volatile(
      "{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(
          address),
      "r"(bytes)
      : "memory");
#endif
}
/// Tensor copy (TMA) of one box of the 5-D tensor `map` (a __grid_constant__ kernel parameter)
/// at coordinates c0..c4 (innermost first) to shared `address`; its bytes count toward the
/// barrier's expected bytes.
__device__ __forceinline__ void tensor_load_5d(uint32_t address, const void* map, int c0, int c1,
                                               int c2, int c3, int c4, uint32_t barrier) {
#if OCTAVO_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3, %4, %5, %6}], [%7];\n" ::"r"(address),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(barrier)
      : "memory");
#endif
}
/// Tensor copy of one box of the 3-D tensor `map` at coordinates c0..c2, as tensor_load_5d.
__device__ __forceinline__ void tensor_load_3d(uint32_t address, const void* map, int c0, int c1,
                                               int c2, uint32_t barrier) {
#if OCTAVO_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
      "%3, %4}], [%5];\n" ::"r"(address),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(barrier)
      : "memory");
#endif
}
/// Tensor copy of shared `address` to one box of the 3-D tensor `map` at coordinates c0..c2, in
/// this thread's bulk group. Before it, every thread that wrote the box must have run
/// fence_shared_for_async_reads() and met the issuing thread at a barrier.
__device__ __forceinline__ void tensor_store_3d(const void* map, int c0, int c1, int c2,
                                                uint32_t address) {
#if OCTAVO_WGMMA
  asm volatile(
      "cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%1, %2, %3}], [%4];\n" ::"l"(
          map),
      "r"(c0), "r"(c1), "r"(c2), "r"(address)
      : "memory");
#endif
}
/// Closes this thread's bulk group and waits until its copies have read their shared memory
/// (the CTA may then exit or reuse it; the global writes complete on their own).
__device__ __forceinline__ void bulk_stores_read_shared() {
#if OCTAVO_WGMMA
  asm volatile("cp.async.bulk.commit_group;\ncp.async.bulk.wait_group.read 0;\n" ::: "memory");
#endif
}
/// Waits until the phase with parity `parity` has completed (acquire).
__device__ __forceinline__ void barrier_wait(uint32_t address, uint32_t parity) {
#if OCTAVO_WGMMA
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(address), "r"(parity)
        : "memory");
  } while (!done);
#endif
}
/// Barrier `id` (1-15; 0 is __syncthreads) among `threads` threads of the CTA.
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
/// Counts this thread's arrival at barrier `id` without waiting for it.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
/// Moves registers between warpgroups: every warp of the warpgroup runs the same one.
template <int Registers>
__device__ __forceinline__ void shrink_registers() {
#if OCTAVO_WGMMA
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Registers));
#endif
}
template <int Registers>
__device__ __forceinline__ void grow_registers() {
#if OCTAVO_WGMMA
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Registers));
#endif
}

/// Pins `r` in place for the compiler: a wgmma writes its accumulators asynchronously, so reads
/// of them must not be hoisted above the wait, nor writes of its inputs above the issue.
template <int N>
__device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void pin(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

#define OCTAVO_WGMMA_D64                                                                     \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "  \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "    \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "    \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define OCTAVO_WGMMA_D8(b)                                                                   \
  "+f"(d[b]), "+f"(d[b + 1]), "+f"(d[b + 2]), "+f"(d[b + 3]), "+f"(d[b + 4]), "+f"(d[b + 5]), \
      "+f"(d[b + 6]), "+f"(d[b + 7])
#define OCTAVO_WGMMA_D64_OPERANDS                                                            \
  OCTAVO_WGMMA_D8(0), OCTAVO_WGMMA_D8(8), OCTAVO_WGMMA_D8(16), OCTAVO_WGMMA_D8(24),          \
      OCTAVO_WGMMA_D8(32), OCTAVO_WGMMA_D8(40), OCTAVO_WGMMA_D8(48), OCTAVO_WGMMA_D8(56)

/// d (64 x 128, fp32) = a (64 x 16) * b (16 x 128) [+ d when `accumulate`]; a and b K-major in
/// shared memory. Accumulator layout per warp w of the warpgroup (rows 16w..16w+15): d[4j + i]
/// holds row lane / 4 + 8 * (i / 2), column 8j + 2 * (lane % 4) + i % 2.
template <typename T>
__device__ __forceinline__ void mma_m64n128k16_ss(float (&d)[64], uint64_t a, uint64_t b,
                                                   bool accumulate) {
#if OCTAVO_WGMMA
  if constexpr (std::is_same_v<T, gpu::bf16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " OCTAVO_WGMMA_D64
        ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : OCTAVO_WGMMA_D64_OPERANDS
        : "l"(a), "l"(b), "r"(int(accumulate)));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " OCTAVO_WGMMA_D64
        ", %64, %65, p, 1, 1, 0, 0;\n}\n"
        : OCTAVO_WGMMA_D64_OPERANDS
        : "l"(a), "l"(b), "r"(int(accumulate)));
  }
#endif
}

/// d (64 x 128, fp32) += a (64 x 16, registers) * b (16 x 128, MN-major in shared memory). a is
/// the m16n8k16 A fragment of the warp's 16 rows (mma.sync's layout).
template <typename T>
__device__ __forceinline__ void mma_m64n128k16_rs(float (&d)[64], const uint32_t (&a)[4],
                                                   uint64_t b) {
#if OCTAVO_WGMMA
  if constexpr (std::is_same_v<T, gpu::bf16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " OCTAVO_WGMMA_D64
        ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : OCTAVO_WGMMA_D64_OPERANDS
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " OCTAVO_WGMMA_D64
        ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : OCTAVO_WGMMA_D64_OPERANDS
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(1));
  }
#endif
}

#undef OCTAVO_WGMMA_D64
#undef OCTAVO_WGMMA_D8
#undef OCTAVO_WGMMA_D64_OPERANDS

}  // namespace octavo::cuda::wgmma

// octavo._C.ops: each backend op over arrays (numpy on the CPU, torch/cupy on the GPU through
// DLPack), dispatched by the arrays' device. Used by the tests that hold GPU ops to the CPU ones.
#include <nanobind/ndarray.h>

#include <string>

#include <octavo/error.h>

#include "backend/ops.h"
#include "python/array_util.h"
#include "python/bindings.h"

namespace nb = nanobind;

namespace {

using Copies = nb::ndarray<const int32_t, nb::shape<-1, 2>, nb::c_contig>;

bool on_cuda(int device_type) { return device_type == nb::device::cuda::value; }

void copy_blocks(nb::ndarray<nb::c_contig> cache, Copies copies, int num_layers, int num_blocks,
                 uintptr_t stream) {
  const size_t total_bytes = cache.nbytes();
  if (num_layers <= 0 || num_blocks <= 0 || total_bytes % (size_t(num_layers) * num_blocks) != 0) {
    throw octavo::InvalidArgument("copy_blocks: a cache of " + std::to_string(total_bytes) +
                                  " bytes does not split into " + std::to_string(num_layers) +
                                  " layers of " + std::to_string(num_blocks) + " blocks");
  }
  if (cache.device_type() != copies.device_type()) {
    throw octavo::InvalidArgument("copy_blocks: cache and copies are on different devices");
  }
  octavo::CopyBlocksParams params{};
  params.cache = cache.data();
  params.layer_stride = int64_t(total_bytes / num_layers);
  params.block_bytes = params.layer_stride / num_blocks;
  params.num_layers = num_layers;
  params.num_blocks = num_blocks;
  params.copies = reinterpret_cast<const octavo::BlockCopy*>(copies.data());
  params.num_copies = int32_t(copies.shape(0));
  if (on_cuda(cache.device_type())) {
    return OCTAVO_ON_CUDA(copy_blocks(params, octavo::python::as_stream(stream)));
  }
  octavo::cpu::copy_blocks(params);
}

}  // namespace

void bind_ops(nb::module_& m) {
  nb::module_ ops = m.def_submodule("ops", "Backend ops over arrays, dispatched by device.");
  ops.def("copy_blocks", &copy_blocks, nb::arg("cache"), nb::arg("copies"), nb::arg("num_layers"),
          nb::arg("num_blocks"), nb::arg("stream") = 0,
          "Copy block src over block dst in every layer for each (src, dst) row of `copies`.\n"
          "`cache` is the whole KV pool, [num_layers][num_blocks][...] contiguous.");
  // Each op family binds itself below (one line each).
  bind_ops_attention(ops);
  bind_ops_elementwise(ops);
  bind_ops_sampling(ops);
}

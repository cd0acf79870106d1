#include <cstring>
#include <string>

#include <octavo/error.h>

#include "backend/ops.h"

namespace octavo::cpu {

void copy_blocks(const CopyBlocksParams& params) {
  auto* base = static_cast<std::byte*>(params.cache);
  for (int32_t i = 0; i < params.num_copies; ++i) {
    const BlockCopy copy = params.copies[i];
    if (copy.src < 0 || copy.src >= params.num_blocks || copy.dst < 0 ||
        copy.dst >= params.num_blocks) {
      throw InvalidArgument("copy_blocks: pair " + std::to_string(i) + " (" +
                            std::to_string(copy.src) + " -> " + std::to_string(copy.dst) +
                            ") is outside the pool of " + std::to_string(params.num_blocks) +
                            " blocks");
    }
    for (int32_t layer = 0; layer < params.num_layers; ++layer) {
      std::byte* layer_base = base + layer * params.layer_stride;
      std::memcpy(layer_base + copy.dst * params.block_bytes,
                  layer_base + copy.src * params.block_bytes, params.block_bytes);
    }
  }
}

}  // namespace octavo::cpu

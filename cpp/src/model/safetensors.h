// Reading .safetensors checkpoints: one file is mapped read-only and its tensors are views into the
// mapping (zero copy; the OS pages weights in as they are read).
//
// The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N,
// N bytes of JSON header, then the data section. The header maps each tensor name to
//   {"dtype": "BF16", "shape": [4096, 4096], "data_offsets": [begin, end]}
// with offsets relative to the data section, plus an optional "__metadata__" string map.
// Every check that a malformed or truncated file can fail is made when the file is opened, so a
// SafetensorsFile that exists only ever hands out in-bounds views.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "backend/ops.h"

namespace octavo {

/// One tensor as the header describes it, of any dtype the file holds.
struct SafetensorsEntry {
  std::string name;
  /// As written in the header: "F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", ...
  std::string dtype_name;
  /// Set for the dtypes octavo computes with (F32, F16, BF16); empty for every other dtype.
  std::optional<DType> dtype;
  std::vector<int64_t> shape;  // row-major; [] is a scalar
  const std::byte* data = nullptr;  // nbytes bytes inside the mapping; valid while the file lives
  uint64_t nbytes = 0;
  uint64_t file_offset = 0;  // where data starts, from the beginning of the file

  int64_t numel() const;
};

/// A tensor octavo can compute with: dense, row-major, F32, F16 or BF16. Not necessarily aligned
/// beyond what the file gives (writers of the safetensors library align the data section to 8 bytes).
struct TensorView {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // valid while the SafetensorsFile it came from lives
  size_t nbytes = 0;

  int64_t numel() const;
};

/// A .safetensors file mapped read-only. Movable (views stay valid across a move: the mapping does
/// not move), not copyable; unmaps when destroyed. Read-only after construction, so it may be
/// shared between threads.
class SafetensorsFile {
 public:
  /// Maps `path` and validates the whole header. Throws FormatError naming the path and the problem
  /// (too short, bad header length, invalid JSON, malformed entry, tensor past the end of the data
  /// section, byte size that does not match dtype and shape, overlapping tensors).
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  /// Every tensor, in header order (for files the safetensors library writes, also data order).
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  /// Tensor names in header order.
  std::vector<std::string> names() const;
  size_t size() const { return entries_.size(); }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  /// The header entry of `name`, whatever its dtype. Throws FormatError "tensor 'X' not found in F".
  const SafetensorsEntry& entry(const std::string& name) const;
  /// `name` as a view octavo computes with. Throws FormatError when it is missing or its dtype is
  /// not F32, F16 or BF16.
  TensorView tensor(const std::string& name) const;
  /// The header's "__metadata__" (e.g. {"format": "pt"}); empty when the header has none.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Size of the whole file in bytes.
  uint64_t file_size() const { return file_size_; }

 private:
  void unmap() noexcept;

  std::string path_;
  void* mapping_ = nullptr;  // the whole file, PROT_READ, MAP_PRIVATE
  uint64_t file_size_ = 0;
  std::vector<SafetensorsEntry> entries_;
  std::unordered_map<std::string, size_t> index_;  // name -> position in entries_
  std::map<std::string, std::string> metadata_;
};

/// The safetensors files of a model directory, as paths (dir + "/" + file name):
///   - model.safetensors.index.json present: the shard files its "weight_map" names, each once, in
///     order of first appearance (every listed shard must exist);
///   - else model.safetensors when present;
///   - else every *.safetensors file in the directory, sorted by name.
/// Throws FormatError naming the directory when it holds none, or naming the index when it is
/// malformed.
std::vector<std::string> find_safetensors_files(const std::string& dir);

}  // namespace octavo

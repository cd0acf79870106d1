// The header is read by a small schema-driven JSON reader (model/json.h) rather than into a
// document tree: a header may be up to 100 MB of attacker-shaped bytes, and only what safetensors
// defines (names, dtypes, shapes, offsets, a string map) is ever stored.
#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string_view>
#include <unordered_set>
#include <utility>

#include <octavo/error.h>

#include "model/json.h"

namespace octavo {
namespace {

// Beyond any real checkpoint (a 400B-parameter shard's header is a few hundred KB); the safetensors
// library refuses the same.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// Real tensors have at most a handful of dimensions; numpy allows 64.
constexpr size_t kMaxRank = 64;
// Names quoted in messages are cut to this many bytes, so an absurd name cannot make an absurd
// error message.
constexpr size_t kMaxQuotedBytes = 200;

std::string quote(std::string_view text) {
  if (text.size() <= kMaxQuotedBytes) return "'" + std::string(text) + "'";
  size_t cut = kMaxQuotedBytes;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;  // UTF-8 boundary
  return "'" + std::string(text.substr(0, cut)) + "...'";
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

struct DTypeInfo {
  std::string_view name;
  int bits;  // per element; sub-byte types pack elements
};

// Every dtype the safetensors format defines (as of safetensors 0.6).
constexpr DTypeInfo kDTypes[] = {
    {"BOOL", 8},    {"U8", 8},       {"I8", 8},       {"F8_E5M2", 8}, {"F8_E4M3", 8},
    {"F8_E8M0", 8}, {"I16", 16},     {"U16", 16},     {"F16", 16},    {"BF16", 16},
    {"I32", 32},    {"U32", 32},     {"F32", 32},     {"F64", 64},    {"I64", 64},
    {"U64", 64},    {"C64", 64},     {"F4", 4},       {"F6_E2M3", 6}, {"F6_E3M2", 6},
};

const DTypeInfo* find_dtype(std::string_view name) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.name == name) return &info;
  }
  return nullptr;
}

std::optional<DType> compute_dtype(std::string_view name) {
  if (name == "F32") return DType::kFloat32;
  if (name == "F16") return DType::kFloat16;
  if (name == "BF16") return DType::kBFloat16;
  return std::nullopt;
}

std::string known_dtype_list() {
  std::string out;
  for (const DTypeInfo& info : kDTypes) out += (out.empty() ? "" : ", ") + std::string(info.name);
  return out;
}

int64_t shape_numel(const std::vector<int64_t>& shape) {
  int64_t numel = 1;
  for (int64_t dim : shape) numel *= dim;
  return numel;
}

uint64_t read_le64(const unsigned char* p) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | p[i];
  return value;
}

// Where a file's data section is, for checking entries against it.
struct DataSection {
  const std::byte* begin;
  uint64_t bytes;
  uint64_t file_offset;  // 8 + header length
};

std::vector<int64_t> read_shape(JsonReader& json, const std::string& context) {
  if (json.peek() != '[') throw FormatError(context + "'shape' is not an array");
  std::vector<int64_t> shape;
  json.read_array([&](size_t index) {
    if (index >= kMaxRank) {
      throw FormatError(context + "'shape' has more than " + std::to_string(kMaxRank) + " dimensions");
    }
    const JsonNumber dim = json.next_is_number() ? json.read_number() : JsonNumber{true, false, false, 0};
    if (!dim.is_uint64() || dim.magnitude > uint64_t(INT64_MAX)) {
      throw FormatError(context + "'shape' holds a value that is not a non-negative 64-bit integer");
    }
    shape.push_back(int64_t(dim.magnitude));
  });
  return shape;
}

std::pair<uint64_t, uint64_t> read_data_offsets(JsonReader& json, const std::string& context) {
  if (json.peek() != '[') throw FormatError(context + "'data_offsets' is not an array [begin, end]");
  uint64_t offsets[2] = {0, 0};
  size_t count = 0;
  json.read_array([&](size_t index) {
    if (index >= 2) throw FormatError(context + "'data_offsets' has more than 2 values; expected [begin, end]");
    const JsonNumber offset = json.next_is_number() ? json.read_number() : JsonNumber{true, false, false, 0};
    if (!offset.is_uint64()) {
      throw FormatError(context + "'data_offsets' holds a value that is not a non-negative 64-bit integer");
    }
    offsets[index] = offset.magnitude;
    count = index + 1;
  });
  if (count != 2) {
    throw FormatError(context + "'data_offsets' has " + std::to_string(count) + " values; expected [begin, end]");
  }
  return {offsets[0], offsets[1]};
}

// The byte count a tensor's dtype and shape call for must be exactly what its offsets span.
void check_byte_size(const SafetensorsEntry& entry, int dtype_bits, const std::string& context) {
  // Bits of all elements, in 128 bits: each factor is below 2^64 and the product stops growing
  // once it passes 2^64 bits, far beyond any byte count a file can hold.
  const auto kLimit = (unsigned __int128)(UINT64_MAX);
  unsigned __int128 bits = unsigned(dtype_bits);
  if (std::find(entry.shape.begin(), entry.shape.end(), 0) != entry.shape.end()) bits = 0;
  for (int64_t dim : entry.shape) {
    if (bits > kLimit) break;
    bits *= uint64_t(dim);
  }
  if (bits == (unsigned __int128)(entry.nbytes) * 8) return;
  const std::string needs = bits > kLimit    ? std::string("more than 2^64 bits")
                            : bits % 8 != 0 ? std::to_string(uint64_t(bits)) + " bits (not whole bytes)"
                                            : std::to_string(uint64_t(bits / 8)) + " bytes";
  throw FormatError(context + "data_offsets span " + std::to_string(entry.nbytes) + " bytes but shape " +
                    shape_string(entry.shape) + " of " + entry.dtype_name + " needs " + needs);
}

// Reads one header entry {"dtype", "shape", "data_offsets"} and checks it against the data section.
SafetensorsEntry read_entry(JsonReader& json, const std::string& path, const std::string& name,
                            const DataSection& data) {
  const std::string context = path + ": tensor " + quote(name) + ": ";
  if (json.peek() != '{') throw FormatError(context + "header entry is not an object");
  SafetensorsEntry entry;
  entry.name = name;
  bool has_dtype = false, has_shape = false, has_offsets = false;
  std::pair<uint64_t, uint64_t> offsets;
  json.read_object([&](const std::string& field) {
    if (field == "dtype") {
      if (!json.next_is_string()) throw FormatError(context + "'dtype' is not a string");
      entry.dtype_name = json.read_string();
      has_dtype = true;
    } else if (field == "shape") {
      entry.shape = read_shape(json, context);
      has_shape = true;
    } else if (field == "data_offsets") {
      offsets = read_data_offsets(json, context);
      has_offsets = true;
    } else {
      json.skip_value();  // tolerated: not part of the format
    }
  });
  if (!has_dtype) throw FormatError(context + "header entry has no 'dtype'");
  if (!has_shape) throw FormatError(context + "header entry has no 'shape'");
  if (!has_offsets) throw FormatError(context + "header entry has no 'data_offsets'");

  const DTypeInfo* dtype = find_dtype(entry.dtype_name);
  if (dtype == nullptr) {
    throw FormatError(context + "unknown dtype " + quote(entry.dtype_name) + " (known: " + known_dtype_list() +
                      ")");
  }
  entry.dtype = compute_dtype(entry.dtype_name);
  const auto [begin, end] = offsets;
  if (begin > end) {
    throw FormatError(context + "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                      "] end before they begin");
  }
  if (end > data.bytes) {
    throw FormatError(path + ": truncated: tensor " + quote(name) + " needs bytes up to " + std::to_string(end) +
                      " but the data section has " + std::to_string(data.bytes));
  }
  entry.nbytes = end - begin;
  check_byte_size(entry, dtype->bits, context);
  entry.data = data.begin + begin;
  entry.file_offset = data.file_offset + begin;
  return entry;
}

// Two tensors sharing bytes would let a write through one (never done here, but done by tools that
// patch checkpoints in place) change the other; the safetensors writer never produces it.
void check_no_overlap(const std::vector<SafetensorsEntry>& entries, const std::string& path,
                      const DataSection& data) {
  std::vector<const SafetensorsEntry*> by_offset;
  for (const SafetensorsEntry& entry : entries) {
    if (entry.nbytes != 0) by_offset.push_back(&entry);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const SafetensorsEntry* a, const SafetensorsEntry* b) { return a->data < b->data; });
  auto extent = [&](const SafetensorsEntry& entry) {
    const uint64_t begin = uint64_t(entry.data - data.begin);
    return "(bytes " + std::to_string(begin) + " to " + std::to_string(begin + entry.nbytes) + ")";
  };
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const SafetensorsEntry& prev = *by_offset[i - 1];
    const SafetensorsEntry& next = *by_offset[i];
    if (prev.data + prev.nbytes > next.data) {
      throw FormatError(path + ": tensors " + quote(prev.name) + " " + extent(prev) + " and " + quote(next.name) +
                        " " + extent(next) + " overlap in the data section");
    }
  }
}

}  // namespace

int64_t SafetensorsEntry::numel() const { return shape_numel(shape); }
int64_t TensorView::numel() const { return shape_numel(shape); }

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FormatError(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FormatError(path + ": not a regular file");
  }
  file_size_ = uint64_t(st.st_size);
  if (file_size_ < 8) {
    ::close(fd);
    throw FormatError(path + ": file is " + std::to_string(file_size_) +
                      " bytes, shorter than the 8-byte header length (truncated, or not a safetensors file)");
  }
  void* mapping = ::mmap(nullptr, file_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);  // the mapping keeps the file open
  if (mapping == MAP_FAILED) throw FormatError(path + ": cannot map the file: " + std::strerror(map_errno));
  mapping_ = mapping;

  try {
    const auto* bytes = static_cast<const unsigned char*>(mapping_);
    const uint64_t header_bytes = read_le64(bytes);
    if (header_bytes > kMaxHeaderBytes) {
      throw FormatError(path + ": header length " + std::to_string(header_bytes) +
                        " is absurd (over 100 MB): not a safetensors file, or a corrupt one");
    }
    if (header_bytes > file_size_ - 8) {
      throw FormatError(path + ": header length " + std::to_string(header_bytes) + " is larger than the file (" +
                        std::to_string(file_size_) + " bytes): truncated, or not a safetensors file");
    }
    const DataSection data{static_cast<const std::byte*>(mapping_) + 8 + header_bytes,
                           file_size_ - 8 - header_bytes, 8 + header_bytes};

    const std::string_view header(reinterpret_cast<const char*>(bytes + 8), header_bytes);
    JsonReader json(header, path + ": header: ");
    json.require_object();
    json.read_object([&](const std::string& key) {
      if (key == "__metadata__") {
        if (json.peek() != '{') json.fail("'__metadata__' is not an object");
        json.read_object([&](const std::string& meta_key) {
          if (!json.next_is_string()) {
            json.fail("'__metadata__' value of " + quote(meta_key) + " is not a string");
          }
          metadata_[meta_key] = json.read_string();
        });
        return;
      }
      if (index_.count(key)) {
        throw FormatError(path + ": tensor " + quote(key) + ": appears twice in the header");
      }
      entries_.push_back(read_entry(json, path, key, data));
      index_.emplace(key, entries_.size() - 1);
    });
    json.expect_end();
    check_no_overlap(entries_, path, data);
  } catch (...) {
    unmap();
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() { unmap(); }

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      mapping_(std::exchange(other.mapping_, nullptr)),
      file_size_(std::exchange(other.file_size_, 0)),
      entries_(std::move(other.entries_)),
      index_(std::move(other.index_)),
      metadata_(std::move(other.metadata_)) {}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    mapping_ = std::exchange(other.mapping_, nullptr);
    file_size_ = std::exchange(other.file_size_, 0);
    entries_ = std::move(other.entries_);
    index_ = std::move(other.index_);
    metadata_ = std::move(other.metadata_);
  }
  return *this;
}

void SafetensorsFile::unmap() noexcept {
  if (mapping_ != nullptr) ::munmap(mapping_, file_size_);
  mapping_ = nullptr;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> names;
  names.reserve(entries_.size());
  for (const SafetensorsEntry& entry : entries_) names.push_back(entry.name);
  return names;
}

const SafetensorsEntry& SafetensorsFile::entry(const std::string& name) const {
  const auto it = index_.find(name);
  if (it == index_.end()) throw FormatError("tensor " + quote(name) + " not found in " + path_);
  return entries_[it->second];
}

TensorView SafetensorsFile::tensor(const std::string& name) const {
  const SafetensorsEntry& found = entry(name);
  if (!found.dtype) {
    throw FormatError(path_ + ": tensor " + quote(name) + " has dtype " + found.dtype_name +
                      "; octavo reads only F32, F16 and BF16 weights");
  }
  TensorView view;
  view.name = found.name;
  view.dtype = *found.dtype;
  view.shape = found.shape;
  view.data = found.data;
  view.nbytes = size_t(found.nbytes);
  return view;
}

std::vector<std::string> find_safetensors_files(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code error;
  if (!fs::is_directory(dir, error)) {
    throw FormatError(dir + ": not a directory (expected a model directory)");
  }
  const fs::path root(dir);

  const fs::path index_path = root / "model.safetensors.index.json";
  if (fs::exists(index_path, error)) {
    const std::string index_name = index_path.string();
    std::ifstream in(index_path, std::ios::binary);
    if (!in) throw FormatError(index_name + ": cannot open");
    in.seekg(0, std::ios::end);
    const std::streamoff size = in.tellg();
    if (size < 0 || uint64_t(size) > kMaxHeaderBytes) {
      throw FormatError(index_name + ": unreadable, or over 100 MB");
    }
    std::string text(size_t(size), '\0');
    in.seekg(0);
    if (!in.read(text.data(), size)) throw FormatError(index_name + ": cannot read");

    JsonReader json(text, index_name + ": ");
    std::vector<std::string> files;
    std::unordered_set<std::string> seen;
    bool has_weight_map = false;
    json.require_object();
    json.read_object([&](const std::string& key) {
      if (key != "weight_map") {
        json.skip_value();
        return;
      }
      has_weight_map = true;
      if (json.peek() != '{') json.fail("'weight_map' is not an object");
      json.read_object([&](const std::string& tensor) {
        if (!json.next_is_string()) {
          json.fail("'weight_map' value of " + quote(tensor) + " is not a file name");
        }
        std::string file = json.read_string();
        if (seen.insert(file).second) files.push_back(std::move(file));
      });
    });
    json.expect_end();
    if (!has_weight_map) json.fail("no 'weight_map'");
    if (files.empty()) json.fail("'weight_map' is empty");
    std::vector<std::string> paths;
    for (const std::string& file : files) {
      const fs::path shard = root / file;
      if (file.empty() || !fs::is_regular_file(shard, error)) {
        throw FormatError(index_name + ": shard " + quote(file) + " named in 'weight_map' is missing from " +
                          dir);
      }
      paths.push_back(shard.string());
    }
    return paths;
  }

  const fs::path single = root / "model.safetensors";
  if (fs::is_regular_file(single, error)) return {single.string()};

  std::vector<std::string> paths;
  for (fs::directory_iterator it(root, error), end; !error && it != end; it.increment(error)) {
    if (it->path().extension() == ".safetensors" && it->is_regular_file(error)) {
      paths.push_back(it->path().string());
    }
  }
  std::sort(paths.begin(), paths.end());
  if (paths.empty()) {
    throw FormatError(dir + ": no safetensors weights (looked for model.safetensors.index.json, "
                      "model.safetensors and *.safetensors)");
  }
  return paths;
}

}  // namespace octavo

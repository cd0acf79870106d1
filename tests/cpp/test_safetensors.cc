// SafetensorsFile and find_safetensors_files on files written byte by byte here: valid files read
// back exactly, every malformed file fails with a FormatError that names the file and the problem,
// and no mutation of a valid file crashes or hangs the reader.
#include "model/safetensors.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <octavo/error.h>

namespace octavo {
namespace {

namespace fs = std::filesystem;

struct TensorSpec {
  std::string name;  // as it appears in JSON (already escaped)
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
};

template <typename T>
std::string bytes_of(const std::vector<T>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

std::string le64(uint64_t value) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = char((value >> (8 * i)) & 0xFF);
  return out;
}

// 8-byte length + header + data, the header padded with spaces to a multiple of 8 as the
// safetensors writer does.
std::string raw_file(std::string header, const std::string& data) {
  while (header.size() % 8 != 0) header += ' ';
  return le64(header.size()) + header + data;
}

std::string shape_json(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? "," : "") + std::to_string(shape[i]);
  return out + "]";
}

// A well-formed file: tensors laid out back to back in the given order.
std::string build_file(const std::vector<TensorSpec>& tensors, const std::string& metadata_json = "") {
  std::string header = "{";
  std::string data;
  if (!metadata_json.empty()) header += "\"__metadata__\":" + metadata_json;
  for (const TensorSpec& t : tensors) {
    if (header.size() > 1) header += ",";
    const size_t begin = data.size();
    data += t.bytes;
    header += "\"" + t.name + "\":{\"dtype\":\"" + t.dtype + "\",\"shape\":" + shape_json(t.shape) +
              ",\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(data.size()) + "]}";
  }
  header += "}";
  return raw_file(header, data);
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("octavo_test_safetensors_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write(const std::string& name, const std::string& contents) {
    const fs::path path = dir_ / name;
    fs::create_directories(path.parent_path());
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(contents.data(), std::streamsize(contents.size()));
    return path.string();
  }

  // Writes `contents`, expects opening it to throw FormatError, returns the message.
  std::string open_error(const std::string& contents) {
    const std::string path = write("bad.safetensors", contents);
    try {
      SafetensorsFile file(path);
    } catch (const FormatError& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find(path), std::string::npos) << "message does not name the file: " << message;
      return message;
    }
    ADD_FAILURE() << "no FormatError";
    return "";
  }

  fs::path dir_;
};

#define EXPECT_CONTAINS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "'" << (needle) << "' not in: " << (haystack)

TEST_F(SafetensorsTest, ReadsNamesDtypesShapesAndValues) {
  const std::vector<float> w = {1.5f, -2.0f, 3.25f, 0.0f, 1e-3f, 7.0f};
  const std::vector<uint16_t> h = {0x3C00, 0xC000, 0x7BFF, 0x0001};  // f16: 1, -2, 65504, min subnormal
  const std::vector<uint16_t> b = {0x3F80, 0xBF80, 0x4049, 0x0000};  // bf16: 1, -1, ~3.14, 0
  const std::vector<int64_t> ids = {7, -1, 1LL << 40};
  const std::vector<float> scalar = {42.0f};
  const std::string path = write("model.safetensors",
                                 build_file({{"w", "F32", {2, 3}, bytes_of(w)},
                                             {"h", "F16", {4}, bytes_of(h)},
                                             {"b", "BF16", {2, 2}, bytes_of(b)},
                                             {"ids", "I64", {3}, bytes_of(ids)},
                                             {"scalar", "F32", {}, bytes_of(scalar)},
                                             {"empty", "F32", {0, 5}, ""}},
                                            R"({"format":"pt","note":"a \"quoted\" value"})"));
  SafetensorsFile file(path);
  EXPECT_EQ(file.path(), path);
  EXPECT_EQ(file.names(), (std::vector<std::string>{"w", "h", "b", "ids", "scalar", "empty"}));
  EXPECT_EQ(file.size(), 6u);
  EXPECT_TRUE(file.contains("ids"));
  EXPECT_FALSE(file.contains("missing"));
  EXPECT_EQ(file.metadata().at("format"), "pt");
  EXPECT_EQ(file.metadata().at("note"), "a \"quoted\" value");

  const TensorView wv = file.tensor("w");
  EXPECT_EQ(wv.name, "w");
  EXPECT_EQ(wv.dtype, DType::kFloat32);
  EXPECT_EQ(wv.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(wv.numel(), 6);
  ASSERT_EQ(wv.nbytes, 24u);
  EXPECT_EQ(std::memcmp(wv.data, w.data(), 24), 0);

  const TensorView hv = file.tensor("h");
  EXPECT_EQ(hv.dtype, DType::kFloat16);
  EXPECT_EQ(hv.shape, (std::vector<int64_t>{4}));
  ASSERT_EQ(hv.nbytes, 8u);
  EXPECT_EQ(std::memcmp(hv.data, h.data(), 8), 0);

  const TensorView bv = file.tensor("b");
  EXPECT_EQ(bv.dtype, DType::kBFloat16);
  ASSERT_EQ(bv.nbytes, 8u);
  EXPECT_EQ(std::memcmp(bv.data, b.data(), 8), 0);

  const SafetensorsEntry& id_entry = file.entry("ids");
  EXPECT_EQ(id_entry.dtype_name, "I64");
  EXPECT_FALSE(id_entry.dtype.has_value());
  EXPECT_EQ(id_entry.shape, (std::vector<int64_t>{3}));
  ASSERT_EQ(id_entry.nbytes, 24u);
  EXPECT_EQ(std::memcmp(id_entry.data, ids.data(), 24), 0);

  const TensorView sv = file.tensor("scalar");
  EXPECT_TRUE(sv.shape.empty());
  EXPECT_EQ(sv.numel(), 1);
  EXPECT_EQ(*static_cast<const float*>(sv.data), 42.0f);

  const TensorView ev = file.tensor("empty");
  EXPECT_EQ(ev.numel(), 0);
  EXPECT_EQ(ev.nbytes, 0u);

  // Offsets are relative to the data section, which starts after the padded header.
  const SafetensorsEntry& h_entry = file.entry("h");
  EXPECT_EQ(h_entry.file_offset % 8, 0u);
  EXPECT_EQ(h_entry.file_offset + h_entry.nbytes + 8 + 24 + 4, file.file_size());  // b, ids, scalar follow
}

TEST_F(SafetensorsTest, TensorOfUnsupportedDtypeNamesTensorAndDtype) {
  const std::string path = write("m.safetensors", build_file({{"mask", "BOOL", {4}, std::string(4, '\1')},
                                                              {"q", "F8_E4M3", {2}, std::string(2, '\0')}}));
  SafetensorsFile file(path);
  EXPECT_EQ(file.entry("q").dtype_name, "F8_E4M3");
  try {
    file.tensor("mask");
    FAIL() << "no FormatError";
  } catch (const FormatError& e) {
    EXPECT_CONTAINS(e.what(), "'mask'");
    EXPECT_CONTAINS(e.what(), "BOOL");
    EXPECT_CONTAINS(e.what(), path);
  }
}

TEST_F(SafetensorsTest, UnknownNameIsNotFound) {
  const std::string path = write("m.safetensors", build_file({{"a", "F32", {1}, std::string(4, '\0')}}));
  SafetensorsFile file(path);
  try {
    file.tensor("model.layers.0.mlp");
    FAIL() << "no FormatError";
  } catch (const FormatError& e) {
    EXPECT_EQ(std::string(e.what()), "tensor 'model.layers.0.mlp' not found in " + path);
  }
  EXPECT_THROW(file.entry("b"), FormatError);
}

TEST_F(SafetensorsTest, MoveKeepsViewsValid) {
  const std::vector<float> w = {1, 2, 3, 4};
  const std::string path = write("m.safetensors", build_file({{"w", "F32", {4}, bytes_of(w)}}));
  SafetensorsFile first(path);
  const void* data = first.tensor("w").data;
  SafetensorsFile second(std::move(first));
  EXPECT_EQ(second.tensor("w").data, data);
  SafetensorsFile third(write("other.safetensors", build_file({{"x", "F16", {1}, "ab"}})));
  third = std::move(second);
  EXPECT_EQ(third.path(), path);
  ASSERT_EQ(third.tensor("w").data, data);
  EXPECT_EQ(static_cast<const float*>(data)[3], 4.0f);
}

TEST_F(SafetensorsTest, DecodesStringEscapes) {
  const std::string header =
      R"({"a\"b\\c\/d":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
      R"("caf\u00e9 \ud83d\ude00 \n\t":{"dtype":"U8","shape":[1],"data_offsets":[1,2]},)"
      "\"raw \xc3\xa9\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[2,3]}}";
  SafetensorsFile file(write("m.safetensors", raw_file(header, "xyz")));
  EXPECT_EQ(file.names(),
            (std::vector<std::string>{"a\"b\\c/d", "caf\xc3\xa9 \xf0\x9f\x98\x80 \n\t", "raw \xc3\xa9"}));
}

TEST_F(SafetensorsTest, ToleratesUnknownFieldsOfAnyJsonType) {
  const std::string header =
      R"( { "t" : { "extra" : [1.5e3, -0.25, true, false, null, {"k": [[]]}], "dtype" : "F32" ,)"
      R"( "shape" : [ 1 ] , "data_offsets" : [ 0 , 4 ] } , "__metadata__" : { } } )";
  SafetensorsFile file(write("m.safetensors", raw_file(header, std::string(4, '\0'))));
  EXPECT_EQ(file.names(), std::vector<std::string>{"t"});
  EXPECT_TRUE(file.metadata().empty());
}

TEST_F(SafetensorsTest, RejectsEachMalformedFileNamingTheProblem) {
  const std::string four = std::string(4, '\0');
  auto one_tensor = [&](const std::string& entry, const std::string& data) {
    return raw_file("{\"t\":" + entry + "}", data);
  };
  EXPECT_CONTAINS(open_error("abc"), "shorter than the 8-byte header length");
  EXPECT_CONTAINS(open_error(""), "file is 0 bytes");
  EXPECT_CONTAINS(open_error(le64(1000) + "{}"), "header length 1000 is larger than the file (10 bytes)");
  EXPECT_CONTAINS(open_error(le64(uint64_t(1) << 40) + "{}"), "absurd (over 100 MB)");
  EXPECT_CONTAINS(open_error(le64(0)), "invalid JSON: unexpected end of JSON");
  EXPECT_CONTAINS(open_error(raw_file("{\"t\":", "")), "invalid JSON");
  EXPECT_CONTAINS(open_error(raw_file("{\"t\" 1}", "")), "invalid JSON: expected ':'");
  EXPECT_CONTAINS(open_error(raw_file("[1, 2]", "")), "header: not a JSON object");
  EXPECT_CONTAINS(open_error(raw_file("{} x", "")), "after the JSON value");
  EXPECT_CONTAINS(open_error(raw_file("{\"a\xff\":{}}", "")), "invalid UTF-8");
  EXPECT_CONTAINS(open_error(raw_file(R"({"\ud800x":{}})", "")), "unpaired high surrogate");
  EXPECT_CONTAINS(open_error(raw_file(R"({"\q":{}})", "")), "invalid escape");
  EXPECT_CONTAINS(open_error(raw_file("{\"a\nb\":{}}", "")), "control character");
  EXPECT_CONTAINS(open_error(raw_file("{\"t\": 3}", "")), "tensor 't': header entry is not an object");

  EXPECT_CONTAINS(open_error(one_tensor(R"({"shape":[1],"data_offsets":[0,4]})", four)),
                  "tensor 't': header entry has no 'dtype'");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"dtype":"F32","data_offsets":[0,4]})", four)),
                  "tensor 't': header entry has no 'shape'");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"dtype":"F32","shape":[1]})", four)),
                  "tensor 't': header entry has no 'data_offsets'");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"dtype":7,"shape":[1],"data_offsets":[0,4]})", four)),
                  "'dtype' is not a string");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"dtype":"Q7","shape":[1],"data_offsets":[0,4]})", four)),
                  "unknown dtype 'Q7'");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"dtype":"F32","shape":[-1],"data_offsets":[0,4]})", four)),
                  "'shape' holds a value that is not a non-negative 64-bit integer");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"dtype":"F32","shape":[1.0],"data_offsets":[0,4]})", four)),
                  "not a non-negative 64-bit integer");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"dtype":"F32","shape":4,"data_offsets":[0,4]})", four)),
                  "'shape' is not an array");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"dtype":"F32","shape":[1],"data_offsets":[4]})", four)),
                  "'data_offsets' has 1 values; expected [begin, end]");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"dtype":"F32","shape":[1],"data_offsets":[0,4,8]})", four)),
                  "'data_offsets' has more than 2 values");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"dtype":"F32","shape":[1],"data_offsets":[4,0]})", four)),
                  "data_offsets [4, 0] end before they begin");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"dtype":"F32","shape":[1],"data_offsets":[0,99999999999999999999]})", four)),
                  "not a non-negative 64-bit integer");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"dtype":"F32","shape":[2,3],"data_offsets":[0,24]})", std::string(12, '\0'))),
                  "truncated: tensor 't' needs bytes up to 24 but the data section has 12");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})", std::string(8, '\0'))),
                  "tensor 't': data_offsets span 8 bytes but shape [3] of F32 needs 12 bytes");
  EXPECT_CONTAINS(
      open_error(one_tensor(R"({"dtype":"F32","shape":[4611686018427387904,4611686018427387904,64],"data_offsets":[0,0]})", "")),
      "needs more than 2^64 bits");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"dtype":"F4","shape":[3],"data_offsets":[0,1]})", "x")),
                  "needs 12 bits (not whole bytes)");
  EXPECT_CONTAINS(open_error(raw_file(R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                      R"("t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", std::string(8, '\0'))),
                  "tensor 't': appears twice in the header");
  EXPECT_CONTAINS(open_error(raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::string(12, '\0'))),
                  "tensors 'a' (bytes 0 to 8) and 'b' (bytes 4 to 12) overlap");
  EXPECT_CONTAINS(open_error(raw_file(R"({"__metadata__":{"format":1}})", "")),
                  "'__metadata__' value of 'format' is not a string");
  EXPECT_CONTAINS(open_error(raw_file(R"({"__metadata__":[]})", "")), "'__metadata__' is not an object");
  EXPECT_CONTAINS(open_error(one_tensor(R"({"x":)" + std::string(1000, '[') + std::string(1000, ']') + "}", "")),
                  "nested deeper than 64 levels");

  try {
    SafetensorsFile file((dir_ / "does_not_exist.safetensors").string());
    FAIL() << "no FormatError";
  } catch (const FormatError& e) {
    EXPECT_CONTAINS(e.what(), "does_not_exist.safetensors: cannot open");
  }
}

TEST_F(SafetensorsTest, FindsShardsFromTheIndexInOrderOfFirstUse) {
  const std::string shard = build_file({{"a", "F32", {1}, std::string(4, '\0')}});
  write("model-00002-of-00002.safetensors", shard);
  write("model-00001-of-00002.safetensors", shard);
  write("stray.safetensors", shard);  // not in the index: ignored
  write("model.safetensors.index.json",
        R"({"metadata": {"total_size": 12.5},
            "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                           "embed.weight": "model-00001-of-00002.safetensors",
                           "norm.weight": "model-00002-of-00002.safetensors"}})");
  const std::string root = dir_.string();
  EXPECT_EQ(find_safetensors_files(root),
            (std::vector<std::string>{root + "/model-00002-of-00002.safetensors",
                                      root + "/model-00001-of-00002.safetensors"}));
}

TEST_F(SafetensorsTest, FindsSingleFileThenAnyFilesSorted) {
  const std::string file = build_file({{"a", "F32", {1}, std::string(4, '\0')}});
  const std::string root = dir_.string();
  write("b.safetensors", file);
  write("a.safetensors", file);
  write("notes.txt", "x");
  EXPECT_EQ(find_safetensors_files(root), (std::vector<std::string>{root + "/a.safetensors", root + "/b.safetensors"}));
  write("model.safetensors", file);
  EXPECT_EQ(find_safetensors_files(root), std::vector<std::string>{root + "/model.safetensors"});
}

TEST_F(SafetensorsTest, FindFailsNamingTheDirectoryOrIndex) {
  const std::string root = dir_.string();
  try {
    find_safetensors_files(root);
    FAIL() << "no FormatError";
  } catch (const FormatError& e) {
    EXPECT_CONTAINS(e.what(), root + ": no safetensors weights");
  }
  EXPECT_THROW(find_safetensors_files(root + "/missing_dir"), FormatError);

  write("model.safetensors.index.json", R"({"weight_map": {"a": "model-00001.safetensors"}})");
  try {
    find_safetensors_files(root);
    FAIL() << "no FormatError";
  } catch (const FormatError& e) {
    EXPECT_CONTAINS(e.what(), "model.safetensors.index.json: shard 'model-00001.safetensors' named in 'weight_map' is missing");
  }
  write("model.safetensors.index.json", R"({"weight_map": {"a": "model-00001.safetensors")");
  try {
    find_safetensors_files(root);
    FAIL() << "no FormatError";
  } catch (const FormatError& e) {
    EXPECT_CONTAINS(e.what(), "model.safetensors.index.json: invalid JSON");
  }
  write("model.safetensors.index.json", R"({"metadata": {}})");
  EXPECT_THROW(find_safetensors_files(root), FormatError);
  write("model.safetensors.index.json", R"({"weight_map": {}})");
  EXPECT_THROW(find_safetensors_files(root), FormatError);
}

// Random byte flips, JSON-significant substitutions, truncations and header-length rewrites of a
// valid file: each must open cleanly or throw FormatError; an open file's views must lie inside it.
TEST_F(SafetensorsTest, FuzzedFilesOpenOrThrowFormatErrorNeverCrash) {
  const std::vector<float> w(12, 0.5f);
  const std::string valid = build_file({{"model.embed", "F32", {3, 4}, bytes_of(w)},
                                        {"b\\u00e9", "BF16", {2, 2}, std::string(8, '\x3f')},
                                        {"ids", "I32", {2}, std::string(8, '\1')},
                                        {"empty", "F16", {0}, ""}},
                                       R"({"format":"pt","k":"v\n"})");
  uint64_t header_end = 0;
  std::memcpy(&header_end, valid.data(), 8);
  header_end += 8;
  const std::string path = (dir_ / "fuzz.safetensors").string();
  const char kJsonBytes[] = "{}[]\",:0123456789-.eE\\u tfn";
  std::mt19937_64 rng(20240601);
  int opened = 0, rejected = 0;
  // OCTAVO_FUZZ_ITERATIONS raises the count for a longer local run (e.g. under -fsanitize=address).
  const char* iterations_env = std::getenv("OCTAVO_FUZZ_ITERATIONS");
  const int iterations = iterations_env ? std::atoi(iterations_env) : 2000;
  for (int iteration = 0; iteration < iterations; ++iteration) {
    std::string bytes = valid;
    const int kind = int(rng() % 5);
    const int edits = 1 + int(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      // Mostly the header: that is where the parser lives.
      const size_t at = size_t(rng() % (rng() % 4 == 0 ? bytes.size() + 1 : header_end));
      if (kind == 0 && at < bytes.size()) {
        bytes[at] = char(bytes[at] ^ (1 << (rng() % 8)));
      } else if (kind == 1 && at < bytes.size()) {
        bytes[at] = kJsonBytes[rng() % (sizeof(kJsonBytes) - 1)];
      } else if (kind == 2) {
        bytes.resize(size_t(rng() % (bytes.size() + 1)));
      } else if (kind == 3 && bytes.size() >= 8) {
        const uint64_t length = rng() % 3 == 0 ? rng() : rng() % (bytes.size() + 16);
        std::memcpy(bytes.data(), le64(length).data(), 8);
      } else if (at <= bytes.size()) {
        bytes.insert(at, 1, kJsonBytes[rng() % (sizeof(kJsonBytes) - 1)]);
      }
    }
    write("fuzz.safetensors", bytes);
    try {
      SafetensorsFile file(path);
      ++opened;
      for (const SafetensorsEntry& entry : file.entries()) {
        ASSERT_LE(entry.file_offset + entry.nbytes, file.file_size());
        ASSERT_GE(entry.file_offset, 8u);
        if (entry.nbytes > 0) {
          volatile std::byte first = entry.data[0];
          volatile std::byte last = entry.data[entry.nbytes - 1];
          (void)first;
          (void)last;
        }
        try {
          const TensorView view = file.tensor(entry.name);
          ASSERT_EQ(size_t(view.numel()) * dtype_size(view.dtype), view.nbytes);
        } catch (const FormatError&) {
          ASSERT_FALSE(entry.dtype.has_value());
        }
      }
    } catch (const FormatError&) {
      ++rejected;
    }
  }
  // Both outcomes happen, or the mutations are not reaching the interesting paths.
  EXPECT_GT(opened, iterations / 100);
  EXPECT_GT(rejected, iterations / 4);
}

}  // namespace
}  // namespace octavo

// Tests of the torch-free safetensors reader/writer (ft/io/safetensors.h).
//
//   DType*, Parse*        in-memory parsing rules, on hand-written headers and the reference's own
//                         test vectors
//   GoodCorpus, BadCorpus the crafted files in tests/data/safetensors/{good,bad}
//                         (tests/python/make_bad_safetensors.py); every bad file must give a clean
//                         ft::Error naming the file and the rule
//   Truncation, Mutation  every prefix of valid files, and byte mutations of them
//   Serialize*, Write*    the writer: exact bytes, validation, atomic replacement
//   Checkpoint*           model.safetensors / sharded checkpoints and their failure modes
//   Interop*              files exchanged with Python's safetensors; run by ctest between the Python
//                         steps of tests/python/safetensors_interop.py (see tests/CMakeLists.txt)
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "ft/io/safetensors.h"

namespace fs = std::filesystem;
using namespace ft::io;
using nlohmann::json;

namespace {

// Paths come from the environment (ctest sets them), not from compile-time defines, so that the
// object files do not depend on where the clone is and ccache serves every fresh clone.
fs::path corpus_dir() {
  const char* dir = std::getenv("LIBFT_TEST_DATA");
  return fs::path(dir ? dir : "LIBFT_TEST_DATA-is-unset") / "safetensors";
}
const fs::path kCorpus = corpus_dir();

std::vector<uint8_t> read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  EXPECT_TRUE(in) << p;
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(s.data(), static_cast<std::streamsize>(s.size()));
  ASSERT_TRUE(out.good()) << p;
}

/// Runs f; returns the ft::Error message, or "" after recording a failure if f did not throw one.
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const ft::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw a non-ft::Error exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "did not throw";
  return "";
}

/// u64le N | header | data.
std::vector<uint8_t> make_file(const std::string& header, const std::string& data = "") {
  std::vector<uint8_t> out(8);
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(n >> (8 * i));
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

/// Parses from an exactly-sized heap copy, so that AddressSanitizer sees any read past the end.
SafetensorsHeader parse_exact(const std::vector<uint8_t>& bytes, size_t len, const std::string& source) {
  std::unique_ptr<uint8_t[]> copy(len ? new uint8_t[len] : nullptr);
  if (len) std::memcpy(copy.get(), bytes.data(), len);
  return parse_safetensors(copy.get(), len, source);
}

SafetensorsHeader parse(const std::vector<uint8_t>& bytes, const std::string& source = "mem") {
  return parse_exact(bytes, bytes.size(), source);
}

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "libft-safetensors-XXXXXX").string();
    if (!::mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }

 private:
  fs::path path_;
};

std::vector<uint8_t> from_hex(const std::string& hex) {
  std::vector<uint8_t> out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2) out.push_back(static_cast<uint8_t>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  return out;
}

std::vector<uint8_t> bytes_of(const SafetensorsFile& f, const std::string& name) {
  const auto s = f.bytes(f.at(name));
  return {s.begin(), s.end()};
}

}  // namespace

// ================================================================================================
// DType

TEST(DType, NamesSizesRoundTrip) {
  const std::vector<std::pair<std::string, size_t>> expected = {
      {"BOOL", 8}, {"U8", 8}, {"I8", 8}, {"I16", 16}, {"U16", 16}, {"F16", 16}, {"BF16", 16}, {"I32", 32},
      {"U32", 32}, {"F32", 32}, {"F64", 64}, {"I64", 64}, {"U64", 64}, {"F8_E4M3", 8}, {"F8_E5M2", 8},
      {"F4", 4}, {"F6_E2M3", 6}, {"F6_E3M2", 6}, {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8}, {"F8_E5M2FNUZ", 8},
      {"C64", 64}};
  for (const auto& [name, bits] : expected) {
    const DType d = parse_dtype(name, "test");
    EXPECT_EQ(dtype_name(d), name);
    EXPECT_EQ(dtype_bits(d), bits) << name;
    if (bits % 8 == 0) {
      EXPECT_EQ(dtype_size(d), bits / 8) << name;
    }
  }
  EXPECT_EQ(dtype_size(DType::F32), 4u);
  EXPECT_NE(error_of([] { (void)dtype_size(DType::F4); }).find("F4"), std::string::npos);
}

TEST(DType, UnknownNameNamesContext) {
  const std::string msg = error_of([] { (void)parse_dtype("f32", "[safetensors] x.safetensors: tensor 'w'"); });
  EXPECT_NE(msg.find("x.safetensors: tensor 'w': unknown dtype 'f32'"), std::string::npos) << msg;
}

// ================================================================================================
// Parsing

TEST(Parse, Minimal) {
  const auto bytes = make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", std::string(8, '\x01'));
  const SafetensorsHeader h = parse(bytes);
  ASSERT_EQ(h.tensors.size(), 1u);
  EXPECT_EQ(h.tensors[0].name, "a");
  EXPECT_EQ(h.tensors[0].dtype, DType::F32);
  EXPECT_EQ(h.tensors[0].shape, std::vector<int64_t>{2});
  EXPECT_EQ(h.tensors[0].numel(), 2);
  EXPECT_EQ(h.tensors[0].nbytes(), 8u);
  EXPECT_EQ(h.data_start, bytes.size() - 8);
  EXPECT_TRUE(h.metadata.empty());
}

TEST(Parse, RankZeroAndZeroSize) {
  const auto h = parse(make_file(
      R"({"s":{"dtype":"F64","shape":[],"data_offsets":[0,8]},"e":{"dtype":"I32","shape":[2,0],"data_offsets":[8,8]},)"
      R"("big_but_empty":{"dtype":"U8","shape":[0,4611686018427387904,4611686018427387904],"data_offsets":[8,8]}})",
      std::string(8, 'x')));
  ASSERT_EQ(h.tensors.size(), 3u);
  // Sorted by (begin, end, name): the two empty tensors at offset 8 follow "s" in name order.
  EXPECT_EQ(h.tensors[0].name, "s");
  EXPECT_EQ(h.tensors[1].name, "big_but_empty");
  EXPECT_EQ(h.tensors[2].name, "e");
  for (const TensorInfo& t : h.tensors) {
    if (t.name == "s") EXPECT_EQ(t.numel(), 1);
    else EXPECT_EQ(t.numel(), 0);
  }
}

TEST(Parse, SortedByOffsetsWithMetadata) {
  const auto h = parse(make_file(
      R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[4,5]},"__metadata__":{"format":"pt","x":""},)"
      R"("z":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
      "abcde"));
  ASSERT_EQ(h.tensors.size(), 2u);
  EXPECT_EQ(h.tensors[0].name, "z");
  EXPECT_EQ(h.tensors[1].name, "a");
  EXPECT_EQ(h.metadata, (std::map<std::string, std::string>{{"format", "pt"}, {"x", ""}}));
}

TEST(Parse, JsonWhitespacePaddingBothSides) {
  // The reference's test_whitespace_padded_header and test_whitespace_leading_padded_header.
  EXPECT_TRUE(parse(make_file("{}\r \t\n")).tensors.empty());
  EXPECT_TRUE(parse(make_file("\t\n{}\r ")).tensors.empty());
}

TEST(Parse, ReferenceTestVectors) {
  // From safetensors/src/tensor.rs tests.
  const std::string zeros16(16, '\0');
  const auto ok = parse(make_file(R"({"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}})", zeros16));
  EXPECT_EQ(ok.tensors.at(0).shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(parse(make_file(R"({"test":{"dtype":"I32","shape":[2,0],"data_offsets":[0, 0]}})")).tensors.size(), 1u);
  EXPECT_NE(error_of([] { parse(make_file(R"({"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0, 4]}})")); })
                .find("needs 16"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              parse(make_file(R"({"test":{"dtype":"I32","shape":[2,9223372036854775807],"data_offsets":[0,16]}})", zeros16));
            }).find("overflows"),
            std::string::npos);
  // test_metadata_incomplete_buffer: extra bytes after the data, and missing bytes.
  EXPECT_NE(error_of([&] {
              parse(make_file(R"({"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}})", zeros16 + "extra"));
            }).find("trailing bytes"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              parse(make_file(R"({"test":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}})", zeros16.substr(2)));
            }).find("run past the end"),
            std::string::npos);
}

TEST(Parse, NullAndEmptyInput) {
  EXPECT_NE(error_of([] { parse_safetensors(nullptr, 0, "nothing.safetensors"); }).find("nothing.safetensors: file is 0 bytes"),
            std::string::npos);
}

TEST(Parse, SubByteDtypes) {
  const auto h = parse(make_file(R"({"a":{"dtype":"F4","shape":[2,3],"data_offsets":[0,3]}})", "abc"));
  EXPECT_EQ(h.tensors.at(0).numel(), 6);
  EXPECT_EQ(h.tensors.at(0).nbytes(), 3u);
}

TEST(Parse, MultiByteUtf8Names) {
  const auto h = parse(make_file("{\"\xF0\x9F\x98\x80\xE2\x82\xAC\xC3\xA9\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "x"));
  EXPECT_EQ(h.tensors.at(0).name, "\xF0\x9F\x98\x80\xE2\x82\xAC\xC3\xA9");
}

TEST(Parse, NestingDepthLimit) {
  // Three levels are all a header needs; four still parse (and fail on content), five do not.
  const std::string four = R"({"a":{"dtype":"F32","shape":[[1]],"data_offsets":[0,4]}})";
  EXPECT_NE(error_of([&] { parse(make_file(four, "abcd")); }).find("shape entry 0"), std::string::npos);
  const std::string five = R"({"a":{"dtype":"F32","shape":[[[1]]],"data_offsets":[0,4]}})";
  EXPECT_NE(error_of([&] { parse(make_file(five, "abcd")); }).find("deeper than 4 levels (inside tensor 'a')"),
            std::string::npos);
  // A million unclosed brackets: rejected at the fifth, without recursion or a big allocation.
  EXPECT_NE(error_of([] { parse(make_file(std::string(1'000'000, '['))); }).find("deeper than 4"), std::string::npos);
}

TEST(Parse, ControlCharactersInNamesAreEscapedInMessages) {
  const std::string msg = error_of([] {
    parse(make_file("{\"a\\nb\":{\"dtype\":\"X\",\"shape\":[1],\"data_offsets\":[0,4]}}", "abcd"));
  });
  EXPECT_NE(msg.find("tensor 'a\\x0ab'"), std::string::npos) << msg;
}

// ================================================================================================
// Corpus

struct GoodFile {
  const char* file;
  size_t tensors;
  size_t metadata;
};
const GoodFile kGoodFiles[] = {
    {"empty_header.safetensors", 0, 0},      {"metadata_only.safetensors", 0, 1},
    {"basic.safetensors", 3, 1},             {"rank0.safetensors", 2, 0},
    {"zero_size.safetensors", 3, 0},         {"all_dtypes.safetensors", 22, 1},
    {"unicode_names.safetensors", 3, 1},     {"whitespace_padding.safetensors", 2, 0},
    {"metadata_null.safetensors", 1, 0},     {"zero_size_shared_offset.safetensors", 3, 0},
};

TEST(GoodCorpus, EveryFileLoads) {
  std::set<std::string> listed;
  for (const GoodFile& g : kGoodFiles) {
    SCOPED_TRACE(g.file);
    listed.insert(g.file);
    const fs::path path = kCorpus / "good" / g.file;
    const auto file = SafetensorsFile::open(path.string());
    EXPECT_EQ(file->tensors().size(), g.tensors);
    EXPECT_EQ(file->header().metadata.size(), g.metadata);
    const auto bytes = read_bytes(path);
    const SafetensorsHeader mem = parse(bytes, path.string());
    ASSERT_EQ(mem.tensors.size(), g.tensors);
    uint64_t covered = 0;
    for (const TensorInfo& t : file->tensors()) {
      const auto span = file->bytes(t);
      EXPECT_EQ(span.size(), t.nbytes());
      EXPECT_TRUE(std::equal(span.begin(), span.end(), bytes.begin() + static_cast<long>(file->header().data_start + t.begin)));
      EXPECT_EQ(file->find(t.name), &t);
      covered += t.nbytes();
    }
    EXPECT_EQ(file->header().data_start + covered, bytes.size());
  }
  for (const auto& entry : fs::directory_iterator(kCorpus / "good"))
    EXPECT_TRUE(listed.count(entry.path().filename().string())) << entry.path() << " has no row in kGoodFiles";
}

TEST(GoodCorpus, AllDtypesFileHasEveryDtype) {
  const auto file = SafetensorsFile::open((kCorpus / "good" / "all_dtypes.safetensors").string());
  std::set<std::string> names;
  for (const TensorInfo& t : file->tensors()) names.insert(std::string(dtype_name(t.dtype)));
  EXPECT_EQ(names.size(), 22u);
  // Offsets follow the writer's order: widest alignment first.
  EXPECT_EQ(file->tensors().front().dtype, DType::U64);
  EXPECT_EQ(file->tensors().back().dtype, DType::BOOL);
}

struct BadFile {
  const char* file;
  const char* fragment;  // must appear in the message, after the file's path
};
const BadFile kBadFiles[] = {
    // the 8-byte length prefix and header bounds
    {"empty.safetensors", "file is 0 bytes, too short for the 8-byte header length"},
    {"short_prefix.safetensors", "file is 3 bytes, too short"},
    {"header_too_large.safetensors", "header length 100000001 exceeds the 100000000-byte limit"},
    {"header_len_u64_max.safetensors", "header length 18446744073709551615 exceeds"},
    {"header_past_eof.safetensors", "header length 1000 runs past the end of the 10-byte file"},
    {"header_empty.safetensors", "header is not valid JSON"},
    // UTF-8
    {"non_utf8.safetensors", "header is not valid UTF-8 (byte 0xff at file offset 11)"},
    {"overlong_utf8.safetensors", "not valid UTF-8 (byte 0xc0"},
    {"surrogate_utf8.safetensors", "not valid UTF-8 (byte 0xed"},
    {"above_max_utf8.safetensors", "not valid UTF-8 (byte 0xf4"},
    {"truncated_utf8.safetensors", "not valid UTF-8 (byte 0xe2 at file offset 14)"},
    {"byte_order_mark.safetensors", "byte order mark"},
    // JSON syntax and the top-level type
    {"not_json.safetensors", "header is not valid JSON"},
    {"json_array.safetensors", "header must be a JSON object, not array []"},
    {"json_string.safetensors", "header must be a JSON object, not string \"tensors\""},
    {"json_null.safetensors", "header must be a JSON object, not null"},
    {"trailing_garbage.safetensors", "header is not valid JSON"},
    {"nul_padding.safetensors", "header is not valid JSON: NUL byte at offset 2 of the header"},
    {"nul_then_garbage.safetensors", "header is not valid JSON: NUL byte"},
    {"two_objects.safetensors", "header is not valid JSON"},
    {"comment.safetensors", "header is not valid JSON"},
    {"lone_surrogate_escape.safetensors", "header is not valid JSON"},
    {"raw_control_char.safetensors", "header is not valid JSON"},
    // duplicate keys
    {"dup_tensor.safetensors", "duplicate tensor name 'a'"},
    {"dup_field.safetensors", "tensor 'a': duplicate key 'dtype'"},
    {"dup_metadata_key.safetensors", "'__metadata__': duplicate key 'format'"},
    {"dup_metadata_section.safetensors", "duplicate key '__metadata__' in the header"},
    {"dup_key_deep.safetensors", "duplicate key 'x' in '/a/shape/[]'"},
    // dtype
    {"unknown_dtype.safetensors", "tensor 'a': unknown dtype 'F128'"},
    {"lowercase_dtype.safetensors", "tensor 'a': unknown dtype 'f32'"},
    {"dtype_not_string.safetensors", "tensor 'a': dtype must be a string, not number 5"},
    // shape
    {"negative_dim.safetensors", "tensor 'a': shape entry 0 must be a non-negative integer, not number -1"},
    {"minus_zero_dim.safetensors", "shape entry 0 must be a non-negative integer, not number -0"},
    {"float_dim.safetensors", "shape entry 0 must be a non-negative integer, not number 1.0"},
    {"exponent_dim.safetensors", "shape entry 0 must be a non-negative integer, not number"},
    {"string_dim.safetensors", "shape entry 0 must be a non-negative integer, not string \"1\""},
    {"nested_dim.safetensors", "shape entry 0 must be a non-negative integer, not array [1]"},
    {"shape_not_array.safetensors", "tensor 'a': shape must be an array, not number 1"},
    {"dim_too_large.safetensors", "shape entry 1 is 18446744073709551614, beyond the largest supported dimension"},
    {"dim_beyond_u64.safetensors", "shape entry 0 must be a non-negative integer, not number 1.8"},
    // sizes
    {"size_mismatch.safetensors",
     "tensor 'a.weight': data_offsets [0, 12) hold 12 bytes but shape [2, 4] of F32 needs 32"},
    {"overflow_shape.safetensors",
     "tensor 'a': shape [4611686018427387904, 4611686018427387904] of F32 overflows a 64-bit byte count"},
    {"overflow_bytes.safetensors", "tensor 'a': shape [4611686018427387904] of F32 overflows"},
    {"subbyte_misaligned.safetensors", "tensor 'a': shape [3] of F4 is not a whole number of bytes"},
    // data_offsets
    {"begin_gt_end.safetensors", "tensor 'a': data_offsets [8, 4) begin after they end"},
    {"offsets_three.safetensors", "tensor 'a': data_offsets must be an array [begin, end], not array [0,4,8]"},
    {"offsets_one.safetensors", "data_offsets must be an array [begin, end], not array [4]"},
    {"offsets_negative.safetensors", "data_offsets must be two non-negative integers, not [-4,0]"},
    {"offsets_float.safetensors", "data_offsets must be two non-negative integers, not [0,4.0]"},
    {"offsets_string.safetensors", "data_offsets must be two non-negative integers, not [\"0\",\"4\"]"},
    {"offsets_object.safetensors", "data_offsets must be an array [begin, end], not object"},
    // tiling of the data buffer
    {"gap.safetensors", "tensor 'b': data_offsets [8, 12) leave a gap of 4 bytes after tensor 'a' (which ends at 4)"},
    {"gap_at_start.safetensors", "tensor 'a': data_offsets [4, 8) leave a gap of 4 bytes at the start"},
    {"overlap.safetensors", "tensor 'b': data_offsets [4, 8) overlap tensor 'a' (which ends at 8)"},
    {"same_offsets.safetensors", "tensor 'b': data_offsets [0, 4) overlap tensor 'a'"},
    {"trailing_bytes.safetensors", "tensors cover 4 bytes of the 8-byte data buffer: 4 trailing bytes"},
    {"data_without_tensors.safetensors", "tensors cover 0 bytes of the 8-byte data buffer: 8 trailing bytes"},
    {"offsets_past_eof.safetensors", "tensor 'a': data_offsets [0, 16) run past the end of the 8-byte data buffer"},
    {"offsets_past_eof_huge.safetensors", "data_offsets [0, 1152921504606846976) run past the end of the 4-byte"},
    // tensor entries
    {"missing_dtype.safetensors", "tensor 'a': missing field 'dtype'"},
    {"missing_shape.safetensors", "tensor 'a': missing field 'shape'"},
    {"missing_offsets.safetensors", "tensor 'a': missing field 'data_offsets'"},
    {"entry_not_object.safetensors", "tensor 'a': entry must be an object, not number 5"},
    {"entry_null.safetensors", "tensor 'a': entry must be an object, not null"},
    {"unknown_field.safetensors", "tensor 'a': unknown field 'foo'"},
    // __metadata__
    {"metadata_int_value.safetensors", "'__metadata__' entry 'format' must be a string, not number 1"},
    {"metadata_nested.safetensors", "'__metadata__' entry 'k' must be a string, not object"},
    {"metadata_array.safetensors", "'__metadata__' must be an object of strings, not array"},
    {"metadata_string.safetensors", "'__metadata__' must be an object of strings, not string \"pt\""},
    // hostile nesting
    {"deep_nesting_array.safetensors", "header nests JSON deeper than 4 levels (inside tensor 'a')"},
    {"deep_nesting_object.safetensors", "header nests JSON deeper than 4 levels (inside tensor 'a')"},
    {"deep_nesting_metadata.safetensors", "header nests JSON deeper than 4 levels (inside '__metadata__')"},
    {"deep_nesting_unclosed.safetensors", "header nests JSON deeper than 4 levels"},
};

TEST(BadCorpus, EveryFileFailsCleanlyNamingFileAndRule) {
  for (const BadFile& b : kBadFiles) {
    SCOPED_TRACE(b.file);
    const std::string path = (kCorpus / "bad" / b.file).string();
    ASSERT_TRUE(fs::exists(path));
    const std::string expected = "[safetensors] " + path + ": ";
    // From memory (exactly-sized buffer) and through open() (mmap).
    const auto bytes = read_bytes(path);
    for (const std::string& msg : {error_of([&] { parse(bytes, path); }), error_of([&] { SafetensorsFile::open(path); })}) {
      EXPECT_EQ(msg.rfind(expected, 0), 0u) << msg;
      EXPECT_NE(msg.find(b.fragment), std::string::npos) << "message: " << msg << "\nexpected fragment: " << b.fragment;
    }
  }
}

TEST(BadCorpus, TableCoversEveryFile) {
  std::set<std::string> rows;
  for (const BadFile& b : kBadFiles) EXPECT_TRUE(rows.insert(b.file).second) << "duplicate row " << b.file;
  std::set<std::string> files;
  for (const auto& entry : fs::directory_iterator(kCorpus / "bad")) files.insert(entry.path().filename().string());
  EXPECT_EQ(rows, files);
}

// Every strict prefix of a valid file is invalid (8 + N + data size must equal the file size), so
// each truncation must throw ft::Error, and never read beyond the prefix.
TEST(Truncation, EveryPrefixOfValidFilesFailsCleanly) {
  std::vector<std::pair<std::string, std::vector<uint8_t>>> inputs;
  for (const GoodFile& g : kGoodFiles) inputs.emplace_back(g.file, read_bytes(kCorpus / "good" / g.file));
  const std::vector<float> w(37, 1.5f);
  const std::vector<int64_t> ids = {1, 2, 3};
  inputs.emplace_back("serialized", serialize_safetensors({{"w", DType::F32, {37}, w.data(), w.size() * 4},
                                                           {"ids", DType::I64, {3}, ids.data(), 24}},
                                                          {{"format", "pt"}}));
  size_t cases = 0;
  for (const auto& input : inputs) {
    const std::string& name = input.first;  // not a structured binding: clang 14 cannot capture those
    const std::vector<uint8_t>& bytes = input.second;
    SCOPED_TRACE(name);
    EXPECT_NO_THROW(parse(bytes, name));
    for (size_t len = 0; len < bytes.size(); ++len) {
      const std::string msg = error_of([&] { parse_exact(bytes, len, name + "@" + std::to_string(len)); });
      EXPECT_EQ(msg.rfind("[safetensors] " + name + "@" + std::to_string(len) + ": ", 0), 0u) << msg;
      ++cases;
    }
  }
  EXPECT_GT(cases, 1000u);
}

// A cheap deterministic mutation sweep beside the fuzzer: every byte of every good file set to a few
// values must either parse or throw ft::Error.
TEST(Mutation, SingleByteChangesParseOrFailCleanly) {
  for (const GoodFile& g : kGoodFiles) {
    SCOPED_TRACE(g.file);
    const auto bytes = read_bytes(kCorpus / "good" / g.file);
    for (size_t i = 0; i < bytes.size(); ++i) {
      for (uint8_t v : {uint8_t{0x00}, uint8_t{0x22}, uint8_t{0x39}, uint8_t{0x5b}, uint8_t{0xff}}) {
        auto mutated = bytes;
        mutated[i] = v;
        try {
          parse(mutated, g.file);
        } catch (const ft::Error&) {
        } catch (const std::exception& e) {
          ADD_FAILURE() << "byte " << i << " = " << int(v) << ": non-ft::Error " << e.what();
        }
      }
    }
  }
}

// ================================================================================================
// Serialisation

namespace {
std::string padded(std::string header) {
  header.resize((header.size() + 7) / 8 * 8, ' ');
  return header;
}
std::string file_string(const std::vector<uint8_t>& v) { return {v.begin(), v.end()}; }
}  // namespace

TEST(Serialize, MatchesPythonLayout) {
  // What Python's safetensors 0.8 writes for these tensors: ordered by dtype alignment descending
  // (I64, F32, F16, U8), then by name; "__metadata__" first; compact JSON; space padding to 8.
  const float b[2] = {1.0f, -2.0f};
  const uint8_t a[3] = {1, 2, 3};
  const int64_t c = 42;
  const std::vector<TensorWrite> tensors = {{"b", DType::F32, {2}, b, 8},
                                            {"a", DType::U8, {3}, a, 3},
                                            {"c", DType::I64, {}, &c, 8},
                                            {"z", DType::F16, {0, 3}, nullptr, 0}};
  const auto out = serialize_safetensors(tensors, {{"format", "pt"}});
  const std::string header = padded(
      R"({"__metadata__":{"format":"pt"},"c":{"dtype":"I64","shape":[],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"z":{"dtype":"F16","shape":[0,3],"data_offsets":[16,16]},)"
      R"("a":{"dtype":"U8","shape":[3],"data_offsets":[16,19]}})");
  std::string data(reinterpret_cast<const char*>(&c), 8);
  data += std::string(reinterpret_cast<const char*>(b), 8);
  data += std::string(reinterpret_cast<const char*>(a), 3);
  EXPECT_EQ(file_string(out), file_string(make_file(header, data)));
  EXPECT_EQ((8 + header.size()) % 8, 0u);
}

TEST(Serialize, EscapesNamesLikeSerdeJson) {
  // Python: save({'a"\\\n\x01\x7f é/': ...}) gives {"a\"\\\n\u0001<DEL> é/":...}.
  const float x = 0;
  const std::string name = "a\"\\\n\x01\x7f \xC3\xA9/\b\f\r\t";
  const auto out = serialize_safetensors({{name, DType::F32, {1}, &x, 4}});
  const std::string expected =
      padded("{\"a\\\"\\\\\\n\\u0001\x7f \xC3\xA9/\\b\\f\\r\\t\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}");
  EXPECT_EQ(file_string(out), file_string(make_file(expected, std::string(4, '\0'))));
  EXPECT_EQ(parse(out).tensors.at(0).name, name);
}

TEST(Serialize, EmptyAndMetadataOnly) {
  EXPECT_EQ(file_string(serialize_safetensors({})), file_string(make_file("{}      ")));
  EXPECT_EQ(file_string(serialize_safetensors({}, {{"format", "pt"}})),
            file_string(make_file(padded(R"({"__metadata__":{"format":"pt"}})"))));
}

TEST(Serialize, RoundTripsEveryDtype) {
  std::vector<std::vector<uint8_t>> storage;
  std::vector<TensorWrite> tensors;
  const std::vector<std::string> names = {"BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
                                          "I64", "U64", "F8_E4M3", "F8_E5M2", "F4", "F6_E2M3", "F6_E3M2", "F8_E8M0",
                                          "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"};
  for (size_t i = 0; i < names.size(); ++i) {
    const DType d = parse_dtype(names[i], "test");
    const std::vector<int64_t> shape = {4, 2};  // 8 elements: whole bytes for F4 and F6 too
    storage.emplace_back(8 * dtype_bits(d) / 8);
    for (size_t k = 0; k < storage.back().size(); ++k) storage.back()[k] = static_cast<uint8_t>(i * 13 + k);
    tensors.push_back({"t" + std::to_string(i), d, shape, storage.back().data(), storage.back().size()});
  }
  const auto out = serialize_safetensors(tensors, {{"a", "1"}, {"b", "2"}});
  TempDir tmp;
  write_file_atomic(tmp / "x.safetensors", out);
  const auto file = SafetensorsFile::open(tmp / "x.safetensors");
  ASSERT_EQ(file->tensors().size(), names.size());
  for (size_t i = 0; i < names.size(); ++i) {
    const TensorInfo& t = file->at("t" + std::to_string(i));
    EXPECT_EQ(t.dtype, tensors[i].dtype);
    EXPECT_EQ(t.shape, tensors[i].shape);
    EXPECT_EQ(bytes_of(*file, t.name), storage[i]);
  }
  EXPECT_EQ(file->header().metadata.size(), 2u);
}

TEST(Serialize, RejectsInvalidTensors) {
  const float x[4] = {};
  auto msg = [&](std::vector<TensorWrite> t) { return error_of([&] { serialize_safetensors(t); }); };
  EXPECT_NE(msg({{"a", DType::F32, {1}, x, 4}, {"a", DType::F32, {1}, x, 4}}).find("tensor 'a': duplicate tensor name"),
            std::string::npos);
  EXPECT_NE(msg({{"__metadata__", DType::F32, {1}, x, 4}}).find("reserved"), std::string::npos);
  EXPECT_NE(msg({{"w", DType::F32, {2, 2}, x, 12}}).find("tensor 'w': 12 bytes given but shape [2, 2] of F32 needs 16"),
            std::string::npos);
  EXPECT_NE(msg({{"w", DType::F32, {-1}, x, 4}}).find("negative dimension"), std::string::npos);
  EXPECT_NE(msg({{"w", DType::F32, {1}, nullptr, 4}}).find("data is null"), std::string::npos);
  EXPECT_NE(msg({{"bad\xff", DType::U8, {1}, x, 1}}).find("not valid UTF-8"), std::string::npos);
  EXPECT_NE(msg({{"w", DType::F32, {int64_t{1} << 62, 8}, x, 4}}).find("overflows"), std::string::npos);
  EXPECT_NE(msg({{"w", DType::F4, {3}, x, 2}}).find("not a whole number of bytes"), std::string::npos);
  EXPECT_NE(error_of([&] { serialize_safetensors({}, {{"k", "\xC0\xAF"}}); }).find("metadata entry 'k'"), std::string::npos);
}

// ================================================================================================
// Files

TEST(Write, AtomicWriteLeavesOnlyTheFile) {
  TempDir tmp;
  const std::vector<int32_t> v = {1, 2, 3, 4, 5, 6};
  write_safetensors(tmp / "m.safetensors", {{"v", DType::I32, {2, 3}, v.data(), 24}}, {{"format", "pt"}});
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(tmp.path())) names.push_back(e.path().filename().string());
  EXPECT_EQ(names, std::vector<std::string>{"m.safetensors"});
  const auto file = SafetensorsFile::open(tmp / "m.safetensors");
  EXPECT_EQ(file->path(), tmp / "m.safetensors");
  const auto b = bytes_of(*file, "v");
  EXPECT_EQ(0, std::memcmp(b.data(), v.data(), 24));
  // The streamed file equals the in-memory serialisation.
  EXPECT_EQ(read_bytes(tmp / "m.safetensors"),
            serialize_safetensors({{"v", DType::I32, {2, 3}, v.data(), 24}}, {{"format", "pt"}}));
}

TEST(Write, ReplacingAMappedFileKeepsTheOldMappingIntact) {
  TempDir tmp;
  const std::string path = tmp / "m.safetensors";
  const std::vector<float> old_v = {1, 2, 3}, new_v = {7, 8};
  write_safetensors(path, {{"v", DType::F32, {3}, old_v.data(), 12}});
  const auto old_file = SafetensorsFile::open(path);
  write_safetensors(path, {{"v", DType::F32, {2}, new_v.data(), 8}});
  const auto new_file = SafetensorsFile::open(path);
  EXPECT_EQ(0, std::memcmp(bytes_of(*old_file, "v").data(), old_v.data(), 12));
  EXPECT_EQ(0, std::memcmp(bytes_of(*new_file, "v").data(), new_v.data(), 8));
  EXPECT_EQ(old_file->at("v").shape, std::vector<int64_t>{3});
}

TEST(Write, ErrorsNameThePath) {
  TempDir tmp;
  const std::string path = tmp / "no_such_dir/m.safetensors";
  const uint8_t b[1] = {0};
  const std::string msg = error_of([&] { write_file_atomic(path, b); });
  EXPECT_NE(msg.find("[safetensors] " + path + ": cannot create temporary file"), std::string::npos) << msg;
  EXPECT_NE(error_of([&] { write_safetensors(path, {{"w", DType::U8, {2}, b, 1}}); }).find(path + ": tensor 'w'"),
            std::string::npos);
}

TEST(File, OpenErrorsNameThePath) {
  TempDir tmp;
  const std::string missing = tmp / "missing.safetensors";
  EXPECT_NE(error_of([&] { SafetensorsFile::open(missing); }).find(missing + ": cannot open"), std::string::npos);
  EXPECT_NE(error_of([&] { SafetensorsFile::open(tmp.path().string()); }).find("not a regular file"), std::string::npos);
  write_bytes(tmp / "empty.safetensors", "");
  EXPECT_NE(error_of([&] { SafetensorsFile::open(tmp / "empty.safetensors"); }).find("file is 0 bytes"),
            std::string::npos);
}

TEST(File, LookupErrors) {
  const std::string path = (kCorpus / "good" / "basic.safetensors").string();
  const auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file->find("nope"), nullptr);
  EXPECT_NE(error_of([&] { file->at("nope"); }).find(path + ": no tensor 'nope'"), std::string::npos);
  TensorInfo forged = file->at("a");
  forged.end = forged.begin + 1'000'000;
  EXPECT_NE(error_of([&] { file->bytes(forged); }).find("outside this file"), std::string::npos);
}

// ================================================================================================
// Checkpoints

namespace {
struct Tensors {
  std::vector<std::vector<float>> storage;
  std::vector<TensorWrite> writes;
  void add(const std::string& name, size_t n) {
    storage.emplace_back(n);
    for (size_t i = 0; i < n; ++i) storage.back()[i] = static_cast<float>(storage.size() * 100 + i);
    writes.push_back({name, DType::F32, {static_cast<int64_t>(n)}, storage.back().data(), n * 4});
  }
};

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

std::set<std::string> dir_files(const fs::path& dir) {
  std::set<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.insert(e.path().filename().string());
  return out;
}

/// A three-shard checkpoint with a 40-byte limit: a (16 B), b (16 B), c (48 B), d (32 B). Hugging
/// Face's split gives c its own shard at once, before the open one, so shard 1 is {c}, shard 2 is
/// {a, b} (closed when d would overflow it), shard 3 is {d}.
constexpr uint64_t kShardLimit = 40;
Tensors sharded_tensors() {
  Tensors t;
  t.add("a", 4);
  t.add("b", 4);
  t.add("c", 12);
  t.add("d", 8);
  return t;
}

const std::string kShard1 = "model-00001-of-00003.safetensors";
const std::string kShard2 = "model-00002-of-00003.safetensors";
const std::string kShard3 = "model-00003-of-00003.safetensors";
}  // namespace

TEST(Checkpoint, SingleFileBelowTheLimit) {
  TempDir tmp;
  const Tensors t = sharded_tensors();
  write_safetensors_checkpoint(tmp.path().string(), t.writes);
  EXPECT_EQ(dir_files(tmp.path()), std::set<std::string>{"model.safetensors"});
  const auto ckpt = SafetensorsCheckpoint::open(tmp.path().string());
  EXPECT_EQ(ckpt.tensors().size(), 4u);
  EXPECT_EQ(ckpt.at("c").file->header().metadata.at("format"), "pt");
  EXPECT_EQ(ckpt.dir(), tmp.path().string());
}

TEST(Checkpoint, ShardsLikeHuggingFace) {
  TempDir tmp;
  const Tensors t = sharded_tensors();
  write_safetensors_checkpoint(tmp.path().string(), t.writes, kShardLimit);
  EXPECT_EQ(dir_files(tmp.path()),
            (std::set<std::string>{kShard1, kShard2, kShard3, "model.safetensors.index.json"}));
  const json index = read_json(tmp / "model.safetensors.index.json");
  EXPECT_EQ(index["metadata"], (json{{"total_size", 112}, {"total_parameters", 28}}));
  EXPECT_EQ(index["weight_map"],
            (json{{"a", kShard2}, {"b", kShard2}, {"c", kShard1}, {"d", kShard3}}));
  // transformers' json.dumps(index, indent=2, sort_keys=True) + "\n"
  std::ifstream in(tmp / "model.safetensors.index.json");
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string head = "{\n  \"metadata\": {\n    \"total_parameters\": 28,\n    \"total_size\": 112\n  },\n";
  EXPECT_EQ(text.substr(0, head.size()), head);
  EXPECT_EQ(text.back(), '\n');

  const auto ckpt = SafetensorsCheckpoint::open(tmp.path().string());
  ASSERT_EQ(ckpt.tensors().size(), 4u);
  for (size_t i = 0; i < t.writes.size(); ++i) {
    const auto& e = ckpt.at(t.writes[i].name);
    const auto span = e.file->bytes(*e.info);
    ASSERT_EQ(span.size(), t.writes[i].nbytes);
    EXPECT_EQ(0, std::memcmp(span.data(), t.storage[i].data(), span.size()));
  }
  EXPECT_EQ(fs::path(ckpt.at("c").file->path()).filename(), kShard1);
  EXPECT_NE(error_of([&] { ckpt.at("zz"); }).find(tmp.path().string() + ": checkpoint has no tensor 'zz'"),
            std::string::npos);
}

TEST(Checkpoint, ResavingRemovesStaleFiles) {
  TempDir tmp;
  const Tensors t = sharded_tensors();
  write_safetensors_checkpoint(tmp.path().string(), t.writes);
  write_bytes(tmp / "notes.txt", "kept");
  write_safetensors_checkpoint(tmp.path().string(), t.writes, kShardLimit);
  EXPECT_EQ(dir_files(tmp.path()),
            (std::set<std::string>{kShard1, kShard2, kShard3, "model.safetensors.index.json", "notes.txt"}));
  // Back to one file: the stale index would otherwise win over model.safetensors.
  write_safetensors_checkpoint(tmp.path().string(), {t.writes[0]});
  EXPECT_EQ(dir_files(tmp.path()), (std::set<std::string>{"model.safetensors", "notes.txt"}));
  EXPECT_EQ(SafetensorsCheckpoint::open(tmp.path().string()).tensors().size(), 1u);
}

TEST(Checkpoint, RejectsDuplicateNamesBeforeWriting) {
  TempDir tmp;
  Tensors t = sharded_tensors();
  t.writes.push_back(t.writes[0]);  // "a" again, would land in another shard
  EXPECT_NE(error_of([&] { write_safetensors_checkpoint(tmp.path().string(), t.writes, kShardLimit); })
                .find("tensor 'a': duplicate tensor name"),
            std::string::npos);
  EXPECT_TRUE(dir_files(tmp.path()).empty());
}

class CheckpointErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    write_safetensors_checkpoint(tmp.path().string(), t.writes, kShardLimit);
    index_path = tmp / "model.safetensors.index.json";
  }
  std::string open_error() { return error_of([&] { SafetensorsCheckpoint::open(tmp.path().string()); }); }
  void expect_error(const std::string& fragment, const std::string& file) {
    const std::string msg = open_error();
    EXPECT_EQ(msg.rfind("[safetensors] " + file + ": ", 0), 0u) << msg;
    EXPECT_NE(msg.find(fragment), std::string::npos) << "message: " << msg << "\nexpected: " << fragment;
  }
  void write_index(const std::string& text) {
    write_file_atomic(index_path, std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
  }
  /// Rewrites a shard with the given tensors of `t` (by index).
  void rewrite_shard(const std::string& shard, std::vector<TensorWrite> writes) {
    write_safetensors(tmp / shard, writes, {{"format", "pt"}});
  }
  TempDir tmp;
  Tensors t = sharded_tensors();
  std::string index_path;
};

TEST_F(CheckpointErrors, ValidCheckpointOpens) {
  EXPECT_EQ(SafetensorsCheckpoint::open(tmp.path().string()).tensors().size(), 4u);
}

TEST_F(CheckpointErrors, MissingShard) {
  fs::remove(tmp / kShard3);
  expect_error("shard '" + kShard3 + "' (listed for tensor 'd') is missing: " + (tmp / kShard3), index_path);
}

TEST_F(CheckpointErrors, TensorInTwoShards) {
  rewrite_shard(kShard3, {t.writes[3], t.writes[0]});  // "a" also in shard 3
  expect_error("tensor 'a' is in two shards: " + kShard2 + " and " + kShard3, index_path);
}

TEST_F(CheckpointErrors, ListedTensorAbsentFromItsShard) {
  rewrite_shard(kShard2, {t.writes[0]});  // "b" dropped
  expect_error("tensor 'b' is listed in shard " + kShard2 + " but is not in it", index_path);
}

TEST_F(CheckpointErrors, ExtraTensorInAShard) {
  const float x = 1;
  rewrite_shard(kShard3, {t.writes[3], {"extra", DType::F32, {1}, &x, 4}});
  expect_error("shard " + kShard3 + " holds tensor 'extra' that the index does not list", index_path);
}

TEST_F(CheckpointErrors, TensorInAnotherShardThanListed) {
  rewrite_shard(kShard2, {t.writes[0]});
  rewrite_shard(kShard3, {t.writes[3], t.writes[1]});  // "b" moved from shard 2 to 3
  expect_error("tensor 'b' is listed in shard " + kShard2 + " but is in " + kShard3, index_path);
}

TEST_F(CheckpointErrors, MalformedIndexJson) {
  write_index("{\"weight_map\": {");
  expect_error("index is not valid JSON", index_path);
  write_index("[]");
  expect_error("index must be a JSON object, not array", index_path);
  write_index(R"({"metadata": {}})");
  expect_error("missing 'weight_map'", index_path);
  write_index(R"({"weight_map": []})");
  expect_error("'weight_map' must be an object, not array", index_path);
  write_index(R"({"metadata": 5, "weight_map": {}})");
  expect_error("'metadata' must be an object, not number 5", index_path);
  write_index(R"({"weight_map": {"a": 1}})");
  expect_error("tensor 'a': shard must be a file name string, not number 1", index_path);
  write_index(R"({"weight_map": {"a": "../model-00002-of-00003.safetensors"}})");
  expect_error("is not a plain file name", index_path);
  write_index(R"({"weight_map": {"a": "model-00002-of-00003.safetensors", "a": "model-00001-of-00003.safetensors"}})");
  expect_error("duplicate key 'a' in '/weight_map'", index_path);
  write_index(R"({"weight_map": {}, "weight_map": {}})");
  expect_error("duplicate key 'weight_map' at the top level", index_path);
}

TEST_F(CheckpointErrors, CorruptShardNamesTheShard) {
  write_bytes(tmp / kShard2, "garbage!garbage!");
  expect_error("header length", tmp / kShard2);
}

TEST(Checkpoint, EmptyDirectory) {
  TempDir tmp;
  const std::string msg = error_of([&] { SafetensorsCheckpoint::open(tmp.path().string()); });
  EXPECT_NE(msg.find(tmp.path().string() + ": no model.safetensors or model.safetensors.index.json"), std::string::npos)
      << msg;
}

// ================================================================================================
// Interop with Python's safetensors. ctest runs `safetensors_interop.py write DIR` first and passes
// DIR in LIBFT_INTEROP_DIR; without it (no Python with safetensors) these tests skip, and ctest
// reports them as skipped (not passed), unless LIBFT_INTEROP_REQUIRED=1 makes that a failure.

namespace {
/// The fixture directory, or "" (after a skip or failure has been recorded) when unavailable.
std::string interop_dir(bool& skip) {
  const char* dir = std::getenv("LIBFT_INTEROP_DIR");
  const char* required = std::getenv("LIBFT_INTEROP_REQUIRED");
  skip = false;
  if (dir && fs::exists(fs::path(dir) / "expect.json")) return dir;
  if (required && std::string(required) == "1") {
    ADD_FAILURE() << "LIBFT_INTEROP_REQUIRED=1 but " << (dir ? dir : "LIBFT_INTEROP_DIR (unset)")
                  << "/expect.json is missing: did the Python fixture step run?";
  } else {
    skip = true;
  }
  return "";
}

#define INTEROP_DIR(var)                                                                           \
  bool skip_##var = false;                                                                         \
  const std::string var = interop_dir(skip_##var);                                                 \
  if (skip_##var) GTEST_SKIP() << "no Python safetensors fixture (LIBFT_INTEROP_DIR); see tests/CMakeLists.txt"; \
  if (var.empty()) return

/// Tensors of one expectation case; `storage` owns the bytes.
struct Expected {
  std::vector<std::vector<uint8_t>> storage;
  std::vector<TensorWrite> writes;
  std::map<std::string, std::string> metadata;
};
Expected expected_of(const json& tensors, const json& metadata) {
  Expected e;
  e.storage.reserve(tensors.size());
  for (const json& t : tensors) {
    e.storage.push_back(from_hex(t["hex"].get<std::string>()));
    e.writes.push_back({t["name"].get<std::string>(), parse_dtype(t["dtype"].get<std::string>(), "expect.json"),
                        t["shape"].get<std::vector<int64_t>>(), e.storage.back().data(), e.storage.back().size()});
  }
  if (metadata.is_object()) e.metadata = metadata.get<std::map<std::string, std::string>>();
  return e;
}

void expect_tensors(const SafetensorsFile& file, const Expected& e) {
  EXPECT_EQ(file.tensors().size(), e.writes.size()) << file.path();
  for (size_t i = 0; i < e.writes.size(); ++i) {
    const TensorWrite& w = e.writes[i];
    SCOPED_TRACE(file.path() + " tensor " + w.name);
    const TensorInfo* t = file.find(w.name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->dtype, w.dtype);
    EXPECT_EQ(t->shape, w.shape);
    EXPECT_EQ(bytes_of(file, w.name), e.storage[i]);
  }
}
}  // namespace

TEST(Interop, ReadPythonFiles) {
  INTEROP_DIR(dir);
  const json expect = read_json(dir + "/expect.json");
  ASSERT_GE(expect["cases"].size(), 6u);
  for (const json& c : expect["cases"]) {
    const Expected e = expected_of(c["tensors"], c["metadata"]);
    const auto file = SafetensorsFile::open(dir + "/" + c["file"].get<std::string>());
    expect_tensors(*file, e);
    EXPECT_EQ(file->header().metadata, e.metadata) << file->path();
  }
}

TEST(Interop, SerializeIsByteIdenticalToPython) {
  INTEROP_DIR(dir);
  const json expect = read_json(dir + "/expect.json");
  TempDir tmp;
  size_t compared = 0;
  for (const json& c : expect["cases"]) {
    if (!c["byte_identical"].get<bool>()) continue;
    const std::string file = c["file"].get<std::string>();
    SCOPED_TRACE(file);
    const Expected e = expected_of(c["tensors"], c["metadata"]);
    const auto python = read_bytes(dir + "/" + file);
    EXPECT_EQ(file_string(serialize_safetensors(e.writes, e.metadata)), file_string(python));
    write_safetensors(tmp / file, e.writes, e.metadata);
    EXPECT_EQ(read_bytes(tmp / file), python);
    ++compared;
  }
  EXPECT_GE(compared, 6u);
}

TEST(Interop, ReadPythonShardedCheckpoint) {
  INTEROP_DIR(dir);
  const json expect = read_json(dir + "/expect.json");
  const json& c = expect["checkpoint"];
  const Expected e = expected_of(c["tensors"], nullptr);
  const auto ckpt = SafetensorsCheckpoint::open(dir + "/" + c["dir"].get<std::string>());
  ASSERT_EQ(ckpt.tensors().size(), e.writes.size());
  std::set<const SafetensorsFile*> files;
  for (size_t i = 0; i < e.writes.size(); ++i) {
    const auto& entry = ckpt.at(e.writes[i].name);
    files.insert(entry.file);
    EXPECT_EQ(entry.info->dtype, e.writes[i].dtype);
    EXPECT_EQ(entry.info->shape, e.writes[i].shape);
    EXPECT_EQ(bytes_of(*entry.file, e.writes[i].name), e.storage[i]);
  }
  EXPECT_GT(files.size(), 2u);
}

// Writes DIR/from_libft/ for `safetensors_interop.py verify`: every case, and a sharded checkpoint of
// the checkpoint tensors in their state-dict order with Python's shard limit.
TEST(InteropWrite, WriteForPython) {
  INTEROP_DIR(dir);
  const json expect = read_json(dir + "/expect.json");
  const std::string out = dir + "/from_libft";
  fs::remove_all(out);
  fs::create_directories(out);
  for (const json& c : expect["cases"]) {
    const Expected e = expected_of(c["tensors"], c["metadata"]);
    write_safetensors(out + "/" + c["file"].get<std::string>(), e.writes, e.metadata);
  }
  const json& c = expect["checkpoint"];
  const Expected e = expected_of(c["tensors"], nullptr);
  write_safetensors_checkpoint(out + "/ckpt", e.writes, c["max_shard_bytes"].get<uint64_t>());
  EXPECT_TRUE(fs::exists(out + "/ckpt/model.safetensors.index.json"));
}

// HDF5 array files (ft/data/array_file.h): round trip with shapes and attributes, kinds, damage.
#include <gtest/gtest.h>

#include <fstream>
#include <numeric>

#include "ft/data/array_file.h"
#include "ft/util/error.h"
#include "store_test_util.h"

namespace ft::data {
namespace {

TEST(ArrayFile, RoundTripsArraysShapesAndAttributes) {
  const auto dir = testing::scratch_dir();
  std::vector<float> a(3 * 5), b(7), empty;
  std::iota(a.begin(), a.end(), -4.5f);
  std::iota(b.begin(), b.end(), 100.0f);
  const std::string path = (dir / "x.h5").string();
  write_array_file(path, "test", {{"samples", "12"}, {"note", "ünïcode"}},
                   {{"model.layers.0.w", {3, 5}, a.data()}, {"b", {7}, b.data()}, {"none", {0}, empty.data()}});
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp." + std::to_string(::getpid())));
  const ArrayFileInfo info = inspect_array_file(path, "test");
  EXPECT_EQ(info.kind, "test");
  EXPECT_EQ(info.attrs.at("samples"), "12");
  EXPECT_EQ(info.attrs.at("note"), "ünïcode");
  ASSERT_EQ(info.arrays.size(), 3u);
  EXPECT_EQ(info.arrays[0].first, "model.layers.0.w");  // creation order
  EXPECT_EQ(info.arrays[0].second, (std::vector<int64_t>{3, 5}));
  std::map<std::string, std::vector<float>> got;
  read_array_file(path, "test", [&](const std::string& name, const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    got[name].resize(static_cast<size_t>(n));
    return got[name].data();
  });
  EXPECT_EQ(got["model.layers.0.w"], a);
  EXPECT_EQ(got["b"], b);
  EXPECT_TRUE(got["none"].empty());
  // Skipping an array (null destination) reads the others.
  std::vector<float> only_b(7);
  read_array_file(path, "", [&](const std::string& name, const std::vector<int64_t>&) {
    return name == "b" ? only_b.data() : nullptr;
  });
  EXPECT_EQ(only_b, b);
}

TEST(ArrayFile, WrongKindMissingFileAndDamageAreErrors) {
  const auto dir = testing::scratch_dir();
  const std::string path = (dir / "x.h5").string();
  std::vector<float> big(200000);
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>(i % 977) * 0.25f;
  write_array_file(path, "ewc", {}, {{"w", {400, 500}, big.data()}});
  auto error_of = [](const std::function<void()>& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error_of([&] { inspect_array_file(path, "other"); }).find("holds 'ewc' arrays, expected 'other'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { inspect_array_file((dir / "missing.h5").string()); }).find("no such file"),
            std::string::npos);
  std::ofstream(dir / "text.h5") << "not hdf5";
  EXPECT_NE(error_of([&] { inspect_array_file((dir / "text.h5").string()); }).find("cannot open as HDF5"),
            std::string::npos);
  // Flip bytes in the middle of the compressed data: Fletcher32 names the array.
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(0, std::ios::end);
    const std::streamoff size = f.tellg();
    for (std::streamoff at = size / 2; at < size / 2 + 16; ++at) {
      f.seekg(at);
      char c = 0;
      f.read(&c, 1);
      f.seekp(at);
      c = static_cast<char>(~c);
      f.write(&c, 1);
    }
  }
  std::vector<float> out(big.size());
  const std::string e = error_of([&] { read_array_file(path, "ewc", [&](const std::string&, const std::vector<int64_t>&) { return out.data(); }); });
  EXPECT_NE(e.find("array 'w' cannot be read"), std::string::npos) << e;
}

}  // namespace
}  // namespace ft::data

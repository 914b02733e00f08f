// libFuzzer target for parse_safetensors (build with -DLIBFT_FUZZ=ON and clang; see CMakeLists.txt).
//
// Any input must either parse or throw ft::Error: a crash, a sanitizer report, or any other exception
// is a bug. Inputs that parse must also satisfy the header's invariants, and serialising the parsed
// tensors must give a file that parses to the same tensors and re-serialises to the same bytes.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "ft/io/safetensors.h"

using namespace ft::io;

namespace {

[[noreturn]] void bug(const char* what) {
  std::fprintf(stderr, "fuzz_safetensors: %s\n", what);
  std::abort();
}

void check_invariants(const SafetensorsHeader& h, size_t size) {
  if (h.data_start < 8 || h.data_start > size) bug("data_start outside the file");
  uint64_t pos = 0;
  for (const TensorInfo& t : h.tensors) {
    if (t.begin != pos || t.end < t.begin) bug("offsets do not tile the data buffer");
    uint64_t bits = dtype_bits(t.dtype);
    for (int64_t d : t.shape) {
      if (d < 0) bug("negative dimension accepted");
      if (d != 0 && bits > UINT64_MAX / static_cast<uint64_t>(d)) bug("size overflow accepted");
      bits *= static_cast<uint64_t>(d);
    }
    if (bits % 8 != 0 || bits / 8 != t.nbytes()) bug("size does not match the shape");
    if (t.name == "__metadata__") bug("metadata parsed as a tensor");
    pos = t.end;
  }
  if (h.data_start + pos != size) bug("tensors do not cover the data buffer");
}

std::vector<TensorWrite> writes_of(const SafetensorsHeader& h, const uint8_t* data) {
  std::vector<TensorWrite> out;
  for (const TensorInfo& t : h.tensors)
    out.push_back({t.name, t.dtype, t.shape, data + h.data_start + t.begin, static_cast<size_t>(t.nbytes())});
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  SafetensorsHeader h;
  try {
    h = parse_safetensors(data, size, "fuzz-input");
  } catch (const ft::Error&) {
    return 0;  // the expected outcome for almost every input
  }
  check_invariants(h, size);

  // Round trip: a parsed file re-serialises (canonically) and parses back to the same content.
  std::vector<uint8_t> once, twice;
  SafetensorsHeader again;
  try {
    once = serialize_safetensors(writes_of(h, data), h.metadata);
    again = parse_safetensors(once.data(), once.size(), "fuzz-reserialized");
    twice = serialize_safetensors(writes_of(again, once.data()), again.metadata);
  } catch (const ft::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    bug("a parsed file failed to re-serialise or re-parse");
  }
  if (once != twice) bug("serialisation is not canonical");
  if (again.metadata != h.metadata || again.tensors.size() != h.tensors.size()) bug("round trip changed the header");
  for (const TensorInfo& t : h.tensors) {
    const TensorInfo* u = nullptr;
    for (const TensorInfo& x : again.tensors)
      if (x.name == t.name) u = &x;
    if (!u || u->dtype != t.dtype || u->shape != t.shape || u->nbytes() != t.nbytes()) bug("round trip changed a tensor");
    if (t.nbytes() && std::memcmp(data + h.data_start + t.begin, once.data() + again.data_start + u->begin, t.nbytes()) != 0)
      bug("round trip changed tensor bytes");
  }
  return 0;
}

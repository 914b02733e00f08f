// libFuzzer target for the chat-template Jinja interpreter (libft/src/data/jinja.cpp; build with
// -DLIBFT_FUZZ=ON and clang).
//
// The input is a template. It must parse or throw ft::Error; one that parses must render with a
// conversation (and with the generation prompt), or throw ft::Error, never crash, hang or grow past the
// sandbox's limits. The error must name the template. Generation spans must lie inside the output
// and not overlap.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

#include "ft/data/jinja.h"
#include "ft/util/error.h"

namespace jinja = ft::data::jinja;

namespace {

[[noreturn]] void bug(const std::string& what) {
  std::fprintf(stderr, "fuzz_jinja: %s\n", what.c_str());
  std::abort();
}

jinja::Dict make_context(bool generation_prompt) {
  return {{"messages", jinja::Value::parse_json(
                           R"([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi\n"},
                               {"role": "assistant", "content": "Hello, caf\u00e9 \ud83d\ude00"}, {"role": "user", "content": ""}])",
                           "messages")},
          {"bos_token", "<s>"},
          {"eos_token", "</s>"},
          {"tools", jinja::Value::none()},
          {"add_generation_prompt", generation_prompt}};
}

const jinja::Dict& context(bool generation_prompt) {
  static const jinja::Dict with[2] = {make_context(false), make_context(true)};
  return with[generation_prompt ? 1 : 0];
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 4096) return 0;  // longer templates only take longer
  const std::string_view source(reinterpret_cast<const char*>(data), size);
  std::optional<jinja::Template> t;
  try {
    t.emplace(source, "fuzz");
  } catch (const ft::Error& e) {
    if (std::string_view(e.what()).find("[chat template] fuzz:") != 0) bug(std::string("parse error without the name: ") + e.what());
    return 0;
  }
  for (bool gen : {false, true}) {
    try {
      jinja::Spans spans;
      const std::string out = t->render(context(gen), &spans);
      if (out.size() > (64u << 20)) bug("output past the 64 MiB limit");
      size_t last = 0;
      for (const auto& [b, e] : spans) {
        if (b > e || e > out.size()) bug("a generation span outside the output");
        if (b < last && e > last) bug("overlapping generation spans");
        last = e;
      }
    } catch (const ft::Error& e) {
      if (std::string_view(e.what()).find("[chat template] fuzz") != 0) bug(std::string("render error without the name: ") + e.what());
    }
  }
  return 0;
}

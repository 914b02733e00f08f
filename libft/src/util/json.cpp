#include "ft/util/json.h"

#include <fstream>
#include <set>
#include <sstream>
#include <vector>

#include "ft/util/error.h"

namespace ft {

nlohmann::json parse_json_strict(std::string_view text, const std::string& source, int max_depth) {
  // One key set per open object; the callback sees every key before its value.
  std::vector<std::set<std::string>> open_objects;
  auto callback = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    using E = nlohmann::json::parse_event_t;
    FT_CHECK(depth <= max_depth, "[json] ", source, ": nesting deeper than ", max_depth, " levels");
    switch (event) {
      case E::object_start: open_objects.emplace_back(); break;
      case E::object_end: open_objects.pop_back(); break;
      case E::key: {
        const auto& key = parsed.get_ref<const std::string&>();
        FT_CHECK(open_objects.back().insert(key).second, "[json] ", source, ": duplicate key '", key, "'");
        break;
      }
      default: break;
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), callback);
  } catch (const nlohmann::json::parse_error& e) {
    // Turn the byte offset into line:column for people.
    size_t offset = e.byte > 0 ? e.byte - 1 : 0, line = 1, col = 1;
    for (size_t i = 0; i < offset && i < text.size(); ++i) {
      if (text[i] == '\n') { ++line; col = 1; } else { ++col; }
    }
    FT_FAIL("[json] ", source, ":", line, ":", col, ": ", e.what());
  } catch (const nlohmann::json::exception& e) {  // a number out of range (1e999), ...
    FT_FAIL("[json] ", source, ": ", e.what());
  }
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  FT_CHECK(in, "cannot open '", path, "'");
  std::ostringstream os;
  os << in.rdbuf();
  FT_CHECK(!in.bad(), "error reading '", path, "'");
  return os.str();
}

nlohmann::json load_json_file(const std::string& path, int max_depth) {
  return parse_json_strict(read_text_file(path), path, max_depth);
}

}  // namespace ft

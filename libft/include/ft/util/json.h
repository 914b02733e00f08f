#pragma once
// Strict JSON parsing for files users hand us (config.json, index files, adapter configs).
// nlohmann-json silently keeps the last of duplicate keys; here a duplicate key at any depth is an
// error naming the key, and so is nesting deeper than `max_depth`.
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace ft {

/// Parses `text`; errors throw ft::Error starting with "[json] <source>: ".
nlohmann::json parse_json_strict(std::string_view text, const std::string& source, int max_depth = 64);
/// Reads a whole file and parses it strictly.
nlohmann::json load_json_file(const std::string& path, int max_depth = 64);
/// Reads a whole file into a string; throws ft::Error naming the path.
std::string read_text_file(const std::string& path);

}  // namespace ft

#pragma once
// One exception type for every error libft reports to its users. Messages name the place:
// "[safetensors] model.safetensors: tensor 'lm_head.weight': data_offsets [0, 12) ...".
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace ft {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}
}  // namespace detail

}  // namespace ft

/// FT_CHECK(cond, "[area] ", "message ", value, ...): throws ft::Error with the pieces concatenated.
#define FT_CHECK(cond, ...)                                   \
  do {                                                        \
    if (!(cond)) throw ::ft::Error(::ft::detail::concat(__VA_ARGS__)); \
  } while (0)

#define FT_FAIL(...) throw ::ft::Error(::ft::detail::concat(__VA_ARGS__))

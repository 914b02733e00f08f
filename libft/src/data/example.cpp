#include "ft/data/example.h"

#include "ft/util/error.h"

namespace ft::data {

void check_example(const Example& e, const RecordOrigin& origin) {
  FT_CHECK(e.tokens.size() == e.trainable.size(), "[data] ", origin.file, ":", origin.line, ": ", e.tokens.size(),
           " tokens but ", e.trainable.size(), " label flags");
  FT_CHECK(!e.tokens.empty(), "[data] ", origin.file, ":", origin.line, ": empty document");
}

}  // namespace ft::data

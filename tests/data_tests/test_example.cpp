#include <gtest/gtest.h>

#include "ft/data/example.h"
#include "ft/util/error.h"

using namespace ft::data;

TEST(Example, ChecksLengthsAndEmptiness) {
  EXPECT_NO_THROW(check_example({{1, 2}, {0, 1}}, {"a.jsonl", 3}));
  try {
    check_example({{1, 2}, {0}}, {"a.jsonl", 3});
    FAIL() << "expected an error";
  } catch (const ::ft::Error& e) {
    EXPECT_NE(std::string(e.what()).find("a.jsonl:3: 2 tokens but 1 label flags"), std::string::npos) << e.what();
  }
  EXPECT_THROW(check_example({{}, {}}, {"b.txt", 0}), ::ft::Error);
}

#pragma once
// The unit that flows from readers to the token store and the batcher: one tokenized document.
#include <cstdint>
#include <string>
#include <vector>

namespace ft::data {

/// One document after tokenization, BOS/EOS included as the format decided.
/// `trainable[i]` = 1 when token i is a label (the loss predicts it from tokens < i); prompt and
/// template tokens of instruction/chat data are 0, every token of plain text is 1 (except a BOS).
struct Example {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> trainable;  ///< same length as tokens
};

/// Where a record came from, for error messages and skip lists: "file:line".
struct RecordOrigin {
  std::string file;
  int64_t line = 0;  ///< 1-based; 0 for whole-file text documents
};

}  // namespace ft::data

namespace ft::data {
/// Throws ft::Error naming `origin` when tokens and trainable differ in length or the document is empty.
void check_example(const Example& example, const RecordOrigin& origin);
}  // namespace ft::data

// sentencepiece tokenizer: training on real text (the Debian fortunes), loading Hugging Face
// checkpoint directories, byte fallback, bad inputs, and parity with Python sentencepiece and
// transformers (the TokenizerParity cases, driven by tests/python/tokenizer_reference.py).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "ft/data/tokenizer.h"
#include "ft/util/error.h"

using ft::data::SpecialTokens;
using ft::data::Tokenizer;
using ft::data::TrainTokenizerOptions;
namespace fs = std::filesystem;

namespace {

// The fortunes package's folder; LIBFT_FORTUNES overrides it (see records_test_util.h).
const fs::path kFortunes = [] {
  const char* env = std::getenv("LIBFT_FORTUNES");
  return fs::path(env && *env ? env : "/usr/share/games/fortunes");
}();

fs::path tmp_root() {
  const char* env = std::getenv("LIBFT_DATA_TEST_TMP");
  fs::path root = env && *env ? fs::path(env) : fs::current_path() / "data_tmp"  /* ctest runs in the build tree */;
  root /= "tokenizer";
  fs::create_directories(root);
  return root;
}

// A fresh directory per test, so that reruns and parallel ctest entries do not see each other.
fs::path test_dir() {
  const auto* info = testing::UnitTest::GetInstance()->current_test_info();
  fs::path dir = tmp_root() / (std::string(info->test_suite_name()) + "." + info->name());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  EXPECT_TRUE(in) << p;
  std::ostringstream os;
  os << in.rdbuf();
  return os.str();
}

void write_file(const fs::path& p, std::string_view bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out) << p;
}

// The fortune files proper: the .dat indexes, the .u8 symlinks and any off/ directory are not text.
std::vector<fs::path> fortune_files() {
  std::vector<fs::path> files;
  if (!fs::is_directory(kFortunes)) return files;
  for (const auto& e : fs::directory_iterator(kFortunes)) {
    const auto ext = e.path().extension();
    if (e.is_regular_file() && !e.is_symlink() && ext != ".dat" && ext != ".u8") files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  return files;
}

// Records are separated by lines holding only '%'; a record keeps its own line breaks.
std::vector<std::string> fortune_records(const fs::path& file) {
  std::vector<std::string> records;
  std::istringstream in(read_file(file));
  std::string line, record;
  bool any = false;
  while (std::getline(in, line)) {
    if (line == "%") {
      if (any) records.push_back(record);
      record.clear();
      any = false;
    } else {
      if (any) record += '\n';
      record += line;
      any = true;
    }
  }
  if (any) records.push_back(record);
  return records;
}

// All fortunes, one record per line (its line breaks become spaces): ~2.5 MB, 15k lines.
fs::path fortunes_corpus() {
  const fs::path path = tmp_root() / "fortunes_corpus.txt";
  const auto files = fortune_files();
  if (files.empty()) return {};
  std::string text;
  for (const auto& f : files) {
    for (auto r : fortune_records(f)) {
      std::replace(r.begin(), r.end(), '\n', ' ');
      text += r;
      text += '\n';
    }
  }
  // Rewritten each time rather than trusted: a concurrent or interrupted writer must not leave a
  // short corpus behind for the next run. Written under a unique name, then renamed into place.
  const fs::path tmp = path.string() + "." + std::to_string(::getpid());
  write_file(tmp, text);
  fs::rename(tmp, path);
  return path;
}

#define REQUIRE_FORTUNES()                                                                                 \
  do {                                                                                                     \
    if (fortune_files().empty())                                                                           \
      FAIL() << "Debian package 'fortunes' is not installed (" << kFortunes << "); run scripts/setup.sh"; \
  } while (0)

// The library's reference configuration: 2k-piece BPE with byte fallback, as Llama but smaller,
// trained on a ~1 MB sample of the fortunes (6000 of the 15k records) so that it takes a second.
TrainTokenizerOptions small_bpe(const fs::path& prefix) {
  TrainTokenizerOptions o;
  o.inputs = {fortunes_corpus().string()};
  o.model_prefix = prefix.string();
  o.vocab_size = 2000;
  o.model_type = "bpe";
  o.byte_fallback = true;
  o.character_coverage = 1.0;
  o.input_sentence_size = 6000;
  o.seed = 42;
  return o;
}

// Runs `fn` and checks that it throws ft::Error whose message holds every one of `parts`.
template <typename Fn>
void expect_error(Fn&& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
    ADD_FAILURE() << "expected an ft::Error";
  } catch (const ft::Error& e) {
    const std::string what = e.what();
    for (const auto& p : parts) EXPECT_NE(what.find(p), std::string::npos) << "missing '" << p << "' in: " << what;
  }
}

// Real text with what tokenizers get wrong: non-ASCII from the fortunes and the Jargon File's
// typography, emoji, CJK, combining marks, tabs, CRLF, runs of spaces at both ends, backspaces
// (the fortunes' overstriking), and nothing at all.
std::vector<std::string> hard_samples() {
  std::vector<std::string> s = {
      "",
      " ",
      "\t",
      "\n",
      "Real Programmers don't write in PASCAL.",
      "   leading spaces and trailing ones   ",
      "tabs\tbetween\t\twords\t",
      "a CRLF line\r\nand the next\r\n",
      "The Meaning of \xE2\x80\x98Hack\xE2\x80\x99 \xE2\x80\x94 \xE2\x80\x9CJargon File 4.4.7\xE2\x80\x9D",
      "\xE2\x94\x8C\xE2\x94\x80\xE2\x94\x80\xE2\x94\x90 box drawing \xC2\xA0non-breaking\xC2\xA0space",
      "party \xF0\x9F\x8E\x89 time \xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD",
      "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E\xE3\x81\xAE\xE3\x83\x86\xE3\x82\xAD\xE3\x82\xB9\xE3\x83\x88",
      "cafe\xCC\x81 vs caf\xC3\xA9",
      "_\bu_\bn_\bd_\be_\br_\bl_\bi_\bn_\be_\bd",
      "1234567890 3.14159 1e-9",
  };
  for (const auto* name : {"linux", "pets", "wisdom", "law"}) {
    const auto records = fortune_records(kFortunes / name);
    for (size_t i = 0; i < records.size(); i += 40) s.push_back(records[i]);
  }
  return s;
}

// ctest runs every test in a process of its own, and each would train the shared model again (half a
// second apiece). Training is deterministic (TrainingIsDeterministicAndSeeded checks it), so the
// model is kept under a name derived from this test binary's size and mtime: a rebuilt binary, whose
// trainer may have changed, trains afresh; processes of the same binary reuse the file, which the
// library writes with an atomic rename, so a concurrent reader never sees half of it.
fs::path shared_model_dir() {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  std::string key = "nocache-" + std::to_string(::getpid());
  if (!ec) {
    const auto size = fs::file_size(exe, ec);
    const auto mtime = fs::last_write_time(exe, ec).time_since_epoch().count();
    if (!ec) key = std::to_string(size) + "-" + std::to_string(static_cast<uint64_t>(mtime));
  }
  return tmp_root() / ("shared-" + key);
}

class TokenizerTest : public testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (fortune_files().empty()) return;  // each test reports it
    const fs::path dir = shared_model_dir();
    const fs::path model = dir / "bpe2k.model";
    if (!fs::exists(model)) {
      // Models of earlier builds; best effort, another binary's run may still hold one.
      std::error_code ec;
      for (const auto& e : fs::directory_iterator(tmp_root(), ec)) {
        const auto name = e.path().filename().string();
        if (name.rfind("shared-", 0) == 0 && e.path() != dir) fs::remove_all(e.path(), ec);
      }
      Tokenizer::train(small_bpe(dir / "bpe2k"));
    }
    model_ = new std::string(model.string());
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }
  void SetUp() override {
    REQUIRE_FORTUNES();
    ASSERT_NE(model_, nullptr);
  }
  static const std::string& model() { return *model_; }
  static std::string* model_;
};
std::string* TokenizerTest::model_ = nullptr;

}  // namespace

TEST_F(TokenizerTest, TrainedModelLoadsWithLlamaSpecialTokens) {
  const auto tok = Tokenizer::load(model());
  EXPECT_EQ(tok.vocab_size(), 2000);
  EXPECT_EQ(tok.path(), model());
  const SpecialTokens& sp = tok.special();
  EXPECT_EQ(sp.unk, 0);
  EXPECT_EQ(sp.bos, 1);
  EXPECT_EQ(sp.eos, 2);
  EXPECT_EQ(sp.pad, -1);
  EXPECT_TRUE(sp.add_bos);
  EXPECT_FALSE(sp.add_eos);
  EXPECT_EQ(tok.id_to_piece(0), "<unk>");
  EXPECT_EQ(tok.id_to_piece(1), "<s>");
  EXPECT_EQ(tok.id_to_piece(2), "</s>");
  // Byte fallback reserves all 256 byte pieces right after the control pieces, as in Llama.
  EXPECT_EQ(tok.id_to_piece(3), "<0x00>");
  EXPECT_EQ(tok.id_to_piece(3 + 255), "<0xFF>");
  // The .vocab file: one "piece<TAB>score" line per id.
  const std::string vocab = read_file(fs::path(model()).replace_extension(".vocab"));
  EXPECT_EQ(std::count(vocab.begin(), vocab.end(), '\n'), 2000);
  EXPECT_EQ(vocab.rfind("<unk>\t", 0), 0u);
}

TEST_F(TokenizerTest, EncodeDecodeRoundTripsRealText) {
  const auto tok = Tokenizer::load(model());
  size_t records = 0, ids_total = 0, bytes_total = 0;
  for (const auto& file : fortune_files()) {
    for (const auto& r : fortune_records(file)) {
      const auto ids = tok.encode(r);
      ASSERT_EQ(tok.decode(ids), r) << file;
      ++records;
      ids_total += ids.size();
      bytes_total += r.size();
    }
  }
  for (const auto& s : hard_samples()) EXPECT_EQ(tok.decode(tok.encode(s)), s) << s;
  EXPECT_GT(records, 10000u);
  // A 2k BPE vocabulary learnt from this text should compress it well beyond one id per 2 bytes.
  EXPECT_GT(double(bytes_total) / double(ids_total), 2.5);
}

TEST_F(TokenizerTest, EncodeAddsNoSpecialTokensAndDecodeSkipsThem) {
  const auto tok = Tokenizer::load(model());
  const auto& sp = tok.special();
  EXPECT_TRUE(tok.encode("").empty());
  const std::string text = "You will be surprised by a loud noise.";
  const auto ids = tok.encode(text);
  ASSERT_FALSE(ids.empty());
  for (int32_t id : ids) {
    EXPECT_NE(id, sp.bos);
    EXPECT_NE(id, sp.eos);
  }
  std::vector<int32_t> framed = {sp.bos};
  framed.insert(framed.end(), ids.begin(), ids.end());
  framed.push_back(sp.eos);
  framed.push_back(sp.eos);
  EXPECT_EQ(tok.decode(framed), text);
  const std::vector<int32_t> only_specials = {sp.bos, sp.eos, sp.unk};
  EXPECT_EQ(tok.decode(only_specials), "");
  const std::vector<int32_t> out_of_range = {5, tok.vocab_size()};
  expect_error([&] { tok.decode(out_of_range); }, {"[tokenizer]", "id 2000", "outside the vocabulary"});
  const std::vector<int32_t> negative = {-1};
  expect_error([&] { tok.decode(negative); }, {"id -1"});
}

TEST_F(TokenizerTest, ByteFallbackCoversCharactersOutsideTheVocabulary) {
  const auto tok = Tokenizer::load(model());
  // No emoji in the fortunes: the party popper must come out as its four UTF-8 bytes.
  const std::string popper = "\xF0\x9F\x8E\x89";
  const auto ids = tok.encode(popper);
  std::vector<std::string> pieces;
  for (int32_t id : ids) pieces.push_back(tok.id_to_piece(id));
  const std::vector<std::string> want_tail = {"<0xF0>", "<0x9F>", "<0x8E>", "<0x89>"};
  ASSERT_GE(pieces.size(), 4u);
  EXPECT_TRUE(std::equal(want_tail.begin(), want_tail.end(), pieces.end() - 4)) << testing::PrintToString(pieces);
  for (int32_t id : ids) EXPECT_NE(id, tok.special().unk);
  EXPECT_EQ(tok.decode(ids), popper);
  // Without byte fallback the same character is unknown, and decoding (which skips unk, as
  // Hugging Face's skip_special_tokens does) loses it.
  const fs::path dir = test_dir();
  auto o = small_bpe(dir / "nobytes");
  o.byte_fallback = false;
  o.input_sentence_size = 2000;
  o.vocab_size = 500;
  const auto plain = Tokenizer::load(Tokenizer::train(o));
  const auto plain_ids = plain.encode("a " + popper);
  EXPECT_NE(std::find(plain_ids.begin(), plain_ids.end(), plain.special().unk), plain_ids.end());
  EXPECT_EQ(plain.decode(plain_ids), "a ");
}

TEST_F(TokenizerTest, InvalidUtf8BecomesTheReplacementCharacter) {
  // sentencepiece normalises malformed UTF-8 to U+FFFD before encoding, so such bytes do not
  // round-trip even with byte fallback. Pinned here so that a change of behaviour is noticed.
  const auto tok = Tokenizer::load(model());
  EXPECT_EQ(tok.decode(tok.encode("ok \xFF ok")), "ok \xEF\xBF\xBD ok");
}

TEST_F(TokenizerTest, PieceIdMapping) {
  const auto tok = Tokenizer::load(model());
  for (int32_t id = 0; id < tok.vocab_size(); ++id) {
    ASSERT_EQ(tok.piece_to_id(tok.id_to_piece(id)), id) << tok.id_to_piece(id);
  }
  EXPECT_EQ(tok.piece_to_id("no-such-piece-\xE2\x98\x83"), tok.special().unk);
  expect_error([&] { tok.id_to_piece(2000); }, {"id 2000", model()});
  expect_error([&] { tok.id_to_piece(-3); }, {"id -3"});
}

TEST_F(TokenizerTest, FingerprintCoversModelAndSettings) {
  const auto a = Tokenizer::load(model());
  const auto b = Tokenizer::load(model());
  EXPECT_EQ(a.fingerprint().size(), 64u);
  EXPECT_EQ(a.fingerprint().find_first_not_of("0123456789abcdef"), std::string::npos) << a.fingerprint();
  EXPECT_EQ(a.fingerprint(), b.fingerprint());
  EXPECT_EQ(ft::data::fingerprint_settings(a.special()),
            "libft-tokenizer-v1 bos=1 eos=2 pad=-1 unk=0 add_bos=1 add_eos=0");

  // The same model in a directory without configuration is the same tokenizer...
  const fs::path dir = test_dir();
  fs::copy_file(model(), dir / "tokenizer.model");
  EXPECT_EQ(Tokenizer::load(dir.string()).fingerprint(), a.fingerprint());
  // ...but not once the configuration changes what a document's ids are.
  write_file(dir / "tokenizer_config.json", R"({"add_eos_token": true})");
  const auto with_eos = Tokenizer::load(dir.string());
  EXPECT_TRUE(with_eos.special().add_eos);
  EXPECT_NE(with_eos.fingerprint(), a.fingerprint());
  // And another model is another tokenizer.
  auto o = small_bpe(dir / "other");
  o.vocab_size = 1000;
  o.input_sentence_size = 2000;
  EXPECT_NE(Tokenizer::load(Tokenizer::train(o)).fingerprint(), a.fingerprint());
}

TEST_F(TokenizerTest, CheckpointDirectoryConfiguration) {
  const fs::path dir = test_dir();
  fs::copy_file(model(), dir / "tokenizer.model");
  // As transformers writes it: AddedToken objects and plain strings side by side.
  write_file(dir / "tokenizer_config.json", R"({
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": false,
    "add_eos_token": true,
    "bos_token": {"content": "<s>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false},
    "eos_token": "</s>",
    "unk_token": {"content": "<unk>", "special": true},
    "pad_token": "<unk>",
    "added_tokens_decoder": {"0": {"content": "<unk>", "special": true}},
    "model_max_length": 2048
  })");
  write_file(dir / "special_tokens_map.json", R"({"pad_token": "</s>", "additional_special_tokens": []})");
  auto tok = Tokenizer::load(dir.string());
  EXPECT_EQ(tok.path(), (dir / "tokenizer.model").string());
  EXPECT_FALSE(tok.special().add_bos);
  EXPECT_TRUE(tok.special().add_eos);
  EXPECT_EQ(tok.special().bos, 1);
  EXPECT_EQ(tok.special().eos, 2);
  EXPECT_EQ(tok.special().unk, 0);
  EXPECT_EQ(tok.special().pad, 0);  // tokenizer_config.json wins over special_tokens_map.json

  // special_tokens_map.json alone fills in what tokenizer_config.json leaves out.
  write_file(dir / "tokenizer_config.json", R"({"add_bos_token": true})");
  write_file(dir / "special_tokens_map.json", R"({"pad_token": {"content": "</s>"}, "bos_token": "</s>"})");
  tok = Tokenizer::load(dir.string());
  EXPECT_EQ(tok.special().pad, 2);
  EXPECT_EQ(tok.special().bos, 2);
  EXPECT_TRUE(tok.special().add_bos);
  EXPECT_FALSE(tok.special().add_eos);

  // null declares that there is none.
  write_file(dir / "tokenizer_config.json", R"({"pad_token": null})");
  EXPECT_EQ(Tokenizer::load(dir.string()).special().pad, -1);

  // A special token the vocabulary lacks, in either file, is an error naming that file.
  write_file(dir / "special_tokens_map.json", "{}");
  write_file(dir / "tokenizer_config.json", R"({"pad_token": "<pad>"})");
  expect_error([&] { Tokenizer::load(dir.string()); },
               {"[tokenizer]", (dir / "tokenizer_config.json").string(), "pad_token '<pad>'", "not in the vocabulary"});
  write_file(dir / "tokenizer_config.json", "{}");
  write_file(dir / "special_tokens_map.json", R"({"eos_token": {"content": "<|endoftext|>"}})");
  expect_error([&] { Tokenizer::load(dir.string()); },
               {(dir / "special_tokens_map.json").string(), "eos_token '<|endoftext|>'"});
  write_file(dir / "special_tokens_map.json", "{}");

  // Malformed JSON, duplicate keys, and wrong types name the file too.
  const std::string config = (dir / "tokenizer_config.json").string();
  write_file(config, R"({"add_bos_token": true,)");
  expect_error([&] { Tokenizer::load(dir.string()); }, {config});
  write_file(config, R"({"bos_token": "<s>", "bos_token": "</s>"})");
  expect_error([&] { Tokenizer::load(dir.string()); }, {config, "duplicate key 'bos_token'"});
  write_file(config, R"({"add_bos_token": "yes"})");
  expect_error([&] { Tokenizer::load(dir.string()); }, {config, "add_bos_token", "true or false"});
  write_file(config, R"({"bos_token": 1})");
  expect_error([&] { Tokenizer::load(dir.string()); }, {config, "bos_token"});
  write_file(config, R"({"bos_token": {"lstrip": true}})");
  expect_error([&] { Tokenizer::load(dir.string()); }, {config, "content"});
  write_file(config, R"(["not", "an", "object"])");
  expect_error([&] { Tokenizer::load(dir.string()); }, {config, "JSON object"});
  write_file(config, R"({"add_eos_token": true, "eos_token": null})");
  expect_error([&] { Tokenizer::load(dir.string()); }, {"add_eos_token", "no EOS token"});
}

TEST_F(TokenizerTest, MissingAndCorruptModelFiles) {
  const fs::path dir = test_dir();
  const std::string missing = (dir / "nope" / "tokenizer.model").string();
  expect_error([&] { Tokenizer::load(missing); }, {"[tokenizer]", missing, "no such file"});
  // A checkpoint directory with only tokenizer.json (a tokenizers-library tokenizer) loads that, and
  // an empty object there is an error naming it (test_bpe.cpp has the real ones).
  fs::create_directories(dir / "hf_fast");
  write_file(dir / "hf_fast" / "tokenizer.json", "{}");
  expect_error([&] { Tokenizer::load((dir / "hf_fast").string()); }, {(dir / "hf_fast" / "tokenizer.json").string(), "no 'model'"});

  const std::string bytes = read_file(model());
  const std::string path = (dir / "tokenizer.model").string();
  write_file(path, "");
  expect_error([&] { Tokenizer::load(path); }, {path, "empty file"});
  // Cut anywhere, including right after a piece or at the end of the trainer_spec, where protobuf
  // itself would accept the rest as a smaller model.
  for (size_t cut : {size_t(1), size_t(100), bytes.size() / 3, bytes.size() / 2, bytes.size() - 1}) {
    write_file(path, std::string_view(bytes).substr(0, cut));
    expect_error([&] { Tokenizer::load(path); }, {"[tokenizer]", path});
  }
  size_t boundaries = 0;
  for (size_t cut = bytes.size() / 2; cut < bytes.size() / 2 + 64; ++cut) {
    write_file(path, std::string_view(bytes).substr(0, cut));
    try {
      Tokenizer::load(path);
      ADD_FAILURE() << "a model cut at byte " << cut << " of " << bytes.size() << " loaded";
    } catch (const ft::Error& e) {
      if (std::string(e.what()).find("no normalizer_spec") != std::string::npos) ++boundaries;
    }
  }
  EXPECT_GT(boundaries, 0u) << "no cut landed on a field boundary; the check above proved nothing";
  // Not a model at all: text, and a model with flipped bytes.
  write_file(path, read_file(kFortunes / "linux"));
  expect_error([&] { Tokenizer::load(path); }, {path, "not a sentencepiece model"});
  std::string flipped = bytes;
  for (size_t i = 0; i < flipped.size(); i += 7) flipped[i] = static_cast<char>(~flipped[i]);
  write_file(path, flipped);
  expect_error([&] { Tokenizer::load(path); }, {path});
  // Well-formed protobuf that sentencepiece itself rejects: an empty piece, no <unk>, <unk> twice.
  for (const std::string& crafted : {std::string("\x0a\x00\x1a\x00", 4), std::string("\x0a\x05\x0a\x03<s>\x1a\x00", 9),
                                     std::string("\x0a\x07\x0a\x05<unk>\x0a\x07\x0a\x05<unk>\x1a\x00", 20)}) {
    write_file(path, crafted);
    expect_error([&] { Tokenizer::load(path); }, {path, "not a valid sentencepiece model"});
  }
  // The directory form reports the model file's path.
  write_file(path, std::string_view(bytes).substr(0, bytes.size() / 2));
  expect_error([&] { Tokenizer::load(dir.string()); }, {path});
}

TEST_F(TokenizerTest, TrainingIsDeterministicAndSeeded) {
  const fs::path dir = test_dir();
  // Sampling 3000 of the 15k records makes the seed matter; different prefixes (directories) must
  // not leak into the model.
  auto a = small_bpe(dir / "a" / "m");
  a.input_sentence_size = 3000;
  a.vocab_size = 1000;
  a.seed = 7;
  auto b = a;
  b.model_prefix = (dir / "b" / "m").string();
  auto c = a;
  c.model_prefix = (dir / "c" / "m").string();
  c.seed = 8;
  const std::string ma = read_file(Tokenizer::train(a));
  const std::string mb = read_file(Tokenizer::train(b));
  const std::string mc = read_file(Tokenizer::train(c));
  EXPECT_FALSE(ma.empty());
  EXPECT_TRUE(ma == mb) << "two trainings with the same seed differ";
  EXPECT_FALSE(ma == mc) << "the seed does not reach the sampling";
  EXPECT_EQ(read_file(dir / "a" / "m.vocab"), read_file(dir / "b" / "m.vocab"));
}

TEST_F(TokenizerTest, TrainsUnigramToo) {
  const fs::path dir = test_dir();
  auto o = small_bpe(dir / "uni");
  o.model_type = "unigram";
  o.vocab_size = 1000;
  o.input_sentence_size = 2000;
  const auto tok = Tokenizer::load(Tokenizer::train(o));
  EXPECT_EQ(tok.vocab_size(), 1000);
  for (const auto& s : hard_samples()) EXPECT_EQ(tok.decode(tok.encode(s)), s) << s;
}

TEST_F(TokenizerTest, TrainingRejectsBadOptions) {
  const fs::path dir = test_dir();
  auto o = small_bpe(dir / "m");
  auto with = [&](auto change) {
    auto copy = o;
    change(copy);
    return copy;
  };
  const std::string missing = (dir / "missing.txt").string();
  expect_error([&] { Tokenizer::train(with([&](auto& x) { x.inputs.push_back(missing); })); }, {missing});
  expect_error([&] { Tokenizer::train(with([](auto& x) { x.inputs.clear(); })); }, {"no input files"});
  expect_error([&] { Tokenizer::train(with([](auto& x) { x.model_type = "wordpiece"; })); }, {"'wordpiece'"});
  expect_error([&] { Tokenizer::train(with([](auto& x) { x.vocab_size = 0; })); }, {"vocab_size"});
  expect_error([&] { Tokenizer::train(with([](auto& x) { x.character_coverage = 1.5; })); }, {"character_coverage"});
  expect_error([&] { Tokenizer::train(with([](auto& x) { x.model_prefix.clear(); })); }, {"model_prefix"});
  // More pieces than the text has: sentencepiece's own complaint, passed on.
  expect_error([&] {
    Tokenizer::train(with([](auto& x) {
      x.vocab_size = 200000;
      x.input_sentence_size = 200;
    }));
  }, {"[tokenizer] train", "ocab"});
  // Fewer pieces than the text's characters: said in this API's terms (sentencepiece's own message
  // advises a flag that ft train-tokenizer does not have).
  expect_error([&] { Tokenizer::train(with([](auto& x) { x.vocab_size = 40; })); },
               {"a vocabulary of 40 pieces is smaller than the", "characters the text needs", "--vocab-size"});
  write_file(dir / "blank.txt", "\n\r\n\n");
  expect_error([&] { Tokenizer::train(with([&](auto& x) { x.inputs = {(dir / "blank.txt").string()}; })); },
               {"no non-empty lines"});
  EXPECT_FALSE(fs::exists(dir / "m.model"));
}

// ---------------------------------------------------------------------------------------------
// Parity with Python. ctest runs these three steps in order (tests/data_tests/tokenizer.cmake):
//   TokenizerParity.TrainModel      libft trains <dir>/tokenizer.model
//   tokenizer_reference.py          Python sentencepiece and transformers encode real samples with it
//   TokenizerParity.MatchesPython   libft must produce the same ids, decodes and BOS/EOS framing
// Without LIBFT_TOKENIZER_PARITY_DIR (a plain run of the test binary) they skip.

namespace {

fs::path parity_dir() {
  const char* env = std::getenv("LIBFT_TOKENIZER_PARITY_DIR");
  return env && *env ? fs::path(env) : fs::path();
}

std::vector<int32_t> ids_of(const nlohmann::json& j) { return j.get<std::vector<int32_t>>(); }

}  // namespace

TEST(TokenizerParity, TrainModel) {
  const fs::path dir = parity_dir();
  if (dir.empty()) GTEST_SKIP() << "LIBFT_TOKENIZER_PARITY_DIR is not set (ctest sets it)";
  REQUIRE_FORTUNES();
  fs::create_directories(dir);
  const std::string model = Tokenizer::train(small_bpe(dir / "tokenizer"));
  EXPECT_EQ(model, (dir / "tokenizer.model").string());
  EXPECT_EQ(Tokenizer::load(model).vocab_size(), 2000);
}

TEST(TokenizerParity, MatchesPython) {
  const fs::path dir = parity_dir();
  if (dir.empty()) GTEST_SKIP() << "LIBFT_TOKENIZER_PARITY_DIR is not set (ctest sets it)";
  const fs::path ref_path = dir / "reference.json";
  ASSERT_TRUE(fs::exists(ref_path)) << ref_path << " is missing: the Python step did not run";
  const auto ref = nlohmann::json::parse(read_file(ref_path));
  const auto tok = Tokenizer::load((dir / "tokenizer.model").string());
  EXPECT_EQ(tok.vocab_size(), ref.at("vocab_size").get<int32_t>());

  const auto& samples = ref.at("samples");
  ASSERT_GE(samples.size(), 100u);
  std::vector<std::vector<int32_t>> ours;
  size_t mismatched = 0;
  for (const auto& s : samples) {
    const std::string text = s.at("text");
    ours.push_back(tok.encode(text));
    const auto want = ids_of(s.at("ids"));
    if (ours.back() != want && ++mismatched <= 10) {
      ADD_FAILURE() << s.at("source").get<std::string>() << ": ids differ from Python sentencepiece "
                    << ref.at("sentencepiece_version").get<std::string>() << "\n  text:   " << s.at("text").dump()
                    << "\n  libft:  " << testing::PrintToString(ours.back())
                    << "\n  python: " << testing::PrintToString(want);
    }
    EXPECT_EQ(tok.decode(ours.back()), s.at("decoded").get<std::string>()) << s.at("source").get<std::string>();
    EXPECT_EQ(tok.decode(want), text) << s.at("source").get<std::string>();
  }
  EXPECT_EQ(mismatched, 0u) << "of " << samples.size() << " samples";

  // transformers' LlamaTokenizer on checkpoint directories the script wrote: same special ids,
  // flags, framing and ids. One difference is known and pinned: for text starting with a space,
  // transformers' Metaspace pre-tokenizer adds no dummy-prefix "▁" of its own, so it encodes
  // " x" as sentencepiece (and libft) encode "x", and " " as a lone "▁". The script lists those
  // samples as "divergent".
  const auto& hf = ref.at("hf");
  ASSERT_FALSE(hf.empty());
  for (const auto& h : hf) {
    const std::string name = h.at("dir");
    const auto t = Tokenizer::load((dir / name).string());
    const auto& sp = t.special();
    EXPECT_EQ(sp.bos, h.at("bos_token_id").get<int32_t>()) << name;
    EXPECT_EQ(sp.eos, h.at("eos_token_id").get<int32_t>()) << name;
    EXPECT_EQ(sp.add_bos, h.at("add_bos_token").get<bool>()) << name;
    EXPECT_EQ(sp.add_eos, h.at("add_eos_token").get<bool>()) << name;
    EXPECT_EQ(t.fingerprint(), h.at("fingerprint").get<std::string>()) << name << ": " << ft::data::fingerprint_settings(sp);
    const auto& hf_ids = h.at("ids");
    const auto divergent = h.at("divergent").get<std::vector<size_t>>();
    ASSERT_EQ(hf_ids.size(), samples.size());
    for (size_t i = 0; i < samples.size(); ++i) {
      const auto want = ids_of(hf_ids[i]);
      std::vector<int32_t> framed;
      if (sp.add_bos) framed.push_back(sp.bos);
      const std::string text = samples[i].at("text");
      const bool divergent_one = std::find(divergent.begin(), divergent.end(), i) != divergent.end();
      std::vector<int32_t> body = ours[i];
      if (divergent_one) {
        ASSERT_EQ(text.substr(0, 1), " ") << name << ": transformers differs on " << samples[i].at("source");
        body = text.size() > 1 ? t.encode(text.substr(1)) : std::vector<int32_t>{t.piece_to_id("\xE2\x96\x81")};
      }
      framed.insert(framed.end(), body.begin(), body.end());
      if (sp.add_eos) framed.push_back(sp.eos);
      EXPECT_EQ(framed, want) << name << " " << samples[i].at("source").get<std::string>() << " "
                              << samples[i].at("text").dump();
    }
  }
}

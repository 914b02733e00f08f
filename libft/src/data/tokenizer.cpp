#include "ft/data/tokenizer.h"

#include <openssl/evp.h>
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iomanip>
#include <memory>
#include <optional>
#include <random>
#include <tuple>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "bpe.h"
#include "ft/util/error.h"
#include "ft/util/json.h"

namespace ft::data {

namespace fs = std::filesystem;

namespace {

// sentencepiece's default; lines longer than this are dropped by its trainer, so our sampler drops
// them too, or a sample of N sentences would silently train on fewer.
constexpr size_t kMaxSentenceBytes = 4192;

std::string read_binary_file(const std::string& path, const char* area) {
  std::ifstream in(path, std::ios::binary);
  FT_CHECK(in, "[", area, "] ", path, ": cannot open for reading");
  std::ostringstream os;
  os << in.rdbuf();
  FT_CHECK(!in.bad(), "[", area, "] ", path, ": read error");
  return os.str();
}

// SHA-256 from OpenSSL's libcrypto, which the HDF5 development package already pulls in (Debian's
// libhdf5-dev depends on libssl-dev and HDF5's link line names libcrypto), so a standard digest
// costs no new dependency, and anyone can recompute a fingerprint with hashlib or sha256sum.
std::string sha256_hex(std::initializer_list<std::string_view> parts) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  FT_CHECK(ctx && EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) == 1, "[tokenizer] SHA-256 is unavailable");
  for (auto part : parts) {
    FT_CHECK(EVP_DigestUpdate(ctx.get(), part.data(), part.size()) == 1, "[tokenizer] SHA-256 update failed");
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  FT_CHECK(EVP_DigestFinal_ex(ctx.get(), digest, &len) == 1, "[tokenizer] SHA-256 final failed");
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  for (unsigned int i = 0; i < len; ++i) {
    hex += kHex[digest[i] >> 4];
    hex += kHex[digest[i] & 15];
  }
  return hex;
}

// Hands the sampled lines to the trainer; implementing sentencepiece's iterator keeps the input
// file names out of the model's trainer_spec (see train()).
class VectorSentenceIterator : public sentencepiece::SentenceIterator {
 public:
  explicit VectorSentenceIterator(const std::vector<std::string>& lines) : lines_(lines) {}
  bool done() const override { return i_ >= lines_.size(); }
  void Next() override { ++i_; }
  const std::string& value() const override { return lines_[i_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  const std::vector<std::string>& lines_;
  size_t i_ = 0;
};

// Reads the training lines, reservoir-sampling `limit` of them (0 = all) with a generator seeded
// from `seed`. sentencepiece samples with a seed fixed inside the library (12345678 in 0.1.97 to
// 0.2.x) that no option reaches, so doing it here is what makes TrainTokenizerOptions::seed mean
// something, and keeps the sample the same whichever libsentencepiece is linked. The sample is put
// back in input order so that it does not depend on where in the reservoir a line landed.
std::vector<std::string> read_training_lines(const std::vector<std::string>& inputs, int64_t limit,
                                             uint64_t seed) {
  std::mt19937_64 rng(seed);  // its output sequence is fixed by the standard, unlike distributions'
  std::vector<std::pair<uint64_t, std::string>> kept;
  uint64_t seen = 0;
  for (const auto& file : inputs) {
    std::ifstream in(file, std::ios::binary);
    FT_CHECK(in, "[tokenizer] ", file, ": cannot open training input");
    std::string line;
    while (std::getline(in, line)) {
      // A CRLF file's line ends are not text to learn pieces for.
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty() || line.size() > kMaxSentenceBytes) continue;
      if (limit <= 0 || kept.size() < static_cast<size_t>(limit)) {
        kept.emplace_back(seen, std::move(line));
      } else {
        // Modulo bias is at most seen / 2^64: irrelevant here, and portable unlike
        // std::uniform_int_distribution, whose algorithm each standard library chooses.
        const uint64_t j = rng() % (seen + 1);
        if (j < kept.size()) kept[j] = {seen, std::move(line)};
      }
      ++seen;
      line.clear();
    }
    FT_CHECK(!in.bad(), "[tokenizer] ", file, ": read error");
  }
  std::sort(kept.begin(), kept.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<std::string> lines;
  lines.reserve(kept.size());
  for (auto& [_, text] : kept) lines.push_back(std::move(text));
  return lines;
}

void write_file_atomically(const std::string& path, std::string_view bytes) {
  // Unique per process: two trainings into one prefix must not interleave their bytes.
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    FT_CHECK(out, "[tokenizer] ", tmp, ": cannot open for writing");
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    FT_CHECK(out, "[tokenizer] ", tmp, ": write error");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  FT_CHECK(!ec, "[tokenizer] ", path, ": cannot rename from ", tmp, ": ", ec.message());
}

// A special token as Hugging Face writes it: a string, {"content": "..."} (an AddedToken), or
// null for "this tokenizer has none".
struct TokenName {
  std::optional<std::string> name;  // nullopt = declared as none
};

std::optional<TokenName> token_name(const nlohmann::json& config, const char* key, const std::string& file) {
  auto it = config.find(key);
  if (it == config.end()) return std::nullopt;
  if (it->is_null()) return TokenName{};
  if (it->is_string()) return TokenName{it->get<std::string>()};
  if (it->is_object()) {
    auto content = it->find("content");
    FT_CHECK(content != it->end() && content->is_string(), "[tokenizer] ", file, ": '", key,
             "' is an object without a string 'content'");
    return TokenName{content->get<std::string>()};
  }
  FT_FAIL("[tokenizer] ", file, ": '", key, "' must be a string, an object with 'content', or null, not ",
          it->type_name());
}

std::optional<bool> flag(const nlohmann::json& config, const char* key, const std::string& file) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return std::nullopt;
  FT_CHECK(it->is_boolean(), "[tokenizer] ", file, ": '", key, "' must be true or false, not ", it->dump());
  return it->get<bool>();
}

nlohmann::json load_config_object(const std::string& file) {
  nlohmann::json config = load_json_file(file);
  FT_CHECK(config.is_object(), "[tokenizer] ", file, ": expected a JSON object, got ", config.type_name());
  return config;
}

// Walks the top level of the protobuf wire format. Protobuf happily parses a file cut at a field
// boundary (a partial download, say) as a smaller, valid ModelProto; sentencepiece then loads it
// with fewer pieces and a default normaliser. Trainers write the normalizer_spec (field 3) after all
// pieces (field 1) and the trainer_spec (field 2), so requiring it catches every such cut.
void check_model_structure(std::string_view bytes, const std::string& path) {
  size_t pos = 0;
  auto varint = [&](const char* what) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      FT_CHECK(pos < bytes.size(), "[tokenizer] ", path, ": not a sentencepiece model (the file ends inside a ",
               what, "; truncated?)");
      const auto b = static_cast<unsigned char>(bytes[pos++]);
      v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return v;
    }
    FT_FAIL("[tokenizer] ", path, ": not a sentencepiece model (malformed varint at byte ", pos, ")");
  };
  int64_t pieces = 0;
  bool normalizer = false;
  while (pos < bytes.size()) {
    const size_t field_start = pos;
    const uint64_t tag = varint("field tag");
    const uint64_t field = tag >> 3;
    uint64_t skip = 0;
    switch (tag & 7) {
      case 0: varint("varint"); break;
      case 1: skip = 8; break;
      case 2: skip = varint("length"); break;
      case 5: skip = 4; break;
      default:
        FT_FAIL("[tokenizer] ", path, ": not a sentencepiece model (wire type ", tag & 7, " at byte ", field_start, ")");
    }
    FT_CHECK(field != 0 && skip <= bytes.size() - pos, "[tokenizer] ", path,
             ": not a sentencepiece model (field at byte ", field_start, " runs past the end; truncated?)");
    pos += skip;
    if (field == 1) ++pieces;
    if (field == 3) normalizer = true;
  }
  FT_CHECK(pieces > 0, "[tokenizer] ", path, ": not a sentencepiece model (no pieces)");
  FT_CHECK(normalizer, "[tokenizer] ", path,
           ": not a sentencepiece model, or truncated (no normalizer_spec after the ", pieces, " pieces)");
}

// tokenizer_config.json / special_tokens_map.json (lowest precedence first) over `special`: the
// tokens they name, looked up by `id_of` (-1: not in the vocabulary of `model_path`), and the
// add_bos_token / add_eos_token flags.
void read_special_tokens(const std::vector<std::string>& config_files, SpecialTokens& special,
                         const std::string& model_path, const std::function<int32_t(const std::string&)>& id_of) {
  const std::pair<const char*, int32_t*> slots[] = {{"bos_token", &special.bos}, {"eos_token", &special.eos},
                                                    {"pad_token", &special.pad}, {"unk_token", &special.unk}};
  for (const auto& file : config_files) {
    const nlohmann::json config = load_config_object(file);
    for (const auto& [key, slot] : slots) {
      auto token = token_name(config, key, file);
      if (!token) continue;
      if (!token->name) {
        *slot = -1;
        continue;
      }
      const int32_t id = id_of(*token->name);
      FT_CHECK(id >= 0, "[tokenizer] ", file, ": ", key, " '", *token->name, "' is not in the vocabulary of ", model_path);
      *slot = id;
    }
    if (auto v = flag(config, "add_bos_token", file)) special.add_bos = *v;
    if (auto v = flag(config, "add_eos_token", file)) special.add_eos = *v;
  }
  FT_CHECK(!special.add_bos || special.bos >= 0, "[tokenizer] ", model_path,
           ": add_bos_token is set but there is no BOS token");
  FT_CHECK(!special.add_eos || special.eos >= 0, "[tokenizer] ", model_path,
           ": add_eos_token is set but there is no EOS token");
}

// The chat template transformers would load from the directory `dir` (see Tokenizer::chat_template).
std::pair<std::string, std::string> read_chat_template(const std::string& dir) {
  const auto jinja = (fs::path(dir) / "chat_template.jinja").string();
  if (fs::exists(jinja)) return {read_binary_file(jinja, "tokenizer"), jinja};
  const auto config_file = (fs::path(dir) / "tokenizer_config.json").string();
  if (!fs::exists(config_file)) return {};
  const nlohmann::json config = load_config_object(config_file);
  auto it = config.find("chat_template");
  if (it == config.end() || it->is_null()) return {};
  if (it->is_string()) return {it->get<std::string>(), config_file};
  FT_CHECK(it->is_array(), "[tokenizer] ", config_file, ": 'chat_template' must be a string or a list of {name, template}, not ",
           it->type_name());
  std::string names;
  for (const auto& entry : *it) {
    FT_CHECK(entry.is_object() && entry.contains("name") && entry.contains("template") && entry["name"].is_string() &&
                 entry["template"].is_string(),
             "[tokenizer] ", config_file, ": each 'chat_template' entry must be {\"name\": ..., \"template\": ...}");
    if (entry["name"] == "default") return {entry["template"].get<std::string>(), config_file + " (chat_template 'default')"};
    names += (names.empty() ? "" : ", ") + entry["name"].get<std::string>();
  }
  FT_FAIL("[tokenizer] ", config_file, ": 'chat_template' lists templates (", names, ") but none named 'default'");
}

std::string status_text(const sentencepiece::util::Status& status) {
  std::string text = status.ToString();
  return text.empty() ? std::string("unknown sentencepiece error") : text;
}

}  // namespace

std::string fingerprint_settings(const SpecialTokens& s) {
  std::ostringstream os;
  os << "libft-tokenizer-v1 bos=" << s.bos << " eos=" << s.eos << " pad=" << s.pad << " unk=" << s.unk
     << " add_bos=" << int(s.add_bos) << " add_eos=" << int(s.add_eos);
  return os.str();
}

struct Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  std::unique_ptr<detail::JsonBpe> bpe;  // a tokenizer.json's BPE, in place of sp
  std::vector<bool> skip_on_decode;           // indexed by id
};

Tokenizer::Tokenizer() : impl_(std::make_unique<Impl>()) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& path) {
  std::error_code ec;
  const auto kind = fs::status(path, ec).type();
  FT_CHECK(kind != fs::file_type::not_found, "[tokenizer] ", path, ": no such file or directory");
  FT_CHECK(!ec, "[tokenizer] ", path, ": ", ec.message());

  std::string model_path = path;
  std::vector<std::string> config_files;  // in order of precedence, lowest first
  bool json_model = kind != fs::file_type::directory && fs::path(path).extension() == ".json";
  if (kind == fs::file_type::directory) {
    // sentencepiece's tokenizer.model where there is one (Llama 2, Mistral and TinyLlama ship both);
    // else the BPE of tokenizer.json (Llama 3, Qwen, GPT-2 and SmolLM ship only that, and so does
    // any sentencepiece tokenizer that transformers 5 saved).
    model_path = (fs::path(path) / "tokenizer.model").string();
    if (!fs::exists(model_path)) {
      model_path = (fs::path(path) / "tokenizer.json").string();
      json_model = true;
      FT_CHECK(fs::exists(model_path), "[tokenizer] ", path, ": neither tokenizer.model nor tokenizer.json in this directory");
    }
    // tokenizer_config.json is what current Hugging Face versions write and read first;
    // special_tokens_map.json only fills in what it leaves out.
    for (const char* name : {"special_tokens_map.json", "tokenizer_config.json"}) {
      const auto file = (fs::path(path) / name).string();
      if (fs::exists(file)) config_files.push_back(file);
    }
  }

  Tokenizer tok;
  tok.path_ = model_path;
  if (kind == fs::file_type::directory) std::tie(tok.chat_template_, tok.chat_template_file_) = read_chat_template(path);
  const std::string bytes = read_binary_file(model_path, "tokenizer");
  FT_CHECK(!bytes.empty(), "[tokenizer] ", model_path, ": empty file");
  if (json_model) {
    tok.load_byte_level_bpe(bytes, config_files);
    return tok;
  }
  check_model_structure(bytes, model_path);
  auto& sp = tok.impl_->sp;
  const auto status = sp.LoadFromSerializedProto(bytes);
  FT_CHECK(status.ok(), "[tokenizer] ", model_path, ": not a valid sentencepiece model (", status_text(status),
           ")");
  FT_CHECK(sp.GetPieceSize() > 0, "[tokenizer] ", model_path, ": the model has no pieces");

  SpecialTokens& special = tok.special_;
  special.bos = sp.bos_id();
  special.eos = sp.eos_id();
  special.pad = sp.pad_id();
  special.unk = sp.unk_id();

  read_special_tokens(config_files, special, model_path, [&](const std::string& name) {
    const int id = sp.PieceToId(name);
    // PieceToId answers unk for any absent piece, so only the unk piece itself may map there.
    return id != sp.unk_id() || name == sp.IdToPiece(sp.unk_id()) ? id : -1;
  });

  // Matches Hugging Face's decode(skip_special_tokens=True): the declared special tokens go, and so
  // do sentencepiece control pieces, which would otherwise decode to nothing anyway.
  const int n = sp.GetPieceSize();
  auto& skip = tok.impl_->skip_on_decode;
  skip.assign(static_cast<size_t>(n), false);
  for (int id = 0; id < n; ++id) skip[id] = sp.IsControl(id);
  for (int32_t id : {special.bos, special.eos, special.pad, special.unk}) {
    if (id >= 0 && id < n) skip[id] = true;
  }

  // Token stores compare fingerprints, and the same model with other BOS/EOS settings produces other
  // token streams, so the settings are hashed with the bytes. The layout is documented in
  // fingerprint_settings() so that tools outside libft can recompute it.
  tok.fingerprint_ = sha256_hex({bytes, "\n", fingerprint_settings(special)});
  return tok;
}

void Tokenizer::load_byte_level_bpe(const std::string& bytes, const std::vector<std::string>& config_files) {
  impl_->bpe = std::make_unique<detail::JsonBpe>(bytes, path_);
  const detail::JsonBpe& bpe = *impl_->bpe;
  // The framing the post-processor's template applies (Llama 3: <|begin_of_text|> first; Qwen and
  // GPT-2: none), which tokenizer_config.json's tokens and flags may then name or override.
  const auto& prefix = bpe.template_prefix();
  const auto& suffix = bpe.template_suffix();
  FT_CHECK(prefix.size() <= 1 && suffix.size() <= 1, "[tokenizer] ", path_,
           ": the post-processor puts several tokens around a sequence; libft frames documents with one BOS and "
           "one EOS");
  SpecialTokens& special = special_;
  special = SpecialTokens{};
  special.bos = prefix.empty() ? -1 : prefix[0];
  special.eos = suffix.empty() ? -1 : suffix[0];
  special.unk = bpe.unk_id();
  special.add_bos = !prefix.empty();
  special.add_eos = !suffix.empty();
  read_special_tokens(config_files, special, path_, [&](const std::string& name) { return bpe.token_to_id(name); });
  FT_CHECK(prefix.empty() || !special.add_bos || special.bos == prefix[0], "[tokenizer] ", path_,
           ": the post-processor starts a sequence with '", bpe.id_to_token(prefix[0]), "' but bos_token is '",
           bpe.id_to_token(special.bos), "'");
  FT_CHECK(suffix.empty() || !special.add_eos || special.eos == suffix[0], "[tokenizer] ", path_,
           ": the post-processor ends a sequence with '", bpe.id_to_token(suffix[0]), "' but eos_token is '",
           bpe.id_to_token(special.eos), "'");
  // Hugging Face's decode(skip_special_tokens=True): the added tokens marked special go, and so do
  // the declared ones; other added tokens (Qwen3's <think>) stay.
  auto& skip = impl_->skip_on_decode;
  skip.assign(static_cast<size_t>(bpe.vocab_size()), false);
  for (const auto& t : bpe.added_tokens()) skip[t.id] = t.special;
  for (int32_t id : {special.bos, special.eos, special.pad, special.unk}) {
    if (id >= 0 && id < bpe.vocab_size()) skip[id] = true;
  }
  fingerprint_ = sha256_hex({bytes, "\n", fingerprint_settings(special)});
}

bool Tokenizer::byte_level_bpe() const { return impl_->bpe != nullptr && impl_->bpe->byte_level(); }
bool Tokenizer::from_tokenizer_json() const { return impl_->bpe != nullptr; }

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  if (impl_->bpe) return impl_->bpe->encode(text);
  std::vector<int> ids;
  const auto status = impl_->sp.Encode(text, &ids);
  FT_CHECK(status.ok(), "[tokenizer] ", path_, ": encode failed (", status_text(status), ")");
  return std::vector<int32_t>(ids.begin(), ids.end());
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  const auto& skip = impl_->skip_on_decode;
  if (impl_->bpe) return impl_->bpe->decode(ids, skip);
  std::vector<int> kept;
  kept.reserve(ids.size());
  for (int32_t id : ids) {
    FT_CHECK(id >= 0 && static_cast<size_t>(id) < skip.size(), "[tokenizer] ", path_, ": id ", id,
             " is outside the vocabulary [0, ", skip.size(), ")");
    if (!skip[id]) kept.push_back(id);
  }
  std::string text;
  const auto status = impl_->sp.Decode(kept, &text);
  FT_CHECK(status.ok(), "[tokenizer] ", path_, ": decode failed (", status_text(status), ")");
  return text;
}

std::vector<TextSpan> Tokenizer::decode_spans(std::span<const int32_t> ids, std::span<const uint8_t> trainable) const {
  FT_CHECK(ids.size() == trainable.size(), "[tokenizer] decode_spans: ", ids.size(), " ids but ", trainable.size(),
           " trainable flags");
  const auto& skip = impl_->skip_on_decode;
  auto special = [&](int32_t id) { return id >= 0 && static_cast<size_t>(id) < skip.size() && skip[id]; };
  std::vector<TextSpan> out;
  std::string before;  // decode(ids[0, i))
  for (size_t i = 0; i < ids.size();) {
    if (special(ids[i])) {
      out.push_back({id_to_piece(ids[i]), trainable[i] != 0, true});
      ++i;
      continue;
    }
    size_t j = i;
    while (j < ids.size() && !special(ids[j]) && (trainable[j] != 0) == (trainable[i] != 0)) ++j;
    std::string upto = decode(ids.first(j));
    std::string text = upto.starts_with(before) ? upto.substr(before.size()) : decode(ids.subspan(i, j - i));
    out.push_back({std::move(text), trainable[i] != 0, false});
    before = std::move(upto);
    i = j;
  }
  return out;
}

std::vector<std::string> Tokenizer::special_pieces() const {
  std::vector<std::string> out;
  if (impl_->bpe) {
    for (const auto& t : impl_->bpe->added_tokens()) out.push_back(impl_->bpe->id_to_token(t.id));
    return out;
  }
  const auto& sp = impl_->sp;
  for (int id = 0; id < sp.GetPieceSize(); ++id) {
    if (sp.IsControl(id) || sp.IsUnknown(id)) out.push_back(sp.IdToPiece(id));
  }
  return out;
}

int32_t Tokenizer::vocab_size() const { return impl_->bpe ? impl_->bpe->vocab_size() : impl_->sp.GetPieceSize(); }

int32_t Tokenizer::piece_to_id(std::string_view piece) const {
  if (impl_->bpe) {
    const int32_t id = impl_->bpe->token_to_id(piece);
    return id >= 0 ? id : special_.unk;
  }
  return impl_->sp.PieceToId(piece);
}

std::string Tokenizer::id_to_piece(int32_t id) const {
  if (impl_->bpe) return impl_->bpe->id_to_token(id);
  FT_CHECK(id >= 0 && id < vocab_size(), "[tokenizer] ", path_, ": id ", id, " is outside the vocabulary [0, ",
           vocab_size(), ")");
  return impl_->sp.IdToPiece(id);
}

std::string Tokenizer::train(const TrainTokenizerOptions& o) {
  FT_CHECK(!o.inputs.empty(), "[tokenizer] train: no input files");
  FT_CHECK(!o.model_prefix.empty(), "[tokenizer] train: model_prefix is empty");
  FT_CHECK(o.vocab_size > 0, "[tokenizer] train: vocab_size must be positive, got ", o.vocab_size);
  FT_CHECK(o.model_type == "bpe" || o.model_type == "unigram", "[tokenizer] train: model_type must be bpe or unigram, not '",
           o.model_type, "'");
  FT_CHECK(o.character_coverage > 0.0 && o.character_coverage <= 1.0,
           "[tokenizer] train: character_coverage must be in (0, 1], got ", o.character_coverage);
  FT_CHECK(o.input_sentence_size >= 0, "[tokenizer] train: input_sentence_size must be >= 0");
  FT_CHECK(o.num_threads >= 1 && o.num_threads <= 128, "[tokenizer] train: num_threads must be in [1, 128]");
  for (const auto& file : o.inputs) {
    FT_CHECK(fs::is_regular_file(file), "[tokenizer] ", file, ": training input does not exist or is not a file");
  }

  const std::vector<std::string> lines = read_training_lines(o.inputs, o.input_sentence_size, o.seed);
  FT_CHECK(!lines.empty(), "[tokenizer] train: the inputs hold no non-empty lines");

  // Llama's tokenizer.model settings: no normalisation and no whitespace folding, so that text
  // round-trips byte for byte and Hugging Face's converted tokenizers (which ignore the
  // sentencepiece normaliser) agree with sentencepiece.
  auto num = [](auto v) {
    std::ostringstream os;
    os << std::setprecision(17) << v;
    return os.str();
  };
  const std::unordered_map<std::string, std::string> args = {
      {"model_type", o.model_type},
      {"vocab_size", num(o.vocab_size)},
      {"character_coverage", num(o.character_coverage)},
      {"byte_fallback", o.byte_fallback ? "true" : "false"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "true"},
      {"split_digits", "true"},
      {"allow_whitespace_only_pieces", "true"},
      {"max_sentence_length", num(kMaxSentenceBytes)},
      // Sampling is done above; the trainer gets exactly the sample.
      {"input_sentence_size", "0"},
      {"shuffle_input_sentence", "false"},
      // A non-zero self-test sample is drawn from a generator seeded by std::random_device.
      {"self_test_sample_size", "0"},
      // The thread count is stored in the model and, for unigram, sets how the EM statistics are
      // summed, so it is an option with a fixed default rather than the machine's core count.
      {"num_threads", num(o.num_threads)},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      // Process-wide in sentencepiece; set on every call so that one verbose run does not leave
      // the next quiet one noisy, or the other way round.
      {"minloglevel", o.verbose ? "0" : "1"},
  };

  // With an output string instead of model_prefix, sentencepiece leaves the prefix (and, with the
  // iterator, the input names) out of the model's trainer_spec: the same text trains the same
  // bytes wherever the files live.
  VectorSentenceIterator it(lines);
  std::string serialized;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &it, &serialized);
  if (!status.ok()) {
    // Too few pieces for the text's characters: sentencepiece's message advises its own
    // --character_coverage flag; say it in terms of this API's options instead.
    const std::string text = status_text(status);
    int need = 0, have = 0;
    const size_t at = text.find("smaller than required_chars. ");
    if (at != std::string::npos &&
        std::sscanf(text.c_str() + at + std::strlen("smaller than required_chars. "), "%d vs %d", &have, &need) == 2) {
      FT_FAIL("[tokenizer] train ", o.model_prefix, ": a vocabulary of ", o.vocab_size, " pieces is smaller than the ",
              need, " characters the text needs (character coverage ", o.character_coverage,
              "): raise the vocabulary size above ", need, " (ft train-tokenizer --vocab-size)");
    }
    FT_FAIL("[tokenizer] train ", o.model_prefix, ": ", text);
  }
  FT_CHECK(!serialized.empty(), "[tokenizer] train ", o.model_prefix, ": sentencepiece returned an empty model");

  // Load what we are about to write: a model that does not load is a bug to report here.
  sentencepiece::SentencePieceProcessor sp;
  const auto load_status = sp.LoadFromSerializedProto(serialized);
  FT_CHECK(load_status.ok(), "[tokenizer] train ", o.model_prefix, ": the trained model does not load (",
           status_text(load_status), ")");

  const fs::path model_path = o.model_prefix + ".model";
  if (model_path.has_parent_path()) {
    std::error_code ec;
    fs::create_directories(model_path.parent_path(), ec);
    FT_CHECK(!ec, "[tokenizer] ", model_path.parent_path().string(), ": cannot create directory: ", ec.message());
  }
  // The .vocab file is for people (piece<TAB>score, as spm_train writes it); nothing reads it back.
  std::ostringstream vocab;
  for (int id = 0; id < sp.GetPieceSize(); ++id) vocab << sp.IdToPiece(id) << '\t' << sp.GetScore(id) << '\n';
  write_file_atomically(o.model_prefix + ".vocab", vocab.str());
  write_file_atomically(model_path.string(), serialized);
  return model_path.string();
}

}  // namespace ft::data

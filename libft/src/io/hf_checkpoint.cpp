#include "ft/io/hf_checkpoint.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <set>
#include <sstream>

#include "ft/io/safetensors.h"
#include "ft/io/tensor_io.h"
#include "ft/util/error.h"
#include "ft/util/json.h"

namespace fs = std::filesystem;

namespace ft::io {
namespace {

std::string dtype_config_name(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "float32";
    case c10::kBFloat16: return "bfloat16";
    case c10::kHalf: return "float16";
    default: FT_FAIL("[checkpoint] cannot save model parameters as ", c10::toString(t));
  }
}

// Older checkpoints carry the rotary inverse frequencies as buffers; they are derived from the
// config, so they may be present but are not loaded.
bool is_derived_buffer(const std::string& name) { return name.ends_with("rotary_emb.inv_freq"); }

// An image-text checkpoint's names for the language model's tensors (ModelConfig::
// image_text_architecture): Gemma3ForConditionalGeneration saves "language_model.model.*" and
// "language_model.lm_head.weight" (as the Hub's checkpoints have them, and transformers 5 still
// writes); transformers 5's modules are "model.language_model.*" and "lm_head.weight".
std::vector<std::string> image_text_names(const std::string& name) {
  if (name.starts_with("model.")) {
    const std::string rest = name.substr(6);
    return {"language_model.model." + rest, "model.language_model." + rest};
  }
  return {"language_model." + name, name};
}

// The image-text checkpoint's other parts (vision tower, projector), which libft does not load.
bool is_image_part(const std::string& name) {
  for (const char* prefix : {"vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                             "model.multi_modal_projector."}) {
    if (name.starts_with(prefix)) return true;
  }
  return false;
}

}  // namespace

void load_weights(model::CausalLM& m, const std::string& dir) {
  const std::string where = dir;
  auto ckpt = SafetensorsCheckpoint::open(dir);
  at::NoGradGuard no_grad;
  std::vector<std::string> missing, mismatched, unexpected;
  std::set<std::string> wanted;
  const bool image_text = !m->config().image_text_architecture.empty();
  for (auto& item : m->named_parameters()) {
    const std::string& name = item.key();
    auto found = ckpt.tensors().end();
    for (const std::string& stored : image_text ? image_text_names(name) : std::vector<std::string>{name}) {
      wanted.insert(stored);
      if (found == ckpt.tensors().end()) found = ckpt.tensors().find(stored);
    }
    if (found == ckpt.tensors().end()) {
      missing.push_back(name);
      continue;
    }
    const TensorInfo& info = *found->second.info;
    at::Tensor& p = item.value();
    if (info.shape != p.sizes().vec()) {
      std::ostringstream os;
      os << name << " (checkpoint " << c10::IntArrayRef(info.shape) << ", model " << p.sizes() << ")";
      mismatched.push_back(os.str());
      continue;
    }
    FT_CHECK(info.dtype == DType::F32 || info.dtype == DType::BF16 || info.dtype == DType::F16 ||
                 info.dtype == DType::F64,
             "[checkpoint] ", found->second.file->path(), ": tensor '", name, "' has dtype ", dtype_name(info.dtype),
             ", expected a floating-point type");
    p.copy_(read_tensor(*found->second.file, info));
  }
  for (const auto& [name, entry] : ckpt.tensors()) {
    if (!wanted.count(name) && !is_derived_buffer(name) && !(image_text && is_image_part(name))) {
      unexpected.push_back(name);
    }
  }
  if (missing.empty() && mismatched.empty() && unexpected.empty()) return;
  std::ostringstream os;
  os << "[checkpoint] " << where << " does not match the model:";
  auto list = [&](const char* what, const std::vector<std::string>& names) {
    if (names.empty()) return;
    os << "\n  " << what << " (" << names.size() << "):";
    for (size_t i = 0; i < names.size() && i < 20; ++i) os << "\n    " << names[i];
    if (names.size() > 20) os << "\n    ... and " << names.size() - 20 << " more";
  };
  list("missing tensors", missing);
  list("shape mismatches", mismatched);
  list("unexpected tensors", unexpected);
  FT_FAIL(os.str());
}

model::CausalLM load_pretrained(const std::string& dir, const LoadOptions& options) {
  FT_CHECK(fs::is_directory(dir), "[checkpoint] '", dir, "' is not a directory");
  const fs::path config_path = fs::path(dir) / "config.json";
  FT_CHECK(fs::exists(config_path), "[checkpoint] ", dir, ": no config.json");
  const bool has_safetensors =
      fs::exists(fs::path(dir) / "model.safetensors") || fs::exists(fs::path(dir) / "model.safetensors.index.json");
  if (!has_safetensors) {
    const bool pickle = fs::exists(fs::path(dir) / "pytorch_model.bin") ||
                        fs::exists(fs::path(dir) / "pytorch_model.bin.index.json");
    FT_FAIL("[checkpoint] ", dir, ": no model.safetensors or model.safetensors.index.json",
            pickle ? " (pickle-based pytorch_model.bin weights are never loaded: convert them to safetensors)" : "");
  }
  model::CausalLM m(load_model_config(config_path.string()));
  load_weights(m, dir);
  m->to(options.device, options.dtype);
  return m;
}

void save_pretrained(model::CausalLM& m, const std::string& dir, const SaveOptions& options) {
  FT_CHECK(!m->prefix_encoder, "[checkpoint] the model has a prefix (prefix tuning), which a Hugging Face checkpoint "
           "cannot hold; save it as a PEFT adapter (adapt/prefix.h) and the base on its own");
  fs::create_directories(dir);
  std::vector<at::Tensor> keep_alive;
  std::vector<TensorWrite> writes;
  c10::ScalarType saved_dtype = c10::kFloat;
  for (const auto& item : m->named_parameters()) {
    at::Tensor t = item.value().detach();
    if (options.dtype) t = t.to(*options.dtype);
    saved_dtype = t.scalar_type();
    t = t.to(c10::kCPU).contiguous();
    keep_alive.push_back(t);
    writes.push_back(tensor_write(item.key(), t));
  }
  ModelConfig config = m->config();
  config.torch_dtype = dtype_config_name(saved_dtype);
  write_safetensors_checkpoint(dir, writes, options.max_shard_bytes);
  const std::string json = model_config_to_json(config);
  write_file_atomic((fs::path(dir) / "config.json").string(),
                    std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(json.data()), json.size()));
  std::error_code ec;
  if (options.copy_files_from.empty() || !fs::is_directory(options.copy_files_from, ec)) return;
  if (fs::equivalent(options.copy_files_from, dir, ec)) return;
  for (const char* name : {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "added_tokens.json", "chat_template.jinja", "generation_config.json"}) {
    const fs::path from = fs::path(options.copy_files_from) / name;
    if (!fs::is_regular_file(from, ec)) continue;
    const std::string bytes = read_text_file(from.string());
    write_file_atomic((fs::path(dir) / name).string(),
                      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()));
  }
}

}  // namespace ft::io

#include "ft/io/hf_checkpoint.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <map>
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

// gpt-oss's checkpoints keep each layer's experts as fused 3-D tensors, as GptOssExperts holds
// them: gate_up_proj (E, hidden, 2I) multiplied from the left (x · W), its columns gate and up
// interleaved (gate 2j, up 2j + 1), gate_up_proj_bias (E, 2I), down_proj (E, I, hidden) and
// down_proj_bias (E, hidden); OpenAI's releases store the two weights as MXFP4 (_blocks and
// _scales, each weight row (E, out, in/32 blocks) of 32 four-bit values and one exponent).
// libft's experts are linear layers of their own (model.layers.N.mlp.experts.e.gate_proj ...).
std::string gpt_oss_experts(int64_t layer) { return "model.layers." + std::to_string(layer) + ".mlp.experts."; }
std::string gpt_oss_expert(int64_t layer, int64_t e, const char* proj, const char* what) {
  return gpt_oss_experts(layer) + std::to_string(e) + "." + proj + "_proj." + what;
}

struct Problems {
  std::vector<std::string> missing, mismatched;
};

// A floating-point checkpoint tensor of shape `want`, or undefined (and reported) where its shape
// differs; another dtype is an error naming the file.
at::Tensor read_float(const SafetensorsCheckpoint::Entry& entry, const std::string& name,
                      const std::vector<int64_t>& want, std::vector<std::string>& mismatched) {
  const TensorInfo& info = *entry.info;
  if (info.shape != want) {
    std::ostringstream os;
    os << name << " (checkpoint " << c10::IntArrayRef(info.shape) << ", model " << c10::IntArrayRef(want) << ")";
    mismatched.push_back(os.str());
    return {};
  }
  FT_CHECK(info.dtype == DType::F32 || info.dtype == DType::BF16 || info.dtype == DType::F16 || info.dtype == DType::F64,
           "[checkpoint] ", entry.file->path(), ": tensor '", name, "' has dtype ", dtype_name(info.dtype),
           ", expected a floating-point type");
  return read_tensor(*entry.file, info);
}

// A fused weight in Linear's layout, (E, out, in) float32: the bf16/float tensor `name` (stored
// (E, in, out)) or its MXFP4 blocks and scales; undefined (and reported) where absent or mis-shaped.
at::Tensor read_fused_weight(const SafetensorsCheckpoint& ckpt, const std::string& name, int64_t E, int64_t out,
                             int64_t in, std::set<std::string>& wanted, Problems& problems) {
  const auto& t = ckpt.tensors();
  wanted.insert(name);
  wanted.insert(name + "_blocks");
  wanted.insert(name + "_scales");
  if (auto it = t.find(name); it != t.end()) {
    const at::Tensor w = read_float(it->second, name, {E, in, out}, problems.mismatched);
    return w.defined() ? w.to(at::kFloat).transpose(1, 2) : w;
  }
  const auto blocks = t.find(name + "_blocks"), scales = t.find(name + "_scales");
  if (blocks == t.end() || scales == t.end()) {
    problems.missing.push_back(name + " (or its MXFP4 " + name + "_blocks and " + name + "_scales)");
    return {};
  }
  const TensorInfo &bi = *blocks->second.info, &si = *scales->second.info;
  const std::vector<int64_t> want_blocks{E, out, in / 32, 16}, want_scales{E, out, in / 32};
  if (in % 32 != 0 || bi.shape != want_blocks || si.shape != want_scales || bi.dtype != DType::U8 ||
      si.dtype != DType::U8) {
    std::ostringstream os;
    os << name << "_blocks and _scales (checkpoint " << dtype_name(bi.dtype) << " " << c10::IntArrayRef(bi.shape)
       << " and " << dtype_name(si.dtype) << " " << c10::IntArrayRef(si.shape) << ", model U8 "
       << c10::IntArrayRef(want_blocks) << " and U8 " << c10::IntArrayRef(want_scales) << ")";
    problems.mismatched.push_back(os.str());
    return {};
  }
  return mxfp4_dequantize(read_tensor(*blocks->second.file, bi), read_tensor(*scales->second.file, si));
}

// A fused bias (E, out) float32, or undefined (and reported).
at::Tensor read_fused_bias(const SafetensorsCheckpoint& ckpt, const std::string& name, int64_t E, int64_t out,
                           std::set<std::string>& wanted, Problems& problems) {
  wanted.insert(name);
  const auto it = ckpt.tensors().find(name);
  if (it == ckpt.tensors().end()) {
    problems.missing.push_back(name);
    return {};
  }
  const at::Tensor b = read_float(it->second, name, {E, out}, problems.mismatched);
  return b.defined() ? b.to(at::kFloat) : b;
}

// Loads gpt-oss's fused experts into the per-expert parameters of `params`, which it returns the
// names of (the caller loads the others one to one).
std::set<std::string> load_gpt_oss_experts(const model::ModelConfig& c,
                                           const std::map<std::string, at::Tensor>& params,
                                           const SafetensorsCheckpoint& ckpt, std::set<std::string>& wanted,
                                           Problems& problems) {
  std::set<std::string> done;
  const int64_t E = c.num_experts, I = c.moe_intermediate_size, H = c.hidden_size;
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    if (!c.moe_in_layer(layer)) continue;
    const std::string prefix = gpt_oss_experts(layer);
    const at::Tensor gate_up = read_fused_weight(ckpt, prefix + "gate_up_proj", E, 2 * I, H, wanted, problems);
    const at::Tensor gate_up_bias = read_fused_bias(ckpt, prefix + "gate_up_proj_bias", E, 2 * I, wanted, problems);
    const at::Tensor down = read_fused_weight(ckpt, prefix + "down_proj", E, H, I, wanted, problems);
    const at::Tensor down_bias = read_fused_bias(ckpt, prefix + "down_proj_bias", E, H, wanted, problems);
    for (int64_t e = 0; e < E; ++e) {
      // (rows 2j of gate_up are gate's, 2j + 1 up's)
      const std::pair<std::string, at::Tensor> parts[] = {
          {gpt_oss_expert(layer, e, "gate", "weight"), gate_up.defined() ? gate_up[e].slice(0, 0, 2 * I, 2) : at::Tensor()},
          {gpt_oss_expert(layer, e, "up", "weight"), gate_up.defined() ? gate_up[e].slice(0, 1, 2 * I, 2) : at::Tensor()},
          {gpt_oss_expert(layer, e, "gate", "bias"), gate_up_bias.defined() ? gate_up_bias[e].slice(0, 0, 2 * I, 2) : at::Tensor()},
          {gpt_oss_expert(layer, e, "up", "bias"), gate_up_bias.defined() ? gate_up_bias[e].slice(0, 1, 2 * I, 2) : at::Tensor()},
          {gpt_oss_expert(layer, e, "down", "weight"), down.defined() ? down[e] : at::Tensor()},
          {gpt_oss_expert(layer, e, "down", "bias"), down_bias.defined() ? down_bias[e] : at::Tensor()}};
      for (const auto& [name, value] : parts) {
        const auto it = params.find(name);
        FT_CHECK(it != params.end(), "[checkpoint] internal: the model has no parameter ", name);
        done.insert(name);
        if (value.defined()) it->second.copy_(value);
      }
    }
  }
  return done;
}

// save_pretrained's side: the layer's per-expert parameters fused as gpt-oss's checkpoints hold
// them (bf16 or float; never MXFP4).
void fuse_gpt_oss_experts(const model::ModelConfig& c, const std::map<std::string, at::Tensor>& params,
                          std::vector<std::pair<std::string, at::Tensor>>& out, std::set<std::string>& done) {
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    if (!c.moe_in_layer(layer)) continue;
    std::vector<at::Tensor> gate_up, gate_up_bias, down, down_bias;
    auto get = [&](int64_t e, const char* proj, const char* what) {
      const std::string name = gpt_oss_expert(layer, e, proj, what);
      const auto it = params.find(name);
      FT_CHECK(it != params.end() && it->second.defined() && it->second.numel() > 0, "[checkpoint] ", name,
               " is not a dense parameter (a quantized base is saved through ft merge, which dequantizes it)");
      done.insert(name);
      return it->second;
    };
    for (int64_t e = 0; e < c.num_experts; ++e) {
      // (I, H) each → (2I, H) with gate's rows at 2j and up's at 2j + 1, then (H, 2I)
      gate_up.push_back(at::stack({get(e, "gate", "weight"), get(e, "up", "weight")}, 1).flatten(0, 1).t());
      gate_up_bias.push_back(at::stack({get(e, "gate", "bias"), get(e, "up", "bias")}, 1).flatten());
      down.push_back(get(e, "down", "weight").t());
      down_bias.push_back(get(e, "down", "bias"));
    }
    const std::string prefix = gpt_oss_experts(layer);
    out.emplace_back(prefix + "gate_up_proj", at::stack(gate_up));
    out.emplace_back(prefix + "gate_up_proj_bias", at::stack(gate_up_bias));
    out.emplace_back(prefix + "down_proj", at::stack(down));
    out.emplace_back(prefix + "down_proj_bias", at::stack(down_bias));
  }
}

}  // namespace

at::Tensor mxfp4_dequantize(const at::Tensor& blocks, const at::Tensor& scales) {
  FT_CHECK(blocks.scalar_type() == at::kByte && scales.scalar_type() == at::kByte && blocks.dim() >= 2 &&
               blocks.size(-1) == 16 && scales.sizes() == blocks.sizes().slice(0, blocks.dim() - 1),
           "[checkpoint] MXFP4: blocks (…, G, 16) and scales (…, G) of uint8 expected, got ", blocks.scalar_type(), " ",
           blocks.sizes(), " and ", scales.scalar_type(), " ", scales.sizes());
  // FP4 (E2M1): sign, two exponent bits, one mantissa bit; the low nibble is the even element.
  static const float kValues[16] = {+0.0f, +0.5f, +1.0f, +1.5f, +2.0f, +3.0f, +4.0f, +6.0f,
                                    -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  const at::Tensor lut = at::from_blob(const_cast<float*>(kValues), {16}, at::kFloat).to(blocks.device());
  // Row blocks of at most 2^22 bytes at a time, written into the result, so that the index and
  // product temporaries stay small (a gpt-oss-20b layer's gate_up_proj is 265 MB of blocks).
  std::vector<int64_t> out_shape = blocks.sizes().vec();
  out_shape.pop_back();
  out_shape.back() *= 32;
  at::Tensor out = at::empty(out_shape, blocks.options().dtype(at::kFloat));
  const at::Tensor b_rows = blocks.reshape({-1, 16}), s_rows = scales.reshape({-1});
  at::Tensor out_rows = out.view({-1, 32});
  const int64_t n = b_rows.size(0), chunk = int64_t{1} << 18;
  for (int64_t i = 0; i < n; i += chunk) {
    const int64_t len = std::min(chunk, n - i);
    const at::Tensor b = b_rows.narrow(0, i, len).to(at::kInt);
    const at::Tensor lo = lut.index_select(0, b.bitwise_and(15).flatten()).view({len, 16});
    const at::Tensor hi = lut.index_select(0, b.bitwise_right_shift(4).flatten()).view({len, 16});
    // (the low nibble the even element) times each block's E8M0 scale, 2^(s − 127), as
    // transformers' ldexp applies it
    out_rows.narrow(0, i, len)
        .copy_(at::ldexp(at::stack({lo, hi}, -1).view({len, 32}), (s_rows.narrow(0, i, len).to(at::kInt) - 127).unsqueeze(-1)));
  }
  return out;
}

void load_weights(model::CausalLM& m, const std::string& dir) {
  const std::string where = dir;
  auto ckpt = SafetensorsCheckpoint::open(dir);
  at::NoGradGuard no_grad;
  Problems problems;
  std::vector<std::string> unexpected;
  std::set<std::string> wanted;
  const bool image_text = !m->config().image_text_architecture.empty();
  std::set<std::string> fused;  // parameters loaded from fused tensors (gpt-oss's experts)
  if (m->config().gpt_oss()) {
    std::map<std::string, at::Tensor> params;
    for (auto& item : m->named_parameters()) params.emplace(item.key(), item.value());
    fused = load_gpt_oss_experts(m->config(), params, ckpt, wanted, problems);
  }
  for (auto& item : m->named_parameters()) {
    const std::string& name = item.key();
    if (fused.count(name)) continue;
    auto found = ckpt.tensors().end();
    for (const std::string& stored : image_text ? image_text_names(name) : std::vector<std::string>{name}) {
      wanted.insert(stored);
      if (found == ckpt.tensors().end()) found = ckpt.tensors().find(stored);
    }
    if (found == ckpt.tensors().end()) {
      problems.missing.push_back(name);
      continue;
    }
    at::Tensor& p = item.value();
    const at::Tensor t = read_float(found->second, name, p.sizes().vec(), problems.mismatched);
    if (t.defined()) p.copy_(t);
  }
  for (const auto& [name, entry] : ckpt.tensors()) {
    if (!wanted.count(name) && !is_derived_buffer(name) && !(image_text && is_image_part(name))) {
      unexpected.push_back(name);
    }
  }
  if (problems.missing.empty() && problems.mismatched.empty() && unexpected.empty()) return;
  std::ostringstream os;
  os << "[checkpoint] " << where << " does not match the model:";
  auto list = [&](const char* what, const std::vector<std::string>& names) {
    if (names.empty()) return;
    os << "\n  " << what << " (" << names.size() << "):";
    for (size_t i = 0; i < names.size() && i < 20; ++i) os << "\n    " << names[i];
    if (names.size() > 20) os << "\n    ... and " << names.size() - 20 << " more";
  };
  list("missing tensors", problems.missing);
  list("shape mismatches", problems.mismatched);
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
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::set<std::string> fused;
  if (m->config().gpt_oss()) {
    std::map<std::string, at::Tensor> params;
    for (const auto& item : m->named_parameters()) params.emplace(item.key(), item.value().detach());
    fuse_gpt_oss_experts(m->config(), params, tensors, fused);
  }
  for (const auto& item : m->named_parameters()) {
    if (!fused.count(item.key())) tensors.emplace_back(item.key(), item.value().detach());
  }
  for (const auto& [name, value] : tensors) {
    at::Tensor t = value;
    if (options.dtype) t = t.to(*options.dtype);
    saved_dtype = t.scalar_type();
    t = t.to(c10::kCPU).contiguous();
    keep_alive.push_back(t);
    writes.push_back(tensor_write(name, t));
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

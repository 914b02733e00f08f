#include "ft/adapt/prefix.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/modules/linear.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "ft/io/safetensors.h"
#include "ft/io/tensor_io.h"
#include "ft/util/error.h"
#include "ft/util/json.h"

namespace fs = std::filesystem;

namespace ft::adapt {

namespace {

constexpr const char* kTensor = "prompt_embeddings";

nlohmann::ordered_json read_config(const std::string& path, const char* tag) {
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(read_text_file(path));
  } catch (const nlohmann::json::exception& e) {
    FT_FAIL("[", tag, "] ", path, ": not valid JSON: ", e.what());
  }
  FT_CHECK(j.is_object(), "[", tag, "] ", path, ": not a JSON object");
  return j;
}

int64_t token_dim(const model::ModelConfig& c) { return c.num_key_value_heads * c.head_dim; }

// What the config says about the model it was made for, checked against `c`.
std::vector<std::string> shape_problems(const nlohmann::ordered_json& j, const model::ModelConfig& c,
                                        const std::string& path) {
  std::vector<std::string> problems;
  auto expect = [&](const char* key, int64_t want, const char* what) {
    if (!j.contains(key) || !j[key].is_number_integer()) {
      problems.push_back(path + ": '" + key + "' is missing or not an integer");
    } else if (j[key].get<int64_t>() != want) {
      problems.push_back(detail::concat(path, ": ", key, " = ", j[key].get<int64_t>(), ", but the model has ", want, " (",
                                        what, ")"));
    }
  };
  expect("num_layers", c.num_hidden_layers, "num_hidden_layers");
  expect("token_dim", token_dim(c), "num_key_value_heads × head_dim");
  expect("num_attention_heads", c.num_key_value_heads, "num_key_value_heads");
  return problems;
}

void freeze_all_but_prefix(model::CausalLM& model) {
  for (const auto& item : model->named_parameters()) {
    item.value().set_requires_grad(item.key().rfind("prefix_encoder.", 0) == 0);
  }
}

}  // namespace

std::string peft_adapter_type(const std::string& dir) {
  const std::string path = (fs::path(dir) / "adapter_config.json").string();
  FT_CHECK(fs::exists(path), "[adapter] ", dir, ": no adapter_config.json (not a PEFT adapter directory)");
  const auto j = read_config(path, "adapter");
  FT_CHECK(j.contains("peft_type") && j["peft_type"].is_string(), "[adapter] ", path, ": no peft_type");
  return j["peft_type"].get<std::string>();
}

void apply_prefix(model::CausalLM& model, const PrefixOptions& o) {
  FT_CHECK(!model->prefix_encoder, "[prefix] the model already has a prefix");
  FT_CHECK(o.num_virtual_tokens > 0, "[prefix] num_virtual_tokens must be > 0, got ", o.num_virtual_tokens);
  FT_CHECK(o.encoder_hidden_size >= 0, "[prefix] encoder_hidden_size must be >= 0, got ", o.encoder_hidden_size);
  FT_CHECK(o.init == "normal" || o.init == "zero", "[prefix] init must be normal or zero, got '", o.init, "'");
  const model::ModelConfig& c = model->config();
  const int64_t hidden = o.encoder_hidden_size > 0 ? o.encoder_hidden_size : token_dim(c);
  model::PrefixEncoder encoder(c, o.num_virtual_tokens, o.projection, hidden);
  {
    // Initialised in float32 on the CPU from the seed, then moved to the model's device and dtype.
    at::NoGradGuard no_grad;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
    auto fill = [&](at::Tensor& p, double bound_or_std, bool normal) {
      at::Tensor t = at::empty(p.sizes(), at::kFloat);
      if (normal) t.normal_(0.0, bound_or_std, gen);
      else t.uniform_(-bound_or_std, bound_or_std, gen);
      p.copy_(t);
    };
    fill(encoder->embedding->weight, 1.0, true);
    if (o.projection) {
      // nn.Linear's default: kaiming-uniform with a = √5 for the weight, i.e. U(−1/√in, 1/√in), and
      // the same bound for the bias.
      for (int idx : {0, 2}) {
        auto lin = encoder->transform[idx]->as<torch::nn::Linear>();
        const double bound = 1.0 / std::sqrt(static_cast<double>(lin->weight.size(1)));
        fill(lin->weight, bound, false);
        fill(lin->bias, bound, false);
      }
      if (o.init == "zero") {
        auto last = encoder->transform[2]->as<torch::nn::Linear>();
        last->weight.zero_();
        last->bias.zero_();
      }
    } else if (o.init == "zero") {
      encoder->embedding->weight.zero_();
    }
  }
  const at::Tensor& like = model->model->embed_tokens->weight;
  encoder->to(like.device(), like.scalar_type());
  model->set_prefix(encoder);
  freeze_all_but_prefix(model);
}

void save_peft_prefix(model::CausalLM& model, const PrefixOptions& o, const std::string& dir,
                      const std::string& base_model) {
  FT_CHECK(model->prefix_encoder, "[prefix] the model has no prefix to save");
  const model::ModelConfig& c = model->config();
  at::Tensor table;
  {
    at::NoGradGuard no_grad;
    table = model->prefix_encoder->table().detach().to(at::kCPU).contiguous();
  }
  const nlohmann::ordered_json config = {
      {"peft_type", "PREFIX_TUNING"},
      {"task_type", "CAUSAL_LM"},
      {"base_model_name_or_path", base_model.empty() ? nlohmann::ordered_json(nullptr) : nlohmann::ordered_json(base_model)},
      {"num_virtual_tokens", model->prefix_encoder->virtual_tokens},
      {"num_layers", c.num_hidden_layers},
      {"token_dim", token_dim(c)},
      {"num_attention_heads", c.num_key_value_heads},
      {"num_transformer_submodules", 1},
      {"prefix_projection", o.projection},
      {"encoder_hidden_size", o.encoder_hidden_size > 0 ? o.encoder_hidden_size : token_dim(c)},
      {"init_weights", o.init == "zero" ? nlohmann::ordered_json("zero") : nlohmann::ordered_json(nullptr)},
      {"inference_mode", true},
      {"modules_to_save", nullptr},
      {"revision", nullptr},
  };
  fs::create_directories(dir);
  const std::string text = config.dump(2) + "\n";
  io::write_file_atomic((fs::path(dir) / "adapter_config.json").string(),
                        std::span(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
  io::write_safetensors((fs::path(dir) / "adapter_model.safetensors").string(), {io::tensor_write(kTensor, table)});
}

PrefixOptions read_peft_prefix_config(const std::string& path) {
  const auto j = read_config(path, "prefix");
  PrefixOptions o;
  try {
    FT_CHECK(j.value("peft_type", "") == "PREFIX_TUNING", "[prefix] ", path, ": peft_type is ",
             j.value("peft_type", "missing"), ", not PREFIX_TUNING");
    const std::string task = j.contains("task_type") && j["task_type"].is_string() ? j["task_type"].get<std::string>() : "";
    FT_CHECK(task == "CAUSAL_LM", "[prefix] ", path, ": task_type is '", task, "'; only CAUSAL_LM prefixes fit a decoder");
    o.num_virtual_tokens = j.at("num_virtual_tokens").get<int64_t>();
    FT_CHECK(o.num_virtual_tokens > 0, "[prefix] ", path, ": num_virtual_tokens must be > 0");
    const int64_t submodules = j.value("num_transformer_submodules", 1);
    FT_CHECK(submodules == 1, "[prefix] ", path, ": num_transformer_submodules = ", submodules,
             " (encoder-decoder prefixes do not fit a decoder-only model)");
    if (j.contains("prefix_projection") && !j["prefix_projection"].is_null()) o.projection = j["prefix_projection"].get<bool>();
    if (j.contains("encoder_hidden_size") && !j["encoder_hidden_size"].is_null())
      o.encoder_hidden_size = j["encoder_hidden_size"].get<int64_t>();
    if (j.contains("init_weights") && j["init_weights"].is_string()) o.init = j["init_weights"].get<std::string>();
    const std::set<std::string> understood = {
        "peft_type", "task_type", "num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads",
        "num_transformer_submodules", "prefix_projection", "encoder_hidden_size", "init_weights", "inference_mode",
        "base_model_name_or_path", "revision", "peft_version", "auto_mapping", "modules_to_save"};
    for (const auto& [key, value] : j.items()) {
      if (understood.count(key)) continue;
      const bool unset = value.is_null() || value == false || (value.is_object() && value.empty()) ||
                         (value.is_array() && value.empty());
      FT_CHECK(unset, "[prefix] ", path, ": option '", key, "' = ", value.dump(), " is not supported");
    }
    FT_CHECK(!j.contains("modules_to_save") || j["modules_to_save"].is_null() ||
                 (j["modules_to_save"].is_array() && j["modules_to_save"].empty()),
             "[prefix] ", path, ": modules_to_save is not supported");
  } catch (const nlohmann::json::exception& e) {
    FT_FAIL("[prefix] ", path, ": malformed adapter config: ", e.what());
  }
  return o;
}

std::vector<std::string> check_peft_prefix(model::CausalLM& model, const std::string& dir) {
  std::vector<std::string> problems;
  const std::string config_path = (fs::path(dir) / "adapter_config.json").string();
  PrefixOptions o;
  try {
    o = read_peft_prefix_config(config_path);
    problems = shape_problems(read_config(config_path, "prefix"), model->config(), config_path);
  } catch (const Error& e) {
    problems.push_back(e.what());
    return problems;
  }
  const std::string path = (fs::path(dir) / "adapter_model.safetensors").string();
  std::shared_ptr<io::SafetensorsFile> file;
  try {
    file = io::SafetensorsFile::open(path);
  } catch (const Error& e) {
    problems.push_back(e.what());
    return problems;
  }
  const model::ModelConfig& c = model->config();
  const std::vector<int64_t> want = {o.num_virtual_tokens, c.num_hidden_layers * 2 * token_dim(c)};
  if (const io::TensorInfo* info = file->find(kTensor); info == nullptr) {
    problems.push_back(path + ": tensor 'prompt_embeddings' is missing");
  } else {
    if (info->shape != want) {
      problems.push_back(detail::concat(path, ": tensor 'prompt_embeddings' has shape ", at::IntArrayRef(info->shape),
                                        ", the model needs ", at::IntArrayRef(want),
                                        " (num_virtual_tokens × num_layers·2·num_key_value_heads·head_dim)"));
    }
    if (const std::string why = io::float_tensor_problem(*file, *info); !why.empty())
      problems.push_back(path + ": tensor 'prompt_embeddings' " + why);
  }
  for (const auto& info : file->tensors()) {
    if (info.name != kTensor) problems.push_back(path + ": tensor '" + info.name + "' is not part of a prefix adapter");
  }
  return problems;
}

PrefixOptions load_peft_prefix(model::CausalLM& model, const std::string& dir) {
  const std::vector<std::string> problems = check_peft_prefix(model, dir);
  if (!problems.empty()) {
    std::string all;
    for (const auto& p : problems) all += "\n  " + p;
    FT_FAIL("[prefix] the adapter in ", dir, " does not fit the model:", all);
  }
  PrefixOptions o = read_peft_prefix_config((fs::path(dir) / "adapter_config.json").string());
  auto file = io::SafetensorsFile::open((fs::path(dir) / "adapter_model.safetensors").string());
  const at::Tensor table = io::read_tensor(*file, *file->find(kTensor));
  // PEFT loads the saved table as a plain embedding, projection or not; so does libft.
  o.projection = false;
  o.encoder_hidden_size = 0;
  o.init = "normal";
  apply_prefix(model, o);
  at::NoGradGuard no_grad;
  model->prefix_encoder->embedding->weight.copy_(table.to(model->prefix_encoder->embedding->weight.dtype()));
  return o;
}

}  // namespace ft::adapt

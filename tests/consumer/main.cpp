// Build a small Llama, save it as a Hugging Face checkpoint, load it back and continue a prompt.
#include <ft/io/hf_checkpoint.h>
#include <ft/model/generate.h>

#include <iostream>

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : "tiny-llama";

  ft::io::ModelConfig config;  // or ft::io::load_model_config("config.json")
  config.vocab_size = 128;
  config.hidden_size = 64;
  config.intermediate_size = 128;
  config.num_hidden_layers = 2;
  config.num_attention_heads = 4;
  config.num_key_value_heads = 2;
  config.head_dim = 16;
  config.layer_window.assign(config.num_hidden_layers, 0);  // full attention in every layer

  ft::model::CausalLM model(config);
  ft::model::init_weights(model, /*seed=*/0);
  ft::io::save_pretrained(model, dir);  // config.json + model.safetensors

  ft::model::CausalLM loaded = ft::io::load_pretrained(dir);
  ft::model::GenerateOptions options;
  options.max_new_tokens = 8;
  for (int64_t token : ft::model::generate(loaded, {1, 2, 3}, options)) std::cout << token << " ";
  std::cout << "\n";
}

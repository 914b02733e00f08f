#include "ft/model/generate.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>

#include "ft/util/error.h"

namespace ft::model {

int64_t sample_top_p(const at::Tensor& logits, double temperature, double top_p, at::Generator& gen) {
  FT_CHECK(temperature > 0, "[generate] temperature must be > 0, got ", temperature);
  FT_CHECK(top_p > 0 && top_p <= 1, "[generate] top_p must be in (0, 1], got ", top_p);
  at::Tensor probs = at::softmax(logits.to(at::kDouble).cpu() / temperature, -1);
  auto [sorted, order] = probs.sort(/*dim=*/-1, /*descending=*/true);
  // Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it < top_p.
  at::Tensor before = sorted.cumsum(-1) - sorted;
  sorted = sorted.masked_fill(before >= top_p, 0.0);
  at::Tensor pick = at::multinomial(sorted / sorted.sum(), 1, false, gen);
  return order[pick.item<int64_t>()].item<int64_t>();
}

std::vector<int64_t> generate(CausalLM& model, const std::vector<int64_t>& prompt, const GenerateOptions& o) {
  FT_CHECK(!prompt.empty(), "[generate] the prompt must hold at least one token");
  const int64_t vocab = model->config().vocab_size;
  for (int64_t id : prompt) {
    FT_CHECK(id >= 0 && id < vocab, "[generate] prompt token ", id, " is outside the vocabulary [0, ", vocab, ")");
  }
  at::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  const auto device = model->model->embed_tokens->weight.device();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  auto ids_tensor = [&](const std::vector<int64_t>& ids) {
    return at::tensor(ids, at::kLong).view({1, static_cast<int64_t>(ids.size())}).to(device);
  };

  std::vector<int64_t> sequence = prompt, out;
  KVCache cache;
  at::Tensor next_input = ids_tensor(prompt);
  for (int64_t step = 0; step < o.max_new_tokens; ++step) {
    at::Tensor logits;
    if (o.use_cache) {
      // longrope (Phi-3's long-context models): the pass that first reaches past the original
      // context turns every position with the long factors, so the cached keys, turned with the
      // short ones, are encoded again with the whole sequence, as transformers' Phi-3 generation does.
      const int64_t cached = cache.length();
      if (cached > 0 && !model->long_rope(cached - 1) && model->long_rope(cached + next_input.size(1) - 1)) {
        cache = KVCache();
        next_input = ids_tensor(sequence);
      }
      ForwardOptions f;
      f.cache = &cache;
      logits = model->forward(next_input, f);
    } else {
      logits = model->forward(ids_tensor(sequence));
    }
    at::Tensor last = logits[0][-1];
    const int64_t token = o.greedy ? last.argmax().item<int64_t>() : sample_top_p(last, o.temperature, o.top_p, gen);
    out.push_back(token);
    sequence.push_back(token);
    if (o.on_token) o.on_token(token);
    if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), token) != o.stop_tokens.end()) break;
    next_input = ids_tensor({token});
  }
  if (was_training) model->train();
  return out;
}

}  // namespace ft::model

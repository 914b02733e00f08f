#pragma once
// Elastic weight consolidation (Kirkpatrick et al. 2017), diagonal, with online accumulation over
// several tasks (Schwarz et al. 2018): a quadratic penalty that holds the weights the previous
// domain relied on near their values there, so that fine-tuning on a new domain forgets less.
//
// FISHER. The empirical Fisher information of every floating parameter θᵢ of a model on data of
// the previous domain: Fᵢ = (1/N) Σₙ (∂ℓₙ/∂θᵢ)², where a sample n is one packed row of seq_len
// tokens and ℓₙ is its mean token log-likelihood (so F does not grow with seq_len; lambda carries
// the scale). Per-sample gradients come from one backward pass per row. It is saved with the
// anchor θ* (the weights it was estimated at) to an HDF5 array file (ft/data/array_file.h, kind
// "ewc"); `ft fisher` writes it. Online EWC folds a new estimate into an earlier one:
// F ← γ·F_previous + F_new, θ* ← θ*_new.
//
// PENALTY. P = (λ/2) Σᵢ Fᵢ (θᵢ − θᵢ*)² over the trainable parameters, added once per optimizer step
// to the step's token-mean loss; its gradient λ F (θ − θ*) is added to the accumulated gradients
// before clipping (analytically, no autograd graph). The logged training loss stays the data loss;
// the penalty is logged beside it.
//
// ADAPTERS. With LoRA (and QLoRA) the base is frozen and the adapters start at ΔW = 0, so the
// anchor is the base itself and the penalty applies to each adapted layer's effective weight
// change: P = (λ/2) Σ F_W ⊙ (s·B·A)², whose gradients are s·E·Aᵀ for B and s·Bᵀ·E for A with
// E = λ F_W ⊙ s·B·A. (Penalising the raw factors A and B instead would hold the adapters near an
// arbitrary initialisation, not the model near what the previous domain needed.) For a
// full-precision LoRA base, the anchor must equal the base weights of the adapted layers (checked);
// an NF4 base is its anchor up to the quantization error, which is not penalised. DoRA and prefix
// tuning are refused: their change of the model is not a weight difference the Fisher describes.
#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "ft/data/batcher.h"
#include "ft/model/llama.h"

namespace ft::train {

struct EwcState {
  std::vector<std::string> names;  ///< parameters, in model order
  std::map<std::string, at::Tensor> fisher, anchor;  ///< float32, CPU
  int64_t samples = 0;  ///< rows of the newest estimate
  int64_t tasks = 1;    ///< estimates folded in (online EWC)
  double gamma = 1.0;   ///< decay of the last fold
};

/// The empirical Fisher of every floating parameter of `model` over the first `samples` rows of
/// `rows` (a batcher of batch_size 1), at the model's current weights, which become the anchor.
/// requires_grad and the train/eval state of the model are restored afterwards; gradients are
/// cleared. `progress(done, total)` is called after every row when set.
EwcState estimate_fisher(model::CausalLM& model, data::Batcher& rows, int64_t samples,
                         const std::function<void(int64_t, int64_t)>& progress = {});

/// Online EWC: γ·previous.fisher + current.fisher, current's anchor; the two must cover the same
/// parameters with the same shapes (throws ft::Error naming the first that does not).
EwcState accumulate_online(const EwcState& previous, const EwcState& current, double gamma);

void save_ewc(const EwcState& state, const std::string& path);
/// Throws ft::Error naming the file and the array for a missing, damaged or incomplete file.
EwcState load_ewc(const std::string& path);

class EwcPenalty {
 public:
  /// Binds `state` to the trainable parameters of `model` (see ADAPTERS). Throws ft::Error naming
  /// every trainable tensor the state lacks or has in another shape, or an unsupported mode.
  EwcPenalty(model::CausalLM& model, const EwcState& state, double lambda);
  /// P at the current weights; with `add_gradients`, also adds ∂P/∂θ to the .grad of the trainable
  /// parameters (allocating zeros where a .grad is undefined).
  double apply(bool add_gradients);
  /// One line for the run log.
  std::string describe() const;

 private:
  struct Dense {  // a trainable parameter with its own Fisher and anchor
    at::Tensor param, fisher, anchor;
  };
  struct LowRank {  // an adapted layer: ΔW = scale · B A
    at::Tensor a, b, fisher;
    double scale;
  };
  std::vector<Dense> dense_;
  std::vector<LowRank> low_rank_;
  double lambda_;
  int64_t tasks_;
};

}  // namespace ft::train

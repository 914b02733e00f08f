#pragma once
// The typed configuration of a training run (`ft train run.yaml`), parsed from YAML.
//
// Every default lives here, in the struct fields. The parser is strict: an unknown key (with a
// suggestion when it looks like a typo), a duplicate key (yaml-cpp would silently keep the first), a
// wrong type or a value out of range is an error naming file:line:column, and every error of the
// file is reported at once. Relative paths are relative to the working directory, as for the other
// `ft` commands. Overrides "section.key=value" (the value is YAML) are applied before validation;
// "section.key=null" removes the key (its default applies), e.g. model.config=null with model.checkpoint=DIR.
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ft::config {

struct ModelSection {
  /// Hugging Face checkpoint directory to fine-tune. Exactly one of checkpoint / config.
  std::string checkpoint;
  /// Or: a config.json to build a fresh model from (continued pretraining from scratch) ...
  std::string config;
  /// ... initialised with this seed (init_weights).
  uint64_t init_seed = 0;
  /// A mixture of experts: the weight of the routers' load-balancing loss in the training objective
  /// (ft/train/step.h); 0 trains without it. Unset: as the model's config.json says (transformers'
  /// output_router_logits, then router_aux_loss_coef), which for most released checkpoints is off.
  std::optional<double> router_aux_loss_coef;
};

struct DataSection {
  std::vector<std::string> train;  ///< token stores (ft prepare), concatenated; at least one
  int64_t seq_len = 512;           ///< packed row length
  int64_t batch_size = 8;          ///< rows per micro-batch (per rank: the global batch is batch_size × grad_accum × ranks)
  int64_t grad_accum = 1;          ///< micro-batches per optimizer step
  bool shuffle = true;
  uint64_t seed = 0;               ///< shuffle seed
};

struct OptimizerSection {
  std::string name = "adamw";  ///< adamw | sgd
  double lr = 3e-4;
  double beta1 = 0.9, beta2 = 0.999;  ///< YAML: betas: [0.9, 0.999]
  double weight_decay = 0.0;          ///< never on norms, biases and embeddings
  double eps = 1e-8;
  double momentum = 0.0;              ///< sgd only
};

struct ScheduleSection {
  std::string name = "cosine";  ///< constant | linear | cosine
  int64_t warmup_steps = 0;
  int64_t total_steps = 0;      ///< 0: max_steps
};

struct EvalSection {
  /// Separate evaluation stores, read whole, in order; "STORE@N" reads only the N documents a run
  /// trained on STORE (as its first store) with held_out_docs: N held out.
  std::vector<std::string> stores;
  /// Documents of the training stores held out of training and evaluated on (0 = none).
  int64_t held_out_docs = 0;
  int64_t every = 0;                ///< evaluate every N optimizer steps and at the end (0 = only at the end)
  int64_t max_batches = 0;          ///< per set; 0 = the whole set
  int64_t batch_size = 0;           ///< 0: data.batch_size
  /// Early stopping: stop after this many evaluations in a row without an improvement of the first
  /// set's loss by more than min_delta (0 = never stop early). The best evaluation's checkpoint is
  /// kept whatever keep_last says.
  int64_t patience = 0;
  /// Also evaluate before the first step (step 0): the baseline that the gains and losses of
  /// fine-tuning are read against.
  bool at_start = false;
  double min_delta = 0.0;
};

struct CheckpointSection {
  int64_t every = 0;            ///< save every N optimizer steps (0 = only at the end and on SIGINT/SIGTERM)
  int64_t keep_last = 2;        ///< complete checkpoints kept, newest first (plus the best one)
  std::string resume = "auto";  ///< auto: continue from output_dir's newest intact checkpoint if any;
                                ///< never: refuse an output_dir that has checkpoints; required: fail without one
  bool strict = false;          ///< a damaged newest checkpoint is an error instead of a fallback to an older one
};

/// mode: freeze. Every parameter trains except those selected here.
struct FreezeSection {
  std::vector<std::string> layers;    ///< frozen decoder blocks: indices or inclusive ranges ("0-5"), negative from the end
  int64_t train_last = 0;             ///< > 0: only the last N blocks train (all earlier blocks are frozen)
  std::vector<std::string> patterns;  ///< glob patterns (* and ?) over parameter names; matches are frozen
  bool embeddings = true;             ///< freeze embed_tokens
  bool lm_head = false;               ///< freeze lm_head (with tied embeddings it must equal `embeddings`)
  bool norm = false;                  ///< freeze the final norm (model.norm)
};

/// mode: lora (adapt/lora.h). The base model is frozen; only the adapters train.
struct LoraSection {
  int64_t r = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  /// Module names or suffixes (PEFT's target_modules), or [all-linear]: every linear layer but lm_head.
  std::vector<std::string> targets = {"q_proj", "v_proj"};
  bool rslora = false;           ///< scale alpha/√r instead of alpha/r
  bool dora = false;             ///< DoRA: a trained magnitude per output row (PEFT's use_dora)
  /// Which of the base's biases train beside the adapters, saved in the adapter file (PEFT's
  /// bias): none | all (every linear layer's) | lora_only (the adapted layers').
  std::string bias = "none";
  std::string init = "kaiming";  ///< kaiming (PEFT's default) | gaussian
  uint64_t seed = 0;             ///< of A's initialisation
  /// Per-module overrides, regular expression → rank / alpha, first match wins (PEFT's patterns).
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  /// Modules trained in full beside the adapters, saved in the adapter file (PEFT's
  /// modules_to_save; e.g. [lm_head] or [embed_tokens, lm_head] for new tokens).
  std::vector<std::string> modules_to_save;
  /// Linear layers never adapted, by name or "."-suffix (PEFT's exclude_modules), e.g.
  /// [model.layers.0.mlp.down_proj] or [o_proj]; each must name a linear layer of the model.
  std::vector<std::string> exclude_modules;
  /// Only the targets in these decoder layers (PEFT's layers_to_transform; empty: every layer), the
  /// layer index read after "<layers_pattern>." in the module name (PEFT's layers_pattern; empty:
  /// after the first dotted segment, model.layers.3 → 3).
  std::vector<int64_t> layers_to_transform;
  std::vector<std::string> layers_pattern;
  /// Start from this PEFT adapter directory (its config gives r, alpha, targets and patterns, its
  /// tensors the initial A and B) instead of a fresh initialisation; empty = fresh.
  std::string init_from;
  /// How the adapted layers train (the same function; speed only, see ft/adapt/lora.h):
  bool fused = true;           ///< the fused autograd node (false: PEFT's chain of operations)
  bool extended_gemm = false;  ///< under autocast, [x | s S] [W | B]ᵀ as one GEMM (set_lora_extended_gemm)
  bool row_kernels = false;    ///< CUDA: the cast and rank-r passes as one kernel each (set_lora_row_kernels)
  int64_t grad_splits = 1;     ///< dA and dB as this many partial GEMMs over token chunks (set_lora_grad_splits)
  bool group_projections = false;  ///< q, k, v (gate, up) as one node over stacked weights (set_lora_group_projections)
};

/// mode: qlora. LoRA (the lora section) on a base whose linear layers (all but lm_head) are stored
/// in NF4 (adapt/nf4.h) and dequantized on the fly.
struct QloraSection {
  int64_t block = 64;         ///< NF4 block size (even)
  bool double_quant = true;   ///< 8-bit block maxima (4.127 instead of 4.5 bits per weight)
};

/// mode: prefix (adapt/prefix.h). The base model is frozen; learned per-layer key/value prefixes train.
struct PrefixSection {
  int64_t num_virtual_tokens = 20;
  bool projection = false;          ///< PEFT's prefix_projection: the prefix comes from a two-layer MLP
  int64_t encoder_hidden_size = 0;  ///< the MLP's hidden width; 0 = num_key_value_heads × head_dim
  std::string init = "normal";      ///< normal (PEFT's default) | zero
  uint64_t seed = 0;
  /// Start from this PEFT prefix adapter (its config gives num_virtual_tokens, its table the
  /// initial prefix, trained as a plain table) instead of a fresh one; empty = fresh.
  std::string init_from;
};

/// Elastic weight consolidation (train/ewc.h): a penalty holding the weights the previous domain
/// relied on near their values there. `state` is the HDF5 file `ft fisher` writes.
struct EwcSection {
  std::string state;    ///< empty = no EWC
  double lambda = 0.0;  ///< penalty (λ/2) Σ F (θ − θ*)²; 0 computes it but changes nothing
};

/// Replay (rehearsal) of earlier-domain data: its stores are mixed into the training rows, each
/// row drawn from them with probability `ratio` (a sampled mixture, deterministic and resumable).
struct ReplaySection {
  std::vector<std::string> stores;  ///< empty = no replay
  double ratio = 0.0;               ///< share of rows from the replay stores, in (0, 1)
  /// Documents of each replay store never replayed: the N a run trained on that store (as its first
  /// store) with eval.held_out_docs: N held out, so that its held-out evaluation stays unseen
  /// (evaluate them with eval.stores: [STORE@N]).
  int64_t held_out_docs = 0;
};

/// Data-parallel training (dist/dist.h), active when a launcher (torchrun, ft launch, srun, mpirun)
/// set the job's environment.
struct DistSection {
  std::string backend = "auto";  ///< auto (nccl on CUDA, gloo on CPU) | gloo | nccl
  double bucket_mb = 25.0;       ///< gradient all-reduce bucket size, MiB
  /// Rendezvous and every collective: a rank that died or hangs ends the job after this long.
  double timeout_s = 600.0;
};

/// Fused CUDA kernels for the model's memory-bound passes (ft/kernels/), each opt-in until the GPU
/// check has measured it; no effect on the CPU. See model::CausalLMImpl::set_fused.
struct KernelsSection {
  bool loss = false;    ///< the cross-entropy straight from the logits (kernels/cross_entropy.cu)
  bool rope = false;    ///< rotary embeddings, one pass each way, the same values (kernels/rope.cu)
  bool swiglu = false;  ///< silu(gate) ⊙ up, one pass each way (kernels/swiglu.cu)
  /// gpt-oss's attention sinks through flash attention's log-sum-exp instead of materialised scores
  /// (model::sink_flash_attention), on the CPU and on CUDA (CausalLMImpl::set_flash_sinks).
  bool flash_sinks = false;
};

struct RunConfig {
  std::string source;  ///< where it was read from (for messages)
  ModelSection model;
  std::string tokenizer;  ///< optional tokenizer.model (or directory); stores must match it
  DataSection data;
  OptimizerSection optimizer;
  ScheduleSection schedule;
  int64_t max_steps = 0;          ///< optimizer steps; required > 0
  /// Seeds the random generators when a run starts fresh (dropout); a resumed run restores their
  /// states from the checkpoint instead.
  uint64_t seed = 0;
  double clip_grad_norm = 1.0;    ///< 0 = off
  std::string dtype = "float32";  ///< float32 | bfloat16 (bf16 autocast; on the CPU too)
  std::string device = "cpu";     ///< cpu | cuda | cuda:N | auto
  /// Recompute each decoder block in the backward pass instead of keeping its activations: less
  /// memory for about one more forward pass of compute; the same gradients.
  bool activation_checkpointing = false;
  /// CUDA only: each micro-batch shape's forward and backward pass is captured once as a CUDA graph
  /// and replayed (ft/train/graphs.h): no per-operation host cost, for small models and adapters
  /// whose steps are bound by it. Not with activation checkpointing or data parallelism.
  bool cuda_graphs = false;
  /// The loss through the output head this many token rows at a time (0: all at once): the (B·T, V)
  /// logits, their float32 copy and their gradient never exist whole, for one more output-head
  /// GEMM in the backward pass (model::chunked_lm_loss_sum). For large vocabularies.
  int64_t loss_chunk = 0;
  KernelsSection kernels;
  EvalSection eval;
  /// Adaptation mode: full (every parameter trains) | freeze (FreezeSection) | lora (LoraSection) |
  /// qlora (LoraSection on an NF4 base, QloraSection) | prefix (PrefixSection).
  std::string mode = "full";
  FreezeSection freeze;
  LoraSection lora;
  QloraSection qlora;
  PrefixSection prefix;
  EwcSection ewc;
  ReplaySection replay;
  DistSection dist;
  CheckpointSection checkpoint;
  int64_t log_every = 1;          ///< metrics.jsonl line every N steps
  std::string output_dir;         ///< required; metrics.jsonl, config.yaml, checkpoints/ and final/ go here
  std::string on_nonfinite = "skip";  ///< skip | stop
  /// Out of device memory in a forward/backward pass: stop (with a message saying what to change),
  /// or halve: run each micro-batch as two forward passes of half the rows, again if needed; the
  /// global batch and the update stay the same (the loss is normalised over the whole step).
  std::string on_oom = "stop";
};

/// Parses YAML text; `source` names it in errors. Throws ft::Error listing every problem, one per
/// line, each as "source:line:column: message".
RunConfig parse_run_config(std::string_view yaml, const std::string& source,
                           const std::vector<std::string>& overrides = {});
/// "3" → (3, 3), "0-5" → (0, 5), "-2--1" → (-2, -1) (negative indices count from the last block);
/// nullopt for anything else. Bounds are checked against the model later (adapt/mode.h).
std::optional<std::pair<int64_t, int64_t>> parse_layer_range(const std::string& text);
/// Reads and parses a file.
RunConfig load_run_config(const std::string& path, const std::vector<std::string>& overrides = {});
/// The resolved configuration (all defaults filled in) as YAML that parse_run_config accepts.
std::string to_yaml(const RunConfig& config);

}  // namespace ft::config

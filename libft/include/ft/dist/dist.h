#pragma once
// Data-parallel training over c10d, PyTorch's own process groups (NCCL on CUDA, Gloo on CPU).
// LibTorch's C++ API has no DistributedDataParallel module, so this is libft's own, small version:
//
//  - LaunchEnv: who am I? Read from the environment that torchrun (and `ft launch`), Slurm's srun or
//    Open MPI's mpirun give every process.
//  - ProcessGroup: a TCP store rendezvous at MASTER_ADDR:MASTER_PORT, then the backend. Under
//    torchrun's agent store (TORCHELASTIC_USE_AGENT_STORE=True) the agent already serves the store,
//    so every rank, 0 included, connects as a client under the prefix /worker/attempt_<restart
//    count>/, as torch.distributed does. Every collective fails with a clear error after the
//    group's timeout instead of hanging, and at once when a peer's connection drops.
//  - GradientReducer: all-reduces the trainable parameters' gradients in buckets of about
//    `bucket_mb`, each launched from autograd hooks as soon as its last gradient is ready, so
//    communication overlaps the rest of the backward pass. Only the last backward pass of an
//    optimizer step communicates (gradient accumulation adds up locally first).
//
// Normalisation: the trainer all-reduces the step's number of supervised tokens N before the first
// backward pass and every rank backpropagates (Σ its token losses) / N, so the SUM of the ranks'
// gradients is the gradient of the token mean over the global batch, exactly as one process with
// the whole batch computes it (train/step.h). The reduced gradients are bit-identical on every
// rank, so every rank takes the same optimizer step and the replicas never drift apart.
#include <c10/core/Device.h>
#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ft::dist {

/// Where this process sits in the job.
struct LaunchEnv {
  std::string launcher = "none";  ///< "env" (torchrun, ft launch, or by hand), "slurm", "mpi", or "none"
  int rank = 0, world = 1;
  int local_rank = 0, local_world = 1;  ///< on this machine (selects the GPU)
  std::string master_addr;              ///< the TCP store's host (rank 0's machine)
  int master_port = 0;
  bool agent_store = false;  ///< torchrun's agent serves the store (TORCHELASTIC_USE_AGENT_STORE=True)
  int restart_count = 0;     ///< TORCHELASTIC_RESTART_COUNT: the store prefix under an agent store
  /// Launched by a launcher (even with one process): the trainer then sets up a process group.
  bool distributed() const { return launcher != "none"; }
  std::string describe() const;  ///< "rank 1 of 4 (local 1 of 2), store 10.0.0.1:29500, via torchrun"
};

/// Reads a variable; nullopt when unset.
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;

/// Parses the launcher's variables, in this order of precedence:
///  - WORLD_SIZE set: RANK, WORLD_SIZE, LOCAL_RANK (default RANK), LOCAL_WORLD_SIZE (default
///    WORLD_SIZE), MASTER_ADDR, MASTER_PORT (torchrun, `ft launch`, or set by hand);
///  - OMPI_COMM_WORLD_SIZE set: OMPI_COMM_WORLD_RANK/_SIZE/_LOCAL_RANK/_LOCAL_SIZE, with
///    MASTER_ADDR and MASTER_PORT exported by the job script;
///  - SLURM_STEP_NUM_TASKS set (inside srun): SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID,
///    SLURM_STEP_TASKS_PER_NODE; MASTER_ADDR defaults to SLURM_LAUNCH_NODE_IPADDR and MASTER_PORT
///    to 29500.
/// None of them: a single process (launcher "none"). Throws ft::Error naming the variable for
/// missing or malformed values (a rank outside [0, world), a port outside 1..65535).
LaunchEnv parse_launch_env(const EnvLookup& lookup);
/// parse_launch_env of this process's environment.
LaunchEnv launch_env();
/// A TCP port on the loopback interface that is free now (the kernel's choice for port 0): for a
/// store that a single-machine job binds a moment later (`ft launch`, tests).
int free_local_port();

struct GroupOptions {
  std::string backend = "auto";  ///< auto (nccl on CUDA, gloo on CPU) | gloo | nccl
  std::chrono::milliseconds timeout{std::chrono::minutes(10)};  ///< rendezvous and every collective
};

/// A started collective; wait() blocks until it is done (or throws the backend's error).
class Pending {
 public:
  Pending();
  ~Pending();
  Pending(Pending&&) noexcept;
  Pending& operator=(Pending&&) noexcept;
  void wait();
  struct Impl;

 private:
  explicit Pending(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  friend class ProcessGroup;
};

/// One c10d process group over all ranks of the job.
class ProcessGroup {
 public:
  /// Rendezvous and backend setup; `device` decides the automatic backend and where scalars travel.
  /// Throws ft::Error when the store cannot be reached within the timeout or the backend is not
  /// built in (nccl without CUDA).
  static std::shared_ptr<ProcessGroup> create(const LaunchEnv& env, c10::Device device, const GroupOptions& options);
  ~ProcessGroup();

  int rank() const { return rank_; }
  int world() const { return world_; }
  const std::string& backend() const { return backend_; }
  c10::Device device() const { return device_; }

  /// In-place sum over the ranks, started now (tensor on device(), contiguous).
  Pending all_reduce_async(at::Tensor& tensor);
  /// In-place sum, waited for.
  void all_reduce(at::Tensor& tensor);
  /// Element-wise sums of float64 scalars over the ranks.
  std::vector<double> sum(const std::vector<double>& values);
  /// Element-wise maxima.
  std::vector<double> max(const std::vector<double>& values);
  /// `tensor` from `root` on every rank (in place).
  void broadcast(at::Tensor& tensor, int root);
  /// Every rank's `tensor` (same shape and dtype on all ranks), in rank order, on the CPU.
  std::vector<at::Tensor> all_gather(const at::Tensor& tensor);
  void barrier();
  /// Gives up on the backend: its destructor, which waits for collectives still queued (possibly
  /// for a dead peer, until the timeout), will not run. Done automatically when a collective fails;
  /// the trainer also calls it when it leaves by an exception, so that the error is reported and
  /// the process ends at once.
  void abandon();

  struct Impl;

 private:
  ProcessGroup() = default;
  std::vector<double> reduce_scalars(const std::vector<double>& values, bool max);
  /// Runs a c10d call; a failure abandons the backend and becomes an ft::Error naming `what`.
  void run(const char* what, const std::function<void()>& collective);
  std::unique_ptr<Impl> impl_;
  int rank_ = 0, world_ = 1;
  std::string backend_;
  c10::Device device_ = c10::kCPU;
};

/// Bucketed, overlapped gradient all-reduce for a fixed list of trainable parameters (see the top
/// of this file). Use per optimizer step:
///   reducer.begin_pass(last)  before each micro-batch's backward pass (last: the step's final one)
///   reducer.finish()          after the step's backward passes, before clipping and the optimizer
/// After finish(), every parameter's .grad holds the sum over the ranks. A parameter whose gradient
/// is undefined on every rank keeps it undefined (the optimizer skips it, as in one process); one
/// defined on some ranks only is summed with zeros for the others.
class GradientReducer {
 public:
  GradientReducer(std::shared_ptr<ProcessGroup> group, std::vector<at::Tensor> params, int64_t bucket_bytes);
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  void begin_pass(bool last);
  void finish();

  size_t buckets() const;
  int64_t bytes_per_step() const;  ///< gradient bytes each rank all-reduces per optimizer step
  /// Buckets launched from the backward pass's hooks in the last step (the rest waited for finish()):
  /// how much of the communication could overlap the backward pass.
  size_t launched_in_backward() const;

  struct State;

 private:
  std::shared_ptr<State> state_;
};

}  // namespace ft::dist

#include "ft/dist/dist.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef LIBFT_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <csignal>
#include <cstdlib>
#include <mutex>
#include <sstream>

#include "ft/util/error.h"

// The torch wheel has Gloo compiled into libtorch_cpu but ships no Gloo headers; libft compiles
// ProcessGroupGloo.hpp against Debian's libgloo-dev headers. The class is allocated here, so its
// size must be the one libtorch was built with: 488 bytes in torch 2.11.0 (the operator new call in
// ProcessGroupGloo::split, which allocates one inside libtorch). A different torch must be checked
// the same way before this number changes.
static_assert(sizeof(c10d::ProcessGroupGloo) == 488,
              "c10d::ProcessGroupGloo's layout differs from torch 2.11.0's: check the Gloo headers against this torch");

#ifdef LIBFT_WITH_NCCL
// Likewise for NCCL (header from the nvidia-nccl wheel torch links): 1112 bytes, from
// ProcessGroupNCCL::split in libtorch_cuda.
static_assert(sizeof(c10d::ProcessGroupNCCL) == 1112,
              "c10d::ProcessGroupNCCL's layout differs from torch 2.11.0's: check nccl.h against this torch");
#endif

namespace ft::dist {

// ---------------------------------------------------------------------------------------------
// Launch environment

namespace {

int parse_int(const EnvLookup& env, const std::string& name, std::optional<int> fallback) {
  const std::optional<std::string> v = env(name);
  if (!v || v->empty()) {
    FT_CHECK(fallback.has_value(), "[dist] environment variable ", name, " is not set");
    return *fallback;
  }
  size_t used = 0;
  int out = 0;
  try {
    out = std::stoi(*v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  FT_CHECK(used == v->size() && used > 0, "[dist] environment variable ", name, "='", *v, "' is not an integer");
  return out;
}

std::string get_string(const EnvLookup& env, const std::string& name, std::optional<std::string> fallback,
                       const std::string& hint) {
  const std::optional<std::string> v = env(name);
  if (v && !v->empty()) return *v;
  FT_CHECK(fallback.has_value(), "[dist] environment variable ", name, " is not set", hint);
  return *fallback;
}

}  // namespace

LaunchEnv parse_launch_env(const EnvLookup& env) {
  LaunchEnv e;
  std::string hint;
  std::optional<std::string> default_addr;
  std::optional<int> default_port;
  if (env("WORLD_SIZE")) {
    e.launcher = "env";
    e.world = parse_int(env, "WORLD_SIZE", std::nullopt);
    e.rank = parse_int(env, "RANK", std::nullopt);
    e.local_rank = parse_int(env, "LOCAL_RANK", e.rank);
    e.local_world = parse_int(env, "LOCAL_WORLD_SIZE", e.world);
    hint = " (torchrun and ft launch set it; set it by hand to rank 0's host and a free port)";
  } else if (env("OMPI_COMM_WORLD_SIZE")) {
    e.launcher = "mpi";
    e.world = parse_int(env, "OMPI_COMM_WORLD_SIZE", std::nullopt);
    e.rank = parse_int(env, "OMPI_COMM_WORLD_RANK", std::nullopt);
    e.local_rank = parse_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0);
    e.local_world = parse_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1);
    hint = " (under mpirun, export it to rank 0's host and a free port: mpirun -x MASTER_ADDR -x MASTER_PORT)";
  } else if (env("SLURM_STEP_NUM_TASKS")) {
    e.launcher = "slurm";
    e.world = parse_int(env, "SLURM_STEP_NUM_TASKS", std::nullopt);
    e.rank = parse_int(env, "SLURM_PROCID", std::nullopt);
    e.local_rank = parse_int(env, "SLURM_LOCALID", 0);
    // "4" or "4(x2)" or "4,2": the first node's count is enough for the GPU choice.
    const std::string per_node = get_string(env, "SLURM_STEP_TASKS_PER_NODE", std::string("1"), "");
    e.local_world = std::max(1, std::atoi(per_node.c_str()));
    default_addr = env("SLURM_LAUNCH_NODE_IPADDR");
    default_port = 29500;
    hint = " (inside srun, export MASTER_ADDR to the first node's address)";
  } else {
    return e;
  }
  e.master_addr = get_string(env, "MASTER_ADDR", default_addr, hint);
  e.master_port = parse_int(env, "MASTER_PORT", default_port);
  e.agent_store = env("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
  e.restart_count = parse_int(env, "TORCHELASTIC_RESTART_COUNT", 0);
  FT_CHECK(e.world >= 1, "[dist] world size ", e.world, " must be at least 1");
  FT_CHECK(e.rank >= 0 && e.rank < e.world, "[dist] rank ", e.rank, " is outside [0, ", e.world, ")");
  FT_CHECK(e.local_rank >= 0 && e.local_world >= 1 && e.local_rank < e.local_world, "[dist] local rank ",
           e.local_rank, " is outside [0, ", e.local_world, ")");
  FT_CHECK(e.master_port >= 1 && e.master_port <= 65535, "[dist] MASTER_PORT ", e.master_port,
           " is outside 1..65535");
  return e;
}

LaunchEnv launch_env() {
  return parse_launch_env([](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (!v) return std::nullopt;
    return std::string(v);
  });
}

int free_local_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  FT_CHECK(fd >= 0, "[dist] socket: ", std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  const int err = errno;
  ::close(fd);
  FT_CHECK(ok, "[dist] cannot find a free port: ", std::strerror(err));
  return ntohs(addr.sin_port);
}

std::string LaunchEnv::describe() const {
  std::ostringstream s;
  s << "rank " << rank << " of " << world << " (local " << local_rank << " of " << local_world << "), store "
    << master_addr << ":" << master_port;
  if (agent_store) s << " (torchrun agent store, attempt " << restart_count << ")";
  s << ", via " << (launcher == "env" ? "torchrun-style environment" : launcher);
  return s.str();
}

// ---------------------------------------------------------------------------------------------
// Collectives

struct Pending::Impl {
  c10::intrusive_ptr<c10d::Work> work;
  int rank = 0;
  std::shared_ptr<std::atomic<bool>> failed;  // the group's: set when this collective fails
};

Pending::Pending() = default;
Pending::~Pending() = default;
Pending::Pending(Pending&&) noexcept = default;
Pending& Pending::operator=(Pending&&) noexcept = default;
Pending::Pending(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

namespace {

// A c10d error's message without its C++ backtrace.
std::string error_text(const std::exception& e) {
  std::string msg = e.what();
  if (const auto* ce = dynamic_cast<const c10::Error*>(&e)) msg = ce->what_without_backtrace();
  return msg.substr(0, msg.find("\nException raised from"));
}

// c10d reports a dead peer, a timeout or a bad message as c10::Error subclasses; the trainer's
// callers expect ft::Error with the rank in it.
[[noreturn]] void rethrow_collective(int rank, const char* what, const std::exception& e) {
  FT_FAIL("[dist] rank ", rank, ": ", what, " failed (a rank exited, hung past the timeout, or lost its "
          "connection): ", error_text(e));
}

}  // namespace

void Pending::wait() {
  if (!impl_ || !impl_->work) return;
  auto work = std::move(impl_->work);
  try {
    work->wait();
  } catch (const std::exception& e) {
    if (impl_->failed) impl_->failed->store(true);
    rethrow_collective(impl_->rank, "all-reduce", e);
  }
}

struct ProcessGroup::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::shared_ptr<std::atomic<bool>> failed = std::make_shared<std::atomic<bool>>(false);
};

ProcessGroup::~ProcessGroup() {
  // After a failure the backend's destructor could wait for collectives that can never finish:
  // leak it instead (the process is about to report the error and end).
  if (impl_ && impl_->failed->load()) (void)impl_->backend.release();
}

void ProcessGroup::abandon() { impl_->failed->store(true); }

std::shared_ptr<ProcessGroup> ProcessGroup::create(const LaunchEnv& env, c10::Device device, const GroupOptions& o) {
  // Gloo writes to its peers' sockets with plain writev: once a peer has died, the next write raises
  // SIGPIPE, whose default action ends this process without a word. (Python ignores SIGPIPE at
  // start-up, which is why torch.distributed never meets this.) Ignored, the write fails with EPIPE
  // and the collective reports the dead peer.
  struct sigaction old_pipe {};
  if (sigaction(SIGPIPE, nullptr, &old_pipe) == 0 && old_pipe.sa_handler == SIG_DFL) signal(SIGPIPE, SIG_IGN);
  std::shared_ptr<ProcessGroup> g(new ProcessGroup());
  g->impl_ = std::make_unique<Impl>();
  g->rank_ = env.rank;
  g->world_ = env.world;
  g->device_ = device;
  g->backend_ = o.backend == "auto" ? (device.is_cuda() ? "nccl" : "gloo") : o.backend;
  FT_CHECK(g->backend_ == "gloo" || g->backend_ == "nccl", "[dist] backend '", o.backend,
           "' is not one of auto, gloo, nccl");
  FT_CHECK(g->backend_ != "nccl" || device.is_cuda(), "[dist] the nccl backend needs a CUDA device (device is ",
           device.str(), "); use gloo on the CPU");
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(env.master_port);
    so.isServer = env.rank == 0 && !env.agent_store;
    if (!env.agent_store) so.numWorkers = static_cast<size_t>(env.world);
    so.waitWorkers = !env.agent_store;
    so.timeout = o.timeout;
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
    if (env.agent_store) {
      store = c10::make_intrusive<c10d::PrefixStore>("/worker/attempt_" + std::to_string(env.restart_count), store);
    }
    g->impl_->store = c10::make_intrusive<c10d::PrefixStore>("libft", store);
  } catch (const std::exception& e) {
    FT_FAIL("[dist] rank ", env.rank, ": the rendezvous at ", env.master_addr, ":", env.master_port, " failed within ",
            o.timeout.count() / 1000.0, " s (are all ", env.world, " ranks started, and is the address reachable?): ",
            error_text(e));
  }
  try {
    if (g->backend_ == "gloo") {
      auto go = c10d::ProcessGroupGloo::Options::create(o.timeout);
      if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname) {
        std::stringstream names(ifname);
        for (std::string name; std::getline(names, name, ',');) {
          go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
        }
      } else {
        go->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
      }
      g->impl_->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(g->impl_->store, env.rank, env.world, go);
    } else {
#ifdef LIBFT_WITH_NCCL
      auto no = c10d::ProcessGroupNCCL::Options::create();
      no->timeout = o.timeout;
      g->impl_->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(g->impl_->store, env.rank, env.world, no);
#else
      FT_FAIL("[dist] this build of libft has no NCCL (it was configured without CUDA)");
#endif
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    rethrow_collective(env.rank, ("setting up " + g->backend_).c_str(), e);
  }
  return g;
}

Pending ProcessGroup::all_reduce_async(at::Tensor& tensor) {
  FT_CHECK(tensor.is_contiguous() && tensor.device() == device_, "[dist] all-reduce needs a contiguous tensor on ",
           device_.str());
  auto impl = std::make_unique<Pending::Impl>();
  impl->rank = rank_;
  impl->failed = impl_->failed;
  std::vector<at::Tensor> ts{tensor};
  run("all-reduce", [&] { impl->work = impl_->backend->allreduce(ts); });
  return Pending(std::move(impl));
}

void ProcessGroup::run(const char* what, const std::function<void()>& collective) {
  try {
    collective();
  } catch (const std::exception& e) {
    abandon();
    rethrow_collective(rank_, what, e);
  }
}

void ProcessGroup::all_reduce(at::Tensor& tensor) { all_reduce_async(tensor).wait(); }

std::vector<double> ProcessGroup::reduce_scalars(const std::vector<double>& values, bool max) {
  if (values.empty()) return {};
  at::Tensor t = at::tensor(values, at::TensorOptions().dtype(at::kDouble)).to(device_);
  std::vector<at::Tensor> ts{t};
  c10d::AllreduceOptions ao;
  ao.reduceOp = max ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
  run(max ? "max-reduce" : "sum-reduce", [&] { impl_->backend->allreduce(ts, ao)->wait(); });
  t = t.cpu();
  return std::vector<double>(t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
}

std::vector<double> ProcessGroup::sum(const std::vector<double>& values) { return reduce_scalars(values, false); }
std::vector<double> ProcessGroup::max(const std::vector<double>& values) { return reduce_scalars(values, true); }

void ProcessGroup::broadcast(at::Tensor& tensor, int root) {
  std::vector<at::Tensor> ts{tensor};
  c10d::BroadcastOptions bo;
  bo.rootRank = root;
  run("broadcast", [&] { impl_->backend->broadcast(ts, bo)->wait(); });
}

std::vector<at::Tensor> ProcessGroup::all_gather(const at::Tensor& tensor) {
  std::vector<at::Tensor> input{tensor.to(device_).contiguous()};
  std::vector<std::vector<at::Tensor>> output(1);
  for (int r = 0; r < world_; ++r) output[0].push_back(at::empty_like(input[0]));
  run("all-gather", [&] { impl_->backend->allgather(output, input)->wait(); });
  std::vector<at::Tensor> out;
  for (auto& t : output[0]) out.push_back(t.cpu());
  return out;
}

void ProcessGroup::barrier() { reduce_scalars({0.0}, false); }

// ---------------------------------------------------------------------------------------------
// Gradient buckets

struct GradientReducer::State {
  struct Bucket {
    std::vector<size_t> params;   // indices into State::params, in the order their gradients arrive
    std::vector<int64_t> offset;  // of each parameter's gradient in `flat`
    int64_t grad_numel = 0;       // flat = [gradients..., one "defined here" flag per parameter]
    at::Tensor flat;
    size_t waiting = 0;  // parameters of this pass whose gradient has not arrived yet
    bool launched = false;
    Pending work;
  };
  std::shared_ptr<ProcessGroup> group;
  std::vector<at::Tensor> params;
  std::vector<size_t> bucket_of;
  std::vector<char> arrived;
  std::vector<Bucket> buckets;
  size_t next = 0;  // buckets launch strictly in index order, so every rank issues the same sequence
  bool sync = false;
  size_t in_backward = 0, last_in_backward = 0;
  std::mutex mu;

  void fill_and_launch(size_t b) {  // with mu held
    Bucket& k = buckets[b];
    std::vector<float> defined(k.params.size());
    for (size_t j = 0; j < k.params.size(); ++j) {
      const at::Tensor& g = params[k.params[j]].grad();
      at::Tensor dst = k.flat.narrow(0, k.offset[j], params[k.params[j]].numel());
      if (g.defined()) {
        dst.copy_(g.reshape({-1}));
      } else {
        dst.zero_();
      }
      defined[j] = g.defined() ? 1.0f : 0.0f;
    }
    k.flat.narrow(0, k.grad_numel, static_cast<int64_t>(defined.size())).copy_(at::tensor(defined));
    k.work = group->all_reduce_async(k.flat);
    k.launched = true;
  }

  void launch_ready() {  // with mu held
    while (next < buckets.size() && buckets[next].waiting == 0) {
      fill_and_launch(next++);
      ++in_backward;
    }
  }

  void on_grad(size_t i) {
    std::lock_guard<std::mutex> lock(mu);
    if (!sync) return;
    FT_CHECK(!arrived[i], "[dist] a gradient arrived twice in one backward pass (parameter ", i,
             "); the bucketed all-reduce cannot handle that");
    arrived[i] = 1;
    Bucket& k = buckets[bucket_of[i]];
    if (--k.waiting == 0) launch_ready();
  }
};

namespace {

class ReadyHook final : public torch::autograd::PostAccumulateGradHook {
 public:
  ReadyHook(std::weak_ptr<GradientReducer::State> state, size_t index) : state_(std::move(state)), index_(index) {}
  void operator()(const torch::autograd::Variable&) override {
    if (auto s = state_.lock()) s->on_grad(index_);
  }

 private:
  std::weak_ptr<GradientReducer::State> state_;
  size_t index_;
};

}  // namespace

GradientReducer::GradientReducer(std::shared_ptr<ProcessGroup> group, std::vector<at::Tensor> params,
                                 int64_t bucket_bytes)
    : state_(std::make_shared<State>()) {
  State& s = *state_;
  s.group = std::move(group);
  s.params = std::move(params);
  s.bucket_of.assign(s.params.size(), 0);
  s.arrived.assign(s.params.size(), 0);
  // Backward produces gradients roughly in the reverse order of the forward pass, i.e. of the
  // parameters' registration: buckets are filled from the last parameter to the first.
  for (size_t r = s.params.size(); r-- > 0;) {
    const at::Tensor& p = s.params[r];
    FT_CHECK(p.requires_grad() && p.is_floating_point(), "[dist] parameter ", r, " is not a trainable float tensor");
    const bool fits = !s.buckets.empty() && s.buckets.back().flat.scalar_type() == p.scalar_type() &&
                      (s.buckets.back().grad_numel + p.numel()) * p.element_size() <= bucket_bytes;
    if (!fits) {
      s.buckets.emplace_back();
      s.buckets.back().flat = at::empty({0}, p.options().requires_grad(false));
    }
    State::Bucket& k = s.buckets.back();
    k.params.push_back(r);
    k.offset.push_back(k.grad_numel);
    k.grad_numel += p.numel();
    s.bucket_of[r] = s.buckets.size() - 1;
  }
  for (auto& k : s.buckets) {
    k.flat = at::zeros({k.grad_numel + static_cast<int64_t>(k.params.size())}, k.flat.options());
  }
  for (size_t i = 0; i < s.params.size(); ++i) {
    torch::autograd::impl::set_post_acc_grad_hooks(s.params[i], std::make_unique<ReadyHook>(state_, i));
  }
}

GradientReducer::~GradientReducer() {
  // Collectives still in flight (only after an error) keep their buffers alive themselves; waiting
  // for them here could wait for a dead peer.
  for (auto& p : state_->params) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
}

void GradientReducer::begin_pass(bool last) {
  std::lock_guard<std::mutex> lock(state_->mu);
  State& s = *state_;
  if (last && !s.sync) {
    std::fill(s.arrived.begin(), s.arrived.end(), 0);
    for (auto& k : s.buckets) {
      k.waiting = k.params.size();
      k.launched = false;
    }
    s.next = 0;
    s.in_backward = 0;
  }
  s.sync = last;
}

void GradientReducer::finish() {
  State& s = *state_;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (!s.sync) {  // no pass was marked last (no backward at all on this rank): start from scratch
      for (auto& k : s.buckets) k.launched = false;
      s.next = 0;
      s.in_backward = 0;
    }
    s.sync = false;
    while (s.next < s.buckets.size()) s.fill_and_launch(s.next++);
    s.last_in_backward = s.in_backward;
  }
  for (auto& k : s.buckets) k.work.wait();
  for (auto& k : s.buckets) {
    const at::Tensor defined = k.flat.narrow(0, k.grad_numel, static_cast<int64_t>(k.params.size())).to(at::kCPU, at::kDouble);
    for (size_t j = 0; j < k.params.size(); ++j) {
      if (defined.data_ptr<double>()[j] == 0.0) continue;  // undefined on every rank
      at::Tensor& p = s.params[k.params[j]];
      const at::Tensor sum = k.flat.narrow(0, k.offset[j], p.numel()).view(p.sizes());
      if (p.grad().defined()) {
        p.mutable_grad().copy_(sum);
      } else {
        p.mutable_grad() = sum.clone();
      }
    }
  }
}

size_t GradientReducer::buckets() const { return state_->buckets.size(); }

int64_t GradientReducer::bytes_per_step() const {
  int64_t b = 0;
  for (const auto& k : state_->buckets) b += k.flat.numel() * k.flat.element_size();
  return b;
}

size_t GradientReducer::launched_in_backward() const { return state_->last_in_backward; }

}  // namespace ft::dist

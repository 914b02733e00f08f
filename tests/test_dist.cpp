// ft/dist: the launcher environment, and the bucketed gradient all-reduce (two ranks as two threads
// of this process over Gloo) against a float64 full-batch gradient.
#include <gtest/gtest.h>

#include <atomic>

#include <map>
#include <thread>

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "ft/dist/dist.h"
#include "test_util.h"

namespace {

using ft::dist::LaunchEnv;

LaunchEnv parse(const std::map<std::string, std::string>& vars) {
  return ft::dist::parse_launch_env([&](const std::string& k) -> std::optional<std::string> {
    auto it = vars.find(k);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  });
}

std::string parse_error(const std::map<std::string, std::string>& vars) {
  return ft::test::error_of([&] { parse(vars); });
}

TEST(LaunchEnv, TorchrunVariables) {
  const LaunchEnv e = parse({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"LOCAL_WORLD_SIZE", "2"},
                             {"MASTER_ADDR", "10.0.0.1"}, {"MASTER_PORT", "29400"}});
  EXPECT_TRUE(e.distributed());
  EXPECT_EQ(e.launcher, "env");
  EXPECT_EQ(e.rank, 3);
  EXPECT_EQ(e.world, 8);
  EXPECT_EQ(e.local_rank, 1);
  EXPECT_EQ(e.local_world, 2);
  EXPECT_EQ(e.master_addr, "10.0.0.1");
  EXPECT_EQ(e.master_port, 29400);
  EXPECT_FALSE(e.agent_store);
  // Under torchrun's agent: every rank a client, keys under /worker/attempt_<restarts>/.
  const LaunchEnv a = parse({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"},
                             {"TORCHELASTIC_USE_AGENT_STORE", "True"}, {"TORCHELASTIC_RESTART_COUNT", "2"}});
  EXPECT_TRUE(a.agent_store);
  EXPECT_EQ(a.restart_count, 2);
  EXPECT_EQ(a.local_rank, 0);  // LOCAL_RANK defaults to RANK
  EXPECT_NE(a.describe().find("attempt 2"), std::string::npos) << a.describe();
  EXPECT_FALSE(parse({}).distributed());
}

TEST(LaunchEnv, SlurmAndMpi) {
  const LaunchEnv s = parse({{"SLURM_STEP_NUM_TASKS", "16"}, {"SLURM_PROCID", "9"}, {"SLURM_LOCALID", "1"},
                             {"SLURM_STEP_TASKS_PER_NODE", "8(x2)"}, {"SLURM_LAUNCH_NODE_IPADDR", "10.1.2.3"},
                             {"SLURM_NTASKS", "16"}});
  EXPECT_EQ(s.launcher, "slurm");
  EXPECT_EQ(s.rank, 9);
  EXPECT_EQ(s.world, 16);
  EXPECT_EQ(s.local_rank, 1);
  EXPECT_EQ(s.local_world, 8);
  EXPECT_EQ(s.master_addr, "10.1.2.3");
  EXPECT_EQ(s.master_port, 29500);
  // sbatch's batch script alone (no srun step) is not a distributed job.
  EXPECT_FALSE(parse({{"SLURM_NTASKS", "16"}, {"SLURM_PROCID", "0"}}).distributed());
  const LaunchEnv m = parse({{"OMPI_COMM_WORLD_SIZE", "4"}, {"OMPI_COMM_WORLD_RANK", "2"},
                             {"OMPI_COMM_WORLD_LOCAL_RANK", "0"}, {"OMPI_COMM_WORLD_LOCAL_SIZE", "1"},
                             {"MASTER_ADDR", "n0"}, {"MASTER_PORT", "29501"}});
  EXPECT_EQ(m.launcher, "mpi");
  EXPECT_EQ(m.rank, 2);
  EXPECT_EQ(m.world, 4);
  EXPECT_NE(parse_error({{"OMPI_COMM_WORLD_SIZE", "4"}, {"OMPI_COMM_WORLD_RANK", "2"}}).find("MASTER_ADDR is not set"),
            std::string::npos);
}

TEST(LaunchEnv, BadValuesAreNamed) {
  const std::map<std::string, std::string> ok = {{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"MASTER_ADDR", "h"},
                                                 {"MASTER_PORT", "29500"}};
  auto with = [&](const std::string& k, const std::string& v) {
    auto m = ok;
    m[k] = v;
    return parse_error(m);
  };
  auto without = [&](const std::string& k) {
    auto m = ok;
    m.erase(k);
    return parse_error(m);
  };
  EXPECT_NE(with("RANK", "2").find("rank 2 is outside [0, 2)"), std::string::npos);
  EXPECT_NE(with("RANK", "x1").find("RANK='x1' is not an integer"), std::string::npos);
  EXPECT_NE(with("MASTER_PORT", "70000").find("MASTER_PORT 70000 is outside"), std::string::npos);
  EXPECT_NE(with("WORLD_SIZE", "0").find("world size 0"), std::string::npos);
  EXPECT_NE(without("RANK").find("RANK is not set"), std::string::npos);
  EXPECT_NE(without("MASTER_PORT").find("MASTER_PORT is not set"), std::string::npos);
  EXPECT_EQ(parse_error(ok), "no error");
}

// Rank `rank` of a `world`-rank job on this machine with its store at 127.0.0.1:`port`.
LaunchEnv local_env(int rank, int world, int port) {
  LaunchEnv env;
  env.launcher = "env";
  env.rank = rank;
  env.world = world;
  env.master_addr = "127.0.0.1";
  env.master_port = port;
  return env;
}

// A two-layer tanh network y = W2 tanh(W1 x + b1) + b2 with a squared loss, plus a parameter that
// never gets a gradient and one that gets one only on rank 0.
struct Net {
  at::Tensor w1, b1, w2, b2, unused, only_rank0;
  // Drawn in float64 and rounded, so the float32 replicas start from the reference's values (rounded).
  explicit Net(at::ScalarType dtype) {
    at::manual_seed(7);
    auto draw = [&](std::vector<int64_t> shape) { return at::randn(shape, at::kDouble).to(dtype).requires_grad_(); };
    unused = draw({3});
    w1 = draw({16, 8});
    b1 = draw({16});
    w2 = draw({4, 16});
    b2 = draw({4});
    only_rank0 = draw({5});
  }
  // Registration order: the reducer fills buckets from the last (the first gradients to arrive).
  std::vector<at::Tensor> params() const { return {unused, w1, b1, w2, b2, only_rank0}; }
  at::Tensor loss_sum(const at::Tensor& x, const at::Tensor& y) const {
    const at::Tensor h = at::tanh(at::matmul(x, w1.t()) + b1);
    return (at::matmul(h, w2.t()) + b2 - y).pow(2).sum();
  }
};

TEST(GradientReducer, TwoRanksSumToTheFullBatchGradient) {
  at::manual_seed(1);
  const at::Tensor x = at::randn({12, 8}, at::kDouble), y = at::randn({12, 4}, at::kDouble);
  const double n = 12.0;
  // float64 reference: the whole batch in one process.
  Net ref(at::kDouble);
  ((ref.loss_sum(x, y) + ref.only_rank0.pow(2).sum()) / n).backward();

  const int port = ft::dist::free_local_port();
  std::vector<std::vector<at::Tensor>> grads(2);
  std::vector<size_t> overlapped(2), buckets(2);
  std::vector<std::string> errors(2);
  // The generator is global: the replicas are made before the threads start.
  std::vector<Net> nets{Net(at::kFloat), Net(at::kFloat)};
  auto rank_main = [&](int rank) {
    try {
      const LaunchEnv env = local_env(rank, 2, port);
      ft::dist::GroupOptions go;
      go.timeout = std::chrono::seconds(60);
      auto group = ft::dist::ProcessGroup::create(env, c10::kCPU, go);
      Net& net = nets[static_cast<size_t>(rank)];
      // Small buckets (about one tensor each), so several launch from the backward pass's hooks.
      ft::dist::GradientReducer reducer(group, net.params(), 16 * 8 * 4);
      // Rows 0-5 on rank 0, 6-11 on rank 1, as two micro-batches each (accumulation: only the second
      // backward pass communicates).
      for (int k = 0; k < 2; ++k) {
        const at::Tensor xs = x.slice(0, rank * 6 + k * 3, rank * 6 + k * 3 + 3).to(at::kFloat);
        const at::Tensor ys = y.slice(0, rank * 6 + k * 3, rank * 6 + k * 3 + 3).to(at::kFloat);
        at::Tensor loss = net.loss_sum(xs, ys);
        if (rank == 0 && k == 1) loss = loss + net.only_rank0.pow(2).sum();
        reducer.begin_pass(k == 1);
        (loss / n).backward();
      }
      reducer.finish();
      for (const auto& p : net.params()) grads[rank].push_back(p.grad());
      overlapped[rank] = reducer.launched_in_backward();
      buckets[rank] = reducer.buckets();
    } catch (const std::exception& e) {
      errors[rank] = e.what();
    }
  };
  std::thread t0(rank_main, 0), t1(rank_main, 1);
  t0.join();
  t1.join();
  ASSERT_EQ(errors[0], "");
  ASSERT_EQ(errors[1], "");
  const auto ref_params = ref.params();
  for (size_t i = 0; i < ref_params.size(); ++i) {
    if (i == 0) {  // `unused`: no gradient on any rank stays no gradient
      EXPECT_FALSE(grads[0][i].defined());
      EXPECT_FALSE(grads[1][i].defined());
      continue;
    }
    ASSERT_TRUE(grads[0][i].defined() && grads[1][i].defined()) << "parameter " << i;
    EXPECT_TRUE(at::equal(grads[0][i], grads[1][i])) << "parameter " << i << ": the ranks disagree";
    const double err = (grads[0][i].to(at::kDouble) - ref_params[i].grad()).abs().max().item<double>();
    const double scale = ref_params[i].grad().abs().max().item<double>();
    EXPECT_LE(err, 1e-6 * scale) << "parameter " << i;
  }
  EXPECT_EQ(buckets[0], 3u);  // [only_rank0, b2, w2, b1], [w1], [unused] at 512 bytes
  // On rank 0 the first two buckets are complete inside the backward pass and start there; `unused`
  // never arrives, so its bucket starts in finish(). Rank 1 never sees only_rank0's gradient and
  // starts every bucket in finish(), in the same order as rank 0.
  EXPECT_EQ(overlapped[0], 2u);
  EXPECT_EQ(overlapped[1], 0u);
}

TEST(ProcessGroup, SumsMaxesAndTimesOut) {
  const int port = ft::dist::free_local_port();
  std::vector<std::string> errors(2);
  std::vector<std::vector<double>> sums(2), maxes(2);
  std::string timeout_error;
  std::atomic<bool> timed_out{false};
  auto rank_main = [&](int rank) {
    try {
      const LaunchEnv env = local_env(rank, 2, port);
      ft::dist::GroupOptions go;
      go.timeout = std::chrono::milliseconds(1500);
      auto group = ft::dist::ProcessGroup::create(env, c10::kCPU, go);
      sums[rank] = group->sum({1.0 + rank, 0.5});
      maxes[rank] = group->max({static_cast<double>(rank), -1.0 * rank});
      at::Tensor t = at::full({3}, static_cast<float>(rank + 1));
      group->broadcast(t, 1);
      EXPECT_TRUE(at::equal(t, at::full({3}, 2.0f)));
      group->barrier();
      // Rank 1 does not take part in the next collective: rank 0 must fail after the timeout. Rank 1
      // keeps its group meanwhile (a peer that is alive but idle, the case the timeout is for; its
      // group destroyed in the same process during rank 0's wait crashed inside Gloo once in a
      // loaded CI run, a teardown race of two groups in one process that one process per rank,
      // as in training, never has).
      if (rank == 0) {
        timeout_error = ft::test::error_of([&] { group->sum({1.0}); });
        timed_out = true;
      } else {
        for (int i = 0; i < 1000 && !timed_out; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    } catch (const std::exception& e) {
      errors[rank] = e.what();
    }
  };
  std::thread t0(rank_main, 0), t1(rank_main, 1);
  t0.join();
  t1.join();
  EXPECT_EQ(errors[0], "");
  EXPECT_EQ(errors[1], "");
  EXPECT_EQ(sums[0], (std::vector<double>{3.0, 1.0}));
  EXPECT_EQ(sums[1], sums[0]);
  EXPECT_EQ(maxes[0], (std::vector<double>{1.0, 0.0}));
  EXPECT_NE(timeout_error.find("[dist] rank 0: sum-reduce failed"), std::string::npos) << timeout_error;
}

TEST(ProcessGroup, UnreachableStoreIsNamed) {
  const LaunchEnv env = local_env(1, 2, ft::dist::free_local_port());  // a client: nobody serves this port
  ft::dist::GroupOptions go;
  go.timeout = std::chrono::milliseconds(1000);
  const std::string e = ft::test::error_of([&] { ft::dist::ProcessGroup::create(env, c10::kCPU, go); });
  EXPECT_NE(e.find("the rendezvous at 127.0.0.1:"), std::string::npos) << e;
}

}  // namespace

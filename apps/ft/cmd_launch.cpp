// ft launch -n N COMMAND...: N processes of this ft on this machine, each with the environment
// torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT), so that `ft launch -n 2 train run.yaml` is `torchrun --nproc-per-node=2 --no-python
// ft train run.yaml` without Python. The launcher forwards SIGINT/SIGTERM to every rank, and when a
// rank fails it stops the others (SIGTERM 2 s later, so that they can report the failure they see
// themselves, then SIGKILL after a grace period) and exits with the failed rank's status: a job
// never keeps running, or hangs, with a rank missing.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "commands.h"
#include "ft/dist/dist.h"
#include "ft/util/error.h"

namespace ft::cli {

namespace {

std::atomic<int> g_launch_signal{0};
extern "C" void on_launch_signal(int sig) { g_launch_signal.store(sig); }

std::string describe_status(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("was killed by signal ") + strsignal(WTERMSIG(status));
  return "stopped";
}

int launch(int n, int port, double grace_s, const std::vector<std::string>& command) {
  FT_CHECK(n >= 1, "[launch] -n must be at least 1");
  FT_CHECK(!command.empty(), "[launch] no command: ft launch -n N train run.yaml");
  if (port == 0) port = dist::free_local_port();
  std::fprintf(stderr, "[launch] %d rank%s of `ft", n, n == 1 ? "" : "s");
  for (const auto& a : command) std::fprintf(stderr, " %s", a.c_str());
  std::fprintf(stderr, "`, store 127.0.0.1:%d\n", port);

  struct sigaction sa {};
  sa.sa_handler = on_launch_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);

  std::vector<pid_t> pids(static_cast<size_t>(n), -1);
  for (int rank = 0; rank < n; ++rank) {
    const pid_t pid = ::fork();
    FT_CHECK(pid >= 0, "[launch] fork: ", std::strerror(errno));
    if (pid == 0) {
      ::setpgid(0, 0);                   // terminal signals reach the launcher only; it forwards them once
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);  // a killed launcher takes its ranks with it
      signal(SIGINT, SIG_DFL);
      signal(SIGTERM, SIG_DFL);
      setenv("RANK", std::to_string(rank).c_str(), 1);
      setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
      setenv("WORLD_SIZE", std::to_string(n).c_str(), 1);
      setenv("LOCAL_WORLD_SIZE", std::to_string(n).c_str(), 1);
      setenv("MASTER_ADDR", "127.0.0.1", 1);
      setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      unsetenv("TORCHELASTIC_USE_AGENT_STORE");
      std::vector<char*> argv;
      std::string self = "ft";
      argv.push_back(self.data());
      std::vector<std::string> args = command;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      ::execv("/proc/self/exe", argv.data());
      std::fprintf(stderr, "[launch] rank %d: exec failed: %s\n", rank, std::strerror(errno));
      ::_exit(127);
    }
    pids[static_cast<size_t>(rank)] = pid;
  }

  using Clock = std::chrono::steady_clock;
  int live = n, result = 0, forwarded = 0;
  bool stopping = false, terminated = false;
  Clock::time_point term_at{}, kill_at{};
  auto signal_all = [&](int sig) {
    for (pid_t p : pids) {
      if (p > 0) ::kill(p, sig);
    }
  };
  while (live > 0) {
    if (const int sig = g_launch_signal.exchange(0)) {
      ++forwarded;
      std::fprintf(stderr, "[launch] %s: forwarding it to the ranks%s\n", strsignal(sig),
                   forwarded > 1 ? " (a second signal stops them at once)" : "");
      signal_all(sig);
    }
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid > 0) {
      for (int rank = 0; rank < n; ++rank) {
        if (pids[static_cast<size_t>(rank)] != pid) continue;
        pids[static_cast<size_t>(rank)] = -1;
        --live;
        const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (!ok && result != 0) std::fprintf(stderr, "[launch] rank %d %s\n", rank, describe_status(status).c_str());
        if (!ok && result == 0) {
          result = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
          if (live > 0) {
            std::fprintf(stderr, "[launch] rank %d %s; stopping the other %d rank%s\n", rank,
                         describe_status(status).c_str(), live, live == 1 ? "" : "s");
            // The others usually see the dead peer within milliseconds and report it themselves;
            // they get a moment for that before SIGTERM, and the grace period before SIGKILL.
            stopping = true;
            term_at = Clock::now() + std::chrono::seconds(2);
            kill_at = term_at + std::chrono::milliseconds(static_cast<int64_t>(grace_s * 1000));
          } else {
            std::fprintf(stderr, "[launch] rank %d %s\n", rank, describe_status(status).c_str());
          }
        }
      }
      continue;
    }
    if (stopping && !terminated && Clock::now() >= term_at) {
      signal_all(SIGTERM);
      terminated = true;
    }
    if (stopping && Clock::now() >= kill_at) {
      std::fprintf(stderr, "[launch] %d rank%s still running %g s after SIGTERM: killing\n", live, live == 1 ? "" : "s",
                   grace_s);
      signal_all(SIGKILL);
      stopping = false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (result == 0) std::fprintf(stderr, "[launch] all %d rank%s finished\n", n, n == 1 ? "" : "s");
  return result;
}

}  // namespace

void add_launch(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "launch", "Run an ft command as N data-parallel processes on this machine (torchrun's environment, no Python)");
  cmd->prefix_command();
  auto n = std::make_shared<int>(1);
  auto port = std::make_shared<int>(0);
  auto grace = std::make_shared<double>(30.0);
  cmd->add_option("-n,--nproc", *n, "processes (ranks); one GPU each when the command trains on CUDA")->required();
  cmd->add_option("--master-port", *port, "TCP store port (default: a free one)");
  cmd->add_option("--grace", *grace, "seconds the other ranks get after their SIGTERM (sent 2 s after one failed), before SIGKILL")->capture_default_str();
  cmd->footer("Example: ft launch -n 2 train configs/train-tiny.yaml\n"
              "Equivalent: torchrun --nproc-per-node=2 --no-python ft train configs/train-tiny.yaml");
  cmd->callback([cmd, n, port, grace] {
    const int rc = launch(*n, *port, *grace, cmd->remaining());
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace ft::cli

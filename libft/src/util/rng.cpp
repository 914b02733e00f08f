#include "ft/util/rng.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/ops/cat.h>

#include <mutex>
#include <vector>

#include "ft/util/error.h"

namespace ft::util {

at::Tensor generator_states(c10::Device device) {
  std::vector<at::Tensor> parts;
  {
    auto cpu = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(cpu.mutex());
    parts.push_back(cpu.get_state());
  }
  if (device.is_cuda()) {
    auto g = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(g.mutex());
    parts.push_back(g.get_state());
  }
  return at::cat(parts);
}

void set_generator_states(const at::Tensor& state, c10::Device device, const std::string& where) {
  auto cpu = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(cpu.mutex());
  const int64_t cpu_bytes = cpu.get_state().numel();
  at::Generator cuda;
  int64_t cuda_bytes = 0;
  if (device.is_cuda()) {
    cuda = at::globalContext().defaultGenerator(device);
    cuda_bytes = cuda.get_state().numel();
  }
  FT_CHECK(state.scalar_type() == at::kByte && state.dim() == 1 && state.numel() == cpu_bytes + cuda_bytes, where,
           ": a generator state of ", state.numel(), " bytes where this process's generators take ",
           cpu_bytes + cuda_bytes, " (resumed on another kind of device?)");
  cpu.set_state(state.narrow(0, 0, cpu_bytes).clone());
  if (cuda_bytes > 0) {
    std::lock_guard<std::mutex> lock_cuda(cuda.mutex());
    cuda.set_state(state.narrow(0, cpu_bytes, cuda_bytes).clone());
  }
}

}  // namespace ft::util

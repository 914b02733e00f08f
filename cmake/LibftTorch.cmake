# Locates LibTorch inside the Python environment that scripts/setup.sh made, so nobody types a path.
#
# An explicit Torch_DIR wins; else the torch of LIBFT_PYTHON (see LibftPython.cmake).
# Also installed with the package: libftConfig.cmake includes it so downstream projects find the
# same torch.
include_guard(GLOBAL)

include(${CMAKE_CURRENT_LIST_DIR}/LibftPython.cmake)

if(NOT Torch_DIR)
  execute_process(
    COMMAND "${LIBFT_PYTHON}" -c "import torch,sys;sys.stdout.write(torch.utils.cmake_prefix_path)"
    OUTPUT_VARIABLE _torch_prefix RESULT_VARIABLE _rc ERROR_QUIET)
  if(NOT _rc EQUAL 0 OR NOT _torch_prefix)
    message(FATAL_ERROR "[libft] cannot import torch with ${LIBFT_PYTHON}. Run scripts/setup.sh, "
                        "or pass -DLIBFT_PYTHON=/path/to/python (with torch==2.11.0) or -DTorch_DIR=...")
  endif()
  list(APPEND CMAKE_PREFIX_PATH "${_torch_prefix}")
endif()

# Torch derives its own nvcc flags from TORCH_CUDA_ARCH_LIST and ignores CMAKE_CUDA_ARCHITECTURES.
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT TORCH_CUDA_ARCH_LIST)
  set(TORCH_CUDA_ARCH_LIST "8.0;9.0")
endif()
# The kineto profiler library is not in the wheel; TorchConfig warns and carries on.
find_package(Torch REQUIRED)

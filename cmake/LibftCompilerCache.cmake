# ccache for C++ and CUDA when available. The sloppiness settings let ccache serve objects built
# with precompiled headers (otherwise every PCH user misses the cache).
include_guard(GLOBAL)
find_program(LIBFT_CCACHE ccache)
if(LIBFT_CCACHE AND NOT CMAKE_CXX_COMPILER_LAUNCHER)
  set(_launcher "${CMAKE_COMMAND};-E;env;CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime;CCACHE_BASEDIR=${CMAKE_SOURCE_DIR};${LIBFT_CCACHE}")
  set(CMAKE_CXX_COMPILER_LAUNCHER "${_launcher}")
  set(CMAKE_CUDA_COMPILER_LAUNCHER "${_launcher}")
endif()

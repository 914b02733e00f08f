# ccache for C++ and CUDA when available. CCACHE_BASEDIR turns the clone's absolute paths into
# relative ones and CCACHE_NOHASHDIR leaves the build folder out of the hash (-g would put it in),
# so a fresh clone elsewhere (CI's) hits the cache. The sloppiness settings let ccache serve
# objects built with precompiled headers.
include_guard(GLOBAL)
find_program(LIBFT_CCACHE ccache)
if(LIBFT_CCACHE AND NOT CMAKE_CXX_COMPILER_LAUNCHER)
  set(_launcher "${CMAKE_COMMAND};-E;env;CCACHE_SLOPPINESS=pch_defines,time_macros,include_file_mtime,include_file_ctime;CCACHE_BASEDIR=${CMAKE_SOURCE_DIR};CCACHE_NOHASHDIR=1;${LIBFT_CCACHE}")
  set(CMAKE_CXX_COMPILER_LAUNCHER "${_launcher}")
  set(CMAKE_CUDA_COMPILER_LAUNCHER "${_launcher}")
endif()

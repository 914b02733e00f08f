# Data pipeline benchmark (token store + batcher). Torch-free: links ft_data only.
if(NOT TARGET benchmark::benchmark)
  find_package(benchmark REQUIRED)
endif()
add_executable(bench_data ${CMAKE_CURRENT_LIST_DIR}/bench_data.cpp)
target_link_libraries(bench_data PRIVATE ft_data benchmark::benchmark)
target_compile_options(bench_data PRIVATE -Wall -Wextra)

# ft prepare's throughput against raw sentencepiece encoding (torch-free too).
add_executable(bench_prepare ${CMAKE_CURRENT_LIST_DIR}/bench_prepare.cpp)
target_link_libraries(bench_prepare PRIVATE ft_data benchmark::benchmark)

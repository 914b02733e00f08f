# libFuzzer target for the JSONL record readers (fuzz_jsonl.cpp), included from CMakeLists.txt here,
# which sets _fuzz_flags. As for fuzz_safetensors, the library sources are compiled into the fuzzer so
# that they carry the coverage instrumentation.
set(LIBFT_FUZZ_JSONL_SECONDS 30 CACHE STRING "How long the fuzz_jsonl ctest test runs")

add_executable(fuzz_jsonl ${CMAKE_CURRENT_LIST_DIR}/fuzz_jsonl.cpp
  ${PROJECT_SOURCE_DIR}/libft/src/data/jsonl.cpp
  ${PROJECT_SOURCE_DIR}/libft/src/data/records.cpp
  ${PROJECT_SOURCE_DIR}/libft/src/data/chat_template.cpp
  ${PROJECT_SOURCE_DIR}/libft/src/data/example.cpp)
target_include_directories(fuzz_jsonl PRIVATE ${PROJECT_SOURCE_DIR}/libft/include ${PROJECT_SOURCE_DIR}/libft/src/data)
target_link_libraries(fuzz_jsonl PRIVATE nlohmann_json::nlohmann_json)
target_compile_options(fuzz_jsonl PRIVATE ${_fuzz_flags} -Wall -Wextra)
target_link_options(fuzz_jsonl PRIVATE ${_fuzz_flags})

# Bounded run seeded from tests/data/jsonl (real records in every format plus a file of broken ones).
add_test(NAME fuzz_jsonl
  COMMAND ${CMAKE_COMMAND}
    -DFUZZER=$<TARGET_FILE:fuzz_jsonl>
    -DSEEDS=${PROJECT_SOURCE_DIR}/tests/data/jsonl
    -DWORK=${CMAKE_CURRENT_BINARY_DIR}/fuzz_jsonl_run
    -DSECONDS=${LIBFT_FUZZ_JSONL_SECONDS}
    -DDICT=${CMAKE_CURRENT_LIST_DIR}/jsonl.dict
    -P ${CMAKE_CURRENT_LIST_DIR}/run_fuzz.cmake)
math(EXPR _fuzz_jsonl_timeout "${LIBFT_FUZZ_JSONL_SECONDS} + 120")
set_tests_properties(fuzz_jsonl PROPERTIES LABELS fuzz TIMEOUT ${_fuzz_jsonl_timeout}
  ENVIRONMENT "ASAN_OPTIONS=halt_on_error=1:detect_leaks=1;UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1")

# Runs a libFuzzer binary for a bounded time on a scratch copy of the seed corpus; fails on a crash.
#   cmake -DFUZZER=<binary> -DSEEDS=<dir> -DWORK=<scratch dir> -DSECONDS=<n> [-DDICT=<file>] -P run_fuzz.cmake
# The fuzzer adds the inputs it finds to its corpus directory, so it gets a copy in the build tree and
# never the source tree. Crash inputs land in WORK/artifacts.
foreach(var FUZZER SEEDS WORK SECONDS)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_fuzz.cmake: -D${var}=... is required")
  endif()
endforeach()

file(REMOVE_RECURSE "${WORK}")
file(MAKE_DIRECTORY "${WORK}/corpus" "${WORK}/artifacts")
# good/x and bad/x may share a name: prefix each copy with its folder.
file(GLOB_RECURSE seeds RELATIVE "${SEEDS}" "${SEEDS}/*")
list(LENGTH seeds n_seeds)
foreach(seed IN LISTS seeds)
  string(REPLACE "/" "__" flat "${seed}")
  file(COPY_FILE "${SEEDS}/${seed}" "${WORK}/corpus/${flat}")
endforeach()

set(args -max_total_time=${SECONDS} -rss_limit_mb=2048 -timeout=20 -max_len=65536 -print_final_stats=1
         -artifact_prefix=${WORK}/artifacts/)
if(DICT)
  list(APPEND args -dict=${DICT})
endif()
message(STATUS "fuzzing ${SECONDS}s from ${n_seeds} seeds in ${SEEDS}")
execute_process(COMMAND "${FUZZER}" ${args} "${WORK}/corpus" WORKING_DIRECTORY "${WORK}" RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  file(GLOB crashes "${WORK}/artifacts/*")
  message(FATAL_ERROR "fuzzer failed (exit ${rc}); reproducer(s): ${crashes}\n"
                      "Re-run one with: ${FUZZER} <file>")
endif()

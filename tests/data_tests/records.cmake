# Record readers: stand-in encoder cases, bad-input cases, and cases with a trained sentencepiece model.
target_sources(ft_data_tests PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/test_records.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_records_errors.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_records_tokenizer.cpp)
# The JSON parser's unit tests include the internal header libft/src/data/jsonl.h.
target_include_directories(ft_data_tests PRIVATE ${PROJECT_SOURCE_DIR}/libft/src/data)

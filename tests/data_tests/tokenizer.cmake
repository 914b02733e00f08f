# Tokenizer tests (test_tokenizer.cpp) and the parity check against Python sentencepiece and
# transformers (tests/python/tokenizer_reference.py). The parity runs as three ctest steps, in order:
#   tokenizer_parity_train    libft trains tokenizer_parity/tokenizer.model   FIXTURES_SETUP tok_libft_model
#   tokenizer_parity_python   Python encodes real text with it                FIXTURES_SETUP tok_python_reference
#   tokenizer_parity_compare  libft's ids, decodes and framing must match     FIXTURES_REQUIRED both
# Everything is written under the build tree. gtest_discover_tests (tests/CMakeLists.txt) also lists
# the two TokenizerParity cases; run there without LIBFT_TOKENIZER_PARITY_DIR they report as skipped.
target_sources(ft_data_tests PRIVATE ${CMAKE_CURRENT_LIST_DIR}/test_tokenizer.cpp)
target_link_libraries(ft_data_tests PRIVATE nlohmann_json::nlohmann_json)

set(_tok_parity_dir "${CMAKE_CURRENT_BINARY_DIR}/tokenizer_parity")
set(_tok_parity_env
  "LIBFT_TOKENIZER_PARITY_DIR=${_tok_parity_dir};LIBFT_TEST_DATA=${CMAKE_CURRENT_SOURCE_DIR}/data;LIBFT_DATA_TEST_TMP=${CMAKE_CURRENT_BINARY_DIR}/data_tmp")
set(_tok_python_ok FALSE)
if(LIBFT_PYTHON)
  execute_process(COMMAND "${LIBFT_PYTHON}" -c "import sentencepiece, transformers, tokenizers"
                  RESULT_VARIABLE _tok_rc OUTPUT_QUIET ERROR_QUIET)
  if(_tok_rc EQUAL 0)
    set(_tok_python_ok TRUE)
  endif()
endif()

if(_tok_python_ok)
  add_test(NAME tokenizer_parity_train COMMAND ft_data_tests "--gtest_filter=TokenizerParity.TrainModel")
  add_test(NAME tokenizer_parity_python
           COMMAND "${LIBFT_PYTHON}" "${CMAKE_CURRENT_SOURCE_DIR}/python/tokenizer_reference.py" "${_tok_parity_dir}")
  add_test(NAME tokenizer_parity_compare COMMAND ft_data_tests "--gtest_filter=TokenizerParity.MatchesPython")
  set_tests_properties(tokenizer_parity_train tokenizer_parity_compare PROPERTIES
    LABELS "data;interop" ENVIRONMENT "${_tok_parity_env}"
    # The filter matching nothing would pass silently, and a skip would not be a pass.
    FAIL_REGULAR_EXPRESSION "\\[  SKIPPED \\]|0 tests from 0 test suites")
  set_tests_properties(tokenizer_parity_train PROPERTIES FIXTURES_SETUP tok_libft_model)
  set_tests_properties(tokenizer_parity_python PROPERTIES LABELS "python;interop"
    FIXTURES_REQUIRED tok_libft_model FIXTURES_SETUP tok_python_reference)
  set_tests_properties(tokenizer_parity_compare PROPERTIES
    FIXTURES_REQUIRED "tok_libft_model;tok_python_reference")
else()
  message(WARNING "[libft] tokenizer parity: '${LIBFT_PYTHON}' cannot import sentencepiece, transformers and "
                  "tokenizers, so the Python parity steps are not registered. Run scripts/setup.sh (or "
                  "pip install -r scripts/requirements.txt) or pass -DLIBFT_PYTHON=/path/to/python.")
endif()

# tokenizer.json's BPE against Hugging Face tokenizers (test_bpe.cpp): the Python step trains three
# byte-level tokenizers (Llama 3, Qwen2, GPT-2 layouts), writes four sentencepiece-style ones from the
# tokenizer.model libft trains above (Llama 2 as transformers 5 saves it, Llama 2's older layout,
# Metaspace with split, Gemma's layout) and records transformers' encodings.
target_sources(ft_data_tests PRIVATE ${CMAKE_CURRENT_LIST_DIR}/test_bpe.cpp)
if(_tok_python_ok)
  set(_bpe_dir "${CMAKE_CURRENT_BINARY_DIR}/bpe_reference")
  add_test(NAME bpe_reference_python
           COMMAND "${LIBFT_PYTHON}" "${CMAKE_CURRENT_SOURCE_DIR}/python/bpe_reference.py" "${_bpe_dir}"
                   "${_tok_parity_dir}/tokenizer.model")
  set_tests_properties(bpe_reference_python PROPERTIES LABELS "python;interop" FIXTURES_SETUP bpe_reference
    FIXTURES_REQUIRED tok_libft_model)
  add_test(NAME bpe_parity COMMAND ft_data_tests "--gtest_filter=BpeParity.*")
  set_tests_properties(bpe_parity PROPERTIES LABELS "data;interop" FIXTURES_REQUIRED bpe_reference
    ENVIRONMENT "LIBFT_BPE_REFERENCE_DIR=${_bpe_dir}"
    FAIL_REGULAR_EXPRESSION "\\[  SKIPPED \\]|0 tests from 0 test suites")
endif()

# Checkpoints' own chat templates (test_chat_jinja.cpp): the Python step renders the same templates
# with jinja2 as transformers configures it and tokenizes conversations with apply_chat_template,
# using the BPE tokenizers above and the sentencepiece model of the parity steps.
target_sources(ft_data_tests PRIVATE ${CMAKE_CURRENT_LIST_DIR}/test_chat_jinja.cpp)
if(_tok_python_ok)
  set(_chat_dir "${CMAKE_CURRENT_BINARY_DIR}/chat_reference")
  add_test(NAME chat_reference_python
           COMMAND "${LIBFT_PYTHON}" "${CMAKE_CURRENT_SOURCE_DIR}/python/chat_template_reference.py" "${_chat_dir}"
                   "${_bpe_dir}" "${_tok_parity_dir}/tokenizer.model")
  set_tests_properties(chat_reference_python PROPERTIES LABELS "python;interop"
    FIXTURES_REQUIRED "bpe_reference;tok_libft_model" FIXTURES_SETUP chat_reference)
  add_test(NAME chat_template_parity COMMAND ft_data_tests "--gtest_filter=ChatTemplateParity.*")
  set_tests_properties(chat_template_parity PROPERTIES LABELS "data;interop" FIXTURES_REQUIRED chat_reference
    ENVIRONMENT "LIBFT_CHAT_REFERENCE_DIR=${_chat_dir};LIBFT_DATA_TEST_TMP=${CMAKE_CURRENT_BINARY_DIR}/data_tmp"
    FAIL_REGULAR_EXPRESSION "\\[  SKIPPED \\]|0 tests from 0 test suites")
endif()

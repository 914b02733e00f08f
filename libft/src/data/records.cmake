# Record readers: text files, JSONL text / instruction / chat, chat templates, exact label masks.
# tokenizer_encoder.cpp is the only one that calls into the sentencepiece Tokenizer.
target_sources(ft_data PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/records.cpp
  ${CMAKE_CURRENT_LIST_DIR}/jsonl.cpp
  ${CMAKE_CURRENT_LIST_DIR}/chat_template.cpp
  ${CMAKE_CURRENT_LIST_DIR}/jinja.cpp
  ${CMAKE_CURRENT_LIST_DIR}/chat_model_template.cpp
  ${CMAKE_CURRENT_LIST_DIR}/tokenizer_encoder.cpp)

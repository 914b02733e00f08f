# sentencepiece tokenizer (load, encode/decode, train).
target_sources(ft_data PRIVATE ${CMAKE_CURRENT_LIST_DIR}/tokenizer.cpp)
# Training lives in a second library. Debian's sentencepiece.pc happens to list it, but the .pc files
# of other builds (and older Debian ones) name only -lsentencepiece, so it is found explicitly.
find_library(LIBFT_SENTENCEPIECE_TRAIN_LIBRARY NAMES sentencepiece_train
             HINTS ${SENTENCEPIECE_LIBRARY_DIRS} REQUIRED)
# The trainer library before the one it depends on, for static archives.
target_link_libraries(ft_data PRIVATE ${LIBFT_SENTENCEPIECE_TRAIN_LIBRARY} PkgConfig::SENTENCEPIECE)
# SHA-256 for Tokenizer::fingerprint(): libcrypto from pkg-config (src/data/CMakeLists.txt).
# libhdf5-dev already depends on libssl-dev, so this adds no package to scripts/setup.sh.
target_link_libraries(ft_data PRIVATE PkgConfig::LIBFT_CRYPTO)

# sentencepiece tokenizer (load, encode/decode, train).
target_sources(ft_data PRIVATE ${CMAKE_CURRENT_LIST_DIR}/tokenizer.cpp ${CMAKE_CURRENT_LIST_DIR}/bpe.cpp)
# tokenizer.json's byte-level BPE: PCRE2 runs the file's own pre-tokenizer pattern (Unicode
# properties, lookahead: beyond std::regex), utf8proc its NFC normaliser (Qwen's). Both small,
# long-maintained Debian libraries, found through pkg-config like the others.
pkg_check_modules(LIBFT_PCRE2 REQUIRED IMPORTED_TARGET GLOBAL libpcre2-8)
pkg_check_modules(LIBFT_UTF8PROC REQUIRED IMPORTED_TARGET GLOBAL libutf8proc)
target_link_libraries(ft_data PRIVATE PkgConfig::LIBFT_PCRE2 PkgConfig::LIBFT_UTF8PROC)
# Training lives in a second library. Debian's sentencepiece.pc happens to list it, but the .pc files
# of other builds (and older Debian ones) name only -lsentencepiece, so it is found explicitly.
find_library(LIBFT_SENTENCEPIECE_TRAIN_LIBRARY NAMES sentencepiece_train
             HINTS ${SENTENCEPIECE_LIBRARY_DIRS} REQUIRED)
# The trainer library before the one it depends on, for static archives.
target_link_libraries(ft_data PRIVATE ${LIBFT_SENTENCEPIECE_TRAIN_LIBRARY} PkgConfig::SENTENCEPIECE)
# SHA-256 for Tokenizer::fingerprint(): libcrypto from pkg-config (src/data/CMakeLists.txt).
# libhdf5-dev already depends on libssl-dev, so this adds no package to scripts/setup.sh.
target_link_libraries(ft_data PRIVATE PkgConfig::LIBFT_CRYPTO)

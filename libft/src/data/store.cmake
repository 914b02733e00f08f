# Token store (HDF5) and batcher: ft/data/token_store.h, ft/data/batcher.h.
# HDF5 (C API only, Debian's serial build) and OpenSSL's libcrypto (SHA-256 of the checksum sidecar;
# libhdf5-dev depends on libssl-dev and HDF5 links libcrypto anyway) stay PRIVATE: no public header
# includes them. Both come from pkg-config (src/data/CMakeLists.txt).
target_sources(ft_data PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/token_store.cpp
  ${CMAKE_CURRENT_LIST_DIR}/batcher.cpp
  ${CMAKE_CURRENT_LIST_DIR}/array_file.cpp)
target_link_libraries(ft_data PRIVATE PkgConfig::LIBFT_HDF5 PkgConfig::LIBFT_CRYPTO)

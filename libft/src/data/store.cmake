# Token store (HDF5) and batcher: ft/data/token_store.h, ft/data/batcher.h.
# HDF5 (C API only; FindHDF5 gives Debian's serial build) and OpenSSL's libcrypto (SHA-256 of the
# checksum sidecar; libhdf5-dev depends on libssl-dev and HDF5 links libcrypto anyway) stay PRIVATE:
# no public header includes them. ft_data is static, so CMake still puts both on the link line of
# whatever links ft_data, as plain library paths (nothing for an installed consumer to find_package).
find_package(OpenSSL REQUIRED COMPONENTS Crypto)
target_sources(ft_data PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/token_store.cpp
  ${CMAKE_CURRENT_LIST_DIR}/batcher.cpp)
target_include_directories(ft_data SYSTEM PRIVATE ${HDF5_C_INCLUDE_DIRS} ${OPENSSL_INCLUDE_DIR})
target_compile_definitions(ft_data PRIVATE ${HDF5_C_DEFINITIONS})
target_link_libraries(ft_data PRIVATE ${HDF5_C_LIBRARIES} ${OPENSSL_CRYPTO_LIBRARY})

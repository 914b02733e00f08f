# Token store and batcher tests. The store tests also open stores with HDF5's C API directly (to
# find a chunk's file offset for the Fletcher32 test), so they need HDF5's headers and library.
target_sources(ft_data_tests PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/test_token_store.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_batcher.cpp
  ${CMAKE_CURRENT_LIST_DIR}/test_array_file.cpp)
target_link_libraries(ft_data_tests PRIVATE PkgConfig::LIBFT_HDF5)

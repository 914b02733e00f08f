#pragma once
// A tensor as rows for the elementwise kernels (kernels/swiglu.cu): its last dimension contiguous
// (stride 1) and its leading dimensions collapsible into one, so that element (i, j) sits at
// i · ld + j. Contiguous tensors are such rows (ld = the last size), and so are column slices of
// them: the halves of a packed [gate | up] (…, 2·I) tensor are (…, I) rows with ld = 2·I.
// Host-only arithmetic on sizes and strides, tested on the CPU (RowsView.*), and the grid the row
// kernels launch.
#include <algorithm>
#include <cstdint>

namespace ft::kernels::detail {

struct RowsView {
  int64_t rows = 0;  ///< product of the leading sizes (1 for a vector)
  int64_t cols = 0;  ///< the last size
  int64_t ld = 0;    ///< elements from one row's start to the next's
};

/// The rows that sizes/strides describe, or false where they are not rows: the last dimension
/// strided, or leading dimensions that do not collapse into one stride. Dimensions of size 1 are
/// ignored (their strides do not matter), as are the strides of empty tensors. Sizes: any sequence
/// of int64_t with size() and [] (std::vector, c10::IntArrayRef: no copy of a tensor's sizes).
template <typename Sizes>
bool as_rows(const Sizes& sizes, const Sizes& strides, RowsView& out) {
  if (sizes.empty() || sizes.size() != strides.size()) return false;
  const size_t n = sizes.size();
  out.cols = sizes[n - 1];
  out.rows = 1;
  for (size_t d = 0; d + 1 < n; ++d) out.rows *= sizes[d];
  if (out.rows == 0 || out.cols == 0) {
    out.ld = out.cols;
    return true;
  }
  if (out.cols > 1 && strides[n - 1] != 1) return false;
  // Walk the leading dimensions from the innermost: each of size > 1 must step by the rows inside it.
  int64_t ld = -1, inner_rows = 1;  // ld: the row stride, fixed by the innermost leading dimension of size > 1
  for (size_t d = n - 1; d-- > 0;) {
    if (sizes[d] == 1) continue;
    if (ld < 0) {
      ld = strides[d];
      if (ld < out.cols) return false;  // rows that overlap
    } else if (strides[d] != ld * inner_rows) {
      return false;
    }
    inner_rows *= sizes[d];
  }
  out.ld = ld < 0 ? out.cols : ld;
  return true;
}

/// as_rows for a tensor's sizes and strides.
template <typename Tensor>
bool tensor_rows(const Tensor& t, RowsView& out) {
  return as_rows(t.sizes(), t.strides(), out);
}

/// Where a thread of a row kernel stands: blockIdx.x, blockIdx.y, gridDim.x, gridDim.y, threadIdx.x,
/// blockDim.x (on the host, a test walks every one of them).
struct ThreadAt {
  int64_t bx, by, gx, gy, tx, bdx;
};

/// The grid of a row kernel: x blocks of `threads` over a row's `items` (columns, or vectors of
/// them), y blocks over rows, about `max_blocks` in all (16 per SM of an H100 by default) and y
/// within CUDA's 65535. Each block strides over the rows and items that the grid does not cover.
struct RowsGrid {
  int64_t x = 1, y = 1;
};
inline RowsGrid rows_grid(int64_t rows, int64_t items, int64_t threads, int64_t max_blocks = 132 * 16) {
  RowsGrid g;
  g.x = std::max<int64_t>(1, std::min<int64_t>((items + threads - 1) / threads, max_blocks));
  g.y = std::max<int64_t>(1, std::min<int64_t>({rows, int64_t{65535}, std::max<int64_t>(1, max_blocks / g.x)}));
  return g;
}

#if defined(__CUDACC__)
/// rows_grid as a launch's dim3.
inline dim3 rows_dim3(int64_t rows, int64_t items, int64_t threads) {
  const RowsGrid g = rows_grid(rows, items, threads);
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y));
}
#endif

}  // namespace ft::kernels::detail

#include "ft/train/batch.h"

#include <algorithm>
#include <numeric>

#include "ft/model/llama.h"
#include "ft/util/error.h"

namespace ft::train {

namespace {

template <typename T>
void check_size(const std::vector<T>& values, const data::Batch& b, const char* name) {
  FT_CHECK(static_cast<int64_t>(values.size()) == b.rows * b.cols, "[train] batch of step ", b.step, ": ", name,
           " has ", values.size(), " values, expected rows × cols = ", b.rows, " × ", b.cols);
}

}  // namespace

int64_t BatchTensors::tokens() const {
  if (n_tokens >= 0) return n_tokens;
  return attention_mask.defined() ? attention_mask.sum().item<int64_t>() : input_ids.numel();
}

std::optional<bool> BatchTensors::padding() const {
  if (!attention_mask.defined()) return false;  // no mask: every position is a token
  if (n_tokens < 0) return std::nullopt;
  return n_tokens < attention_mask.numel();
}

BatchTensors to_tensors(const data::Batch& batch, c10::Device device) {
  FT_CHECK(batch.rows > 0 && batch.cols > 0, "[train] batch of step ", batch.step, " is empty (", batch.rows, " × ",
           batch.cols, ")");
  check_size(batch.input_ids, batch, "input_ids");
  check_size(batch.labels, batch, "labels");
  check_size(batch.position_ids, batch, "position_ids");
  check_size(batch.segment_ids, batch, "segment_ids");
  check_size(batch.attention_mask, batch, "attention_mask");
  const int64_t n = batch.rows * batch.cols;
  at::Tensor host = at::empty({5, batch.rows, batch.cols},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(device.is_cuda()));
  int64_t* out = host.data_ptr<int64_t>();
  std::copy(batch.input_ids.begin(), batch.input_ids.end(), out);
  std::copy(batch.labels.begin(), batch.labels.end(), out + n);
  std::copy(batch.position_ids.begin(), batch.position_ids.end(), out + 2 * n);
  std::copy(batch.segment_ids.begin(), batch.segment_ids.end(), out + 3 * n);
  std::copy(batch.attention_mask.begin(), batch.attention_mask.end(), out + 4 * n);
  BatchTensors t;
  // The counts from the host arrays, as count_targets() and the mask's sum would give them.
  t.n_tokens = 0;
  for (int64_t r = 0; r < batch.rows; ++r) {
    int64_t targets = 0, tokens = 0, max_position = batch.position_ids[r * batch.cols];
    for (int64_t c = 0; c < batch.cols; ++c) {
      if (c > 0 && batch.labels[r * batch.cols + c] != data::kIgnoreIndex) ++targets;
      tokens += batch.attention_mask[r * batch.cols + c] != 0;
      max_position = std::max(max_position, batch.position_ids[r * batch.cols + c]);
    }
    t.row_targets.push_back(targets);
    t.row_tokens.push_back(tokens);
    t.row_max_positions.push_back(max_position);
    std::vector<int32_t> runs;  // the row's runs of equal segment ids
    const int32_t* seg = batch.segment_ids.data() + r * batch.cols;
    for (int64_t c = 0; c < batch.cols; ++c) {
      if (c == 0 || seg[c] != seg[c - 1]) runs.push_back(0);
      ++runs.back();
    }
    t.row_runs.push_back(std::move(runs));
    t.n_targets += targets;
    t.n_tokens += tokens;
  }
  const at::Tensor all = device.is_cpu() ? host : host.to(device, /*non_blocking=*/true);
  t.input_ids = all[0];
  t.labels = all[1];
  t.position_ids = all[2];
  t.segment_ids = all[3];
  t.attention_mask = all[4];
  return t;
}

std::vector<BatchTensors> split_rows(const BatchTensors& b, int64_t rows) {
  FT_CHECK(rows > 0, "[train] split_rows: rows must be > 0");
  const int64_t n = b.input_ids.size(0);
  if (rows >= n) return {b};
  std::vector<BatchTensors> out;
  for (int64_t start = 0; start < n; start += rows) {
    const int64_t end = std::min(n, start + rows);
    BatchTensors p;
    p.input_ids = b.input_ids.slice(0, start, end);
    p.labels = b.labels.slice(0, start, end);
    p.position_ids = b.position_ids.slice(0, start, end);
    p.segment_ids = b.segment_ids.slice(0, start, end);
    p.attention_mask = b.attention_mask.slice(0, start, end);
    if (static_cast<int64_t>(b.row_targets.size()) == n && static_cast<int64_t>(b.row_tokens.size()) == n) {
      p.row_targets.assign(b.row_targets.begin() + start, b.row_targets.begin() + end);
      p.row_tokens.assign(b.row_tokens.begin() + start, b.row_tokens.begin() + end);
      p.n_targets = std::accumulate(p.row_targets.begin(), p.row_targets.end(), int64_t{0});
      p.n_tokens = std::accumulate(p.row_tokens.begin(), p.row_tokens.end(), int64_t{0});
    } else {
      p.n_targets = count_targets(p.labels);
    }
    if (static_cast<int64_t>(b.row_runs.size()) == n) p.row_runs.assign(b.row_runs.begin() + start, b.row_runs.begin() + end);
    if (static_cast<int64_t>(b.row_max_positions.size()) == n) {
      p.row_max_positions.assign(b.row_max_positions.begin() + start, b.row_max_positions.begin() + end);
    }
    out.push_back(std::move(p));
  }
  return out;
}

int64_t varlen_runs(const BatchTensors& b) {
  const int64_t rows = b.input_ids.defined() ? b.input_ids.size(0) : 0;
  if (rows == 0 || static_cast<int64_t>(b.row_runs.size()) != rows) return 0;
  int64_t n = 0;
  for (const auto& runs : b.row_runs) n += static_cast<int64_t>(runs.size());
  return n;
}

std::pair<at::Tensor, int64_t> varlen_offsets(const BatchTensors& b, c10::Device device, int64_t runs) {
  const int64_t n = varlen_runs(b);
  if (n == 0) return {at::Tensor(), 0};
  FT_CHECK(runs <= 0 || runs >= n, "[train] varlen_offsets: ", runs, " runs asked, the batch has ", n);
  const int64_t entries = std::max(n, runs) + 1;
  const int64_t cols = b.input_ids.size(1);
  at::Tensor host = at::empty({entries}, at::TensorOptions().dtype(at::kInt).pinned_memory(device.is_cuda()));
  int32_t* out = host.data_ptr<int32_t>();
  int64_t at = 0, longest = 0;
  *out++ = 0;
  for (const auto& row_runs : b.row_runs) {
    int64_t row = 0;
    for (const int32_t len : row_runs) {
      row += len;
      longest = std::max<int64_t>(longest, len);
      *out++ = static_cast<int32_t>(at + row);
    }
    FT_CHECK(row == cols, "[train] varlen_offsets: a row's runs cover ", row, " tokens, the batch has ", cols, " columns");
    at += cols;
  }
  for (int64_t i = n + 1; i < entries; ++i) *out++ = static_cast<int32_t>(at);  // empty runs
  return {device.is_cpu() ? host : host.to(device, /*non_blocking=*/true), longest};
}

int64_t count_targets(const at::Tensor& labels, int64_t ignore_index) {
  FT_CHECK(labels.dim() == 2, "[train] labels must be (B, T), got ", labels.sizes());
  return labels.slice(1, 1).ne(ignore_index).sum().item<int64_t>();
}

at::Tensor causal_lm_loss_sum(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  return model::causal_lm_loss_sum(logits, labels, ignore_index);
}

}  // namespace ft::train

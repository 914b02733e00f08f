#include "ft/train/batch.h"

#include "ft/model/llama.h"
#include "ft/util/error.h"

namespace ft::train {

namespace {

template <typename T>
at::Tensor as_long_tensor(const std::vector<T>& values, const data::Batch& b, const char* name) {
  FT_CHECK(static_cast<int64_t>(values.size()) == b.rows * b.cols, "[train] batch of step ", b.step, ": ", name,
           " has ", values.size(), " values, expected rows × cols = ", b.rows, " × ", b.cols);
  // from_blob borrows the vector; the conversion to int64 (or clone) makes the tensor own its data.
  constexpr auto dtype = std::is_same_v<T, int64_t>   ? at::kLong
                         : std::is_same_v<T, int32_t> ? at::kInt
                                                      : at::kByte;
  at::Tensor view = at::from_blob(const_cast<T*>(values.data()), {b.rows, b.cols}, at::TensorOptions().dtype(dtype));
  return dtype == at::kLong ? view.clone() : view.to(at::kLong);
}

}  // namespace

BatchTensors to_tensors(const data::Batch& batch, c10::Device device) {
  FT_CHECK(batch.rows > 0 && batch.cols > 0, "[train] batch of step ", batch.step, " is empty (", batch.rows, " × ",
           batch.cols, ")");
  BatchTensors t;
  t.input_ids = as_long_tensor(batch.input_ids, batch, "input_ids").to(device);
  t.labels = as_long_tensor(batch.labels, batch, "labels").to(device);
  t.position_ids = as_long_tensor(batch.position_ids, batch, "position_ids").to(device);
  t.segment_ids = as_long_tensor(batch.segment_ids, batch, "segment_ids").to(device);
  t.attention_mask = as_long_tensor(batch.attention_mask, batch, "attention_mask").to(device);
  t.n_targets = count_targets(t.labels);
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
    p.n_targets = count_targets(p.labels);
    out.push_back(std::move(p));
  }
  return out;
}

int64_t count_targets(const at::Tensor& labels, int64_t ignore_index) {
  FT_CHECK(labels.dim() == 2, "[train] labels must be (B, T), got ", labels.sizes());
  return labels.slice(1, 1).ne(ignore_index).sum().item<int64_t>();
}

at::Tensor causal_lm_loss_sum(const at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index) {
  return model::causal_lm_loss_sum(logits, labels, ignore_index);
}

}  // namespace ft::train

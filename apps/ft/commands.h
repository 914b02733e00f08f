#pragma once
// Each `ft` subcommand lives in its own file and registers itself on the root app: adding one is
// a new file plus one line in main.cpp.
#include <CLI/CLI.hpp>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <functional>
#include <string>
#include <vector>

namespace ft::cli {

void add_init(CLI::App& app);
void add_inspect(CLI::App& app);
void add_generate(CLI::App& app);
void add_prepare(CLI::App& app);
void add_train_tokenizer(CLI::App& app);
void add_train(CLI::App& app);
void add_batches(CLI::App& app);
void add_merge(CLI::App& app);
void add_check_adapter(CLI::App& app);
void add_eval(CLI::App& app);
void add_fisher(CLI::App& app);
void add_bench(CLI::App& app);
void add_launch(CLI::App& app);
void add_show(CLI::App& app);

/// "cpu", "cuda", "cuda:1"; "auto" picks CUDA when available.
c10::Device parse_device(const std::string& name);
/// "float32", "bfloat16", "float16".
c10::ScalarType parse_dtype(const std::string& name);

/// An input of a command, as its messages name it ("base model", path).
struct NamedPath {
  std::string name, path;
};
/// Throws unless `out` may receive the model a command writes (output_dir.cpp): it is none of
/// `inputs` and contains none of them (--force or not), and it is absent or empty, or `force` is
/// set and it holds a model (config.json, adapter_config.json or safetensors files).
void check_output_dir(const std::string& command, const std::string& out, const std::vector<NamedPath>& inputs,
                      bool force);
/// Calls write(tmp) on a fresh directory and puts what it wrote at `out`: renamed into place where
/// `out` is absent, moved into it where it is empty, swapped with it in one rename where it holds a
/// model and `force` is set (the old model is removed after). The result holds what write() wrote
/// and nothing of an older directory; a failed write() leaves `out` as it was. Checks again what
/// check_output_dir checked, as `out` may have changed while the model was built.
void write_output_dir(const std::string& command, const std::string& out, bool force,
                      const std::function<void(const std::string&)>& write);

}  // namespace ft::cli

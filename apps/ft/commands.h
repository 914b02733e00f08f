#pragma once
// Each `ft` subcommand lives in its own file and registers itself on the root app: adding one is
// a new file plus one line in main.cpp.
#include <CLI/CLI.hpp>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <string>

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

/// "cpu", "cuda", "cuda:1"; "auto" picks CUDA when available.
c10::Device parse_device(const std::string& name);
/// "float32", "bfloat16", "float16".
c10::ScalarType parse_dtype(const std::string& name);

}  // namespace ft::cli

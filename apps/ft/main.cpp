// ft: the libft command line. Thin over the library; every subcommand has --help.
#include <ATen/ATen.h>

#include <cstdlib>
#include <iostream>

#include "commands.h"
#include "ft/train/run.h"
#include "ft/util/error.h"

namespace ft::cli {

c10::Device parse_device(const std::string& name) { return train::resolve_device(name, "--device"); }

c10::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32" || name == "fp32") return c10::kFloat;
  if (name == "bfloat16" || name == "bf16") return c10::kBFloat16;
  if (name == "float16" || name == "fp16") return c10::kHalf;
  FT_FAIL("--dtype: '", name, "' is not one of float32, bfloat16, float16");
}

// "ft: error: " or, in a data-parallel job, "ft: error (rank 3): ", so that a job's log says which rank failed.
std::string error_prefix() {
  const char* rank = std::getenv("RANK");
  const char* world = std::getenv("WORLD_SIZE");
  if (!rank || !world || std::string(world) == "1") return "ft: error: ";
  return std::string("ft: error (rank ") + rank + "): ";
}

}  // namespace ft::cli

int main(int argc, char** argv) {
  CLI::App app{"ft: fine-tune Llama-family transformers with LibTorch (libft)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "libft 0.1.0");
  ft::cli::add_init(app);
  ft::cli::add_inspect(app);
  ft::cli::add_generate(app);
  ft::cli::add_train_tokenizer(app);
  ft::cli::add_prepare(app);
  ft::cli::add_show(app);
  ft::cli::add_train(app);
  ft::cli::add_batches(app);
  ft::cli::add_merge(app);
  ft::cli::add_check_adapter(app);
  ft::cli::add_eval(app);
  ft::cli::add_fisher(app);
  ft::cli::add_bench(app);
  ft::cli::add_launch(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const ft::Error& e) {
    std::cerr << ft::cli::error_prefix() << e.what() << "\n";
    return 1;
  } catch (const c10::Error& e) {
    std::cerr << ft::cli::error_prefix() << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << ft::cli::error_prefix() << e.what() << "\n";
    return 1;
  }
  return 0;
}

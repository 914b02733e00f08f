#pragma once
#include <ATen/ATen.h>
#include <CLI/CLI.hpp>
#include <torch/nn/module.h>

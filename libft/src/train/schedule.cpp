#include "ft/train/schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "ft/util/error.h"

namespace ft::train {

double lr_factor(const ScheduleOptions& o, int64_t step) {
  FT_CHECK(step >= 0, "[schedule] step must be >= 0, got ", step);
  FT_CHECK(o.warmup_steps >= 0, "[schedule] warmup_steps must be >= 0, got ", o.warmup_steps);
  if (step < o.warmup_steps) return static_cast<double>(step) / static_cast<double>(o.warmup_steps);
  if (o.kind == ScheduleKind::Constant) return 1.0;
  FT_CHECK(o.total_steps > o.warmup_steps, "[schedule] ", schedule_kind_name(o.kind),
           ": total_steps (", o.total_steps, ") must exceed warmup_steps (", o.warmup_steps, ")");
  const double decay_steps = static_cast<double>(o.total_steps - o.warmup_steps);
  const double progress = static_cast<double>(step - o.warmup_steps) / decay_steps;
  if (o.kind == ScheduleKind::Linear) return std::max(0.0, 1.0 - progress);
  return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
}

ScheduleKind parse_schedule_kind(const std::string& name) {
  if (name == "constant") return ScheduleKind::Constant;
  if (name == "linear") return ScheduleKind::Linear;
  if (name == "cosine") return ScheduleKind::Cosine;
  FT_FAIL("[schedule] '", name, "' is not one of constant, linear, cosine");
}

const char* schedule_kind_name(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::Constant: return "constant";
    case ScheduleKind::Linear: return "linear";
    case ScheduleKind::Cosine: return "cosine";
  }
  return "?";
}

}  // namespace ft::train

#pragma once
// Learning-rate schedules with linear warmup, as a plain function of the optimizer step. They follow
// Hugging Face's get_{constant,linear,cosine}_schedule_with_warmup exactly (so a Python reference run
// uses the same rates), including lr = 0 at step 0 when warmup_steps > 0.
#include <cstdint>
#include <string>

namespace ft::train {

enum class ScheduleKind { Constant, Linear, Cosine };

struct ScheduleOptions {
  ScheduleKind kind = ScheduleKind::Cosine;
  int64_t warmup_steps = 0;  ///< factor rises linearly from 0 to 1 over these steps
  int64_t total_steps = 0;   ///< linear/cosine reach 0 here (required > warmup_steps for them)
};

/// Multiplier of the base learning rate at optimizer step `step` (0-based, counting applied steps).
///  warmup  (step < warmup):  step / warmup
///  constant:                 1
///  linear:                   max(0, (total − step) / (total − warmup))
///  cosine:                   max(0, ½ (1 + cos(π p))), p = (step − warmup) / (total − warmup)
/// Throws ft::Error for negative steps or a decaying schedule with total_steps ≤ warmup_steps.
double lr_factor(const ScheduleOptions& options, int64_t step);

/// "constant" | "linear" | "cosine"; throws ft::Error naming the value otherwise.
ScheduleKind parse_schedule_kind(const std::string& name);
const char* schedule_kind_name(ScheduleKind kind);

}  // namespace ft::train

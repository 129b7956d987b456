// Per-stage timing of fused CPU calls, for seqfuse.profile: what each fused
// call spent in each of its stages, next to the stage's multiply-adds and
// bytes, so a profile can put every stage against the machine's limits.
//
// Off unless a profile asks (one thread-local load per call when off). The
// switch is per thread: while it is on for a thread, every CPU conv/MLP op
// call that thread makes appends one CallTiming, and the profile takes them
// after its timed forwards; other threads running models meanwhile neither
// enter the profile nor pay for it. Stage times are wall time on the
// calling thread for runs split stage by stage (the thread hand-off
// included), and the mean over the threads for runs where each thread
// carries its own images through every stage.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/conv_spec.h"
#include "kernels/mlp_spec.h"
#include "kernels/workspace.h"

namespace seqfuse {

struct CallTiming {
  std::string op;  // "conv" or "mlp"
  uintptr_t plan = 0;  // the packed buffer's address: which segment ran
  int64_t engine = 0;
  int64_t batch = 0;
  std::vector<std::string> stages;  // what each stage is, with its shape
  std::vector<int64_t> macs;        // per stage, whole call (one per value for stages without weights)
  std::vector<int64_t> bytes;       // per stage: activations read and written, and packed weights
  std::vector<int64_t> ns;          // per stage; -1 where the kernel runs stages together (not timed apart)
  int64_t layout_ns = 0;            // layout conversions at the run's boundaries
  int64_t start_ns = 0;             // when the call began (kernels::monotonic_ns)
  int64_t total_ns = 0;             // the whole op call
  int64_t record_ns = 0;            // building this record, after the call: a profile subtracts it from the forward
};

namespace detail {
extern thread_local bool stage_profile_flag;
}

// Whether the calling thread's fused calls are profiled now.
inline bool stage_profile_on() { return detail::stage_profile_flag; }
// Turns profiling of the calling thread's fused calls on or off.
void set_stage_profile(bool on);
void record_call_timing(CallTiming&& t);
// The timings recorded since the last take, oldest first.
std::vector<CallTiming> take_call_timings();

// Adds the time from construction to destruction to *slot (no-op for null).
class StageClock {
 public:
  explicit StageClock(int64_t* slot) : slot_(slot), t0_(slot ? kernels::monotonic_ns() : 0) {}
  ~StageClock() {
    if (slot_) *slot_ += kernels::monotonic_ns() - t0_;
  }
  StageClock(const StageClock&) = delete;
  StageClock& operator=(const StageClock&) = delete;

 private:
  int64_t* slot_;
  int64_t t0_;
};

// The stage records of a conv run over `images` images (labels, multiply-adds,
// bytes), ns left at -1 for the caller to fill.
CallTiming conv_call_timing(const kernels::ConvDesc& d, const kernels::ConvGeometry& g, int64_t images, int64_t engine,
                            const void* packed);
// The same for an MLP run over `rows` rows.
CallTiming mlp_call_timing(const kernels::MlpDesc& d, int64_t rows, int64_t engine, const void* packed);

}  // namespace seqfuse

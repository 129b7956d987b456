// Engine choice: the process-wide engine override, the table of engines
// chosen by measurement (EngineChoices), and the measurement itself
// (measure_fastest_engine), on any device.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/DeviceType.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace seqfuse {

// Which engine runs a call: -1 lets FusedMlpCall decide (by measurement), 0 or
// 1 forces one (tests, studies). Process-wide.
std::atomic<int>& engine_override();

// The most engines one op offers (measure_fastest_engine's limit).
constexpr int kMaxEngines = 4;

// For calls big enough that the engine matters, each shape class (batch size
// bucketed by powers of two; for conv runs also the spatial size and layout)
// gets the fastest of the engines, measured, for that class, device type and
// thread count. Choices are shared by every segment with the same spec
// (shapes, dtype, stages) on the same device type, so re-planning after a
// parameter update never measures again; a CPU measurement never decides a
// call on another device, nor the other way round.
//
// On the CPU the measurement is the calls themselves (trials): while a class
// is undecided, each call runs the engine with the fewest timings so far and
// its time is recorded, so a first call costs one run of one engine, not a
// run of every engine several times over. Interference from the rest of the
// machine only ever adds time, so each engine keeps its fastest timing; an
// engine 1.3x slower than the best after two timings each is dropped (its
// trials cost the caller's time), the others get more timings the shorter the
// call (2 beyond 20 ms, 3 beyond 2 ms, else 4), then the fastest is the choice.
class EngineChoices {
 public:
  // (op, device type, shape key, bucket, threads): the op tells an MLP spec
  // from a conv one.
  using Key = std::tuple<int, c10::DeviceType, std::vector<int64_t>, int, int>;
  // -1 when not measured yet.
  int get(const Key& key) const;
  void set(const Key& key, int engine);

  // The engine a call of this class runs: the choice when made (trial =
  // false), else the engine to time next (trial = true: report its time to
  // record_trial).
  struct Pick {
    int engine;
    bool trial;
  };
  Pick pick(const Key& key, int engine_count);
  void record_trial(const Key& key, int engine, double seconds);
  // Counts the trials picked so far (a clock for trials_pending).
  uint64_t trial_clock() const;
  // Shape classes still being measured that a call picked a trial of at or
  // after trial_clock() read `since` (0: all of them).
  size_t trials_pending(uint64_t since = 0) const;

  // (shape key, bucket, threads, engine) for every key of `op` on `device_type`
  // whose shape key starts with `prefix`.
  std::vector<std::tuple<std::vector<int64_t>, int, int, int>> with_prefix(int op, c10::DeviceType device_type,
                                                                           const std::vector<int64_t>& prefix) const;
  // Every choice (what seqfuse/engine_cache.py persists), and forgetting them all.
  std::vector<std::pair<Key, int>> entries() const;
  void clear();
  // Counts set() calls: a changed value means new choices since it was read.
  uint64_t generation() const;
  static EngineChoices& global();

 private:
  struct Trial {
    int engines = 0;
    double fastest[kMaxEngines];
    int timings[kMaxEngines] = {};
    bool dropped[kMaxEngines] = {};
    uint64_t last_pick = 0;  // trial_clock_ when last picked
  };
  mutable std::mutex mutex_;
  std::map<Key, int> choices_;
  std::map<Key, Trial> trials_;
  uint64_t trial_clock_ = 0;
  uint64_t generation_ = 0;
};

// Times run(0) .. run(engine_count - 1), calls on `device`, and returns the
// fastest engine: how devices other than the CPU choose, in one call (timing
// a call there synchronizes its stream, which trials in every call would do
// to every caller). There the calls are asynchronous: the device's current
// stream is synchronized before each clock reading. -1 (nothing
// run) when that stream is capturing a graph: captured calls do not execute,
// so there is nothing to time (and synchronizing would break the capture).
int measure_fastest_engine(c10::Device device, int engine_count, const std::function<void(int)>& run);

}  // namespace seqfuse

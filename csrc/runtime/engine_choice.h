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

// For calls big enough that the engine matters, the first call of each shape
// class (batch size bucketed by powers of two; for conv runs also the spatial
// size) times both engines and keeps the faster one for that class, device
// type and thread count. Choices are shared by every segment with the same
// spec (shapes, dtype, stages) on the same device type, so re-planning after a
// parameter update never measures again; a CPU measurement never decides a
// call on another device, nor the other way round.
class EngineChoices {
 public:
  // (op, device type, shape key, bucket, threads): the op tells an MLP spec
  // from a conv one.
  using Key = std::tuple<int, c10::DeviceType, std::vector<int64_t>, int, int>;
  // -1 when not measured yet.
  int get(const Key& key) const;
  void set(const Key& key, int engine);
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
  mutable std::mutex mutex_;
  std::map<Key, int> choices_;
  uint64_t generation_ = 0;
};

// The most engines one op offers (measure_fastest_engine's limit).
constexpr int kMaxEngines = 3;

// Times run(0) .. run(engine_count - 1), calls on `device`, and returns the
// fastest engine. On a device other than the CPU the calls are asynchronous:
// its current stream is synchronized before each clock reading. -1 (nothing
// run) when that stream is capturing a graph: captured calls do not execute,
// so there is nothing to time (and synchronizing would break the capture).
int measure_fastest_engine(c10::Device device, int engine_count, const std::function<void(int)>& run);

}  // namespace seqfuse

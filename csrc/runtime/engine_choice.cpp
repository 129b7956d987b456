// Engine choice by measurement (see engine_choice.h).
#include "runtime/engine_choice.h"

#include <c10/core/Stream.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <optional>

namespace seqfuse {

std::atomic<int>& engine_override() {
  static std::atomic<int> value{-1};
  return value;
}

int EngineChoices::get(const Key& key) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = choices_.find(key);
  return it == choices_.end() ? -1 : it->second;
}

void EngineChoices::set(const Key& key, int engine) {
  std::lock_guard<std::mutex> lock(mutex_);
  choices_[key] = engine;
  trials_.erase(key);
  ++generation_;
}

EngineChoices::Pick EngineChoices::pick(const Key& key, int engine_count) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto known = choices_.find(key);
  if (known != choices_.end()) return {known->second, false};
  if (engine_count <= 1) return {0, false};  // nothing to choose between
  auto [it, fresh] = trials_.try_emplace(key);
  Trial& t = it->second;
  if (fresh) {
    t.engines = std::clamp(engine_count, 1, kMaxEngines);
    std::fill(t.fastest, t.fastest + kMaxEngines, std::numeric_limits<double>::infinity());
  }
  t.last_pick = trial_clock_++;
  int next = -1;
  for (int e = 0; e < t.engines; ++e)
    if (!t.dropped[e] && (next < 0 || t.timings[e] < t.timings[next])) next = e;
  return {next, true};
}

void EngineChoices::record_trial(const Key& key, int engine, double seconds) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = trials_.find(key);
  if (it == trials_.end() || engine < 0 || engine >= it->second.engines) return;  // decided meanwhile
  Trial& t = it->second;
  t.fastest[engine] = std::min(t.fastest[engine], seconds);
  ++t.timings[engine];
  int best = -1;
  for (int e = 0; e < t.engines; ++e)
    if (!t.dropped[e] && (best < 0 || t.fastest[e] < t.fastest[best])) best = e;
  const double fastest = t.fastest[best];
  const int wanted = fastest > 0.02 ? 2 : fastest > 0.002 ? 3 : 4;
  bool done = true;
  for (int e = 0; e < t.engines; ++e) {
    if (t.dropped[e] || e == best) continue;
    if (t.timings[e] >= 2 && t.timings[best] >= 2 && t.fastest[e] > 1.3 * fastest) t.dropped[e] = true;
    else done = done && t.timings[e] >= wanted;
  }
  if (!done || t.timings[best] < wanted) return;
  trials_.erase(it);
  choices_[key] = best;
  ++generation_;
}

uint64_t EngineChoices::trial_clock() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return trial_clock_;
}

size_t EngineChoices::trials_pending(uint64_t since) const {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t n = 0;
  for (const auto& [key, t] : trials_) n += t.last_pick >= since;
  return n;
}

std::vector<std::pair<EngineChoices::Key, int>> EngineChoices::entries() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return {choices_.begin(), choices_.end()};
}

void EngineChoices::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  choices_.clear();
  trials_.clear();
  ++generation_;
}

uint64_t EngineChoices::generation() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return generation_;
}

std::vector<std::tuple<std::vector<int64_t>, int, int, int>> EngineChoices::with_prefix(
    int op, c10::DeviceType device_type, const std::vector<int64_t>& prefix) const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::tuple<std::vector<int64_t>, int, int, int>> out;
  for (const auto& [key, engine] : choices_) {
    const auto& shape = std::get<2>(key);
    if (std::get<0>(key) == op && std::get<1>(key) == device_type && shape.size() >= prefix.size() &&
        std::equal(prefix.begin(), prefix.end(), shape.begin()))
      out.emplace_back(shape, std::get<3>(key), std::get<4>(key), engine);
  }
  return out;
}

EngineChoices& EngineChoices::global() {
  static EngineChoices instance;
  return instance;
}

// Whether a capture (CUDA graph) is recording the stream: timing would
// synchronize it, which a capture forbids. Torch releases whose guard
// interface predates isStreamCapturing report no capture.
namespace {
template <typename Guard> bool stream_capturing(const Guard& guard, const c10::Stream& stream) {
  if constexpr (requires { guard.isStreamCapturing(stream); })
    return guard.isStreamCapturing(stream);
  else
    return false;
}
}  // namespace

int measure_fastest_engine(c10::Device device, int engine_count, const std::function<void(int)>& run) {
  TORCH_INTERNAL_ASSERT(engine_count >= 1 && engine_count <= kMaxEngines, "seqfuse: ", engine_count,
                        " engines to measure, at most ", kMaxEngines);
  // CPU calls are done when they return; other devices' calls are queued on
  // the device's current stream, which is waited for around each timing (the
  // guard implementation is the device type's own, found at run time: no
  // device library is linked).
  std::optional<c10::impl::VirtualGuardImpl> guard;
  std::optional<c10::Stream> stream;
  if (!device.is_cpu()) {
    guard.emplace(device.type());
    stream = guard->getStream(device);
    if (stream_capturing(*guard, *stream)) return -1;
  }
  auto sync = [&] {
    if (guard) guard->synchronizeStream(*stream);
  };
  // Measure: alternate the engines after one warm-up each and keep each
  // one's fastest time: interference from the rest of the machine (another
  // process, a descheduled pool thread) only ever adds time, and one slowed
  // timing must not pick an engine that is many times slower (a median of 3
  // did, now and then, on a busy 2-core VM). 5 timings each for short calls,
  // 3 up to 20 ms, one beyond.
  using clock = std::chrono::steady_clock;
  auto timed = [&](int e) {
    sync();  // work queued before this call is not its time
    const auto t0 = clock::now();
    run(e);
    sync();
    return std::chrono::duration<double>(clock::now() - t0).count();
  };
  const int n = engine_count;
  double warm = 0;
  for (int e = 0; e < n; ++e) warm = std::max(warm, timed(e));
  const int reps = warm > 0.02 ? 1 : warm > 0.002 ? 3 : 5;
  double fastest[kMaxEngines];
  std::fill(fastest, fastest + n, std::numeric_limits<double>::infinity());
  for (int rep = 0; rep < reps; ++rep)
    for (int e = 0; e < n; ++e) fastest[e] = std::min(fastest[e], timed(e));
  int best = 0;
  for (int e = 1; e < n; ++e)
    if (fastest[e] < fastest[best]) best = e;
  return best;
}

}  // namespace seqfuse

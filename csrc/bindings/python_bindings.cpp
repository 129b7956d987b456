// The seqfuse._C Python module. Importing it loads the operator library
// (ops/schema.cpp and the backend registrations linked into the same shared object).
// It also carries what the Python front needs at C speed, the runtime in
// csrc/runtime/: the plan guard that decides on every forward whether a cached
// plan is still valid (plan_guard.h), the bound fused calls (fused_call.h,
// train_call.h) and their engine choice (engine_choice.h); and a few
// introspection helpers. This file only binds them.
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels/fma_peak.h"
#include "kernels/mlp_forward.h"
#include "runtime/eager_context.h"
#include "runtime/engine_choice.h"
#include "runtime/fused_call.h"
#include "runtime/plan_guard.h"
#include "runtime/residual.h"
#include "runtime/host_cache.h"
#include "runtime/stage_profile.h"
#include "runtime/train_call.h"
#include "adapters/spec_adapter.h"

namespace {

// Every constant seqfuse/spec.py exposes, from its C++ definition.
py::dict vocabulary() {
  using namespace seqfuse;
  using namespace seqfuse::kernels;
  py::dict v;
  v["mlp_spec"] = py::dict(py::arg("version") = kSpecVersion, py::arg("header") = kSpecHeader,
                           py::arg("per_stage") = kSpecPerStage);
  v["conv_spec"] = py::dict(py::arg("version") = kConvSpecVersion, py::arg("header") = kConvSpecHeader,
                            py::arg("per_stage") = kConvSpecPerStage);
  v["fparams_per_stage"] = kFParamsPerStage;
  v["dtypes"] = py::dict(py::arg("float32") = static_cast<int64_t>(DType::Float32),
                         py::arg("float64") = static_cast<int64_t>(DType::Float64),
                         py::arg("bfloat16") = static_cast<int64_t>(DType::BFloat16),
                         py::arg("float16") = static_cast<int64_t>(DType::Float16));
  v["flags"] = py::dict(py::arg("HAS_BIAS") = kHasBias, py::arg("HAS_BATCHNORM") = kHasBatchNorm,
                        py::arg("BATCHNORM_AFFINE") = kBatchNormAffine, py::arg("BATCH_STATS") = kBatchStats,
                        py::arg("RUNNING_STATS") = kRunningStats, py::arg("CEIL_MODE") = kCeilMode,
                        py::arg("COUNT_INCLUDE_PAD") = kCountIncludePad);
  auto pairs = [](std::initializer_list<std::pair<const char*, int64_t>> items) {
    py::list out;
    for (const auto& [name, id] : items) out.append(py::make_tuple(name, id));
    return out;
  };
  v["stage_kinds"] = pairs({{"LINEAR", static_cast<int64_t>(StageKind::Linear)},
                            {"SCALE_SHIFT", static_cast<int64_t>(StageKind::ScaleShift)},
                            {"POINTWISE", static_cast<int64_t>(StageKind::Pointwise)}});
  v["conv_stage_kinds"] = pairs({{"CONV", static_cast<int64_t>(ConvStageKind::Conv)},
                                 {"SCALE_SHIFT", static_cast<int64_t>(ConvStageKind::ScaleShift)},
                                 {"POINTWISE", static_cast<int64_t>(ConvStageKind::Pointwise)},
                                 {"MAX_POOL", static_cast<int64_t>(ConvStageKind::MaxPool)},
                                 {"AVG_POOL", static_cast<int64_t>(ConvStageKind::AvgPool)},
                                 {"GLOBAL_AVG_POOL", static_cast<int64_t>(ConvStageKind::GlobalAvgPool)},
                                 {"FLATTEN", static_cast<int64_t>(ConvStageKind::Flatten)},
                                 {"LINEAR", static_cast<int64_t>(ConvStageKind::Linear)}});
  py::list activations;
#define SEQFUSE_ACTIVATION_ROW(name, id, python_name, ...) activations.append(py::make_tuple(python_name, id));
  SEQFUSE_ACTIVATION_TABLE(SEQFUSE_ACTIVATION_ROW)
#undef SEQFUSE_ACTIVATION_ROW
  v["activations"] = activations;
  v["engines"] = pairs({{"ENGINE_FUSED", kEngineFused},
                        {"ENGINE_GEMM_EPILOGUE", kEngineGemmEpilogue},
                        {"ENGINE_ATEN_LAYOUT", kEngineAtenLayout},
                        {"ENGINE_WINOGRAD", kEngineWinograd}});
  v["routes"] = py::dict(py::arg("STALE") = static_cast<int>(PlanGuard::kStale),
                         py::arg("INFERENCE") = static_cast<int>(PlanGuard::kInference),
                         py::arg("EAGER") = static_cast<int>(PlanGuard::kEager),
                         py::arg("TRAIN") = static_cast<int>(PlanGuard::kTrain));
  return v;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  using namespace seqfuse;
  m.doc() = "seqfuse native extension: operator registrations and plan guard";
  py::class_<FusedCall, std::shared_ptr<FusedCall>>(m, "FusedCall")
      .def("__call__", &FusedCall::call, py::arg("input"), "Runs the segment; None when this input must run eagerly.")
      .def("measured_engines", &FusedCall::measured_engines,
           "(min batch, max batch, threads, engine, (H, W) or ()) for every shape class measured so far.")
      .def_property_readonly("packed", &FusedCall::packed);
  py::class_<FusedMlpCall, FusedCall, std::shared_ptr<FusedMlpCall>>(m, "FusedMlpCall")
      .def(py::init<at::Tensor, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>,
                    std::optional<std::pair<int64_t, int64_t>>, bool>(),
           py::arg("packed"), py::arg("weights"), py::arg("spec"), py::arg("fparams"), py::arg("flatten"),
           py::arg("needs_2d"))
      .def("engine_for", &FusedMlpCall::engine_for, py::arg("rows"),
           "Engine for a call with this many rows: 0 fused kernel, 1 GEMM + fused epilogue, -1 not measured yet.");
  py::class_<FusedConvCall, FusedCall, std::shared_ptr<FusedConvCall>>(m, "FusedConvCall")
      .def(py::init<at::Tensor, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>>(),
           py::arg("packed"), py::arg("weights"), py::arg("spec"), py::arg("fparams"));
  py::class_<FusedTrainCall, std::shared_ptr<FusedTrainCall>>(m, "FusedTrainCall")
      .def(py::init<const std::string&, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>,
                    std::vector<double>, std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>,
                    std::optional<std::pair<int64_t, int64_t>>, bool>(),
           py::arg("op"), py::arg("params"), py::arg("running"), py::arg("spec"), py::arg("fparams"),
           py::arg("update_buffers"), py::arg("update_stages"), py::arg("momentum"), py::arg("flatten"),
           py::arg("needs_2d"))
      .def("__call__", &FusedTrainCall::call, py::arg("input"),
           "Runs the segment's training op; None when this input must run eagerly.");
  m.def("vocabulary", &vocabulary,
        "The constants the Python front shares with the kernels (spec layout, dtype codes, flags, stage kinds, "
        "activations, engines, plan routes), read from the C++ definitions.");
  m.def(
      "set_engine_override", [](int engine) { engine_override().store(engine); }, py::arg("engine"),
      "Force an engine for every fused MLP call (0 or 1), or -1 to choose by measurement.");
  // The engine choices as plain tuples (op kind, device type name, shape key,
  // batch bucket, threads, engine), for seqfuse/engine_cache.py.
  m.def(
      "engine_choices",
      [] {
        std::vector<std::tuple<int, std::string, std::vector<int64_t>, int, int, int>> out;
        for (const auto& [key, engine] : EngineChoices::global().entries())
          out.emplace_back(std::get<0>(key), c10::DeviceTypeName(std::get<1>(key), /*lower_case=*/true),
                           std::get<2>(key), std::get<3>(key), std::get<4>(key), engine);
        return out;
      },
      "Every engine chosen by measurement so far: (op, device type, shape key, batch bucket, threads, engine).");
  m.def(
      "set_engine_choice",
      [](int op, const std::string& device_type, std::vector<int64_t> shape, int bucket, int threads, int engine) {
        if (engine < 0 || engine >= kMaxEngines) throw py::value_error("seqfuse: engine out of range");
        EngineChoices::global().set({op, c10::Device(device_type).type(), std::move(shape), bucket, threads}, engine);
      },
      py::arg("op"), py::arg("device_type"), py::arg("shape"), py::arg("bucket"), py::arg("threads"),
      py::arg("engine"), "Records an engine choice (as engine_choices() lists them).");
  m.def(
      "clear_engine_choices", [] { EngineChoices::global().clear(); },
      "Forgets every engine choice: the next call of each shape class measures again.");
  m.def(
      "engine_trial_clock", [] { return EngineChoices::global().trial_clock(); },
      "Counts the engine trials run so far: read it before calls, pass it to engine_trials_pending.");
  m.def(
      "engine_trials_pending", [](uint64_t since) { return EngineChoices::global().trials_pending(since); },
      py::arg("since") = 0,
      "How many shape classes are still being measured (their calls time the engines in turn); with "
      "`since` (an engine_trial_clock() reading), only those that a call since then ran a trial of.");
  m.def(
      "engine_choices_generation", [] { return EngineChoices::global().generation(); },
      "Changes whenever an engine choice is recorded or the choices are cleared.");
  py::class_<PlanGuard>(m, "PlanGuard")
      .def(py::init<py::dict, py::list, std::vector<at::Tensor>, std::vector<at::Tensor>, py::list, bool>())
      .def("check", &PlanGuard::check, py::arg("input"))
      .def("set_single_fused", &PlanGuard::set_single_fused)
      .def("set_single_train", &PlanGuard::set_single_train)
      .def("run", &PlanGuard::run, py::arg("input"));
  m.def(
      "needs_eager_context", [](py::handle input) { return needs_eager_context(input); }, py::arg("input"),
      "True inside a torch.func transform or for an input with a forward-mode tangent.");
  m.def(
      "conv_packed_nbytes",
      [](std::vector<int64_t> spec, std::vector<double> fparams) {
        return decode_conv_spec(spec, fparams).packed_bytes;
      },
      "Size in bytes of the buffer seqfuse::conv_pack returns for this spec.");
  m.def(
      "mlp_packed_nbytes",
      [](std::vector<int64_t> spec, std::vector<double> fparams) {
        return decode_mlp_spec(spec, fparams).packed_bytes;
      },
      "Size in bytes of the buffer seqfuse::mlp_pack returns for this spec.");
  m.def(
      "cpu_capability", [] { return std::string(kernels::isa_name(kernels::active_isa())); },
      "The CPU kernel variant in use: 'avx512_bf16', 'avx512', 'avx2' or 'baseline'.");
  m.def(
      "detected_cpu_capability", [] { return std::string(kernels::isa_name(kernels::detect_isa())); },
      "The best CPU kernel variant this CPU supports.");
  m.def(
      "set_cpu_capability",
      [](const std::string& name) {
        try {
          kernels::set_isa_override(name);
        } catch (const std::invalid_argument& e) {
          throw py::value_error(e.what());
        }
      },
      py::arg("name"),
      "Force a CPU kernel variant ('avx512_bf16', 'avx512', 'avx2', 'baseline'; '' for the detected one).");
  m.def(
      "set_gelu_erf_at_pos_inf",
      [](float v) { kernels::gelu_erf_at_pos_inf.store(v, std::memory_order_relaxed); }, py::arg("value"),
      "The float32 GELU(+inf) of the fused CPU kernels: eager's, probed at import (NaN or +inf by ATen's kernel).");
  m.def("add_residual_", &add_residual_, py::arg("y"), py::arg("residual"), py::arg("x"), py::arg("relu"),
        "y += residual (then ReLU) in place and y, for a captured chain's residual epilogue; None where the "
        "in-place path does not apply (the caller's general path runs).");
  m.def("release_host_cache", &release_host_cache,
        "Frees the host cache's blocks (recycled memory of the fused CPU ops' outputs); returns the bytes freed.");
  m.def("host_cache_usage", &host_cache_usage,
        "(bytes cached in free blocks, bytes in blocks handed out) of the fused CPU ops' host cache.");
  m.def("set_stage_profile", &set_stage_profile, py::arg("on"),
        "Record the per-stage timing of the calling thread's fused CPU calls (seqfuse.profile) while on.");
  m.def(
      "take_call_timings",
      [] {
        py::list out;
        for (CallTiming& t : take_call_timings()) {
          py::dict r;
          r["op"] = t.op, r["plan"] = t.plan, r["engine"] = t.engine, r["batch"] = t.batch;
          r["stages"] = t.stages, r["macs"] = t.macs, r["bytes"] = t.bytes, r["ns"] = t.ns;
          r["layout_ns"] = t.layout_ns, r["start_ns"] = t.start_ns, r["total_ns"] = t.total_ns;
          r["record_ns"] = t.record_ns;
          out.append(std::move(r));
        }
        return out;
      },
      "The fused CPU calls timed since the last take, oldest first: dicts of op, plan (the packed buffer's "
      "address), engine, batch, and per stage: stages (labels), macs, bytes, ns (-1: not timed apart); "
      "layout_ns, start_ns (time.monotonic_ns's clock), total_ns, record_ns (building the record: not the call's time).");
  m.def("fma_peak_gflops",
        [](int threads, double seconds, bool bf16_products) {
          return kernels::fma_peak_gflops(threads, seconds, kernels::detect_isa(),
                                          bf16_products ? kernels::Product::Bf16Dot : kernels::Product::Float32Fma);
        },
        py::arg("threads") = 1, py::arg("seconds") = 0.2, py::arg("bf16_products") = false,
        py::call_guard<py::gil_scoped_release>(),
        "Measured float32 FMA peak (GFLOP/s) of `threads` concurrent threads over ~`seconds`, best ISA of this CPU; "
        "bf16_products: the peak of the bfloat16 products bfloat16 GEMMs run on (vdpbf16ps on CPUs with AVX512-BF16, "
        "else the float32 FMA the widened products use).");
}

// The c10::Error -> Python exception mapping of the runtime's Python-facing
// calls (FusedCall, FusedTrainCall).
#pragma once

#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <stdexcept>
#include <string>

namespace seqfuse {

// Raises a c10::Error as the Python exception type torch would use.
[[noreturn]] inline void rethrow_as_python(const c10::Error& e) {
  const std::string msg = e.what_without_backtrace();
  if (dynamic_cast<const c10::TypeError*>(&e)) throw py::type_error(msg);
  if (dynamic_cast<const c10::ValueError*>(&e)) throw py::value_error(msg);
  if (dynamic_cast<const c10::IndexError*>(&e)) throw py::index_error(msg);
  throw std::runtime_error(msg);
}

}  // namespace seqfuse

// The one DecommError translator of decomm's Python bindings: decomm._C
// (csrc/bindings.cpp) and decomm._C_cuda (csrc/cuda/bindings_cuda.cpp) both
// register it, so a decomm::DecommError thrown by either extension reaches
// Python as decomm.errors.DecommError with its message.
#pragma once

#include "common.h"

#include <torch/extension.h>

namespace decomm {

inline void register_error_translator() {
  pybind11::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const DecommError& e) {
      // Looked up at raise time: decomm.errors is plain Python, imported by then.
      pybind11::object cls = pybind11::module_::import("decomm.errors").attr("DecommError");
      PyErr_SetString(cls.ptr(), e.what());
    }
  });
}

}  // namespace decomm

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
    } catch (const PeerFailure& e) {
      // decomm.errors builds the exception: with fault tolerance on, its hook
      // first agrees with the survivors on who failed, so the error names the
      // lost ranks the same way on every rank.
      try {
        pybind11::object exc =
            pybind11::module_::import("decomm.errors").attr("_peer_failure")(e.what());
        PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
      } catch (pybind11::error_already_set& err) {
        err.restore();
      }
    } catch (const DecommError& e) {
      // Looked up at raise time: decomm.errors is plain Python, imported by then.
      pybind11::object cls = pybind11::module_::import("decomm.errors").attr("DecommError");
      PyErr_SetString(cls.ptr(), e.what());
    }
  });
}

}  // namespace decomm

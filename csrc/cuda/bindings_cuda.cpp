// Python bindings of decomm's CUDA core (module decomm._C_cuda): the fused
// weighted-sum kernel on CUDA tensors and, when built with NCCL, the NCCL backend.
//
// Built by setup.py only when the installed torch has CUDA and nvcc is found
// (or DECOMM_WITH_CUDA=1). decomm.backends.built_with_cuda() tells whether it is there.
#include "common.h"
#include "py_errors.h"
#include "weighted_sum.cuh"

#ifndef DECOMM_HAVE_NCCL
#define DECOMM_HAVE_NCCL 0
#endif

#if DECOMM_HAVE_NCCL
#include "nccl_backend.h"
#endif

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

namespace py = pybind11;

namespace {

decomm::cuda::FloatType float_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return decomm::cuda::FloatType::kHalf;
    case at::kBFloat16: return decomm::cuda::FloatType::kBFloat16;
    case at::kFloat: return decomm::cuda::FloatType::kFloat;
    case at::kDouble: return decomm::cuda::FloatType::kDouble;
    default:
      throw decomm::DecommError(std::string("weighted_sum: dtype ") + c10::toString(t) +
                                " is not supported; use float16, bfloat16, float32 or float64");
  }
}

std::vector<const void*> check_inputs(const at::Tensor& x, const std::vector<at::Tensor>& rs,
                                      const std::vector<double>& ws) {
  TORCH_CHECK(x.is_cuda(), "weighted_sum: x must be a CUDA tensor");
  TORCH_CHECK(x.is_contiguous(), "weighted_sum: x must be contiguous");
  TORCH_CHECK(ws.size() == rs.size(), "weighted_sum: one weight per neighbour tensor");
  std::vector<const void*> ptrs(rs.size());
  for (size_t j = 0; j < rs.size(); ++j) {
    TORCH_CHECK(rs[j].device() == x.device() && rs[j].is_contiguous() &&
                    rs[j].scalar_type() == x.scalar_type() && rs[j].numel() == x.numel(),
                "weighted_sum: neighbour tensor ", j,
                " must be contiguous, on x's device, of x's dtype and size");
    ptrs[j] = rs[j].data_ptr();
  }
  return ptrs;
}

// out = self_w * x + sum_j ws[j] * rs[j] on the current stream of x's device.
at::Tensor weighted_sum(const at::Tensor& x, double self_w, const std::vector<at::Tensor>& rs,
                        const std::vector<double>& ws, c10::optional<at::Tensor> out_opt) {
  const auto ft = float_type(x.scalar_type());
  std::vector<const void*> ptrs = check_inputs(x, rs, ws);
  at::Tensor out = out_opt.has_value() ? *out_opt : at::empty_like(x);
  TORCH_CHECK(out.device() == x.device() && out.is_contiguous() &&
                  out.scalar_type() == x.scalar_type() && out.numel() == x.numel(),
              "weighted_sum: out must be contiguous, on x's device, of x's dtype and size");
  c10::cuda::CUDAGuard guard(x.device());
  cudaError_t e = decomm::cuda::weighted_sum(
      out.data_ptr(), x.data_ptr(), self_w, ptrs.data(), ws.data(),
      static_cast<int64_t>(ptrs.size()), x.numel(), ft,
      c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  if (e != cudaSuccess) {
    throw decomm::DecommError(std::string("weighted_sum kernel: ") + cudaGetErrorString(e));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "decomm CUDA core: fused weighted-sum kernel and the NCCL backend";

  decomm::register_error_translator();

  m.def("has_nccl", []() { return DECOMM_HAVE_NCCL != 0; },
        "True when this build includes the NCCL backend");
  m.def("cuda_runtime_version", []() {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  m.def("nccl_version", []() {
#if DECOMM_HAVE_NCCL
    int v = 0;
    ncclGetVersion(&v);
    return v;
#else
    return 0;
#endif
  });
  m.def("max_fused_inputs", []() { return decomm::cuda::kMaxFusedInputs; });
  m.def("memory_peak_gbps", [](int device) {
        // 2 transfers per clock (DDR) x clock (kHz) x bus width (bits) / 8: e.g. A100-40GB
        // 1215 MHz x 5120 bits -> 1555 GB/s, H100 SXM 2619 MHz x 5120 bits -> 3352 GB/s.
        int khz = 0, bits = 0;
        if (cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, device) != cudaSuccess ||
            cudaDeviceGetAttribute(&bits, cudaDevAttrGlobalMemoryBusWidth, device) !=
                cudaSuccess) {
          cudaGetLastError();
          return 0.0;
        }
        return 2.0 * khz * 1e3 * bits / 8.0 / 1e9;
      },
      py::arg("device"), "Theoretical peak memory bandwidth of a device in GB/s (0 if unknown)");

  m.def("weighted_sum", &weighted_sum, py::arg("x"), py::arg("self_weight"), py::arg("rs"),
        py::arg("weights"), py::arg("out") = py::none(),
        "out = self_weight * x + sum_j weights[j] * rs[j] in one fused pass, on the current "
        "stream (float16/bfloat16 accumulate in float32)");
  m.def("uses_vector_path",
        [](const at::Tensor& out, const at::Tensor& x, const std::vector<at::Tensor>& rs) {
          std::vector<const void*> ptrs(rs.size());
          for (size_t j = 0; j < rs.size(); ++j) ptrs[j] = rs[j].data_ptr();
          return decomm::cuda::vector_path(out.data_ptr(), x.data_ptr(), ptrs.data(),
                                           static_cast<int64_t>(ptrs.size()));
        },
        "True when weighted_sum would use 16-byte loads for these tensors");

#if DECOMM_HAVE_NCCL
  using decomm::NcclBackend;
  using decomm::NcclHandle;
  py::class_<NcclHandle, std::shared_ptr<NcclHandle>>(m, "NcclHandle")
      .def("poll", &NcclHandle::poll, py::call_guard<py::gil_scoped_release>())
      .def("wait", &NcclHandle::wait, py::call_guard<py::gil_scoped_release>())
      .def("synchronize", &NcclHandle::synchronize, py::call_guard<py::gil_scoped_release>());

  py::class_<NcclBackend, std::shared_ptr<NcclBackend>>(m, "NcclBackend")
      .def(py::init<int64_t, int, double, bool>(), py::arg("comm_f"), py::arg("device"),
           py::arg("timeout"), py::arg("check"), py::call_guard<py::gil_scoped_release>())
      .def("close", &NcclBackend::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("rank", &NcclBackend::rank)
      .def_property_readonly("size", &NcclBackend::size)
      .def_property_readonly("device", &NcclBackend::device)
      .def_property_readonly("failed", &NcclBackend::failed)
      .def_property_readonly("error", &NcclBackend::error)
      .def_property("timeout", &NcclBackend::timeout, &NcclBackend::set_timeout)
      .def("set_check", &NcclBackend::set_check)
      .def_property_readonly("bytes_sent", [](NcclBackend& b) { return b.bytes_sent.load(); })
      .def_property_readonly("bytes_received",
                             [](NcclBackend& b) { return b.bytes_received.load(); })
      .def("reset_counters", [](NcclBackend& b) {
        b.bytes_sent = 0;
        b.bytes_received = 0;
      })
      .def("neighbor_allreduce", &NcclBackend::neighbor_allreduce,
           py::call_guard<py::gil_scoped_release>())
      .def("neighbor_allgather", &NcclBackend::neighbor_allgather,
           py::call_guard<py::gil_scoped_release>())
      .def("allreduce", &NcclBackend::allreduce, py::call_guard<py::gil_scoped_release>())
      .def("broadcast", &NcclBackend::broadcast, py::call_guard<py::gil_scoped_release>())
      .def("allgather", &NcclBackend::allgather, py::call_guard<py::gil_scoped_release>())
      .def("barrier", &NcclBackend::barrier, py::call_guard<py::gil_scoped_release>());
#endif
}

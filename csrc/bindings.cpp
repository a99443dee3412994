// Python bindings of the decomm C++ core (module decomm._C).
#include "mpi_backend.h"
#include "ops/internal.h"
#include "py_errors.h"
#include "weighted_sum.h"

#include <pybind11/stl.h>

namespace py = pybind11;
using decomm::MpiBackend;

namespace {

decomm::Peers to_peers(const std::vector<int64_t>& ranks, const std::vector<double>& weights) {
  decomm::Peers p;
  p.ranks = ranks;
  p.weights = weights;
  return p;
}

// One rank's part of one topology round, converted once (RoundPlan.native in
// decomm/_state.py): the fast path below then converts no Python lists per call.
struct RoundPeers {
  double self_weight;
  decomm::Peers src, dst;
};

// The checked operands of the standalone sums: contiguous CPU tensors of one
// dtype and size; out (or a new tensor) may be x itself but overlap nothing else.
struct SumOperands {
  at::Tensor y;
  std::vector<const void*> ptrs;
};

SumOperands sum_operands(const at::Tensor& x, const std::vector<at::Tensor>& rs,
                         const std::optional<at::Tensor>& out) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU tensor");
  const auto t = x.scalar_type();
  TORCH_CHECK(decomm::is_supported_float(t), "unsupported dtype");
  std::vector<const void*> ptrs(rs.size());
  for (size_t j = 0; j < rs.size(); ++j) {
    TORCH_CHECK(rs[j].is_contiguous() && rs[j].scalar_type() == t &&
                    rs[j].numel() == x.numel() && rs[j].device().is_cpu(),
                "neighbour tensor ", j, " must match x");
    ptrs[j] = rs[j].data_ptr();
  }
  at::Tensor y = out.has_value() ? *out : at::empty_like(x);
  if (out.has_value()) {
    TORCH_CHECK(y.is_contiguous() && y.device().is_cpu() && y.scalar_type() == t &&
                    y.numel() == x.numel(),
                "out must be a contiguous CPU tensor like x");
    // out may be x itself (each element is read before it is written) but no other input
    const auto nb = static_cast<int64_t>(x.numel() * x.element_size());
    auto overlaps = [nb](const void* a, const void* b) {
      const auto* p = static_cast<const char*>(a);
      const auto* q = static_cast<const char*>(b);
      return nb > 0 && p < q + nb && q < p + nb;
    };
    TORCH_CHECK(y.data_ptr() == x.data_ptr() || !overlaps(y.data_ptr(), x.data_ptr()),
                "out partly overlaps x");
    for (size_t j = 0; j < rs.size(); ++j)
      TORCH_CHECK(!overlaps(y.data_ptr(), ptrs[j]), "out overlaps neighbour tensor ", j);
  }
  return {y, std::move(ptrs)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "decomm C++ core: MPI neighbour ops and collectives, fused weighted sums";

  decomm::register_error_translator();

  m.def("mpi_library_version", []() {
    char buf[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    MPI_Get_library_version(buf, &len);
    return std::string(buf, len);
  });
  m.def("header_size", []() { return sizeof(decomm::Header); });
  // Timeline support: CLOCK_MONOTONIC in ns (the clock of Python's time.monotonic_ns)
  // and the [begin, posted, arrived, done] times of the last op this thread completed.
  m.def("steady_ns", &decomm::steady_ns);
  m.def("last_op_times", &decomm::last_op_times);

  py::class_<decomm::Handle, std::shared_ptr<decomm::Handle>>(m, "Handle")
      .def("poll", &decomm::Handle::poll, py::call_guard<py::gil_scoped_release>())
      .def("wait", &decomm::Handle::wait, py::call_guard<py::gil_scoped_release>())
      .def("times", &decomm::Handle::times);

  py::class_<RoundPeers>(m, "RoundPeers")
      .def(py::init([](double self_w, const std::vector<int64_t>& src,
                       const std::vector<double>& src_w, const std::vector<int64_t>& dst,
                       const std::vector<double>& dst_w) {
             TORCH_CHECK(src.size() == src_w.size() && dst.size() == dst_w.size(),
                         "RoundPeers: one weight per rank");
             return RoundPeers{self_w, to_peers(src, src_w), to_peers(dst, dst_w)};
           }))
      .def_readonly("self_weight", &RoundPeers::self_weight);

  py::class_<MpiBackend, std::shared_ptr<MpiBackend>>(m, "MpiBackend")
      .def(py::init<int64_t, double, bool, bool>(), py::arg("comm_f"), py::arg("timeout"),
           py::arg("check"), py::arg("progress_thread") = true)
      .def("close", &MpiBackend::close, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("rank", &MpiBackend::rank)
      .def_property_readonly("size", &MpiBackend::size)
      .def_property_readonly("has_progress_thread", &MpiBackend::has_progress_thread)
      .def_property("timeout", &MpiBackend::timeout, &MpiBackend::set_timeout)
      .def("set_check", &MpiBackend::set_check)
      .def_property("spin_us", &MpiBackend::spin_us, &MpiBackend::set_spin_us)
      .def("revoke", &MpiBackend::revoke, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("revoked", &MpiBackend::revoked)
      .def("failed_ranks", &MpiBackend::failed_ranks)
      .def("abandon", &MpiBackend::abandon, py::call_guard<py::gil_scoped_release>())
      .def_property("fault_tolerant", &MpiBackend::fault_tolerant, &MpiBackend::set_fault_tolerant)
      .def("say_goodbye", &MpiBackend::say_goodbye, py::call_guard<py::gil_scoped_release>())
      .def_property("timeline", &MpiBackend::timeline, &MpiBackend::set_timeline)
      .def_property_readonly("bytes_sent", [](MpiBackend& b) { return b.bytes_sent.load(); })
      .def_property_readonly("bytes_received",
                             [](MpiBackend& b) { return b.bytes_received.load(); })
      .def("reset_counters", [](MpiBackend& b) {
        b.bytes_sent = 0;
        b.bytes_received = 0;
      })
      .def(
          "neighbor_allreduce",
          [](MpiBackend& b, const at::Tensor& x, const at::Tensor& out, double self_weight,
             const std::vector<int64_t>& src, const std::vector<double>& src_w,
             const std::vector<int64_t>& dst, const std::vector<double>& dst_w,
             const std::string& name, int64_t round, uint64_t topo_hash, bool async) {
            return b.neighbor_allreduce(x, out, self_weight, to_peers(src, src_w),
                                        to_peers(dst, dst_w), name, round, topo_hash, async);
          },
          py::call_guard<py::gil_scoped_release>())
      // The blocking call with the topology's weights on a tensor that needs no
      // conversion: what a training loop makes thousands of times per second with
      // small buffers, where the general Python path cost as much as the exchange.
      // Returns None for anything else (device, dtype, layout, autograd), which
      // decomm/ops.py then runs, and checks, on the general path.
      .def(
          "neighbor_allreduce_now",
          [](MpiBackend& b, const at::Tensor& x, bool inplace, const RoundPeers& p,
             const std::string& name, int64_t round,
             uint64_t topo_hash) -> std::optional<at::Tensor> {
            if (!x.defined() || !x.device().is_cpu() || !decomm::is_supported_float(x.scalar_type()) ||
                !x.is_contiguous() || x.requires_grad() || x.is_inference())
              return std::nullopt;
            at::Tensor out = inplace ? x : at::empty_like(x, at::MemoryFormat::Contiguous);
            b.neighbor_allreduce(x, out, p.self_weight, p.src, p.dst, name, round, topo_hash,
                                 false);
            // what torch's in-place ops do: a tensor saved for backward now fails there
            if (inplace) x.unsafeGetTensorImpl()->bump_version();
            return out;
          },
          py::call_guard<py::gil_scoped_release>())
      .def("neighbor_allgather", &MpiBackend::neighbor_allgather,
           py::call_guard<py::gil_scoped_release>())
      .def("allreduce", &MpiBackend::allreduce, py::call_guard<py::gil_scoped_release>())
      .def("broadcast", &MpiBackend::broadcast, py::call_guard<py::gil_scoped_release>())
      .def("allgather", &MpiBackend::allgather, py::call_guard<py::gil_scoped_release>())
      .def("barrier", &MpiBackend::barrier, py::call_guard<py::gil_scoped_release>());

  // The fused elementwise update of decomm/optim/_fused.py: outs[i] = sum_j c[i][j] ins[j].
  m.def(
      "linear_map_",
      [](const std::vector<at::Tensor>& outs, const std::vector<std::vector<double>>& c,
         const std::vector<at::Tensor>& ins) {
        TORCH_CHECK(!outs.empty() && outs.size() <= static_cast<size_t>(decomm::kMaxLinearMapOutputs),
                    "linear_map_: 1 to ", decomm::kMaxLinearMapOutputs, " outputs, got ",
                    outs.size());
        TORCH_CHECK(!ins.empty() && ins.size() <= static_cast<size_t>(decomm::kMaxLinearMapTerms),
                    "linear_map_: 1 to ", decomm::kMaxLinearMapTerms, " inputs, got ", ins.size());
        TORCH_CHECK(c.size() == outs.size(), "linear_map_: ", outs.size(),
                    " outputs but ", c.size(), " rows of coefficients");
        const auto& ref = outs[0];
        const auto t = ref.scalar_type();
        TORCH_CHECK(decomm::is_supported_float(t), "linear_map_: unsupported dtype ", t);
        auto check = [&](const at::Tensor& a, const char* what, size_t j) {
          TORCH_CHECK(a.device().is_cpu() && a.is_contiguous() && a.scalar_type() == t &&
                          a.numel() == ref.numel(),
                      "linear_map_: ", what, " ", j, " must be a contiguous CPU tensor of ",
                      ref.numel(), " elements of dtype ", t, ", got ", a.numel(), " of ",
                      a.scalar_type(), a.is_contiguous() ? "" : " (not contiguous)",
                      a.device().is_cpu() ? "" : " (not on the CPU)");
        };
        std::vector<void*> po(outs.size());
        std::vector<const void*> pi(ins.size());
        std::vector<double> flat;
        for (size_t i = 0; i < outs.size(); ++i) {
          check(outs[i], "output", i);
          TORCH_CHECK(c[i].size() == ins.size(), "linear_map_: row ", i, " has ", c[i].size(),
                      " coefficients for ", ins.size(), " inputs");
          flat.insert(flat.end(), c[i].begin(), c[i].end());
          po[i] = outs[i].data_ptr();
        }
        const int64_t nbytes = ref.numel() * static_cast<int64_t>(ref.element_size());
        for (size_t j = 0; j < ins.size(); ++j) {
          check(ins[j], "input", j);
          pi[j] = ins[j].data_ptr();
        }
        // an output may be an input exactly, but must not overlap another buffer partly
        auto overlap = [nbytes](const void* a, const void* b) {
          const auto* x = static_cast<const char*>(a);
          const auto* y = static_cast<const char*>(b);
          return x != y && x < y + nbytes && y < x + nbytes;
        };
        for (size_t i = 0; i < po.size() && nbytes > 0; ++i) {
          for (size_t j = 0; j < pi.size(); ++j)
            TORCH_CHECK(!overlap(po[i], pi[j]), "linear_map_: output ", i,
                        " partly overlaps input ", j);
          for (size_t q = 0; q < i; ++q)
            TORCH_CHECK(po[i] != po[q] && !overlap(po[i], po[q]), "linear_map_: outputs ", q,
                        " and ", i, " overlap");
        }
        py::gil_scoped_release nogil;
        decomm::linear_map(po.data(), static_cast<int64_t>(po.size()), pi.data(),
                           static_cast<int64_t>(pi.size()), flat.data(), ref.numel(), t);
      });

  // The scratch-buffer pool, for tests: what it caches, and its byte limit.
  m.def("pool_sizes", &decomm::detail::pool_sizes);
  m.def("pool_limit", &decomm::detail::pool_limit);
  m.def("set_pool_limit", &decomm::detail::set_pool_limit);
  m.def("pool_get", &decomm::detail::pool_get);
  m.def("pool_put", &decomm::detail::pool_put);

  // The weighted sum alone: win_update's mix (into the window's exposed slot with
  // `out`), and tests and benchmarks of the kernel.
  m.def(
      "weighted_sum",
      [](const at::Tensor& x, double self_w, const std::vector<at::Tensor>& rs,
         const std::vector<double>& ws, std::optional<at::Tensor> out) {
        TORCH_CHECK(ws.size() == rs.size(), "one weight per neighbour tensor");
        SumOperands a = sum_operands(x, rs, out);
        py::gil_scoped_release nogil;
        decomm::weighted_sum(a.y.data_ptr(), x.data_ptr(), self_w, a.ptrs.data(), ws.data(),
                             static_cast<int64_t>(a.ptrs.size()), x.numel(), x.scalar_type());
        return a.y;
      },
      py::arg("x"), py::arg("self_w"), py::arg("rs"), py::arg("ws"), py::arg("out") = py::none());
  // The uniform mean (x + sum rs) / (len(rs) + 1) that neighbor_allreduce takes when
  // every weight is 1/m, for tests of the kernel.
  m.def(
      "mean_sum",
      [](const at::Tensor& x, const std::vector<at::Tensor>& rs, std::optional<at::Tensor> out) {
        TORCH_CHECK(!rs.empty(), "at least one neighbour tensor");
        SumOperands a = sum_operands(x, rs, out);
        py::gil_scoped_release nogil;
        decomm::mean_sum(a.y.data_ptr(), x.data_ptr(), a.ptrs.data(),
                         static_cast<int64_t>(a.ptrs.size()), x.numel(), x.scalar_type());
        return a.y;
      },
      py::arg("x"), py::arg("rs"), py::arg("out") = py::none());
}

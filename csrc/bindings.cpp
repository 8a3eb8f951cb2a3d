// Python bindings of the pinned state store (the only file that knows about pybind11).
#include <torch/extension.h>

#include <memory>

#include "pinned_store.h"

namespace py = pybind11;
using hift::PinnedStore;

// Errors leave this module as pybind11 ValueErrors raised here. On the GPU machine (torch 2.11, GCC 13.3,
// Python 3.12) a c10::Error leaving this module's methods crashed the process, while a trivial extension
// throwing the same error did not; the root cause is not known yet. A pybind11 error crossed cleanly there,
// so every entry point converts. (Constructing a pybind11 error needs no GIL, so released calls are fine.)
#define HIFT_GUARDED(...)                                    \
  try {                                                      \
    __VA_ARGS__;                                             \
  } catch (const c10::Error& e) {                            \
    throw py::value_error(e.what_without_backtrace());       \
  } catch (const std::exception& e) {                        \
    throw py::value_error(e.what());                         \
  }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hift_engine native pinned state store";
#ifdef HIFT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  using release = py::call_guard<py::gil_scoped_release>;
  using S = PinnedStore;
  py::class_<S>(m, "PinnedStore")
      .def(py::init([](std::vector<int64_t> numels, std::vector<at::Tensor> slots, const std::string& mode,
                       int64_t threads, int64_t chunk_bytes) {
             HIFT_GUARDED(return std::make_unique<S>(numels, slots, mode, threads, chunk_bytes))
           }),
           py::arg("numels"), py::arg("slots"), py::arg("alloc_mode") = "register", py::arg("touch_threads") = 0,
           py::arg("chunk_bytes") = 0,
           "Store for len(numels) groups of fp32 state, streamed into the given device slots.")
      .def("host", [](S& s, int64_t gid) { HIFT_GUARDED(return s.host(gid)) }, py::arg("gid"), release(),
           "CPU float32 view of a group's host buffer; allocates (and pins) it on first use.")
      .def("has_host", [](S& s, int64_t gid) { HIFT_GUARDED(return s.has_host(gid)) }, py::arg("gid"),
           "Whether a group's host buffer exists.")
      .def("fetch", [](S& s, int64_t gid, int64_t slot) { HIFT_GUARDED(s.fetch(gid, slot)) }, py::arg("gid"),
           py::arg("slot"), "Copy a group's host state into a slot on the in-stream, after the slot's previous users.")
      .def("zero", [](S& s, int64_t slot, int64_t numel) { HIFT_GUARDED(s.zero(slot, numel)) }, py::arg("slot"),
           py::arg("numel"), "Zero-fill the first numel elements of a slot on the in-stream (a first activation).")
      .def("writeback", [](S& s, int64_t gid, int64_t slot) { HIFT_GUARDED(s.writeback(gid, slot)) }, py::arg("gid"),
           py::arg("slot"), "Copy a slot into a group's host buffer on the out-stream, after the update that wrote it.")
      .def("mark_compute_done", [](S& s, int64_t slot) { HIFT_GUARDED(s.mark_compute_done(slot)) }, py::arg("slot"),
           "Record that the current stream's work on a slot has been queued.")
      .def("wait_arrival", [](S& s, int64_t slot) { HIFT_GUARDED(s.wait_arrival(slot)) }, py::arg("slot"),
           "Make the current stream wait until a slot's fetch or zero-fill finished.")
      .def("wait_host", [](S& s, int64_t gid) { HIFT_GUARDED(s.wait_host(gid)) }, py::arg("gid"), release(),
           "Block until a group's host buffer holds its latest write-back.")
      .def("synchronize", [](S& s) { HIFT_GUARDED(s.synchronize()) }, release(), "Block until every copy in flight finished.")
      .def("close", [](S& s) { HIFT_GUARDED(s.close()) }, release(), "Finish copies; release streams, events and host memory.")
      .def_property_readonly("host_bytes", &S::host_bytes, "Host bytes reserved (whole pages).")
      .def_property_readonly("alloc_seconds", &S::alloc_seconds, "Seconds spent allocating and pinning.")
      .def_property_readonly("is_cuda", &S::is_cuda, "Whether the slots are CUDA tensors.");
}

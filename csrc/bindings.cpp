// Python bindings of the pinned state store (the only file that knows about pybind11).
#include <torch/extension.h>

#include "pinned_store.h"

namespace py = pybind11;
using hift::PinnedStore;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "hift_engine native pinned state store";
#ifdef HIFT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  using release = py::call_guard<py::gil_scoped_release>;
  py::class_<PinnedStore>(m, "PinnedStore")
      .def(py::init<std::vector<int64_t>, std::vector<at::Tensor>, const std::string&, int64_t>(), py::arg("numels"),
           py::arg("slots"), py::arg("alloc_mode") = "register", py::arg("touch_threads") = 0,
           "Store for len(numels) groups of fp32 state, streamed into the given device slots.")
      .def("host", &PinnedStore::host, py::arg("gid"), release(),
           "CPU float32 view of a group's host buffer; allocates (and pins) it on first use.")
      .def("has_host", &PinnedStore::has_host, py::arg("gid"), "Whether a group's host buffer exists.")
      .def("fetch", &PinnedStore::fetch, py::arg("gid"), py::arg("slot"),
           "Copy a group's host state into a slot on the in-stream, after the slot's previous users.")
      .def("zero", &PinnedStore::zero, py::arg("slot"), py::arg("numel"),
           "Zero-fill the first numel elements of a slot on the in-stream (a group's first activation).")
      .def("writeback", &PinnedStore::writeback, py::arg("gid"), py::arg("slot"),
           "Copy a slot into a group's host buffer on the out-stream, after the update that wrote it.")
      .def("mark_compute_done", &PinnedStore::mark_compute_done, py::arg("slot"),
           "Record that the current stream's work on a slot has been queued.")
      .def("wait_arrival", &PinnedStore::wait_arrival, py::arg("slot"),
           "Make the current stream wait until a slot's fetch or zero-fill finished.")
      .def("wait_host", &PinnedStore::wait_host, py::arg("gid"), release(),
           "Block until a group's host buffer holds its latest write-back.")
      .def("synchronize", &PinnedStore::synchronize, release(), "Block until every copy in flight finished.")
      .def("close", &PinnedStore::close, release(), "Finish copies and release streams, events and host memory.")
      .def_property_readonly("host_bytes", &PinnedStore::host_bytes, "Host bytes reserved (whole pages).")
      .def_property_readonly("alloc_seconds", &PinnedStore::alloc_seconds, "Seconds spent allocating and pinning.")
      .def_property_readonly("is_cuda", &PinnedStore::is_cuda, "Whether the slots are CUDA tensors.");
}

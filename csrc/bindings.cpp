// Python bindings of the pinned state store (the only file that knows about pybind11).
#include <torch/extension.h>

#include "check.h"
#include "pinned_store.h"

#ifdef HIFT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace py = pybind11;
using hift::PinnedStore;

// Errors: the store throws std::invalid_argument for bad arguments (ValueError here) and std::runtime_error
// for failed CUDA or allocation calls (RuntimeError), never c10::Error; see check.h for why.

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
      .def(py::init<std::vector<int64_t>, std::vector<at::Tensor>, int64_t, std::vector<int64_t>, bool>(),
           py::arg("numels"), py::arg("slots"), py::arg("chunk_bytes") = 0,
           py::arg("alloc_order") = std::vector<int64_t>{}, py::arg("pin_context") = true,
           "Store for len(numels) groups of fp32 state, streamed into the given slots (paced if chunk_bytes > 0); "
           "host buffers are allocated in the background in alloc_order (default: group order) and, on CUDA with "
           "pin_context, pinned from a second context of the device so that pinning never holds up other CUDA calls.")
      .def("host", &S::host, py::arg("gid"), release(),
           "CPU float32 view of a group's host buffer; allocates (and pins) it if the background thread has not yet.")
      .def("fetch", &S::fetch, py::arg("gid"), py::arg("slot"), release(),
           "Copy a group's host state into a slot on the in-stream, after the slot's previous users.")
      .def("zero", &S::zero, py::arg("slot"), py::arg("numel"), release(),
           "Zero-fill the first numel elements of a slot on the in-stream (a first activation).")
      .def("writeback", &S::writeback, py::arg("gid"), py::arg("slot"), release(),
           "Copy a slot into a group's host buffer on the out-stream, after the update that wrote it.")
      .def("mark_compute_done", &S::mark_compute_done, py::arg("slot"), release(),
           "Record that the current stream's work on a slot has been queued.")
      .def("wait_arrival", &S::wait_arrival, py::arg("slot"), release(),
           "Make the current stream wait until a slot's fetch or zero-fill finished.")
      .def("wait_host", &S::wait_host, py::arg("gid"), release(),
           "Block until a group's host buffer holds its latest write-back.")
      .def("synchronize", &S::synchronize, release(), "Block until every copy in flight finished (no-op once closed).")
      .def("wait_allocated", &S::wait_allocated, py::arg("count") = -1, release(),
           "Block until the background thread has allocated the first `count` host buffers of alloc_order (default: "
           "every one), or stopped; asking for more than pin_first starts the pinning of the rest.")
      .def("start_pinning", &S::start_pinning, release(),
           "Let the background allocator pin the buffers after the first pin_first (held until now so that pinning, "
           "which takes a driver lock cudaMalloc takes too, does not slow a first forward's allocations). Idempotent.")
      .def_property_readonly("pin_first", &S::pin_first,
                             "Buffers pinned from construction; the rest wait for start_pinning() (-1: none wait).")
      .def("close", &S::close, release(), "Finish copies; release streams, events and host memory (idempotent).")
      .def(
          "alloc_stats",
          [](const S& s) {
            auto a = s.alloc_stats();
            py::dict d;
            d["map_s"] = a.map_s;
            d["touch_s"] = a.touch_s;
            d["register_s"] = a.register_s;
            d["wait_s"] = a.wait_s;
            d["held_s"] = a.held_s;
            d["waits"] = a.waits;
            d["touch_threads"] = a.touch_threads;
            d["touch_leads"] = a.touch_leads;
            return d;
          },
          "Seconds spent reserving address space, on first touch and on pinning (summed over threads), and how long (and how often) "
          "callers waited for a host buffer that was not ready, how long pinning was held for start_pinning(); per "
          "buffer the background thread touched, its touch threads and its lead (buffers callers had yet to ask for "
          "before it).")
      .def("time_copies", &S::time_copies, py::arg("jobs"), py::call_guard<py::gil_scoped_release>(),
           "Diagnostics: time the next `jobs` copies of each direction on the GPU (no-op on a CPU store).")
      .def(
          "copy_times",
          [](S& s) {
            auto [h2d, d2h] = s.copy_times();
            py::dict d;
            d["h2d"] = h2d;
            d["d2h"] = d2h;
            return d;
          },
          "(milliseconds, bytes) of each timed copy that finished, per direction ('h2d', 'd2h'), in issue order; a "
          "copy's time runs from when its stream reached it (after the update it waits for) to its last byte.")
      .def(
          "copy_waits",
          [](const S& s) {
            py::dict d;
            for (const auto& [name, seconds] : s.copy_waits()) d[py::str(name)] = seconds;
            return d;
          },
          "Seconds the threads calling the store spent blocked on the copiers (summed), by where: 'arrival' (an update waiting until its "
          "group's fetch was issued), 'in_queue', 'writeback_issued', 'out_queue', 'host_read' (0 on a CPU store).")
      .def_property_readonly("host_bytes", &S::host_bytes, "Host bytes reserved (whole pages).")
      .def_property_readonly("pin_context_active", &S::pin_context_active,
                             "Whether host buffers are pinned from the device's pinning context.")
      .def_property_readonly("pin_context_bytes", &S::pin_context_bytes,
                             "Device memory the pinning context took when it was made (0 when not used).")
      .def_property_readonly("pin_context_error", &S::pin_context_error,
                             "Why the pinning context is not used although asked for (\"\" otherwise).");
#ifdef HIFT_WITH_CUDA
  // Memory plans read the device's free memory before any store exists; holding the pinning context first makes
  // its device memory part of what they see (stores made while it is held share it).
  py::class_<hift::PinContext, std::shared_ptr<hift::PinContext>>(m, "PinContext",
                                                                 "A device's pinning context, alive while held.")
      .def_property_readonly("device_bytes", &hift::PinContext::device_bytes,
                             "Device memory the context took when it was made.");
  m.def(
      "hold_pin_context",
      [](int device) {
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess) cudaGetLastError();
        if (device < 0 || device >= count)
          throw std::invalid_argument(hift::cat("hold_pin_context: device ", device, " is not one of the ", count,
                                                " CUDA devices"));
        std::string why;
        std::shared_ptr<hift::PinContext> ctx;
        {
          py::gil_scoped_release unlocked;
          c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
          ctx = hift::PinContext::acquire(device, &why);
        }
        return std::make_pair(ctx, why);
      },
      py::arg("device"),
      "(context, \"\") for the device's pinning context (made now if no store holds it yet), or (None, why not).");
#endif
}

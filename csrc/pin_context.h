// A second CUDA context on the store's device, used only to pin host memory (cuMemHostRegister, PORTABLE).
//
// Why: cudaHostRegister in the process's primary context holds the driver's lock while it pins, and every CUDA call
// of every other thread (the training thread's launches, the copy pacers' copies and events) waits behind it: on an
// H200, 38-52 kernel launches per second instead of ~220 000 while 16 GiB were registered. Registered from another
// context, the same pinning leaves them alone (~240 000 per second), and PORTABLE memory counts as pinned in every
// context (copies into it run at 51.5 GiB/s). Measured by benchmarks/pin_probe.cu ("stall", "ctxmem").
//
// Cost: the context's own device memory, about 260 MiB on an H200 once its stack, heap and printf limits are set to
// zero (the context never runs a kernel). Registrations die with their context, so it lives as long as any buffer
// registered in it (each HostBuffer holds a shared_ptr); one context per device is shared by every store.
//
// Driver functions come from cudaGetDriverEntryPointByVersion, so the extension needs no link against libcuda.
#pragma once

#ifdef HIFT_WITH_CUDA
#include <cuda.h>

#include <cstddef>
#include <memory>
#include <string>

namespace hift {

class PinContext {
 public:
  // The device's pinning context (created on first use, shared while anyone holds it), or nullptr with `why` set
  // when the driver refuses one (an exclusive-process device, MPS limits, a driver without the entry points).
  static std::shared_ptr<PinContext> acquire(int device, std::string* why);
  ~PinContext();
  PinContext(const PinContext&) = delete;
  PinContext& operator=(const PinContext&) = delete;

  // Pin [p, p + bytes) as PORTABLE host memory from this context; "" on success, else the driver's error.
  std::string pin(void* p, size_t bytes);
  void unpin(void* p);  // never throws
  // Device memory the context took when it was made (free memory before minus after), in bytes.
  int64_t device_bytes() const { return device_bytes_; }

 private:
  PinContext() = default;
  CUcontext ctx_ = nullptr;
  int64_t device_bytes_ = 0;
};

}  // namespace hift
#endif

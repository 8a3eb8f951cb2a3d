// The pinning context (see pin_context.h).
#ifdef HIFT_WITH_CUDA
#include "pin_context.h"

#include <cuda_runtime.h>

#include <map>
#include <mutex>

#include "check.h"

namespace hift {

namespace {
// The driver calls this file makes, by the ABI version whose signature is written here (stable since then).
struct Driver {
  CUresult (*device_get)(CUdevice*, int) = nullptr;                     // cuDeviceGet, 2.0
  CUresult (*ctx_create)(CUcontext*, unsigned int, CUdevice) = nullptr;  // cuCtxCreate_v2, 3.2
  CUresult (*ctx_destroy)(CUcontext) = nullptr;                         // cuCtxDestroy_v2, 4.0
  CUresult (*ctx_push)(CUcontext) = nullptr;                            // cuCtxPushCurrent_v2, 4.0
  CUresult (*ctx_pop)(CUcontext*) = nullptr;                            // cuCtxPopCurrent_v2, 4.0
  CUresult (*ctx_set_limit)(CUlimit, size_t) = nullptr;                 // cuCtxSetLimit, 3.1
  CUresult (*host_register)(void*, size_t, unsigned int) = nullptr;     // cuMemHostRegister_v2, 6.5
  CUresult (*host_unregister)(void*) = nullptr;                         // cuMemHostUnregister, 4.0
  CUresult (*error_string)(CUresult, const char**) = nullptr;           // cuGetErrorString, 6.0
  std::string missing;                                                  // "" when every entry point was found
};

// Entry points by explicit ABI version need a CUDA 12.5 runtime (cudaGetDriverEntryPointByVersion). Older runtimes
// hand out their own release's newest variant (cuCtxCreate_v3 under 12.0-12.4, with other arguments), so there the
// pinning context is simply not offered.
template <class Fn>
void load(Fn& fn, const char* symbol, unsigned int version, std::string& missing) {
#if CUDART_VERSION >= 12050
  void* p = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  cudaError_t err = cudaGetDriverEntryPointByVersion(symbol, &p, version, cudaEnableDefault, &found);
  if (err == cudaSuccess && found == cudaDriverEntryPointSuccess && p != nullptr) {
    fn = reinterpret_cast<Fn>(p);
    return;
  }
  cudaGetLastError();
#else
  (void)fn;
  (void)version;
#endif
  missing += missing.empty() ? symbol : std::string(", ") + symbol;
}

const Driver& driver() {
  // Never destroyed: a context can be released during static destruction, after a static Driver would be gone.
  static const Driver& d = *new Driver([] {
    Driver x;
    load(x.device_get, "cuDeviceGet", 2000, x.missing);
    load(x.ctx_create, "cuCtxCreate", 3020, x.missing);
    load(x.ctx_destroy, "cuCtxDestroy", 4000, x.missing);
    load(x.ctx_push, "cuCtxPushCurrent", 4000, x.missing);
    load(x.ctx_pop, "cuCtxPopCurrent", 4000, x.missing);
    load(x.ctx_set_limit, "cuCtxSetLimit", 3010, x.missing);
    load(x.host_register, "cuMemHostRegister", 6050, x.missing);
    load(x.host_unregister, "cuMemHostUnregister", 4000, x.missing);
    load(x.error_string, "cuGetErrorString", 6000, x.missing);
#if CUDART_VERSION < 12050
    x.missing += " (the extension was built with a CUDA runtime older than 12.5)";
#endif
    return x;
  }());
  return d;
}

std::string describe(CUresult r) {
  const char* s = nullptr;
  if (driver().error_string != nullptr) driver().error_string(r, &s);
  return s != nullptr ? std::string(s) : "CUDA driver error " + std::to_string(static_cast<int>(r));
}

std::mutex cache_mu;
std::map<int, std::weak_ptr<PinContext>> cache;  // one per device, alive while a store or buffer holds it
}  // namespace

std::shared_ptr<PinContext> PinContext::acquire(int device, std::string* why) {
  std::lock_guard<std::mutex> lock(cache_mu);
  if (auto existing = cache[device].lock()) return existing;
  const Driver& d = driver();
  if (!d.missing.empty()) {
    *why = "the CUDA driver does not provide " + d.missing;
    return nullptr;
  }
  CUdevice dev;
  CUresult r = d.device_get(&dev, device);
  if (r != CUDA_SUCCESS) {
    *why = "cuDeviceGet: " + describe(r);
    return nullptr;
  }
  size_t free_before = 0, free_after = 0, total = 0;
  if (cudaMemGetInfo(&free_before, &total) != cudaSuccess) cudaGetLastError();  // the size is informative only
  std::shared_ptr<PinContext> ctx(new PinContext());
  r = d.ctx_create(&ctx->ctx_, 0, dev);  // made current on this thread: limits below, then popped
  if (r != CUDA_SUCCESS) {
    ctx->ctx_ = nullptr;
    *why = "cuCtxCreate: " + describe(r);
    return nullptr;
  }
  // It never runs a kernel: give back what a context reserves for kernels' stacks, malloc heap and printf.
  for (CUlimit limit : {CU_LIMIT_STACK_SIZE, CU_LIMIT_MALLOC_HEAP_SIZE, CU_LIMIT_PRINTF_FIFO_SIZE})
    d.ctx_set_limit(limit, 0);
  CUcontext popped = nullptr;
  d.ctx_pop(&popped);
  cudaGetLastError();
  if (cudaMemGetInfo(&free_after, &total) != cudaSuccess) cudaGetLastError();  // the runtime's context again
  ctx->device_bytes_ = free_before > free_after ? static_cast<int64_t>(free_before - free_after) : 0;
  cache[device] = ctx;
  return ctx;
}

PinContext::~PinContext() {
  // Never throws (also runs at interpreter exit, when the driver may be shutting down).
  if (ctx_ != nullptr && driver().ctx_destroy != nullptr) driver().ctx_destroy(ctx_);
}

std::string PinContext::pin(void* p, size_t bytes) {
  const Driver& d = driver();
  CUresult r = d.ctx_push(ctx_);
  if (r != CUDA_SUCCESS) return "cuCtxPushCurrent: " + describe(r);
  r = d.host_register(p, bytes, CU_MEMHOSTREGISTER_PORTABLE);
  CUcontext popped = nullptr;
  d.ctx_pop(&popped);
  return r == CUDA_SUCCESS ? std::string() : "cuMemHostRegister: " + describe(r);
}

void PinContext::unpin(void* p) {
  const Driver& d = driver();
  if (d.ctx_push(ctx_) != CUDA_SUCCESS) return;
  d.host_unregister(p);
  CUcontext popped = nullptr;
  d.ctx_pop(&popped);
}

}  // namespace hift
#endif

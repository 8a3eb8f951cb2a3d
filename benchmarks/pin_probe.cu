// Where the time of pinning host memory goes, piece by piece, on the machine it runs on (no torch involved):
//   first touch (the kernel maps and zeroes pages) with 1..16 threads, with and without the huge-page hint;
//   cudaHostRegister of touched memory, whole or in 256 MiB pieces, from one thread and from several at once;
//   cudaHostAlloc for comparison; and whether copies that span two separate registrations are correct and
//   asynchronous (the question that keeps HIFT_REGISTER_PIECE_MIB opt-in); and what a registration running on
//   another thread does to the work of a training loop ("stall"): the latency of the CUDA calls a training thread
//   makes, the GPU's own progress on queued kernels, and a device-to-host copy's rate, each idle and while
//   cudaHostRegister, cudaHostAlloc, or a registration from a second context runs.
//
//   nvcc -O2 -std=c++17 benchmarks/pin_probe.cu -lcuda -o /tmp/pin_probe && /tmp/pin_probe [GiB per case, default 8] [seam|stall]
// ("seam": only the copies across two registrations; "stall": only the concurrency probe)
// Prints one "key value" line per measurement (rates in GiB/s) and a final JSON object.
#include <cuda.h>
#include <cuda_runtime.h>
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {
constexpr size_t kGiB = size_t(1) << 30, kMiB = size_t(1) << 20, kPage = 4096, kHuge = 2 * kMiB;
std::vector<std::pair<std::string, double>> results;

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) { std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e)); std::exit(1); }
}
void record(const std::string& key, double value) {
  std::printf("%-48s %.3f\n", key.c_str(), value);
  std::fflush(stdout);
  results.emplace_back(key, value);
}
std::string read_file(const char* path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  std::string out = s.str();
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}
long anon_huge_kib() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  long v;
  std::string unit;
  while (f >> key >> v >> unit)
    if (key == "AnonHugePages:") return v;
  return -1;
}

char* map(size_t bytes, bool huge) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) { std::perror("mmap"); std::exit(1); }
  madvise(p, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  return static_cast<char*>(p);
}
void touch(char* p, size_t bytes, int threads) {
  size_t per = ((bytes / threads + kHuge - 1) / kHuge) * kHuge;
  std::vector<std::thread> pool;
  for (size_t start = 0; start < bytes; start += per)
    pool.emplace_back([=] {
      volatile char* v = p;
      for (size_t off = start; off < std::min(bytes, start + per); off += kPage) v[off] = 0;
    });
  for (auto& t : pool) t.join();
}
void reg(char* p, size_t bytes, size_t piece) {
  for (size_t off = 0; off < bytes; off += piece)
    check(cudaHostRegister(p + off, std::min(piece, bytes - off), cudaHostRegisterDefault), "cudaHostRegister");
}
void unreg(char* p, size_t bytes, size_t piece) {
  for (size_t off = 0; off < bytes; off += piece) cudaHostUnregister(p + off);
}

__global__ void noop() {}
__global__ void spin(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

// Something that pins host memory, run on its own thread while the probe's thread works:
//   register       cudaHostRegister of every buffer, whole (what the store's background allocator does)
//   hostalloc      cudaHostAlloc of 2 x 2 GiB (the driver allocates and pins)
//   other_context  cuMemHostRegister(PORTABLE) of every buffer from a second context of the same device, created
//                  on that thread: is the lock per context? (PORTABLE memory counts as pinned in every context)
struct Blocker {
  std::string kind;
  std::vector<char*>* bufs;
  size_t buf;
  std::atomic<bool> done{false};
  double seconds = 0;
  std::vector<void*> allocated;
  CUcontext ctx = nullptr;
  std::thread thread;

  void start() {
    done = false;
    thread = std::thread([this] {
      const double t0 = now();
      if (kind == "register") {
        for (char* p : *bufs) reg(p, buf, buf);
      } else if (kind == "hostalloc") {
        for (int i = 0; i < 2; ++i) {
          void* h = nullptr;
          check(cudaHostAlloc(&h, buf, cudaHostAllocDefault), "cudaHostAlloc");
          allocated.push_back(h);
        }
      } else {
        CUdevice dev;
        cuDeviceGet(&dev, 0);
        if (cuCtxCreate(&ctx, nullptr, 0, dev) != CUDA_SUCCESS) { std::fprintf(stderr, "cuCtxCreate failed\n"); std::exit(1); }
        for (char* p : *bufs)
          if (cuMemHostRegister(p, buf, CU_MEMHOSTREGISTER_PORTABLE) != CUDA_SUCCESS) {
            std::fprintf(stderr, "cuMemHostRegister failed\n");
            std::exit(1);
          }
      }
      seconds = now() - t0;
      done = true;
    });
  }
  // Join, then undo (outside any measurement).
  void finish() {
    thread.join();
    if (kind == "register") {
      for (char* p : *bufs) unreg(p, buf, buf);
    } else if (kind == "hostalloc") {
      for (void* h : allocated) cudaFreeHost(h);
      allocated.clear();
    } else {
      cuCtxSetCurrent(ctx);
      for (char* p : *bufs) cuMemHostUnregister(p);
      cuCtxDestroy(ctx);
      ctx = nullptr;
      check(cudaSetDevice(0), "cudaSetDevice");
    }
  }
};

// The device memory a second context of the device takes: at creation, then after lowering the limits that reserve
// device memory per context (stack, malloc heap, printf FIFO) to their minimum. (The store never launches kernels in
// its pinning context, so it needs none of them.)
void context_memory_probe() {
  check(cudaFree(nullptr), "context");
  CUdevice dev;
  cuDeviceGet(&dev, 0);
  size_t before = 0, created = 0, trimmed = 0, total = 0;
  check(cudaMemGetInfo(&before, &total), "mem info");
  CUcontext ctx;
  if (cuCtxCreate(&ctx, nullptr, 0, dev) != CUDA_SUCCESS) { std::fprintf(stderr, "cuCtxCreate failed\n"); std::exit(1); }
  check(cudaMemGetInfo(&created, &total), "mem info");
  record("ctxmem_created_MiB", (double(before) - double(created)) / kMiB);
  cuCtxSetLimit(CU_LIMIT_STACK_SIZE, 0);
  cuCtxSetLimit(CU_LIMIT_MALLOC_HEAP_SIZE, 0);
  cuCtxSetLimit(CU_LIMIT_PRINTF_FIFO_SIZE, 0);
  check(cudaMemGetInfo(&trimmed, &total), "mem info");
  record("ctxmem_trimmed_MiB", (double(before) - double(trimmed)) / kMiB);
  cuCtxDestroy(ctx);
  check(cudaSetDevice(0), "cudaSetDevice");
  size_t after = 0;
  check(cudaMemGetInfo(&after, &total), "mem info");
  record("ctxmem_after_destroy_MiB", (double(before) - double(after)) / kMiB);
}

// What pinning on another thread costs this one, measured idle (for the blocker's duration as last measured) and
// while each kind of blocker runs:
//   calls   the calls a training thread makes, each in its own loop until the blocker is done: kernel launches
//           (synchronised every 64, so the launch queue never fills), event record + query, 4 KiB device-to-host
//           copies into pinned memory (synchronised every 64): calls per second and the longest call
//   gpu     300 kernels spinning 2 ms each (0.6 s), all queued BEFORE the blocker starts: elapsed GPU time
//   d2h     16 device-to-host copies of 2 GiB into pinned memory (~0.6 s), queued before the blocker starts: rate
// and, for other_context, whether memory registered there is pinned here (a 2 GiB copy's rate into it).
void stall_probe(size_t total) {
  const size_t buf = 2 * kGiB;
  const int nbuf = int(total / buf);
  std::vector<char*> bufs;
  for (int i = 0; i < nbuf; ++i) { bufs.push_back(map(buf, true)); touch(bufs.back(), buf, 16); }
  cuInit(0);
  cudaStream_t s;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
  cudaEvent_t a, b, e;
  for (cudaEvent_t* ev : {&a, &b}) check(cudaEventCreate(ev), "event");
  check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "event");
  void *small_d, *small_h, *big_d;
  check(cudaMalloc(&small_d, 4096), "cudaMalloc");
  check(cudaMallocHost(&small_h, 4096), "cudaMallocHost");
  check(cudaMalloc(&big_d, buf), "cudaMalloc");
  char* big_h = map(buf, true);
  touch(big_h, buf, 16);
  reg(big_h, buf, buf);
  noop<<<1, 1, 0, s>>>();  // load the module now, not inside the first measurement
  check(cudaStreamSynchronize(s), "sync");
  int khz = 0;
  check(cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0), "clock rate");

  using Call = std::function<void(long)>;
  const std::vector<std::pair<std::string, Call>> calls = {
      {"launch", [&](long i) { noop<<<1, 1, 0, s>>>(); if (i % 64 == 63) check(cudaStreamSynchronize(s), "sync"); }},
      {"event", [&](long) { check(cudaEventRecord(e, s), "record"); cudaEventQuery(e); }},
      {"copy4k", [&](long i) {
         check(cudaMemcpyAsync(small_h, small_d, 4096, cudaMemcpyDeviceToHost, s), "copy");
         if (i % 64 == 63) check(cudaStreamSynchronize(s), "sync");
       }},
  };
  double window = 0.5;  // the idle window: the last blocker's duration
  for (const std::string kind : {"none", "register", "hostalloc", "other_context"}) {
    Blocker blk;
    blk.kind = kind;
    blk.bufs = &bufs;
    blk.buf = buf;
    const bool idle = kind == "none";
    for (const auto& [name, call] : calls) {
      if (!idle) blk.start();
      const double t0 = now();
      double worst = 0;
      long n = 0;
      while (idle ? now() - t0 < window : !blk.done.load()) {
        const double c0 = now();
        call(n++);
        worst = std::max(worst, now() - c0);
      }
      const double elapsed = now() - t0;
      check(cudaStreamSynchronize(s), "sync");
      if (!idle) blk.finish();
      record("stall_" + kind + "_" + name + "_calls_per_s", n / elapsed);
      record("stall_" + kind + "_" + name + "_max_ms", worst * 1e3);
      if (!idle) window = blk.seconds;
    }
    if (!idle) record("stall_" + kind + "_seconds", blk.seconds);
    // queued work, then the blocker
    check(cudaEventRecord(a, s), "record");
    for (int i = 0; i < 300; ++i) spin<<<1, 1, 0, s>>>(2LL * khz);
    check(cudaEventRecord(b, s), "record");
    if (!idle) blk.start();
    check(cudaEventSynchronize(b), "sync");
    if (!idle) blk.finish();
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b), "elapsed");
    record("stall_" + kind + "_gpu_600ms_of_spins_ms", ms);
    check(cudaEventRecord(a, s), "record");
    for (int i = 0; i < 16; ++i) check(cudaMemcpyAsync(big_h, big_d, buf, cudaMemcpyDeviceToHost, s), "d2h");
    check(cudaEventRecord(b, s), "record");
    if (!idle) blk.start();
    check(cudaEventSynchronize(b), "sync");
    if (!idle) blk.finish();
    check(cudaEventElapsedTime(&ms, a, b), "elapsed");
    record("stall_" + kind + "_d2h_GiBps", 32.0 / (ms / 1e3));
    if (kind == "other_context") {  // memory registered PORTABLE in the other context: pinned here?
      blk.start();
      blk.thread.join();
      check(cudaEventRecord(a, s), "record");
      check(cudaMemcpyAsync(bufs[0], big_d, buf, cudaMemcpyDeviceToHost, s), "d2h into other-context memory");
      check(cudaEventRecord(b, s), "record");
      check(cudaEventSynchronize(b), "sync");
      check(cudaEventElapsedTime(&ms, a, b), "elapsed");
      record("other_context_registered_d2h_GiBps", 2.0 / (ms / 1e3));
      cudaPointerAttributes attr{};
      check(cudaPointerGetAttributes(&attr, bufs[0]), "attributes");
      record("other_context_memory_type_here", attr.type);  // 1: registered host memory, 0: unregistered
      // what the other context costs in device memory, and whether its registrations outlive it
      size_t free_with = 0, free_without = 0, dev_total = 0;
      check(cudaMemGetInfo(&free_with, &dev_total), "mem info");
      cuCtxSetCurrent(blk.ctx);
      cuCtxDestroy(blk.ctx);
      check(cudaSetDevice(0), "cudaSetDevice");
      check(cudaMemGetInfo(&free_without, &dev_total), "mem info");
      record("other_context_device_MiB", (double(free_without) - double(free_with)) / kMiB);
      cudaPointerAttributes after{};
      cudaError_t st = cudaPointerGetAttributes(&after, bufs[0]);
      cudaGetLastError();
      record("other_context_memory_type_after_destroy", st == cudaSuccess ? after.type : -1);
      for (char* p : bufs) cudaHostUnregister(p);  // in case they outlived it
      cudaGetLastError();
    }
  }
  unreg(big_h, buf, buf);
  munmap(big_h, buf);
  cudaFree(big_d);
  cudaFree(small_d);
  cudaFreeHost(small_h);
  for (char* p : bufs) munmap(p, buf);
}
}  // namespace

int main(int argc, char** argv) {
  const size_t total = (argc > 1 ? std::atol(argv[1]) : 8) * kGiB;
  const bool seam_only = argc > 2 && std::string(argv[2]) == "seam";
  const bool stall_only = argc > 2 && std::string(argv[2]) == "stall";
  if (argc > 2 && std::string(argv[2]) == "ctxmem") {
    cuInit(0);
    context_memory_probe();
    return 0;
  }
  const size_t buf = 2 * kGiB;  // about one 7B block's bf16-mixed state (2.2 GiB)
  const int nbuf = int(total / buf);
  check(cudaSetDevice(0), "cudaSetDevice");
  check(cudaFree(nullptr), "context");
  std::printf("thp_enabled %s\nthp_defrag %s\ncores %u\n",
              read_file("/sys/kernel/mm/transparent_hugepage/enabled").c_str(),
              read_file("/sys/kernel/mm/transparent_hugepage/defrag").c_str(), std::thread::hardware_concurrency());

  if (stall_only) {
    stall_probe(total);
  } else {
  // 1. first touch, per thread count and huge-page hint
  for (bool huge : {true, false})
    if (!seam_only)
    for (int threads : {1, 4, 8, 16}) {
      if (!huge && threads != 16 && threads != 1) continue;
      std::vector<char*> bufs;
      long h0 = anon_huge_kib();
      double t0 = now();
      for (int i = 0; i < nbuf; ++i) { bufs.push_back(map(buf, huge)); touch(bufs.back(), buf, threads); }
      double dt = now() - t0;
      std::string tag = std::string(huge ? "huge" : "nohuge") + "_t" + std::to_string(threads);
      record("touch_" + tag + "_GiBps", double(total) / kGiB / dt);
      record("touch_" + tag + "_huge_share", double(anon_huge_kib() - h0) * 1024 / double(total));
      // 2. register what was touched: whole buffers, from one thread
      if (threads == 16) {
        t0 = now();
        for (char* p : bufs) reg(p, buf, buf);
        record("register_whole_" + tag + "_GiBps", double(total) / kGiB / (now() - t0));
        t0 = now();
        for (char* p : bufs) unreg(p, buf, buf);
        record("unregister_" + tag + "_GiBps", double(total) / kGiB / (now() - t0));
        t0 = now();
        for (char* p : bufs) reg(p, buf, 256 * kMiB);
        record("register_256MiB_pieces_" + tag + "_GiBps", double(total) / kGiB / (now() - t0));
        for (char* p : bufs) unreg(p, buf, 256 * kMiB);
        // several threads registering their own buffers at once: does the driver serialise them?
        for (int par : {2, 4}) {
          t0 = now();
          std::vector<std::thread> pool;
          for (int w = 0; w < par; ++w)
            pool.emplace_back([&, w] {
              for (int i = w; i < nbuf; i += par) reg(bufs[i], buf, buf);
            });
          for (auto& t : pool) t.join();
          record("register_whole_" + tag + "_" + std::to_string(par) + "threads_GiBps", double(total) / kGiB / (now() - t0));
          for (char* p : bufs) unreg(p, buf, buf);
        }
      }
      for (char* p : bufs) munmap(p, buf);
    }

  // 3. register untouched memory (the driver faults the pages in itself), and cudaHostAlloc
  if (!seam_only) {
    std::vector<char*> bufs;
    double t0 = now();
    for (int i = 0; i < nbuf; ++i) { bufs.push_back(map(buf, true)); reg(bufs.back(), buf, buf); }
    record("register_untouched_huge_GiBps", double(total) / kGiB / (now() - t0));
    for (char* p : bufs) { unreg(p, buf, buf); munmap(p, buf); }
    std::vector<void*> hs(nbuf);
    t0 = now();
    for (auto& h : hs) check(cudaHostAlloc(&h, buf, cudaHostAllocDefault), "cudaHostAlloc");
    record("cudaHostAlloc_GiBps", double(total) / kGiB / (now() - t0));
    for (auto& h : hs) cudaFreeHost(h);
  }

  // 4. one mapping registered as two 256 MiB pieces; copies of a range across the seam, both ways
  {
    const size_t piece = 256 * kMiB, n = 2 * piece, len = 64 * kMiB, at = piece - len / 2;
    char* p = map(n, true);
    touch(p, n, 4);
    reg(p, n, piece);
    for (size_t i = 0; i < n; i += 4) *reinterpret_cast<unsigned*>(p + i) = unsigned(i * 2654435761u);
    void* d;
    check(cudaMalloc(&d, len), "cudaMalloc");
    cudaStream_t s;
    check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
    // H2D across the seam; is the host call asynchronous (returns before the copy is done)?
    // A copy the runtime refuses is recorded (as the error's number), not fatal.
    double t0 = now();
    cudaError_t h2d_err = cudaMemcpyAsync(d, p + at, len, cudaMemcpyHostToDevice, s);
    cudaGetLastError();
    record("seam_h2d_error", h2d_err);
    double issued = now() - t0;
    bool pending = cudaStreamQuery(s) == cudaErrorNotReady;
    check(cudaStreamSynchronize(s), "sync");
    double done = now() - t0;
    std::vector<char> back(len);
    check(cudaMemcpy(back.data(), d, len, cudaMemcpyDeviceToHost), "d2h check");
    bool h2d_ok = h2d_err == cudaSuccess && std::memcmp(back.data(), p + at, len) == 0;
    // D2H across the seam into the registered memory
    check(cudaMemset(d, 0x5a, len), "memset");
    check(cudaDeviceSynchronize(), "sync");
    t0 = now();
    cudaError_t d2h_err = cudaMemcpyAsync(p + at, d, len, cudaMemcpyDeviceToHost, s);
    cudaGetLastError();
    record("seam_d2h_error", d2h_err);
    double d2h_issued = now() - t0;
    check(cudaStreamSynchronize(s), "sync");
    double d2h_done = now() - t0;
    bool d2h_ok = d2h_err == cudaSuccess;
    for (size_t i = 0; i < len; ++i) d2h_ok &= p[at + i] == 0x5a;
    bool neighbours_ok = *reinterpret_cast<unsigned*>(p + at - 4) == unsigned((at - 4) * 2654435761u) &&
                         *reinterpret_cast<unsigned*>(p + at + len) == unsigned((at + len) * 2654435761u);
    record("seam_h2d_correct", h2d_ok);
    record("seam_h2d_issue_ms", issued * 1e3);
    record("seam_h2d_done_ms", done * 1e3);
    record("seam_h2d_pending_after_issue", pending);
    record("seam_d2h_correct", d2h_ok && neighbours_ok);
    record("seam_d2h_issue_ms", d2h_issued * 1e3);
    record("seam_d2h_done_ms", d2h_done * 1e3);
    // the same copy inside one registration, for the rate a pinned copy has here
    t0 = now();
    check(cudaMemcpyAsync(d, p, len, cudaMemcpyHostToDevice, s), "h2d inside");
    double inside_issued = now() - t0;
    check(cudaStreamSynchronize(s), "sync");
    record("inside_h2d_issue_ms", inside_issued * 1e3);
    record("inside_h2d_done_ms", (now() - t0) * 1e3);
    cudaFree(d);
    unreg(p, n, piece);
    munmap(p, n);
  }
  }

  std::printf("{");
  for (size_t i = 0; i < results.size(); ++i)
    std::printf("%s\"%s\": %.4f", i ? ", " : "", results[i].first.c_str(), results[i].second);
  std::printf("}\n");
  return 0;
}

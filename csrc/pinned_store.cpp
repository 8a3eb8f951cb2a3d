// Host logic of the pinned state store: argument checks, allocation, and ordered copies (see pinned_store.h).
#include "pinned_store.h"

#include "check.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

#include <sys/mman.h>

#ifdef HIFT_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace hift {

namespace {
constexpr size_t kPage = 4096;
constexpr size_t kHugePage = size_t(2) << 20;
// cudaHostRegister is called on pieces of at most this size (large single registrations have failed on
// some drivers; 64 GiB is the documented safe bound we chose).
constexpr size_t kMaxRegistration = size_t(64) << 30;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }


// Reserve address space for `bytes` (whole pages) without touching it. Anonymous mmap rather than malloc so
// that large buffers can ask for transparent huge pages: 512x fewer page faults to take and pages to pin.
void* map_pages(size_t bytes) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
#ifdef MADV_HUGEPAGE
  if (bytes >= kHugePage) madvise(p, bytes, MADV_HUGEPAGE);  // a hint: ignored where THP is switched off
#endif
  return p;
}

// First touch with several threads, one write per 4 KiB page: the kernel maps (and zeroes) pages in
// parallel, which makes mmap + touch + cudaHostRegister several times faster than cudaHostAlloc for many
// GiB. Writing a byte per page instead of memset-ing the buffer halves the memory traffic (the kernel has
// already zeroed each page). Each thread's share is a whole number of huge pages, so no two threads fault
// the same huge page.
void parallel_touch(char* p, size_t bytes, int64_t threads) {
  size_t n = threads > 0 ? size_t(threads) : std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  size_t per = round_up((bytes + n - 1) / n, kHugePage);
  std::vector<std::thread> pool;
  for (size_t start = 0; start < bytes; start += per) {
    size_t end = std::min(start + per, bytes);
    pool.emplace_back([p, start, end] {
      volatile char* v = p;
      for (size_t off = start; off < end; off += kPage) v[off] = 0;
    });
  }
  for (auto& t : pool) t.join();
}
}  // namespace

HostBuffer::~HostBuffer() {
  if (!ptr) return;
#ifdef HIFT_WITH_CUDA
  // Never throw from here (also runs at interpreter exit, when the CUDA context may be gone).
  if (host_alloc) {
    cudaFreeHost(ptr);
    return;
  }
  if (registered) {
    for (size_t off = 0; off < reserved; off += kMaxRegistration) cudaHostUnregister(static_cast<char*>(ptr) + off);
  }
  cudaGetLastError();
#endif
  munmap(ptr, reserved);
}

PinnedStore::PinnedStore(std::vector<int64_t> numels, std::vector<at::Tensor> slots, const std::string& alloc_mode,
                         int64_t touch_threads, int64_t chunk_bytes, int64_t pace_depth)
    : numels_(std::move(numels)),
      slots_(std::move(slots)),
      mode_(alloc_mode),
      touch_threads_(touch_threads),
      chunk_bytes_(chunk_bytes),
      pace_depth_(pace_depth) {
  HIFT_CHECK(chunk_bytes_ >= 0, "PinnedStore: chunk_bytes must be >= 0 (0: one copy per group), got ", chunk_bytes_);
  HIFT_CHECK(pace_depth_ >= 1 && pace_depth_ <= 64, "PinnedStore: pace_depth must be in [1, 64], got ", pace_depth_);
  HIFT_CHECK(!slots_.empty(), "PinnedStore: slots must hold at least one tensor");
  HIFT_CHECK(mode_ == "register" || mode_ == "hostalloc",
              "PinnedStore: alloc_mode must be 'register' or 'hostalloc', got '", mode_, "'");
  HIFT_CHECK(touch_threads_ >= 0, "PinnedStore: touch_threads must be >= 0, got ", touch_threads_);
  int64_t largest = 0;
  for (size_t g = 0; g < numels_.size(); ++g) {
    HIFT_CHECK(numels_[g] >= 0, "PinnedStore: numels[", g, "] must be >= 0, got ", numels_[g]);
    largest = std::max(largest, numels_[g]);
  }
  const auto device = slots_[0].device();
  for (size_t s = 0; s < slots_.size(); ++s) {
    const auto& t = slots_[s];
    HIFT_CHECK(t.scalar_type() == at::kFloat, "PinnedStore: slots[", s, "] must be float32, got ", t.scalar_type());
    HIFT_CHECK(t.is_contiguous(), "PinnedStore: slots[", s, "] must be contiguous");
    HIFT_CHECK(t.device() == device, "PinnedStore: slots[", s, "] is on ", t.device(), ", slots[0] on ", device);
    HIFT_CHECK(t.numel() >= largest, "PinnedStore: slots[", s, "] holds ", t.numel(),
                " elements, the largest group needs ", largest);
  }
  host_.resize(numels_.size());
  cuda_ = device.is_cuda();
#ifdef HIFT_WITH_CUDA
  if (cuda_) {
    device_ = device.index();
    c10::cuda::CUDAGuard guard(device_);
    in_ = std::make_unique<PacedCopier>(device_, static_cast<size_t>(chunk_bytes_), static_cast<int>(pace_depth_));
    out_ = std::make_unique<PacedCopier>(device_, static_cast<size_t>(chunk_bytes_), static_cast<int>(pace_depth_));
    auto make = [](std::vector<cudaEvent_t>& evs, std::vector<char>& set, size_t n) {
      evs.resize(n);
      set.assign(n, 0);
      for (auto& e : evs) HIFT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    };
    make(compute_done_, compute_done_set_, slots_.size());
    make(arrived_, arrived_set_, slots_.size());
    make(written_, written_set_, slots_.size());
    make(host_written_, host_written_set_, numels_.size());
    arrived_ticket_.assign(slots_.size(), 0);
    written_ticket_.assign(slots_.size(), 0);
    host_written_ticket_.assign(numels_.size(), 0);
  }
#else
  HIFT_CHECK(!device.is_cuda(), "PinnedStore: this build has no CUDA support but slots are on ", device,
              "; rebuild the extension with a CUDA toolchain");
  HIFT_CHECK(mode_ != "hostalloc", "PinnedStore: alloc_mode 'hostalloc' needs a CUDA build");
#endif
}

PinnedStore::~PinnedStore() {
  try {
    close();
  } catch (...) {
  }
}

void PinnedStore::check_open(const char* fn) const {
  HIFT_CHECK(!closed_, "PinnedStore.", fn, ": the store is closed");
}

void PinnedStore::check_gid(int64_t gid, const char* fn) const {
  check_open(fn);
  HIFT_CHECK(gid >= 0 && gid < num_groups(), "PinnedStore.", fn, ": gid must be in [0, ", num_groups(), "), got ",
              gid);
}

void PinnedStore::check_slot(int64_t slot, const char* fn) const {
  check_open(fn);
  HIFT_CHECK(slot >= 0 && slot < static_cast<int64_t>(slots_.size()), "PinnedStore.", fn, ": slot must be in [0, ",
              slots_.size(), "), got ", slot);
}

#ifdef HIFT_WITH_CUDA
// Before a fetch or zero-fill into `slot`: every earlier in-stream job is fully issued (so the waits below go
// between jobs, never between a job's pieces), then the in-stream waits for the slot's last update and its
// last write-back.
void PinnedStore::prepare_in_stream(int64_t slot) {
  in_->drain();
  if (compute_done_set_[slot]) HIFT_CUDA_CHECK(cudaStreamWaitEvent(in_->stream(), compute_done_[slot], 0));
  if (written_set_[slot]) {
    out_->wait_submitted(written_ticket_[slot]);
    HIFT_CUDA_CHECK(cudaStreamWaitEvent(in_->stream(), written_[slot], 0));
  }
}
#endif

float* PinnedStore::slot_ptr(int64_t slot) const { return slots_[slot].data_ptr<float>(); }

std::shared_ptr<HostBuffer> PinnedStore::allocate(size_t bytes) {
  auto start = std::chrono::steady_clock::now();
  auto buf = std::make_shared<HostBuffer>();
  buf->bytes = bytes;
  buf->reserved = round_up(std::max<size_t>(bytes, 1), kPage);
#ifdef HIFT_WITH_CUDA
  if (cuda_ && mode_ == "hostalloc") {
    c10::cuda::CUDAGuard guard(device_);
    HIFT_CUDA_CHECK(cudaHostAlloc(&buf->ptr, buf->reserved, cudaHostAllocDefault));
    buf->host_alloc = true;
    alloc_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return buf;
  }
#endif
  buf->ptr = map_pages(buf->reserved);
  if (buf->ptr == nullptr)
    throw std::runtime_error(hift::cat("PinnedStore: could not reserve ", buf->reserved,
                                      " bytes of host memory for optimizer state; free host memory or train fewer groups"));
  parallel_touch(static_cast<char*>(buf->ptr), buf->reserved, touch_threads_);
#ifdef HIFT_WITH_CUDA
  if (cuda_) {
    c10::cuda::CUDAGuard guard(device_);
    for (size_t off = 0; off < buf->reserved; off += kMaxRegistration) {
      size_t len = std::min(kMaxRegistration, buf->reserved - off);
      cudaError_t err = cudaHostRegister(static_cast<char*>(buf->ptr) + off, len, cudaHostRegisterDefault);
      if (err != cudaSuccess) {
        for (size_t undo = 0; undo < off; undo += kMaxRegistration) cudaHostUnregister(static_cast<char*>(buf->ptr) + undo);
        cudaGetLastError();
        throw std::runtime_error(hift::cat("PinnedStore: cudaHostRegister of ", len, " bytes failed: ",
                                          cudaGetErrorString(err), " (is the locked-memory limit too low? see `ulimit -l`)"));
      }
    }
    buf->registered = true;
  }
#endif
  alloc_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return buf;
}

at::Tensor PinnedStore::host(int64_t gid) {
  check_gid(gid, "host");
  auto& buf = host_[gid];
  if (!buf) {
    buf = allocate(static_cast<size_t>(numels_[gid]) * sizeof(float));
    host_bytes_ += static_cast<int64_t>(buf->reserved);
  }
  auto keep = buf;  // the tensor keeps the memory alive even after close()
  return at::from_blob(buf->ptr, {numels_[gid]}, [keep](void*) {}, at::TensorOptions().dtype(at::kFloat));
}

bool PinnedStore::has_host(int64_t gid) const {
  check_gid(gid, "has_host");
  return static_cast<bool>(host_[gid]);
}

void PinnedStore::fetch(int64_t gid, int64_t slot) {
  check_gid(gid, "fetch");
  check_slot(slot, "fetch");
  HIFT_CHECK(host_[gid], "PinnedStore.fetch: group ", gid, " has no host state yet (zero-fill it instead)");
  const size_t bytes = static_cast<size_t>(numels_[gid]) * sizeof(float);
#ifdef HIFT_WITH_CUDA
  if (cuda_) {
    c10::cuda::CUDAGuard guard(device_);
    prepare_in_stream(slot);
    if (host_written_set_[gid]) {  // the latest write-back of this group has reached host memory
      out_->wait_submitted(host_written_ticket_[gid]);
      HIFT_CUDA_CHECK(cudaStreamWaitEvent(in_->stream(), host_written_[gid], 0));
    }
    arrived_ticket_[slot] = in_->submit(slot_ptr(slot), host_[gid]->ptr, bytes, cudaMemcpyHostToDevice, {arrived_[slot]});
    arrived_set_[slot] = 1;
    return;
  }
#endif
  std::memcpy(slot_ptr(slot), host_[gid]->ptr, bytes);
}

void PinnedStore::zero(int64_t slot, int64_t numel) {
  check_slot(slot, "zero");
  HIFT_CHECK(numel >= 0 && numel <= slots_[slot].numel(), "PinnedStore.zero: numel must be in [0, ",
              slots_[slot].numel(), "], got ", numel);
  const size_t bytes = static_cast<size_t>(numel) * sizeof(float);
#ifdef HIFT_WITH_CUDA
  if (cuda_) {
    c10::cuda::CUDAGuard guard(device_);
    prepare_in_stream(slot);
    HIFT_CUDA_CHECK(cudaMemsetAsync(slot_ptr(slot), 0, bytes, in_->stream()));
    HIFT_CUDA_CHECK(cudaEventRecord(arrived_[slot], in_->stream()));
    arrived_ticket_[slot] = 0;  // recorded here, not by a job
    arrived_set_[slot] = 1;
    return;
  }
#endif
  std::memset(slot_ptr(slot), 0, bytes);
}

void PinnedStore::writeback(int64_t gid, int64_t slot) {
  check_gid(gid, "writeback");
  check_slot(slot, "writeback");
  auto dst = host(gid);  // allocates on the first write-back of this group
  const size_t bytes = static_cast<size_t>(numels_[gid]) * sizeof(float);
#ifdef HIFT_WITH_CUDA
  if (cuda_) {
    c10::cuda::CUDAGuard guard(device_);
    out_->drain();  // as prepare_in_stream: the wait below goes between jobs
    if (compute_done_set_[slot]) HIFT_CUDA_CHECK(cudaStreamWaitEvent(out_->stream(), compute_done_[slot], 0));
    uint64_t ticket = out_->submit(dst.data_ptr(), slot_ptr(slot), bytes, cudaMemcpyDeviceToHost,
                                   {written_[slot], host_written_[gid]});
    written_ticket_[slot] = host_written_ticket_[gid] = ticket;
    written_set_[slot] = 1;
    host_written_set_[gid] = 1;
    return;
  }
#endif
  std::memcpy(dst.data_ptr(), slot_ptr(slot), bytes);
}

void PinnedStore::mark_compute_done(int64_t slot) {
  check_slot(slot, "mark_compute_done");
#ifdef HIFT_WITH_CUDA
  if (cuda_) {
    c10::cuda::CUDAGuard guard(device_);
    HIFT_CUDA_CHECK(cudaEventRecord(compute_done_[slot], c10::cuda::getCurrentCUDAStream(device_).stream()));
    compute_done_set_[slot] = 1;
  }
#endif
}

void PinnedStore::wait_arrival(int64_t slot) {
  check_slot(slot, "wait_arrival");
#ifdef HIFT_WITH_CUDA
  if (cuda_ && arrived_set_[slot]) {
    c10::cuda::CUDAGuard guard(device_);
    in_->wait_submitted(arrived_ticket_[slot]);
    HIFT_CUDA_CHECK(cudaStreamWaitEvent(c10::cuda::getCurrentCUDAStream(device_).stream(), arrived_[slot], 0));
  }
#endif
}

void PinnedStore::wait_host(int64_t gid) {
  check_gid(gid, "wait_host");
#ifdef HIFT_WITH_CUDA
  if (cuda_ && host_written_set_[gid]) {
    out_->wait_submitted(host_written_ticket_[gid]);
    HIFT_CUDA_CHECK(cudaEventSynchronize(host_written_[gid]));
  }
#endif
}

void PinnedStore::synchronize() {
  check_open("synchronize");
#ifdef HIFT_WITH_CUDA
  if (cuda_) {
    in_->drain();
    out_->drain();
    HIFT_CUDA_CHECK(cudaStreamSynchronize(in_->stream()));
    HIFT_CUDA_CHECK(cudaStreamSynchronize(out_->stream()));
  }
#endif
}

void PinnedStore::close() {
  if (closed_) return;
#ifdef HIFT_WITH_CUDA
  if (cuda_) {
    // Copies in flight read or write the buffers: the copiers finish them before the memory can go.
    if (in_) in_->close();
    if (out_) out_->close();
    for (auto* evs : {&compute_done_, &arrived_, &written_, &host_written_})
      for (auto e : *evs) cudaEventDestroy(e);
    cudaGetLastError();
  }
#endif
  host_.clear();  // buffers are freed once no host() tensor refers to them
  slots_.clear();
  host_bytes_ = 0;
  closed_ = true;
}

}  // namespace hift

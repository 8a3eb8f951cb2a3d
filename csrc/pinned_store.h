// Pinned host store for HiFT optimizer state, streamed to and from device slots on two side streams.
//
// The Python side (hift_engine/store/offload.py) decides which group goes into which slot and when; this
// class owns the memory and orders the copies:
//   host buffers  exactly sized (4 KiB pages), allocated lazily per group, page-locked either by
//                 mmap (transparent huge pages) + multi-threaded first touch + cudaHostRegister (<= 64 GiB
//                 per registration) or by cudaHostAlloc
//   streams       host-to-device copies on one stream, device-to-host on another, so both run at once; each
//                 transfer is paced (paced_copier.h) so small copies of other streams never wait behind it
//   events        per slot: compute_done (the update that used it), arrived (its fetch/zero), written (its
//                 write-back); per group: host_written (its latest write-back into host memory)
// Built without CUDA (HIFT_WITH_CUDA undefined) the same class uses plain memory and synchronous copies, so
// CPU-only CI exercises the logic.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#ifdef HIFT_WITH_CUDA
#include <cuda_runtime.h>

#include "paced_copier.h"
#endif

namespace hift {

// Page-aligned host memory (mmap, or cudaHostAlloc), optionally page-locked; unregistered and freed when the
// last owner goes.
struct HostBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;     // requested
  size_t reserved = 0;  // actually reserved (rounded up to whole pages)
  bool registered = false;
  bool host_alloc = false;
  ~HostBuffer();
};

class PinnedStore {
 public:
  // numels[g]: fp32 elements of group g's state. slots: device (or CPU) float32 tensors, each large enough
  // for the largest group. alloc_mode: "register" (default) or "hostalloc". touch_threads: threads for the
  // first touch of "register" allocations (0: hardware concurrency, capped at 16). chunk_bytes > 0 paces each
  // transfer in pieces of that size, `pace_depth` queued at a time, so a small copy on another stream waits
  // for at most `pace_depth` pieces instead of a whole group; 0 issues each transfer as one copy.
  PinnedStore(std::vector<int64_t> numels, std::vector<at::Tensor> slots, const std::string& alloc_mode,
              int64_t touch_threads, int64_t chunk_bytes = 0, int64_t pace_depth = 1);
  ~PinnedStore();
  PinnedStore(const PinnedStore&) = delete;
  PinnedStore& operator=(const PinnedStore&) = delete;

  at::Tensor host(int64_t gid);  // CPU float32 view of group gid's host buffer; allocates on first use
  bool has_host(int64_t gid) const;
  void fetch(int64_t gid, int64_t slot);
  void zero(int64_t slot, int64_t numel);
  void writeback(int64_t gid, int64_t slot);
  void mark_compute_done(int64_t slot);
  void wait_arrival(int64_t slot);
  void wait_host(int64_t gid);
  void synchronize();
  void close();

  int64_t host_bytes() const { return host_bytes_; }
  double alloc_seconds() const { return alloc_seconds_; }
  bool is_cuda() const { return cuda_; }
  int64_t num_groups() const { return static_cast<int64_t>(numels_.size()); }

 private:
  void check_open(const char* fn) const;
  void check_gid(int64_t gid, const char* fn) const;
  void check_slot(int64_t slot, const char* fn) const;
  std::shared_ptr<HostBuffer> allocate(size_t bytes);
  float* slot_ptr(int64_t slot) const;
#ifdef HIFT_WITH_CUDA
  void prepare_in_stream(int64_t slot);
#endif

  std::vector<int64_t> numels_;
  std::vector<at::Tensor> slots_;
  std::vector<std::shared_ptr<HostBuffer>> host_;
  std::string mode_;
  int64_t touch_threads_;
  int64_t chunk_bytes_;
  int64_t pace_depth_;
  int64_t host_bytes_ = 0;
  double alloc_seconds_ = 0.0;
  bool cuda_ = false;
  bool closed_ = false;
#ifdef HIFT_WITH_CUDA
  int device_ = 0;
  std::unique_ptr<PacedCopier> in_, out_;  // host-to-device, device-to-host
  std::vector<cudaEvent_t> compute_done_, arrived_, written_, host_written_;
  std::vector<char> compute_done_set_, arrived_set_, written_set_, host_written_set_;
  // The copier job that records each event (0: recorded directly): wait for it before waiting on the event.
  std::vector<uint64_t> arrived_ticket_, written_ticket_, host_written_ticket_;
#endif
};

}  // namespace hift

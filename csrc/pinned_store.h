// Pinned host store for HiFT optimizer state, streamed to and from device slots on two side streams.
//
// The Python side (hift_engine/store/offload.py) decides which group goes into which slot and when; this
// class owns the memory and orders the copies:
//   host buffers  exactly sized (4 KiB pages), page-locked by mmap (transparent huge pages) + multi-threaded
//                 first touch + registration (<= 64 GiB per call) from a second context of the device, so the
//                 training thread's CUDA calls never wait behind it (pin_context.h; the primary context's
//                 cudaHostRegister where that context is refused or not wanted); allocated in group order by a
//                 background thread from construction (touching the next buffer while a second thread pins the
//                 last), so the first cycle's write-backs find them ready (a group needed before the thread
//                 reached it is allocated by the caller instead)
//   streams       host-to-device copies on one stream, device-to-host on another, so both run at once; each
//                 transfer is paced (paced_copier.h) so small copies of other streams never wait behind it
//   events        per slot (SlotSync): compute_done, arrived, written; per group (GroupSync): host_written
// Built without CUDA (HIFT_WITH_CUDA undefined) the same class uses plain memory and synchronous copies, so
// CPU-only CI exercises the logic.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#ifdef HIFT_WITH_CUDA
#include <cuda_runtime.h>

#include "paced_copier.h"
#include "pin_context.h"
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
  size_t registration = 0;  // bytes per cudaHostRegister call (the last may be shorter); unregistered alike
#ifdef HIFT_WITH_CUDA
  std::shared_ptr<PinContext> pinned_by;  // registered from the pinning context (kept alive until unregistered)
#endif
  ~HostBuffer();
};

// Settings only diagnostics change, read from the environment when a store is built (docs/design.md,
// "Diagnostic settings"); the engine never sets them.
struct Tuning {
  std::string alloc_mode = "register";  // HIFT_ALLOC_MODE: "register" (mmap + touch + register) or "hostalloc"
  int64_t touch_threads = 0;            // HIFT_TOUCH_THREADS: first-touch threads (0: a caller that waits for its
                                        // buffer uses every CPU the process may use, at most 16; the background
                                        // thread paces itself between 1/4 and all of them by its lead)
  int64_t pace_depth = 1;               // HIFT_PACE_DEPTH: paced pieces in flight, 1..64
  bool background_alloc = true;         // HIFT_BACKGROUND_ALLOC: 1 allocates every buffer from construction, 0 lazily
  int64_t register_piece_mib = 0;       // HIFT_REGISTER_PIECE_MIB: > 0 registers this much per cudaHostRegister
                                        // call when paced (whole transfer pieces, so no paced copy spans two);
                                        // 0: the whole buffer in one call
  int64_t alloc_nice = 19;              // HIFT_ALLOC_NICE: nice value of the background allocator's threads (0..19)
  std::vector<int> touch_cpus;          // HIFT_TOUCH_CPUS: CPUs the background allocator's threads run on (empty: any)
  int64_t alloc_stages = 2;             // HIFT_ALLOC_STAGES: 2 touches the next buffer while a second thread pins
                                        // the last one; 1 touches then pins each buffer in turn
  int64_t pin_first = 1;                // HIFT_PIN_FIRST: buffers the background allocator pins from construction;
                                        // the rest wait for start_pinning() (-1: all from construction)
  int64_t touch_queue = 2;              // HIFT_TOUCH_QUEUE: touched buffers the two-stage allocator lets wait for
                                        // the pinner (1..4096); large: everything is touched while pinning is held
  bool huge_pages = true;               // HIFT_HUGE_PAGES: 1 asks for transparent huge pages (MADV_HUGEPAGE) on
                                        // buffers of 2 MiB or more, 0 leaves them to the system's THP setting
  static Tuning from_env();
};

#ifdef HIFT_WITH_CUDA
// A CUDA event and what a waiter needs to know about it.
struct Mark {
  cudaEvent_t event = nullptr;
  bool recorded = false;  // false: never recorded, nothing to wait for
  uint64_t ticket = 0;    // copier job that records it (0: recorded directly); wait_submitted(ticket) first
};

struct SlotSync {
  Mark compute_done;  // the update that last used the slot (compute stream)
  Mark arrived;       // the slot's latest fetch or zero-fill (in-stream)
  Mark written;       // the slot's latest write-back (out-stream)
};

struct GroupSync {
  Mark host_written;  // the group's latest write-back has reached host memory (out-stream)
};
#endif

class PinnedStore {
 public:
  // numels[g]: fp32 elements of group g's state. slots: device (or CPU) float32 tensors, each large enough
  // for the largest group. chunk_bytes > 0 paces each transfer in pieces of that size, so a small copy on
  // another stream waits for at most one piece instead of a whole group; 0 issues each transfer as one copy.
  // alloc_order: the order the background thread allocates the groups' buffers in (the first cycle's group
  // order, so each write-back finds its buffer ready); empty: 0, 1, 2, ... pin_context: register host buffers from
  // the device's pinning context (pin_context.h) instead of the primary one, when the driver allows it.
  PinnedStore(std::vector<int64_t> numels, std::vector<at::Tensor> slots, int64_t chunk_bytes = 0,
              std::vector<int64_t> alloc_order = {}, bool pin_context = true);
  ~PinnedStore();
  PinnedStore(const PinnedStore&) = delete;
  PinnedStore& operator=(const PinnedStore&) = delete;

  at::Tensor host(int64_t gid);  // CPU float32 view of group gid's host buffer; allocates it if not yet there
  void fetch(int64_t gid, int64_t slot);
  void zero(int64_t slot, int64_t numel);
  void writeback(int64_t gid, int64_t slot);
  void mark_compute_done(int64_t slot);
  void wait_arrival(int64_t slot);
  void wait_host(int64_t gid);
  void synchronize();  // a no-op once closed
  void close();        // idempotent
  // Block until the background thread has allocated the first `count` buffers of alloc_order (count < 0: every
  // buffer), or stopped. Asking for more than pin_first() starts the pinning of the rest.
  void wait_allocated(int64_t count = -1);
  // The background allocator pins the first pin_first() buffers of alloc_order from construction and holds the
  // rest until start_pinning() (or until a caller needs one of them): pinning takes a driver lock that the training
  // thread's cudaMalloc calls also take, and a first forward makes hundreds of those (see the .cpp). Idempotent.
  void start_pinning();
  int64_t pin_first() const { return tuning_.pin_first; }
  // Diagnostics: time the next `jobs` copies of each direction on the GPU; copy_times(): (ms, bytes) of each timed
  // copy that finished, host-to-device and device-to-host, in issue order (empty on a CPU store).
  void time_copies(int64_t jobs);
  std::pair<std::vector<std::pair<double, size_t>>, std::vector<std::pair<double, size_t>>> copy_times();
  // Seconds the threads calling the store (in training, the one that steps) have spent blocked on the copiers,
  // summed over them, by where: "arrival" (an update waiting until its group's fetch is issued), "in_queue" (a
  // fetch or zero-fill waiting for earlier fetches to be issued),
  // "writeback_issued" (a fetch waiting until a write-back it depends on is issued), "out_queue" (a write-back
  // waiting for earlier write-backs to be issued), "host_read" (a host read waiting for a write-back to land).
  std::vector<std::pair<std::string, double>> copy_waits() const;

  int64_t host_bytes() const { return host_bytes_.load(); }
  // Where allocation time went, in seconds: reserving address space (mmap), first touch and pinning
  // (cudaHostRegister, or cudaHostAlloc under HIFT_ALLOC_MODE=hostalloc) summed over the threads that did them, and
  // how long callers (write-backs, loads) waited for a buffer that was not ready; waits counts those calls (a
  // failed allocation is one too). For each buffer the two-stage background thread touched, in its order: the
  // first-touch threads it used and its lead then (how many buffers before it callers had yet to ask for).
  // held_s: how long the pinning thread waited for start_pinning() with a touched buffer in hand.
  struct AllocStats {
    double map_s, touch_s, register_s, wait_s, held_s;
    int64_t waits;
    std::vector<int64_t> touch_threads, touch_leads;
  };
  AllocStats alloc_stats() const;
  int64_t num_groups() const { return static_cast<int64_t>(numels_.size()); }
  // Whether host buffers are registered from the pinning context; its device memory; why it is not used ("" if it
  // is, or was not asked for).
  bool pin_context_active() const;
  int64_t pin_context_bytes() const;
  const std::string& pin_context_error() const { return pin_context_error_; }

 private:
  void check_open(const char* fn) const;
  void check_gid(int64_t gid, const char* fn) const;
  void check_slot(int64_t slot, const char* fn) const;
  // A buffer for group gid in three steps: address space, first touch, pinning. allocate() does all three; under
  // hostalloc, reserve() returns the buffer already pinned.
  std::shared_ptr<HostBuffer> allocate(int64_t gid, bool background = false);
  std::shared_ptr<HostBuffer> reserve(int64_t gid);
  void touch(HostBuffer& buf, size_t threads, bool background);
  size_t touch_threads(bool background) const;
  size_t paced_touch_threads(int64_t lead) const;
  int64_t lead_of(size_t pos);  // how many buffers before alloc_order_[pos] callers have yet to ask for
  void pin(HostBuffer& buf);
  size_t registration_bytes() const;  // bytes per cudaHostRegister call
  std::shared_ptr<HostBuffer> buffer(int64_t gid);  // gid's buffer, allocated here if nobody has yet
  std::shared_ptr<HostBuffer> ready_buffer(int64_t gid);  // gid's buffer once it holds state, else nullptr
  void allocate_in_background();
  bool claim_next(size_t& pos, int64_t& gid);  // next unclaimed group in alloc_order_ from pos, claimed; false: stop
  bool may_pin();  // the background allocator's turn to pin one more buffer (waits for start_pinning); false: stop
  void lift_hold();  // under alloc_mu_: pin every remaining buffer from now on (start_pinning, or a caller's need)
  void publish(int64_t gid, std::shared_ptr<HostBuffer> buf);  // buf null: allocation failed, stop the thread
  void allocate_in_two_stages();
  void allocate_one_by_one();
  void stop_allocator();
  float* slot_ptr(int64_t slot) const;
#ifdef HIFT_WITH_CUDA
  void prepare_in_stream(int64_t slot);
#endif

  std::vector<int64_t> numels_;
  std::vector<at::Tensor> slots_;
  std::vector<std::shared_ptr<HostBuffer>> host_;
  Tuning tuning_;
  int64_t chunk_bytes_;
  std::atomic<int64_t> host_bytes_{0};
  std::atomic<int64_t> map_ns_{0}, touch_ns_{0}, register_ns_{0}, wait_ns_{0}, waits_{0}, held_ns_{0};
  enum CopyWait { kArrival, kInQueue, kWritebackIssued, kOutQueue, kHostRead, kCopyWaits };
  std::atomic<int64_t> copy_wait_ns_[kCopyWaits] = {};
  template <class F>
  void timed(CopyWait site, F&& wait) {  // run wait(), adding its duration to copy_wait_ns_[site]
    const auto t0 = std::chrono::steady_clock::now();
    wait();
    copy_wait_ns_[site] += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
  }
  // Allocation state per group, guarded by alloc_mu_: host_[g] set = ready; claimed_[g] = someone is
  // allocating it (the background thread or a caller).
  std::mutex alloc_mu_;
  std::condition_variable alloc_cv_;
  std::vector<int64_t> alloc_order_;
  std::vector<char> claimed_;
  std::vector<char> handed_out_;  // host(g) was called (a write-back or a load): g has host state to fetch
  std::vector<char> asked_;       // a caller (write-back, load) has asked for g's buffer: the write-backs' place
  size_t cores_ = 1;              // CPUs the constructing thread may use, at most 16: first-touch threads at most
  mutable std::mutex stats_mu_;   // guards the two below
  std::vector<int64_t> touch_threads_used_, touch_leads_;
  bool stop_alloc_ = false;
  bool pinning_started_ = false;  // start_pinning() (or a caller's need) lifted the hold after pin_first buffers
  int64_t pinned_in_background_ = 0;  // buffers the background allocator has begun to pin
  size_t scanned_ = 0;  // positions of alloc_order_ the background allocator has gone past (claimed or skipped)
  bool allocator_done_ = true;
  std::thread allocator_;
  bool cuda_ = false;
  bool closed_ = false;
  std::string pin_context_error_;
#ifdef HIFT_WITH_CUDA
  int device_ = 0;
  std::shared_ptr<PinContext> pin_ctx_;  // null: register in the primary context (or closed)
  int64_t pin_context_bytes_ = 0;        // the context's size, kept after close()
  std::unique_ptr<PacedCopier> in_, out_;  // host-to-device, device-to-host
  std::vector<SlotSync> slot_sync_;
  std::vector<GroupSync> group_sync_;
#endif
};

}  // namespace hift

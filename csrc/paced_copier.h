// Paced copies: a large host<->device copy issued piece by piece from a worker thread, with at most `depth`
// pieces queued on the stream at any time.
//
// Why: copies from different streams in the same direction share a copy engine, and a copy submitted behind
// a whole group's state (1.5 GiB, 29 ms on an H100 link) waits for all of it. Issuing the group's copy in one
// call, or in pieces all submitted at once, made every small copy on the compute stream (a loss.item(), a
// 1-byte check in a model's forward) wait the full 29 ms: measured, the offloaded step was 1.39x the resident
// one. With pieces fed as earlier ones complete, a small copy waits for at most `depth` pieces.
//
// Ordering contract (PinnedStore keeps it): the caller issues its own stream operations (cudaStreamWaitEvent,
// memsets) on `stream()` only after drain(), so they land between jobs, never between a job's pieces; and it
// waits on an event a job records only after wait_submitted(ticket of that job).
#pragma once

#ifdef HIFT_WITH_CUDA
#include <cuda_runtime.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace hift {

class PacedCopier {
 public:
  // chunk_bytes == 0: no worker; submit() issues each copy whole from the calling thread.
  PacedCopier(int device, size_t chunk_bytes, int depth = 2);
  ~PacedCopier();
  PacedCopier(const PacedCopier&) = delete;
  PacedCopier& operator=(const PacedCopier&) = delete;

  cudaStream_t stream() const { return stream_; }
  // Queue dst <- src (bytes); after its last piece, `done` events are recorded on the stream. Returns a ticket.
  uint64_t submit(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, std::vector<cudaEvent_t> done);
  void wait_submitted(uint64_t ticket);  // every piece and event of job `ticket` has been issued
  void drain();                          // wait_submitted(last ticket)
  void close();                          // drain, stop the worker, destroy the stream (idempotent)

 private:
  struct Job {
    void* dst;
    const void* src;
    size_t bytes;
    cudaMemcpyKind kind;
    std::vector<cudaEvent_t> done;
    uint64_t ticket;
  };
  void issue(const Job& job);  // all pieces + done events; runs on the worker (or the caller if unpaced)
  void run();                  // worker loop
  void raise_if_failed();      // rethrow a worker error on the caller's thread (lock held)

  int device_;
  size_t chunk_;
  int depth_;
  cudaStream_t stream_ = nullptr;
  std::vector<cudaEvent_t> pieces_;  // ring of `depth` events: completion of the pieces in flight
  uint64_t piece_count_ = 0;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  uint64_t next_ticket_ = 0;
  uint64_t submitted_ = 0;  // highest ticket fully issued
  bool stop_ = false;
  bool closed_ = false;
  std::string error_;
  std::thread worker_;
};

}  // namespace hift
#endif

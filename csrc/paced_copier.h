// Paced copies: a large host<->device copy issued piece by piece from a worker thread, with at most `depth`
// pieces queued on the stream (default 1), so a small copy on another stream in the same direction waits for
// one piece instead of a whole group's state. Why, and the measurements: docs/design.md, "Paced transfers".
//
// Ordering contract (PinnedStore keeps it): the caller issues its own stream operations (cudaStreamWaitEvent,
// memsets) on `stream()` only after drain(), so they land between jobs, never between a job's pieces; and it
// waits on an event a job records only after wait_submitted(ticket of that job).
#pragma once

#ifdef HIFT_WITH_CUDA
#include <cuda_runtime.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace hift {

class PacedCopier {
 public:
  // chunk_bytes == 0: no worker; submit() issues each copy whole from the calling thread.
  PacedCopier(int device, size_t chunk_bytes, int depth = 1);
  ~PacedCopier();
  PacedCopier(const PacedCopier&) = delete;
  PacedCopier& operator=(const PacedCopier&) = delete;

  cudaStream_t stream() const { return stream_; }
  // Queue dst <- src (bytes); after its last piece, `done` events are recorded on the stream. Returns a ticket.
  uint64_t submit(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, std::vector<cudaEvent_t> done);
  void wait_submitted(uint64_t ticket);  // every piece and event of job `ticket` has been issued
  void drain();                          // wait_submitted(last ticket)
  void close();                          // drain, stop the worker, destroy the stream (idempotent)
  // Diagnostics: time the next `jobs` jobs on the GPU (an event before the first piece and after the last, so a
  // job's time starts once its stream has reached it: waits on other streams are not counted, gaps between its
  // pieces are). job_times(): (milliseconds, bytes) of the timed jobs whose copies finished, in submission order.
  void time_jobs(size_t jobs);
  std::vector<std::pair<double, size_t>> job_times();

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
  void wait_piece(uint64_t k);  // piece k finished (sleep, then poll); updates the duration estimate
  void run();                  // worker loop
  void raise_if_failed();      // rethrow a worker error on the caller's thread (lock held)

  int device_;
  size_t chunk_;
  int depth_;
  cudaStream_t stream_ = nullptr;
  struct Piece {
    cudaEvent_t done = nullptr;
    std::chrono::steady_clock::time_point issued;
    size_t bytes = 0;
    bool first_of_job = false;  // among a job's first `depth` pieces: may have waited for the job's dependency
  };
  struct TimedJob {
    cudaEvent_t start = nullptr, end = nullptr;
    size_t bytes = 0;
    bool recorded = false;
  };
  // Guarded by mu_; issue() takes the next entry and fills it in order. A deque: growing it keeps the entry a job
  // being issued points at where it is.
  std::deque<TimedJob> timed_;
  size_t next_timed_ = 0;
  std::vector<Piece> pieces_;  // ring of `depth`: the pieces in flight
  uint64_t piece_count_ = 0;
  double ns_per_byte_ = 0.0;  // running estimate of a piece's duration per byte (0: none yet)
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

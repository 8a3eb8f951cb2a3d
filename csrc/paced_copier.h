// Paced copies: a large host<->device copy issued piece by piece from a worker thread, with at most `depth`
// pieces queued on the stream at any time (default 1: the next piece is issued when the last one finished).
//
// Why: copies from different streams in the same direction share a copy engine, and a copy submitted behind
// a whole group's state (1.5 GiB, 29 ms on an H100 link) waits for all of it. Issuing the group's copy in one
// call, or in pieces all submitted at once, made every small copy on the compute stream (a loss.item(), a
// 1-byte check in a model's forward) wait the full 29 ms: measured, the offloaded step was 1.39x the resident
// one. Measured next (8 layers, 1.5 GiB groups, H100): pieces of 16 or 64 MiB with two queued at a time did
// not help either (the copy engine kept serving the stream that still had work queued), while 4 MiB pieces
// with two queued did (1.02x), because the worker's late wake-ups left the queue briefly empty between
// pieces: what lets another stream's copy in is a moment when this stream has nothing queued. So by default
// one piece is in flight, and the worker waits for it by sleeping for most of its expected duration and then
// polling, which keeps those moments to microseconds instead of a blocking-sync wake-up's 50-150 us (those
// had cut the link to 61% of raw). Measured with this (40c7100): 95-96% of raw each way in isolation, and
// 1.02-1.04x resident in the 8-layer step depending on the piece size (benchmarks/results/diagnose/).
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
  };
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

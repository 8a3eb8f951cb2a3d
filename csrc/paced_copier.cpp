// Paced copies on one side stream (see paced_copier.h).
#ifdef HIFT_WITH_CUDA
#include "paced_copier.h"

#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#ifdef __linux__
#include <sys/prctl.h>
#endif

#include "check.h"

namespace hift {

PacedCopier::PacedCopier(int device, size_t chunk_bytes, int depth)
    : device_(device), chunk_(chunk_bytes), depth_(std::max(1, depth)) {
  c10::cuda::CUDAGuard guard(device_);
  HIFT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  if (chunk_ == 0) return;
  pieces_.resize(depth_);
  for (auto& p : pieces_) HIFT_CUDA_CHECK(cudaEventCreateWithFlags(&p.done, cudaEventDisableTiming));
  worker_ = std::thread([this] { run(); });
}

PacedCopier::~PacedCopier() { close(); }

uint64_t PacedCopier::submit(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
                             std::vector<cudaEvent_t> done) {
  std::unique_lock<std::mutex> lock(mu_);
  raise_if_failed();
  HIFT_CHECK(!closed_, "PacedCopier.submit: the copier is closed");
  Job job{dst, src, bytes, kind, std::move(done), ++next_ticket_};
  if (chunk_ == 0) {  // unpaced: issue here, in one call
    lock.unlock();
    c10::cuda::CUDAGuard guard(device_);
    issue(job);
    lock.lock();
    submitted_ = job.ticket;
    return job.ticket;
  }
  queue_.push_back(std::move(job));
  cv_.notify_all();
  return next_ticket_;
}

void PacedCopier::issue(const Job& job) {
  const bool paced = chunk_ != 0;
  const size_t piece = paced ? chunk_ : std::max<size_t>(job.bytes, 1);
  TimedJob* timed = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (next_timed_ < timed_.size()) timed = &timed_[next_timed_++];
  }
  if (timed != nullptr) HIFT_CUDA_CHECK(cudaEventRecord(timed->start, stream_));
  for (size_t off = 0; off < job.bytes; off += piece) {
    const size_t len = std::min(piece, job.bytes - off);
    // The ring slot holds the piece issued `depth` pieces ago: wait for it before queueing another.
    if (paced && piece_count_ >= static_cast<uint64_t>(depth_)) wait_piece(piece_count_ - depth_);
    HIFT_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(job.dst) + off, static_cast<const char*>(job.src) + off, len,
                                    job.kind, stream_));
    if (paced) {
      Piece& slot = pieces_[piece_count_++ % depth_];
      HIFT_CUDA_CHECK(cudaEventRecord(slot.done, stream_));
      slot.issued = std::chrono::steady_clock::now();
      slot.bytes = len;
      // Every piece queued before the job's first one could finish may also wait for the job's dependency.
      slot.first_of_job = off < static_cast<size_t>(depth_) * piece;
    }
  }
  if (timed != nullptr) {
    HIFT_CUDA_CHECK(cudaEventRecord(timed->end, stream_));
    std::lock_guard<std::mutex> lock(mu_);
    timed->bytes = job.bytes;
    timed->recorded = true;
  }
  for (cudaEvent_t e : job.done) HIFT_CUDA_CHECK(cudaEventRecord(e, stream_));
}

void PacedCopier::time_jobs(size_t jobs) {
  std::lock_guard<std::mutex> lock(mu_);
  HIFT_CHECK(!closed_, "PacedCopier.time_jobs: the copier is closed");
  c10::cuda::CUDAGuard guard(device_);
  for (size_t i = 0; i < jobs; ++i) {
    TimedJob t;
    HIFT_CUDA_CHECK(cudaEventCreate(&t.start));
    if (cudaError_t st = cudaEventCreate(&t.end); st != cudaSuccess) {
      cudaEventDestroy(t.start);
      HIFT_CUDA_CHECK(st);
    }
    timed_.push_back(t);
  }
}

std::vector<std::pair<double, size_t>> PacedCopier::job_times() {
  std::vector<std::pair<double, size_t>> out;
  std::lock_guard<std::mutex> lock(mu_);  // close() destroys the events under it
  if (closed_) return out;
  c10::cuda::CUDAGuard guard(device_);
  for (const TimedJob& t : timed_) {
    if (!t.recorded) break;  // in order: stop at the first job not issued yet, or still copying
    const cudaError_t st = cudaEventQuery(t.end);
    if (st == cudaErrorNotReady) {
      cudaGetLastError();  // the not-ready status is not an error to leave behind
      break;
    }
    HIFT_CUDA_CHECK(st);
    float ms = 0.f;
    HIFT_CUDA_CHECK(cudaEventElapsedTime(&ms, t.start, t.end));
    out.emplace_back(static_cast<double>(ms), t.bytes);
  }
  return out;
}

void PacedCopier::wait_piece(uint64_t k) {
  Piece& p = pieces_[k % depth_];
  if (ns_per_byte_ > 0) {  // sleep through most of the piece, then poll: wake-ups are late, polls are not
    auto expected = std::chrono::nanoseconds(static_cast<int64_t>(0.9 * ns_per_byte_ * double(p.bytes)));
    std::this_thread::sleep_until(p.issued + expected);
  }
  cudaError_t st = cudaEventQuery(p.done);
  if (st != cudaErrorNotReady) {
    HIFT_CUDA_CHECK(st);
    // Done before we looked: we overslept by an unknown amount, so expect pieces to be a little faster.
    // (Timing this wake-up instead would feed our own lateness back into the estimate and grow it.)
    if (ns_per_byte_ > 0) ns_per_byte_ *= 0.9;
    return;
  }
  if (p.first_of_job) {
    // A job's first pieces (as many as are in flight at once) run only once the stream has passed the job's
    // dependency (the update a write-back copies out, the write-back out of the slot a fetch fills), which can take
    // a whole step: poll them gently, and learn nothing from their time. Taking that time as the piece's own made
    // the next pieces sleep for it, each only 10% less than the last, so one write-back behind a 100 ms update
    // took 427 ms instead of 0.7.
    while ((st = cudaEventQuery(p.done)) == cudaErrorNotReady) std::this_thread::sleep_for(std::chrono::microseconds(20));
    HIFT_CUDA_CHECK(st);
    return;
  }
  while ((st = cudaEventQuery(p.done)) == cudaErrorNotReady) std::this_thread::yield();
  HIFT_CUDA_CHECK(st);
  // Polled to completion: now is within microseconds of the end. A later piece was issued once the job's first
  // piece had finished, but may have queued behind the pieces before it or shared the link with the other
  // direction: slow observations move the estimate less than fast ones.
  double observed = double((std::chrono::steady_clock::now() - p.issued).count()) / double(std::max<size_t>(p.bytes, 1));
  if (ns_per_byte_ == 0) {
    ns_per_byte_ = observed;
  } else {
    ns_per_byte_ += (observed < ns_per_byte_ ? 0.5 : 0.1) * (observed - ns_per_byte_);
  }
}

void PacedCopier::run() {
  cudaSetDevice(device_);
#ifdef __linux__
  prctl(PR_SET_TIMERSLACK, 1UL);  // sleeps end within microseconds of their deadline (default slack: 50 us)
#endif
  for (;;) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_ and nothing left
    Job job = queue_.front();
    bool failed = !error_.empty();
    lock.unlock();
    if (!failed) {  // after a failure, jobs are only retired so that nobody waits forever
      try {
        issue(job);
      } catch (const std::exception& e) {
        lock.lock();
        error_ = e.what();
        lock.unlock();
      }
    }
    lock.lock();
    queue_.pop_front();
    submitted_ = job.ticket;
    cv_.notify_all();
  }
}

void PacedCopier::raise_if_failed() {
  if (!error_.empty()) throw std::runtime_error("PacedCopier: a copy failed on the worker thread: " + error_);
}

void PacedCopier::wait_submitted(uint64_t ticket) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return submitted_ >= ticket; });
  raise_if_failed();
}

void PacedCopier::drain() {
  uint64_t last;
  {
    std::lock_guard<std::mutex> lock(mu_);
    last = next_ticket_;
  }
  wait_submitted(last);
}

void PacedCopier::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    closed_ = true;
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();  // issues whatever was queued, then returns
  // Never throw from here (also runs from destructors and at interpreter exit).
  cudaStreamSynchronize(stream_);
  for (auto& p : pieces_) cudaEventDestroy(p.done);
  pieces_.clear();
  {
    std::lock_guard<std::mutex> lock(mu_);  // job_times() may be reading them on another thread
    for (auto& t : timed_) {
      cudaEventDestroy(t.start);
      cudaEventDestroy(t.end);
    }
    timed_.clear();
    next_timed_ = 0;
  }
  cudaStreamDestroy(stream_);
  cudaGetLastError();
}

}  // namespace hift
#endif

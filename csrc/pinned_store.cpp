// Host logic of the pinned state store: argument checks, allocation, and ordered copies (see pinned_store.h).
#include "pinned_store.h"

#include "check.h"

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <system_error>
#include <thread>

#include <sys/mman.h>
#ifdef __linux__
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sched.h>
#include <unistd.h>
#endif

#ifdef HIFT_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace hift {

namespace {
constexpr size_t kPage = 4096;
constexpr size_t kHugePage = size_t(2) << 20;
constexpr long kMaxCpus = 1024;  // glibc's CPU_SETSIZE: what a cpu_set_t holds
// cudaHostRegister is called on pieces of at most this size (large single registrations have failed on
// some drivers; 64 GiB is the documented safe bound we chose).
constexpr size_t kMaxRegistration = size_t(64) << 30;

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

using Clock = std::chrono::steady_clock;
int64_t nanoseconds_since(Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
}

// The integer in environment variable `name`, or `fallback` when it is unset or empty.
int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  long long n = std::strtoll(v, &end, 10);
  HIFT_CHECK(errno == 0 && *end == '\0', name, " must be an integer, got '", v, "'");
  return static_cast<int64_t>(n);
}

// Reserve address space for `bytes` (whole pages) without touching it. Anonymous mmap rather than malloc so
// that large buffers can ask for transparent huge pages (`huge`): 512x fewer page faults to take and pages to pin.
void* map_pages(size_t bytes, bool huge) {
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
#ifdef MADV_HUGEPAGE
  if (huge && bytes >= kHugePage) madvise(p, bytes, MADV_HUGEPAGE);  // a hint: ignored where THP is switched off
#else
  (void)huge;
#endif
  return p;
}

// Lower the calling thread's scheduling priority (Linux: nice is per thread). The background allocator and its
// first-touch threads run at nice 19 so that, when they compete for cores with the training thread (which
// launches the GPU work) and the copy pacers, those win: the first cycle then waits only for memory it needs.
void lower_thread_priority(int64_t nice) {
#ifdef __linux__
  if (nice > 0) setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), static_cast<int>(nice));
#else
  (void)nice;
#endif
}

// Keep the calling thread on `cpus` (HIFT_TOUCH_CPUS; empty: anywhere). Best effort: a CPU outside the
// process's cpuset makes sched_setaffinity fail, and the thread then stays where the scheduler puts it.
void place_thread(const std::vector<int>& cpus) {
#ifdef __linux__
  if (cpus.empty()) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int c : cpus) CPU_SET(c, &set);
  sched_setaffinity(0, sizeof(set), &set);
#else
  (void)cpus;
#endif
}

// What every thread of the background allocator does first: give way to training.
void enter_background(const Tuning& t) {
  lower_thread_priority(t.alloc_nice);
  place_thread(t.touch_cpus);
}

// The CPUs this thread may run on (its affinity: taskset, cpusets), or every online CPU where that is unknown.
std::vector<int> allowed_cpus() {
  std::vector<int> cpus;
#ifdef __linux__
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0)
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
#endif
  if (cpus.empty())
    for (unsigned c = 0; c < std::max(1u, std::thread::hardware_concurrency()); ++c) cpus.push_back(static_cast<int>(c));
  return cpus;
}

// "0-3,8,10-11" -> {0,1,2,3,8,10,11}: the Linux cpu-list format (as in taskset -c and cpuset files), strictly:
// digits, one dash per range, commas between, nothing else. Refused unless it names a CPU this process may use.
std::vector<int> parse_cpu_list(const std::string& text) {
  auto bad = [&] {
    return hift::cat("HIFT_TOUCH_CPUS must be a CPU list such as '8-15' or '0,2,4-7' (CPUs 0..", kMaxCpus - 1,
                     "), got '", text, "'");
  };
  auto number = [&](const std::string& digits) {
    HIFT_CHECK(!digits.empty() && digits.size() <= 4 &&
                   digits.find_first_not_of("0123456789") == std::string::npos,
               bad());
    return std::stol(digits);
  };
  std::vector<int> cpus;
  size_t at = 0;
  for (;;) {
    const size_t comma = text.find(',', at);
    const std::string item = text.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    const size_t dash = item.find('-');
    const long lo = number(item.substr(0, dash));
    const long hi = dash == std::string::npos ? lo : number(item.substr(dash + 1));
    HIFT_CHECK(lo <= hi && hi < kMaxCpus, bad());
    for (long c = lo; c <= hi; ++c) cpus.push_back(static_cast<int>(c));
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  std::sort(cpus.begin(), cpus.end());  // each CPU once, however often the list names it
  cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());
  const std::vector<int> allowed = allowed_cpus();
  const bool any = std::any_of(cpus.begin(), cpus.end(), [&](int c) {
    return std::find(allowed.begin(), allowed.end(), c) != allowed.end();
  });
  HIFT_CHECK(any, "HIFT_TOUCH_CPUS='", text, "' names no CPU this process may run on (it may use ",
             allowed.front(), "..", allowed.back(), ", ", allowed.size(), " CPUs)");
  return cpus;
}

// First touch with several threads, one write per 4 KiB page: the kernel maps (and zeroes) pages in
// parallel, which makes mmap + touch + cudaHostRegister several times faster than cudaHostAlloc for many
// GiB. Writing a byte per page instead of memset-ing the buffer halves the memory traffic (the kernel has
// already zeroed each page). Each thread's share is a whole number of huge pages, so no two threads fault
// the same huge page.
// Where a thread cannot be started (address-space or thread limits), the calling thread touches what is left itself
// rather than letting a joinable std::thread be destroyed (std::terminate).
void parallel_touch(char* p, size_t bytes, size_t n, const Tuning* background) {
  size_t per = round_up((bytes + n - 1) / n, kHugePage);
  auto touch_range = [p](size_t start, size_t end) {
    volatile char* v = p;
    for (size_t off = start; off < end; off += kPage) v[off] = 0;
  };
  std::vector<std::thread> pool;
  pool.reserve(n);
  size_t start = 0;
  for (; start < bytes; start += per) {
    size_t end = std::min(start + per, bytes);
    try {
      pool.emplace_back([touch_range, start, end, background] {
        if (background != nullptr) enter_background(*background);
        touch_range(start, end);
      });
    } catch (const std::system_error&) {
      break;
    }
  }
  touch_range(start, bytes);
  for (auto& t : pool) t.join();
}
}  // namespace

Tuning Tuning::from_env() {
  Tuning t;
  if (const char* v = std::getenv("HIFT_ALLOC_MODE"); v != nullptr && *v != '\0') t.alloc_mode = v;
  t.touch_threads = env_int("HIFT_TOUCH_THREADS", t.touch_threads);
  t.pace_depth = env_int("HIFT_PACE_DEPTH", t.pace_depth);
  const int64_t background = env_int("HIFT_BACKGROUND_ALLOC", 1);
  HIFT_CHECK(background == 0 || background == 1, "HIFT_BACKGROUND_ALLOC must be 0 or 1, got ", background);
  t.background_alloc = background == 1;
  t.register_piece_mib = env_int("HIFT_REGISTER_PIECE_MIB", t.register_piece_mib);
  t.alloc_nice = env_int("HIFT_ALLOC_NICE", t.alloc_nice);
  t.alloc_stages = env_int("HIFT_ALLOC_STAGES", t.alloc_stages);
  t.pin_first = env_int("HIFT_PIN_FIRST", t.pin_first);
  t.touch_queue = env_int("HIFT_TOUCH_QUEUE", t.touch_queue);
  const int64_t huge = env_int("HIFT_HUGE_PAGES", 1);
  HIFT_CHECK(huge == 0 || huge == 1, "HIFT_HUGE_PAGES must be 0 or 1, got ", huge);
  t.huge_pages = huge == 1;
  if (const char* v = std::getenv("HIFT_TOUCH_CPUS"); v != nullptr && *v != '\0') t.touch_cpus = parse_cpu_list(v);
  HIFT_CHECK(t.alloc_stages == 1 || t.alloc_stages == 2, "HIFT_ALLOC_STAGES must be 1 or 2, got ", t.alloc_stages);
  HIFT_CHECK(t.pin_first >= -1, "HIFT_PIN_FIRST must be >= -1 (-1: pin every buffer from construction), got ",
             t.pin_first);
  HIFT_CHECK(t.touch_queue >= 1 && t.touch_queue <= 4096, "HIFT_TOUCH_QUEUE must be in [1, 4096], got ",
             t.touch_queue);
  HIFT_CHECK(t.register_piece_mib >= 0, "HIFT_REGISTER_PIECE_MIB must be >= 0, got ", t.register_piece_mib);
  HIFT_CHECK(t.alloc_nice >= 0 && t.alloc_nice <= 19, "HIFT_ALLOC_NICE must be in [0, 19], got ", t.alloc_nice);
  HIFT_CHECK(t.alloc_mode == "register" || t.alloc_mode == "hostalloc",
             "HIFT_ALLOC_MODE must be 'register' or 'hostalloc', got '", t.alloc_mode, "'");
  HIFT_CHECK(t.touch_threads >= 0, "HIFT_TOUCH_THREADS must be >= 0, got ", t.touch_threads);
  HIFT_CHECK(t.pace_depth >= 1 && t.pace_depth <= 64, "HIFT_PACE_DEPTH must be in [1, 64], got ", t.pace_depth);
  return t;
}

#ifdef HIFT_WITH_CUDA
namespace {
// Unregister one registration, in the context that made it (the pinning context, or the process's own).
void unregister(const std::shared_ptr<PinContext>& pinned_by, char* p) {
  if (pinned_by) pinned_by->unpin(p);
  else cudaHostUnregister(p);
}
}  // namespace
#endif

HostBuffer::~HostBuffer() {
  if (!ptr) return;
#ifdef HIFT_WITH_CUDA
  // Never throw from here (also runs at interpreter exit, when the CUDA context may be gone).
  if (host_alloc) {
    cudaFreeHost(ptr);
    return;
  }
  if (registered) {
    const size_t step = registration ? registration : kMaxRegistration;
    for (size_t off = 0; off < reserved; off += step) unregister(pinned_by, static_cast<char*>(ptr) + off);
  }
  cudaGetLastError();
#endif
  munmap(ptr, reserved);
}

PinnedStore::PinnedStore(std::vector<int64_t> numels, std::vector<at::Tensor> slots, int64_t chunk_bytes,
                         std::vector<int64_t> alloc_order, bool pin_context)
    : numels_(std::move(numels)), slots_(std::move(slots)), tuning_(Tuning::from_env()), chunk_bytes_(chunk_bytes),
      alloc_order_(std::move(alloc_order)) {
  HIFT_CHECK(chunk_bytes_ >= 0, "PinnedStore: chunk_bytes must be >= 0 (0: one copy per group), got ", chunk_bytes_);
  HIFT_CHECK(!slots_.empty(), "PinnedStore: slots must hold at least one tensor");
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
  if (alloc_order_.empty())
    for (int64_t g = 0; g < num_groups(); ++g) alloc_order_.push_back(g);
  std::vector<char> seen(numels_.size(), 0);
  HIFT_CHECK(alloc_order_.size() == numels_.size(), "PinnedStore: alloc_order must list each of the ", numels_.size(),
             " groups once, got ", alloc_order_.size(), " entries");
  for (int64_t g : alloc_order_) {
    HIFT_CHECK(g >= 0 && g < num_groups() && !seen[g], "PinnedStore: alloc_order must be a permutation of 0..",
               num_groups() - 1, "; group ", g, " is out of range or listed twice");
    seen[g] = 1;
  }
  host_.resize(numels_.size());
  claimed_.assign(numels_.size(), 0);
  handed_out_.assign(numels_.size(), 0);
  asked_.assign(numels_.size(), 0);
  cores_ = std::max<size_t>(1, std::min<size_t>(16, allowed_cpus().size()));
  cuda_ = device.is_cuda();
#ifdef HIFT_WITH_CUDA
  if (cuda_) {
    device_ = device.index();
    c10::cuda::CUDAGuard guard(device_);
    const int depth = static_cast<int>(tuning_.pace_depth);
    in_ = std::make_unique<PacedCopier>(device_, static_cast<size_t>(chunk_bytes_), depth);
    out_ = std::make_unique<PacedCopier>(device_, static_cast<size_t>(chunk_bytes_), depth);
    auto create = [](Mark& m) { HIFT_CUDA_CHECK(cudaEventCreateWithFlags(&m.event, cudaEventDisableTiming)); };
    slot_sync_.resize(slots_.size());
    for (auto& s : slot_sync_)
      for (Mark* m : {&s.compute_done, &s.arrived, &s.written}) create(*m);
    group_sync_.resize(numels_.size());
    for (auto& g : group_sync_) create(g.host_written);
    if (pin_context && tuning_.alloc_mode != "register") {
      pin_context_error_ = "HIFT_ALLOC_MODE=hostalloc pins with cudaHostAlloc in the process's own context";
    } else if (pin_context && !numels_.empty()) {
      pin_ctx_ = PinContext::acquire(device_, &pin_context_error_);  // null (with the reason): the primary context
    }
  }
#else
  HIFT_CHECK(!device.is_cuda(), "PinnedStore: this build has no CUDA support but slots are on ", device,
              "; rebuild the extension with a CUDA toolchain");
  HIFT_CHECK(tuning_.alloc_mode != "hostalloc", "PinnedStore: HIFT_ALLOC_MODE=hostalloc needs a CUDA build");
#endif
  if (tuning_.background_alloc && !numels_.empty()) {
    allocator_done_ = false;
    allocator_ = std::thread([this] { allocate_in_background(); });
  }
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
  timed(kInQueue, [&] { in_->drain(); });
  const SlotSync& s = slot_sync_[slot];
  if (s.compute_done.recorded) HIFT_CUDA_CHECK(cudaStreamWaitEvent(in_->stream(), s.compute_done.event, 0));
  if (s.written.recorded) {
    timed(kWritebackIssued, [&] { out_->wait_submitted(s.written.ticket); });
    HIFT_CUDA_CHECK(cudaStreamWaitEvent(in_->stream(), s.written.event, 0));
  }
}
#endif

float* PinnedStore::slot_ptr(int64_t slot) const { return slots_[slot].data_ptr<float>(); }

// cudaHostRegister in the primary context holds a driver lock while it pins pages, which stalls the training
// thread's launches and copies for as long (tens of ms for a GiB); the pinning context (pin_context.h) avoids that
// altogether. Where it is not used, registering in pieces (HIFT_REGISTER_PIECE_MIB > 0) keeps each hold short.
// Pieces are a multiple of the paced transfer piece, counted from the buffer's start as the copier cuts its copies,
// so no paced copy spans two registrations; unpaced stores register a group whole. Off by default: CUDA refuses a
// copy of a range that spans two registrations (cudaErrorInvalidValue on the H200, benchmarks/pin_probe.cu), so
// other code copying a view of host state across a seam would fail.
size_t PinnedStore::registration_bytes() const {
  const size_t chunk = static_cast<size_t>(chunk_bytes_);
  const size_t want = static_cast<size_t>(tuning_.register_piece_mib) << 20;
  if (chunk == 0 || want == 0 || chunk % kPage != 0) return kMaxRegistration;
  return std::min(kMaxRegistration, std::max<size_t>(1, want / chunk) * chunk);
}

std::shared_ptr<HostBuffer> PinnedStore::reserve(int64_t gid) {
  auto buf = std::make_shared<HostBuffer>();
  buf->bytes = static_cast<size_t>(numels_[gid]) * sizeof(float);
  buf->reserved = round_up(std::max<size_t>(buf->bytes, 1), kPage);
#ifdef HIFT_WITH_CUDA
  if (cuda_ && tuning_.alloc_mode == "hostalloc") {
    c10::cuda::CUDAGuard guard(device_);
    const auto t0 = Clock::now();  // the driver touches and pins: counted as pinning
    HIFT_CUDA_CHECK(cudaHostAlloc(&buf->ptr, buf->reserved, cudaHostAllocDefault));
    register_ns_ += nanoseconds_since(t0);
    buf->host_alloc = true;
    return buf;
  }
#endif
  const auto t0 = Clock::now();
  buf->ptr = map_pages(buf->reserved, tuning_.huge_pages);
  map_ns_ += nanoseconds_since(t0);
  if (buf->ptr == nullptr)
    throw std::runtime_error(hift::cat("PinnedStore: could not reserve ", buf->reserved,
                                      " bytes of host memory for optimizer state; free host memory or train fewer groups"));
  return buf;
}

// 3/8 of `cores` (6 of 16): the background allocator's touch threads when it is neither behind nor well ahead.
static size_t steady_share(size_t cores) { return std::max<size_t>(1, cores * 3 / 8); }

// First-touch threads for a buffer a caller allocates itself (the background thread had not claimed it): every
// CPU the process may use, at most 16, since training waits for it. The serial background allocator
// (HIFT_ALLOC_STAGES=1) uses 3/8 of that; the two-stage one paces itself (paced_touch_threads).
size_t PinnedStore::touch_threads(bool background) const {
  if (tuning_.touch_threads > 0) return static_cast<size_t>(tuning_.touch_threads);
  return background ? steady_share(cores_) : cores_;
}

// First-touch threads for the background buffer that callers will reach after `lead` other buffers. Zeroing pages
// at full speed saturates host memory bandwidth, which the training's copies need too: at 7B bf16-mixed batch 4 on
// an H200 host (16 cores), touching with 16 threads made the first cycle 1.74x the later ones, 8 threads 1.15-1.31x,
// 6 threads 1.03-1.10x. But how many threads keep pace depends on the host: 6 did on one machine and fell behind by
// 0.26-0.55 s on another (touch6*-b8c1614.log, affinity2-e88a77e.log), and a write-back that waits costs more than
// faster touching. So the thread count follows the lead: every core when the next write-backs need the buffer,
// 3/8 of them (6 of 16) a few buffers ahead, 1/4 when well ahead.
size_t PinnedStore::paced_touch_threads(int64_t lead) const {
  if (tuning_.touch_threads > 0) return static_cast<size_t>(tuning_.touch_threads);
  // on HIFT_TOUCH_CPUS, no more threads than those CPUs
  const size_t cores = tuning_.touch_cpus.empty() ? cores_ : std::min(cores_, tuning_.touch_cpus.size());
  const size_t steady = steady_share(cores);
  if (lead <= 1) return cores;
  if (lead == 2) return (steady + cores + 1) / 2;
  if (lead >= 6) return std::max<size_t>(1, cores / 4);
  return steady;
}

// Of the buffers before `pos` in the allocation order, how many no caller has asked for yet (asks for buffers at or
// after `pos`, out of order, do not make it more urgent). O(pos) under the lock, once per buffer.
int64_t PinnedStore::lead_of(size_t pos) {
  std::lock_guard<std::mutex> lock(alloc_mu_);
  int64_t lead = 0;
  for (size_t i = 0; i < pos; ++i) lead += asked_[alloc_order_[i]] ? 0 : 1;
  return lead;
}

void PinnedStore::touch(HostBuffer& buf, size_t threads, bool background) {
  if (buf.host_alloc) return;
  const auto t0 = Clock::now();
  parallel_touch(static_cast<char*>(buf.ptr), buf.reserved, threads, background ? &tuning_ : nullptr);
  touch_ns_ += nanoseconds_since(t0);
}

void PinnedStore::pin(HostBuffer& buf) {
#ifdef HIFT_WITH_CUDA
  if (!cuda_ || buf.host_alloc) return;
  const auto t1 = Clock::now();
  c10::cuda::CUDAGuard guard(device_);
  const size_t piece = registration_bytes();
  buf.registration = piece;
  buf.pinned_by = pin_ctx_;
  for (size_t off = 0; off < buf.reserved; off += piece) {
    size_t len = std::min(piece, buf.reserved - off);
    char* at = static_cast<char*>(buf.ptr) + off;
    std::string err;
    if (pin_ctx_) {
      err = pin_ctx_->pin(at, len);
    } else if (cudaError_t e = cudaHostRegister(at, len, cudaHostRegisterDefault); e != cudaSuccess) {
      err = hift::cat("cudaHostRegister: ", cudaGetErrorString(e));
      cudaGetLastError();
    }
    if (!err.empty()) {
      for (size_t undo = 0; undo < off; undo += piece) unregister(pin_ctx_, static_cast<char*>(buf.ptr) + undo);
      cudaGetLastError();
      throw std::runtime_error(hift::cat("PinnedStore: pinning ", len, " bytes of host memory failed (", err,
                                        "); is the locked-memory limit too low? see `ulimit -l`"));
    }
  }
  buf.registered = true;
  register_ns_ += nanoseconds_since(t1);
#else
  (void)buf;
#endif
}

std::shared_ptr<HostBuffer> PinnedStore::allocate(int64_t gid, bool background) {
  auto buf = reserve(gid);
  touch(*buf, touch_threads(background), background);
  pin(*buf);
  return buf;
}

bool PinnedStore::claim_next(size_t& pos, int64_t& gid) {
  std::lock_guard<std::mutex> lock(alloc_mu_);
  while (pos < alloc_order_.size() && !stop_alloc_) {
    const int64_t g = alloc_order_[pos++];
    scanned_ = std::max(scanned_, pos);
    if (claimed_[g]) continue;  // a caller needed it first
    claimed_[g] = 1;
    gid = g;
    return true;
  }
  return false;
}

// Pinning (cudaHostRegister, from the pinning context as from the primary one) takes a driver lock that cudaMalloc
// takes too, and a first forward maps hundreds of new device segments (271 cudaMalloc calls at 7B bf16-mixed batch
// 4). With buffer after buffer being pinned beside it, that forward took 0.35-5.8 s instead of 0.125 s on an H200
// (0.05 s with no cudaMalloc at all), which was the whole of the first cycle's excess over later ones
// (benchmarks/first_step_probe.py, firststep-88111c5.log); later steps map almost nothing. So the background
// allocator pins only the first pin_first buffers (the first write-back's) from construction, and the rest once the
// first update begins (start_pinning(): the forward's allocations are done by then). It keeps touching meanwhile (no
// driver lock), up to four buffers past the first (the serial allocator: one). A caller that needs a held buffer
// lifts the hold (buffer(), wait_allocated()). Under HIFT_ALLOC_MODE=hostalloc the touch stage's cudaHostAlloc pins
// already, so the hold only delays publishing those buffers.
bool PinnedStore::may_pin() {
  std::unique_lock<std::mutex> lock(alloc_mu_);
  auto open = [this] {
    return stop_alloc_ || pinning_started_ || tuning_.pin_first < 0 || pinned_in_background_ < tuning_.pin_first;
  };
  if (!open()) {
    const auto t0 = Clock::now();
    alloc_cv_.wait(lock, open);
    held_ns_ += nanoseconds_since(t0);
  }
  if (stop_alloc_) return false;
  ++pinned_in_background_;
  return true;
}

void PinnedStore::start_pinning() {
  std::lock_guard<std::mutex> lock(alloc_mu_);
  lift_hold();
}

void PinnedStore::lift_hold() {
  pinning_started_ = true;
  alloc_cv_.notify_all();
}

void PinnedStore::publish(int64_t gid, std::shared_ptr<HostBuffer> buf) {
  std::lock_guard<std::mutex> lock(alloc_mu_);
  if (buf) {
    host_bytes_ += static_cast<int64_t>(buf->reserved);
    host_[gid] = std::move(buf);
  } else {
    // Out of host memory, pinning refused, or stopping: leave the group to the caller who needs it, whose own
    // attempt raises the error with its message where it can be handled; take no more.
    claimed_[gid] = 0;
    stop_alloc_ = true;
  }
  alloc_cv_.notify_all();
}

// The first cycle writes every group back once; allocating (and pinning) its buffer then, on the host thread,
// made the first cycle 1.5x slower than the next at 7B. This thread allocates them from construction instead,
// in the first cycle's order; the CUDA runtime is thread-safe, and the thread holds no lock while it allocates.
void PinnedStore::allocate_in_background() {
  enter_background(tuning_);
  if (tuning_.alloc_stages == 2) allocate_in_two_stages();
  else allocate_one_by_one();  // HIFT_ALLOC_STAGES=1, a diagnostic
  std::lock_guard<std::mutex> lock(alloc_mu_);
  allocator_done_ = true;
  alloc_cv_.notify_all();
}

// Touch, then pin, buffer by buffer (HIFT_ALLOC_STAGES=1, and where the pinning thread cannot be started).
void PinnedStore::allocate_one_by_one() {
  size_t pos = 0;
  int64_t g = 0;
  while (claim_next(pos, g)) {
    std::shared_ptr<HostBuffer> buf;
    try {
      buf = reserve(g);
      touch(*buf, touch_threads(/*background=*/true), /*background=*/true);
      if (may_pin()) pin(*buf);
      else buf.reset();  // stopping
    } catch (const std::exception&) {
      buf.reset();
    }
    publish(g, std::move(buf));
  }
}

// One after the other, touching and pinning 75 GiB (7B bf16-mixed) take longer than a batch-4 cycle (2.2 s + 2.1 s
// against 3.5 s on an H200 host), so the last write-backs waited 0.5-0.6 s and the first cycle ran 1.20-1.28x the
// later ones. Here this thread touches buffers while a second pins the ones already touched (at most
// HIFT_TOUCH_QUEUE, two by default, wait between them), so the allocator's pace is the slower stage's, not their
// sum: with 6 touch threads (see
// touch_threads) nothing waited and the first cycle ran 1.03-1.07x in five runs on one machine (touch6*-b8c1614.log),
// 1.10x in one on another (touchthreads2-0758dc1.log). A caller waiting for a buffer this thread has claimed waits
// for its touch and for the pinning of at most two buffers ahead of it.
void PinnedStore::allocate_in_two_stages() {
  std::mutex queue_mu;
  std::condition_variable queue_cv;
  std::deque<std::pair<int64_t, std::shared_ptr<HostBuffer>>> queue;  // touched, not yet pinned
  bool touching_done = false;
  std::thread pinner;
  try {
    pinner = std::thread([&] {
      enter_background(tuning_);
      for (;;) {
        std::pair<int64_t, std::shared_ptr<HostBuffer>> item;
        {
          std::unique_lock<std::mutex> lock(queue_mu);
          queue_cv.wait(lock, [&] { return !queue.empty() || touching_done; });
          if (queue.empty()) return;
          item = std::move(queue.front());
          queue.pop_front();
        }
        queue_cv.notify_all();
        const bool stopping = !may_pin();  // (waits while pinning is held)
        try {
          if (!stopping) pin(*item.second);
          else item.second.reset();
        } catch (const std::exception&) {
          item.second.reset();
        }
        publish(item.first, std::move(item.second));
      }
    });
  } catch (const std::system_error&) {  // no thread to be had: one stage it is
    allocate_one_by_one();
    return;
  }
  // However this thread leaves the loop, the pinner is told and joined (a joinable std::thread must not be destroyed).
  struct Finish {
    std::mutex& mu;
    std::condition_variable& cv;
    bool& done;
    std::thread& pinner;
    ~Finish() {
      {
        std::lock_guard<std::mutex> lock(mu);
        done = true;
      }
      cv.notify_all();
      pinner.join();
    }
  } finish{queue_mu, queue_cv, touching_done, pinner};
  size_t pos = 0;
  int64_t g = 0;
  while (claim_next(pos, g)) {
    try {
      auto buf = reserve(g);
      const int64_t lead = lead_of(pos - 1);  // claim_next moved pos past g
      const size_t threads = paced_touch_threads(lead);
      touch(*buf, threads, /*background=*/true);
      if (!buf->host_alloc) {  // (cudaHostAlloc buffers are not touched)
        std::lock_guard<std::mutex> lock(stats_mu_);
        touch_threads_used_.push_back(static_cast<int64_t>(threads));
        touch_leads_.push_back(lead);
      }
      std::unique_lock<std::mutex> lock(queue_mu);
      // (HIFT_TOUCH_QUEUE, a diagnostic: a long queue touches every buffer while pinning is held, which separates
      // the first touch's cost from the pinning's)
      queue_cv.wait(lock, [&] { return queue.size() < static_cast<size_t>(tuning_.touch_queue); });
      queue.emplace_back(g, std::move(buf));
    } catch (const std::exception&) {
      publish(g, nullptr);  // unclaimed again: the caller who needs it allocates it (and sees the error)
      break;
    }
    queue_cv.notify_all();
  }
}

void PinnedStore::stop_allocator() {
  {
    std::lock_guard<std::mutex> lock(alloc_mu_);
    stop_alloc_ = true;
  }
  alloc_cv_.notify_all();  // a pinning thread held in may_pin()
  if (allocator_.joinable()) allocator_.join();
}

void PinnedStore::wait_allocated(int64_t count) {
  std::unique_lock<std::mutex> lock(alloc_mu_);
  const size_t n = count < 0 ? alloc_order_.size() : std::min(static_cast<size_t>(count), alloc_order_.size());
  if (tuning_.pin_first >= 0 && static_cast<int64_t>(n) > tuning_.pin_first) lift_hold();  // beyond the hold
  // A buffer the thread went past while a caller had it, which that caller then failed to allocate (and so
  // unclaimed), is nobody's to make any more: not waited for (the caller got the error).
  alloc_cv_.wait(lock, [&] {
    if (allocator_done_) return true;
    for (size_t i = 0; i < n; ++i) {
      const int64_t g = alloc_order_[i];
      if (!host_[g] && (claimed_[g] || i >= scanned_)) return false;
    }
    return true;
  });
}

void PinnedStore::time_copies(int64_t jobs) {
  check_open("time_copies");
  HIFT_CHECK(jobs >= 0, "PinnedStore.time_copies: jobs must be >= 0, got ", jobs);
#ifdef HIFT_WITH_CUDA
  if (!cuda_) return;
  in_->time_jobs(static_cast<size_t>(jobs));
  out_->time_jobs(static_cast<size_t>(jobs));
#endif
}

std::pair<std::vector<std::pair<double, size_t>>, std::vector<std::pair<double, size_t>>> PinnedStore::copy_times() {
#ifdef HIFT_WITH_CUDA
  if (cuda_ && !closed_) return {in_->job_times(), out_->job_times()};
#endif
  return {};
}

std::vector<std::pair<std::string, double>> PinnedStore::copy_waits() const {
  static const char* names[kCopyWaits] = {"arrival", "in_queue", "writeback_issued", "out_queue", "host_read"};
  std::vector<std::pair<std::string, double>> out;
  for (int i = 0; i < kCopyWaits; ++i) out.emplace_back(names[i], double(copy_wait_ns_[i].load()) * 1e-9);
  return out;
}

std::shared_ptr<HostBuffer> PinnedStore::ready_buffer(int64_t gid) {
  std::lock_guard<std::mutex> lock(alloc_mu_);
  return handed_out_[gid] ? host_[gid] : nullptr;
}

std::shared_ptr<HostBuffer> PinnedStore::buffer(int64_t gid) {
  {
    std::unique_lock<std::mutex> lock(alloc_mu_);
    asked_[gid] = 1;  // the background thread paces itself by these
    if (host_[gid]) return host_[gid];
  }
  const auto t0 = Clock::now();  // not ready: count how long the caller is held up
  struct Count {
    PinnedStore* self;
    Clock::time_point t0;
    ~Count() { self->wait_ns_ += nanoseconds_since(t0); self->waits_ += 1; }
  } count{this, t0};
  {
    std::unique_lock<std::mutex> lock(alloc_mu_);
    if (claimed_[gid]) lift_hold();  // the background allocator has it, perhaps held before pinning
    alloc_cv_.wait(lock, [&] { return host_[gid] || !claimed_[gid]; });  // being allocated: wait for it
    if (host_[gid]) return host_[gid];
    claimed_[gid] = 1;
  }
  std::shared_ptr<HostBuffer> buf;
  try {
    buf = allocate(gid);
  } catch (...) {
    std::lock_guard<std::mutex> lock(alloc_mu_);
    claimed_[gid] = 0;
    alloc_cv_.notify_all();
    throw;
  }
  std::lock_guard<std::mutex> lock(alloc_mu_);
  host_bytes_ += static_cast<int64_t>(buf->reserved);
  host_[gid] = buf;
  alloc_cv_.notify_all();
  return buf;
}

bool PinnedStore::pin_context_active() const {
#ifdef HIFT_WITH_CUDA
  return pin_ctx_ != nullptr || pin_context_bytes_ > 0;  // (after close: whether it was used)
#else
  return false;
#endif
}

int64_t PinnedStore::pin_context_bytes() const {
#ifdef HIFT_WITH_CUDA
  return pin_ctx_ ? pin_ctx_->device_bytes() : pin_context_bytes_;
#else
  return 0;
#endif
}

PinnedStore::AllocStats PinnedStore::alloc_stats() const {
  std::lock_guard<std::mutex> lock(stats_mu_);
  return {map_ns_.load() * 1e-9, touch_ns_.load() * 1e-9, register_ns_.load() * 1e-9, wait_ns_.load() * 1e-9,
          held_ns_.load() * 1e-9, waits_.load(), touch_threads_used_, touch_leads_};
}

at::Tensor PinnedStore::host(int64_t gid) {
  check_gid(gid, "host");
  auto keep = buffer(gid);  // the tensor keeps the memory alive even after close()
  {
    std::lock_guard<std::mutex> lock(alloc_mu_);
    handed_out_[gid] = 1;
  }
  return at::from_blob(keep->ptr, {numels_[gid]}, [keep](void*) {}, at::TensorOptions().dtype(at::kFloat));
}

void PinnedStore::fetch(int64_t gid, int64_t slot) {
  check_gid(gid, "fetch");
  check_slot(slot, "fetch");
  const auto src = ready_buffer(gid);
  HIFT_CHECK(src, "PinnedStore.fetch: group ", gid, " has no host state yet (zero-fill it instead)");
  const size_t bytes = static_cast<size_t>(numels_[gid]) * sizeof(float);
#ifdef HIFT_WITH_CUDA
  if (cuda_) {
    c10::cuda::CUDAGuard guard(device_);
    prepare_in_stream(slot);
    const Mark& host_written = group_sync_[gid].host_written;
    if (host_written.recorded) {  // the latest write-back of this group has reached host memory
      timed(kWritebackIssued, [&] { out_->wait_submitted(host_written.ticket); });
      HIFT_CUDA_CHECK(cudaStreamWaitEvent(in_->stream(), host_written.event, 0));
    }
    Mark& arrived = slot_sync_[slot].arrived;
    arrived.ticket = in_->submit(slot_ptr(slot), src->ptr, bytes, cudaMemcpyHostToDevice, {arrived.event});
    arrived.recorded = true;
    return;
  }
#endif
  std::memcpy(slot_ptr(slot), src->ptr, bytes);
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
    Mark& arrived = slot_sync_[slot].arrived;
    HIFT_CUDA_CHECK(cudaEventRecord(arrived.event, in_->stream()));
    arrived.ticket = 0;  // recorded here, not by a job
    arrived.recorded = true;
    return;
  }
#endif
  std::memset(slot_ptr(slot), 0, bytes);
}

void PinnedStore::writeback(int64_t gid, int64_t slot) {
  check_gid(gid, "writeback");
  check_slot(slot, "writeback");
  auto dst = host(gid);  // waits for (or makes) the buffer if the background thread has not reached it
  const size_t bytes = static_cast<size_t>(numels_[gid]) * sizeof(float);
#ifdef HIFT_WITH_CUDA
  if (cuda_) {
    c10::cuda::CUDAGuard guard(device_);
    timed(kOutQueue, [&] { out_->drain(); });  // as prepare_in_stream: the wait below goes between jobs
    SlotSync& s = slot_sync_[slot];
    Mark& host_written = group_sync_[gid].host_written;
    if (s.compute_done.recorded) HIFT_CUDA_CHECK(cudaStreamWaitEvent(out_->stream(), s.compute_done.event, 0));
    uint64_t ticket = out_->submit(dst.data_ptr(), slot_ptr(slot), bytes, cudaMemcpyDeviceToHost,
                                   {s.written.event, host_written.event});
    s.written.ticket = host_written.ticket = ticket;
    s.written.recorded = host_written.recorded = true;
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
    Mark& compute_done = slot_sync_[slot].compute_done;
    HIFT_CUDA_CHECK(cudaEventRecord(compute_done.event, c10::cuda::getCurrentCUDAStream(device_).stream()));
    compute_done.recorded = true;
  }
#endif
}

void PinnedStore::wait_arrival(int64_t slot) {
  check_slot(slot, "wait_arrival");
#ifdef HIFT_WITH_CUDA
  if (!cuda_) return;
  const Mark& arrived = slot_sync_[slot].arrived;
  if (arrived.recorded) {
    c10::cuda::CUDAGuard guard(device_);
    timed(kArrival, [&] { in_->wait_submitted(arrived.ticket); });
    HIFT_CUDA_CHECK(cudaStreamWaitEvent(c10::cuda::getCurrentCUDAStream(device_).stream(), arrived.event, 0));
  }
#endif
}

void PinnedStore::wait_host(int64_t gid) {
  check_gid(gid, "wait_host");
#ifdef HIFT_WITH_CUDA
  if (!cuda_) return;
  const Mark& host_written = group_sync_[gid].host_written;
  if (host_written.recorded) {
    timed(kHostRead, [&] {
      out_->wait_submitted(host_written.ticket);
      HIFT_CUDA_CHECK(cudaEventSynchronize(host_written.event));
    });
  }
#endif
}

void PinnedStore::synchronize() {
  if (closed_) return;  // nothing in flight: close() finished every copy
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
  stop_allocator();  // before any buffer can go
#ifdef HIFT_WITH_CUDA
  if (cuda_) {
    // Copies in flight read or write the buffers: the copiers finish them before the memory can go.
    if (in_) in_->close();
    if (out_) out_->close();
    for (auto& s : slot_sync_)
      for (Mark* m : {&s.compute_done, &s.arrived, &s.written}) cudaEventDestroy(m->event);
    for (auto& g : group_sync_) cudaEventDestroy(g.host_written.event);
    cudaGetLastError();
  }
#endif
  host_.clear();  // buffers are freed once no host() tensor refers to them
  slots_.clear();
#ifdef HIFT_WITH_CUDA
  // The pinning context goes with the last buffer pinned in it (each holds it); the store's own hold ends here, so a
  // closed store kept referenced does not keep its device memory. Its size stays reported.
  if (pin_ctx_) pin_context_bytes_ = pin_ctx_->device_bytes();
  pin_ctx_.reset();
#endif
  host_bytes_ = 0;
  closed_ = true;
}

}  // namespace hift

"""The C++ pinned store itself (CPU-only build here; tests/store/test_cuda_stores.py covers CUDA)."""

import gc
import os
import time

import pytest
import torch

from hift_engine import _native
from tests.helpers import CAPPED_CHILD, page_rounded_bytes, returns_within, run_child


@pytest.fixture(scope="module")
def native():
    return _native.load()


def test_host_bytes_are_exact_to_the_page(native, monkeypatch):
    monkeypatch.setenv("HIFT_TOUCH_THREADS", "2")  # a diagnostic setting, read when a store is built
    monkeypatch.setenv("HIFT_BACKGROUND_ALLOC", "0")  # lazily, as a diagnostic can ask
    numels = [1, 1024, 1025, 3_000_001]
    store = native.PinnedStore(numels, [torch.empty(max(numels))])
    assert store.host_bytes == 0  # lazily: nothing before a group is put away
    for g in range(len(numels)):
        store.host(g)
    expected = page_rounded_bytes(numels)
    assert store.host_bytes == expected
    assert store.host_bytes <= 1.01 * sum(n * 4 for n in numels) + 4096 * len(numels)
    store.close()


def test_alloc_stats_count_the_callers_waits(native, monkeypatch):
    """alloc_stats() says how long write-backs were held up by a buffer that was not ready: lazily, every
    group's first host() allocates on the caller; a buffer that is there already costs no wait."""
    monkeypatch.setenv("HIFT_BACKGROUND_ALLOC", "0")
    numels = [2_000_000, 3_000_000]
    store = native.PinnedStore(numels, [torch.zeros(max(numels))])
    assert store.alloc_stats() == {"map_s": 0.0, "touch_s": 0.0, "register_s": 0.0, "wait_s": 0.0, "held_s": 0.0, "waits": 0,
                                   "touch_threads": [], "touch_leads": []}
    store.writeback(0, 0)
    store.writeback(1, 0)
    first = store.alloc_stats()
    assert first["waits"] == 2 and first["wait_s"] >= first["touch_s"] + first["map_s"] and first["map_s"] > 0
    assert first["touch_s"] > 0
    assert first["register_s"] == 0.0  # a CPU build pins nothing
    store.writeback(0, 0)  # the buffer is there: no wait
    assert store.alloc_stats() == first
    store.close()


def test_alloc_stats_count_a_wait_behind_the_background_thread(native):
    """With the background thread on (the default), a write-back whose buffer the thread has not reached yet
    is a wait too, and the thread's own first touches are counted once it is done."""
    numels = [1000, 256 << 20]  # group 1 (1 GiB) first in the thread's order: group 0 cannot be ready at once
    store = native.PinnedStore(numels, [torch.zeros(max(numels))], 0, [1, 0])
    store.writeback(0, 0)
    early = store.alloc_stats()
    assert early["waits"] == 1 and early["wait_s"] > 0
    store.wait_allocated()
    done = store.alloc_stats()
    assert done["waits"] == 1 and done["touch_s"] > early["touch_s"] > 0  # the 1 GiB buffer's touch came in
    store.close()


# The background allocator's shapes: the two-stage pipeline (the default), or touch then pin each buffer in turn.
ALLOCATORS = [{}, {"HIFT_ALLOC_STAGES": "1"}, {"HIFT_ALLOC_STAGES": "2", "HIFT_TOUCH_THREADS": "1"},
              {"HIFT_TOUCH_CPUS": "0"}]


@pytest.mark.parametrize("env", ALLOCATORS, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()) or "default")
def test_background_allocation_takes_every_buffer_once(native, monkeypatch, env):
    """From construction a thread allocates every group's buffer; a caller that needs one first allocates it
    itself or waits for it, and either way each group gets exactly one buffer, counted once."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    numels = [3_000_001, 7, 1_000_000, 2048, 500_000] * 4
    expected = page_rounded_bytes(numels)
    orders = [[], list(reversed(range(len(numels)))), [7, 3, 0, 19, 1] + [g for g in range(len(numels)) if g not in (7, 3, 0, 19, 1)]]
    for i in range(6):  # races between the thread and the caller land differently each time
        slots = [torch.empty(max(numels)), torch.empty(max(numels))]
        store = native.PinnedStore(numels, slots, 0, orders[i % 3])  # in the first cycle's order, or 0, 1, ...
        for g in reversed(range(len(numels))):  # against the thread's order: some are claimed by the caller
            slots[0][: numels[g]].fill_(float(g))
            store.writeback(g, 0)
        store.wait_allocated()
        assert store.host_bytes == expected
        for g in range(len(numels)):
            store.fetch(g, 1)
            assert torch.equal(slots[1][: numels[g]], torch.full((numels[g],), float(g)))
        store.close()
        assert store.host_bytes == 0


def published_after(store, seconds: float) -> int:
    """host_bytes once the background thread had `seconds` to go on (a buffer counts once it is published, pinned
    on CUDA; this CPU build pins nothing but passes the same gate)."""
    time.sleep(seconds)
    return store.host_bytes


def wait_touched(store, n: int) -> None:
    """Until the two-stage thread has touched (and so claimed) n buffers; 20 s at most on a loaded machine."""
    deadline = time.monotonic() + 20
    while len(store.alloc_stats()["touch_threads"]) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(store.alloc_stats()["touch_threads"]) >= n, "the background thread did not get going"


def serial(env: dict) -> bool:
    return env.get("HIFT_ALLOC_STAGES") == "1"  # the serial allocator records no touch statistics


@pytest.mark.parametrize("env", ALLOCATORS, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()) or "default")
def test_pinning_past_the_first_buffer_waits_for_start_pinning(native, monkeypatch, env):
    """Pinning takes the driver lock a first forward's cudaMalloc calls take, so the background thread pins the first
    buffer (the first write-back's) from construction and holds the rest until start_pinning(): it keeps touching
    meanwhile, a few buffers ahead. Before this hold every buffer was ready within milliseconds."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    buf = 4 << 20
    store = native.PinnedStore([1 << 20] * 8, [torch.empty(1 << 20)])
    assert store.pin_first == 1
    store.wait_allocated(1)
    if not serial(env):
        wait_touched(store, 2)  # a buffer past the first is touched: the pinner has it, or will, and holds it
    assert published_after(store, 0.3) == buf  # the first buffer only
    assert len(store.alloc_stats()["touch_threads"]) <= 5  # touched ahead: up to four past the first
    store.start_pinning()
    store.start_pinning()  # idempotent
    assert returns_within(store.wait_allocated)
    assert store.host_bytes == 8 * buf
    assert store.alloc_stats()["held_s"] > 0
    store.close()


def test_a_long_touch_queue_touches_everything_while_pinning_is_held(native, monkeypatch):
    """HIFT_TOUCH_QUEUE (a diagnostic): with room for every touched buffer between the two stages, the background
    thread touches all of them while pinning is held, and pins none of them past the first until start_pinning()
    (the default queue of two stops it a few buffers ahead: the test above)."""
    monkeypatch.setenv("HIFT_TOUCH_QUEUE", "64")
    buf = 4 << 20
    store = native.PinnedStore([1 << 20] * 12, [torch.empty(1 << 20)])
    store.wait_allocated(1)
    wait_touched(store, 12)
    assert published_after(store, 0.3) == buf  # touched, yet only the first pinned
    store.start_pinning()
    assert returns_within(store.wait_allocated)
    assert store.host_bytes == 12 * buf
    store.close()


def vma_flags(address: int) -> list:
    """The kernel's VmFlags of the mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"),
                    reason="needs a Linux kernel with transparent huge pages (else madvise sets no hg flag)")
@pytest.mark.parametrize("setting, huge", [(None, True), ("1", True), ("0", False)])
def test_huge_pages_setting(native, monkeypatch, setting, huge):
    """HIFT_HUGE_PAGES (a diagnostic): by default a buffer of 2 MiB or more is advised for transparent huge pages
    (the kernel's `hg` flag on its mapping, set whether or not a huge page is free to serve it); 0 leaves it to the system."""
    if setting is None:
        monkeypatch.delenv("HIFT_HUGE_PAGES", raising=False)
    else:
        monkeypatch.setenv("HIFT_HUGE_PAGES", setting)
    monkeypatch.setenv("HIFT_BACKGROUND_ALLOC", "0")
    store = native.PinnedStore([1 << 20, 1 << 10], [torch.empty(1 << 20)])
    big, small = store.host(0), store.host(1)
    assert ("hg" in vma_flags(big.data_ptr())) == huge
    assert "hg" not in vma_flags(small.data_ptr())  # 4 KiB: never advised
    store.close()


@pytest.mark.parametrize("first, published", [(-1, 6), (0, 0), (2, 2)])
def test_pin_first_setting(native, monkeypatch, first, published):
    """HIFT_PIN_FIRST: how many buffers are pinned before start_pinning() (-1: all of them, the earlier behaviour:
    wait_allocated() lifts no hold then, so it would hang on one)."""
    monkeypatch.setenv("HIFT_PIN_FIRST", str(first))
    store = native.PinnedStore([1 << 20] * 6, [torch.empty(1 << 20)])
    assert store.pin_first == first
    if first < 0:
        assert returns_within(store.wait_allocated)
    else:
        if first > 0:
            store.wait_allocated(first)
        wait_touched(store, first + 1)  # the next buffer is touched: held before pinning
    assert published_after(store, 0.3) == published * (4 << 20)
    store.close()


@pytest.mark.parametrize("env", ALLOCATORS, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()) or "default")
@pytest.mark.parametrize("need", ["writeback", "host", "wait_allocated"])
def test_a_caller_needing_a_held_buffer_lifts_the_hold(native, monkeypatch, need, env):
    """A write-back, a host read or wait_allocated(n) beyond the first buffer before start_pinning() must not wait
    for a hold nobody lifts: it lifts it. The two-stage thread has claimed and touched groups 1 and 2 when asked."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    store = native.PinnedStore([1 << 20] * 6, [torch.zeros(1 << 20)])
    store.wait_allocated(1)
    if serial(env):
        time.sleep(0.1)  # (claimed and touched group 1 by now, unless the machine is very slow)
    else:
        wait_touched(store, 3)
    call = {"writeback": lambda: store.writeback(1, 0), "host": lambda: store.host(2),
            "wait_allocated": lambda: store.wait_allocated(3)}[need]
    assert returns_within(call), f"{need} waited on a buffer held before pinning"
    assert returns_within(store.wait_allocated)
    assert store.host_bytes == 6 * (4 << 20)
    store.close()


def test_close_while_pinning_is_held(native):
    """close() with the pinning thread held (buffers touched, not pinned) wakes and stops it."""
    for _ in range(3):
        store = native.PinnedStore([1 << 20] * 8, [torch.empty(1 << 20)])
        store.wait_allocated(1)
        wait_touched(store, 3)
        assert returns_within(store.close), "close() did not stop a held pinning thread"
        assert store.host_bytes == 0
        assert returns_within(store.wait_allocated)  # the thread has stopped


def paced_threads(lead: int) -> int:
    """The two-stage allocator's first-touch threads at a lead (csrc/pinned_store.cpp paced_touch_threads)."""
    cores = max(1, min(16, len(os.sched_getaffinity(0))))
    steady = max(1, cores * 3 // 8)
    if lead <= 1:
        return cores
    if lead == 2:
        return (steady + cores + 1) // 2
    return max(1, cores // 4) if lead >= 6 else steady


def allocated_alone(native, buffers: int) -> tuple[dict, int]:
    """alloc_stats() and host_bytes of a store of `buffers` 4 MiB groups left to its background thread."""
    store = native.PinnedStore([1 << 20] * buffers, [torch.empty(1 << 20)])
    store.wait_allocated()
    done = store.alloc_stats(), store.host_bytes
    store.close()
    return done


def test_background_touch_is_paced_by_its_lead(native):
    """The background thread touches with more threads the closer the write-backs are to the buffer, fewer when
    it is well ahead; with no write-back asking, buffer i's lead is i."""
    stats, _ = allocated_alone(native, 10)
    assert stats["touch_leads"] == list(range(10))
    assert stats["touch_threads"] == [paced_threads(lead) for lead in range(10)]


def test_the_lead_counts_the_buffers_before_it_not_yet_asked_for(native):
    """A buffer's lead is how many buffers before it in the allocation order no caller has asked for yet: asks for
    earlier buffers shorten it, asks for later ones (out of order) do not. The thread is held on a 2 GiB first
    buffer while the caller asks for positions 1, 2 and 5-9 (allocating them itself), so the thread then touches
    positions 3, 4, 10 and 11 with those asks in place."""
    numels = [512 << 20] + [1 << 20] * 11
    store = native.PinnedStore(numels, [torch.zeros(512 << 20)])
    for g in (9, 8, 7, 6, 5, 2, 1):
        store.host(g)
    store.wait_allocated()
    stats = store.alloc_stats()
    assert stats["touch_leads"] == [0, 3 - 2, 4 - 2, 10 - 7, 11 - 7]  # group 0 itself was never asked for
    assert stats["touch_threads"] == [paced_threads(lead) for lead in stats["touch_leads"]]
    store.close()


def test_touch_cpus_place_the_allocators_threads_and_cap_their_count(native, monkeypatch):
    """HIFT_TOUCH_CPUS: a valid list of several parts is taken, and the paced thread count never exceeds the CPUs
    it names (a lead of 0 would otherwise take every core)."""
    allowed = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("HIFT_TOUCH_CPUS", f"{allowed[0]}-{allowed[0]},{allowed[0]}")
    stats, host_bytes = allocated_alone(native, 3)
    assert stats["touch_threads"] == [1, 1, 1]
    assert host_bytes == 3 * (4 << 20)


def test_touch_threads_setting_fixes_the_count(native, monkeypatch):
    monkeypatch.setenv("HIFT_TOUCH_THREADS", "3")
    stats, _ = allocated_alone(native, 4)
    assert stats["touch_threads"] == [3, 3, 3, 3]


@pytest.mark.parametrize("env", ALLOCATORS, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()) or "default")
def test_close_stops_background_allocation(native, monkeypatch, env):
    """close() stops the thread early: a store closed at once has touched a small part of what a store left to
    finish touches (1 GiB in 64 buffers)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    numels, slot = [4_000_000] * 64, [torch.empty(4_000_000)]
    full = native.PinnedStore(numels, slot)
    full.wait_allocated()
    everything = full.alloc_stats()["touch_s"]
    assert full.host_bytes == 64 * 16_003_072  # every buffer, whole pages
    full.close()
    for _ in range(3):
        store = native.PinnedStore(numels, slot)
        store.close()  # joins the thread (and the two-stage one's pinner) before any buffer goes
        assert store.host_bytes == 0
        store.wait_allocated()  # returns: the thread has stopped
        assert store.alloc_stats()["touch_s"] < everything / 4


@pytest.mark.parametrize("stages", ["1", "2"])
def test_a_failed_background_allocation_is_left_to_the_caller(stages):
    """When the background thread cannot reserve a buffer it stops and unclaims it: the caller who needs that group
    gets the error (no hang on a group left claimed), every other group is allocated by its caller and round-trips,
    and the store counts exactly the buffers that exist."""
    result = run_child(CAPPED_CHILD + """
    small, huge = (4 << 20) // 4, (1 << 30) // 4
    numels = [small, small, huge, small, small]
    slots = [torch.zeros(huge)]
    cap(400)
    store = native.PinnedStore(numels, slots)
    for g in (0, 1, 3, 4):
        slots[0][: numels[g]].fill_(float(g))
        store.writeback(g, 0)
    try:
        store.writeback(2, 0)
        raise SystemExit("a 1 GiB buffer was allocated under the cap")
    except RuntimeError as e:
        assert "could not reserve" in str(e), e
    store.wait_allocated()
    assert store.host_bytes == 4 * (4 << 20), store.host_bytes
    for g in (0, 1, 3, 4):
        store.fetch(g, 0)
        assert bool((slots[0][: numels[g]] == g).all()), g
    print("OK")
    """, HIFT_ALLOC_STAGES=stages)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("margin_mib", [20, 60])
def test_first_touch_without_threads_to_spare_still_touches(margin_mib):
    """Where first-touch threads cannot be started (here the address-space cap leaves room for the buffer and a
    few 8 MiB thread stacks), the calling thread touches the rest itself: before, the process aborted
    (std::terminate from a joinable std::thread being destroyed) instead of allocating."""
    result = run_child(CAPPED_CHILD + f"""
    n = (256 << 20) // 4
    store = native.PinnedStore([n], [torch.zeros(n)])
    cap(256 + {margin_mib})
    view = store.host(0)
    view.fill_(3.0)
    assert store.host_bytes == n * 4 and view.min().item() == view.max().item() == 3.0  # (no 64 MiB mask)
    print("OK")
    """, HIFT_BACKGROUND_ALLOC="0", HIFT_TOUCH_THREADS="8")
    assert result.returncode == 0 and "OK" in result.stdout, (result.returncode, result.stderr[-2000:])


def test_round_trip_is_bit_exact(native):
    slots = [torch.empty(5000), torch.empty(5000)]
    store = native.PinnedStore([5000, 3000], slots)
    data = torch.randn(5000)
    slots[0].copy_(data)
    store.writeback(0, 0)
    slots[0].fill_(float("nan"))
    store.fetch(0, 1)
    assert torch.equal(slots[1], data)
    store.zero(1, 3000)
    assert torch.equal(slots[1][:3000], torch.zeros(3000)) and torch.equal(slots[1][3000:], data[3000:])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s: s.fetch(0, 0), "group 0 has no host state yet"),
        (lambda s: s.fetch(5, 0), r"gid must be in \[0, 2\), got 5"),
        (lambda s: s.writeback(0, 2), r"slot must be in \[0, 2\), got 2"),
        (lambda s: s.zero(0, 11), r"numel must be in \[0, 10\], got 11"),
        (lambda s: s.host(-1), r"gid must be in \[0, 2\), got -1"),
    ],
)
def test_bad_arguments_name_the_argument(native, call, match):
    store = native.PinnedStore([10, 4], [torch.empty(10), torch.empty(10)])
    with pytest.raises(ValueError, match=match):
        call(store)


@pytest.mark.parametrize(
    "args, match",
    [
        (([10], [torch.empty(5)]), "slots\\[0\\] holds 5 elements, the largest group needs 10"),
        (([10], [torch.empty(10, dtype=torch.float64)]), "slots\\[0\\] must be float32"),
        (([-1], [torch.empty(10)]), r"numels\[0\] must be >= 0"),
        (([10], []), "at least one tensor"),
        (([10], [torch.empty(10)], -1), r"chunk_bytes must be >= 0"),
        (([10, 10], [torch.empty(10)], 0, [0]), r"alloc_order must list each of the 2 groups once, got 1"),
        (([10, 10], [torch.empty(10)], 0, [1, 1]), r"alloc_order must be a permutation of 0..1; group 1 is out of range or listed twice"),
        (([10, 10], [torch.empty(10)], 0, [0, 2]), r"group 2 is out of range"),
    ],
)
def test_bad_construction_is_refused(native, args, match):
    with pytest.raises(ValueError, match=match):
        native.PinnedStore(*args)


@pytest.mark.parametrize(
    "name, value, match",
    [
        ("HIFT_ALLOC_MODE", "mmap", "HIFT_ALLOC_MODE must be 'register' or 'hostalloc', got 'mmap'"),
        ("HIFT_PACE_DEPTH", "0", r"HIFT_PACE_DEPTH must be in \[1, 64\], got 0"),
        ("HIFT_TOUCH_THREADS", "-1", "HIFT_TOUCH_THREADS must be >= 0, got -1"),
        ("HIFT_TOUCH_THREADS", "two", "HIFT_TOUCH_THREADS must be an integer, got 'two'"),
        ("HIFT_BACKGROUND_ALLOC", "2", "HIFT_BACKGROUND_ALLOC must be 0 or 1, got 2"),
        ("HIFT_REGISTER_PIECE_MIB", "-1", "HIFT_REGISTER_PIECE_MIB must be >= 0, got -1"),
        ("HIFT_ALLOC_NICE", "20", r"HIFT_ALLOC_NICE must be in \[0, 19\], got 20"),
        ("HIFT_ALLOC_STAGES", "3", "HIFT_ALLOC_STAGES must be 1 or 2, got 3"),
        ("HIFT_PIN_FIRST", "-2", r"HIFT_PIN_FIRST must be >= -1 \(-1: pin every buffer from construction\), got -2"),
        ("HIFT_TOUCH_QUEUE", "0", r"HIFT_TOUCH_QUEUE must be in \[1, 4096\], got 0"),
        ("HIFT_HUGE_PAGES", "2", "HIFT_HUGE_PAGES must be 0 or 1, got 2"),
        ("HIFT_ALLOC_STAGES", "two", "HIFT_ALLOC_STAGES must be an integer, got 'two'"),
        ("HIFT_TOUCH_CPUS", "8-", "HIFT_TOUCH_CPUS must be a CPU list such as '8-15' or '0,2,4-7' .*got '8-'"),
        ("HIFT_TOUCH_CPUS", "3-1", "HIFT_TOUCH_CPUS must be a CPU list .*got '3-1'"),
        ("HIFT_TOUCH_CPUS", "0,,2", "HIFT_TOUCH_CPUS must be a CPU list .*got '0,,2'"),
        ("HIFT_TOUCH_CPUS", "1024", r"HIFT_TOUCH_CPUS must be a CPU list .*\(CPUs 0..1023\), got '1024'"),
        ("HIFT_TOUCH_CPUS", "-2", "HIFT_TOUCH_CPUS must be a CPU list .*got '-2'"),
        ("HIFT_TOUCH_CPUS", "0,", "HIFT_TOUCH_CPUS must be a CPU list .*got '0,'"),
        ("HIFT_TOUCH_CPUS", " 1", "HIFT_TOUCH_CPUS must be a CPU list .*got ' 1'"),
        ("HIFT_TOUCH_CPUS", "+1", r"HIFT_TOUCH_CPUS must be a CPU list .*got '\+1'"),
        ("HIFT_TOUCH_CPUS", "1-2-3", "HIFT_TOUCH_CPUS must be a CPU list .*got '1-2-3'"),
        ("HIFT_TOUCH_CPUS", "1023", "HIFT_TOUCH_CPUS='1023' names no CPU this process may run on"),
    ],
)
def test_bad_diagnostic_settings_are_refused(native, monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        native.PinnedStore([10], [torch.empty(10)], 1 << 20)


def test_copy_timing_on_a_cpu_store_times_nothing(native):
    store = native.PinnedStore([8], [torch.empty(8)])
    store.time_copies(4)
    store.writeback(0, 0)
    assert store.copy_times() == {"h2d": [], "d2h": []}
    assert store.copy_waits() == {"arrival": 0.0, "in_queue": 0.0, "writeback_issued": 0.0, "out_queue": 0.0, "host_read": 0.0}
    with pytest.raises(ValueError, match="jobs must be >= 0, got -1"):
        store.time_copies(-1)
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.time_copies(1)


def test_closed_store_refuses_calls_and_views_stay_valid(native):
    store = native.PinnedStore([8], [torch.empty(8)])
    view = store.host(0)
    view.fill_(2.0)
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.fetch(0, 0)
    store.synchronize()  # nothing in flight: a no-op, as is a second close
    store.close()
    gc.collect()
    assert torch.equal(view, torch.full((8,), 2.0))  # the view keeps its memory alive


def test_fallback_keeps_the_original_error(monkeypatch):
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_error", None)
    monkeypatch.setenv(_native.DISABLE_ENV, "1")
    assert not _native.available()
    from hift_engine import NativeUnavailableError

    with pytest.raises(NativeUnavailableError, match="disabled by HIFT_DISABLE_NATIVE=1"):
        _native.load()
    from hift_engine.store import make_store

    with pytest.raises(NativeUnavailableError):
        make_store("native", [4], "cpu")
    assert type(make_store("auto", [4], "cpu")).__name__ == "ResidentStore"

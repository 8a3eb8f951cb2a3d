"""The offloaded stores on CUDA: copies on side streams ordered by events.

The race test makes compute slow (a GPU spin before every update) and transfers large, and gives every update
an exactly representable value, so a missing wait shows up as stale or mixed state instead of passing by luck.
HIFT_TEST_SABOTAGE=<wait_arrival|mark_compute_done|wait_host> turns one wait off, to show that the test then
fails (used to demonstrate the test's power; never set it otherwise). HIFT_TEST_SMALL=1 shrinks the sizes for
runs under compute-sanitizer, which slows every kernel by orders of magnitude.
"""

import os
import random

import pytest
import torch

from hift_engine.store import OffloadStore

pytestmark = pytest.mark.cuda


KINDS = ["torch", "native", "native-paced", "native-primary-context"]


def _store(kind, numels, num_slots=2, paced_chunk=(1 << 18) + 4):
    """``native-paced``: copies issued by the store's worker threads in pieces (odd-sized on purpose, so
    pieces straddle element boundaries), one in flight: the ordering must survive that too.
    ``native-primary-context``: host buffers pinned in the process's own context (pin_context=False)."""
    transport = "torch" if kind == "torch" else "native"
    store = OffloadStore(numels, "cuda", transport, num_slots, paced_chunk if kind == "native-paced" else 0,
                         pin_context=kind != "native-primary-context")
    sabotage = os.environ.get("HIFT_TEST_SABOTAGE")
    if sabotage:
        store.transport = _Sabotaged(store.transport, sabotage)
    return store


class _Sabotaged:
    """A transport with one method turned into a no-op (HIFT_TEST_SABOTAGE)."""

    def __init__(self, transport, name):
        self._transport, self._name = transport, name

    def __getattr__(self, attr):
        return (lambda *a, **k: None) if attr == self._name else getattr(self._transport, attr)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_random_orders_bit_exact_on_cuda(kind, seed):
    rnd = random.Random(seed)
    big = 1 << 16 if os.environ.get("HIFT_TEST_SMALL") == "1" else 3_000_001
    numels = [rnd.choice([1, 22, 4097, 1 << 14, big]) for _ in range(rnd.randint(2, 6))]
    order = [rnd.randrange(len(numels)) for _ in range(40)]
    store = _store(kind, numels, num_slots=rnd.choice([2, 3]))
    g = torch.Generator(device="cuda").manual_seed(seed)
    ref = {}
    for t, gid in enumerate(order):
        state, _ = store.activate(gid)
        delta = torch.randn(numels[gid], generator=g, device="cuda")
        state.add_(delta)
        ref[gid] = ref.get(gid, torch.zeros(numels[gid], device="cuda")) + delta
        nxt = order[t + 1] if t + 1 < len(order) else None
        store.release(gid, keep=nxt == gid)
        if nxt is not None:
            store.prefetch(nxt)
    for gid in range(len(numels)):
        got = store.host_state(gid)
        assert (got is None) == (gid not in ref)
        if got is not None:
            assert got.is_pinned()
            assert torch.equal(got, ref[gid].cpu())
    store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_race_slow_compute_large_transfers(kind):
    numel = (2 << 20) if os.environ.get("HIFT_TEST_SMALL") == "1" else 48 << 20  # 192 MB: each copy takes ms
    groups = 5
    store = _store(kind, [numel] * groups, num_slots=2)
    rnd = random.Random(0)
    order = [i % groups for i in range(3 * groups)] + [rnd.randrange(groups) for _ in range(20)]
    count = [0] * groups
    for t, gid in enumerate(order):
        state, _ = store.activate(gid)
        torch.cuda._sleep(2_000_000)  # ~1 ms of GPU spin before the update: the compute stream lags
        state.add_(float(gid + 1))  # exact in fp32: after n updates every element is n * (gid + 1)
        count[gid] += 1
        nxt = order[t + 1] if t + 1 < len(order) else None
        store.release(gid, keep=nxt == gid)
        if nxt is not None:
            store.prefetch(nxt)
    for gid in range(groups):
        host = store.host_state(gid)
        expected = float(count[gid] * (gid + 1))
        bad = (host != expected).sum().item()
        assert bad == 0, f"group {gid}: {bad} of {numel} elements stale or mixed (expected {expected})"
    store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_host_state_waits_for_writeback(kind):
    n = (1 << 20) if os.environ.get("HIFT_TEST_SMALL") == "1" else 32 << 20
    store = _store(kind, [n, n])
    state, _ = store.activate(0)
    torch.cuda._sleep(5_000_000)
    state.fill_(7.0)
    store.release(0, keep=False)
    store.prefetch(1)
    host = store.host_state(0)  # must block until the write-back after the slow update finished
    assert torch.equal(host, torch.full_like(host, 7.0))
    store.close()


def test_native_register_allocation_is_exact_and_pinned():
    from hift_engine import _native

    mod = _native.load()
    assert mod.with_cuda
    n = ((1 << 20) if os.environ.get("HIFT_TEST_SMALL") == "1" else (1 << 28)) + 5  # 1 GiB + 20 bytes
    store = mod.PinnedStore([n], [torch.empty(n, device="cuda")])
    host = store.host(0)
    assert host.is_pinned()
    assert store.host_bytes == -(-n * 4 // 4096) * 4096
    store.close()


def _alternate(store, numels, steps, g):
    """Groups 0 and 1 in turn for ``steps`` steps, each adding random numbers to its state, written back at once
    while the other is prefetched; returns what each group's state must now be."""
    ref = [torch.zeros(n, device="cuda") for n in numels]
    for t in range(steps):
        gid = t % 2
        state, _ = store.activate(gid)
        delta = torch.randn(numels[gid], generator=g, device="cuda")
        state.add_(delta)
        ref[gid] += delta
        store.release(gid, keep=False)
        store.prefetch(1 - gid)
    return ref


def test_native_registration_in_pieces_round_trips_bit_exact(monkeypatch):
    """Host buffers are registered in pieces (HIFT_REGISTER_PIECE_MIB, a multiple of the paced transfer piece)
    so that pinning never holds the driver's lock for long. Every piece must be pinned, and paced copies, cut at
    the same boundaries, must move every byte: a group of 5 MiB + 12 bytes, registered 2 MiB at a time and
    copied 1 MiB at a time, round-trips exactly through both slots many times."""
    monkeypatch.setenv("HIFT_REGISTER_PIECE_MIB", "2")
    numels = [(5 << 20) // 4 + 3, (3 << 20) // 4 + 1]
    store = OffloadStore(numels, "cuda", "native", 2, 1 << 20)
    host = store.transport.host(0)
    assert all(host[i:].is_pinned() for i in (0, (2 << 20) // 4, (4 << 20) // 4, numels[0] - 1))
    g = torch.Generator(device="cuda").manual_seed(0)
    ref = _alternate(store, numels, 12, g)
    for gid in range(2):
        assert torch.equal(store.host_state(gid), ref[gid].cpu())
    # load_state from the device (seeding masters from fp32 weights) crosses the registrations too
    fresh = torch.randn(numels[0], generator=g, device="cuda")
    store.load_state(0, fresh)
    assert torch.equal(store.host_state(0), fresh.cpu())
    state, _ = store.activate(0)
    assert torch.equal(state, fresh)
    store.close()


def _is_really_pinned(host):
    """A device-to-host copy into pinned memory is asynchronous: queued behind a 50 ms GPU sleep, it has not run when
    copy_ returns. Into pageable memory CUDA copies synchronously, so the stream would already be idle."""
    dev = torch.full((host.numel(),), 5.0, device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)
    host.copy_(dev, non_blocking=True)
    pending = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    return pending and torch.equal(host, torch.full_like(host, 5.0))


@pytest.mark.parametrize("background", ["1", "0"])
@pytest.mark.parametrize("pin_context", [True, False])
def test_native_pin_context_pins_and_round_trips(pin_context, background, monkeypatch):
    """Host buffers pinned from the device's pinning context (pin_context.h) are pinned memory for this process's
    own copies; state round-trips bit for bit through them; with pin_context=False nothing of it is made. With the
    background allocator off, every buffer is pinned on this (the caller's) thread between its CUDA work, which
    would go to the wrong context if the pinning context were left current."""
    monkeypatch.setenv("HIFT_BACKGROUND_ALLOC", background)
    numels = [(3 << 20) + 7, 1 << 20]
    store = OffloadStore(numels, "cuda", "native", 2, 1 << 20, pin_context=pin_context)
    stats = store.alloc_stats()
    assert stats["pin_context"] is pin_context, stats["pin_context_error"]
    assert (stats["pin_context_bytes"] > 0) is pin_context and stats["pin_context_error"] == ""
    store.wait_allocated()
    ref = _alternate(store, numels, 8, torch.Generator(device="cuda").manual_seed(1))
    for gid in range(2):
        assert torch.equal(store.host_state(gid), ref[gid].cpu())
    assert all(_is_really_pinned(store.transport.host(gid)) for gid in range(2))
    store.close()


def test_native_pin_context_is_shared_and_outlives_its_store():
    """One pinning context per device, shared by every store (its device memory is paid once), and kept while any
    buffer pinned in it is alive: a host view taken before close() stays pinned memory after its store is gone."""
    import gc

    from hift_engine import _native

    mod = _native.load()
    slots = [torch.empty(1 << 20, device="cuda")]
    a = mod.PinnedStore([1 << 20], slots)
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    b = mod.PinnedStore([1 << 20], slots)
    free_after, _ = torch.cuda.mem_get_info()
    assert a.pin_context_active and b.pin_context_active
    assert a.pin_context_bytes > 100 << 20  # a context's worth (about 260 MiB on an H200)
    assert free_before - free_after < 32 << 20  # b made no context of its own
    host = a.host(0)
    a.close()
    b.close()
    del a, b
    gc.collect()
    assert host.is_pinned() and _is_really_pinned(host)


@pytest.mark.parametrize("depth", ["1", "2"])
def test_native_paced_copy_behind_a_long_wait_is_not_slowed_by_it(depth, monkeypatch):
    """A paced write-back queued behind a 100 ms GPU sleep on the compute stream: its copy, timed on the GPU from
    when its stream passed the wait (time_copies/copy_times), takes about as long as 32 MiB over PCIe. The pacer
    once took the first piece's wait as its duration and slept that long before each later piece (427 ms); with two
    pieces in flight (HIFT_PACE_DEPTH=2) the second piece waits for it too. Every timed copy is reported once, in
    order, with its bytes, and the state round-trips."""
    monkeypatch.setenv("HIFT_PACE_DEPTH", depth)
    numels = [8 << 20, 4 << 20, 4 << 20]  # 32, 16, 16 MiB: paced in 4 MiB pieces
    store = OffloadStore(numels, "cuda", "native", 2, 4 << 20)
    store.wait_allocated()
    store.transport.time_copies(4)
    for gid in range(3):  # two slots: group 2 takes group 0's slot, so group 0 must come back from the host
        state, _ = store.activate(gid)
        state.fill_(float(gid + 3))
        if gid == 0:
            torch.cuda._sleep(200_000_000)  # ~100 ms or more: the write-back waits for it on its own stream
        store.release(gid, keep=False)
    store.prefetch(0)  # a host-to-device copy
    store.synchronize()
    times = store.transport.copy_times()
    assert [b for _, b in times["d2h"]] == [n * 4 for n in numels]
    assert [b for _, b in times["h2d"]] == [numels[0] * 4]
    # group 1's write-back could be queued only once group 0's was issued, which waited for the sleep: the host
    # thread was blocked that long (PinnedStore.copy_waits; this is the coupling bench step reports per step)
    waits = store.transport.copy_waits()
    assert waits["out_queue"] > 0.05 and set(waits) == {"arrival", "in_queue", "writeback_issued", "out_queue", "host_read"}
    sleep_ms = 100.0
    for ms, nbytes in times["d2h"] + times["h2d"]:
        assert 0.0 < ms < sleep_ms / 4, (ms, nbytes)  # 32 MiB at >= 1.3 GB/s; the sleep alone is >= 100 ms
    state, _ = store.activate(0)
    assert torch.equal(state, torch.full_like(state, 3.0))
    store.release(0, keep=True)
    for gid in (1, 2):
        assert torch.equal(store.host_state(gid), torch.full((numels[gid],), float(gid + 3)))
    store.close()

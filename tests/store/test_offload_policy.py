"""The offloaded state store: bit-exact put-away/bring-back, what moves when, and byte accounting.

Runs on CPU over both transports (pure torch, and the C++ store built CPU-only: synchronous copies);
tests/store/test_cuda_stores.py runs the same protocol on CUDA with streams and events.
"""

import random
import time

import pytest
import torch

from hift_engine.store import OffloadStore, ResidentStore
from tests.helpers import CAPPED_CHILD, run_child


@pytest.fixture(params=["torch", "native", "native-paced"])
def transport(request):
    """OffloadStore's transport arguments; the native one is the C++ store (JIT-built CPU-only here; pacing
    only changes how CUDA copies are issued, so the paced variant checks that the option is accepted)."""
    if request.param == "torch":
        return {"transport": "torch"}
    return {"transport": "native", "chunk_bytes": 256 if request.param == "native-paced" else 0}


def drive(store, order, numels, seed=0, then=None):
    """Run the optimizer's protocol over ``order`` (``then``: the group after the last); each 'update' adds a
    known value. Returns the expected final state of every group, computed independently in float64."""
    g = torch.Generator().manual_seed(seed)
    expected = {}
    for t, gid in enumerate(order):
        state, fresh = store.activate(gid)
        assert fresh == (gid not in expected)
        delta = torch.randn(numels[gid], generator=g).to(state.device)
        state.add_(delta)
        expected[gid] = expected.get(gid, torch.zeros(numels[gid], dtype=torch.float64)) + delta.double().cpu()
        nxt = order[t + 1] if t + 1 < len(order) else then
        store.release(gid, keep=nxt == gid)
        if nxt is not None:
            store.prefetch(nxt)
    return expected


@pytest.mark.parametrize("slots", [2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_put_away_bring_back_bit_exact_random_orders(seed, slots, transport):
    rnd = random.Random(seed)
    numels = [rnd.choice([1, 22, 64, 4097, 1000]) for _ in range(rnd.randint(1, 7))]
    order = [rnd.randrange(len(numels)) for _ in range(60)]
    store = OffloadStore(numels, "cpu", num_slots=slots, **transport)
    drive(store, order, numels, seed)
    # Exact: replay the same float32 additions outside the store.
    g = torch.Generator().manual_seed(seed)
    ref = {}
    for gid in order:
        ref[gid] = ref.get(gid, torch.zeros(numels[gid])) + torch.randn(numels[gid], generator=g)
    for gid in range(len(numels)):
        got = store.host_state(gid)
        assert got is None if gid not in ref else torch.equal(got, ref[gid])


def test_same_group_twice_moves_nothing_and_first_activation_touches_no_host(transport):
    store = OffloadStore([100, 100], "cpu", **transport)
    drive(store, [0, 0, 0, 0], [100, 100], then=0)
    s = store.stats
    assert s.bytes_h2d == 0 and s.bytes_d2h == 0 and s.host_bytes == 0 and s.zero_fills == 1


def test_alternating_two_groups_stay_resident_in_two_slots(transport):
    store = OffloadStore([50, 70], "cpu", **transport)
    drive(store, [0, 1] * 5, [50, 70])
    assert store.stats.fetches == 0  # both fit: written back (cheap, hidden) but never fetched again
    assert store.stats.host_bytes >= (50 + 70) * 4


def test_cycle_of_four_groups_moves_each_state_once_each_way_per_step(transport):
    numels = [10, 20, 30, 40]
    store = OffloadStore(numels, "cpu", **transport)
    drive(store, list(range(4)) * 3, numels)
    s = store.stats
    # cycle 1: 4 zero fills; cycles 2-3: every activation fetches; every update except the last writes back
    assert s.zero_fills == 4 and s.fetches == 8
    assert s.bytes_h2d == 2 * sum(numels) * 4
    assert s.device_bytes == 2 * max(numels) * 4


def test_host_state_of_dirty_resident_group_writes_back_first(transport):
    store = OffloadStore([8], "cpu", **transport)
    state, _ = store.activate(0)
    state.fill_(3.0)
    store.release(0, keep=True)
    assert torch.equal(store.host_state(0), torch.full((8,), 3.0))


def test_load_and_reset(transport):
    store = OffloadStore([4, 4], "cpu", **transport)
    store.load_state(1, torch.arange(4.0))
    state, fresh = store.activate(1)
    assert not fresh and torch.equal(state, torch.arange(4.0))
    store.release(1, keep=False)
    store.reset(1)
    state, fresh = store.activate(1)
    assert fresh and torch.equal(state, torch.zeros(4))
    with pytest.raises(ValueError, match="holds 4 state elements"):
        store.load_state(0, torch.zeros(5))


def test_resident_store_keeps_everything_on_device():
    store = ResidentStore([3, 5], "cpu")
    expected = drive(store, [0, 1, 0, 1, 1], [3, 5])
    for gid, exp in expected.items():
        torch.testing.assert_close(store.host_state(gid).double(), exp, rtol=1e-6, atol=1e-6)
    assert store.stats.bytes_h2d == 0 and store.stats.device_bytes == 8 * 4


def test_release_without_activate_is_an_error(transport):
    store = OffloadStore([4], "cpu", **transport)
    with pytest.raises(RuntimeError, match="call activate"):
        store.release(0, keep=False)


def test_the_first_update_starts_pinning_the_other_buffers():
    """The native store holds every buffer after the first one's before pinning until the store's first activation
    (the first update: the first forward's device allocations are done); then the rest come without being asked."""
    numels = [1 << 18] * 6
    store = OffloadStore(numels, "cpu", transport="native")
    time.sleep(0.2)
    assert store.transport.host_bytes == 1 << 20  # the first write-back's buffer, waited for at construction
    store.activate(0)
    deadline = time.monotonic() + 20
    while store.transport.host_bytes < 6 << 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.transport.host_bytes == 6 << 20
    store.close()


def test_state_loaded_before_the_first_update_round_trips():
    """A checkpoint loaded before the first step (every group's host buffer asked for while the native store holds
    their pinning) comes back exactly through a cycle of updates."""
    numels = [1 << 16, 3, 5000, 1 << 16]
    store = OffloadStore(numels, "cpu", transport="native")
    loaded = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in numels]
    for gid, flat in enumerate(loaded):
        store.load_state(gid, flat)
    g = torch.Generator().manual_seed(0)
    deltas = {gid: torch.randn(numels[gid], generator=g) for gid in range(len(numels))}
    for gid in range(len(numels)):
        state, fresh = store.activate(gid)
        assert not fresh and torch.equal(state, loaded[gid])
        state.add_(deltas[gid])
        store.release(gid, keep=False)
    for gid in range(len(numels)):
        assert torch.equal(store.host_state(gid), loaded[gid] + deltas[gid])
    store.close()


def test_wait_allocated_raises_what_the_background_could_not_allocate():
    """A buffer the native store's background thread cannot reserve (here a 1 GiB group under an address-space
    cap) is left to the caller; wait_allocated() then allocates it itself, so the reason is raised by this call
    (which HiFTOptimizer.wait_host_memory() makes) instead of later, at that group's write-back."""
    result = run_child(CAPPED_CHILD + """
    from hift_engine.store.offload import OffloadStore
    small, huge = (4 << 20) // 4, (1 << 30) // 4
    cap(2500)  # the two device slots (1 GiB each, here on the CPU) fit; the 1 GiB group's host buffer does not
    store = OffloadStore([small, huge, small], "cpu", transport="native")
    try:
        store.wait_allocated()
        raise SystemExit(f"wait_allocated() returned with {store.transport.host_bytes} host bytes and no error")
    except RuntimeError as e:
        assert "could not reserve" in str(e), e
    print("OK")
    """)
    assert result.returncode == 0 and "OK" in result.stdout, (result.returncode, result.stdout[-500:], result.stderr[-2000:])

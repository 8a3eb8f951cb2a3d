"""The state-store interface: where each group's flat optimizer state lives between its steps."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor

__all__ = ["StateStore", "StoreStats"]


@dataclass
class StoreStats:
    bytes_h2d: int = 0
    bytes_d2h: int = 0
    fetches: int = 0
    writebacks: int = 0
    zero_fills: int = 0
    host_bytes: int = 0  # host memory reserved for state
    device_bytes: int = 0  # device memory held for state (slots, or all state when resident)


class StateStore(ABC):
    """Holds every group's flat fp32 state; hands the active group's state to the update as a device tensor.

    Protocol, per optimizer step of group g (all calls from the host thread, device work on the current stream):
        state, fresh = activate(g)   # g's state on the device, ready for kernels on the current stream;
                                     # fresh=True the first time (zero-filled, never touched host memory)
        ... update kernels ...
        release(g, keep)             # the update is queued; keep=True when g is also the next group
        prefetch(g_next)             # start bringing the next group's state in, hidden behind fwd/bwd
    """

    kind = "abstract"

    def __init__(self, numels: list[int]) -> None:
        self.numels = list(numels)
        self.stats = StoreStats()

    @abstractmethod
    def activate(self, gid: int) -> tuple[Tensor, bool]: ...

    @abstractmethod
    def release(self, gid: int, keep: bool) -> None: ...

    def prefetch(self, gid: int) -> None:  # noqa: B027 - optional for stores that never move state
        """Start moving ``gid``'s state to the device; a no-op where state never leaves it."""

    @abstractmethod
    def host_state(self, gid: int) -> Tensor | None:
        """The latest state of ``gid`` as a CPU tensor (None if never initialised). Waits for pending copies.
        The tensor may alias the store's memory: read it before the next optimizer step."""

    @abstractmethod
    def load_state(self, gid: int, flat: Tensor) -> None:
        """Replace ``gid``'s state with ``flat`` (any device); the next activation sees it."""

    @abstractmethod
    def reset(self, gid: int) -> None:
        """Forget ``gid``'s state: its next activation is fresh (zero-filled) again."""

    def wait_allocated(self) -> None:  # noqa: B027 - only stores that allocate in the background wait
        """Block until every group's host memory is allocated (returns at once where nothing is allocated in the
        background)."""

    def synchronize(self) -> None:  # noqa: B027
        """Wait for every copy in flight."""

    def close(self) -> None:  # noqa: B027
        """Release memory; the store is unusable afterwards."""

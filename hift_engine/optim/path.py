"""How a group's update is done: the interface HiFTOptimizer.step() drives, with two implementations,
``FusedPath`` (spec + flat layout + state store + kernels) and ``GenericPath`` (any torch.optim.Optimizer).

Per step of group g (next group g'):  update(g, members, flags) -> put_away(g, keep=g' == g) -> prefetch(g').
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

from torch import Tensor

from ..state_io import GroupState, Signature

__all__ = ["UpdatePath"]


class UpdatePath(ABC):
    #: name of the optimizer (saved with the state; a load checks it)
    name: str = ""
    #: torch.optim state keys of each parameter, in layout order ("exp_avg", ...); empty for generic paths
    state_names: tuple[str, ...] = ()

    @abstractmethod
    def update(self, gid: int, members: Sequence[int], flags: Tensor | None) -> None:
        """Update the parameters ``members`` (indices into the group's layout) of group ``gid`` from their
        gradients. ``flags`` is None or a device tensor [clip coefficient, skip]."""

    @abstractmethod
    def put_away(self, gid: int, keep: bool) -> None:
        """The update of ``gid`` is queued; move its state off the device unless ``keep`` (same group next)."""

    @abstractmethod
    def prefetch(self, gid: int) -> None:
        """Start bringing ``gid``'s state to the device, hidden behind the next forward/backward."""

    # ------------------------------------------------------------------ the one state encoding
    @abstractmethod
    def export_group(self, gid: int) -> GroupState:
        """Group ``gid``'s state as CPU tensors (waits for its pending write-back)."""

    @abstractmethod
    def check_group(self, gid: int, signature: Signature, values: Mapping[str, Any]) -> None:
        """Raise ConfigError unless state of this signature can be imported into ``gid``. Changes nothing."""

    @abstractmethod
    def import_group(self, gid: int, state: GroupState) -> None:
        """Replace ``gid``'s state (already checked)."""

    @abstractmethod
    def to_torch(self, gid: int, state: GroupState) -> list[dict[str, Any] | None]:
        """torch.optim-style per-parameter entries of the group (None: no state yet)."""

    @abstractmethod
    def from_torch(self, gid: int, entries: Sequence[Mapping[str, Any] | None], build: bool = True) -> GroupState | None:
        """Inverse of to_torch; raises ConfigError naming the parameter on a bad entry. ``build=False`` only
        checks (no tensors allocated) and returns None."""

    def master_weights(self, gid: int, state: GroupState) -> dict[str, Tensor]:
        """Parameter name -> fp32 master weight, where this path keeps masters (none by default)."""
        return {}

    def state_bytes_per_element(self) -> int:
        """Bytes of optimizer state per parameter element (for describe())."""
        return 4 * len(self.state_names)

    def describe(self) -> str:
        return ""

    def synchronize(self) -> None:  # noqa: B027 - optional
        """Wait for every state copy in flight."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release state memory; the path is unusable afterwards."""

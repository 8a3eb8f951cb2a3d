"""hift train under torchrun: one process per device, rank 0 owns the run directory.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; with more than one process the process group is initialised
here (NCCL on GPUs, gloo on CPUs), each rank trains on its own slice of every global batch (Batches), the
optimizer averages the active group's gradients (HiFTConfig.data_parallel), and only rank 0 writes logs, the
config, the plot and the final model (checkpoints: rank 0 writes, every rank gets the path).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import ConfigError

__all__ = ["Ranks", "init_ranks", "leave_without_destructors"]


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    started_here: bool = False  # this module initialised the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """train.device for this rank: under torchrun "auto"/"cuda" mean cuda:LOCAL_RANK."""
        if self.world > 1 and name.startswith("cuda:"):
            raise ConfigError(f"train.device={name!r} under torchrun would put every rank on one GPU; use auto or cuda "
                              "(each rank takes cuda:LOCAL_RANK)")
        if self.world == 1 or name not in ("auto", "cuda") or not torch.cuda.is_available():
            return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        global _gloo_torn_down
        if self.started_here and dist.is_initialized():
            gloo = dist.get_backend() == "gloo"
            dist.destroy_process_group()
            _gloo_torn_down = _gloo_torn_down or gloo


# A gloo process group was destroyed in this process. Even then, about one exit in ten or more aborted in C++
# static destructors ("terminate called without an active exception", SIGABRT) after all work was done and
# written, so torchrun reported a finished run as failed. The console entry then leaves with os._exit
# (cli/main.py entry(); main() itself returns, as a function must).
_gloo_torn_down = False


def leave_without_destructors() -> bool:
    return _gloo_torn_down


def init_ranks(device_name: str) -> Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Ranks()
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    started = False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and device_name != "cpu"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        started = True
    return Ranks(dist.get_rank(), dist.get_world_size(), started)

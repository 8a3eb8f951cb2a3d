"""Checkpoints: atomic on disk, verified on load, exact on resume.

Layout of one checkpoint, ``<root>/ckpt-<step:08d>/`` (``ckpt-<step>-r<n>`` when step was saved before):
    model.safetensors          model weights (tied weights stored once)
    optim/group-<g>.safetensors  group g's optimizer state as ``HiFTOptimizer.export_state`` encodes it (the
                               same encoding state_dict() is built on), written from the store's host memory
                               after its write-back finished (no copy of the 50 GiB)
    meta.json                  step, the optimizer's meta (hyper-parameters, order position, skips), RNG, extra
    rng.safetensors            torch CPU (and CUDA) generator states (each rank's under data parallelism)
    scheduler.pt               the LR scheduler's state_dict (torch.save; read with weights_only=True)
    manifest.json              written last: every file's size and SHA-256, a save sequence number, and the
                               SHA-256 of the manifest's own content
Files go to a temporary directory, are fsynced, the manifest is written, then the directory is renamed into
place under a name no other checkpoint has, so a checkpoint directory is either complete or absent (a crash
leaves only ``.tmp-*`` directories, which readers ignore) and re-saving a step never hides the old copy before
the new one is in place. "Latest" means most recently saved (the sequence number), not the highest step: a run
rolled back to an earlier checkpoint continues from its own newest one. A reader verifies the manifest and
names the first bad file, and validates everything (files, model shapes, optimizer layout, scheduler) before
it changes anything. Nothing is unpickled except the scheduler state, under ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import copy
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint_dir import (
    FORMAT,
    free_name,
    latest_checkpoint,
    list_checkpoints,
    manifest_digest,
    saved_checkpoints,
    sha256,
    verify_checkpoint,
)
from .checkpoint_tmp import LOCK_NAME, SaveDir, clear_abandoned
from .errors import CheckpointError, ConfigError
from .sharding import shard_file
from .state_io import Signature

log = logging.getLogger("hift_engine")

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "verify_checkpoint", "model_weights"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        _fsync(f.fileno())


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    _fsync_path(path)


def _rng_state() -> tuple[dict[str, torch.Tensor], Any]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    state = random.getstate()
    return tensors, [state[0], list(state[1]), state[2]]


def _all_ranks_rng(reducer) -> list | None:
    """Every rank's (RNG tensors, python RNG state), on rank 0 (None elsewhere): under data parallelism each rank
    draws its own dropout masks and shuffles, so each must resume from its own generators. A collective."""
    gathered: list | None = [None] * reducer.world if reducer.is_main else None
    dist.gather_object(_rng_state(), gathered, dst=0)
    return gathered


def _rank_rng(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], rank: int) -> tuple[dict, Any]:
    """The RNG state saved for ``rank``: its own ("rank<r>." keys, meta's python_rng_ranks), or rank 0's in a
    checkpoint saved without them (one process, fewer processes, or an older version), said in a warning:
    that rank then draws the same dropout masks and shuffles as rank 0."""
    prefix = f"rank{rank}."
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if rank and "torch_cpu" in own:
        return own, (meta.get("python_rng_ranks") or {}).get(str(rank))
    if rank:
        saved = 1 + len(meta.get("python_rng_ranks") or {})
        log.warning(f"rank {rank}: the checkpoint holds the random-number state of {saved} process(es), none of it "
                    "this rank's; it resumes rank 0's random streams (the same dropout masks and shuffles as rank 0). "
                    "Resume on as many processes as saved it, or reseed each rank after loading")
    return {k: v for k, v in tensors.items() if not k.startswith("rank")}, meta.get("python_rng")


def _set_rng_state(tensors: Mapping[str, torch.Tensor], python_state: Any) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if python_state is not None:
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))


def save_checkpoint(
    root: str | os.PathLike,
    model: nn.Module,
    optimizer,
    scheduler=None,
    step: int | None = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write a checkpoint of ``model`` and a HiFTOptimizer (and scheduler) to ``root/ckpt-<step>``.

    ``step`` defaults to ``optimizer.global_step``; ``extra`` is any JSON-serialisable dict (e.g. the data
    position) returned by load_checkpoint; ``keep_last`` deletes the checkpoints saved before the newest
    ``keep_last`` (by save order). Re-saving a step writes a new directory and removes the old one only after
    the new one is complete. Returns the checkpoint's directory.
    """
    step = optimizer.global_step if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError(f"save_checkpoint: step must be an integer >= 0, got {step!r}")
    reducer = getattr(optimizer, "reducer", None)
    if reducer is None:
        return _save(root, model, optimizer, scheduler, step, extra, keep_last)
    if getattr(optimizer, "shards", None) is not None:
        return _save_sharded(root, model, optimizer, scheduler, step, extra, keep_last, reducer)
    # Data parallel: the state is replicated, so rank 0 writes (with every rank's RNG state) and every rank gets
    # the path (or rank 0's error).
    rngs = _all_ranks_rng(reducer)
    if not reducer.is_main:
        outcome = reducer.broadcast_object(None)
        if outcome.get("error"):
            raise CheckpointError(f"rank 0 could not save the checkpoint: {outcome['error']}")
        return Path(outcome["path"])
    try:
        path = _save(root, model, optimizer, scheduler, step, extra, keep_last, rngs)
    except BaseException as e:
        reducer.broadcast_object({"error": f"{type(e).__name__}: {e}"})
        raise
    reducer.broadcast_object({"path": str(path)})
    return path


def _prepare(root, step: int, keep_last) -> tuple[Path, list, SaveDir]:
    """Checks, then the checkpoints saved so far and a fresh temporary directory (with ``optim/``, locked until
    its ``release()``) under root."""
    if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
        raise ConfigError(f"keep_last must be an integer >= 1 (or None to keep all), got {keep_last!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-del-*"):  # deletions a killed process did not finish
        shutil.rmtree(stale, ignore_errors=True)
    clear_abandoned(root)  # saves a killed process did not finish
    before = saved_checkpoints(root)
    return root, before, SaveDir(root, step)


def _save(root, model, optimizer, scheduler, step, extra, keep_last, rngs=None) -> Path:
    root, before, save_dir = _prepare(root, step, keep_last)
    tmp = save_dir.path
    try:
        export = optimizer.export_state()
        values, masters, written = {}, {}, []
        for gid, group in enumerate(export.groups):  # each waits for its group's write-back
            written.append(f"optim/group-{gid:04d}.safetensors")
            _save_tensors(tmp / written[-1], group.tensors)
            if group.values:
                values[str(gid)] = group.values
            masters.update(optimizer.master_weights(gid, group))
        return _finish(root, before, tmp, model, masters, scheduler, step, export.meta, values, extra, keep_last, rngs,
                       written)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        save_dir.release()


def _finish(root: Path, before, tmp: Path, model, masters, scheduler, step, opt_meta, values, extra, keep_last,
            rngs=None, written=()) -> Path:
    """Everything but the optimizer's group files, the manifest (over every file in ``tmp``), the atomic rename,
    and the removal of copies it replaces. ``rngs``: every rank's RNG state (data parallel), rank 0's first.
    ``written``: the optimizer files (relative to ``tmp``) written before; each must still be there."""
    _save_tensors(tmp / "model.safetensors", model_weights(model, masters=masters))
    rng_tensors, python_rng = rngs[0] if rngs else _rng_state()
    python_ranks = {}
    for r, (tensors, python_state) in enumerate(rngs or []):
        if r:  # rank 0's under the plain names, as a one-process checkpoint has them
            rng_tensors = {**rng_tensors, **{f"rank{r}.{k}": v for k, v in tensors.items()}}
            python_ranks[str(r)] = python_state
    _save_tensors(tmp / "rng.safetensors", rng_tensors)
    if scheduler is not None:
        with open(tmp / "scheduler.pt", "wb") as f:
            torch.save(scheduler.state_dict(), f)
            f.flush()
            _fsync(f.fileno())
    meta = {
        "step": step, "optimizer": opt_meta, "group_values": values, "python_rng": python_rng,
        "extra": dict(extra or {}), "torch": torch.__version__,
    }
    if python_ranks:
        meta["python_rng_ranks"] = python_ranks
    try:
        _write_json(tmp / "meta.json", meta)
    except TypeError as e:
        raise CheckpointError(f"save_checkpoint: extra must be JSON-serialisable ({e})") from None
    files = {
        str(f.relative_to(tmp)): {"size": f.stat().st_size, "sha256": sha256(f)}
        for f in sorted(tmp.rglob("*"))
        if f.is_file() and f != tmp / LOCK_NAME
    }
    expected = [*written, "model.safetensors", "rng.safetensors", "meta.json"] + (["scheduler.pt"] if scheduler is not None else [])
    missing = [name for name in expected if name not in files]
    if missing:  # a manifest over what is left would make an incomplete checkpoint look complete
        raise CheckpointError(f"save_checkpoint: {missing[:3]} ({len(missing)} files) vanished from {tmp} while "
                              "saving (is another process deleting it?); nothing was saved, the previous checkpoints stand")
    manifest = {"format": FORMAT, "step": step, "seq": max((s for s, _, _ in before), default=-1) + 1, "files": files}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    _write_json(tmp / "manifest.json", manifest)
    _fsync_path(tmp / "optim")
    _fsync_path(tmp)
    final = free_name(root, step)
    (tmp / LOCK_NAME).unlink(missing_ok=True)  # the lock itself is held until the save's release()
    os.rename(tmp, final)
    _fsync_path(root)
    for _, old_step, old in before:  # the new copy is in place: older copies of the same step can go
        if old_step == step:
            _discard(old)
    if keep_last is not None:
        for old in list_checkpoints(root)[:-keep_last]:
            _discard(old)
    return final


def _discard(old: Path) -> None:
    """Delete a checkpoint directory so that at no moment does a part of it look complete: it is first renamed
    out of the readers' view (atomic), then deleted. A process killed while deleting in place left a directory
    whose manifest listed files already gone; killed now, it leaves a ``.tmp-del-*`` directory, which readers
    ignore and the next save removes."""
    trash = old.parent / f".tmp-del-{old.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(old, trash)
    except OSError:
        return  # already gone (another process pruned it)
    _fsync_path(old.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _save_sharded(root, model, optimizer, scheduler, step, extra, keep_last, reducer) -> Path:
    """shard_state: every rank writes its pieces of the optimizer state into the one temporary directory rank 0
    made (so the directory must be on a filesystem every rank sees); rank 0 gathers the whole fp32 masters of a
    mixed-precision run group by group, writes the rest and the manifest over every file, and renames. Any
    rank's failure fails the save on every rank, and nothing is renamed into place."""
    main = reducer.is_main
    box: dict[str, Any] = {}
    save_dir, before = None, None
    if main:
        try:
            root, before, save_dir = _prepare(root, step, keep_last)
            box = {"tmp": str(save_dir.path)}
        except BaseException as e:
            box = {"error": f"{type(e).__name__}: {e}"}
    try:
        return _save_shards(root, model, optimizer, scheduler, step, extra, keep_last, reducer, box, before)
    finally:
        if save_dir is not None:
            save_dir.release()


def _save_shards(root, model, optimizer, scheduler, step, extra, keep_last, reducer, box, before) -> Path:
    """_save_sharded once rank 0 made (and locked) the temporary directory, or failed to (``box``)."""
    rank, world, main = reducer.rank, reducer.world, reducer.is_main
    box = reducer.broadcast_object(box if main else None)
    if box.get("error"):
        raise CheckpointError(f"rank 0 could not start the checkpoint: {box['error']}")
    tmp = Path(box["tmp"])
    error = None
    try:  # this rank's pieces; no collective in here, so a failure cannot leave another rank waiting
        export = optimizer.export_state()
        for gid, group in enumerate(export.groups):
            _save_tensors(tmp / "optim" / shard_file(gid, rank), group.tensors)
    except BaseException as e:  # noqa: BLE001 - reported to every rank below
        error = f"rank {rank}: {type(e).__name__}: {e}"
    masters: dict[str, torch.Tensor] = {}
    if getattr(optimizer.path, "masters", False):
        groups = None
        if error is None:
            try:
                groups = iter(optimizer.export_state().groups)
            except BaseException as e:  # noqa: BLE001
                error = f"rank {rank}: {type(e).__name__}: {e}"
        for gid in range(optimizer.num_groups):  # every rank joins every gather, whatever happened
            mine: dict[str, torch.Tensor] = {}
            if groups is not None:
                try:
                    mine = optimizer.master_weights(gid, next(groups))
                except BaseException as e:  # noqa: BLE001
                    error, groups = error or f"rank {rank}: {type(e).__name__}: {e}", None
            gathered: list | None = [None] * world if main else None
            dist.gather_object(mine, gathered, dst=0)
            if main:
                masters.update(optimizer.shards.assemble_masters(gid, gathered))
    rngs = _all_ranks_rng(reducer)
    errors: list | None = [None] * world if main else None
    dist.gather_object(error, errors, dst=0)
    if main:
        try:
            failed = [e for e in errors if e]
            if failed:
                raise CheckpointError("; ".join(failed))
            written = [f"optim/{shard_file(gid, r)}" for gid in range(optimizer.num_groups) for r in range(world)]
            box = {"path": str(_finish(root, before, tmp, model, masters, scheduler, step, export.meta, {}, extra, keep_last,
                                       rngs, written))}
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            box = {"error": f"{type(e).__name__}: {e}"}
    box = reducer.broadcast_object(box if main else None)
    if box.get("error"):
        raise CheckpointError(f"the sharded checkpoint was not saved: {box['error']}")
    return Path(box["path"])


def model_weights(model: nn.Module, optimizer=None, masters: Mapping[str, torch.Tensor] | None = None) -> dict:
    """The model's state dict (a tensor shared by several names once), with the fp32 master weights of a mixed
    precision run in place of the rounded parameters (``masters``, or taken from ``optimizer``): what to save
    so that the weights load for fp32 training or inference (``save_pretrained(state_dict=...)`` too)."""
    if masters is None:
        masters = {}
        if optimizer is not None:
            export = optimizer.export_state()
            for gid, group in enumerate(export.groups):
                masters.update(optimizer.master_weights(gid, group))
    seen, tensors = set(), {}
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue  # tied weights: stored once; load_checkpoint accepts names that share storage
        seen.add(key)
        tensors[name] = masters.get(name, t)
    return tensors


def _header(f: Path) -> Signature:
    """Names, shapes and dtypes of a safetensors file, from its header alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), "pt") as h:
            return {k: (tuple(h.get_slice(k).get_shape()), _DTYPES.get(h.get_slice(k).get_dtype())) for k in h.keys()}
    except Exception as e:  # noqa: BLE001 - any header problem is a bad file
        raise CheckpointError(f"{f}: unreadable ({type(e).__name__}: {e})") from None


def _check_model(f: Path, model: nn.Module) -> None:
    """Every saved tensor fits a model entry; every model entry is saved (or shares storage with a saved one)."""
    header, mine = _header(f), model.state_dict()
    unexpected = sorted(k for k in header if k not in mine)
    wrong = [f"{k} {header[k][0]} vs {tuple(mine[k].shape)}" for k in header if k in mine and header[k][0] != tuple(mine[k].shape)]
    saved_storage = {mine[k].untyped_storage().data_ptr() for k in header if k in mine}
    missing = sorted(k for k in mine if k not in header and mine[k].untyped_storage().data_ptr() not in saved_storage)
    if unexpected or missing or wrong:
        raise CheckpointError(
            f"{f}: does not match this model (missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {wrong[:3]})"
        )


def _optimizer_meta(meta: Mapping[str, Any]) -> dict:
    if "optimizer" in meta:
        return dict(meta["optimizer"])
    return {**meta["hift"], "param_groups": meta["hyperparameters"]}  # format 1


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer=None,
    scheduler=None,
    verify: bool = True,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint written by save_checkpoint; returns {"step", "extra", "path"}.

    Refuses (CheckpointError) a partial or corrupted checkpoint, naming the bad file, and one written for a
    different model, optimizer or group layout; a refused load changes nothing. ``path`` may be a checkpoint
    or a root (its latest is used).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    # 1. Check everything before changing anything. Under data parallelism every rank must agree before any
    # rank applies: one rank refusing (its own piece of a sharded state, a file it cannot read) refuses on all.
    reducer = getattr(optimizer, "reducer", None) if optimizer is not None else None
    snapshot = copy.deepcopy(scheduler.state_dict()) if scheduler is not None else None
    try:
        path, meta, opt_meta, values = _read_meta(Path(path), verify)
        group_files, signatures, saved_sched, rng = _check_all(path, meta, opt_meta, values, model, optimizer,
                                                               scheduler, snapshot, restore_rng)
        refusal = None
    except Exception as e:  # noqa: BLE001 - raised below, after every rank has said whether it refuses
        refusal = e
    if reducer is not None:
        refusals: list = [None] * reducer.world
        dist.all_gather_object(refusals, str(refusal) if refusal is not None else None)
        others = [f"rank {r}: {msg}" for r, msg in enumerate(refusals) if msg and r != reducer.rank]
        if refusal is None and others:
            if scheduler is not None:
                scheduler.load_state_dict(snapshot)
            refusal = CheckpointError(f"{path}: refused by another rank ({'; '.join(others)})")
    if refusal is not None:
        raise refusal

    # 2. Apply.
    try:
        load_model(model, str(path / "model.safetensors"), strict=False)
        if optimizer is not None:
            optimizer.import_state(opt_meta, (_load_group(f, values.get(str(gid), {})) for gid, f in enumerate(group_files)),
                                   signatures=signatures)
        if scheduler is not None:
            scheduler.load_state_dict(saved_sched)  # after the optimizer: a schedule may set the LRs it implies
        if rng is not None:
            rank = reducer.rank if reducer is not None else (dist.get_rank() if dist.is_initialized() else 0)
            _set_rng_state(*_rank_rng(rng, meta, rank))
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: failed while loading an already verified checkpoint ({type(e).__name__}: {e})") from e
    return {"step": int(meta.get("step", 0)), "extra": meta.get("extra", {}), "path": str(path)}


def _read_meta(path: Path, verify: bool):
    """The checkpoint (a root resolves to its latest), verified, and its meta.json."""
    if not (path / "manifest.json").exists() and list_checkpoints(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: no checkpoint under it verifies")
        path = latest
    verify_checkpoint(path, full=verify)
    try:
        meta = json.loads((path / "meta.json").read_text())
        opt_meta = _optimizer_meta(meta)
        values = meta.get("group_values", meta.get("generic_values", {}))
        if not isinstance(values, dict):
            raise TypeError("group values are not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'meta.json'}: unreadable ({e})") from None
    return path, meta, opt_meta, values


def _check_all(path, meta, opt_meta, values, model, optimizer, scheduler, snapshot, restore_rng):
    """Every check of load_checkpoint, changing nothing (the scheduler is probed and put back on failure)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    saved_sched = rng = signatures = None
    _check_model(path / "model.safetensors", model)
    group_files = []
    if optimizer is not None:
        try:
            optimizer.check_state(opt_meta)  # the layout first: a differing group count is named as such
        except (ConfigError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{path}: {e}") from None
        shards = getattr(optimizer, "shards", None)  # check_state above has matched the saved world size
        group_files = [path / "optim" / (shard_file(gid, shards.rank) if shards is not None else f"group-{gid:04d}.safetensors")
                       for gid in range(optimizer.num_groups)]
        signatures = [(_header(f), values.get(str(gid), {})) for gid, f in enumerate(group_files)]
        try:
            optimizer.check_state(opt_meta, signatures)
        except (ConfigError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    if scheduler is not None:
        f = path / "scheduler.pt"
        if not f.is_file():
            raise CheckpointError(f"{path}: saved without a scheduler, but one was given to restore")
        try:
            saved_sched = torch.load(f, weights_only=True)
            scheduler.load_state_dict(saved_sched)  # a probe: loaded again below, after the optimizer's LRs
        except Exception as e:  # noqa: BLE001 - any unpickling/shape problem is a bad checkpoint
            scheduler.load_state_dict(snapshot)
            raise CheckpointError(f"{f}: cannot restore the scheduler ({type(e).__name__}: {e})") from None
    try:
        rng = load_file(str(path / "rng.safetensors")) if restore_rng else None
        if rng is not None and "torch_cpu" not in rng:
            raise KeyError("torch_cpu")
    except (SafetensorError, OSError, KeyError) as e:
        if scheduler is not None:
            scheduler.load_state_dict(snapshot)
        raise CheckpointError(f"{path / 'rng.safetensors'}: cannot restore RNG state ({e})") from None
    return group_files, signatures, saved_sched, rng


def _load_group(f: Path, values: Mapping[str, Any]):
    from safetensors.torch import load_file

    from .state_io import GroupState

    return GroupState(load_file(str(f)), dict(values))

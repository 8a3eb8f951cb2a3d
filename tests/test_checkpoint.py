"""Checkpoints: exact resume, atomic writes, verification, crash survival, clear errors."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hift_engine import CheckpointError, HiFTOptimizer, latest_checkpoint, load_checkpoint, save_checkpoint
from hift_engine import checkpoint as ckpt
from tests.helpers import lm_batch, params_equal, tiny_llama

REPO = Path(__file__).resolve().parent.parent


def _train(model, opt, sched, steps, start=0, accum=2):
    losses = []
    for step in range(start, start + steps):
        total = 0.0
        for micro in range(accum):
            loss = model(**lm_batch(seed=1000 * step + micro)).loss / accum
            loss.backward()
            total += loss.item()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def _setup(strategy="random", optimizer="adamw", **kw):
    model = tiny_llama()
    opt = HiFTOptimizer(model, optimizer, lr=1e-2, strategy=strategy, seed=5, **kw)
    sched = opt.cycle_scheduler("cosine", total_steps=40, warmup_steps=5)
    return model, opt, sched


@pytest.mark.parametrize("strategy", ["bottom2up", "top2down", "random"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd", torch.optim.RMSprop])
def test_resume_in_new_objects_is_bit_identical(tmp_path, strategy, optimizer):
    kw = {"momentum": 0.9} if optimizer == "sgd" else {}
    store = {"state_store": "torch"} if isinstance(optimizer, str) else {}
    model, opt, sched = _setup(strategy, optimizer, **kw, **store)
    _train(model, opt, sched, 7)
    path = save_checkpoint(tmp_path, model, opt, sched, extra={"data_position": 7})
    reference = _train(model, opt, sched, 9, start=7)

    torch.manual_seed(123)  # the checkpoint must restore RNG state too
    model2, opt2, sched2 = _setup(strategy, optimizer, **kw, **store)
    info = load_checkpoint(path, model2, opt2, sched2)
    assert info["step"] == 7 and info["extra"] == {"data_position": 7}
    assert opt2.global_step == 7 and opt2.order.state_dict() == _order_at(strategy, opt.num_groups, 7)
    resumed = _train(model2, opt2, sched2, 9, start=7)
    assert resumed == reference
    assert params_equal(model, model2)


def _order_at(strategy, k, steps):
    from hift_engine import GroupOrder

    order = GroupOrder(k, strategy, seed=5)
    for _ in range(steps):
        order.advance()
    return order.state_dict()


def test_layout_on_disk_and_keep_last(tmp_path):
    model, opt, sched = _setup()
    for i in range(4):
        _train(model, opt, sched, 2, start=2 * i)
        save_checkpoint(tmp_path, model, opt, sched, keep_last=2)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["ckpt-00000006", "ckpt-00000008"]
    files = sorted(str(p.relative_to(tmp_path / names[-1])) for p in (tmp_path / names[-1]).rglob("*") if p.is_file())
    assert files == sorted(
        ["manifest.json", "meta.json", "model.safetensors", "rng.safetensors", "scheduler.pt"]
        + [f"optim/group-{g:04d}.safetensors" for g in range(opt.num_groups)]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert latest_checkpoint(tmp_path).name == "ckpt-00000008"


class _Killed(BaseException):
    """Stands in for SIGKILL inside the process: nothing after it runs."""


def test_kill_while_keep_last_deletes_leaves_no_complete_looking_checkpoint(tmp_path, monkeypatch):
    """keep_last removed old checkpoints with rmtree in place: killed half-way (CI caught it with SIGKILL), a
    directory kept its manifest while files it lists were gone, so it still looked complete. Now a checkpoint
    is renamed out of sight before it is deleted."""
    model, opt, sched = _setup()
    for i in range(2):
        _train(model, opt, sched, 2, start=2 * i)
        save_checkpoint(tmp_path, model, opt, sched, keep_last=2)

    def dies_after_one_file(path, ignore_errors=False):
        for dirpath, _, files in os.walk(path):
            for name in sorted(files):
                if name != "manifest.json":
                    os.remove(os.path.join(dirpath, name))
                    raise _Killed()

    monkeypatch.setattr(ckpt.shutil, "rmtree", dies_after_one_file)
    _train(model, opt, sched, 2, start=4)
    with pytest.raises(_Killed):
        save_checkpoint(tmp_path, model, opt, sched, keep_last=2)
    monkeypatch.undo()
    listed = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in listed] == ["ckpt-00000004", "ckpt-00000006"]
    for d in listed:  # whatever looks complete must verify
        ckpt.verify_checkpoint(d)
    assert latest_checkpoint(tmp_path).name == "ckpt-00000006"
    save_checkpoint(tmp_path, model, opt, sched, step=7, keep_last=2)  # the next save clears the half-deleted one
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def _old(path, seconds=600):
    """As if nothing in ``path`` had changed for ``seconds``."""
    t = time.time() - seconds
    for p in [*Path(path).rglob("*"), Path(path)]:
        os.utime(p, (t, t))


def test_a_save_killed_midway_leaves_a_temporary_directory_that_the_next_save_removes(tmp_path):
    """A process killed while saving left its .tmp-ckpt-* directory (up to a whole model and optimizer state)
    behind for ever. The next save now removes those of this host that no process holds locked. A process id
    does not tell: a restarted container's trainer gets its old id back, so an orphan may carry a live id."""
    from hift_engine.checkpoint_tmp import HOST, LOCK_NAME

    code = ("import os, sys; from hift_engine import checkpoint as c; "
            "print(c._prepare(sys.argv[1], 3, None)[2].path); os._exit(0)")  # made it, then killed
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    orphan = Path(out.stdout.strip())
    assert orphan.is_dir() and orphan.parent == tmp_path
    (orphan / "optim" / "group-0000.safetensors").write_bytes(b"x" * 1024)  # what it had written
    same_id = tmp_path / f".tmp-ckpt-00000003-{os.getpid()}-1@{HOST}"  # an earlier life of this process id
    same_id.mkdir()
    (same_id / LOCK_NAME).touch()  # its lock went with that life
    young = tmp_path / f".tmp-ckpt-00000003-1-2@{HOST}"  # just made: its lock may not be taken yet
    elsewhere = tmp_path / ".tmp-ckpt-00000003-1-1@some-other-host"  # a shared filesystem: cannot tell
    older = tmp_path / ".tmp-ckpt-00000003-999999999-1"  # the name before the host was in it
    for d in (young, elsewhere, older):
        d.mkdir()
    busy = tmp_path / f".tmp-ckpt-00000003-1-3@{HOST}"  # old, unlocked, but a file in it was just written
    (busy / "optim").mkdir(parents=True)
    (busy / LOCK_NAME).touch()
    for d in (orphan, same_id, elsewhere, older, busy):
        _old(d)
    (busy / "optim" / "group-0000.safetensors").write_bytes(b"x")
    model, opt, sched = _setup()
    _train(model, opt, sched, 2)
    save_checkpoint(tmp_path, model, opt, sched)
    assert not orphan.exists() and not same_id.exists()
    assert young.is_dir() and elsewhere.is_dir() and older.is_dir() and busy.is_dir()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000002"]


def test_a_save_in_progress_is_never_cleared_whatever_its_process_id_says(tmp_path):
    """Found in review: clearing by "this host and the process id is gone" deleted a live save run in another
    process-id namespace (containers sharing a hostname), which then failed and lost its checkpoint. A live
    save holds its directory's lock, and a locked directory is never cleared."""
    code = ("import sys, time; from pathlib import Path; from hift_engine.checkpoint_tmp import SaveDir; "
            "d = SaveDir(Path(sys.argv[1]), 5); print(d.path, flush=True); time.sleep(120)")
    saver = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        live = Path(saver.stdout.readline().strip())
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        looks_dead = live.with_name(live.name.replace(f"-{saver.pid}-", f"-{dead.stdout.strip()}-"))
        os.rename(live, looks_dead)  # as another namespace sees it: an id no process here has; the lock stays
        _old(looks_dead)
        model, opt, sched = _setup()
        _train(model, opt, sched, 2)
        save_checkpoint(tmp_path, model, opt, sched)
        assert looks_dead.is_dir() and (looks_dead / "optim").is_dir()
    finally:
        saver.kill()
        saver.wait()
    save_checkpoint(tmp_path, model, opt, sched, step=3)  # its process gone, the lock went with it
    assert not looks_dead.exists()


def test_a_temporary_directory_being_cleared_as_it_is_made_is_given_up_and_a_failed_one_leaks_nothing(tmp_path, monkeypatch):
    """Found in review: a save that found its fresh directory's lock taken (a clearing save judged it abandoned,
    possible with clock skew) went on without the lock, so it could be deleted under it; and a save that failed
    right after taking the lock kept the descriptor and a locked directory until the process ended."""
    from hift_engine import checkpoint_tmp as ct

    real, calls = ct._lock, {"n": 0}

    def first_one_held(lock_file, create):
        calls["n"] += 1
        return (None, True) if calls["n"] == 1 else real(lock_file, create)

    monkeypatch.setattr(ct, "_lock", first_one_held)
    save_dir = ct.SaveDir(tmp_path, 7)
    assert calls["n"] == 2 and save_dir._fd is not None  # the second directory, locked
    assert not ct._lock(save_dir.path / ct.LOCK_NAME, create=False)[0]  # nobody else can take it
    save_dir.release()
    monkeypatch.setattr(ct, "_lock", real)

    opened = []
    real_open = os.open
    def recording_open(path, *a, **k):
        fd = real_open(path, *a, **k)
        if str(path).endswith(ct.LOCK_NAME):
            opened.append(fd)
        return fd

    monkeypatch.setattr(ct.os, "open", recording_open)
    real_mkdir = Path.mkdir
    monkeypatch.setattr(Path, "mkdir", lambda self, *a, **k: (_ for _ in ()).throw(OSError(28, "No space left"))
                        if self.name == "optim" else real_mkdir(self, *a, **k))
    before = set(tmp_path.iterdir())
    with pytest.raises(OSError, match="No space"):
        ct.SaveDir(tmp_path, 8)
    assert set(tmp_path.iterdir()) == before  # the half-made directory is gone
    assert len(opened) == 1  # the lock was taken, and its descriptor closed again
    with pytest.raises(OSError):
        os.fstat(opened[0])


def test_this_process_never_clears_its_own_save_in_progress(tmp_path, monkeypatch):
    """Over NFS, flock is emulated with POSIX record locks, which never conflict within one process: a second
    thread's save could take a first thread's lock. This process's saves in progress are skipped by name."""
    from hift_engine import checkpoint_tmp as ct

    live = ct.SaveDir(tmp_path, 9)
    _old(live.path)
    monkeypatch.setattr(ct, "_lock", lambda lock_file, create: (os.open(lock_file, os.O_RDONLY), False))  # NFS-like
    assert ct.clear_abandoned(tmp_path) == [] and live.path.is_dir()
    live.release()
    assert ct.clear_abandoned(tmp_path) == [live.path]


def test_files_vanishing_during_a_save_fail_it_instead_of_making_an_incomplete_checkpoint(tmp_path, monkeypatch):
    """Found in review: the manifest covered whatever was left in the temporary directory, so a file deleted
    during the save (by another process) gave a checkpoint that verified, became the latest, let keep_last
    delete the good one, and then failed to load. The save now checks that every file it wrote is there."""
    model, opt, sched = _setup()
    _train(model, opt, sched, 2)
    good = save_checkpoint(tmp_path, model, opt, sched, keep_last=1)
    real = ckpt._save_tensors

    def and_lose_group_0(path, tensors):
        real(path, tensors)
        if path.name == "group-0001.safetensors":
            (path.parent / "group-0000.safetensors").unlink()

    monkeypatch.setattr(ckpt, "_save_tensors", and_lose_group_0)
    _train(model, opt, sched, 2, start=2)
    with pytest.raises(CheckpointError, match="vanished"):
        save_checkpoint(tmp_path, model, opt, sched, keep_last=1)
    assert ckpt.list_checkpoints(tmp_path) == [good]
    assert latest_checkpoint(tmp_path, verify=True) == good
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-ckpt-")]


def test_crash_during_write_leaves_no_complete_looking_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = _setup()
    _train(model, opt, sched, 2)
    good = save_checkpoint(tmp_path, model, opt, sched)
    calls = {"n": 0}
    real = ckpt._fsync

    def failing(fd):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full (simulated)")
        real(fd)

    monkeypatch.setattr(ckpt, "_fsync", failing)
    _train(model, opt, sched, 2, start=2)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model, opt, sched)
    assert [p.name for p in tmp_path.iterdir()] == [good.name]
    assert latest_checkpoint(tmp_path) == good


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "unreadable manifest"),
        (lambda d: (d / "optim" / "group-0001.safetensors").unlink(), "group-0001.safetensors: listed in the manifest but missing"),
        (lambda d: _truncate(d / "model.safetensors"), "model.safetensors: size .*truncated"),
        (lambda d: _flip_byte(d / "optim" / "group-0002.safetensors"), "group-0002.safetensors: checksum mismatch"),
    ],
)
def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage, match):
    model, opt, sched = _setup()
    _train(model, opt, sched, 6)
    path = save_checkpoint(tmp_path, model, opt, sched)
    damage(path)
    model2, opt2, sched2 = _setup()
    before = [p.detach().clone() for p in model2.parameters()]
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path, model2, opt2, sched2)
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), before))  # nothing half-loaded


def _truncate(f: Path):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _flip_byte(f: Path):
    data = bytearray(f.read_bytes())
    data[len(data) - 5] ^= 0xFF
    f.write_bytes(bytes(data))


def test_checkpoint_of_another_model_or_layout_is_refused(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, 2)
    path = save_checkpoint(tmp_path, model, opt, sched)
    other = tiny_llama(layers=4)
    with pytest.raises(CheckpointError, match="another model|param_groups|does not match"):
        load_checkpoint(path, other, HiFTOptimizer(other, "adamw", lr=1e-2))
    regrouped = tiny_llama()
    with pytest.raises(CheckpointError, match="group layout differs"):
        load_checkpoint(path, regrouped, HiFTOptimizer(regrouped, "adamw", lr=1e-2, layers_per_group=2))
    with pytest.raises(CheckpointError, match="optimizer 'adamw'"):
        sgd_model = tiny_llama()
        load_checkpoint(path, sgd_model, HiFTOptimizer(sgd_model, "sgd", lr=1e-2))


def test_non_json_extra_is_a_clear_error(tmp_path):
    model, opt, sched = _setup()
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, model, opt, sched, extra={"bad": object()})
    assert not list(tmp_path.iterdir())


def _run_worker(root, *extra, timeout=120):
    cmd = [sys.executable, "-m", "tests.crash_worker", "--root", str(root), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tmp_path, device):
    """Kill a training subprocess with SIGKILL at random moments (slow fsyncs make kills during checkpoint
    writes likely), restart it from the latest good checkpoint, and require the exact final weights. On CUDA
    the worker uses the default store (the native pinned store) and the Triton kernels."""
    from safetensors.torch import load_file

    ref = _run_worker(tmp_path / "ref", "--device", device)
    assert ref.returncode == 0, ref.stderr[-2000:]
    if device == "cuda":  # the run under test is the one with the extension and the fused kernels
        assert "store=offload-native kernels=triton" in ref.stdout, ref.stdout
    reference = load_file(str(tmp_path / "ref" / "final.safetensors"))
    rnd = random.Random(7)
    during_write = 0
    reps = 4
    for rep in range(reps):
        root = tmp_path / f"run{rep}"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            # even reps: slow fsyncs, so kills tend to land inside checkpoint writes; odd reps: between them
            [sys.executable, "-m", "tests.crash_worker", "--root", str(root), "--device", device,
             "--slow-fsync", "0.02" if rep % 2 == 0 else "0"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        )
        # wait until training has started (first checkpoint), then kill at a random moment
        deadline = time.time() + 60
        while time.time() < deadline and not (root.exists() and any(root.iterdir())):
            time.sleep(0.05)
        time.sleep(rnd.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if root.exists() and any(p.name.startswith(".tmp") for p in root.iterdir()):
            during_write += 1
        for d in ckpt.list_checkpoints(root):  # whatever looks complete must verify
            ckpt.verify_checkpoint(d)
        done = _run_worker(root, "--device", device)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        final = load_file(str(root / "final.safetensors"))
        assert final.keys() == reference.keys()
        assert all(torch.equal(final[k], reference[k]) for k in reference), f"rep {rep}: weights differ"
    print(f"{device}: {reps} kills, {during_write} during a checkpoint write")


@pytest.mark.cuda
def test_resume_on_cuda_with_native_store_is_bit_identical(tmp_path):
    model = tiny_llama(device="cuda")
    opt = HiFTOptimizer(model, "adamw", lr=1e-2, strategy="random", seed=5, state_store="native")
    sched = opt.cycle_scheduler("cosine", total_steps=40)
    batches = [lm_batch(seed=s, device="cuda") for s in range(20)]

    def run(m, o, s, steps, start):
        out = []
        for step in range(start, start + steps):
            loss = m(**batches[step]).loss
            out.append(loss.item())
            loss.backward()
            o.step()
            s.step()
            o.zero_grad()
        return out

    run(model, opt, sched, 8, 0)
    path = save_checkpoint(tmp_path, model, opt, sched)
    reference = run(model, opt, sched, 8, 8)
    model2 = tiny_llama(device="cuda")
    opt2 = HiFTOptimizer(model2, "adamw", lr=1e-2, strategy="random", seed=5, state_store="native")
    sched2 = opt2.cycle_scheduler("cosine", total_steps=40)
    load_checkpoint(path, model2, opt2, sched2)
    assert run(model2, opt2, sched2, 8, 8) == reference and params_equal(model, model2)

"""Data parallel HiFT on torch.distributed (gloo, several CPU processes): the same weights as one process on the
concatenated batch, exact resume from a checkpoint rank 0 wrote, and refusal of ranks that differ."""

import os
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pathlib import Path

from hift_engine import CheckpointError, ConfigError, HiFTOptimizer, load_checkpoint, save_checkpoint
from tests.helpers import lm_batch, tiny_llama

PER_RANK = 2  # sequences per rank and step


def _batch(step, rank):
    return lm_batch(batch=PER_RANK, seed=1000 * step + rank)


def _opt(model, **kw):
    return HiFTOptimizer(model, "adamw", lr=1e-2, strategy="random", seed=1, max_grad_norm=0.5, **kw)


def _train(model, opt, steps, rank, start=0):
    for s in range(start, start + steps):
        model(**_batch(s, rank)).loss.backward()
        opt.step()
        opt.zero_grad()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, tmp, mode):
    mp.spawn(_worker, args=(world, str(tmp), mode, _free_port()), nprocs=world, join=True)


def _worker(rank, world, tmp, mode, port):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a dead peer fails a collective within a minute
    torch.manual_seed(0)
    try:
        if mode == "partial":
            _partial(rank, tmp)
        elif mode == "killed":
            _killed(rank, tmp)
        elif mode.startswith("world-"):
            _world_change(rank, tmp, mode[len("world-"):])
        elif mode.startswith("rng"):
            _rng_per_rank(rank, tmp, shard=mode == "rng-shard")
        elif mode.startswith("shard"):
            _sharded(rank, tmp, mode)
        elif mode == "mismatch":
            try:
                HiFTOptimizer(tiny_llama(), "adamw", seed=rank)  # rank 1 orders its groups differently
                result = "built"
            except ConfigError as e:
                result = str(e)
            torch.save(result, f"{tmp}/result-{rank}.pt")
        else:
            _train_and_resume(rank, tmp)
    finally:
        dist.barrier()  # no rank leaves while another is still in a collective
        dist.destroy_process_group()
    # Done and written: leave without running C++ static destructors. About one exit in ten of a gloo process
    # aborted there ("terminate called without an active exception"), with data parallelism on or off.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _train_and_resume(rank, tmp):
    model = tiny_llama()
    opt = _opt(model)
    k = opt.num_groups
    _train(model, opt, 3 * k, rank)
    path = save_checkpoint(f"{tmp}/ckpt", model, opt)
    _train(model, opt, k, rank, start=3 * k)
    if rank == 0:
        torch.save({"weights": model.state_dict(), "path": str(path), "k": k,
                    "reduced": opt.reducer.bytes_reduced}, f"{tmp}/result-0.pt")
    # resume in a fresh model and optimizer from the checkpoint rank 0 wrote
    again = tiny_llama(seed=5)
    opt2 = _opt(again)
    load_checkpoint(path, again, opt2)
    _train(again, opt2, k, rank, start=3 * k)
    torch.save({"resumed": again.state_dict(), "same_path": str(path)}, f"{tmp}/resumed-{rank}.pt")
    opt.close()
    opt2.close()


def _rng_per_rank(rank, tmp, shard):
    """Each rank draws from its own generators (dropout masks, shuffles): after a resume each must continue its
    own streams. The checkpoint used to hold rank 0's alone, so rank 1 resumed with rank 0's."""
    import random

    model = tiny_llama()  # seeds torch's generator: each rank's own seed comes after
    opt = _opt(model, shard_state=shard)
    torch.manual_seed(100 + rank)
    random.seed(rank)
    _train(model, opt, 2, rank)
    path = save_checkpoint(f"{tmp}/ckpt", model, opt)
    expected = (torch.rand(4), random.random())
    torch.manual_seed(999)
    random.seed(999)
    again = tiny_llama(seed=5)
    opt2 = _opt(again, shard_state=shard)
    load_checkpoint(path, again, opt2)
    torch.save({"expected": expected, "resumed": (torch.rand(4), random.random())}, f"{tmp}/rng-{rank}.pt")
    opt.close()
    opt2.close()


def _killed(rank, tmp):
    """A sharded checkpoint at step k; then rank 1 dies in the middle of the next save (after writing its pieces,
    before the gathers), and rank 0, left waiting, gives up. The step-k checkpoint must stay the latest and
    intact, with no half-written directory taking its place."""
    model = tiny_llama()
    opt = _opt(model, shard_state=True)
    k = opt.num_groups
    _train(model, opt, k, rank)
    save_checkpoint(f"{tmp}/ckpt", model, opt)
    _train(model, opt, 2, rank, start=k)
    if rank == 1:
        import hift_engine.checkpoint as ckpt

        real = ckpt._save_tensors

        def die_after_pieces(path, tensors):
            real(path, tensors)
            if "rank-001" in str(path) and path.name.startswith(f"group-{k - 1:04d}"):
                os._exit(3)  # killed: no cleanup, no goodbye to rank 0

        ckpt._save_tensors = die_after_pieces
    try:
        save_checkpoint(f"{tmp}/ckpt", model, opt)
    except Exception as e:  # noqa: BLE001 - rank 0: the collective with the dead rank fails
        torch.save(f"{type(e).__name__}: {e}", f"{tmp}/killed-{rank}.pt")
    os._exit(0)


def _sharded(rank, tmp, mode):
    """The same data-parallel run with the state replicated and sharded (ZeRO-1), in fp32 and bf16-mixed: k*3
    steps, a checkpoint, k more steps; then a fresh model and optimizer resumed from the checkpoint for k steps.
    A sharded checkpoint offered to a replicated optimizer must be refused on every rank, changing nothing."""
    out = {}
    precision = "bf16-mixed" if mode == "shard-bf16" else "fp32"

    def build(shard, seed=0):
        # fp32 weights: under bf16-mixed the optimizer casts the model and seeds the masters from the fp32 copy
        # (the seeds once missed the pieces' names and the masters started bf16-rounded)
        model = tiny_llama(seed=seed)
        return model, _opt(model, shard_state=shard, precision=precision, state_store="torch")

    for shard in (False, True):
        model, opt = build(shard)
        k = opt.num_groups
        _train(model, opt, 3 * k, rank)
        path = save_checkpoint(f"{tmp}/ckpt-{shard}", model, opt)
        _train(model, opt, k, rank, start=3 * k)
        refused = None
        if shard:
            try:
                opt.state_dict()
            except ConfigError as e:
                refused = str(e)
        again, opt2 = build(shard, seed=5)
        load_checkpoint(path, again, opt2)
        _train(again, opt2, k, rank, start=3 * k)
        out[shard] = {"weights": {n: v.clone() for n, v in model.state_dict().items()},
                      "resumed": {n: v.clone() for n, v in again.state_dict().items()}, "path": str(path),
                      "host": sum(opt.store.numels), "describe": opt.describe(), "refused": refused}
        opt.close()
        opt2.close()
    other, opt3 = build(False, seed=7)
    before = {n: v.clone() for n, v in other.state_dict().items()}
    try:
        load_checkpoint(out[True]["path"], other, opt3)
        out["cross"] = "loaded"
    except CheckpointError as e:
        out["cross"] = str(e)
    out["cross_unchanged"] = all(torch.equal(before[n], v) for n, v in other.state_dict().items())
    opt3.close()
    torch.save(out, f"{tmp}/shard-{rank}.pt")


class _TwoPaths(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x, use_b):
        return self.b(self.a(x)) if use_b else self.a(x)


def _partial(rank, tmp):
    """Rank 1 never uses ``b``; every rank starts from its own random weights (rank 0's must win)."""
    out = {}
    for name, optimizer in (("fused", "sgd"), ("generic", torch.optim.SGD)):
        torch.manual_seed(100 + rank)
        model = _TwoPaths()
        opt = HiFTOptimizer(model, optimizer, lr=0.1, momentum=0.9, groups=[[".*"]], no_decay=[], max_grad_norm=1.0)
        for step in range(4):
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(10 * step + rank))
            model(x, use_b=rank == 0).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        out[name] = {k: v.clone() for k, v in model.state_dict().items()}
        opt.close()
    torch.save(out, f"{tmp}/partial-{rank}.pt")


def test_ranks_stay_identical_when_a_parameter_has_gradients_on_some_ranks_only(tmp_path):
    """A parameter with a gradient on rank 0 only counts as zero on rank 1 (as DDP does): both the fused and
    the generic (torch.optim) path must update it identically on every rank, and rank 0's initial weights win."""
    _spawn(2, tmp_path, "partial")
    r0, r1 = (torch.load(tmp_path / f"partial-{r}.pt") for r in range(2))
    for path in ("fused", "generic"):
        for name in r0[path]:
            assert torch.equal(r0[path][name], r1[path][name]), (path, name)
        torch.manual_seed(100)
        assert not torch.equal(r0[path]["b.weight"], _TwoPaths().b.weight.detach())  # b trained on rank 0's gradient


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_train_like_one_process_on_the_whole_batch_and_resume_exactly(world, tmp_path):
    _spawn(world, tmp_path, "train")
    out = torch.load(tmp_path / "result-0.pt")
    k = out["k"]
    # one process, the ranks' batches concatenated: the loss is the mean over all of them
    model = tiny_llama()
    opt = _opt(model, data_parallel="off")
    for s in range(4 * k):
        batch = {key: torch.cat([_batch(s, r)[key] for r in range(world)]) for key in ("input_ids", "labels")}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    for name, ref in model.state_dict().items():
        # the same math summed in another order: AdamW normalises each update, so a gradient near zero that
        # rounds differently moves its weight by a different part of lr (1e-2) — 1% of one step at most
        diff = (out["weights"][name] - ref).abs().max().item()
        assert diff <= 1e-4, (name, diff)
    for r in range(world):  # every rank resumed from the one checkpoint, and exactly
        resumed = torch.load(tmp_path / f"resumed-{r}.pt")
        assert resumed["same_path"] == out["path"]
        for name, w in out["weights"].items():
            assert torch.equal(resumed["resumed"][name], w), (r, name)
    assert len(list((tmp_path / "ckpt").iterdir())) == 1  # rank 0 alone wrote
    # only the active group's gradients crossed: about 1/k of the model's per step, on average
    n_params = sum(p.numel() for p in model.parameters())
    assert 0 < out["reduced"] <= 4 * k * 4 * n_params / k * 1.5


@pytest.mark.parametrize("world, mode", [(2, "shard"), (3, "shard"), (2, "shard-bf16")])
def test_sharded_state_trains_exactly_like_replicated_state_with_1_over_n_of_the_host_memory(world, mode, tmp_path):
    """shard_state=True: each rank updates its piece of the group with the averaged gradients and the pieces are
    broadcast; the weights must be bit-identical to the replicated run on every rank (the same arithmetic per
    element), and each rank's host state about 1/world of the replicated one."""
    from safetensors.torch import load_file

    _spawn(world, tmp_path, mode)
    outs = [torch.load(tmp_path / f"shard-{r}.pt") for r in range(world)]
    for r, out in enumerate(outs):
        for name, w in outs[0][False]["weights"].items():
            assert torch.equal(out[True]["weights"][name], w), (r, name)
            assert torch.equal(out[True]["resumed"][name], w), (r, name)  # resumed exactly from the shards
        assert out[True]["path"] == outs[0][True]["path"]  # one checkpoint, every rank's pieces in it
        assert "saved with shard_state over" in out["cross"] and out["cross_unchanged"], out["cross"]
        full, mine = out[False]["host"], out[True]["host"]
        assert full / world * 0.8 <= mine <= full / world * 1.25, (r, mine, full)
        assert f"rank {r} of {world} owns" in out[True]["describe"]
        assert "no torch.optim-style state_dict of the whole" in out[True]["refused"]
    assert sum(o[True]["host"] for o in outs) <= outs[0][False]["host"] * 1.05  # nothing held twice
    ckpt = {shard: Path(outs[0][shard]["path"]) for shard in (False, True)}
    assert sorted(f.name for f in (ckpt[True] / "optim").iterdir()) == sorted(
        f"group-{g:04d}.rank-{r:03d}.safetensors" for g in range(len(list((ckpt[False] / "optim").iterdir())))
        for r in range(world))
    # the saved model weights (fp32 masters in bf16-mixed, gathered from every rank's pieces) are the same
    whole, sharded = (load_file(str(ckpt[s] / "model.safetensors")) for s in (False, True))
    assert whole.keys() == sharded.keys() and all(torch.equal(whole[n], sharded[n]) for n in whole)
    if mode == "shard-bf16":
        assert all(t.dtype == torch.float32 for t in sharded.values())
    assert any(not torch.equal(outs[0][False]["weights"][n], tiny_llama().state_dict()[n].to(w.dtype))
               for n, w in outs[0][False]["weights"].items())  # it trained


@pytest.mark.parametrize("shard", [False, True])
def test_every_rank_resumes_its_own_random_streams(shard, tmp_path):
    _spawn(2, tmp_path, "rng-shard" if shard else "rng")
    got = [torch.load(tmp_path / f"rng-{r}.pt") for r in range(2)]
    for r, g in enumerate(got):
        assert torch.equal(g["resumed"][0], g["expected"][0]) and g["resumed"][1] == g["expected"][1], f"rank {r}"
    assert not torch.equal(got[0]["expected"][0], got[1]["expected"][0])  # the ranks' streams differ


def _world_change(rank, tmp, phase):
    import logging

    if phase == "save":
        model = tiny_llama()
        opt = _opt(model)
        torch.manual_seed(100 + rank)
        _train(model, opt, 2, rank)
        save_checkpoint(f"{tmp}/ckpt", model, opt)
    else:
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("hift_engine").addHandler(handler)
        model = tiny_llama(seed=5)
        opt = _opt(model)
        load_checkpoint(f"{tmp}/ckpt", model, opt)
        torch.save({"draw": torch.rand(4), "warnings": [r.getMessage() for r in records]}, f"{tmp}/wc-{rank}.pt")
    opt.close()


def test_a_world_size_change_does_not_silently_give_two_ranks_one_random_stream(tmp_path):
    """A replicated checkpoint of 2 ranks loaded by 3: rank 2 has no random-number state of its own and takes
    rank 0's, so ranks 0 and 2 draw the same dropout masks from then on. That must be said (it was silent)."""
    _spawn(2, tmp_path, "world-save")
    _spawn(3, tmp_path, "world-load")
    got = [torch.load(tmp_path / f"wc-{r}.pt") for r in range(3)]
    assert not torch.equal(got[0]["draw"], got[1]["draw"])  # rank 1 has its own
    assert not got[0]["warnings"] and not got[1]["warnings"]
    assert any("rank 2" in w and "rank 0's random streams" in w for w in got[2]["warnings"]), got[2]["warnings"]


def test_a_rank_killed_while_saving_leaves_the_last_checkpoint_intact(tmp_path):
    from hift_engine.checkpoint import latest_checkpoint, verify_checkpoint

    with pytest.raises(Exception):  # rank 1 exits with code 3
        _spawn(2, tmp_path, "killed")
    root = tmp_path / "ckpt"
    complete = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert len(complete) == 1, complete  # the first save; the second never renamed into place
    assert any(p.name.startswith(".tmp-ckpt-") for p in root.iterdir())  # the second save had started
    latest = latest_checkpoint(root)
    assert latest == complete[0]
    verify_checkpoint(latest, full=True)  # every file of the step-k checkpoint as written
    assert len(list((latest / "optim").glob("group-*.rank-*.safetensors"))) > 0


def test_pieces_cover_every_element_once_on_aligned_cuts():
    from hift_engine.sharding import split_group

    sizes = [1000, 64, 5, 4096, 300]
    for world in (1, 2, 3, 5):
        pieces = split_group(sizes, world)
        covered = [[0] * n for n in sizes]
        for per_rank in pieces:
            assert per_rank  # every rank owns something here
            for pc in per_rank:
                assert pc.start % 64 == 0 or pc.start == 0
                for e in range(pc.start, pc.stop):
                    covered[pc.param][e] += 1
        assert all(c == 1 for row in covered for c in row), world


def test_shard_state_is_refused_where_it_cannot_work():
    with pytest.raises(ConfigError, match="needs torch.distributed initialised"):
        HiFTOptimizer(tiny_llama(), "adamw", shard_state=True)
    with pytest.raises(ConfigError, match="cannot go with data_parallel='off'"):
        HiFTOptimizer(tiny_llama(), "adamw", shard_state=True, data_parallel="off")
    with pytest.raises(ConfigError, match="shard_state must be true or false"):
        HiFTOptimizer(tiny_llama(), "adamw", shard_state="yes")


def test_ranks_that_would_train_differently_are_refused(tmp_path):
    _spawn(2, tmp_path, "mismatch")
    for r in range(2):
        assert "ranks [1] build different groups or options than rank 0" in torch.load(tmp_path / f"result-{r}.pt")


def test_data_parallel_on_without_processes_is_refused():
    with pytest.raises(ConfigError, match="needs torch.distributed initialised"):
        HiFTOptimizer(tiny_llama(), "adamw", data_parallel="on")
    with pytest.raises(ConfigError, match="data_parallel='sometimes' is unknown"):
        HiFTOptimizer(tiny_llama(), "adamw", data_parallel="sometimes")


def _torchrun(*args, cwd):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "hift_engine.cli.main", "train",
           "--steps", "8", "--batch_size", "2", "--save_every", "4", "--device", "cpu", "--no-progress", "--plot", "false",
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize("shard", [False, True])
def test_hift_train_under_torchrun_writes_one_run_and_resumes_exactly(shard, tmp_path):
    """Two CPU processes (gloo): rank 0 alone writes the run directory (with shard_state, every rank writes its
    pieces into the same checkpoints); resuming both ranks from the step-4 checkpoint ends with the same final
    model, bit for bit, as the uninterrupted run."""
    import json

    from safetensors.torch import load_file

    opts = ("--shard_state", "true") if shard else ()
    _torchrun("--output_dir", str(tmp_path / "a"), *opts, cwd=tmp_path)
    _torchrun("--output_dir", str(tmp_path / "b"), "--resume", str(tmp_path / "a" / "checkpoints" / "ckpt-00000004"),
              *opts, cwd=tmp_path)
    pieces = list((tmp_path / "a" / "checkpoints" / "ckpt-00000004" / "optim").glob("*.rank-001.safetensors"))
    assert bool(pieces) == shard
    assert json.loads((tmp_path / "a" / "config.json").read_text())["world_size"] == 2
    steps = [json.loads(line)["step"] for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one writer: no step logged twice
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["ckpt-00000004", "ckpt-00000008"]
    import subprocess
    import sys

    one = subprocess.run([sys.executable, "-m", "hift_engine.cli.main", "train", "--steps", "8", "--batch_size", "2",
                          "--device", "cpu", "--no-progress", "--output_dir", str(tmp_path / "c"), "--resume",
                          str(tmp_path / "a" / "checkpoints" / "ckpt-00000004")], capture_output=True, text=True, timeout=600)
    assert one.returncode == 2 and "saved by a run of 2 process(es), this one has 1" in one.stderr, one.stderr[-2000:]
    a = load_file(str(next((tmp_path / "a" / "final").glob("*.safetensors"))))
    b = load_file(str(next((tmp_path / "b" / "final").glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("shard", [False, True])
def test_bench_ddp_reports_one_groups_gradients_per_step(shard, tmp_path):
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "hift_engine.cli.main", "bench",
           "ddp", "--hidden", "64", "--layers", "2", "--seq", "32", "--out", str(tmp_path), *(["--shard-state"] if shard else [])]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("ddp-*.json")).read_text())["rows"]
    assert [r["processes"] for r in rows] == [2, 2]
    for r in rows:  # 4 groups (embedding, 2 blocks, head): on average a quarter of the model's gradients
        assert 0 < r["grad_gib_reduced_per_step"] < 0.5 * r["full_ft_grad_gib_per_step"]
        assert r["shard_state"] == shard and (r["weight_gib_broadcast_per_step"] > 0) == shard
    if shard:  # the host state is split between the two ranks
        assert abs(rows[0]["host_state_gib_per_rank"] - rows[1]["host_state_gib_per_rank"]) < 0.1 * rows[0]["host_state_gib_per_rank"]

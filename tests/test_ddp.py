"""DDP on CPU (gloo): torchrun with two processes, and the global-batch gradient it computes."""
from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_training import script_env
from tests.tiny_data import REPO, make_tiny_features, tiny_config
from utils.checkpoint import load_checkpoint
from utils.criterion_utils import LogSoftmaxLoss
from utils.dist_utils import DistContext, gather, gather_with_grad
from utils.tracking import read_jsonl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_main(tmp_path, training: dict) -> subprocess.CompletedProcess:
    """main.py in two processes (gloo on loopback) on tiny features; asserts it exits 0."""
    make_tiny_features(tmp_path / "data")
    conf = tiny_config(tmp_path, {"training": {"batch_size": 8, **training}})
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", "main.py", "--conf", str(conf)],
        cwd=REPO, env=dict(script_env(), GLOO_SOCKET_IFNAME="lo"), capture_output=True, text=True,
        timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_two_processes_on_cpu(tmp_path):
    proc = torchrun_main(tmp_path, {"epochs": 2})
    runs = list((tmp_path / "outputs").iterdir())
    assert len(runs) == 1  # rank 0 made it and the other rank used it
    run = runs[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["epoch"] == 2
    # each rank's own RNG streams are saved, so a resume continues every one of them
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]  # logged once
    assert proc.stdout.count("epoch 2/2") == 1
    # every rank's final state dict was compared (bit for bit) before exiting 0
    assert "DDP: weights identical on 2 ranks" in proc.stdout
    # resumed by one process: it trains on, and says that the run is no longer repeated exactly
    resumed = subprocess.run([sys.executable, "main.py", "--resume", str(run), "--set", "training.epochs=3"],
                             cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert ("note: the checkpoint of epoch 2 holds the random streams of 2 process(es), this resume "
            "runs 1: the batches of the epochs to come differ") in resumed.stderr


def test_a_nan_clip_is_named_by_every_rank(tmp_path):
    """The loss is the global batch's, so every rank stops at the same step, but each saw only
    its share: the clip ids are gathered, and no rank blames the learning rate while another
    names the damaged file."""
    import h5py

    make_tiny_features(tmp_path / "data")
    with h5py.File(tmp_path / "data" / "development_audio_logmels.hdf5", "r+") as f:
        f[next(iter(f))][0, 0] = np.nan  # one clip
    # one caption per rank and step: the step with the clip has it on one rank only
    conf = tiny_config(tmp_path, {"training": {"batch_size": 2, "epochs": 1}})
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", "main.py", "--conf", str(conf)],
        cwd=REPO, env=dict(script_env(), GLOO_SOCKET_IFNAME="lo"), capture_output=True, text=True,
        timeout=400)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("contain NaN/inf" in line for line in errors), proc.stderr[-3000:]
    assert not any("try a lower training.lr" in line for line in errors)


def test_torchrun_with_compiled_whole_clips(tmp_path):
    """training.compile=on under DDP: the compiled DDP model trains, batches its one graph does
    not fit run eagerly, and the ranks end with identical weights."""
    proc = torchrun_main(tmp_path, {"epochs": 1, "compile": "on"})
    assert "torch.compile failed" not in proc.stdout + proc.stderr
    assert proc.stdout.count("compiling the training step with torch.compile") == 1  # rank 0 says it
    [record] = read_jsonl(next((tmp_path / "outputs").iterdir()) / "metrics.jsonl")
    assert record["compiled_graphs"] >= 1 and record["eager_steps"] < 8  # 8 steps in all
    assert "DDP: weights identical on 2 ranks" in proc.stdout


def _gradient_worker(rank: int, world: int, port: int, result_file: str) -> None:
    """Each rank embeds half the batch; the gathered loss gives the global-batch gradient."""
    # loopback for gloo too: the host name may resolve to an interface the sandbox does not route
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    x, clip_ids, lin = _problem()
    half = x.shape[0] // world
    ddp = torch.nn.parallel.DistributedDataParallel(lin)
    ctx = DistContext(rank, world, rank)
    mine = slice(rank * half, (rank + 1) * half)
    emb = ddp(x[mine])
    audio = gather_with_grad(torch.nn.functional.normalize(emb, dim=-1), ctx)
    text = gather_with_grad(torch.nn.functional.normalize(x[mine] @ torch.ones(6, 4), dim=-1), ctx)
    loss = LogSoftmaxLoss(0.07)(audio, text, gather(clip_ids[mine], ctx))
    loss.backward()
    if rank == 0:
        torch.save({"loss": loss.detach(), "grad": lin.weight.grad.clone()}, result_file)
    # both ranks leave together, and the DDP wrapper (whose reducer holds the process group)
    # goes first: gloo torn down while a peer is still in the backward's collectives, or by
    # the interpreter's exit, aborts ("terminate called without an active exception")
    del ddp
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _problem():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g)
    clip_ids = torch.tensor([0, 0, 1, 2, 2, 3, 1, 4])  # repeated clips across the two halves
    lin = torch.nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 6, generator=g))
        lin.bias.zero_()
    return x, clip_ids, lin


def test_gathered_loss_gradient_equals_single_process_global_batch(tmp_path):
    result = tmp_path / "rank0.pt"
    # spawn, not fork: forking a process whose OpenMP pool is running can deadlock the child
    mp.start_processes(_gradient_worker, args=(2, free_port(), str(result)), nprocs=2, join=True,
                       start_method="spawn")
    got = torch.load(result, weights_only=True)
    x, clip_ids, lin = _problem()
    audio = torch.nn.functional.normalize(lin(x), dim=-1)
    text = torch.nn.functional.normalize(x @ torch.ones(6, 4), dim=-1)
    loss = LogSoftmaxLoss(0.07)(audio, text, clip_ids)
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach())
    torch.testing.assert_close(got["grad"], lin.weight.grad)


@pytest.mark.parametrize("ctx", [DistContext()])
def test_single_process_gather_is_identity(ctx):
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x, ctx) is x and gather(x, ctx) is x


def test_cuda_n_under_torchrun_is_refused(monkeypatch):
    """Every rank would take GPU N: refused before any process group or GPU is touched."""
    from utils import dist_utils
    from utils.errors import UserError

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="training.device=cuda:1: under torchrun .*CUDA_VISIBLE_DEVICES"):
        with dist_utils.distributed("cuda:1"):
            pass


def test_a_refused_resume_stops_every_rank_and_leaves_the_running_save_alone(tmp_path):
    """torchrun --resume of a run another process holds: every rank stops with the refusal,
    and no rank removes the holder's checkpoint save under way as a killed run's leftover."""
    from utils.runs import lock_run

    torchrun_main(tmp_path, {"epochs": 1})
    [run] = list((tmp_path / "outputs").iterdir())
    saving = run / "checkpoints" / ".last.pt.r4nn1ng.tmp"  # the running process's save
    saving.write_bytes(b"half a checkpoint")
    with lock_run(run):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
             f"--master_port={free_port()}", "main.py", "--resume", str(run)],
            cwd=REPO, env=dict(script_env(), GLOO_SOCKET_IFNAME="lo"), capture_output=True,
            text=True, timeout=400)
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: run {run}") == 2, proc.stderr[-3000:]  # both ranks
    assert saving.exists()


def test_one_process_on_cuda_n_makes_that_gpu_current(monkeypatch):
    """training.device=cuda:1 without torchrun: compiled kernels, memory stats and the CUDA RNG
    then use GPU 1, not GPU 0 (torch.cuda is faked: CI has no GPU)."""
    from utils import dist_utils

    current = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(dist_utils, "resolve_device", lambda setting, key: setting)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(str(device)))
    with dist_utils.distributed("cuda:1") as (ctx, device):
        assert device == torch.device("cuda", 1) and not ctx.enabled
    with dist_utils.distributed("cpu") as (ctx, device):
        assert device == torch.device("cpu")
    assert current == ["cuda:1"]


def _disk_full_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 0's write fails for lack of space inside on_master; each rank writes what it raised."""
    import errno
    from pathlib import Path

    from utils.dist_utils import on_master
    from utils.errors import UserError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def write():
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/r/checkpoints/last.pt")
    try:
        on_master(DistContext(rank, world, rank), write)
    except (OSError, UserError) as e:
        Path(out_dir, f"rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
    dist.barrier()
    dist.destroy_process_group()


def test_a_write_failing_on_rank_0_is_said_alike_by_every_rank(tmp_path):
    """Rank 1 printed "rank 0 failed: OSError: [Errno 28] ..."; it now says what rank 0 says."""
    mp.start_processes(_disk_full_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    assert (tmp_path / "rank0.txt").read_text().startswith("OSError: [Errno 28]")  # cli.run says it
    rank1 = (tmp_path / "rank1.txt").read_text()
    assert rank1.startswith("UserError: no space left on device") and "/runs/r/checkpoints/last.pt" in rank1
    assert "rank 0 failed" not in rank1


def test_sync_batchnorm_converts_in_place_under_ddp_only(tmp_path, monkeypatch):
    """training.sync_batchnorm swaps every BatchNorm for SyncBatchNorm holding the very same
    parameters and buffers: Adam's state, the checkpoint keys and the weights do not change."""
    from utils import train_utils as tu
    from utils.config import load_config

    make_tiny_features(tmp_path / "data")
    cfg = load_config(tiny_config(tmp_path), ["training.sync_batchnorm=true"])
    data = tu.load_training_data(cfg)
    monkeypatch.setattr(tu, "wrap_ddp", lambda model, device: model)  # no process group here

    def batchnorms(tr):
        return [type(m) for m in tr.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    alone = tu.build_trainer(cfg, data.table, torch.device("cpu"))
    tu.wrap_for_training(alone, cfg, DistContext(), torch.device("cpu"))
    assert batchnorms(alone) and set(batchnorms(alone)) == {torch.nn.BatchNorm2d}  # one process: as before

    tr = tu.build_trainer(cfg, data.table, torch.device("cpu"))
    before = tr.model.state_dict()
    params = {id(p) for p in tr.model.parameters()}
    tu.wrap_for_training(tr, cfg, DistContext(rank=0, world_size=2), torch.device("cpu"))
    assert set(batchnorms(tr)) == {torch.nn.SyncBatchNorm} and len(batchnorms(tr)) == len(batchnorms(alone))
    assert tr.train_model is tr.model
    assert {id(p) for p in tr.model.parameters()} == params  # the optimizer steps these
    after = tr.model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_sync_batchnorm_on_the_cpu_under_torchrun_is_refused_before_the_run_folder(monkeypatch):
    """torch's SyncBatchNorm has no CPU kernels: one line at the start, not a ValueError at the
    first step of every rank."""
    from utils import train_utils as tu
    from utils.config import load_config
    from utils.errors import UserError

    cfg = load_config(REPO / "conf.yaml", ["training.sync_batchnorm=true", "training.device=cpu"])
    tu.check_training_config(cfg)  # one process: nothing to synchronise, nothing refused
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError, match=r"^config key 'training.sync_batchnorm' is true, but .*CUDA .*set it to false$"):
        tu.check_training_config(cfg)
    tu.check_training_config(load_config(REPO / "conf.yaml", ["training.device=cpu"]))

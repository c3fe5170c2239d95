"""Multi-GPU (DDP) helpers: one process per device, started by torchrun.

`torchrun --nproc_per_node=N main.py ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without them
everything below degrades to a single process and costs nothing. Rank 0 (the master) is the
only one that validates, logs and writes files; the others wait for what it decides.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import inspect
import os
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from utils.devices import resolve_device
from utils.errors import UserError, os_error_message

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def launched_with_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torch_device(setting: str, local_rank: int = 0) -> torch.device:
    """training.device -> this process's device (its own GPU under torchrun)."""
    name = resolve_device(setting, "training.device")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


@contextlib.contextmanager
def distributed(device_setting: str) -> Iterator[tuple[DistContext, torch.device]]:
    """Join the process group if launched by torchrun (nccl on GPUs, gloo on CPU); leave it after."""
    if not launched_with_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        device = torch_device(device_setting)
        if device.type == "cuda":  # cuda:N: the GPU that compiled kernels and memory stats use
            torch.cuda.set_device(device)
        yield DistContext(), device
        return
    if device_setting.startswith("cuda:"):  # every rank would train on that one GPU
        raise UserError(f"training.device={device_setting}: under torchrun each process takes "
                        "the GPU of its LOCAL_RANK — set training.device=cuda (or auto) and pick "
                        "GPUs with CUDA_VISIBLE_DEVICES")
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                      int(os.environ.get("LOCAL_RANK", 0)))
    device = torch_device(device_setting, ctx.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=60))
    try:
        yield ctx, device
    finally:
        gc.collect()  # DDP wrappers (their reducers hold the group) go before the group does
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the sum of all ranks' gradients for its slice.

    (An all-reduce of the gathered gradient, then this rank's slice: works on every backend.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """`[B, ...]` on each rank -> `[world*B, ...]` (rank order), differentiable w.r.t. the local part.

    The backward pass sums every rank's gradient for this rank's slice. Every rank computes the
    same global-batch loss, so the summed gradient is world_size x the true one, which DDP's
    gradient averaging then divides back out: for layers without batch statistics the update
    equals a single-process step on the global batch (tests/test_ddp.py checks this); BatchNorm
    normalises each rank's own B (the global batch with training.sync_batchnorm). Every rank
    must pass the same B.
    """
    if not ctx.enabled:
        return x
    return _GatherWithGrad.apply(x.contiguous())


def gather(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """All ranks' `[B, ...]` tensors concatenated (no gradient), e.g. clip ids."""
    if not ctx.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(ctx.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_objects(obj: T, ctx: DistContext) -> list[T]:
    """Every rank's picklable `obj`, in rank order ([obj] without DDP). A collective: all ranks call it."""
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def on_master(ctx: DistContext, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result to every rank.

    A UserError on rank 0 is re-raised on every rank, so no rank is left waiting in a collective.
    """
    if not ctx.enabled:
        return fn()
    payload: list = [None]
    if ctx.is_master:
        try:
            payload[0] = ("ok", fn())
        except UserError as e:
            payload[0] = ("error", str(e))
        except BaseException as e:
            # a full disk, a file-size limit...: the other ranks say it as rank 0 does
            known = os_error_message(e) if isinstance(e, OSError) else None
            payload[0] = ("crash", known or f"rank 0 failed: {type(e).__name__}: {e}")
            dist.broadcast_object_list(payload, src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "ok":
        return value
    if status == "error" or not ctx.is_master:
        raise UserError(value)
    raise RuntimeError(value)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.parallel.DistributedDataParallel:
    """DDP that does not broadcast the buffers in every forward (see sync_buffers)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch 2.13 renamed the switch; the old name also leaves buffers out of DDP's start-up
    # sync, where every rank holds the same ones anyway (same seed, same checkpoint)
    name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else "broadcast_buffers")
    return ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **{name: False})


def sync_buffers(module: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's persistent buffers (BatchNorm statistics) to every rank.

    DDP runs without forward_sync_buffers (wrap_ddp) so the frozen caption table (a large non-persistent
    buffer) is not broadcast every step; the running statistics are synced here once an epoch,
    so every rank ends the epoch with identical weights.
    """
    if not ctx.enabled:
        return
    persistent = set(module.state_dict().keys())
    for name, buf in module.named_buffers():
        if name in persistent:
            dist.broadcast(buf, src=0)


def weights_checksum(module: torch.nn.Module, ctx: DistContext) -> str:
    """A checksum of the state dict, checked to be identical on every rank (else RuntimeError).

    Cheap (one small all-gather); it catches any divergence between ranks before a checkpoint
    written by rank 0 is taken to stand for all of them.
    """
    sums = torch.tensor([[t.double().sum().item(), t.double().abs().sum().item()]
                         for t in module.state_dict().values() if t.is_floating_point()],
                        dtype=torch.float64)
    checksum = f"{sums.abs().sum().item():.10e}"
    if ctx.enabled:
        device = next(module.parameters()).device
        mine = sums.to(device)
        parts = [torch.empty_like(mine) for _ in range(ctx.world_size)]
        dist.all_gather(parts, mine)
        differing = [r for r, p in enumerate(parts) if not torch.equal(p, parts[0])]
        if differing:
            raise RuntimeError(f"DDP ranks {differing} ended with weights different from rank 0's")
    return checksum


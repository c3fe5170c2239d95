"""One rule for every `device` key in the config (features, sbert, training, eval), and one
for every `amp` key (training.amp, eval.amp)."""
import contextlib
from typing import Callable

from utils.errors import UserError


def resolve_device(setting: str, key: str) -> str:
    """`auto` -> "cuda" when a GPU is present, else "cpu"; `cpu`; `cuda` (or `cuda:N`) only with
    a GPU. `key` names the config key in errors, e.g. "eval.device"."""
    if setting == "cpu":
        return setting  # without importing torch (seconds)
    if setting != "auto" and setting != "cuda" and not str(setting).startswith("cuda:"):
        raise UserError(f"config key '{key}': {setting!r} is not one of auto, cpu, cuda")
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise UserError(f"config key '{key}' is '{setting}' but no CUDA device is available; "
                        "use auto or cpu")
    return setting


def cuda_bf16() -> bool:
    """Whether the GPU computes in bf16 natively (Ampere and newer). torch's default answer also
    counts emulation, so a V100 or T4 says yes, and its bf16 convolutions are slow or fail there."""
    import torch

    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3: no emulation counted
        return torch.cuda.is_bf16_supported()


def amp_mode(setting: str, device, key: str = "training.amp") -> str:
    """`bf16`, `fp16` or `off` for an `amp` key on `device`: auto is bf16 where the GPU computes
    it natively, else fp16; always off on the CPU. `key` names the config key in errors."""
    if getattr(device, "type", str(device).split(":")[0]) != "cuda" or setting == "off":
        return "off"
    native = cuda_bf16()
    if setting == "auto":
        return "bf16" if native else "fp16"
    if setting == "bf16" and not native:
        raise UserError(f"config key '{key}' is bf16 but this GPU does not compute bf16 natively; "
                        "use auto or fp16")
    return setting


def autocast(device, amp: str):
    """torch.autocast for `amp_mode`'s answer (a no-op for "off")."""
    if amp == "off":
        return contextlib.nullcontext()
    import torch

    device_type = getattr(device, "type", str(device).split(":")[0])
    return torch.autocast(device_type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def read_later(value) -> Callable[[], float]:
    """Start copying the one-element tensor `value` to the host -> a function that returns it as
    a float, waiting for the work queued up to now only. On CUDA `value.item()` would wait for
    everything queued before the call, so a training loop that reads step k's loss after
    queueing step k+1 waited for step k+1 too, and the GPU sat idle while the next step was
    being queued (on an H200, compiled: 22.3 ms a step for 19.5 ms of kernels)."""
    import torch

    if value.device.type != "cuda":
        return value.item
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    host.copy_(value.detach(), non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> float:
        copied.synchronize()
        return host.item()
    return read

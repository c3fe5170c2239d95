"""torch.compile with a symbolic time axis: one graph for whole clips of every length.

Marked dynamic, CNN14's time axis still ends up pinned to the first batch's length by
PyTorch 2.13's inductor (found on the CPU), in two places of the backward pass, so every new
length is compiled anew (an H200 run with torch 2.11 spent ~30 s on each):

- its lowering of `convolution_backward` reads the gradient's strides as integers to choose a
  memory layout (a guard `T == <first length>`);
- its layout optimisation re-strides the saved activations with the strides of real tensors.

`allow_symbolic_time` has inductor call ATen's `convolution_backward` (cuDNN on a GPU, as in
eager mode) instead of lowering it, and `SYMBOLIC_TIME_OPTIONS` turns the layout optimisation
off for that compile (on CUDA the model is channels_last already). What compiling then buys is
the fusion of batch norm, ReLU, pooling and dropout around the convolutions.
"""
from __future__ import annotations

import torch

SYMBOLIC_TIME_OPTIONS = {"layout_optimization": False}  # torch.compile(options=...)

_allowed = False


def allow_symbolic_time() -> None:
    """Process-wide and idempotent: later compiles of convolutions run their backward pass
    through ATen. RuntimeError where this version of torch lacks the hooks used."""
    global _allowed
    if _allowed:
        return
    try:
        from torch._inductor import lowering
        op = torch.ops.aten.convolution_backward.default
        lowering.lowerings.pop(op, None)
        lowering.make_fallback(op, override_decomp=True)
    except (ImportError, AttributeError, TypeError, AssertionError) as e:
        raise RuntimeError(f"this torch {torch.__version__} cannot compile a symbolic time axis "
                           f"({type(e).__name__}: {e})") from None
    _allowed = True

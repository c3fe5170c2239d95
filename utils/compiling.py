"""torch.compile with a symbolic time axis: one graph for whole clips of every length.

Marked dynamic, CNN14's time axis still ends up pinned to the first batch's length by
PyTorch 2.13's inductor (found on the CPU), in two places of the backward pass, so every new
length is compiled anew (an H200 run with torch 2.11 spent ~30 s on each):

- its lowering of `convolution_backward` reads the gradient's strides as integers to choose a
  memory layout (a guard `T == <first length>`);
- its layout optimisation re-strides the saved activations with the strides of real tensors.

Before 2.13 (found with 2.11 on the CPU) a third cause splits the lengths further: the shape
function of `avg_pool2d` rounds its division with a test of the remainder, a guard on the
parity of T at each of CNN14's 6 poolings, so up to 64 graphs.

`allow_symbolic_time` has inductor call ATen's `convolution_backward` (cuDNN on a GPU, as in
eager mode) instead of lowering it, and gives older versions 2.13's shape rounding (a floor
division: the same integers, no guard); `SYMBOLIC_TIME_OPTIONS` turns the layout optimisation
off for that compile (on CUDA the model is channels_last already). What compiling then buys is
the fusion of batch norm, ReLU, pooling and dropout around the convolutions.
"""
from __future__ import annotations

import operator

import torch

SYMBOLIC_TIME_OPTIONS = {"layout_optimization": False}  # torch.compile(options=...)

_allowed = False


def allow_symbolic_time() -> None:
    """Process-wide and idempotent: later compiles of convolutions run their backward pass
    through ATen, and pooled lengths carry no guard. RuntimeError where this version of torch
    lacks the hooks used."""
    global _allowed
    if _allowed:
        return
    try:
        _convolution_backward_in_aten()
        _unguarded_pooled_lengths()
    except (ImportError, AttributeError, TypeError, AssertionError) as e:
        raise RuntimeError(f"this torch {torch.__version__} cannot compile a symbolic time axis "
                           f"({type(e).__name__}: {e})") from None
    _allowed = True


def _convolution_backward_in_aten() -> None:
    from torch._inductor import lowering
    op = torch.ops.aten.convolution_backward.default
    lowering.lowerings.pop(op, None)
    lowering.make_fallback(op, override_decomp=True)


def _unguarded_pooled_lengths() -> None:
    """Pooling's output length as a plain floor division (2.13's); before 2.13 the rounding
    tested the remainder. For integers both give the same value."""
    from torch import _meta_registrations
    if hasattr(_meta_registrations, "div_rtn"):
        _meta_registrations.div_rtn = operator.floordiv

"""Audio encoders: the baseline's CNN14 (PANNs architecture) with a linear projection.

Module names follow the DCASE 2023 Task 6B baseline exactly (`bn0`, `cnn.<i>`, `fc.1`, `fc2`),
so the baseline's released `audio_encoder.pth` and our `CNN14_300.pth` load with strict=True.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.audio_utils import N_MELS

DEFAULT_CHANNELS = (64, 128, 256, 512, 1024, 2048)
LAYERS_PER_BLOCK = 8  # conv, bn, relu, conv, bn, relu, avgpool, dropout


def conv_block(in_ch: int, out_ch: int) -> list[nn.Module]:
    """One CNN14 block as a flat list of 8 layers (flat so the indices match the baseline)."""
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
        nn.Conv2d(out_ch, out_ch, kernel_size=3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2),
        nn.Dropout(p=0.2),
    ]


def init_layer(module: nn.Module) -> None:
    """The baseline's init: kaiming-normal conv/linear weights, zero biases, BN as identity."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class CNN14Encoder(nn.Module):
    """PANNs CNN14 trunk + projection: log-mels `[B, T, 64]` -> embeddings `[B, out_dim]`.

    Shapes through `forward` (C = channels[-1], 2048 by default):
    `[B, T, 64]` -> bn0 over the 64 mel bins -> `[B, 1, T, 64]` -> six conv blocks, each halving
    time and frequency -> `[B, C, T/64, 1]` -> mean over frequency -> `[B, C, T/64]`
    -> max + mean over time -> `[B, C]` -> fc (dropout, Linear C->C, ReLU, dropout) -> fc2 -> `[B, out_dim]`.

    Six 2x2 poolings need T >= 64 frames (1.28 s at a 20 ms hop). Shorter inputs are padded
    to 64 frames *after* bn0 with zeros, i.e. with each mel bin at its normalised mean level:
    zeros before bn0 would be log(1), a loud frame, not a neutral one.
    """

    def __init__(self, out_dim: int = 300, channels: Sequence[int] = DEFAULT_CHANNELS):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 6 or min(channels) < 1:
            raise ValueError(f"CNN14Encoder needs 6 positive channel widths, got {channels}")
        self.out_dim = int(out_dim)
        self.channels = channels
        self.bn0 = nn.BatchNorm2d(N_MELS)
        layers: list[nn.Module] = []
        in_ch = 1
        for out_ch in channels:
            layers += conv_block(in_ch, out_ch)
            in_ch = out_ch
        self.cnn = nn.Sequential(*layers)
        width = channels[-1]
        self.fc = nn.Sequential(nn.Dropout(p=0.5), nn.Linear(width, width), nn.ReLU(), nn.Dropout(p=0.5))
        self.fc2 = nn.Linear(width, self.out_dim)
        self.apply(init_layer)
        # Run the conv stack in channels_last (NHWC): cuDNN's fastest bf16 kernels on recent
        # GPUs. Set by use_channels_last(), which also converts the weights; same numbers.
        self.channels_last = False

    def use_channels_last(self, enabled: bool = True) -> "CNN14Encoder":
        """Convert the conv weights (and, in forward, the input) to channels_last or back."""
        self.channels_last = bool(enabled)
        fmt = torch.channels_last if enabled else torch.contiguous_format
        for module in self.cnn:
            if isinstance(module, nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=fmt)
        return self

    @property
    def min_frames(self) -> int:
        return 2 ** (len(self.channels))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """`x`: float `[B, T, 64]` log-mels -> `[B, out_dim]` (not normalised).

        `lengths` (int `[B]`, optional): each clip's own frame count, in a batch padded beyond
        it. The padding is then kept out of every layer (zeroed before each convolution, left out
        of the pooling over time), so in eval mode each clip gets the embedding it gets alone, up
        to float rounding: how clips are encoded for scoring and validation. (In training mode
        batch norm's statistics span the batch whatever the lengths.) Without it (training, as
        the baseline) the padded frames are part of the input.
        """
        if x.dim() != 3 or x.shape[-1] != N_MELS:
            raise ValueError(f"CNN14Encoder expects [batch, frames, {N_MELS}] log-mels, got {list(x.shape)}")
        x = x.unsqueeze(1)            # [B, 1, T, F]
        x = x.transpose(1, 3)         # [B, F, T, 1]: bn0 normalises each mel bin
        x = self.bn0(x)
        x = x.transpose(1, 3)         # [B, 1, T, F]
        if lengths is not None:
            # alone, a clip shorter than min_frames is padded with zeros here, after bn0
            x = zero_beyond(x, lengths)
            lengths = lengths.clamp(min=self.min_frames)
        if x.shape[2] < self.min_frames:
            x = F.pad(x, (0, 0, 0, self.min_frames - x.shape[2]))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if lengths is None:
            x = self.cnn(x)           # [B, C, T/64, F/64]
            x = torch.mean(x, dim=3)  # [B, C, T']
            x = torch.amax(x, dim=2) + torch.mean(x, dim=2)  # [B, C]
        else:
            x, lengths = self._cnn_of_lengths(x, lengths)
            x = torch.mean(x, dim=3)  # [B, C, T']; each clip's frames beyond lengths are 0
            # every frame is >= 0 (ReLU, then average pooling), so the zeros leave the max alone
            x = torch.amax(x, dim=2) + x.sum(dim=2) / lengths[:, None].to(x.dtype)  # [B, C]
        x = self.fc(x)
        return self.fc2(x)            # [B, out_dim]

    def _cnn_of_lengths(self, x: torch.Tensor, lengths: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """self.cnn on `[B, 1, T, F]` whose clip b is `lengths[b]` frames long: every
        convolution sees zeros beyond a clip's end, as the clip alone sees its zero padding ->
        (`[B, C, T/64, F/64]` with zeros beyond each clip's end, the lengths there `[B]`)."""
        for layer in self.cnn:
            if isinstance(layer, nn.Conv2d):
                x = zero_beyond(x, lengths)
            x = layer(x)
            if isinstance(layer, nn.AvgPool2d):  # 2x2, floor: a clip alone keeps T // 2 frames
                lengths = lengths // 2
        return zero_beyond(x, lengths), lengths


def zero_beyond(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`x` `[B, C, T, F]` with the frames from `lengths[b]` on set to 0 in clip b (NaN too)."""
    beyond = torch.arange(x.shape[2], device=x.device)[None, :] >= lengths[:, None]  # [B, T]
    # where, not masked_fill: masked_fill returns an NCHW tensor for a channels_last one, and
    # each convolution then converted its input and output (a quarter of the GPU's time)
    return torch.where(beyond[:, None, :, None], 0.0, x)

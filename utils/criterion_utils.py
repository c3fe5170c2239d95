"""The baseline's symmetric InfoNCE loss over a batch of (audio, caption) pairs."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

DISTS = ("dot_product", "cosine_similarity")


def fids_to_tensor(fids, device: torch.device | str | None = None) -> torch.Tensor:
    """Clip ids (strings, ints, or an int tensor) -> int64 tensor `[N]`; equal ids -> equal ints."""
    if isinstance(fids, torch.Tensor):
        return fids.to(device=device, dtype=torch.long).reshape(-1)
    codes: dict = {}
    # Only the ids are mapped in Python; the loss itself is computed without a loop.
    return torch.tensor([codes.setdefault(f, len(codes)) for f in fids], dtype=torch.long, device=device)


class LogSoftmaxLoss(nn.Module):
    """InfoNCE as in the DCASE 2023 baseline.

    With `sims[i, j]` = similarity of audio i and caption j divided by the temperature, pair i
    competes against itself and every j whose clip id differs from its own (other captions of
    the same clip are not negatives). Loss = mean over i of
    `-log_softmax(row i)[i] - log_softmax(column i)[i]` over those candidates, i.e. the
    audio->text and text->audio cross-entropies summed and averaged over the batch.
    """

    def __init__(self, temperature: float = 0.07, dist: str = "dot_product"):
        super().__init__()
        if dist not in DISTS:
            raise ValueError(f"dist must be one of {DISTS}, got {dist!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.dist = dist

    def forward(self, audio_embeds: torch.Tensor, text_embeds: torch.Tensor,
                fids: Sequence | torch.Tensor) -> torch.Tensor:
        """`audio_embeds`, `text_embeds`: `[N, E]` (row i of each is pair i); `fids`: N clip ids -> scalar."""
        if audio_embeds.shape != text_embeds.shape or audio_embeds.dim() != 2:
            raise ValueError(f"expected two [N, E] tensors of one shape, got "
                             f"{list(audio_embeds.shape)} and {list(text_embeds.shape)}")
        n = audio_embeds.shape[0]
        ids = fids_to_tensor(fids, device=audio_embeds.device)
        if ids.numel() != n:
            raise ValueError(f"got {ids.numel()} fids for a batch of {n} pairs")
        a, t = audio_embeds.float(), text_embeds.float()  # float32 logits even under autocast
        if self.dist == "cosine_similarity":
            a, t = F.normalize(a, dim=-1), F.normalize(t, dim=-1)
        sims = a @ t.T / self.temperature                       # [N, N]: audio i vs caption j
        same_clip = ids[:, None] == ids[None, :]
        same_clip.fill_diagonal_(False)                         # the positive itself stays
        sims = sims.masked_fill(same_clip, float("-inf"))
        a2t = -torch.diagonal(F.log_softmax(sims, dim=1))       # audio i against captions
        t2a = -torch.diagonal(F.log_softmax(sims, dim=0))       # caption i against clips
        return (a2t + t2a).mean()


# The losses `criterion.name` may name (the config schema lists the same names:
# utils/config_schema.py); each is built as cls(temperature, dist).
CRITERIA = {"LogSoftmaxLoss": LogSoftmaxLoss}

"""Text encoders: frozen Sentence-BERT embeddings with a trainable linear projection."""
from __future__ import annotations

import torch
import torch.nn as nn

from models.audio_encoders import init_layer


class SentBERTBaseEncoder(nn.Module):
    """Project precomputed sentence embeddings `[B, in_dim]` to `[B, out_dim]` (the baseline's).

    `table` (optional) is the frozen `[N, in_dim]` float tensor of every caption's embedding.
    It is a non-persistent buffer: it moves with `.to(device)` but is never trained and never
    written to checkpoints (it is rebuilt from `sbert_embeds.pkl`), which keeps them small.
    """

    def __init__(self, in_dim: int, out_dim: int = 300, table: torch.Tensor | None = None):
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)
        self.fc = nn.Linear(self.in_dim, self.out_dim)
        init_layer(self.fc)
        if table is not None:
            table = torch.as_tensor(table, dtype=torch.float32)
            if table.dim() != 2 or table.shape[1] != self.in_dim:
                raise ValueError(f"text table must be [N, {self.in_dim}], got {list(table.shape)}")
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x`: LongTensor `[B]` of table rows, or float `[B, in_dim]` embeddings -> `[B, out_dim]`."""
        if not torch.is_floating_point(x):
            if self.table is None:
                raise ValueError("SentBERTBaseEncoder got row ids but has no embedding table")
            x = self.table[x.long()]  # [B, in_dim]
        return self.fc(x)

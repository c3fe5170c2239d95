"""The dual-encoder model and how the config builds it."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.audio_encoders import CNN14Encoder
from models.text_encoders import SentBERTBaseEncoder
from utils.checkpoint import torch_load
from utils.errors import UserError

TRANSFER_SCRIPT = "preprocessing/04_cnn14_transfer.py"
# The classes `audio_encoder.name` and `text_encoder.name` may name (the config schema lists the
# same names: utils/config_schema.py).
AUDIO_ENCODERS = {"CNN14Encoder": CNN14Encoder}
TEXT_ENCODERS = {"SentBERTBaseEncoder": SentBERTBaseEncoder}


class DualEncoderModel(nn.Module):
    """Audio and text encoders whose outputs live in one L2-normalised space."""

    def __init__(self, audio_enc: nn.Module, text_enc: nn.Module):
        super().__init__()
        self.audio_enc = audio_enc
        self.text_enc = text_enc
        if audio_enc.out_dim != text_enc.out_dim:
            raise ValueError(f"audio embeddings are {audio_enc.out_dim}-d, text embeddings "
                             f"{text_enc.out_dim}-d: one joint space needs one size")

    @property
    def embed_dim(self) -> int:
        """E, the size of the joint space both branches map into."""
        return self.audio_enc.out_dim

    def audio_branch(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Log-mels `[B, T, 64]` -> unit-norm `[B, E]`. `lengths` `[B]`: each clip's own frame
        count in a padded batch, to embed each clip as it is alone (the encoder's `lengths`)."""
        emb = self.audio_enc(x) if lengths is None else self.audio_enc(x, lengths)
        return F.normalize(emb, p=2.0, dim=-1)

    def text_branch(self, x: torch.Tensor) -> torch.Tensor:
        """Table row ids `[B]` or sentence embeddings `[B, D]` -> unit-norm `[B, E]`."""
        return F.normalize(self.text_enc(x), p=2.0, dim=-1)

    def forward(self, audio: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.audio_branch(audio), self.text_branch(text)


def describe_mismatch(encoder: nn.Module, state: dict) -> list[str]:
    """Human-readable differences between `encoder`'s state dict and `state` (keys, shapes)."""
    expected = encoder.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    for k, v in expected.items():
        got = state.get(k)
        if isinstance(got, torch.Tensor) and got.shape != v.shape:
            problems.append(f"'{k}' has shape {list(got.shape)}, expected {list(v.shape)}")
            if len(problems) >= 6:
                break
    for k in expected:
        if k in state and not isinstance(state[k], torch.Tensor):
            problems.append(f"'{k}' is not a tensor")
            break
    return problems


def read_torch_file(path: str | Path) -> object:
    """torch.load(weights_only=True) on CPU; a missing or unreadable file, or one holding pickled
    code, is a one-line UserError (utils.checkpoint.torch_load)."""
    return torch_load(path, "cpu", what="weights file")


def load_audio_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a saved audio-encoder state dict into `encoder` (strict).

    Accepts a raw state dict (the baseline's `audio_encoder.pth`, our `CNN14_300.pth`) or a
    dict with a `"model"` entry holding one.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: audio encoder weights not found; run "
                        f"`python {TRANSFER_SCRIPT}` to make them from the PANNs checkpoint "
                        f"(or set audio_encoder.init=random)")
    state = read_torch_file(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict, got {type(state).__name__}")
    problems = describe_mismatch(encoder, state)
    if problems:
        raise UserError(f"{path}: does not fit {type(encoder).__name__}: {'; '.join(problems)}")
    encoder.load_state_dict(state, strict=True)


def registered(registry: dict, name: str, key: str):
    """The class `name` in `registry`; a one-line UserError listing what exists otherwise."""
    if name not in registry:
        raise UserError(f"config key '{key}': {name!r} is not one of {', '.join(registry)}")
    return registry[name]


def build_model(cfg: dict, text_in_dim: int, table: torch.Tensor | None = None) -> DualEncoderModel:
    """The model the config describes: CNN14 (prior or random init) + Sentence-BERT projection."""
    a_cfg, t_cfg = cfg["audio_encoder"], cfg["text_encoder"]
    audio_enc = registered(AUDIO_ENCODERS, a_cfg["name"], "audio_encoder.name")(
        out_dim=a_cfg["out_dim"], channels=a_cfg["channels"])
    if a_cfg["init"] == "prior":
        path = Path(cfg["paths"]["pretrained_dir"]) / a_cfg["weights"]
        try:
            load_audio_encoder_weights(audio_enc, path)
        except UserError as e:
            if path.is_file() and tuple(audio_enc.channels) != (64, 128, 256, 512, 1024, 2048):
                raise UserError(f"{e} (audio_encoder.channels={list(audio_enc.channels)} is not "
                                f"CNN14's; set audio_encoder.init=random)") from None
            raise
    if not a_cfg["trainable"]:
        # The baseline freezes the transferred CNN but keeps training the projection fc2.
        for module in (audio_enc.bn0, audio_enc.cnn, audio_enc.fc):
            for p in module.parameters():
                p.requires_grad_(False)
    text_enc = registered(TEXT_ENCODERS, t_cfg["name"], "text_encoder.name")(
        text_in_dim, t_cfg["out_dim"], table)
    return DualEncoderModel(audio_enc, text_enc)

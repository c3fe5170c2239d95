"""Transfer the PANNs AudioSet CNN14 checkpoint into the baseline's `CNN14Encoder` layout.

PANNs names its layers `conv_block{1..6}.{conv1,bn1,conv2,bn2}` and `fc1`; the baseline flattens
the six blocks into one `nn.Sequential` (`cnn.<i>`, 8 layers per block) and wraps fc1 in
`fc = Sequential(dropout, Linear, ReLU, dropout)`. The AudioSet classifier (`fc_audioset`) and the
spectrogram front end (`spectrogram_extractor`, `logmel_extractor`) are not used: our log-mels
are computed offline by preprocessing/02, and `fc2` (the 300-d projection) starts fresh.
"""
from __future__ import annotations

from pathlib import Path

import torch

from models.audio_encoders import DEFAULT_CHANNELS, LAYERS_PER_BLOCK, CNN14Encoder
from models.core import read_torch_file
from utils.errors import UserError

PANNS_ZENODO_RECORD = "3987831"
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# Older torch versions wrote no num_batches_tracked; the encoder's own 0 is then kept.
OPTIONAL_SUFFIX = "num_batches_tracked"


def panns_key_map(n_blocks: int = len(DEFAULT_CHANNELS)) -> dict[str, str]:
    """PANNs Cnn14 state-dict key -> CNN14Encoder key, for every transferred tensor."""
    mapping = {f"bn0.{s}": f"bn0.{s}" for s in BN_KEYS}
    for b in range(n_blocks):
        base = LAYERS_PER_BLOCK * b
        src = f"conv_block{b + 1}"
        mapping[f"{src}.conv1.weight"] = f"cnn.{base}.weight"
        mapping[f"{src}.conv2.weight"] = f"cnn.{base + 3}.weight"
        for s in BN_KEYS:
            mapping[f"{src}.bn1.{s}"] = f"cnn.{base + 1}.{s}"
            mapping[f"{src}.bn2.{s}"] = f"cnn.{base + 4}.{s}"
    mapping["fc1.weight"] = "fc.1.weight"
    mapping["fc1.bias"] = "fc.1.bias"
    return mapping


def missing_checkpoint_message(path: Path, url: str | None = None) -> str:
    where = f"Zenodo record {PANNS_ZENODO_RECORD}"
    if url:
        where = f"{url.rstrip('/')}/{path.name} ({where})"
    return (f"{path}: PANNs checkpoint not found; run `python preprocessing/00_download_clotho.py` "
            f"or download it from {where} into that folder")


def load_panns_state(path: str | Path, url: str | None = None) -> dict[str, torch.Tensor]:
    """The Cnn14 state dict inside a PANNs checkpoint (its `"model"` entry), read safely on CPU."""
    path = Path(path)
    if not path.is_file():
        raise UserError(missing_checkpoint_message(path, url))
    ckpt = read_torch_file(path)
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: expected a PANNs checkpoint (a dict with a 'model' entry), "
                        f"got {type(ckpt).__name__}")
    if "model" not in ckpt:
        keys = ", ".join(map(str, list(ckpt)[:5]))
        raise UserError(f"{path}: no 'model' entry in this checkpoint (it has: {keys or 'nothing'})")
    state = ckpt["model"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: the 'model' entry is a {type(state).__name__}, not a state dict")
    return state


def map_panns_state(state: dict, encoder: CNN14Encoder, source: str = "PANNs checkpoint") -> dict:
    """Rename PANNs tensors to `encoder`'s keys, checking presence and shapes.

    Returns a partial state dict (everything but fc2, and num_batches_tracked if absent).
    """
    mapping = panns_key_map(len(encoder.channels))
    target = encoder.state_dict()
    missing = [k for k in mapping if k not in state and not k.endswith(OPTIONAL_SUFFIX)]
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise UserError(f"{source}: not a PANNs Cnn14 state dict, missing keys "
                        f"{', '.join(missing[:4])}{more}")
    out = {}
    for src_key, dst_key in mapping.items():
        if src_key not in state:
            continue
        value = state[src_key]
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{source}: '{src_key}' is a {type(value).__name__}, not a tensor")
        expected = target[dst_key].shape
        if value.shape != expected:
            raise UserError(f"{source}: '{src_key}' (-> {dst_key}) has shape {list(value.shape)}, "
                            f"expected {list(expected)} for Cnn14")
        out[dst_key] = value.to(target[dst_key].dtype)
    return out


def transfer_cnn14(panns_path: str | Path, out_dim: int = 300, url: str | None = None,
                   seed: int = 0) -> CNN14Encoder:
    """A `CNN14Encoder(out_dim)` holding PANNs' CNN14 weights; `fc2` freshly initialised from `seed`."""
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
        torch.manual_seed(seed)  # the same seed gives the same fc2, hence the same output file
        encoder = CNN14Encoder(out_dim=out_dim)
    state = load_panns_state(panns_path, url)
    mapped = map_panns_state(state, encoder, source=str(panns_path))
    result = encoder.load_state_dict(mapped, strict=False)
    if result.unexpected_keys:  # map_panns_state emits only our keys: a bug here, not bad input
        raise RuntimeError(f"map_panns_state gave keys CNN14Encoder does not have: "
                           f"{result.unexpected_keys[:4]}")
    return encoder

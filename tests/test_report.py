"""The retrieval report (utils/report.py, postprocessing/02): sampling, audio, links, escaping,
missing clips, wandb tables. The page in a real browser: test_report_browser.py.

`make_scored` (a small split with wavs and hostile text) is shared with the browser test.
"""
from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import soundfile as sf

from tests.cli_helpers import REPO, error_line
from tests.test_postprocessing import make_run, run_script
from tests.test_tracking import offline  # noqa: F401  (a fixture: wandb offline inside tmp_path)
from tests.wav_fixtures import write_text_as_wav, write_wav
from utils import plots, report
from utils.config import load_config
from utils.scores_db import ScoredSplit
from utils.tracking import history_rows, read_wandb_file

SCORES = "postprocessing/01_xmodal_scores.py"
RETRIEVAL = "postprocessing/02_xmodal_retrieval.py"
HOSTILE_CAPTIONS = ["<script>alert(1)</script>",
                    '"onload="document.documentElement.setAttribute(\'data-pwned\',\'1\')" x="',
                    "<img src=x onerror=\"document.documentElement.setAttribute('data-pwned','2')\">",
                    "<script>document.documentElement.setAttribute('data-pwned','3')</script>"]
HOSTILE_FNAME = "<b onmouseover=alert(1)>x&y #1 %20 é.wav"


# --------------------------------------------------------------------------- helpers

def make_scored(root: Path, split: str = "evaluation", n_clips: int = 8, caps: int = 5,
                missing: tuple[int, ...] = (), seconds: float = 1.0, seed: int = 0) -> ScoredSplit:
    """A split of `n_clips` wavs (clip i lasts seconds + 0.1 i) under `root/split`, `caps`
    captions each (the first ones hostile), and deterministic scores; clips in `missing` have
    no wav; existing wavs are kept. Clip 3 has a hostile file name, clip 1 a leading space (as three Clotho names)."""
    rng = np.random.default_rng(seed)
    fnames = [f"{split}_clip_{i:02d}.wav" for i in range(n_clips)]
    fnames[1] = " " + fnames[1]
    fnames[3] = HOSTILE_FNAME
    for i, name in enumerate(fnames):
        if i not in missing and not (root / split / name.lstrip(" ")).exists():  # kept on reruns
            write_wav(root / split / name.lstrip(" "), seconds=seconds + 0.1 * i, seed=i, kind="tone",
                      freq=220.0 * (1 + i))
    captions, clip_of = [], []
    for i in range(n_clips):
        for c in range(caps):
            k = i * caps + c
            captions.append(HOSTILE_CAPTIONS[k] if k < len(HOSTILE_CAPTIONS) else f"clip {i} caption {c}")
            clip_of.append(i)
    clip_of = np.array(clip_of, dtype=np.int64)
    scores = rng.normal(size=(len(captions), n_clips)).astype(np.float32)
    scores[np.arange(len(captions)), clip_of] += 1.0      # better than chance, not perfect
    return ScoredSplit(split=split, fids=[f"fid{i}" for i in range(n_clips)], fnames=fnames,
                       tids=[f"tid{k}" for k in range(len(captions))], captions=captions,
                       caption_clip=clip_of, scores=scores)


def build_report(tmp_path: Path, audio: str = "copy", missing=(), **kw) -> tuple[report.Report, list]:
    """A report of two made-up splits under tmp_path/run (data in tmp_path/data)."""
    from utils import evaluation

    data = tmp_path / "data"
    opts = report.ReportSettings(worst=kw.pop("worst", 4), random=kw.pop("random", 3),
                                 clips_per_query=3, seed=0, audio=audio)
    samples, metrics, chance = [], {}, {}
    for split, n in (("validation", 6), ("evaluation", 8)):
        s = make_scored(data, split, n_clips=n, missing=missing if split == "evaluation" else ())
        r = evaluation.evaluate_split(s)
        samples.append(report.split_sample(s, r.ranks, r.top, data, opts))
        metrics[split], chance[split] = r.metrics, evaluation.split_chance(s)
    page = report.write_report(tmp_path / "run", samples, metrics, chance, [], opts)
    return page, samples


class Tags(HTMLParser):
    """Every start tag and its attributes, and the page's visible text."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.text = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def audio_srcs(page: Path) -> list[str]:
    return [a["src"] for t, a in Tags(page.read_text(encoding="utf-8")).tags if t == "audio"]


# --------------------------------------------------------------------------- sampling

def test_sampling_is_deterministic_worst_first_and_never_repeats():
    ranks = np.array([5, 1, 9, 9, 2, 7, 3, 1, 8, 4, 6, 2])
    a = report.sample_queries(ranks, worst=3, n_random=4, seed=0)
    assert a == report.sample_queries(ranks.copy(), worst=3, n_random=4, seed=0)
    assert a[:3] == [(2, "worst"), (3, "worst"), (8, "worst")]  # rank 9, 9 (lower index first), 8
    drawn = [i for i, why in a if why == "random"]
    assert len(drawn) == 4 and drawn == sorted(drawn) and not {2, 3, 8} & set(drawn)
    others = {tuple(i for i, w in report.sample_queries(ranks, 3, 4, seed) if w == "random")
              for seed in range(6)}
    assert len(others) > 1  # the seed matters
    every = report.sample_queries(ranks, worst=5, n_random=50, seed=1)  # more than there are
    assert sorted(i for i, _ in every) == list(range(len(ranks)))
    assert report.sample_queries(ranks, 0, 0, 0) == []


def test_panels_rank_and_mark_the_true_items(tmp_path):
    from utils import evaluation
    from utils.metrics import rank_of_first_relevant

    s = make_scored(tmp_path, n_clips=8)
    r = evaluation.evaluate_split(s)
    opts = report.ReportSettings(worst=3, random=2, clips_per_query=3)
    smp = report.split_sample(s, r.ranks, r.top, tmp_path, opts)
    assert [p.why for p in smp.t2a] == ["worst"] * 3 + ["random"] * 2
    for p in smp.t2a:
        q = s.captions.index(p.query)
        true = s.fnames[s.caption_clip[q]]
        assert p.rank == r.ranks[q] and p.true_name == true and len(p.hits) == 3
        assert [h.correct for h in p.hits] == [h.text == true for h in p.hits]
        # the true clip has its own player exactly when it is not among the hits
        assert (p.true_clip is None) == (p.rank <= 3)
        assert [h.score for h in p.hits] == sorted((h.score for h in p.hits), reverse=True)
        # each retrieved clip says in words what it is: its first caption
        assert [h.note for h in p.hits] == [s.captions[s.fnames.index(h.text) * 5] for h in p.hits]
        # so does the true clip, with its score: how far below rank 1 it is tells a near miss
        assert p.true_note == s.captions[s.caption_clip[q] * 5]
        assert p.true_score == pytest.approx(float(s.scores[q, s.caption_clip[q]]))
    a2t_ranks = rank_of_first_relevant(s.scores.T, s.relevance().T)
    assert smp.t2a[0].rank == r.ranks.max() and smp.a2t[0].rank == a2t_ranks.max()
    assert np.array_equal(smp.a2t_ranks, r.a2t_ranks)  # evaluation's ranks, the same numbers
    for p in smp.a2t:
        c = s.fnames.index(p.query)
        assert p.rank == a2t_ranks[c] and len(p.own) == 5 and p.own[0][0] == p.rank
        assert [h.correct for h in p.hits] == [h.text in s.captions[c * 5:(c + 1) * 5] for h in p.hits]
        # a wrong caption names the clip it belongs to
        assert [h.note for h in p.hits] == [
            "" if h.correct else f"of {s.fnames[s.caption_clip[s.captions.index(h.text)]]}" for h in p.hits]
        # its own captions with their scores, best first
        assert [score for _, _, score in p.own] == pytest.approx(
            [float(s.scores[s.captions.index(text), c]) for _, text, _ in p.own])
        assert [score for _, _, score in p.own] == sorted((sc for _, _, sc in p.own), reverse=True)
    worst = smp.t2a[0]
    assert worst.true_clip is not None  # ranked below the 3 shown
    page = report.panel_html(worst, {})
    assert page.count('<span class="note">') == 4  # 3 hits and the true clip
    gap = worst.hits[0].score - worst.true_score
    assert (f"true clip, rank {worst.rank}: score {worst.true_score:+.3f}, {gap:.3f} below rank 1"
            in page) and gap > 0
    a2t_page = report.panel_html(smp.a2t[0], {})
    assert "<details open>" in a2t_page
    rank, _, score = smp.a2t[0].own[0]
    assert f"rank {rank}, score {score:+.3f}: " in a2t_page
    # the table of every query: caption, true file, rank, top-10 names (padded: 8 clips)
    assert len(smp.table_rows) == len(s.captions)
    row = smp.table_rows[7]
    assert row[:3] == [s.captions[7], s.fnames[1], int(r.ranks[7])]
    assert row[3:11] == [s.fnames[c] for c in r.top[7]] and row[11:] == ["", ""]


# --------------------------------------------------------------------------- audio

def test_copy_mode_transcodes_each_clip_once_small_and_reuses_it(tmp_path):
    page, samples = build_report(tmp_path)
    audio = sorted((page.path.parent / "audio").rglob("*.opus"))
    used = {c for c, p in page.playable.items() if p.href}
    assert len(audio) == len(used) == len({(c.group, c.fname) for c in used})  # once each
    srcs = audio_srcs(page.path)
    assert len(srcs) > len(audio)  # clips shown in several panels share one file
    for path in audio:
        info = sf.info(str(path))
        assert (info.format, info.subtype, info.channels, info.samplerate) == ("OGG", "OPUS", 1, 48000)
        kbit_s = path.stat().st_size * 8 / info.duration / 1000
        assert kbit_s <= 64, (path.name, kbit_s)
    # every src is a relative URL to one of those files
    for src in srcs:
        assert not src.startswith(("/", "file:", "http")) and (page.path.parent / unquote(src)).is_file()
    # the stated folder size is the real one
    stated = re.search(r'id="folder-size">([^<]+)<', page.path.read_text()).group(1)
    assert stated == report.format_size(report.folder_size(page.path.parent))

    stamps = {p: p.stat().st_mtime_ns for p in audio}
    stale = page.path.parent / "audio" / "evaluation" / "old-0123456789.opus"
    stale.write_bytes(b"from an earlier sample")
    killed = page.path.parent / "audio" / "evaluation" / ".x-0123456789.opus.abc123.tmp"
    killed.write_bytes(b"half a clip")
    page2, _ = build_report(tmp_path)
    assert {p: p.stat().st_mtime_ns for p in audio} == stamps  # reused, not transcoded again
    assert not stale.exists() and not killed.exists()  # no longer referenced: removed


@pytest.mark.parametrize("kbps", [report.MIN_KBPS, 32, report.MAX_KBPS])
def test_measured_bitrate_of_a_noisy_30_s_clip_is_the_target(tmp_path, kbps):
    """The hardest case for the codec, broadband noise at Clotho's length, lands on the target."""
    src = write_wav(tmp_path / "noise.wav", seconds=30.0, kind="noise", amplitude=0.5)
    out = report.transcode(src, tmp_path / "noise.opus", kbps)
    measured = out.stat().st_size * 8 / sf.info(str(out)).duration / 1000
    assert 0.8 * kbps <= measured <= 1.2 * kbps and measured <= 64, (kbps, measured)


def test_bitrate_keeps_a_clotho_sized_sample_under_the_budget():
    # default sample on Clotho: 2 splits x (40 captions x 6 clips + 40 clips), ~22 s each
    clotho = 2 * (40 * 6 + 40) * 22.0
    kbps = report.opus_kbps(clotho)
    assert report.MIN_KBPS <= kbps < 32 and clotho * kbps * 1000 / 8 <= report.AUDIO_BUDGET
    assert report.opus_kbps(250 * 3.5) == report.MAX_KBPS  # the demo: best quality
    assert report.opus_kbps(1e6) == report.MIN_KBPS          # never below the floor


def test_link_mode_points_at_the_dataset_wavs_by_relative_paths(tmp_path):
    page, samples = build_report(tmp_path, audio="link")
    assert not (page.path.parent / "audio").exists()
    srcs = audio_srcs(page.path)
    assert srcs
    data = (tmp_path / "data").resolve()
    for src in srcs:
        assert src.startswith("../../data/"), src
        target = (page.path.parent / unquote(src)).resolve()
        assert target.is_file() and data in target.parents
    # the hostile name is percent-encoded in the URL and still leads to its file
    hostile = [s for s in srcs if "%3Cb" in s]
    assert hostile and (page.path.parent / unquote(hostile[0])).resolve().name == HOSTILE_FNAME
    # a clip whose CSV name has a leading space plays the extracted wav without it
    assert any(unquote(s).endswith("/evaluation_clip_01.wav") for s in srcs)


def test_a_missing_clip_gets_a_panel_that_says_so_and_the_report_is_written(tmp_path):
    page, samples = build_report(tmp_path, missing=(0, 5), worst=8, random=0)
    text = page.path.read_text()
    assert text.count("not found in the dataset folder (evaluation/evaluation_clip_00.wav)") >= 1
    assert "not found in the dataset folder (evaluation/evaluation_clip_05.wav)" in text
    missing = [c for c, p in page.playable.items() if p.href is None]
    assert {c.fname for c in missing} == {"evaluation_clip_00.wav", "evaluation_clip_05.wav"}
    assert "2 clip(s) cannot be played" in text
    assert str(tmp_path) not in text  # no absolute path on the page


def test_an_unreadable_clip_is_noted_on_its_panel(tmp_path):
    from utils import evaluation

    s = make_scored(tmp_path / "data", n_clips=4)
    write_text_as_wav(tmp_path / "data" / "evaluation" / "evaluation_clip_02.wav")
    r = evaluation.evaluate_split(s)
    opts = report.ReportSettings(worst=20, random=0, clips_per_query=4)
    smp = report.split_sample(s, r.ranks, r.top, tmp_path / "data", opts)
    page = report.write_report(tmp_path / "run", [smp], {"evaluation": r.metrics}, None, [], opts)
    text = page.path.read_text()
    assert "unreadable audio file" in text and str(tmp_path) not in text
    assert len(list((page.path.parent / "audio").rglob("*.opus"))) == 3


# --------------------------------------------------------------------------- HTML

def test_captions_and_file_names_are_escaped(tmp_path):
    page, _ = build_report(tmp_path, worst=20, random=0)
    text = page.path.read_text(encoding="utf-8")
    parsed = Tags(text)
    # no element or attribute came from user text: the only script is the page's own
    assert [t for t, _ in parsed.tags if t == "script"] == ["script"]
    assert {t for t, _ in parsed.tags} <= {"html", "head", "meta", "title", "style", "body", "h1",
                                          "h2", "h3", "p", "b", "nav", "a", "section", "table", "tr",
                                          "th", "td", "div", "article", "span", "ol", "li", "audio",
                                          "details", "summary", "ul", "figure", "img", "dl", "dt", "dd",
                                          "script"}
    assert not any(k.startswith("on") for _, attrs in parsed.tags for k in attrs)
    assert not [a for t, a in parsed.tags if t == "img" and a.get("src") == "x"]
    visible = "".join(parsed.text)
    for caption in HOSTILE_CAPTIONS:
        assert caption in visible  # shown as text, character for character
    assert HOSTILE_FNAME in visible
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_metrics_table_shows_every_number_chance_and_definitions():
    metrics = {"evaluation": {"t2a": {"mAP@10": 0.5, "R@1": 0.25, "R@5": 0.75, "R@10": 1.0,
                                      "median_rank": 3.0},
                              "a2t": {"mAP@10": 0.2, "R@1": 0.1, "R@5": 0.3, "R@10": 0.4,
                                      "R@1_any": 0.35},
                              "counts": {"captions": 40, "clips": 8, "skipped_clips": 1}},
               "definitions": {"R@k_any": "<b>any</b> correct caption in the top k"},
               "provenance": {"checkpoint": "best", "epoch": 2}}
    chance = {"evaluation": {"t2a": {"mAP@10": 0.01, "R@1": 0.125, "R@5": 0.625, "R@10": 1.0},
                             "a2t": {"mAP@10": 0.02, "R@1": 0.025, "R@5": 0.125, "R@10": 0.25}}}
    text = report.metrics_html(metrics, chance)
    assert report.TUNED_MARK not in text  # no split said to be tuned on
    parsed = Tags(text)
    cells = "|".join(parsed.text)
    for value in ("0.5000", "0.2500", "3.0", "0.3500", "0.1250", "0.6250"):
        assert value in cells
    headers = [d for d in parsed.text if d in ("mAP@10", "median_rank", "R@1_any")]
    assert headers == ["mAP@10", "median_rank", "R@1_any"]
    assert "evaluation.counts.skipped_clips" in cells and "1" in cells
    assert "&lt;b&gt;any&lt;/b&gt;" in text and "provenance" in cells


def test_the_split_training_was_tuned_on_is_marked_as_not_held_out():
    cfg = load_config(REPO / "conf.yaml")  # best.pt, chosen by val_loss on validation
    notes = report.tuning_notes(cfg)
    assert list(notes) == ["validation"]
    assert "used to choose the checkpoint (best.pt by training.monitor, val_loss)" in notes["validation"]
    assert notes["validation"].endswith("not a held-out estimate")
    last = load_config(REPO / "conf.yaml", ["eval.checkpoint=last", "training.early_stopping=3"])
    assert "used to stop training early" in report.tuning_notes(last)["validation"]
    plain = report.tuning_notes(load_config(REPO / "conf.yaml", ["eval.checkpoint=last"]))["validation"]
    assert "checkpoint" not in plain and "learning rate" in plain
    moved = load_config(REPO / "conf.yaml", ["data.val_split=evaluation"])
    assert list(report.tuning_notes(moved)) == ["evaluation"]

    metrics = {split: {"t2a": {"mAP@10": 0.5}, "a2t": {"mAP@10": 0.4}}
               for split in ("validation", "evaluation")}
    text = report.metrics_html(metrics, tuned=notes)
    rows = re.findall(r"<tr><td>(.*?)</td>", text)
    assert [report.TUNED_MARK in r for r in rows] == [True, True, False, False]  # validation only
    assert f"{report.TUNED_MARK}</span> validation: used to choose the checkpoint" in text


# --------------------------------------------------------------------------- postprocessing/02

@pytest.fixture
def run_with_wavs(tmp_path, monkeypatch, capsys):
    """A tiny run, scored, with wavs for every clip but evaluation_002.wav."""
    conf, run_dir = make_run(tmp_path)
    for split, n in (("validation", 6), ("evaluation", 6)):
        for i in range(n):
            if (split, i) != ("evaluation", 2):
                write_wav(tmp_path / "data" / split / f"{split}_{i:03d}.wav", seconds=0.6, seed=i)

    def call(script, *args):
        return run_script(script, "--conf", conf, "--run", run_dir, *args, monkeypatch=monkeypatch,
                          capsys=capsys)
    assert call(SCORES).returncode == 0
    return run_dir, call


def test_step_02_writes_the_report_and_prints_its_path_last(run_with_wavs):
    run_dir, call = run_with_wavs
    p = call(RETRIEVAL)
    assert p.returncode == 0, p.stderr
    index = run_dir / "report" / "index.html"
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith(f"report: {index} (") and "open it in a browser" in last
    text = index.read_text()
    assert "not found in the dataset folder (evaluation/evaluation_002.wav)" in text
    for split in ("validation", "evaluation"):
        # the run's figure (plots/, with PDF and SVG) is the one the page shows
        assert (run_dir / "plots" / f"{split}_t2a_rank_histogram.pdf").is_file()
        assert (run_dir / "report" / "plots" / f"{split}_t2a_rank_histogram.png").is_file()
        assert f'id="{split}-t2a"' in text and f'id="{split}-a2t"' in text
    assert 'src="plots/recall_at_k.png"' in text
    # 30 captions a split: 20 worst + 10 random t2a panels, 6 a2t panels
    assert text.count('class="panel"') == 2 * (30 + 6)
    assert len(list((run_dir / "report" / "audio").rglob("*.opus"))) == 11
    assert not (run_dir / "wandb").exists()  # wandb disabled: nothing logged


def test_step_02_without_the_report(run_with_wavs):
    run_dir, call = run_with_wavs
    p = call(RETRIEVAL, "--set", "eval.report.enabled=false")
    assert p.returncode == 0, p.stderr
    assert not (run_dir / "report").exists() and "report:" not in p.stdout
    # an earlier page stays, but is said not to show these metrics
    assert call(RETRIEVAL).returncode == 0
    page = (run_dir / "report" / "index.html").read_bytes()
    p = call(RETRIEVAL, "--set", "eval.report.enabled=false")
    assert p.returncode == 0 and (run_dir / "report" / "index.html").read_bytes() == page
    assert f"note: {run_dir / 'report' / 'index.html'} is an earlier run's page" in p.stdout


def test_bad_report_setting_is_one_line(run_with_wavs):
    run_dir, call = run_with_wavs
    line = error_line(call(RETRIEVAL, "--set", "eval.report.audio=mp3"))
    assert "eval.report.audio" in line and "copy" in line and "link" in line
    assert call(RETRIEVAL, "--set", "eval.report.audio=link").returncode == 0  # the advice works
    assert audio_srcs(run_dir / "report" / "index.html")[0].startswith("../../../data/")


def test_wandb_offline_gets_the_tables_histograms_and_plots(run_with_wavs, offline, tmp_path):
    run_dir, call = run_with_wavs
    p = call(RETRIEVAL)
    assert p.returncode == 0, p.stderr
    import wandb

    wandb.teardown()  # waits for wandb's service: it writes the last rows after finish() returns
    # every wandb run segment in the run folder (training and evaluation may be separate runs)
    records = [r for seg in sorted((run_dir / "wandb").glob("*run-*/run-*.wandb"))
               for r in read_wandb_file(seg)]

    row = {}
    for _, r in history_rows(records):
        row.update(r)
    # each evaluation row says which checkpoint it scored (a resumed run is evaluated again)
    from utils.evaluation import checkpoint_epoch

    assert row["checkpoint_epoch"] == checkpoint_epoch(run_dir / "checkpoints" / "best.pt")
    assert row["evaluation/t2a_mAP@10"] >= 0
    artifacts = {r.artifact.name: r.artifact for r in records
                 if r.WhichOneof("record_type") == "artifact"}

    def table(key):
        (art,) = [a for name, a in artifacts.items() if name.endswith(f"-{key}")]
        entries = {e.path: e.local_path for e in art.manifest.contents}
        return json.loads(Path(entries[f"{key}.table.json"]).read_text()), entries

    cfg = load_config(run_dir / "config.yaml")
    k = cfg["eval"]["report"]["clips_per_query"]
    for split in ("validation", "evaluation"):
        assert row[f"retrieval_results_{split}._type"] == "table-file"
        full, _ = table(f"retrieval_results_{split}")
        assert full["columns"] == ["caption", "true_file", "rank"] + [f"file_name_{i}" for i in range(1, 11)]
        assert len(full["data"]) == 30
        listen, entries = table(f"listening_{split}")
        assert listen["columns"][:5] == ["why", "caption", "rank", "true_file", "true_audio"]
        assert listen["columns"][5:] == [c for i in range(1, k + 1) for c in (f"file_name_{i}", f"audio_{i}")]
        assert len(listen["data"]) == 30
        audio_cells = [c for r in listen["data"] for c in r if isinstance(c, dict)]
        assert audio_cells and all(c["_type"] == "audio-file" and c["path"] in entries for c in audio_cells)
        assert row[f"{split}/t2a_rank._type"] == "histogram"
        assert sum(row[f"{split}/t2a_rank.values"]) == 30
        assert row[f"{split}_t2a_rank_histogram._type"] == "image-file"
    assert row["recall_at_k._type"] == "image-file"
    # the missing clip is an empty cell, not an error
    listen, _ = table("listening_evaluation")
    i_file, i_audio = listen["columns"].index("true_file"), listen["columns"].index("true_audio")
    assert any(r[i_file] == "evaluation_002.wav" and r[i_audio] is None for r in listen["data"])


# --------------------------------------------------------------------------- ad-hoc query page

def test_query_page_for_text_and_audio_queries(tmp_path):
    clips = [write_wav(tmp_path / "clips" / f"c{i}.wav", seconds=0.5, seed=i) for i in range(3)]
    hits = [(p.name, 0.9 - 0.1 * i, p) for i, p in enumerate(clips)] + [("gone.wav", 0.1, None)]
    t2a = report.text_query_panel("a <b>dog</b> barks", hits)
    a2t = report.audio_query_panel(clips[0], [("a dog barks", 0.8, "x.wav", None),
                                               ("<i>rain</i>", 0.5, "y.wav", None)])
    out = report.write_query_page(tmp_path / "out" / "q.html", [t2a, a2t])
    text = out.read_text()
    srcs = audio_srcs(out)
    assert len(srcs) == 4 and len(set(srcs)) == 3  # c0 is a hit and the audio query: one file
    assert all((out.parent / unquote(s)).is_file() for s in srcs)
    assert all(s.startswith("q_audio/") for s in srcs)
    assert "audio file not found (gone.wav)" in text
    assert "a &lt;b&gt;dog&lt;/b&gt; barks" in text and "&lt;i&gt;rain&lt;/i&gt;" in text
    linked = report.write_query_page(tmp_path / "out" / "l.html", [t2a], audio="link")
    assert all(unquote(s).startswith("../clips/c") for s in audio_srcs(linked))
    assert os.path.samefile(linked.parent / unquote(audio_srcs(linked)[0]), clips[0])


def test_query_results_page_from_retriever_hits(tmp_path):
    """The shape query.py hands over: models.retrieval.Hit-like objects per query."""
    from dataclasses import dataclass

    @dataclass
    class Hit:
        rank: int
        score: float
        fname: str
        caption: str | None = None
        path: str | None = None

    clip = write_wav(tmp_path / "c.wav", seconds=0.5)
    texts = report.write_query_results(
        tmp_path / "t.html", ["rain", "a <dog>"],
        [[Hit(1, 0.5, "c.wav", None, str(clip)), Hit(2, 0.4, "x.wav")], [Hit(1, 0.3, "c.wav", None, str(clip))]])
    text = texts.read_text()
    assert text.count('class="panel"') == 2 and "a &lt;dog&gt;" in text
    assert "audio file not found (x.wav)" in text and len(audio_srcs(texts)) == 2
    assert 'class="note"' not in text  # a folder's clips: no captions known
    named = report.write_query_results(tmp_path / "n.html", ["rain"], [[Hit(1, 0.5, "c.wav", None, str(clip))]],
                                       clip_captions={"c.wav": "Rain <falls> on a roof."})
    assert "Rain &lt;falls&gt; on a roof." in named.read_text()  # as the report shows a clip
    clips = report.write_query_results(tmp_path / "a.html", [str(clip)],
                                       [[Hit(1, 0.7, "c.wav", "rain <falls>", str(clip))]],
                                       audio_queries=True, audio="link")
    assert audio_srcs(clips) == ["c.wav"] and "rain &lt;falls&gt;" in clips.read_text()


def test_audio_query_page_marks_the_clips_own_captions_and_names_the_others(tmp_path):
    """As query.py's terminal table: each caption's clip; the query clip's own captions get
    the report's ✓ when the query file is that clip (the same file, not the same name)."""
    split = tmp_path / "data" / "evaluation"
    clip, other = (write_wav(split / name, seconds=0.5, seed=i) for i, name in enumerate(("c.wav", "d.wav")))
    hits = [("rain falls", 0.7, "c.wav", str(clip)), ("wind <blows>", 0.5, "d.wav", str(other)),
            ("a door", 0.3, "gone.wav", None)]
    page = report.write_query_page(tmp_path / "a.html", [report.audio_query_panel(clip, hits)])
    text = page.read_text()
    assert text.count('<li class="correct">') == 1 and '<span class="mark" title="correct">✓' in text
    assert "rain falls<" in text and "of c.wav" not in text
    assert "of d.wav" in text and "of gone.wav" in text and "✓ marks the captions of the query clip" in text
    # a recording of one's own that shares the clip's name is not that clip
    mine = write_wav(tmp_path / "mine" / "c.wav", seconds=0.5, seed=7)
    panel = report.audio_query_panel(mine, hits)
    assert not any(h.correct for h in panel.hits) and panel.hits[0].note == "of c.wav"
    text = report.write_query_page(tmp_path / "b.html", [panel]).read_text()
    assert "✓" not in text


def test_query_py_html_for_text_and_audio_queries(tmp_path, monkeypatch, capsys):
    conf, run_dir = make_run(tmp_path, embed_dim=384,
                             extra={"sbert": {"model": "bundled:all-MiniLM-L6-v2", "device": "cpu"}})
    clips = tmp_path / "data" / "evaluation"
    for i in range(1, 6):  # evaluation_000.wav is missing
        write_wav(clips / f"evaluation_{i:03d}.wav", seconds=0.5, seed=i)

    def query(*args):
        p = run_script("postprocessing/query.py", "--conf", conf, "--run", run_dir, "--top-k", "6",
                       *args, monkeypatch=monkeypatch, capsys=capsys)
        assert p.returncode == 0, p.stderr
        return p

    out = tmp_path / "pages" / "text.html"
    assert f"wrote {out}" in query("--html", out, "a <b>dog</b> barks").stdout
    text = out.read_text()
    assert "a &lt;b&gt;dog&lt;/b&gt; barks" in text and "run tiny-run" in text
    assert "audio file not found (evaluation_000.wav)" in text
    srcs = audio_srcs(out)
    assert len(srcs) == 5 and all((out.parent / unquote(s)).is_file() for s in srcs)

    out = tmp_path / "pages" / "audio.html"
    query("--html", out, "--audio", clips / "evaluation_001.wav")
    text = out.read_text()
    assert audio_srcs(out) == ["audio_audio/query/evaluation_001-" + audio_srcs(out)[0].split("-")[-1]]
    assert "Sound of class" in text and text.count('class="panel"') == 1
    assert re.search(r'<span class="note">of evaluation_00\d\.wav</span>', text)  # whose caption
    query("--html", out, "rain")  # its own earlier page may be replaced

    # --html never replaces what is not a page of ours, and fails before any work
    (tmp_path / "q.txt").write_text("rain\n")
    (tmp_path / "notes.html").write_text("<html>my notes</html>")
    (tmp_path / "a_dir.html").mkdir()
    (run_dir / "report").mkdir()
    (run_dir / "report" / "index.html").write_text(report._page("report", "", ""))  # as 02 writes it
    for args, needle in [
            (["--html", conf, "rain"], "give the page a .html name"),
            (["--html", tmp_path / "q.txt", "--queries", tmp_path / "q.txt"], "give the page a .html name"),
            (["--html", clips / "evaluation_001.wav", "--audio", clips / "evaluation_001.wav"], ".html name"),
            (["--html", tmp_path / "notes.html", "rain"], "is not a page query.py wrote"),
            (["--html", run_dir / "report" / "index.html", "rain"], "is a run's report page"),
            (["--html", tmp_path / "a_dir.html", "rain"], "is a folder"),
            (["--html", clips / "x.html", "--folder", clips, "rain"], "inside the searched folder")]:
        before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
        line = error_line(run_script("postprocessing/query.py", "--conf", conf, "--run", run_dir,
                                     *args, monkeypatch=monkeypatch, capsys=capsys))
        assert needle in line
        assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing written
    assert (tmp_path / "notes.html").read_text() == "<html>my notes</html>"


def test_tracker_calls_and_no_audio_uploaded_in_link_mode(tmp_path):
    class Recorder:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return lambda *args, **kw: self.calls.append((name, args))

    for mode in ("copy", "link"):
        page, samples = build_report(tmp_path / mode, audio=mode)
        rec = Recorder()
        report.log_to_tracker(rec, samples, page, page.images, 3)
        names = [(n, a[0] if isinstance(a[0], str) else sorted(a[0])) for n, a in rec.calls]
        assert names == [("log_table", "retrieval_results_validation"),
                         ("log_audio_table", "listening_validation"),
                         ("log_histogram", "validation/t2a_rank"),
                         ("log_table", "retrieval_results_evaluation"),
                         ("log_audio_table", "listening_evaluation"),
                         ("log_histogram", "evaluation/t2a_rank"),
                         ("log_images", ["evaluation_t2a_rank_histogram",
                                         "validation_t2a_rank_histogram"])]
        _, columns, rows, audio_cols = next(a for n, a in rec.calls if n == "log_audio_table")
        cells = [r[columns.index(c)] for r in rows for c in audio_cols]
        if mode == "copy":
            assert all(c is not None and c.endswith(".opus") and Path(c).is_file() for c in cells)
        else:
            assert cells and all(c is None for c in cells)  # link: no audio copied into wandb


def test_rank_histogram_bars_are_centred_on_their_ranks():
    """Rank 1's bar spans [0.5, 1.5) around tick 1, so the R@1 line (x = 1.5) separates the
    captions found first from the others; each bar is captions per rank of its span."""
    ranks = np.array([1, 1, 1, 2, 5, 6, 40, 300])
    edges, per_rank = plots.rank_histogram(ranks, 500)
    assert edges[0] == 0.5 and edges[-1] == 500.5 and np.all(edges[1:] > edges[:-1])
    assert np.all((edges + 0.5) == np.round(edges + 0.5))  # whole ranks per bar
    first = np.searchsorted(edges, 1.5)
    assert edges[first] == 1.5 and per_rank[0] == 3  # rank 1 alone in the first bar
    assert np.isclose((per_rank * np.diff(edges)).sum(), len(ranks))

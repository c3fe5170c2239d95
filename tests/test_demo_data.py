"""The generated demo dataset: Clotho v2.1 layout, audio format, captions, determinism, script."""
import csv
import hashlib
import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from utils.config import load_config
from utils.demo_data import (ADJECTIVES, CAPTION_HEADER, EVENT_KINDS, MARKER, SAMPLE_RATE, SPLITS,
                             DemoSettings, demo_settings, event_words, generate_dataset, make_clip)
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = DemoSettings(seed=7, sizes={"development": 6, "validation": 3, "evaluation": 3},
                    min_seconds=1.5, max_seconds=2.0)
HOP = int(0.020 * SAMPLE_RATE)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    result = generate_dataset(root, TINY, progress=False)
    assert result.regenerated
    return root


def test_layout_and_captions(tiny):
    for split in SPLITS:
        rows = _read_csv(tiny / f"clotho_captions_{split}.csv")
        assert rows[0] == CAPTION_HEADER == ["file_name", "caption_1", "caption_2", "caption_3",
                                             "caption_4", "caption_5"]
        assert len(rows) - 1 == TINY.sizes[split]
        for row in rows[1:]:
            assert len(row) == 6 and all(c.strip() for c in row[1:])
            assert (tiny / split / row[0]).is_file()  # the wav, under the exact CSV name
        assert len({p.name for p in (tiny / split).iterdir()}) == TINY.sizes[split]
    # the official files end lines with CRLF; so does the csv module
    assert (tiny / "clotho_captions_validation.csv").read_bytes().split(b"\n")[0].endswith(b"\r")


def test_one_leading_space_name_in_development(tiny):
    names = {split: [r[0] for r in _read_csv(tiny / f"clotho_captions_{split}.csv")[1:]] for split in SPLITS}
    spaced = [n for split in SPLITS for n in names[split] if n.startswith(" ")]
    assert spaced == [n for n in names["development"] if n.startswith(" ")] and len(spaced) == 1
    assert (tiny / "development" / spaced[0]).is_file()  # the wav carries the space too


def test_wav_format(tiny):
    for path in sorted(tiny.rglob("*.wav")):
        with wave.open(str(path), "rb") as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2)
            n = w.getnframes()
            pcm = np.frombuffer(w.readframes(n), dtype="<i2")
        assert n / SAMPLE_RATE > 1.3 and 1 + n // HOP >= 64  # CNN14 needs >= 64 log-mel frames
        assert pcm.size == n and np.abs(pcm).max() > 1000  # not silent, not clipped to nothing


def test_log_mel_frames(tiny):
    log_mel = pytest.importorskip("utils.audio_utils").log_mel
    path = next((tiny / "evaluation").glob("*.wav"))
    with wave.open(str(path), "rb") as w:
        y = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    assert log_mel(y, SAMPLE_RATE).shape[0] >= 64


def test_same_seed_same_bytes_and_rerun_is_a_no_op(tiny, tmp_path):
    again = generate_dataset(tmp_path / "again", TINY, progress=False, workers=2)
    assert again.regenerated and _digest(tmp_path / "again") == _digest(tiny)
    before = {p: p.stat().st_mtime_ns for p in tiny.rglob("*") if p.is_file()}
    assert not generate_dataset(tiny, TINY, progress=False).regenerated
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*") if p.is_file()} == before


def test_different_seed_differs(tiny, tmp_path):
    other = DemoSettings(8, TINY.sizes, TINY.min_seconds, TINY.max_seconds)
    generate_dataset(tmp_path, other, progress=False)
    a, b = _digest(tiny), _digest(tmp_path)
    assert a.keys() == b.keys()
    assert all(a[k] != b[k] for k in a if k.endswith(".wav"))


def test_no_two_clips_identical(tiny):
    digests = [hashlib.md5(p.read_bytes()).hexdigest() for p in tiny.rglob("*.wav")]
    assert len(set(digests)) == len(digests)


def test_captions_name_the_events_and_attributes():
    for split in SPLITS:
        for i in range(25):
            scene, _, captions = make_clip(TINY, split, i)
            assert len(captions) == 5 and len(set(captions)) == 5
            for caption in captions:
                words = set(caption.lower().rstrip(".").replace(",", "").split())
                for event in scene.events:
                    assert words & event_words(event.kind), (caption, event)
                    for attr, value in event.attrs.items():
                        assert any(adj in words for adj in ADJECTIVES[(attr, value)]), (caption, attr, value)


def test_order_is_in_the_captions():
    """Two-event sequences: a caption names both events, with an order word."""
    seen = 0
    for i in range(60):
        scene, _, captions = make_clip(TINY, "development", i)
        if len(scene.foreground) == 2:
            seen += 1
            a, b = scene.foreground
            assert a.end <= b.end and a.start < b.start
            for caption in captions:
                assert any(w in caption.lower() for w in ("then", "after", "followed", "stop", "first"))
    assert seen > 5


def test_every_event_kind_occurs():
    kinds = {e.kind for i in range(80) for e in make_clip(TINY, "development", i)[0].events}
    assert kinds == set(EVENT_KINDS)


def test_bad_settings_are_user_errors():
    cfg = load_config(REPO / "conf.yaml")
    assert demo_settings(cfg).sizes["development"] > 0
    cfg["demo"]["min_seconds"] = 1.0
    with pytest.raises(UserError, match="demo.min_seconds"):
        demo_settings(cfg)
    # the config schema refuses these already when the config is loaded (utils/config_schema.py)
    with pytest.raises(UserError, match="demo.sizes.validation"):
        demo_settings(load_config(REPO / "conf.yaml", ["demo.sizes.validation=0"]))
    with pytest.raises(UserError, match="demo.max_seconds"):
        demo_settings(load_config(REPO / "conf.yaml", ["demo.max_seconds=2.0"]))


def test_refuses_to_overwrite_real_clotho(tmp_path):
    (tmp_path / "clotho_captions_development.csv").write_text(",".join(CAPTION_HEADER) + "\n")
    (tmp_path / "audio_info.pkl").write_text("not ours")
    with pytest.raises(UserError, match="not written by the demo generator"):
        generate_dataset(tmp_path, TINY, progress=False)
    assert (tmp_path / "audio_info.pkl").exists() and not (tmp_path / MARKER).exists()


def test_regeneration_removes_stale_clips_and_derived_files(tmp_path):
    bigger = DemoSettings(TINY.seed, {"development": 9, "validation": 3, "evaluation": 3}, 1.5, 2.0)
    generate_dataset(tmp_path, bigger, progress=False)
    (tmp_path / "development_text.csv").write_text("stale")
    (tmp_path / "evaluation_audio_logmels.hdf5").write_text("stale")
    (tmp_path / "validation_audio_logmels.parts").mkdir()
    (tmp_path / "validation_audio_logmels.parts" / "shard-0.hdf5").write_text("stale")
    result = generate_dataset(tmp_path, TINY, progress=False)
    assert result.regenerated and len(result.removed) >= 5
    assert len(list((tmp_path / "development").glob("*.wav"))) == 6
    assert not (tmp_path / "development_text.csv").exists()
    assert not (tmp_path / "evaluation_audio_logmels.hdf5").exists()
    assert not (tmp_path / "validation_audio_logmels.parts").exists()


def test_interrupted_generation_is_redone(tiny, tmp_path):
    generate_dataset(tmp_path, TINY, progress=False)
    marker = json.loads((tmp_path / MARKER).read_text())
    (tmp_path / MARKER).write_text(json.dumps({**marker, "complete": False}))  # as if killed midway
    next((tmp_path / "validation").glob("*.wav")).write_bytes(b"RIFF")
    assert generate_dataset(tmp_path, TINY, progress=False).regenerated
    assert _digest(tmp_path) == _digest(tiny)


def test_script(tmp_path):
    out = tmp_path / "data"
    cmd = [sys.executable, "preprocessing/00_make_demo_dataset.py", "--set", f"paths.dataset_dir={out}",
           "demo.sizes.development=4", "demo.sizes.validation=2", "demo.sizes.evaluation=2",
           "demo.min_seconds=1.5", "demo.max_seconds=1.6"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "development" in proc.stdout
    saved = load_config(out / "config.00_make_demo_dataset.yaml")
    assert saved["paths"]["dataset_dir"] == str(out) and saved["demo"]["sizes"]["development"] == 4
    assert len(_read_csv(out / "clotho_captions_development.csv")) == 5
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "already complete" in proc.stdout


def test_script_bad_setting_is_one_line(tmp_path):
    cmd = [sys.executable, "preprocessing/00_make_demo_dataset.py", "--set",
           f"paths.dataset_dir={tmp_path}", "demo.min_seconds=0.5"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "demo.min_seconds" in proc.stderr


def test_pool_workers_die_on_sigterm_and_leave_ctrl_c_to_the_parent():
    """Forked workers must not inherit utils.cli's SIGTERM handler: it raised Terminated inside
    them when the pool was stopped (a traceback each, and at times a worker left waiting on the
    queue lock forever). The pool is closed, not terminated, once every clip is back."""
    import multiprocessing
    import signal

    from utils import cli, demo_data

    previous = signal.signal(signal.SIGTERM, cli._terminate)  # as utils.cli.run installs it
    try:
        with multiprocessing.get_context("fork").Pool(1, demo_data._init_worker) as pool:
            term, intr = pool.map(signal.getsignal, [signal.SIGTERM, signal.SIGINT])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert term == signal.SIG_DFL and intr == signal.SIG_IGN

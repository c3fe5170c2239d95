"""Step 01 (utils.clotho, preprocessing/01_clotho_dataset.py): captions + wavs -> index files."""
import csv
import shutil
import subprocess
import sys
import uuid

import pytest
import yaml

from utils.clotho import (NAMESPACE, TEXT_COLUMNS, clean_caption, make_fid, make_tid, prepare_clotho,
                          read_skipped)
from utils.errors import UserError
from utils.io_utils import load_pickle
from wav_fixtures import (copy_many, make_clotho, write_captions_csv, write_header_only,
                          write_text_as_wav, write_truncated, write_wav, write_zero_length)

SPLITS = ["development", "validation", "evaluation"]
CAPS = ["one", "two", "three", "four", "five"]


def run_step(repo, dataset_dir, *overrides):
    cmd = [sys.executable, "preprocessing/01_clotho_dataset.py", "--conf", str(repo / "conf.yaml"),
           "--set", f"paths.dataset_dir={dataset_dir}", *overrides]
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)


def read_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def one_split(tmp_path, rows, split="development"):
    write_captions_csv(tmp_path / f"clotho_captions_{split}.csv", rows)
    (tmp_path / split).mkdir(exist_ok=True)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# Caption cleaning and ids

@pytest.mark.parametrize("raw, text", [
    ("A dog barks, then echos.", "a dog barks then echoes"),
    ("A person tries to fix the the dripping faucet.", "a person tries to fix the dripping faucet"),
    ("A a wind up is wound faster", "a wind up is wound faster"),
    ("raised by a device to to the top", "raised by a device to the top"),
    ("about to sit on on it", "about to sit on it"),
    ("and then then hammers", "and then hammers"),
    ("The clock is going tick tick throughout.", "the clock is going tick tick throughout"),
    ("The beep, beep, beep of a microwave", "the beep beep beep of a microwave"),
    ("Rain   rain  go away;  colour of the neighbour's  harbour", "rain rain go away colour of the neighbours harbour"),
    ("  back-and-forth: \"quoted\" words!  ", "back and forth quoted words"),
    ("The dog's bark", "the dogs bark"),
])
def test_clean_caption(raw, text):
    assert clean_caption(raw) == text


def test_ids_are_uuid5_of_split_name_and_caption_number():
    fid = make_fid("development", " Ambience Birds.wav")
    assert fid == uuid.uuid5(NAMESPACE, "development/ Ambience Birds.wav").hex
    assert make_tid(fid, 3) == uuid.uuid5(NAMESPACE, f"{fid}/3").hex
    assert make_fid("development", "a.wav") != make_fid("validation", "a.wav")
    assert NAMESPACE == uuid.UUID("faed236c-0068-4bd6-b018-18d0c821f08f")  # changing it changes every id


# ---------------------------------------------------------------------------------------------
# The official captions

def test_official_captions(repo, shared_captions, tmp_path):
    """Stand-in wavs for every row of the official CSVs; the three leading-space names are
    extracted without their space, as some tools do."""
    src = write_wav(tmp_path / "src.wav", seconds=0.05)
    raw = {}
    for split in SPLITS:
        shutil.copy(shared_captions / f"clotho_captions_{split}.csv", tmp_path)
        with open(tmp_path / f"clotho_captions_{split}.csv", encoding="utf-8", newline="") as f:
            raw[split] = {r["file_name"]: [r[f"caption_{i}"] for i in range(1, 6)] for r in csv.DictReader(f)}
        (tmp_path / split).mkdir()
        copy_many(src, [tmp_path / split / name.lstrip(" ") for name in raw[split]])
    leading = {s: [n for n in raw[s] if n.startswith(" ")] for s in SPLITS}
    assert [len(leading[s]) for s in SPLITS] == [2, 1, 0]
    for s in SPLITS:
        for n in leading[s]:
            assert not (tmp_path / s / n).exists() and (tmp_path / s / n.lstrip(" ")).exists()

    proc = run_step(repo, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "development: 3839 clips, 19195 captions" in proc.stdout
    assert "validation: 1045 clips, 5225 captions" in proc.stdout
    assert "evaluation: 1045 clips, 5225 captions" in proc.stdout

    info = load_pickle(tmp_path / "audio_info.pkl")
    vocab = load_pickle(tmp_path / "vocab_info.pkl")
    expected = {"development": (3839, 19195), "validation": (1045, 5225), "evaluation": (1045, 5225)}
    for split, (clips, captions) in expected.items():
        fid2fname = info["audio_fid2fname"][split]
        assert len(fid2fname) == clips and len(info["audio_durations"][split]) == clips
        assert list(fid2fname.values()) == list(raw[split])  # CSV names, leading spaces kept, CSV order
        assert all(d == pytest.approx(0.05) for d in info["audio_durations"][split])
        assert vocab["split_info"][split] == {"clips": clips, "captions": captions}
        rows = read_csv(tmp_path / f"{split}_text.csv")
        assert list(rows[0]) == TEXT_COLUMNS and len(rows) == captions
        assert len({r["tid"] for r in rows}) == captions
        for r in rows:
            assert fid2fname[r["fid"]] == r["fname"]
            assert r["raw_text"] in raw[split][r["fname"]]
            text = r["text"]
            assert "echos" not in text.split() and "  " not in text and text == text.strip()
            for w in ("a", "the", "to", "on"):
                assert f" {w} {w} " not in f" {text} "
            assert r["tokens"] == text and text == text.lower()
        assert [r["raw_text"] for r in rows] == [c for caps in raw[split].values() for c in caps]
    assert vocab["vocabulary"] == sorted(vocab["vocabulary"])
    assert set(vocab["vocabulary"]) == set().union(*vocab["word_bags"].values())
    text = {r["raw_text"]: r["text"] for r in read_csv(tmp_path / "development_text.csv")}
    assert any("tick tick" in t for t in text.values())  # onomatopoeia kept
    assert (tmp_path / "config.01_clotho_dataset.yaml").is_file()



# ---------------------------------------------------------------------------------------------
# Small datasets

def test_small_dataset_and_csv_quoting(tmp_path):
    rows = {"a, b.wav": ['He said "hello", then left.', "It's the dog's bone.", "x,y", "comma, inside", "e"],
            " lead.wav": CAPS}
    one_split(tmp_path, rows)
    write_wav(tmp_path / "development" / "a, b.wav", seconds=0.25, sr=22050)
    write_wav(tmp_path / "development" / "lead.wav", seconds=0.5, sr=48000)
    write_wav(tmp_path / "development" / "extra.wav", seconds=0.1)  # no caption row
    [s] = prepare_clotho(tmp_path, ["development"])
    assert (s.clips, s.captions, s.space_stripped, s.uncaptioned) == (2, 10, 1, 1)
    out = read_csv(tmp_path / "development_text.csv")
    assert [r["raw_text"] for r in out[:5]] == rows["a, b.wav"]
    assert out[0]["text"] == "he said hello then left" and out[1]["text"] == "its the dogs bone"
    info = load_pickle(tmp_path / "audio_info.pkl")
    assert list(info["audio_fid2fname"]["development"].values()) == ["a, b.wav", " lead.wav"]
    assert info["audio_durations"]["development"] == pytest.approx([0.25, 0.5], abs=1e-4)
    assert not (tmp_path / "development_skipped_audio.csv").exists()
    # deterministic: a second run gives byte-identical outputs
    outputs = ("development_text.csv", "audio_info.pkl", "vocab_info.pkl")
    before = {p: (tmp_path / p).read_bytes() for p in outputs}
    prepare_clotho(tmp_path, ["development"])
    assert all((tmp_path / p).read_bytes() == b for p, b in before.items())


def test_uncaptioned_wavs_are_counted_and_printed(repo, tmp_path):
    make_clotho(tmp_path, {"development": 2}, seconds=0.05)
    write_wav(tmp_path / "development" / "stray.wav", seconds=0.05)
    proc = run_step(repo, tmp_path, "data.splits=[development]")
    assert proc.returncode == 0, proc.stderr
    assert "development: 2 clips, 10 captions" in proc.stdout and "1 wav(s)" in proc.stdout


def test_bad_audio_stops_with_one_line_listing_every_file(repo, tmp_path):
    make_clotho(tmp_path, {"development": 2, "validation": 1}, seconds=0.05)
    rows = {f"development_clip_{i:03d}.wav": CAPS for i in range(2)}
    rows.update({n: CAPS for n in ("gone.wav", "empty.wav", "cut.wav", "text.wav", "head.wav")})
    write_captions_csv(tmp_path / "clotho_captions_development.csv", rows)
    d = tmp_path / "development"
    write_zero_length(d / "empty.wav")
    write_truncated(d / "cut.wav")
    write_text_as_wav(d / "text.wav")
    write_header_only(d / "head.wav")
    (tmp_path / "validation" / "validation_clip_000.wav").unlink()
    proc = run_step(repo, tmp_path, "data.splits=[development, validation]")
    assert proc.returncode == 2
    [err] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]  # besides tqdm
    assert "Traceback" not in proc.stderr
    assert "development: 5 unusable audio files (missing: gone.wav; empty: empty.wav; " \
           "unreadable: cut.wav, text.wav, head.wav)" in err
    assert "validation: 1 unusable audio file (missing: validation_clip_000.wav)" in err
    assert "data.skip_bad_audio: true" in err
    assert not (tmp_path / "audio_info.pkl").exists()  # nothing written


@pytest.mark.parametrize("maker, reason", [
    (lambda p: None, "missing"),
    (write_zero_length, "empty"),
    (lambda p: p.write_bytes(b""), "empty"),  # 0 bytes: not "unreadable", as libsndfile has it
    (write_truncated, "unreadable"),
    (write_text_as_wav, "unreadable"),
    (write_header_only, "unreadable"),
])
def test_each_bad_audio_kind(tmp_path, maker, reason):
    one_split(tmp_path, {"good.wav": CAPS, "bad.wav": CAPS})
    write_wav(tmp_path / "development" / "good.wav", seconds=0.05)
    maker(tmp_path / "development" / "bad.wav")
    with pytest.raises(UserError, match=rf"1 unusable audio file \({reason}: bad.wav\)"):
        prepare_clotho(tmp_path, ["development"])
    [s] = prepare_clotho(tmp_path, ["development"], skip_bad_audio=True)
    assert (s.clips, s.captions) == (1, 5)
    skipped = read_skipped(tmp_path / "development_skipped_audio.csv")
    assert [(f, step) for f, _, step in skipped] == [("bad.wav", "01")] and skipped[0][1].startswith(reason)
    assert list(load_pickle(tmp_path / "audio_info.pkl")["audio_fid2fname"]["development"].values()) == ["good.wav"]
    assert {r["fname"] for r in read_csv(tmp_path / "development_text.csv")} == {"good.wav"}


def test_a_name_with_invisible_whitespace_is_quoted_in_the_message():
    from utils.clotho import format_bad_audio

    message = format_bad_audio("evaluation", [("clip 1.wav ", "missing"), ("a\nb.wav", "missing"),
                                              ("ok.wav", "missing")])
    assert "(missing: 'clip 1.wav ', 'a\\nb.wav', ok.wav)" in message


def test_skip_bad_audio_cli_reports_count_and_file(repo, tmp_path):
    make_clotho(tmp_path, {"development": 2}, seconds=0.05)
    (tmp_path / "development" / "development_clip_001.wav").unlink()
    proc = run_step(repo, tmp_path, "data.splits=[development]", "data.skip_bad_audio=true")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 unusable audio file(s)" in proc.stdout and "development_skipped_audio.csv" in proc.stdout
    with open(tmp_path / "development_skipped_audio.csv", encoding="utf-8") as f:
        assert f.read().splitlines() == ["fname,reason,step", "development_clip_001.wav,missing,01"]
    # once the file is back, a rerun removes the stale report
    write_wav(tmp_path / "development" / "development_clip_001.wav", seconds=0.05)
    assert run_step(repo, tmp_path, "data.splits=[development]", "data.skip_bad_audio=true").returncode == 0
    assert not (tmp_path / "development_skipped_audio.csv").exists()


# ---------------------------------------------------------------------------------------------
# Bad captions files and config

def expect_user_error(repo, tmp_path, *needles):
    proc = run_step(repo, tmp_path, "data.splits=[development]")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in err, err
    return err


def test_wrong_header(repo, tmp_path):
    header = ["file", "caption_1", "caption_2", "caption_3", "caption_4", "caption_5"]
    write_captions_csv(tmp_path / "clotho_captions_development.csv", {"a.wav": CAPS}, header=header)
    expect_user_error(repo, tmp_path, "clotho_captions_development.csv", "missing column(s) file_name")


def test_missing_column(repo, tmp_path):
    path = tmp_path / "clotho_captions_development.csv"
    path.write_text("file_name,caption_1,caption_2,caption_3,caption_4\na.wav,1,2,3,4\n", encoding="utf-8")
    expect_user_error(repo, tmp_path, "clotho_captions_development.csv", "caption_5")


def test_not_utf8(repo, tmp_path):
    path = tmp_path / "clotho_captions_development.csv"
    path.write_bytes(b"file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
                     b"a.wav,one,two,three,four,five\nb.wav,caf\xe9 noise,two,three,four,five\n")
    expect_user_error(repo, tmp_path, "clotho_captions_development.csv", "line 3", "UTF-8")


def test_empty_caption(repo, tmp_path):
    write_captions_csv(tmp_path / "clotho_captions_development.csv",
                       {"a.wav": CAPS, "b.wav": ["one", "two", "  ", "four", "five"]})
    expect_user_error(repo, tmp_path, "clotho_captions_development.csv", "line 3", "caption_3 is empty")


def test_missing_captions_file(repo, tmp_path):
    expect_user_error(repo, tmp_path, "clotho_captions_development.csv", "not found")


def test_missing_clotho_split_suggests_step_00(tmp_path):
    make_clotho(tmp_path, {"development": 1}, seconds=0.05)
    with pytest.raises(UserError, match="clotho_captions_evaluation.csv: captions file not found") as e:
        prepare_clotho(tmp_path, ["development", "evaluation"])
    assert "00_download_clotho.py" in str(e.value)


def test_a_split_name_of_ones_own_lists_the_csvs_there_and_the_advice_works(tmp_path):
    """`Train` for `train`: step 00 would download 7 GB of Clotho and still make no `Train`
    split; the message names the splits whose CSVs are there, and naming them works."""
    make_clotho(tmp_path, {"train": 2, "val": 1}, seconds=0.05)
    with pytest.raises(UserError) as e:
        prepare_clotho(tmp_path, ["Train", "val"])
    message = str(e.value)
    assert "clotho_captions_Train.csv: captions file not found for split 'Train'" in message
    assert "split(s) train, val" in message and "data.splits" in message
    assert "00_download" not in message
    assert [s.clips for s in prepare_clotho(tmp_path, ["train", "val"])] == [2, 1]
    (tmp_path / "clotho_captions_.csv").write_text("")  # a stray file that names no split
    with pytest.raises(UserError, match=r"for split\(s\) train, val — name one"):
        prepare_clotho(tmp_path, ["Train"])


def test_a_split_name_of_ones_own_without_any_csv_names_the_folder(tmp_path):
    with pytest.raises(UserError, match=r"holds no clotho_captions_\*\.csv — check paths\.dataset_dir") as e:
        prepare_clotho(tmp_path, ["train"])
    assert "00_download" not in str(e.value)


@pytest.mark.parametrize("captions", [1, 3])
def test_fewer_than_five_caption_columns_say_five_are_needed(tmp_path, captions):
    header = ["file_name"] + [f"caption_{i}" for i in range(1, captions + 1)]
    write_captions_csv(tmp_path / "clotho_captions_development.csv", {"a.wav": CAPS[:captions]}, header=header)
    (tmp_path / "development").mkdir()
    with pytest.raises(UserError, match="missing column.*caption_5.*exactly five captions") as e:
        prepare_clotho(tmp_path, ["development"])
    assert "no other column" in str(e.value)


def test_a_row_with_fewer_captions_says_five_are_needed(tmp_path):
    path = tmp_path / "clotho_captions_development.csv"
    path.write_text("file_name,caption_1,caption_2,caption_3,caption_4,caption_5\na.wav,one,two,three\n",
                    encoding="utf-8")
    with pytest.raises(UserError, match="line 2: 4 fields, expected 6 — every clip needs exactly five"):
        prepare_clotho(tmp_path, ["development"])
    write_captions_csv(path, {"a.wav": ["one", "two", "three", "", ""]})
    with pytest.raises(UserError, match="caption_4 is empty — every clip needs exactly five captions"):
        prepare_clotho(tmp_path, ["development"])
    path.write_text("file_name,caption_1,caption_2,caption_3,caption_4,caption_5\na.wav,one, two,3,4,5,6\n",
                    encoding="utf-8")  # more fields: an unquoted comma, not a sixth caption
    with pytest.raises(UserError, match="line 2: 7 fields, expected 6 — a caption holding a comma must be"):
        prepare_clotho(tmp_path, ["development"])


def test_missing_split_folder(repo, tmp_path):
    write_captions_csv(tmp_path / "clotho_captions_development.csv", {"a.wav": CAPS})
    expect_user_error(repo, tmp_path, "development", "audio folder")


def test_missing_dataset_dir(repo, tmp_path):
    proc = run_step(repo, tmp_path / "nowhere")
    assert proc.returncode == 2 and "paths.dataset_dir" in proc.stderr and "Traceback" not in proc.stderr


def test_config_is_saved(repo, tmp_path):
    make_clotho(tmp_path, {"development": 1}, seconds=0.05)
    assert run_step(repo, tmp_path, "data.splits=[development]").returncode == 0
    saved = yaml.safe_load((tmp_path / "config.01_clotho_dataset.yaml").read_text(encoding="utf-8"))
    assert saved["data"]["splits"] == ["development"] and saved["paths"]["dataset_dir"] == str(tmp_path)

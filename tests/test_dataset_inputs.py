"""Step 01 inputs: caption file names that point outside their split's folder, names that differ
only by leading spaces, and the aac-datasets Clotho layout."""
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from tests.cli_helpers import error_line
from utils.clotho import find_layout, make_fid, prepare_clotho, resolve_wav, split_paths
from utils.errors import UserError
from utils.features import logmel_path
from utils.io_utils import load_pickle
from wav_fixtures import make_clotho, write_captions_csv, write_wav

REPO = Path(__file__).resolve().parents[1]
CAPS = ["one", "two", "three", "four", "five"]


def run_step(step, dataset_dir, *overrides):
    script = {"01": "preprocessing/01_clotho_dataset.py", "02": "preprocessing/02_audio_logmel.py"}[step]
    cmd = [sys.executable, script, "--conf", str(REPO / "conf.yaml"),
           "--set", f"paths.dataset_dir={dataset_dir}", "data.splits=[development]", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------
# file_name must name a file directly inside the split's folder

BAD_NAMES = ["../validation/x.wav", "../x.wav", "sub/x.wav", "/etc/hostname", "..", " ..", ".",
             "a\\b.wav", "..\\x.wav", "a\0b.wav"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_file_name_outside_the_split_folder_is_one_line_naming_the_csv_line(tmp_path, name):
    root = tmp_path / "clotho"
    make_clotho(root, {"development": 2, "validation": 1}, seconds=0.05)
    rows = {f"development_clip_{i:03d}.wav": CAPS for i in range(2)}
    rows[name] = CAPS  # line 4
    write_captions_csv(root / "clotho_captions_development.csv", rows)
    line = error_line(run_step("01", root))
    assert "clotho_captions_development.csv: line 4: file_name" in line
    assert "directly inside the split's audio folder" in line
    assert not (root / "audio_info.pkl").exists()


def test_the_message_does_not_tell_whether_a_file_outside_exists(tmp_path):
    """The same words whether or not the named file exists outside the split's folder."""
    messages = []
    for exists in (True, False):
        root = tmp_path / f"clotho_{exists}"
        make_clotho(root, {"development": 1, "validation": 1}, seconds=0.05)
        rows = {"development_clip_000.wav": CAPS, "../validation/validation_clip_000.wav": CAPS,
                "../secret.wav": CAPS}
        write_captions_csv(root / "clotho_captions_development.csv", rows)
        if exists:
            write_wav(root / "secret.wav", seconds=0.05)
        else:
            (root / "validation" / "validation_clip_000.wav").unlink()
        with pytest.raises(UserError) as e:
            prepare_clotho(root, ["development"], skip_bad_audio=True)
        messages.append(str(e.value).replace(str(root), "ROOT"))
    assert messages[0] == messages[1] and "line 3" in messages[0]


def test_resolve_wav_refuses_a_path_from_a_crafted_index(tmp_path):
    """audio_info.pkl written by an older or edited step 01 cannot lead step 02 outside either."""
    write_wav(tmp_path / "outside.wav", seconds=0.05)
    (tmp_path / "development").mkdir()
    with pytest.raises(UserError, match="not a file directly inside"):
        resolve_wav(tmp_path / "development", "../outside.wav")
    root = tmp_path / "clotho"
    make_clotho(root, {"development": 1}, seconds=0.05)
    prepare_clotho(root, ["development"])
    info = load_pickle(root / "audio_info.pkl")
    info["audio_fid2fname"]["development"]["f" * 32] = "../../outside.wav"
    info["audio_durations"]["development"].append(0.05)
    (root / "audio_info.pkl").write_bytes(pickle.dumps(info))
    line = error_line(run_step("02", root))
    assert "'../../outside.wav'" in line and "rerun preprocessing/01_clotho_dataset.py" in line
    assert not logmel_path(root, "development").exists()


def test_names_with_a_leading_space_still_match_their_wav(tmp_path):
    root = tmp_path / "clotho"
    write_captions_csv(root / "clotho_captions_development.csv", {" lead.wav": CAPS, "plain.wav": CAPS})
    write_wav(root / "development" / "lead.wav", seconds=0.05)  # extracted without the space
    write_wav(root / "development" / "plain.wav", seconds=0.05)
    [s] = prepare_clotho(root, ["development"])
    assert (s.clips, s.space_stripped) == (2, 1)
    assert list(load_pickle(root / "audio_info.pkl")["audio_fid2fname"]["development"].values()) == \
        [" lead.wav", "plain.wav"]


# ---------------------------------------------------------------------------------------------
# Two names that differ only by leading spaces

@pytest.mark.parametrize("on_disk", [["x.wav"], ["x.wav", " x.wav"]])
def test_names_differing_only_by_leading_spaces_are_one_line_naming_both_lines(tmp_path, on_disk):
    root = tmp_path / "clotho"
    for name in on_disk:
        write_wav(root / "development" / name, seconds=0.05)
    write_wav(root / "development" / "other.wav", seconds=0.05)
    write_captions_csv(root / "clotho_captions_development.csv",
                       {"x.wav": CAPS, "other.wav": CAPS, " x.wav": CAPS})
    line = error_line(run_step("01", root, "data.skip_bad_audio=true"))
    assert "clotho_captions_development.csv: lines 2 and 4" in line
    assert "'x.wav' and ' x.wav' differ only by leading spaces" in line
    assert not (root / "audio_info.pkl").exists()


# ---------------------------------------------------------------------------------------------
# The aac-datasets layout

def aac_datasets_folder(root: Path, clips: int = 2) -> Path:
    """Clotho as aac-datasets writes it: CLOTHO_v2.1/clotho_csv_files/, clotho_audio_files/{split}/."""
    base = root / "CLOTHO_v2.1"
    rows = make_clotho(base / "clotho_audio_files", {"development": clips}, seconds=0.1)
    csv_dir = base / "clotho_csv_files"
    csv_dir.mkdir(parents=True)
    (base / "clotho_audio_files" / "clotho_captions_development.csv").rename(
        csv_dir / "clotho_captions_development.csv")
    (base / "archives").mkdir()
    return rows["development"]


@pytest.mark.parametrize("point_at", ["root", "CLOTHO_v2.1"])
def test_aac_datasets_layout_is_found_by_steps_01_and_02(tmp_path, point_at):
    root = tmp_path / "aac"
    rows = aac_datasets_folder(root)
    dataset_dir = root if point_at == "root" else root / "CLOTHO_v2.1"
    layout = find_layout(dataset_dir)
    assert layout.name == "aac-datasets"
    assert split_paths(dataset_dir, "development") == (
        root / "CLOTHO_v2.1/clotho_csv_files/clotho_captions_development.csv",
        root / "CLOTHO_v2.1/clotho_audio_files/development")
    feats = tmp_path / "features"
    proc = run_step("01", dataset_dir, f"paths.features_dir={feats}")
    assert proc.returncode == 0, proc.stderr
    assert "found the aac-datasets layout" in proc.stdout and "development: 2 clips, 10 captions" in proc.stdout
    proc = run_step("02", dataset_dir, f"paths.features_dir={feats}")
    assert proc.returncode == 0, proc.stderr
    with h5py.File(logmel_path(feats, "development"), "r") as f:
        assert set(f) == {make_fid("development", n) for n in rows}


def test_zenodo_layout_is_named_too(tmp_path):
    make_clotho(tmp_path, {"development": 1}, seconds=0.05)
    assert find_layout(tmp_path).name == "Zenodo"
    proc = run_step("01", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "found the Zenodo layout" in proc.stdout


def test_neither_layout_names_both(tmp_path):
    line = error_line(run_step("01", tmp_path))
    assert "clotho_captions_development.csv: captions file not found" in line
    assert "aac-datasets" in line and "CLOTHO_v2.1" in line


def test_find_wav_in_either_layout(tmp_path):
    from utils.clotho import find_wav

    rows = aac_datasets_folder(tmp_path / "aac")
    name = next(iter(rows))
    assert find_wav(tmp_path / "aac", "development", name) == \
        tmp_path / "aac/CLOTHO_v2.1/clotho_audio_files/development" / name
    write_wav(tmp_path / "zen" / "development" / "lead.wav", seconds=0.05)
    write_captions_csv(tmp_path / "zen" / "clotho_captions_development.csv", {" lead.wav": CAPS})
    assert find_wav(tmp_path / "zen", "development", " lead.wav") == tmp_path / "zen/development/lead.wav"
    assert find_wav(tmp_path / "zen", "development", "gone.wav") is None

"""paths.features_dir: steps 01–03 write outside a read-only dataset folder, later steps read there."""
import os
import stat
import subprocess
import sys
from pathlib import Path

from utils import data_utils
from utils.clotho import features_dir
from utils.config import load_config
from wav_fixtures import make_clotho

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("development", "validation", "evaluation")


def run_script(script, *overrides):
    cmd = [sys.executable, script, "--conf", str(REPO / "conf.yaml"), "--set", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def snapshot(folder: Path) -> dict:
    """Every path under `folder` with its size and mtime (what a write would change)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            st = os.lstat(Path(root) / name)
            out[str(Path(root, name).relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return out


def make_read_only(folder: Path) -> bool:
    """chmod a-w everything under `folder`; True if writes now really fail (not as root)."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files + dirs:
            path = Path(root) / name
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    folder.chmod(folder.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    probe = folder / ".write-probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return True
    probe.unlink()
    return False


def make_writable(folder: Path) -> None:
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            (Path(root) / name).chmod(0o755)
    folder.chmod(0o755)


def test_features_dir_defaults_to_dataset_dir():
    cfg = load_config(REPO / "conf.yaml", ["paths.dataset_dir=/data/clotho"])
    assert features_dir(cfg) == Path("/data/clotho") == data_utils.features_dir(cfg)
    cfg = load_config(REPO / "conf.yaml", ["paths.dataset_dir=/data/clotho", "paths.features_dir=/scratch/f"])
    assert features_dir(cfg) == Path("/scratch/f")


def test_read_only_dataset_folder_works_with_features_dir(tmp_path):
    dataset, feats = tmp_path / "clotho", tmp_path / "features"
    make_clotho(dataset, {s: 2 for s in SPLITS}, seconds=0.2)
    really_read_only = make_read_only(dataset)
    assert really_read_only or os.geteuid() == 0  # only root writes through chmod
    before = snapshot(dataset)
    paths = [f"paths.dataset_dir={dataset}", f"paths.features_dir={feats}"]
    try:
        for script, extra in (("preprocessing/01_clotho_dataset.py", []),
                              ("preprocessing/02_audio_logmel.py", ["features.workers=1"]),
                              ("preprocessing/03_sbert_embeddings.py",
                               ["sbert.model=bundled:all-MiniLM-L6-v2", "sbert.device=cpu"])):
            proc = run_script(script, *paths, *extra)
            assert proc.returncode == 0, proc.stderr
            assert str(feats) in proc.stdout
        assert snapshot(dataset) == before  # nothing written into the dataset folder
    finally:
        make_writable(dataset)
    for name in ("audio_info.pkl", "vocab_info.pkl", "sbert_embeds.pkl", "config.01_clotho_dataset.yaml",
                 "config.02_audio_logmel.yaml", "config.03_sbert_embeddings.yaml",
                 *(f"{s}_text.csv" for s in SPLITS), *(f"{s}_audio_logmels.hdf5" for s in SPLITS)):
        assert (feats / name).is_file(), name
    # the readers of training and evaluation find everything through the same key
    cfg = load_config(REPO / "conf.yaml", paths)
    _, tid2row = data_utils.load_text_table(features_dir(cfg))
    ds = data_utils.CaptionDataset(features_dir(cfg), "development", tid2row)
    assert len(ds) == 10 and ds[0][0].shape[1] == 64
    ds.close()


LOG_MEL_AND_NUMBA_DIR = ("import os, numpy as np; from utils.audio_utils import log_mel; "
                         "log_mel(np.zeros(4410, np.float32), 44100); "
                         "print(os.environ.get('NUMBA_CACHE_DIR'))")


def test_log_mel_without_a_writable_home_caches_numba_in_the_temp_folder(tmp_path):
    """HOME missing or read-only (a cluster node, a container): librosa's numba functions
    (cache=True) found no cache folder in a venv the user cannot write, and step 02, query.py
    --audio/--folder and the API's embed_audio failed with numba's 'no locator available'.
    As root the venv is writable, so this checks where the cache is put instead."""
    not_a_folder = tmp_path / "home"
    not_a_folder.write_text("a file, so ~/.cache cannot be created even by root")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(not_a_folder), TMPDIR=str(tmp_path), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", LOG_MEL_AND_NUMBA_DIR], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / f"numba-cache-{os.getuid()}")

    env["HOME"] = str(tmp_path / "writable_home")  # a usable ~/.cache: numba's own choice stays
    out = subprocess.run([sys.executable, "-c", LOG_MEL_AND_NUMBA_DIR], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"


def test_log_mel_without_any_home_caches_numba_in_the_temp_folder(tmp_path):
    """No HOME and a user id that /etc/passwd lacks (`docker run --user N`): Path.home() raised
    RuntimeError ("Could not determine home directory") out of log_mel."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME", "HOME")}
    env.update(TMPDIR=str(tmp_path), PYTHONPATH=str(REPO))
    code = ("import pathlib\n"
            "def no_home(): raise RuntimeError('Could not determine home directory.')\n"
            "pathlib.Path.home = staticmethod(no_home)\n" + LOG_MEL_AND_NUMBA_DIR)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / f"numba-cache-{os.getuid()}")


def test_numbas_temp_cache_is_a_folder_only_this_user_can_write(tmp_path, monkeypatch):
    """numba loads its cache files as pickles: a folder of the predictable name that others can
    write to (made first by another user of a shared /tmp) is not used."""
    from utils import audio_utils

    monkeypatch.setattr(audio_utils.tempfile, "tempdir", str(tmp_path))
    name = f"numba-cache-{os.getuid()}"
    assert audio_utils._private_temp_dir(name) == tmp_path / name  # made ours
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) & 0o077 == 0
    os.chmod(tmp_path / name, 0o777)  # as if planted, writable by all
    other = audio_utils._private_temp_dir(name)
    assert other != tmp_path / name and other.parent == tmp_path and other.name.startswith(name)

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

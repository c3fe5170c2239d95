"""Step 00 against a local HTTP server: verification, resume, extraction, reruns, errors."""
from __future__ import annotations

import hashlib
import io
import socket
import subprocess
import sys
import threading
import wave
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import py7zr
import pytest
import yaml

from utils.config import load_config
from utils.download import download_all, file_url
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "preprocessing/00_download_clotho.py"
PANNS = "Cnn14_mAP=0.431.pth"
BASE = yaml.safe_load((REPO / "conf.yaml").read_text(encoding="utf-8"))
SPLITS = ("development", "validation", "evaluation")


class _Handler(SimpleHTTPRequestHandler):
    """Serves a folder with Range support; can cut one response midway and counts requests."""

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        path = Path(self.translate_path(self.path))
        srv.requests.append((self.path, self.headers.get("Range")))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and srv.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if path.name in srv.cut_once:  # simulate a dropped connection: half the body, then close
            srv.cut_once.discard(path.name)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class _Server:
    def __init__(self, root: Path):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
        self.httpd.requests = []
        self.httpd.cut_once = set()
        self.httpd.ranges = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list:
        return self.httpd.requests

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _wav_bytes(seed: int, n: int = 4000) -> bytes:
    """A tiny 8 kHz mono wav of seeded noise (incompressible, so archives are not tiny)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.random.default_rng(seed).integers(-3000, 3000, n, dtype=np.int16).tobytes())
    return buf.getvalue()


def _make_archive(path: Path, split: str, under_split: bool) -> None:
    with py7zr.SevenZipFile(path, "w") as z:
        for i in range(2):
            arcname = f"{split}/clip_{i}.wav" if under_split else f"clip_{i}.wav"
            z.writestr(_wav_bytes(SPLITS.index(split) * 10 + i), arcname)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def remote(tmp_path):
    """Stand-in Zenodo serving every file conf.yaml lists: caption and metadata CSVs, one 7z
    per split (development's members under `development/`, the others at top level), a fake .pth."""
    root = tmp_path / "remote"
    root.mkdir()
    for name in BASE["download"]["clotho_files"]:
        if name.endswith(".csv"):
            (root / name).write_text("file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n"
                                     f"clip_0.wav,{name} a dog barks,b,c,d,e\n", encoding="utf-8")
    for split in SPLITS:
        _make_archive(root / f"clotho_audio_{split}.7z", split, under_split=split == "development")
    (root / PANNS).write_bytes(b"fake checkpoint " * 500)
    server = _Server(root)
    yield root, server
    server.close()


def _overlay(tmp_path: Path, root: Path, server: _Server, **download) -> Path:
    """A config overlay on the repo's conf.yaml: URLs at the server, the stand-in files' md5s."""
    cfg = {
        "base": str(REPO / "conf.yaml"),
        "paths": {"dataset_dir": str(tmp_path / "data"), "pretrained_dir": str(tmp_path / "pre"),
                  "output_dir": str(tmp_path / "out")},
        "download": {"clotho_url": server.url, "panns_url": server.url, "timeout_s": 10,
                     "clotho_files": {n: _md5(root / n) for n in BASE["download"]["clotho_files"]},
                     "panns_files": {PANNS: _md5(root / PANNS)}, **download},
    }
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _run(conf: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, SCRIPT, "--conf", str(conf)]
    if overrides:
        cmd += ["--set", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The `error:` lines on stderr (progress bars aside); a user error is never a traceback."""
    assert "Traceback" not in proc.stderr
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def _check_split(data: Path, split: str) -> None:
    assert sorted(p.name for p in (data / split).glob("*.wav")) == ["clip_0.wav", "clip_1.wav"]
    assert (data / f".{split}.extracted").is_file()
    assert not list(data.glob(f".{split}.*.tmp"))


def _check_dataset(data: Path) -> None:
    for name in BASE["download"]["clotho_files"]:
        if name.endswith(".csv"):
            assert (data / name).is_file()
    for split in SPLITS:
        _check_split(data, split)
    assert not list(data.glob("*.part"))


def test_pth_name_is_url_quoted():
    assert file_url("http://x/files/", PANNS) == "http://x/files/Cnn14_mAP%3D0.431.pth"


def test_happy_path_then_rerun_fetches_nothing(tmp_path, remote):
    root, server = remote
    conf = _overlay(tmp_path, root, server)
    proc = _run(conf)
    assert proc.returncode == 0, proc.stderr
    data = tmp_path / "data"
    _check_dataset(data)
    assert (tmp_path / "pre" / PANNS).read_bytes() == (root / PANNS).read_bytes()
    assert "/Cnn14_mAP%3D0.431.pth" in [p for p, _ in server.requests]
    assert (data / "config.00_download_clotho.yaml").is_file()
    assert "config.00_download_clotho.yaml" in proc.stdout
    assert "extracted 2 wavs" in proc.stdout

    n_requests = len(server.requests)
    proc = _run(conf)
    assert proc.returncode == 0, proc.stderr
    assert len(server.requests) == n_requests  # nothing fetched again
    assert "verified, skipping" in proc.stdout
    assert "extracted" not in proc.stdout.replace("already extracted", "")
    _check_dataset(data)


def test_md5_mismatch_is_removed_reported_and_others_done(tmp_path, remote):
    root, server = remote
    conf = _overlay(tmp_path, root, server)
    bad = "deadbeef" * 4
    proc = _run(conf, f"download.clotho_files.clotho_audio_validation.7z={bad}",
                f"download.clotho_files.clotho_captions_evaluation.csv={bad}")
    assert proc.returncode != 0
    data = tmp_path / "data"
    got = _md5(root / "clotho_audio_validation.7z")
    assert f"clotho_audio_validation.7z: md5 mismatch (expected {bad}, got {got}); removed" in proc.stdout
    err = _error_lines(proc)
    assert len(err) == 1
    assert "clotho_audio_validation.7z" in err[0] and "clotho_captions_evaluation.csv" in err[0]
    assert not (data / "clotho_audio_validation.7z").exists()
    assert not (data / "clotho_audio_validation.7z.part").exists()
    assert not (data / "clotho_captions_evaluation.csv").exists()
    assert not (data / "validation").exists()
    # every other file was still fetched, verified and extracted
    _check_split(data, "development")
    _check_split(data, "evaluation")
    assert (data / "clotho_captions_validation.csv").is_file()
    assert (tmp_path / "pre" / PANNS).is_file()


def test_interrupted_download_resumes_with_range(tmp_path, remote):
    root, server = remote
    cfg = load_config(_overlay(tmp_path, root, server))
    server.httpd.cut_once.add("clotho_audio_evaluation.7z")
    with pytest.raises(UserError) as e:
        download_all(cfg, progress=False)
    msg = str(e.value)
    assert "clotho_audio_evaluation.7z" in msg and "rerun to resume" in msg and "\n" not in msg
    part = tmp_path / "data" / "clotho_audio_evaluation.7z.part"
    size = (root / "clotho_audio_evaluation.7z").stat().st_size
    assert part.is_file() and 0 < part.stat().st_size < size

    offset = part.stat().st_size
    download_all(cfg, progress=False)
    assert ("/clotho_audio_evaluation.7z", f"bytes={offset}-") in server.requests
    assert _md5(tmp_path / "data" / "clotho_audio_evaluation.7z") == _md5(root / "clotho_audio_evaluation.7z")
    _check_dataset(tmp_path / "data")


def test_resume_without_range_support_restarts(tmp_path, remote):
    root, server = remote
    cfg = load_config(_overlay(tmp_path, root, server))
    server.httpd.cut_once.add(PANNS)
    with pytest.raises(UserError):
        download_all(cfg, progress=False)
    assert (tmp_path / "pre" / f"{PANNS}.part").is_file()
    server.httpd.ranges = False  # the server answers 200 with the whole file
    download_all(cfg, progress=False)
    assert (tmp_path / "pre" / PANNS).read_bytes() == (root / PANNS).read_bytes()


def test_keep_archives_false_deletes_and_rerun_does_not_refetch(tmp_path, remote):
    root, server = remote
    cfg = load_config(_overlay(tmp_path, root, server, keep_archives=False))
    download_all(cfg, progress=False)
    data = tmp_path / "data"
    _check_dataset(data)
    assert not list(data.glob("*.7z"))
    n_requests = len(server.requests)
    download_all(cfg, progress=False)
    assert len(server.requests) == n_requests
    _check_dataset(data)


def test_interrupted_extraction_is_redone(tmp_path, remote):
    root, server = remote
    cfg = load_config(_overlay(tmp_path, root, server))
    download_all(cfg, progress=False)
    data = tmp_path / "data"
    # simulate a crash mid-extraction: half-written temp folder, no marker, a partial split dir
    (data / ".validation.extracted").unlink()
    (data / "validation" / "clip_1.wav").unlink()
    (data / ".validation.extracting.tmp").mkdir()
    (data / ".validation.extracting.tmp" / "junk.wav").write_bytes(b"x")
    download_all(cfg, progress=False)
    _check_dataset(data)


def test_md5_null_is_accepted_with_warning(tmp_path, remote, capsys):
    root, server = remote
    # (an overlay, not --set: this key contains '=', which --set cannot express)
    cfg = load_config(_overlay(tmp_path, root, server, panns_files={PANNS: None}))
    download_all(cfg, progress=False)
    assert "warning: no md5" in capsys.readouterr().out
    assert (tmp_path / "pre" / PANNS).is_file()


def test_unreachable_url_is_one_line_error(tmp_path, remote):
    root, server = remote
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/files"
    proc = _run(_overlay(tmp_path, root, server), f"download.clotho_url={url}")
    assert proc.returncode == 2
    err = _error_lines(proc)
    assert len(err) == 1 and url in err[0] and "cannot connect" in err[0]


def test_http_404_is_one_line_error(tmp_path, remote):
    root, server = remote
    cfg = load_config(_overlay(tmp_path, root, server))
    (root / "clotho_captions_validation.csv").unlink()
    with pytest.raises(UserError, match=r"clotho_captions_validation.csv: HTTP 404"):
        download_all(cfg, progress=False)

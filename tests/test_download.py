"""Step 00 against a local HTTP server: verification, resume, extraction, reruns, errors."""
from __future__ import annotations

import hashlib
import io
import json
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
from utils.download import download_all, fetch_verified, file_url
from utils.errors import UserError
from tests.cli_helpers import error_line

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
    url = _unreachable_url()
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


# --------------------------------------------------------------------------- a file the user has

EDITED = "clotho_captions_development.csv"


def _edited_copy(tmp_path: Path) -> tuple[Path, bytes]:
    """The user's hand-edited caption CSV in the dataset folder (md5 differs from the official)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    mine = b"file_name,caption_1,caption_2,caption_3,caption_4,caption_5\nclip_0.wav,my fix,b,c,d,e\n"
    (data / EDITED).write_bytes(mine)
    return data / EDITED, mine


def test_edited_csv_is_kept_aside_then_replaced_by_the_verified_file(tmp_path, remote):
    root, server = remote
    conf = _overlay(tmp_path, root, server)
    path, mine = _edited_copy(tmp_path)
    proc = _run(conf)
    assert proc.returncode == 0, proc.stderr
    aside = path.with_name(f"clotho_captions_development.local-{hashlib.md5(mine).hexdigest()[:8]}.csv")
    assert path.read_bytes() == (root / EDITED).read_bytes()  # the official file, verified
    assert aside.read_bytes() == mine  # the user's content, under a new name
    assert f"your differing copy is kept as {aside.name}" in proc.stdout
    assert not list(path.parent.glob("*.part"))
    proc = _run(conf)  # a rerun leaves both alone
    assert proc.returncode == 0 and f"{EDITED}: verified, skipping" in proc.stdout
    assert aside.read_bytes() == mine and path.read_bytes() == (root / EDITED).read_bytes()


def _unreachable_url() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/files"


def test_offline_the_edited_csv_stays_exactly_where_and_as_it_was(tmp_path, remote):
    root, server = remote
    path, mine = _edited_copy(tmp_path)
    stat = path.stat()
    url = _unreachable_url()
    proc = _run(_overlay(tmp_path, root, server), f"download.clotho_url={url}")
    line = error_line(proc)
    assert url in line and "cannot connect" in line and f"{path} was left as it was" in line
    assert path.read_bytes() == mine and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert sorted(p.name for p in path.parent.iterdir()) == [EDITED]  # nothing aside, no .part


def test_failed_or_interrupted_download_leaves_the_edited_csv_as_it_was(tmp_path, remote):
    root, server = remote
    path, mine = _edited_copy(tmp_path)
    bad = "deadbeef" * 4  # the completed download cannot match: it is removed, the user's file stays
    proc = _run(_overlay(tmp_path, root, server), f"download.clotho_files.{EDITED}={bad}")
    assert proc.returncode == 2
    assert f"{EDITED}: md5 mismatch (expected {bad}, got " in proc.stdout
    assert f"removed; {path} was left as it was" in proc.stdout
    assert path.read_bytes() == mine and not list(path.parent.glob("*.local-*"))

    cfg = load_config(_overlay(tmp_path, root, server))
    server.httpd.cut_once.add(EDITED)  # the connection drops halfway through
    with pytest.raises(UserError, match=r"rerun to resume; .* was left as it was"):
        download_all(cfg, progress=False)
    assert path.read_bytes() == mine
    download_all(cfg, progress=False)  # the rerun completes it, and only then swaps
    assert path.read_bytes() == (root / EDITED).read_bytes()
    assert [p.read_bytes() for p in path.parent.glob("*.local-*.csv")] == [mine]


def test_corrupt_archive_is_replaced_only_by_a_verified_one(tmp_path, remote):
    root, server = remote
    cfg = load_config(_overlay(tmp_path, root, server))
    data = tmp_path / "data"
    data.mkdir()
    archive = data / "clotho_audio_evaluation.7z"
    archive.write_bytes(b"truncated 7z")
    md5 = _md5(root / archive.name)
    with pytest.raises(UserError, match=f"{archive} was left as it was"):
        fetch_verified(file_url(_unreachable_url(), archive.name), archive, md5, progress=False)
    assert archive.read_bytes() == b"truncated 7z"
    download_all(cfg, progress=False)
    assert _md5(archive) == _md5(root / archive.name)
    assert not list(data.glob("*.local-*"))  # a binary is not a user's edit: nothing kept aside
    _check_dataset(data)


# --------------------------------------------------------------------------- the released baseline

RECORD = "api/records/7752975"
RELEASE = {"checkpoint": b"stand-in training checkpoint " * 300, "audio_encoder.pth": b"stand-in encoder " * 300}


def _publish_release(root: Path, shape: str = "list", md5s: dict | None = None) -> dict:
    """The release files at the server's top level and a Zenodo record listing at /api/records/…,
    in either of the two shapes Zenodo serves."""
    entries = []
    for name, content in RELEASE.items():
        (root / name).write_bytes(content)
        md5 = (md5s or {}).get(name, hashlib.md5(content).hexdigest())
        entries.append({"key": name, "size": len(content), "checksum": f"md5:{md5}"})
    listing = ({"files": entries} if shape == "list"
               else {"files": {"enabled": True, "entries": {e["key"]: e for e in entries}}})
    (root / RECORD).parent.mkdir(parents=True, exist_ok=True)
    (root / RECORD).write_text(json.dumps(listing), encoding="utf-8")
    return listing


def _release_overlay(tmp_path: Path, root: Path, server: _Server, record: str | None = None) -> Path:
    return _overlay(tmp_path, root, server, baseline_url=server.url,
                    baseline_record=record or f"{server.url}/{RECORD}")


def _run_baseline(conf: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, SCRIPT, "--conf", str(conf), "--baseline"]
    if overrides:
        cmd += ["--set", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("shape", ["list", "entries"])
def test_baseline_is_fetched_only_when_asked_and_md5_checked(tmp_path, remote, shape):
    root, server = remote
    _publish_release(root, shape)
    conf = _release_overlay(tmp_path, root, server)
    assert _run(conf).returncode == 0
    assert f"/{RECORD}" not in [p for p, _ in server.requests]  # not by default
    assert not (tmp_path / "pre" / "checkpoint").exists()

    proc = _run_baseline(conf)
    assert proc.returncode == 0, proc.stderr
    for name, content in RELEASE.items():
        assert (tmp_path / "pre" / name).read_bytes() == content
        assert f"{name}: downloaded, md5 verified" in proc.stdout


def test_baseline_file_not_matching_its_listed_md5_fails(tmp_path, remote):
    root, server = remote
    bad = "0123456789abcdef" * 2
    _publish_release(root, md5s={"checkpoint": bad})
    proc = _run_baseline(_release_overlay(tmp_path, root, server))
    line = error_line(proc)
    assert "checkpoint" in line and "failed md5 verification" in line
    assert not (tmp_path / "pre" / "checkpoint").exists()
    assert (tmp_path / "pre" / "audio_encoder.pth").read_bytes() == RELEASE["audio_encoder.pth"]


@pytest.mark.parametrize("listing, expected", [
    ("<html>not json</html>", "not a Zenodo record listing (not JSON)"),
    (json.dumps({"hits": []}), "not a Zenodo record listing (no files in it)"),
    (json.dumps({"files": [{"key": "../escape.pth", "checksum": "md5:" + "0" * 32}]}),
     "lists a file named '../escape.pth', which is not a plain file name"),
])
def test_unusable_record_listing_is_one_line(tmp_path, remote, listing, expected):
    root, server = remote
    (root / RECORD).parent.mkdir(parents=True)
    (root / RECORD).write_text(listing, encoding="utf-8")
    line = error_line(_run_baseline(_release_overlay(tmp_path, root, server)))
    assert expected in line and "10.5281/zenodo.7752975" in line
    assert not (tmp_path.parent / "escape.pth").exists() and not (tmp_path / "escape.pth").exists()


def test_unreachable_record_listing_is_one_line(tmp_path, remote):
    root, server = remote
    url = _unreachable_url()
    line = error_line(_run_baseline(_release_overlay(tmp_path, root, server, record=url)))
    assert url in line and "cannot connect" in line

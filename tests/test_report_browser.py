"""The report page in a real browser (headless Chromium): every player finds and decodes its
clip, hostile captions stay text, and a screenshot can be taken.

The page's own script writes each <audio> element's state into its data-* attributes; the
browser's --dump-dom (after --virtual-time-budget) hands back that DOM. Skips only when no
Chromium/Chrome is installed (`.ci/run` installs it).
"""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import soundfile as sf

from tests.test_report import HOSTILE_CAPTIONS, HOSTILE_FNAME, Tags, build_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--allow-file-access-from-files", "--mute-audio", "--hide-scrollbars")


@pytest.fixture(scope="module")
def browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium or Chrome found (apt-get install chromium)")


def run_browser(browser: str, profile: Path, page: Path, *args: str) -> str:
    proc = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def loaded_dom(browser: str, tmp_path: Path, page: Path) -> Tags:
    return Tags(run_browser(browser, tmp_path / "profile", page, "--virtual-time-budget=20000",
                            "--dump-dom"))


def check_players(dom: Tags, expected: dict[str, float]) -> None:
    """Every <audio> loaded and decoded its clip (readyState >= HAVE_CURRENT_DATA), with the
    duration of its source; none failed."""
    players = [a for t, a in dom.tags if t == "audio"]
    assert players
    assert {a["src"] for a in players} == set(expected)
    for a in players:
        assert "data-failed" not in a and "data-error" not in a, a
        assert a.get("data-loaded") == "1", a
        assert int(a["data-ready-state"]) >= 2, a
        assert abs(float(a["data-duration"]) - expected[a["src"]]) < 0.05, (a, expected[a["src"]])
    status = "".join(dom.text)
    assert f"{len(players)} of {len(players)} players loaded" in status


def expected_durations(page) -> dict[str, float]:
    """src -> duration (s) of the source wav, for every clip the page plays."""
    return {p.href: sf.info(str(clip.src)).duration for clip, p in page.playable.items() if p.href}


def test_every_player_decodes_and_hostile_text_stays_text(browser, tmp_path):
    page, _ = build_report(tmp_path, worst=40, random=0, missing=(6,))
    dom = loaded_dom(browser, tmp_path, page.path)
    check_players(dom, expected_durations(page))
    # the escaped captions and file name are on the page as text, and none of them ran
    html_attrs = [a for t, a in dom.tags if t == "html"][0]
    assert "data-pwned" not in html_attrs
    visible = "".join(dom.text)
    for caption in HOSTILE_CAPTIONS:
        assert caption in visible
    assert HOSTILE_FNAME in visible
    assert "not found in the dataset folder (evaluation/evaluation_clip_06.wav)" in visible

    shot = tmp_path / "report.png"
    run_browser(browser, tmp_path / "profile", page.path, "--window-size=1280,1800",
                "--virtual-time-budget=5000", f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 1800) and len(data) > 20_000  # a rendered page, not a blank


def test_linked_wavs_play_from_the_page(browser, tmp_path):
    page, _ = build_report(tmp_path, audio="link", worst=3, random=2)
    check_players(loaded_dom(browser, tmp_path, page.path), expected_durations(page))

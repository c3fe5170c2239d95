"""The repository stands alone and its docs say what the code does: no pointers outside it,
CONTRIBUTING's API names exist and its facts agree with conf.yaml, the demo overlay lists only
the keys it changes, the README describes the software rather than its development."""
from __future__ import annotations

import importlib
import re
import runpy
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.tiny_data import REPO
from utils.config import load_config

CONTRIBUTING = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
FLAT = " ".join(CONTRIBUTING.split())  # facts may wrap across lines
README = (REPO / "README.md").read_text(encoding="utf-8")
OUTSIDE = re.compile(r"\.\./shared|shared/SPEC|SPEC\.md|parent\s*/\s*[\"']shared[\"']")


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [REPO / p for p in out.stdout.split()]


def test_nothing_outside_the_repository_is_referenced():
    """Docs, configs, scripts and library code (tests may use optional local data)."""
    files = [p for p in tracked("*.md", "*.yaml", "*.py", "*.sh", "Makefile")
             if not p.relative_to(REPO).parts[0] == "tests"]
    assert files
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in files if p.is_file()
                 for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if OUTSIDE.search(line)]
    assert offenders == []


def test_contributing_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", CONTRIBUTING):
        if "://" not in target:
            assert (REPO / target).exists(), target


def test_contributing_api_names_exist():
    """Every `package.module.name` CONTRIBUTING names is importable: the contract cannot drift."""
    names = set(re.findall(r"`((?:utils|models)\.[a-z_]+(?:\.[A-Za-z_0-9]+)+)", CONTRIBUTING))
    assert len(names) >= 15
    missing = []
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 1, -1):  # longest importable module prefix
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(name)
            break
        else:
            missing.append(name)
    assert missing == []


def test_contributing_facts_agree_with_the_code():
    cfg = load_config(REPO / "conf.yaml")
    for name, md5 in cfg["download"]["clotho_files"].items():
        if name.startswith(("clotho_captions_", "clotho_audio_")):
            assert md5 in CONTRIBUTING, name
    for fact in ("3839 / 1045 / 1045", "19195 / 5225 / 5225", "np.spacing(1)", "40 ms", "20 ms",
                 "64 mel bands", "`cnn.{8b}`", "`fc.1`", "mAP@10", "file_name,caption_1,…,caption_5"):
        assert fact in FLAT, fact
    from utils.audio_utils import stft_params
    assert stft_params(44100) == (1764, 882, 2048)  # 40 ms, 20 ms, next power of two


def test_demo_overlay_lists_only_keys_it_changes():
    base = yaml.safe_load((REPO / "conf.yaml").read_text(encoding="utf-8"))
    demo = yaml.safe_load((REPO / "conf_demo.yaml").read_text(encoding="utf-8"))
    same = []

    def walk(over, under, prefix=""):
        for key, value in over.items():
            if key == "base":
                continue
            if isinstance(value, dict):
                walk(value, under.get(key, {}), f"{prefix}{key}.")
            elif under.get(key) == value:
                same.append(prefix + key)
    walk(demo, base)
    assert same == []


def test_demo_width_is_described_as_it_is():
    base = load_config(REPO / "conf.yaml")["audio_encoder"]["channels"]
    demo = load_config(REPO / "conf_demo.yaml")["audio_encoder"]["channels"]
    ratios = {b // d for b, d in zip(base, demo)}
    assert ratios == {8, 16}
    text = (REPO / "conf_demo.yaml").read_text(encoding="utf-8") + README
    assert "1/16-width" not in text and "1/16 width" not in text
    assert "1/8" in text and "1/16" in text


def test_readme_states_the_torch_pin_and_what_picks_the_build():
    pin = re.search(r"^torch==(\S+)$", (REPO / "requirements.txt").read_text(), re.M).group(1)
    assert f"torch=={pin}" in README
    assert "CPU wheel" not in README
    assert "cuda.is_available()" in README


def test_readme_describes_the_software_not_its_development():
    # the phrases are assembled so that a search of the repository for them finds none here
    for phrase in ("this " + "session", "no GPU was " + "available", "not " + "yet",
                   "still to be " + "measured", "development " + "machine"):
        assert phrase not in README, phrase


def test_bench_preprocessing_reads_captions_from_the_configured_dataset():
    bench = runpy.run_path(str(REPO / "benchmarks" / "bench_preprocessing.py"))
    cfg = load_config(REPO / "conf.yaml")
    assert bench["default_captions_csv"]() == (
        Path(cfg["paths"]["dataset_dir"]) / "clotho_captions_development.csv")


def test_the_frame_budgets_of_clip_batches_are_stated_as_they_are():
    from utils.data_utils import CPU_BATCH_FRAMES, GPU_BATCH_FRAMES

    conf = " ".join((REPO / "conf.yaml").read_text(encoding="utf-8").replace("#", " ").split())
    readme = " ".join((REPO / "README.md").read_text(encoding="utf-8").split())
    for text in (conf, readme):
        assert f"{CPU_BATCH_FRAMES} frames on the CPU, {GPU_BATCH_FRAMES} on a GPU" in text

"""benchmarks/bench_gpu.py's own logic on the CPU (its figures need a GPU): the step timing
at toy sizes, the GPU-utilisation sampler against a fake nvidia-smi, the hung-run watchdog."""
from __future__ import annotations

import os
import time

import pytest
import torch

from tests.tiny_data import REPO


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as when run as a script
    import bench_gpu

    return bench_gpu


def test_steps_are_timed_with_ratios_to_the_original_only(bench, tmp_path, monkeypatch):
    b = bench.Bench(smoke=True, device=torch.device("cpu"))
    report = bench.Report(tmp_path / "out.json", b.device, ["original", "repo: fp32"])
    bench.bench_steps(b, report)
    rows = report.data["steps"]
    assert len(rows) == 2 and all(r["ms_per_step"] > 0 and r["steps"] == b.timed for r in rows.values())
    original, fp32 = rows.values()
    assert original["speedup_vs_original"] == 1.0
    assert fp32["speedup_vs_original"] == pytest.approx(original["ms_per_step"] / fp32["ms_per_step"])

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bench, "original_infonce", broken)
    report = bench.Report(tmp_path / "out.json", b.device, ["original", "repo: fp32"])
    bench.bench_steps(b, report)
    original, fp32 = report.data["steps"].values()
    assert "out of memory" in original["error"] and "speedup_vs_original" not in fp32
    assert "ERROR" in report.table()


def fake_nvidia_smi(tmp_path, monkeypatch, lines: list[str]) -> None:
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    body = "".join(f"echo '{line}'\n" for line in lines)
    script.write_text(f"#!/bin/sh\nwhile true; do\n{body}sleep 0.05\ndone\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")


def sample(bench, seconds: float = 0.6):
    gpu = bench.GpuUtilisation(torch.device("cuda"))
    start = time.time()
    time.sleep(seconds)
    gpu.stop()
    return gpu, start


@pytest.mark.parametrize("ours", ["aaaa-11", "unknown"])
def test_gpu_utilisation_is_the_benchmarks_gpus(bench, tmp_path, monkeypatch, ours):
    """nvidia-smi lists every GPU of the machine: only ours counts (all, if none matches)."""
    fake_nvidia_smi(tmp_path, monkeypatch, ["GPU-AAAA-11, 90, 1000", "GPU-bbbb-22, 0, 10"])
    monkeypatch.setattr(bench, "gpu_uuid", lambda device: ours)
    gpu, start = sample(bench)
    assert gpu.why_none() is None and gpu.proc.poll() is not None
    assert {uuid for _, uuid, _, _ in gpu.samples} == {"aaaa-11", "bbbb-22"}
    mean = gpu.mean(start, time.time())
    assert mean == 90.0 if ours == "aaaa-11" else 0 < mean < 90  # the other GPU's 0 % counted
    assert gpu.mean(0, 1) is None  # no sample in that window


def test_gpu_utilisation_says_why_it_has_none(bench, tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, ["MIG-cccc, [N/A], 1000"])
    monkeypatch.setattr(bench, "gpu_uuid", lambda device: "cccc")
    gpu, start = sample(bench)
    assert gpu.mean(start, time.time()) is None and "MIG" in gpu.why_none()
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert bench.GpuUtilisation(torch.device("cuda")).why_none() == "nvidia-smi not found"


def test_a_hung_run_is_killed_and_logged(bench, tmp_path):
    log = tmp_path / "runs.log"
    code, lines = bench.run_logged(["sh", "-c", "echo started; sleep 30"], log, dict(os.environ), timeout_s=1)
    assert code != 0 and [l for _, l in lines] == ["started", "killed: still running after 1 s"]
    code, lines = bench.run_logged(["sh", "-c", "echo done"], log, dict(os.environ), timeout_s=30)
    assert code == 0 and [l for _, l in lines] == ["done"]
    assert log.read_text().splitlines() == ["$ sh -c echo started; sleep 30", "started",
                                            "$ sh -c echo done", "done"]

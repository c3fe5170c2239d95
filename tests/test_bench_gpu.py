"""benchmarks/bench_gpu.py's own logic on the CPU (its figures need a GPU): the step timing
at toy sizes, the GPU-utilisation sampler against a fake nvidia-smi, the hung-run watchdog."""
from __future__ import annotations

import datetime
import json
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


def test_steps_run_cudnn_as_main_py_and_a_failed_compile_is_not_reported_as_compiled(bench, tmp_path,
                                                                                     monkeypatch):
    """The compiled step is main.py's for padded or cropped clips, so cuDNN's autotuner is on
    (off for the others, as for whole clips); a compile that fails on its first step trains on
    eagerly (train_step's fallback), and its row says so instead of passing for compiled."""
    b = bench.Bench(smoke=True, device=torch.device("cpu"))
    seen = []
    timed = bench.time_steps

    def spy(b, tr, *args, **kwargs):
        seen.append(torch.backends.cudnn.benchmark)
        return timed(b, tr, *args, **kwargs)

    class Broken(torch.nn.Module):  # what a compiler failing at its first call looks like
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args):
            raise RuntimeError("backend compiler failed")

    monkeypatch.setattr(bench, "time_steps", spy)
    monkeypatch.setattr(torch, "compile", lambda model, options=None: Broken(model))
    report = bench.Report(tmp_path / "out.json", b.device, ["original", "padded or cropped"])
    bench.bench_steps(b, report)
    assert seen == [False, True] and not torch.backends.cudnn.benchmark
    original, compiled = report.data["steps"].values()
    assert "error" not in original
    assert compiled["compiled"] is False and "eager" in compiled["error"] and compiled["ms_per_step"] > 0
    assert "ERROR" in report.table().splitlines()[-1]


def test_a_killed_epoch_run_keeps_the_epochs_it_finished(bench, tmp_path, monkeypatch):
    """main.py killed in its second epoch (a hang, or the budget spent): its first epoch's
    record and the error are both in the JSON."""
    b = bench.Bench(smoke=True, device=torch.device("cpu"))
    record = {"epoch": 1, "seconds": 30.0, "train_seconds": 25.0, "data_wait_seconds": 0.1,
              "compiled_graphs": 4}

    def killed_in_epoch_2(cmd, log, env, timeout_s):
        name = cmd[cmd.index("--name") + 1]
        run = tmp_path / "work" / "runs" / name
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        return -9, [(time.time(), "epoch 1/2  train_loss 3.0 ..."),
                    (time.time(), f"killed: still running after {timeout_s:.0f} s")]

    monkeypatch.setattr(bench, "run_logged", killed_in_epoch_2)
    monkeypatch.setattr(bench, "EPOCH_VARIANTS", bench.EPOCH_VARIANTS[:1])
    report = bench.Report(tmp_path / "out.json", b.device)
    bench.bench_epoch(b, report, tmp_path / "data", tmp_path / "work", 1)
    saved = json.loads((tmp_path / "out.json").read_text())["epoch"]
    (row,) = saved.values()
    assert row["records"] == [record] and "killed: still running" in row["error"]


def test_a_budget_caps_the_runs_and_skips_what_it_cannot_start(bench, tmp_path, monkeypatch):
    """--budget-s: a lender's time limit kills the whole command (the run under way and the
    table lost), so the runs are killed in time and a variant past the budget is skipped."""
    monkeypatch.setattr(bench, "STARTED", time.monotonic() - 100)  # 100 s ago
    report = bench.Report(tmp_path / "out.json", torch.device("cpu"), budget_s=100 + bench.BUDGET_MARGIN_S + 30)
    assert 25 < report.timeout(bench.EPOCH_TIMEOUT_S) <= 30
    assert bench.Report(tmp_path / "x.json", torch.device("cpu")).timeout(900) == 900  # no budget
    spent = bench.Report(tmp_path / "out.json", torch.device("cpu"), budget_s=50)
    assert spent.section("epoch", "main.py, 2 epochs", lambda: pytest.fail("started")) is None
    saved = json.loads((tmp_path / "out.json").read_text())
    assert "skipped" in saved["epoch"]["main.py, 2 epochs"]["error"] and saved["budget_s"] == 50


def test_gpu_samples_are_placed_at_nvidia_smis_own_times(bench, tmp_path, monkeypatch):
    """Written to a pipe, nvidia-smi's lines may come in bursts (a C program's 4-KB output
    buffer): each sample is placed at its `timestamp` field, not at its line's arrival."""
    script = tmp_path / "bin" / "nvidia-smi"
    script.parent.mkdir()
    # six samples 0.1 s apart, all sent at once at the end, as a full buffer would send them
    script.write_text("#!/bin/sh\nout=''\nfor i in 1 2 3 4 5 6; do\n"
                      "out=\"$out$(date '+%Y/%m/%d %H:%M:%S.%3N'), GPU-AAAA-11, 70, 1000\n\"\n"
                      "sleep 0.1\ndone\nprintf \"$out\"\nexec sleep 30\n")  # exec: one process, as nvidia-smi is
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(bench, "gpu_uuid", lambda device: "aaaa-11")
    gpu, start = sample(bench, 2.0)
    times = [t for t, _, _, _ in gpu.samples]
    assert len(times) == 6 and max(times) - min(times) > 0.35  # not one arrival time for all
    # the clock read right (a time-zone slip would be hours off); slack for a loaded machine
    assert start - 0.5 < min(times) and max(times) < start + 3
    assert gpu.mean(start - 0.5, start + 3) == 70.0
    assert bench.smi_time("2025/01/31 12:34:56.789") == pytest.approx(
        datetime.datetime(2025, 1, 31, 12, 34, 56, 789000).timestamp())
    assert bench.smi_time("GPU-AAAA-11") is None


def test_kernel_time_counts_each_kernel_once(bench):
    """An operator's profile row repeats the time of the kernels it launched (the first version
    of the busy section read 197 % so): only the device's own events count."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    rows = [SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=490.0),  # aten::conv
            SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=490.0),  # its kernel
            SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=30.0,
                            is_user_annotation=True)]
    prof = SimpleNamespace(key_averages=lambda: rows)
    assert bench.kernel_ms(prof) == pytest.approx(0.49)


def test_busy_section_times_the_loop_and_validation_and_keeps_the_profiles(bench, tmp_path):
    from benchlib import make_clotho_features

    b = bench.Bench(smoke=True, device=torch.device("cpu"))
    dataset = make_clotho_features(tmp_path / "data", b.clips, b.text_dim)
    report = bench.Report(tmp_path / "out.json", b.device, ["eager", "validation"])
    bench.bench_busy(b, report, dataset, tmp_path)
    step, validation = report.data["busy"].values()
    assert "error" not in step and "error" not in validation, report.data["busy"]
    assert step["steps"] == 6 and 0 < step["host_ms_per_step"] <= step["ms_per_step"]
    assert step["gpu_busy_pct"] == 0  # no CUDA kernels on the CPU
    assert validation["validation_loss_s"] > 0 and validation["clip_embeddings_s"] > 0
    assert validation["clip_embeddings_per_length_s"] > 0
    profiles = (tmp_path / "busy_profiles.txt").read_text()
    for title in ("training steps, eager", "validation, validation loss", "validation, clip embeddings",
                  "validation, clip embeddings per length"):
        assert f"## {title}, by self_cpu_time_total" in profiles
    assert "host_ms_per_step" in report.table()


def test_goal_measures_what_main_py_runs_on_whole_clips(bench, tmp_path, monkeypatch):
    """--goal: the original's step, main.py's whole-clip step and epoch compiled (the default on
    CUDA) and eager, step 02; not the padded epoch (~4 minutes of compiling, an opt-in key)."""
    def refused(*args, **kwargs):
        raise RuntimeError("not run here")

    monkeypatch.setattr(bench, "make_trainer", refused)
    monkeypatch.setattr(bench, "run_logged", refused)
    b = bench.Bench(smoke=True, device=torch.device("cpu"))
    report = bench.Report(tmp_path / "out.json", b.device, list(bench.GOAL_VARIANTS))
    bench.bench_steps(b, report)
    bench.bench_epoch(b, report, tmp_path, tmp_path, 1)
    bench.bench_logmel(b, report, tmp_path)
    steps, epochs = list(report.data["steps"]), list(report.data["epoch"])
    assert len(steps) == 3 and steps[0].startswith("original")
    assert "compile=off" in steps[1] and "symbolic time axis (main.py on CUDA: whole clips)" in steps[2]
    assert len(epochs) == 2 and "the default on CUDA" in epochs[0] and "compile=off" in epochs[1]
    assert list(report.data["logmel"]) == ["preprocessing/02, cuda vs cpu"]

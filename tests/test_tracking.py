"""Tracking without an account: metrics.jsonl always, wandb offline into the run directory."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from tests.tiny_data import REPO
from utils.config import load_config
from utils.errors import UserError
from utils.tracking import (FINISHED_QUIET_S, Tracker, history_rows, read_finished_segment, read_jsonl,
                            read_wandb_file, wandb_mode, wandb_segments)


def offline_env(tmp_path) -> dict:
    """wandb offline, with its data, cache and config directories inside tmp_path."""
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        env[var] = str(tmp_path / var.lower())
    return env


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """The repo's config, with wandb offline (offline_env) in this process."""
    for var, value in offline_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    return load_config(REPO / "conf.yaml")


def segment_records(run_dir, run_id):
    """Each segment's records, once wandb's service has written them all."""
    return [read_finished_segment(path, quiet_s=FINISHED_QUIET_S) for path in wandb_segments(run_dir, run_id)]


def run_records(records):
    return [r.run for r in records if r.WhichOneof("record_type") == "run"]


def summary_updates(records) -> dict:
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            out.update({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                        for item in r.summary.update})
    return out


def test_evaluation_has_its_own_run_grouped_with_and_linked_from_training(tmp_path, offline):
    train = Tracker(offline, tmp_path, samples_per_epoch=10)
    train.log_epoch({"epoch": 1, "train_loss": 2.0, "val_loss": 1.5})
    train.finish()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"epoch": 1, "train_loss": 2.0, "val_loss": 1.5}]

    for _ in range(2):  # postprocessing run twice: one row per evaluation, never a training row
        ev = Tracker(offline, tmp_path, job_type="eval")
        assert ev.run_id == f"{run_id}-eval"
        ev.log({"evaluation/t2a/mAP@10": 0.5})
        ev.log_histogram("evaluation/t2a/rank", [1, 2, 3])
        ev.finish()
    assert (tmp_path / "wandb_id.txt").read_text().strip() == run_id

    (train_log,) = segment_records(tmp_path, run_id)
    (train_run,) = run_records(train_log)
    assert (train_run.job_type, train_run.run_group, train_run.resumed) == ("train", run_id, False)
    assert summary_updates(train_log)["eval_run_id"] == f"{run_id}-eval"
    assert [(step, row["epoch"]) for step, row in history_rows(train_log)] == [(10, 1)]

    evals = segment_records(tmp_path, f"{run_id}-eval")
    assert len(evals) == 2
    assert [(r.job_type, r.run_group, r.resumed) for log in evals for r in run_records(log)] == \
        [("eval", run_id, False), ("eval", run_id, True)]
    assert summary_updates(evals[0])["train_run_id"] == run_id
    rows = [(step, sorted(row)) for log in evals for step, row in history_rows(log)]
    assert [step for step, _ in rows] == [0, 1]  # the second evaluation does not overwrite the first
    assert all("evaluation/t2a/mAP@10" in keys and "evaluation/t2a/rank._type" in keys for _, keys in rows)


def test_finish_waits_for_its_own_segment_to_be_complete(tmp_path, offline, monkeypatch):
    """The next segment (a second evaluation, a resume) continues from the steps it reads in
    this one: finish() returns once the service has written it all, waiting out pauses longer
    than the 2 s a reader allows a killed segment (a loaded machine logged step 0 twice)."""
    import utils.tracking as tracking

    waited, read = [], tracking.read_finished_segment
    def record(path, quiet_s=2.0, **kwargs):
        waited.append((path, quiet_s))
        return read(path, quiet_s=quiet_s, **kwargs)
    monkeypatch.setattr(tracking, "read_finished_segment", record)
    ev = Tracker(offline, tmp_path, job_type="eval")
    ev.log({"evaluation/t2a/mAP@10": 0.5})
    ev.finish()
    [segment] = wandb_segments(tmp_path, ev.run_id)
    assert waited == [(segment, FINISHED_QUIET_S)]
    assert any(r.WhichOneof("record_type") == "exit" for r in read_wandb_file(segment))


def test_the_summary_is_the_best_epochs_record(tmp_path, offline):
    """A sweep compares runs by their summary: one epoch's numbers, not each key's min or max
    (here the loss is lowest at epoch 3, but mAP@10 picked epoch 2)."""
    train = Tracker(offline, tmp_path, samples_per_epoch=10)
    for epoch, loss, m in ((1, 3.0, 0.1), (2, 2.0, 0.5), (3, 1.0, 0.4)):
        train.log_train({"train/loss": loss + 1.5, "train/epoch": epoch - 0.5})
        train.log_epoch({"epoch": epoch, "train_loss": loss + 1, "val_loss": loss, "val_t2a_mAP@10": m})
    train.summarize_best(2, {"best_val_t2a_mAP@10": 0.5, "stopped_early": True})
    train.finish()
    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    (log,) = segment_records(tmp_path, run_id)
    summary = summary_updates(log)
    assert (summary["val_loss"], summary["val_t2a_mAP@10"], summary["train_loss"]) == (2.0, 0.5, 3.0)
    # the record is one epoch's, its number included; how far training went is said apart
    assert (summary["best_epoch"], summary["stopped_early"], summary["epoch"]) == (2, True, 2)
    assert summary["epochs_trained"] == 3
    removed = {item.key or ".".join(item.nested_key) for r in log if r.WhichOneof("record_type") == "summary"
               for item in r.summary.remove}
    assert {"train/loss", "train/epoch"} <= removed  # the last step's point is not the best epoch's


def test_resume_backfills_epochs_wandb_never_got_and_logs_none_twice(tmp_path, offline):
    """Unit-level companion of tests/test_wandb_history.py (which kills real processes)."""
    first = Tracker(offline, tmp_path, samples_per_epoch=10)
    first.log_train({"train/loss": 3.0, "train/epoch": 0.5})
    first.log_epoch({"epoch": 1, "val_loss": 2.0})
    first.finish()
    with open(tmp_path / "metrics.jsonl", "a") as f:  # reached metrics.jsonl, never wandb
        f.write(json.dumps({"epoch": 2, "val_loss": 1.9}) + "\n")
        f.write(json.dumps({"epoch": 3, "val_loss": 1.8}) + "\n")  # after the checkpoint

    second = Tracker(offline, tmp_path, samples_per_epoch=10)
    assert second.logged_epochs == {1}
    second.rewind(2)  # the checkpoint holds epoch 2: epoch 2 is backfilled, epoch 3 dropped
    second.log_train({"train/loss": 2.5, "train/epoch": 2.5})
    second.log_epoch({"epoch": 3, "val_loss": 1.7})
    second.finish()
    third = Tracker(offline, tmp_path, samples_per_epoch=10)
    third.rewind(2)  # killed before epoch 3's checkpoint: epoch 3 is redone, but wandb has it
    third.log_train({"train/loss": 2.5, "train/epoch": 2.5})
    third.log_epoch({"epoch": 3, "val_loss": 1.7})
    third.finish()

    run_id = (tmp_path / "wandb_id.txt").read_text().strip()
    logs = segment_records(tmp_path, run_id)
    assert [r.resumed for log in logs for r in run_records(log)] == [False, True, True]
    rows = [(k, step, row.get("epoch")) for k, log in enumerate(logs) for step, row in history_rows(log)]
    assert [(k, step, epoch) for k, step, epoch in rows] == \
        [(0, 5, None), (0, 10, 1), (1, 20, 2), (1, 25, None), (1, 30, 3)]
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_online_resume_continues_after_the_servers_last_step(tmp_path, offline, monkeypatch, capsys):
    """Online, the server may hold rows that a killed segment's local log lost: wandb reports
    the run's next step on resume, and epochs at or below it are not logged again."""
    import wandb

    first = Tracker(offline, tmp_path, samples_per_epoch=10)
    first.log_epoch({"epoch": 1})
    first.finish()
    run_id = first.run_id
    with open(tmp_path / "metrics.jsonl", "a") as f:
        for epoch in (2, 3):
            f.write(json.dumps({"epoch": epoch}) + "\n")

    logged, summary = [], {}

    class ServerRun:  # what wandb.init returns online: the server has rows up to step 25
        id, starting_step = run_id, 26
        url = f"https://wandb.example.org/team/proj/runs/{run_id}"

        class summary:
            update = staticmethod(summary.update)

        def define_metric(self, *args, **kwargs):
            pass

        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: ServerRun())
    monkeypatch.setenv("WANDB_MODE", "online")
    capsys.readouterr()
    tracker = Tracker(offline, tmp_path, samples_per_epoch=10)
    assert f"wandb sync {tmp_path / 'wandb'}" in capsys.readouterr().err  # the offline segment
    tracker.rewind(2)  # epoch 2 (step 20) is on the server although no local log has it
    tracker.log_train({"train/loss": 1.0, "train/epoch": 2.5})  # epoch 3 redone: the server has it
    tracker.log_train({"train/loss": 0.9, "train/epoch": 2.75})
    tracker.log_epoch({"epoch": 3})
    assert logged == [(28, {"train/loss": 0.9, "train/epoch": 2.75}), (30, {"epoch": 3})]
    assert summary["eval_run_url"] == f"https://wandb.example.org/team/proj/runs/{run_id}-eval"


def test_reader_survives_torn_and_corrupt_logs(tmp_path, offline):
    """A segment killed while writing ends in a torn chunk; a damaged one loses only the
    records in the damaged 32 KiB block. Rows of 70 kB span several blocks."""
    tracker = Tracker(offline, tmp_path, job_type="eval")
    for i in range(5):
        tracker.run.log({"text": "x" * 70_000, "i": i}, step=i)
    tracker.finish()
    (path,) = wandb_segments(tmp_path, tracker.run_id)
    assert [row["i"] for _, row in history_rows(read_finished_segment(path, quiet_s=FINISHED_QUIET_S))] \
        == [0, 1, 2, 3, 4]
    data = path.read_bytes()

    for cut in range(7, len(data), len(data) // 13):
        path.write_bytes(data[:cut])
        got = [row["i"] for _, row in history_rows(read_wandb_file(path))]
        assert got == list(range(len(got))), cut
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    got = [row["i"] for _, row in history_rows(read_wandb_file(path))]
    assert 3 <= len(got) < 5 and got == sorted(got) and got[-1] == 4

    path.write_bytes(b"not a wandb log")
    with pytest.raises(UserError, match="not a wandb transaction log"):
        read_wandb_file(path)


def test_mode_from_environment_and_config(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("online") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    assert wandb_mode("auto") == "offline"  # not logged in
    assert wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"


def test_auto_mode_recognises_a_self_hosted_server(monkeypatch, tmp_path):
    """`wandb login --host https://wandb.example.org:8443` writes a .netrc entry for that host
    (and base_url in wandb's settings file); a key for another server does not count."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "c" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert wandb_mode("auto") == "online"  # the cloud

    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org:8443/")
    assert wandb_mode("auto") == "offline"  # logged in to the cloud, not to this server
    with open(netrc_file, "a") as f:
        f.write("machine wandb.example.org:8443\n  login user\n  password " + "s" * 40 + "\n")
    assert wandb_mode("auto") == "online"

    monkeypatch.delenv("WANDB_BASE_URL")  # the server saved by `wandb login --host`
    (tmp_path / "wandb-config").mkdir()
    (tmp_path / "wandb-config" / "settings").write_text(
        "[default]\nbase_url = https://wandb.example.org:8443\n")
    netrc_file.write_text("machine wandb.example.org:8443\n  login user\n  password " + "s" * 40 + "\n")
    assert wandb_mode("auto") == "online"
    (tmp_path / "wandb-config" / "settings").write_text("[default]\nbase_url = https://other.example.org\n")
    assert wandb_mode("auto") == "offline"
    netrc_file.write_text("machine broken")  # unparsable: not logged in, no traceback
    monkeypatch.setenv("WANDB_BASE_URL", "https://broken")
    assert wandb_mode("auto") == "offline"


def test_rewind_drops_records_after_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker(load_config(REPO / "conf.yaml"), tmp_path)
    for epoch in (1, 2, 3):
        tracker.log_epoch({"epoch": epoch})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 4, "trunc')  # killed while writing
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    tracker.rewind(2)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_corrupt_line_in_the_middle_is_an_error(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(UserError, match="line 2"):
        read_jsonl(tmp_path / "m.jsonl")
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_tables_audio_histogram_and_images_land_in_the_offline_run(tmp_path, offline):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    clip = tmp_path / "clip.ogg"
    sf.write(clip, np.sin(np.arange(8000) / 5).astype(np.float32), 16000, format="OGG", subtype="VORBIS")
    png = tmp_path / "plot.png"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.figure()
    plt.plot([0, 1])
    plt.savefig(png)
    plt.close()

    tracker = Tracker(offline, run_dir, job_type="eval")
    tracker.log_table("retrieval", ["caption", "rank", "top1"], [["a dog", 1, "d.wav"], ["rain", 7, "r.wav"]])
    tracker.log_audio_table("listen", ["caption", "clip", "true_clip"],
                            [["a dog", str(clip), None], ["rain", None, clip]], ["clip", "true_clip"])
    tracker.log_histogram("rank_hist", [1, 2, 2, 5, 9], num_bins=4)
    tracker.log_images({"plots/recall": png})
    tracker.finish()

    (records,) = segment_records(run_dir, tracker.run_id)
    row = {}
    for _, r in history_rows(records):
        row.update(r)
    assert row["retrieval._type"] == "table-file" and row["retrieval.nrows"] == 2
    assert row["listen._type"] == "table-file" and row["listen.ncols"] == 3
    assert row["rank_hist._type"] == "histogram" and sum(row["rank_hist.values"]) == 5
    assert len(row["rank_hist.bins"]) == 5
    assert row["plots/recall._type"] == "image-file"
    # the audio table is a run artifact: the table's json and the clip it plays
    (listen,) = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"
                 and r.artifact.name.endswith("-listen")]
    entries = {e.path: e.local_path for e in listen.manifest.contents}
    table = json.loads(open(entries["listen.table.json"]).read())
    assert table["columns"] == ["caption", "clip", "true_clip"]
    (first, second) = table["data"]
    assert first[1]["_type"] == "audio-file" and first[1]["path"] in entries and first[2] is None
    assert second[1] is None and second[2]["path"] == first[1]["path"]


def test_media_are_no_ops_when_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker(load_config(REPO / "conf.yaml"), tmp_path)
    tracker.log_table("t", ["a"], [[1]])
    tracker.log_audio_table("a", ["clip"], [["/nonexistent.ogg"]], ["clip"])
    tracker.log_histogram("h", [1, 2])
    tracker.log_images({"p": "/nonexistent.png"})
    tracker.finish()
    assert not (tmp_path / "wandb").exists()


def test_a_damaged_wandb_id_file_is_a_one_line_error(tmp_path, offline):
    (tmp_path / "wandb_id.txt").write_text("not/an id\n")
    with pytest.raises(UserError, match="wandb_id.txt: 'not/an id' is not a wandb run id; restore"):
        Tracker(offline, tmp_path)
    (tmp_path / "wandb_id.txt").unlink()  # the advice: a new wandb run
    tracker = Tracker(offline, tmp_path)
    tracker.finish()
    assert (tmp_path / "wandb_id.txt").read_text().strip() == tracker.run_id


LOG_A_TABLE = """
import sys
from utils.config import load_config
from utils.tracking import Tracker
tracker = Tracker(load_config(sys.argv[1]), sys.argv[2], job_type="eval")
tracker.log_table("retrieval_results", ["caption", "rank"], [["a dog barks", 1]])
tracker.finish()
print("logged")
"""


def test_tables_are_logged_without_a_writable_home(tmp_path):
    """HOME missing or read-only (a cluster node, a container): wandb's staging folder
    (~/.local/share/wandb) could not be made, so postprocessing 02 ended in a PermissionError
    traceback at its first table, and wandb's service wrote its log lines into the job's output."""
    home = tmp_path / "home"
    home.write_text("a file, so nothing can be created under it, not even by root")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("WANDB_", "XDG_"))}
    env.update(HOME=str(home), WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(REPO))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = subprocess.run([sys.executable, "-c", LOG_A_TABLE, str(REPO / "conf.yaml"), str(run_dir)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "logged"
    assert "failed to get logger path" not in out.stderr
    assert (run_dir / "wandb" / "wandb_data_dir").is_dir()


def test_online_without_an_api_key_is_one_line_advice(tmp_path, monkeypatch):
    """wandb.mode online with no key (or a server the node cannot reach, after wandb's retries):
    a one-line error saying how to log offline, not wandb's traceback."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var, value in offline_env(tmp_path).items():
        if var != "WANDB_MODE":
            monkeypatch.setenv(var, value)
    cfg = load_config(REPO / "conf.yaml", ["wandb.mode=online"])
    with pytest.raises(UserError, match=r"wandb could not start online \(.*API key.*WANDB_MODE=offline"):
        Tracker(cfg, tmp_path)


def test_auto_that_cannot_reach_the_server_logs_offline_with_a_note(tmp_path, monkeypatch, capsys):
    """`auto` is online where a key is known; a compute node with the login node's key but no
    route to the server goes on offline (a note says so), instead of failing the job."""
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # makes auto online
    for var, value in offline_env(tmp_path).items():
        if var != "WANDB_MODE":
            monkeypatch.setenv(var, value)
    real_init, modes = wandb.init, []

    def init(**kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop.")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    cfg = load_config(REPO / "conf.yaml", ["wandb.mode=auto"])
    tracker = Tracker(cfg, tmp_path)
    try:
        assert modes == ["online", "offline"] and tracker.mode == "offline"
        assert (f"note: wandb could not start online (Network error (ConnectionError), entering retry "
                f"loop.); logging offline into {tmp_path / 'wandb'}") in capsys.readouterr().err
    finally:
        tracker.finish()
    monkeypatch.setenv("WANDB_MODE", "online")  # asked for online: the error stays
    with pytest.raises(UserError, match="wandb could not start online"):
        Tracker(cfg, tmp_path / "b")


def test_auto_goes_on_offline_after_a_real_failed_online_start(tmp_path, monkeypatch, capsys):
    """A server that cannot be reached, for real (not a stubbed wandb.init): wandb's service
    still held the failed run's id, so the offline start ended in 'run ID … is in use'."""
    import http.server
    import threading

    class Refusing(http.server.BaseHTTPRequestHandler):
        """A server that turns the key down (401) at once: wandb's retries after a connection
        error take 90 s, whatever WANDB_INIT_TIMEOUT says."""
        def do_POST(self):
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"errors": [{"message": "unreachable"}]}')
        do_GET = do_POST

        def log_message(self, *args):
            pass

    import wandb

    # a fresh wandb service, as a script's own process has: with the one an earlier test in
    # this process started, this start took wandb's 90 s of retries (the suite's slowest test)
    wandb.teardown()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    for var, value in offline_env(tmp_path).items():
        if var != "WANDB_MODE":
            monkeypatch.setenv(var, value)
    run = tmp_path / "run"
    run.mkdir()
    try:
        tracker = Tracker(load_config(REPO / "conf.yaml", ["wandb.mode=auto"]), run)
        try:
            assert tracker.mode == "offline"
            tracker.log_epoch({"epoch": 1, "train_loss": 1.0})
        finally:
            tracker.finish()
    finally:
        server.shutdown()
    assert "note: wandb could not start online" in capsys.readouterr().err
    (segment,) = [p for p in wandb_segments(run, tracker.run_id) if p.parent.name.startswith("offline-")]
    assert [row["epoch"] for _, row in history_rows(read_finished_segment(segment))] == [1]

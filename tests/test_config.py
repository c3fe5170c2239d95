"""The config module: conf.yaml is the schema; overlays and --set keep its keys and types."""
import subprocess
import sys

import pytest
import yaml

from utils.config import ConfigError, apply_overrides, load_config, save_config


def test_baseline_conf_loads_with_the_baseline_hyperparameters(repo):
    cfg = load_config(repo / "conf.yaml")
    assert cfg["training"]["lr"] == 0.001 and cfg["training"]["batch_size"] == 32
    assert cfg["training"]["epochs"] == 80 and cfg["criterion"]["temperature"] == 0.07
    assert cfg["training"]["scheduler"] == {"factor": 0.1, "patience": 5, "threshold": 0.005,
                                            "threshold_mode": "abs", "min_lr": 1e-6}
    assert cfg["audio_encoder"]["out_dim"] == 300 and cfg["features"]["n_mels"] == 64


def test_overrides_are_yaml_parsed(repo):
    cfg = load_config(repo / "conf.yaml", ["training.epochs=2", "wandb.mode=disabled",
                                           "eval.splits=[evaluation]", "training.lr=1"])
    assert cfg["training"]["epochs"] == 2 and cfg["wandb"]["mode"] == "disabled"
    assert cfg["eval"]["splits"] == ["evaluation"]
    assert cfg["training"]["lr"] == 1.0 and isinstance(cfg["training"]["lr"], float)


def test_keys_containing_dots_can_be_overridden(repo):
    cfg = load_config(repo / "conf.yaml", ["download.clotho_files.clotho_captions_evaluation.csv=abc"])
    assert cfg["download"]["clotho_files"]["clotho_captions_evaluation.csv"] == "abc"
    cfg = load_config(repo / "conf.yaml", ["download.panns_files.Cnn14_mAP=0.431.pth=abc"])
    assert cfg["download"]["panns_files"]["Cnn14_mAP=0.431.pth"] == "abc"


@pytest.mark.parametrize("override,needle", [
    ("training.epoch=2", "training.epoch"),
    ("training.epochs=two", "training.epochs"),
    ("training.amp=yes please", "training.amp"),
    ("paths=3", "paths"),
    ("noequals", "noequals"),
])
def test_bad_overrides_name_the_key(repo, override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(repo / "conf.yaml", [override])


def test_overlay_follows_base_and_rejects_unknown_keys(tmp_path, repo):
    (tmp_path / "ok.yaml").write_text(f"base: {repo / 'conf.yaml'}\ntraining:\n  epochs: 3\n")
    assert load_config(tmp_path / "ok.yaml")["training"]["epochs"] == 3
    (tmp_path / "bad.yaml").write_text(f"base: {repo / 'conf.yaml'}\ntraining:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match="training.epoch"):
        load_config(tmp_path / "bad.yaml")


def test_resolved_config_round_trips(tmp_path, repo):
    cfg = load_config(repo / "conf.yaml", ["seed=7"])
    path = save_config(cfg, tmp_path)
    assert yaml.safe_load(path.read_text()) == cfg
    assert load_config(path) == cfg


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_section_override_requires_a_mapping(repo):
    cfg = load_config(repo / "conf.yaml")
    with pytest.raises(ConfigError, match="section"):
        apply_overrides(cfg, ["training=1"])

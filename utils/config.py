"""One config module: load `conf.yaml` (or an overlay on it), apply `--set` overrides, validate, save.

The base `conf.yaml` is its own schema: every key that may exist is in it, and the type of its
value is the type every overlay and override must keep. That keeps one source of truth for the
config keys, and a typo (`training.epoch=2`) fails before any data is touched.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml

from utils.errors import UserError

CONFIG_NAME = "config.yaml"  # the resolved config written next to every output
BASE_KEY = "base"  # an overlay names the file it overlays with `base: <path relative to it>`


class ConfigError(UserError):
    pass


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def _type_name(value: Any) -> str:
    return type(value).__name__ if value is not None else "null"


def _check_type(key: str, old: Any, new: Any) -> Any:
    """Return `new` if it may replace `old` (same type, int for float, anything for null)."""
    if old is None or new is None:
        return new
    if isinstance(old, bool) or isinstance(new, bool):
        if isinstance(old, bool) and isinstance(new, bool):
            return new
    elif isinstance(old, float) and isinstance(new, (int, float)):
        return float(new)
    elif isinstance(old, int) and isinstance(new, int):
        return new
    elif isinstance(old, (str, list, dict)) and isinstance(new, type(old)):
        return new
    raise ConfigError(
        f"config key '{key}': expected {_type_name(old)}, got {_type_name(new)} ({new!r})")


def merge(base: dict, overlay: dict, prefix: str = "") -> dict:
    """Recursively overlay `overlay` on a copy of `base`; unknown keys and wrong types raise."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        dotted = f"{prefix}{key}"
        if key not in out:
            raise ConfigError(f"unknown config key '{dotted}'")
        if isinstance(out[key], dict) and out[key] and isinstance(value, dict):
            out[key] = merge(out[key], value, dotted + ".")
        else:
            out[key] = _check_type(dotted, out[key], value)
    return out


def _split_dotted(cfg: dict, dotted: str) -> list[str]:
    """Split `a.b.c` into existing keys; a key may itself contain dots (`Cnn14_mAP=0.431.pth`)."""
    parts, node, rest = [], cfg, dotted
    while True:
        if not isinstance(node, dict):
            raise ConfigError(f"unknown config key '{dotted}'")
        match = next((k for k in sorted(node, key=lambda k: -len(str(k)))
                      if rest == str(k) or rest.startswith(f"{k}.")), None)
        if match is None:
            raise ConfigError(f"unknown config key '{dotted}'")
        parts.append(match)
        if rest == str(match):
            return parts
        rest, node = rest[len(str(match)) + 1:], node[match]


def _split_assignment(cfg: dict, item: str) -> tuple[str, str]:
    """Split `key=value` at the first `=` whose left side is a known key (keys may hold `=`)."""
    positions = [i for i, ch in enumerate(item) if ch == "="]
    for i in positions:
        try:
            _split_dotted(cfg, item[:i].strip().lstrip("-"))
        except ConfigError:
            continue
        return item[:i].strip().lstrip("-"), item[i + 1:]
    return item[:positions[0]].strip().lstrip("-"), item[positions[0] + 1:]


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply `dotted.key=value` strings; each value is parsed as YAML (`2`, `true`, `[a, b]`)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        dotted, raw = _split_assignment(cfg, item)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override '{item}': value is not valid YAML") from None
        keys = _split_dotted(cfg, dotted)
        node = cfg
        for k in keys[:-1]:
            node = node[k]
        if isinstance(node[keys[-1]], dict) and node[keys[-1]]:
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' is a section; set one of its keys")
            node[keys[-1]] = merge(node[keys[-1]], value, dotted + ".")
        else:
            node[keys[-1]] = _check_type(dotted, node[keys[-1]], value)
    return cfg


def load_yaml_chain(path: str | Path) -> dict:
    """Load a config file, following `base:` to the file it overlays (validated against it)."""
    path = Path(path)
    data = _read_yaml(path)
    base_name = data.pop(BASE_KEY, None)
    if base_name is None:
        return data
    base = load_yaml_chain(path.parent / base_name)
    return merge(base, data)


def load_config(path: str | Path = "conf.yaml", overrides: Iterable[str] = ()) -> dict:
    """The resolved config: file (with its `base:` chain) plus `--set` overrides."""
    cfg = load_yaml_chain(path)
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    """Checks that types alone cannot express."""
    for key in ("dataset_dir", "pretrained_dir", "output_dir"):
        if not isinstance(cfg.get("paths", {}).get(key), str) or not cfg["paths"][key]:
            raise ConfigError(f"config key 'paths.{key}' must be a non-empty path")
    choices = {
        ("audio_encoder", "init"): ("prior", "random"),
        ("criterion", "dist"): ("dot_product", "cosine_similarity"),
        ("wandb", "mode"): ("auto", "online", "offline", "disabled"),
        ("training", "amp"): ("auto", "bf16", "fp16", "off"),
        ("features", "device"): ("auto", "cpu", "cuda"),
    }
    for (section, key), allowed in choices.items():
        value = cfg.get(section, {}).get(key)
        if value is not None and value not in allowed:
            raise ConfigError(f"config key '{section}.{key}': {value!r} is not one of {', '.join(allowed)}")


def save_config(cfg: dict, directory: str | Path, name: str = CONFIG_NAME) -> Path:
    """Write the resolved config next to an output (atomically), and return its path."""
    from utils.io_utils import atomic_write_text

    path = Path(directory) / name
    atomic_write_text(path, yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def require_dir(cfg: dict, key: str) -> Path:
    """The directory under `paths.<key>`, which must exist (named in the error if not)."""
    path = Path(cfg["paths"][key])
    if not path.is_dir():
        raise ConfigError(f"config key 'paths.{key}' points at '{path}', which is not a directory")
    return path

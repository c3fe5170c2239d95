"""One config module: load a config file (and the files it overlays), apply `--set`, validate, save.

The repository's `conf.yaml` holds every key and its default; `utils/config_schema.py` holds each
key's constraint. Every config file — an overlay with `base:`, a run's saved `config.yaml`, a
file of your own without `base:` — is merged onto the repository's conf.yaml, so a key it lacks
keeps its default and a key conf.yaml lacks (a typo) is an error. Values are read as a
researcher writes them, the schema's type deciding what ambiguous text means: `1e-3` is a float
where a float is expected, `off` stays a string where a string is expected (YAML 1.1 would make
them a string and a bool), `null` only where the key may be null. Overlays and `--set` share
this one reader. `validate` checks every key's type and range before a script does any work.
"""
from __future__ import annotations

import collections.abc
import copy
import difflib
import functools
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from utils.config_schema import CROSS_RULES, SCHEMA, Key, check_value
from utils.errors import UserError

CONFIG_NAME = "config.yaml"  # the resolved config written next to every output
BASE_KEY = "base"  # an overlay names the file it overlays with `base: <path relative to it>`
DEFAULTS_PATH = Path(__file__).resolve().parents[1] / "conf.yaml"  # keys and defaults

NULL_WORDS = {"null", "Null", "NULL", "~", ""}
TRUE_WORDS = {"true", "yes", "on"}
FALSE_WORDS = {"false", "no", "off"}


class ConfigError(UserError):
    pass


# --------------------------------------------------------------------------- reading YAML text

class Plain(str):
    """An unquoted scalar as written: what it means is decided by the key's type."""


class _RawLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Safe YAML without implicit typing: every unquoted scalar comes back as `Plain` text."""


_RawLoader.yaml_implicit_resolvers = {}
_RawLoader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])
_RawLoader.add_constructor(
    "tag:yaml.org,2002:str",  # style None (pure-Python parser) or "" (libyaml): unquoted
    lambda loader, node: Plain(loader.construct_scalar(node)) if not node.style
    else loader.construct_scalar(node))


def _no_duplicate_keys(loader: _RawLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """YAML lets a later `training:` replace an earlier one whole, keys and all, unseen."""
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, collections.abc.Hashable):
            continue  # a list as a key: SafeConstructor refuses it below, naming its line
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key `{key}` appears twice in one mapping (lines {seen[key]} and "
                f"{key_node.start_mark.line + 1}); YAML keeps only the last one", key_node.start_mark)
        seen[key] = key_node.start_mark.line + 1
    return yaml.constructor.SafeConstructor.construct_mapping(loader, node, deep)


_RawLoader.construct_mapping = _no_duplicate_keys


def read_raw(text: str) -> Any:
    """YAML text -> dicts, lists and `Plain`/quoted strings (explicit tags like `!!float` kept)."""
    return yaml.load(text, Loader=_RawLoader)


def _read_file(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file — pass a .yaml file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
        data = read_raw(text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e, text)})") from None
    if data is None:
        return {}  # an empty file (or only comments): the defaults
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """What is wrong and on which line: the first line of the error alone ("while scanning for
    the next token") says neither."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if not problem:
        return str(e).splitlines()[0]
    if mark is None or re.search(r"\blines? \d", problem):  # a duplicate key names its lines itself
        return problem
    where = f"{problem}, line {mark.line + 1} column {mark.column + 1}"
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    if "\t" in line[:mark.column + 1]:
        where += ": a tab, and YAML indents with spaces only"
    return where


# --------------------------------------------------------------------------- typed values

def parse_value(dotted: str, key: Key, raw: Any) -> Any:
    """The value `raw` (as read by `read_raw`) means for `key`; ConfigError naming `dotted` if none.

    Only the type is decided here; ranges and choices are `check_value`'s.
    """
    if raw is None or (isinstance(raw, Plain) and raw.strip() in NULL_WORDS):
        return None
    if key.type == "list":
        if not isinstance(raw, list):
            raise ConfigError(f"config key '{dotted}': expected {key.type_name}, got {_show(raw)} "
                              "— write a list: [a, b]")
        return [parse_value(f"{dotted}[{i}]", key.item, item) for i, item in enumerate(raw)]
    if isinstance(raw, (dict, list)):
        raise ConfigError(f"config key '{dotted}': expected {key.type}, got {_show(raw)}")
    if key.type == "str":
        if isinstance(raw, str):
            return str(raw)
    elif isinstance(raw, str):
        text = raw.strip()
        if key.type == "bool" and text.lower() in TRUE_WORDS | FALSE_WORDS:
            return text.lower() in TRUE_WORDS
        if key.type == "int" and re.fullmatch(r"[-+]?[0-9][0-9_]*", text):
            return int(text)
        if key.type == "float":
            try:
                return float(text)  # 1e-3, 1E-3, 5e-4, .5, 1_000.0
            except ValueError:
                pass
    elif key.type == "bool" and isinstance(raw, bool):
        return raw
    elif key.type in ("int", "float") and isinstance(raw, (int, float)) and not isinstance(raw, bool):
        if key.type == "float":
            return float(raw)
        if isinstance(raw, int):
            return raw
    hint = " (true/false, yes/no, on/off)" if key.type == "bool" else ""
    raise ConfigError(f"config key '{dotted}': expected {key.type}{hint}, got {_show(raw)}")


def _show(raw: Any) -> str:
    if isinstance(raw, dict):
        return "a mapping"
    if isinstance(raw, str):
        return repr(str(raw))
    return "null" if raw is None else repr(raw)


def _untyped(raw: Any) -> Any:
    """Plain YAML 1.1 reading, for a key the schema does not list (the suite fails until it
    does: tests/test_config.py)."""
    if isinstance(raw, Plain):
        return yaml.safe_load(raw) if raw.strip() else None
    if isinstance(raw, str):
        return str(raw)
    if isinstance(raw, list):
        return [_untyped(v) for v in raw]
    if isinstance(raw, dict):
        return {str(k): _untyped(v) for k, v in raw.items()}
    return raw


def _leaf(dotted: str, raw: Any) -> Any:
    """Typed and range-checked value of one key (ConfigError naming the key)."""
    key = SCHEMA.get(dotted)
    if key is None:
        return _untyped(raw)
    value = parse_value(dotted, key, raw)
    if key.path and isinstance(value, str) and value.startswith("~"):
        value = os.path.expanduser(value)  # else a folder named `~` in the working directory
    problem = check_value(dotted, key, value)
    if problem:
        raise ConfigError(problem)
    return value


def _located(source: str | None, e: ConfigError) -> ConfigError:
    return ConfigError(f"{source}: {e}") if source else e


# --------------------------------------------------------------------------- merging

def merge(base: dict, overlay: dict, prefix: str = "", source: str | None = None) -> dict:
    """`overlay` (as read by `read_raw`) on a copy of the typed `base`. Keys must exist in `base`
    and values fit their schema; `source` (a file, `--set`) prefixes the error."""
    out = copy.deepcopy(base)
    for key, raw in overlay.items():
        key = str(key)
        dotted = f"{prefix}{key}"
        if key not in out:
            raise _located(source, ConfigError(f"unknown config key '{dotted}'{_suggest(dotted)}"))
        if isinstance(out[key], dict):
            if raw is None or (isinstance(raw, Plain) and not raw.strip()):
                continue  # `section:` with every key commented out
            if not isinstance(raw, dict):
                raise _located(source, ConfigError(
                    f"config key '{dotted}' is a section; set its keys ({dotted}.<key>)"))
            out[key] = merge(out[key], raw, dotted + ".", source)
            continue
        try:
            out[key] = _leaf(dotted, raw)
        except ConfigError as e:
            raise _located(source, e) from None
    return out


def _suggest(dotted: str) -> str:
    # a key at the wrong depth (`lr`, `training.factor`) is found by its own name first: the
    # closest spelling of the whole path would be another key of the same section
    name = dotted.rsplit(".", 1)[-1]
    same_name = [key for key, last in _leaves(defaults()) if last == name]
    if same_name:
        return f" — did you mean {' or '.join(repr(k) for k in same_name)}?"
    close = difflib.get_close_matches(dotted, _flat(defaults()), n=1, cutoff=0.75)
    return f" — did you mean '{close[0]}'?" if close else " — conf.yaml lists every key"


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, str]]:
    """[(dotted key, its own name)] of every leaf (a name may hold dots: `Cnn14_mAP=0.431.pth`)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", str(key)))
    return out


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of every leaf."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def flat_config(cfg: dict) -> dict[str, Any]:
    """{dotted key: value} of every key of a config, e.g. {"training.lr": 0.001, ...}."""
    return _flat(cfg)


def _split_dotted(cfg: dict, dotted: str) -> list[str]:
    """Split `a.b.c` into existing keys; a key may itself contain dots (`Cnn14_mAP=0.431.pth`)."""
    parts, node, rest = [], cfg, dotted
    while True:
        if not isinstance(node, dict):
            raise ConfigError(f"unknown config key '{dotted}'{_suggest(dotted)}")
        match = next((k for k in sorted(node, key=lambda k: -len(str(k)))
                      if rest == str(k) or rest.startswith(f"{k}.")), None)
        if match is None:
            raise ConfigError(f"unknown config key '{dotted}'{_suggest(dotted)}")
        parts.append(match)
        if rest == str(match):
            return parts
        rest, node = rest[len(str(match)) + 1:], node[match]


def _split_assignment(cfg: dict, item: str) -> tuple[str, str]:
    """Split `key=value` at the first `=` whose left side is a known key (keys may hold `=`)."""
    positions = [i for i, ch in enumerate(item) if ch == "="]
    for i in positions:
        try:
            _split_dotted(cfg, item[:i].strip())
        except ConfigError:
            continue
        return item[:i].strip(), item[i + 1:]
    return item[:positions[0]].strip(), item[positions[0] + 1:]


def _override_value(text: str, key: Key | None) -> Any:
    """The text after `=`, read as an overlay value is. Where the key takes a string the text is
    taken as it is (a path may hold `: ` or ` #`), unless it is quoted or a null word."""
    text = text.strip()
    if key is not None and key.type == "str":
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            try:
                return read_raw(text)
            except yaml.YAMLError:
                pass
        return Plain(text)
    if not text:
        return Plain("")
    try:
        return read_raw(text)
    except yaml.YAMLError:
        raise ConfigError(f"value {text!r} is not valid YAML") from None


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """Apply `dotted.key=value` strings, read as in a config file (`2`, `1e-3`, `off`, `[a, b]`)."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        try:
            if "=" not in item:
                raise ConfigError(f"'{item}' is not of the form dotted.key=value")
            dotted, text = _split_assignment(cfg, item)
            keys = _split_dotted(cfg, dotted)
            dotted = ".".join(map(str, keys))
            node = cfg
            for k in keys[:-1]:
                node = node[k]
            raw = _override_value(text, SCHEMA.get(dotted))
            if isinstance(node[keys[-1]], dict):
                if not isinstance(raw, dict):
                    raise ConfigError(f"config key '{dotted}' is a section; set one of its keys "
                                      f"({dotted}.<key>=...)")
                node[keys[-1]] = merge(node[keys[-1]], raw, dotted + ".")
            else:
                node[keys[-1]] = _leaf(dotted, raw)
        except ConfigError as e:
            raise ConfigError(f"--set: {e}") from None
    return cfg


# --------------------------------------------------------------------------- files

@functools.lru_cache(maxsize=4)
def _defaults_cached(path: str, mtime_ns: int) -> dict:
    raw = _read_file(Path(path))
    if BASE_KEY in raw:
        raise ConfigError(f"{path}: the repository's conf.yaml holds every key; it has no `base:`")
    return _typed(raw, "", path)


def _typed(raw: dict, prefix: str, source: str) -> dict:
    out = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out[str(key)] = _typed(value, dotted + ".", source)
        else:
            try:
                out[str(key)] = _leaf(dotted, value)
            except ConfigError as e:
                raise _located(source, e) from None
    return out


def defaults() -> dict:
    """The repository's conf.yaml, typed: every key and its default."""
    if not DEFAULTS_PATH.is_file():
        raise ConfigError(f"{DEFAULTS_PATH}: the repository's conf.yaml is missing (every key "
                          "and its default live there); restore it with git")
    return copy.deepcopy(_defaults_cached(str(DEFAULTS_PATH), DEFAULTS_PATH.stat().st_mtime_ns))


def config_chain(path: str | Path) -> list[tuple[Path, dict]]:
    """[(file, its raw keys)], the file `path` overlays (via `base:`) first; loops are an error."""
    chain: list[tuple[Path, dict]] = []
    path = Path(path)
    while True:
        if any(path.resolve() == p.resolve() for p, _ in chain):
            names = " -> ".join(str(p) for p in [*(p for p, _ in chain), path])
            raise ConfigError(f"config files overlay each other in a loop: {names} (via `base:`); "
                              "remove the `base:` line that closes it")
        raw = _read_file(path)
        base = raw.pop(BASE_KEY, None)
        chain.append((path, raw))
        if base is None:
            return list(reversed(chain))
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: `base:` must name the config file this one overlays, "
                              f"got {_show(base)}")
        named_by, path = path, path.parent / str(base)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found (the `base:` of {named_by}; it is "
                              "read relative to that file's folder)")


def load_config(path: str | Path = "conf.yaml", overrides: Iterable[str] = ()) -> dict:
    """The resolved config: the repository's conf.yaml, then the file `path` with its `base:`
    chain, then the `--set` overrides; validated."""
    cfg = defaults()
    for file, raw in config_chain(path):
        cfg = merge(cfg, raw, source=str(file))
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def load_run_config(run_dir: str | Path, overrides: Iterable[str] = ()) -> dict:
    """The config a run was trained with, read back from its directory, plus `overrides`."""
    path = Path(run_dir) / CONFIG_NAME
    if not _read_file(path):  # would be read as the defaults, which need not be the run's
        raise ConfigError(f"{path}: empty, but main.py writes a run's whole config there; restore "
                          "it (a copy is in the checkpoints: `config`) or start a new run")
    return load_config(path, overrides)


def validate(cfg: dict) -> None:
    """Every key present, of its type and in its range; the rules across keys. ConfigError
    naming the key otherwise."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"expected a mapping of config keys, got {type(cfg).__name__}")
    expected, got = _flat(defaults()), _flat(cfg)
    for dotted in expected:
        if dotted not in got:
            raise ConfigError(f"config key '{dotted}' is missing")
    for dotted, value in got.items():
        if dotted not in expected:
            raise ConfigError(f"unknown config key '{dotted}'{_suggest(dotted)}")
        problem = check_value(dotted, SCHEMA[dotted], value) if dotted in SCHEMA else None
        if problem:
            raise ConfigError(problem)
    for rule in CROSS_RULES:
        problem = rule(cfg)
        if problem:
            raise ConfigError(problem)


def dump_config(cfg: dict) -> str:
    """The config as YAML text (what save_config writes and --print-config prints)."""
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)


def save_config(cfg: dict, directory: str | Path, name: str = CONFIG_NAME) -> Path:
    """Write the resolved config next to an output (atomically), and return its path."""
    from utils.io_utils import atomic_write_text

    path = Path(directory) / name
    atomic_write_text(path, dump_config(cfg))
    return path


def require_dir(cfg: dict, key: str) -> Path:
    """The directory under `paths.<key>`, which must exist (named in the error if not)."""
    path = Path(cfg["paths"][key])
    if not path.is_dir():
        raise ConfigError(f"config key 'paths.{key}' points at '{path}', which is not a directory")
    return path

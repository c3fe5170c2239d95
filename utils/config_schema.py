"""What every config key may hold: its type, whether it may be null, its range or choices.

`conf.yaml` is the source of the key set and of the defaults; this file holds one constraint per
dotted key of it (tests/test_config.py checks that both list exactly the same keys, so a key
added to conf.yaml without a constraint fails the suite). The type here decides how a value
written in an overlay or with `--set` is read (utils/config.py): `1e-3` is a float where a float
is expected, `off` a string where a string is expected, `null` only where `nullable`.

Keys are dotted paths; a few names themselves contain dots (`clotho_captions_development.csv`),
which is unambiguous because the schema is looked up with the path conf.yaml already has.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

# Names honoured by models.core.build_model and utils.train_utils.build_trainer; the registries
# there must list exactly these (tests/test_config.py checks it).
AUDIO_ENCODERS = ("CNN14Encoder",)
TEXT_ENCODERS = ("SentBERTBaseEncoder",)
CRITERIA = ("LogSoftmaxLoss",)
MONITORS = ("val_loss", "val_t2a_mAP@10", "val_t2a_R@1", "val_t2a_R@5", "val_t2a_R@10")
AMP = ("auto", "bf16", "fp16", "off")
SEED_MAX = 2**32 - 1  # numpy's limit; torch generators are seeded with seed * 1_000_003 + epoch


@dataclass(frozen=True)
class Key:
    """The constraint on one config value (`type`: int, float, bool, str or list)."""

    type: str
    nullable: bool = False
    gt: float | None = None                     # numbers: value > gt
    ge: float | None = None                     # value >= ge
    lt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None      # str: one of these
    pattern: str | None = None                  # str: must match (fullmatch) ...
    pattern_doc: str = ""                       # ... and this says what it means
    item: "Key | None" = None                   # list: the constraint on every item
    length: int | None = None                   # list: exactly this many items
    min_items: int = 0
    unique: bool = False
    path: bool = False                          # str: a file path (a leading ~ is expanded)

    @property
    def type_name(self) -> str:
        return f"list of {self.item.type}" if self.type == "list" and self.item else self.type

    def range_text(self) -> str:
        """`> 0`, `in (0, 1)`, `>= 0`: the range as messages write it."""
        if self.gt is not None and self.lt is not None:
            return f"in ({_num(self.gt)}, {_num(self.lt)})"
        parts = [f"{op} {_num(v)}" for op, v in ((">", self.gt), (">=", self.ge),
                                                  ("<", self.lt), ("<=", self.le)) if v is not None]
        return " and ".join(parts)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


# Short constructors, so the table below reads as a list of constraints.
def Int(**kw) -> Key:
    return Key("int", **kw)


def Float(**kw) -> Key:
    return Key("float", **kw)


def Bool() -> Key:
    return Key("bool")


def Str(**kw) -> Key:
    return Key("str", **kw)


def Choice(*choices: str) -> Key:
    return Key("str", choices=tuple(choices))


def List(item: Key, **kw) -> Key:
    return Key("list", item=item, **kw)


NAME = dict(pattern=r"[^/\\\x00]+", pattern_doc="a non-empty name without '/'")
# No shell reads the config: a `$VAR` would stay literal text and name a folder `$VAR` in the
# working directory. `~` is expanded (utils.config._leaf), as Path.expanduser would.
PATH = dict(pattern=r"(?s)(?!.*\$(?:\{|[A-Za-z_])).*\S.*", path=True,
            pattern_doc="a non-empty path with any $VARIABLE written out (a config file does not "
                        "expand them; the shell does, in an unquoted --set)")
PATH_KEY = Str(**PATH)
DEVICE = Str(pattern=r"auto|cpu|cuda(:\d+)?", pattern_doc="auto, cpu, cuda or cuda:N")
MD5 = Str(nullable=True, pattern=r"[0-9a-fA-F]{32}", pattern_doc="32 hex digits (an md5), or null")
URL = Str(pattern=r"(?i)(https?|file)://\S+", pattern_doc="an http(s):// or file:// URL")
SEED = Int(ge=0, le=SEED_MAX)
SPLITS = List(Str(**NAME), min_items=1, unique=True)
CLOTHO_FILES = ("clotho_captions_development.csv", "clotho_captions_validation.csv",
                "clotho_captions_evaluation.csv", "clotho_metadata_development.csv",
                "clotho_metadata_validation.csv", "clotho_metadata_evaluation.csv",
                "clotho_audio_development.7z", "clotho_audio_validation.7z", "clotho_audio_evaluation.7z")

SCHEMA: dict[str, Key] = {
    "experiment": Str(**NAME),
    "seed": SEED,

    "paths.dataset_dir": PATH_KEY,
    "paths.pretrained_dir": PATH_KEY,
    "paths.output_dir": PATH_KEY,
    "paths.features_dir": Str(nullable=True, **PATH),

    "download.clotho_url": URL,
    "download.panns_url": URL,
    **{f"download.clotho_files.{name}": MD5 for name in CLOTHO_FILES},
    "download.panns_files.Cnn14_mAP=0.431.pth": MD5,
    "download.baseline_url": URL,
    "download.baseline_record": URL,
    "download.keep_archives": Bool(),
    "download.timeout_s": Float(gt=0),

    "data.splits": SPLITS,
    "data.train_split": Str(**NAME),
    "data.val_split": Str(**NAME),
    "data.skip_bad_audio": Bool(),

    "features.window_s": Float(gt=0),
    "features.hop_s": Float(gt=0),
    "features.n_mels": Int(gt=0),
    "features.workers": Int(gt=0),
    "features.device": DEVICE,
    "features.flush_every": Int(gt=0),

    "sbert.model": Str(**PATH),
    "sbert.batch_size": Int(gt=0),
    "sbert.device": DEVICE,

    "audio_encoder.name": Choice(*AUDIO_ENCODERS),
    "audio_encoder.out_dim": Int(gt=0),
    "audio_encoder.init": Choice("prior", "random"),
    "audio_encoder.weights": Str(**PATH),
    "audio_encoder.panns_checkpoint": Str(**PATH),
    "audio_encoder.trainable": Bool(),
    "audio_encoder.channels": List(Int(gt=0), length=6),

    "text_encoder.name": Choice(*TEXT_ENCODERS),
    "text_encoder.out_dim": Int(gt=0),
    "text_encoder.embeddings": Str(**PATH),

    "imported.checkpoint": Str(nullable=True, **PATH),
    "imported.md5": MD5,
    "imported.source": Str(nullable=True, pattern=r"(?s).*\S.*", pattern_doc="a non-empty text"),

    "criterion.name": Choice(*CRITERIA),
    "criterion.temperature": Float(gt=0),
    "criterion.dist": Choice("dot_product", "cosine_similarity"),

    "training.epochs": Int(gt=0),
    "training.batch_size": Int(ge=2),  # InfoNCE needs negatives: one pair gives a loss of 0
    "training.lr": Float(gt=0),
    "training.weight_decay": Float(ge=0),
    "training.scheduler.factor": Float(gt=0, lt=1),
    "training.scheduler.patience": Int(ge=0),
    "training.scheduler.threshold": Float(ge=0),
    "training.scheduler.threshold_mode": Choice("rel", "abs"),
    "training.scheduler.min_lr": Float(ge=0),
    "training.monitor": Choice(*MONITORS),
    "training.early_stopping": Int(ge=0),
    "training.max_frames": Int(ge=0),
    "training.num_workers": Int(ge=0),
    "training.amp": Choice(*AMP),
    "training.device": DEVICE,
    "training.log_every": Int(gt=0),
    "training.compile": Choice("auto", "on", "off"),
    "training.pad_to_multiple": Int(ge=0),
    "training.sync_batchnorm": Bool(),

    "eval.splits": SPLITS,
    "eval.checkpoint": Choice("best", "last"),
    "eval.batch_size": Int(gt=0),
    "eval.top_k": Int(gt=0),
    "eval.device": DEVICE,
    "eval.amp": Choice("off", "auto", "bf16", "fp16"),
    "eval.figure_titles": Bool(),
    "eval.report.enabled": Bool(),
    "eval.report.worst": Int(ge=0),
    "eval.report.random": Int(ge=0),
    "eval.report.clips_per_query": Int(gt=0),
    "eval.report.seed": SEED,
    "eval.report.audio": Choice("copy", "link"),
    "eval.submission.audio_dir": Str(nullable=True, **PATH),
    "eval.submission.captions": Str(nullable=True, **PATH),

    "wandb.project": Str(pattern=r"[^/\\#?%:\s]+", pattern_doc="a project name without / \\ # ? % : or spaces"),
    "wandb.entity": Str(nullable=True, pattern=r"\S+", pattern_doc="a non-empty name, or null"),
    "wandb.mode": Choice("auto", "online", "offline", "disabled"),
    "wandb.tags": List(Str(pattern=r"(?s).{1,64}", pattern_doc="1 to 64 characters")),

    "demo.seed": SEED,
    "demo.sizes.development": Int(gt=0),
    "demo.sizes.validation": Int(gt=0),
    "demo.sizes.evaluation": Int(gt=0),
    "demo.min_seconds": Float(ge=1.5),  # CNN14 needs 64 frames (1.28 s) of a 20 ms hop
    "demo.max_seconds": Float(gt=0),
    "demo.workers": Int(gt=0),
}


# --------------------------------------------------------------------------- rules across keys

def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _le(small: str, big: str, why: str) -> Callable[[dict], str | None]:
    def rule(cfg: dict) -> str | None:
        a, b = _get(cfg, small), _get(cfg, big)
        if a > b:
            return f"config key '{small}' ({a}) must be <= {big} ({b}): {why}"
        return None
    return rule


def _fixed(key: str, value: Any, why: str) -> Callable[[dict], str | None]:
    def rule(cfg: dict) -> str | None:
        found = _get(cfg, key)
        if found != value:
            return f"config key '{key}' ({found}) must be {value}: {why}"
        return None
    return rule


def _same(a_key: str, b_key: str, why: str) -> Callable[[dict], str | None]:
    def rule(cfg: dict) -> str | None:
        a, b = _get(cfg, a_key), _get(cfg, b_key)
        if a != b:
            return f"config key '{b_key}' ({b}) must equal {a_key} ({a}): {why}"
        return None
    return rule


CROSS_RULES: tuple[Callable[[dict], str | None], ...] = (
    _le("features.hop_s", "features.window_s", "frames would skip samples"),
    # = utils.audio_utils.N_MELS (tests/test_config.py checks it); a key all the same, so that
    # conf.yaml states the feature definition and step 02 records it in each HDF5
    _fixed("features.n_mels", 64, "CNN14 (its bn0 and the AudioSet weights) takes 64 mel bands"),
    _same("audio_encoder.out_dim", "text_encoder.out_dim", "both encoders map into one space"),
    _le("demo.min_seconds", "demo.max_seconds", "durations are drawn from [min_seconds, max_seconds]"),
)


# --------------------------------------------------------------------------- checking one value

def check_value(dotted: str, key: Key, value: Any) -> str | None:
    """What is wrong with an already-typed `value` for `key` (a message naming it), or None."""
    if value is None:
        return None if key.nullable else f"config key '{dotted}' may not be null ({_expected(key)})"
    if key.type == "list":
        if not isinstance(value, list):
            return f"config key '{dotted}': expected {key.type_name}, got {_show(value)}"
        if key.length is not None and len(value) != key.length:
            return (f"config key '{dotted}': expected {key.length} items, got {len(value)} "
                    f"({_show(value)})")
        if len(value) < key.min_items:
            return f"config key '{dotted}': expected at least {key.min_items} item(s), got {_show(value)}"
        if key.unique and len(set(map(repr, value))) != len(value):
            return f"config key '{dotted}': items must differ, got {_show(value)}"
        for i, item in enumerate(value):
            problem = check_value(f"{dotted}[{i}]", key.item, item)
            if problem:
                return problem
        return None
    if not _has_type(key.type, value):
        return f"config key '{dotted}': expected {key.type}, got {_show(value)}"
    if key.type in ("int", "float"):
        if not math.isfinite(value):
            return f"config key '{dotted}': expected a finite number, got {value!r}"
        ok = ((key.gt is None or value > key.gt) and (key.ge is None or value >= key.ge)
              and (key.lt is None or value < key.lt) and (key.le is None or value <= key.le))
        if not ok:
            return f"config key '{dotted}' must be {key.range_text()}, got {value!r}"
    if key.type == "str":
        if key.choices is not None and value not in key.choices:
            return f"config key '{dotted}': {value!r} is not one of {', '.join(key.choices)}"
        if key.pattern is not None and not re.fullmatch(key.pattern, value):
            return f"config key '{dotted}': expected {key.pattern_doc}, got {value!r}"
    return None


def _has_type(type_: str, value: Any) -> bool:
    if type_ == "bool":
        return isinstance(value, bool)
    if type_ == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if type_ == "float":  # an int is a float's value too (`lr: 1`)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if type_ == "str":
        return isinstance(value, str)
    raise ValueError(f"unknown schema type {type_!r}")


def _expected(key: Key) -> str:
    if key.choices:
        return f"one of {', '.join(key.choices)}"
    return f"expected {key.type_name}" + (f" {key.range_text()}" if key.range_text() else "")


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)

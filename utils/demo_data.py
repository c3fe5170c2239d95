"""The embedded demo dataset: synthetic sound scenes in the Clotho v2.1 layout, with captions.

Each clip mixes one to three sound events from a small vocabulary of clearly distinct synthetic
sounds (beeps, chirps, rain, wind, clicks, hum, siren, knocks). Each event has attributes (how
high, how fast, which direction, how heavy) and the clip has an order (A then B, or A with B in
the background). The five captions per clip describe exactly that in varied words, so that
text -> audio retrieval is learnable by a small CNN on log-mels and a frozen sentence embedding.

Written into `dataset_dir`, exactly as Clotho v2.1 is laid out:
    clotho_captions_{split}.csv   header file_name,caption_1,...,caption_5 (csv module, CRLF)
    {split}/<file_name>           44.1 kHz mono 16-bit PCM wav
    .demo_dataset.json            marker: the generator's settings, and whether it completed

Everything is deterministic: clip i of a split is drawn from its own generator seeded with
(seed, split, i), so the same settings give byte-identical files, and changing one split's size
does not change the clips of another.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from utils.errors import UserError, raise_if_stopped
from utils.io_utils import atomic_open, ensure_dir

SAMPLE_RATE = 44100  # Clotho's rate
SPLITS = ("development", "validation", "evaluation")
SPLIT_TAGS = {"development": "dev", "validation": "val", "evaluation": "eval"}
CAPTION_HEADER = ["file_name"] + [f"caption_{i}" for i in range(1, 6)]
CAPTIONS_PER_CLIP = 5
MARKER = ".demo_dataset.json"
# Bump when the synthesis or captions change, so an old generation is not taken for current.
FORMAT_VERSION = 1
# Real Clotho has file names with a leading space; the demo keeps exactly one, in development.
LEADING_SPACE_INDEX = 7
# Shortest clip allowed: CNN14 pools time by 2 six times, so it needs >= 64 frames at a 20 ms
# hop (1.28 s); a margin keeps the random event layout sensible too.
MIN_CLIP_SECONDS = 1.5
# Files that later preprocessing steps derive from the audio and captions: stale once the demo
# is regenerated with other settings (same file names, hence same fids, but other content).
DERIVED_PATTERNS = ("audio_info.pkl", "vocab_info.pkl", "sbert_embeds.pkl", "*_text.csv",
                    "*_audio_logmels.hdf5", "*_skipped_audio.csv", "config.0[1-9]_*.yaml")
DERIVED_DIRS = ("*_audio_logmels.parts",)  # step 02's resumable work in progress


# ----------------------------------------------------------------------------------------------
# Vocabulary: what each event is called, and the words for its attribute values.

# Adjective synonyms per (attribute, value). Every caption names every attribute value of every
# event, with one of these words, so the information needed for retrieval is in each caption.
ADJECTIVES: dict[tuple[str, str], tuple[str, ...]] = {
    ("pitch", "high"): ("high", "high-pitched", "shrill"),
    ("pitch", "low"): ("low", "low-pitched", "deep"),
    ("speed", "fast"): ("fast", "rapid", "quick"),
    ("speed", "slow"): ("slow", "slow-paced", "unhurried"),
    ("direction", "rising"): ("rising", "ascending", "upward"),
    ("direction", "falling"): ("falling", "descending", "downward"),
    ("intensity", "heavy"): ("heavy", "intense", "pouring"),
    ("intensity", "light"): ("light", "gentle", "soft"),
}
# Attribute words come in this order before the noun ("a rapid shrill beeping").
ATTRIBUTE_ORDER = ("speed", "intensity", "pitch", "direction")


@dataclass(frozen=True)
class EventKind:
    """One kind of sound: its attributes, how captions name it, and how it is synthesised.

    nouns: (noun, number) with number "s" (countable singular: takes a/an), "p" (plural) or
    "m" (mass noun); verbs: (third person singular, plural) used in clauses ("rain falls").
    ambient: may play in the background of the whole clip. synth(rng, n, attrs) -> float [n].
    """
    name: str
    attrs: dict[str, tuple[str, ...]]
    nouns: tuple[tuple[str, str], ...]
    verbs: tuple[tuple[str, str], ...]
    synth: Callable[[np.random.Generator, int, dict], np.ndarray]
    ambient: bool = False
    decor: tuple[str, ...] = ()  # optional uninformative adjectives, for variety


# ----------------------------------------------------------------------------------------------
# Synthesis. Each function returns a float64 waveform [n] at SAMPLE_RATE; levels are normalised
# later, so only the shape of the sound matters here.

def _time(n: int) -> np.ndarray:
    return np.arange(n) / SAMPLE_RATE


def _gate(t: np.ndarray, rate: float, duty: float, phase0: float, ramp_s: float = 0.005) -> np.ndarray:
    """Repeating on/off envelope [n] in [0, 1]: on for `duty` of each cycle, with linear ramps
    of `ramp_s` seconds so the edges do not click."""
    phase = (t * rate + phase0) % 1.0
    ramp = max(ramp_s * rate, 1e-6)  # ramp length in cycles
    return np.clip(np.minimum(phase, duty - phase) / ramp, 0.0, 1.0)


def _fast_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: FFTs of arbitrary (possibly prime) lengths are slow, and
    a power of two can be nearly twice as long as needed."""
    best = 1 << max(int(n - 1).bit_length(), 1)
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            q = p35
            while q < n:
                q *= 2
            best = min(best, q)
            p35 *= 3
        p5 *= 5
    return best


def _filtered_noise(rng: np.random.Generator, n: int, lo: float = 0.0, hi: float | None = None,
                    pink: bool = False) -> np.ndarray:
    """White (or pink, 1/f power) noise [n] band-limited to [lo, hi] Hz in the frequency domain."""
    size = _fast_len(n)
    spec = np.fft.rfft(rng.standard_normal(size))
    freqs = np.fft.rfftfreq(size, 1.0 / SAMPLE_RATE)
    gain = np.ones_like(freqs)
    if pink:
        gain = 1.0 / np.sqrt(np.maximum(freqs, 20.0))
    # Smooth (4th-order-like) roll-offs instead of brick walls.
    if lo > 0:
        gain = gain / np.sqrt(1.0 + (lo / np.maximum(freqs, 1.0)) ** 4)
    if hi is not None:
        gain = gain / np.sqrt(1.0 + (freqs / hi) ** 4)
    return np.fft.irfft(spec * gain, size)[:n]


def _impulses(rng: np.random.Generator, n: int, rate: float, jitter: float) -> np.ndarray:
    """A regular impulse train [n] at `rate` per second, each onset jittered by up to `jitter`
    of a period and with a random amplitude in [0.7, 1]."""
    period = SAMPLE_RATE / rate
    onsets = np.arange(rng.uniform(0, period), n, period)
    onsets = onsets + rng.uniform(-jitter, jitter, onsets.size) * period
    onsets = np.clip(onsets.astype(np.int64), 0, n - 1)
    train = np.zeros(n)
    train[onsets] = rng.uniform(0.7, 1.0, onsets.size)
    return train


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """x [n] convolved with kernel [k], truncated to [n] (FFT: kernels are up to 3500 taps)."""
    size = _fast_len(x.size + kernel.size - 1)
    return np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(kernel, size), size)[: x.size]


def synth_beep(rng, n, attrs):
    """Repeated beeps at a fixed pitch: high ~2 kHz or low ~400 Hz; fast ~8/s or slow ~2/s."""
    t = _time(n)
    f0 = rng.uniform(1800, 2600) if attrs["pitch"] == "high" else rng.uniform(300, 480)
    rate = rng.uniform(7, 9) if attrs["speed"] == "fast" else rng.uniform(1.6, 2.4)
    tone = np.sin(2 * np.pi * f0 * t) + 0.3 * np.sin(4 * np.pi * f0 * t)
    return tone * _gate(t, rate, rng.uniform(0.35, 0.5), rng.uniform())


def synth_chirp(rng, n, attrs):
    """Repeated exponential sweeps between ~600 Hz and ~3 kHz, upwards or downwards."""
    t = _time(n)
    period = rng.uniform(0.35, 0.6)
    f_lo, f_hi = rng.uniform(500, 700), rng.uniform(2500, 3500)
    offset = rng.uniform()
    pos = (t / period + offset) % 1.0  # position inside the current sweep; silent after 0.8
    if attrs["direction"] == "falling":
        pos = 0.8 - pos
    freq = f_lo * (f_hi / f_lo) ** np.clip(pos / 0.8, 0.0, 1.0)
    tone = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)
    return tone * _gate(t, 1.0 / period, 0.8, offset)


def synth_rain(rng, n, attrs):
    """Rain: heavy = dense broadband noise with many drops; light = sparse drops, faint hiss."""
    heavy = attrs["intensity"] == "heavy"
    k = np.arange(int(0.004 * SAMPLE_RATE))
    drop = rng.standard_normal(k.size) * np.exp(-k / (0.0008 * SAMPLE_RATE))
    drops = _convolve(_impulses(rng, n, rng.uniform(150, 250) if heavy else rng.uniform(12, 25), 0.5), drop)
    hiss = _filtered_noise(rng, n, lo=300, hi=9000, pink=True)
    hiss /= np.std(hiss) + 1e-12
    drops /= np.std(drops) + 1e-12
    return (1.0 * hiss + 0.6 * drops) if heavy else (0.08 * hiss + 1.0 * drops)


def synth_wind(rng, n, attrs):
    """Wind: low-passed noise with slow, irregular swells (two slow amplitude modulations)."""
    t = _time(n)
    noise = _filtered_noise(rng, n, lo=60, hi=rng.uniform(350, 700))
    swell = (0.55 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.3, 0.6) * t + rng.uniform(0, 6.3))
             + 0.15 * np.sin(2 * np.pi * rng.uniform(0.9, 1.4) * t + rng.uniform(0, 6.3)))
    return noise * swell


def synth_clicks(rng, n, attrs):
    """Sharp high ticks (~4 kHz resonance, 2 ms): fast ~11/s or slow ~2.5/s."""
    rate = rng.uniform(9, 13) if attrs["speed"] == "fast" else rng.uniform(2, 3)
    k = np.arange(int(0.002 * SAMPLE_RATE))
    tick = np.sin(2 * np.pi * rng.uniform(3500, 5000) * k / SAMPLE_RATE) * np.exp(-k / (0.0004 * SAMPLE_RATE))
    return _convolve(_impulses(rng, n, rate, 0.05), tick)


def synth_hum(rng, n, attrs):
    """A steady low hum: ~100-140 Hz fundamental with decaying harmonics and a slight wobble."""
    t = _time(n)
    f0 = rng.uniform(90, 140)
    x = 2 * np.pi * f0 * t
    # sin(kx) by the recurrence sin(kx) = 2 cos(x) sin((k-1)x) - sin((k-2)x): one sin, one cos.
    two_cos, prev, cur = 2 * np.cos(x), np.zeros_like(x), np.sin(x)
    tone = cur.copy()
    for k in range(2, 9):
        prev, cur = cur, two_cos * cur - prev
        tone += cur / k
    return tone * (1.0 + 0.05 * np.sin(2 * np.pi * 2.0 * t))


def synth_siren(rng, n, attrs):
    """A siren: a tone whose pitch swings around ~1 kHz, fast (~5/s warble) or slow (~0.6/s wail)."""
    t = _time(n)
    rate = rng.uniform(4, 6) if attrs["speed"] == "fast" else rng.uniform(0.5, 0.8)
    freq = rng.uniform(800, 1100) + rng.uniform(250, 400) * np.sin(2 * np.pi * rate * t + rng.uniform(0, 6.3))
    phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
    return np.sin(phase) + 0.3 * np.sin(2 * phase)


def synth_knock(rng, n, attrs):
    """Knocks: low damped thuds (~120-220 Hz, 80 ms) with a little attack noise; fast ~7/s or slow ~2/s."""
    rate = rng.uniform(6, 8) if attrs["speed"] == "fast" else rng.uniform(1.5, 2.2)
    k = np.arange(int(0.08 * SAMPLE_RATE))
    env = np.exp(-k / (0.018 * SAMPLE_RATE))
    thud = (np.sin(2 * np.pi * rng.uniform(120, 220) * k / SAMPLE_RATE)
            + 0.3 * rng.standard_normal(k.size) * np.exp(-k / (0.002 * SAMPLE_RATE))) * env
    return _convolve(_impulses(rng, n, rate, 0.08), thud)


EVENT_KINDS: dict[str, EventKind] = {e.name: e for e in (
    EventKind("beep", {"pitch": ("high", "low"), "speed": ("fast", "slow")},
              nouns=(("beeps", "p"), ("beeping", "m"), ("beeping tone", "s"), ("bleeps", "p"),
                     ("electronic beeping", "m")),
              verbs=(("sounds", "sound"), ("goes off", "go off"), ("rings out", "ring out")),
              synth=synth_beep),
    EventKind("chirp", {"direction": ("rising", "falling")},
              nouns=(("chirp", "s"), ("whistle", "s"), ("sweep", "s"), ("chirps", "p"),
                     ("whistling", "m")),
              verbs=(("sounds", "sound"), ("repeats", "repeat"), ("plays", "play")),
              synth=synth_chirp),
    EventKind("rain", {"intensity": ("heavy", "light")},
              nouns=(("rain", "m"), ("rainfall", "m"), ("rain shower", "s")),
              verbs=(("falls", "fall"), ("comes down", "come down"), ("patters", "patter")),
              synth=synth_rain, ambient=True),
    EventKind("wind", {},
              nouns=(("wind", "m"), ("gusts of wind", "p"), ("wind noise", "m")),
              verbs=(("blows", "blow"), ("howls", "howl"), ("rushes past", "rush past")),
              synth=synth_wind, ambient=True, decor=("howling", "strong")),
    EventKind("clicks", {"speed": ("fast", "slow")},
              nouns=(("clicking", "m"), ("ticking", "m"), ("clicks", "p"), ("ticks", "p")),
              verbs=(("sounds", "sound"), ("continues", "continue"), ("goes on", "go on")),
              synth=synth_clicks, decor=("mechanical", "sharp")),
    EventKind("hum", {},
              nouns=(("hum", "s"), ("humming", "m"), ("drone", "s"), ("buzz", "s")),
              verbs=(("drones on", "drone on"), ("hums", "hum"), ("continues", "continue")),
              synth=synth_hum, ambient=True, decor=("electrical", "steady", "constant", "mechanical")),
    EventKind("siren", {"speed": ("fast", "slow")},
              nouns=(("siren", "s"), ("alarm", "s"), ("wailing siren", "s"), ("warble", "s")),
              verbs=(("wails", "wail"), ("sounds", "sound"), ("goes off", "go off")),
              synth=synth_siren),
    EventKind("knock", {"speed": ("fast", "slow")},
              nouns=(("knocking", "m"), ("knocks", "p"), ("knocking on a door", "m"), ("thuds", "p"),
                     ("knocking on wood", "m")),
              verbs=(("sounds", "sound"), ("repeats", "repeat"), ("goes on", "go on")),
              synth=synth_knock),
)}


def event_words(kind: str) -> set[str]:
    """The words captions may use to name an event of this kind (each word of each noun)."""
    return {w for noun, _ in EVENT_KINDS[kind].nouns for w in noun.split()}


# ----------------------------------------------------------------------------------------------
# Scenes: which events, with which attributes, where in the clip.

@dataclass
class Event:
    kind: str
    attrs: dict[str, str]
    start: float  # seconds
    end: float


@dataclass
class Scene:
    """A clip's content: `foreground` events in time order, and an optional `background` event
    that spans the whole clip."""
    duration: float
    foreground: list[Event] = field(default_factory=list)
    background: Event | None = None

    @property
    def events(self) -> list[Event]:
        return self.foreground + ([self.background] if self.background else [])


def _random_atom(rng: np.random.Generator, kinds: list[str]) -> tuple[str, dict[str, str]]:
    kind = kinds[rng.integers(len(kinds))]
    attrs = {a: values[rng.integers(len(values))] for a, values in EVENT_KINDS[kind].attrs.items()}
    return kind, attrs


def sample_scene(rng: np.random.Generator, duration: float) -> Scene:
    """Draw 1-3 events: a single event, a sequence of 2 or 3, or 1-2 in sequence over an ambient
    background. Foreground events are distinct (kind, attributes) pairs; the background is an
    ambient kind not used in the foreground."""
    n_events = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    with_background = n_events > 1 and rng.uniform() < 0.45
    n_fg = n_events - int(with_background)
    all_kinds = list(EVENT_KINDS)
    atoms: list[tuple[str, dict[str, str]]] = []
    while len(atoms) < n_fg:
        atom = _random_atom(rng, all_kinds)
        if atom not in atoms:
            atoms.append(atom)
    scene = Scene(duration=duration)
    # Sequence: slot boundaries at equal shares of the clip, jittered; each event starts a
    # little after its slot opens and may overlap the next one by up to 0.1 s.
    bounds = np.linspace(0.0, duration, n_fg + 1)
    bounds[1:-1] += rng.uniform(-0.12, 0.12, n_fg - 1) * duration / n_fg
    for i, (kind, attrs) in enumerate(atoms):
        start = bounds[i] + rng.uniform(0.0, 0.15)
        end = bounds[i + 1] - rng.uniform(-0.1, 0.05) if i < n_fg - 1 else duration - rng.uniform(0.0, 0.2)
        scene.foreground.append(Event(kind, attrs, float(start), float(min(end, duration))))
    if with_background:
        used = {k for k, _ in atoms}
        kind, attrs = _random_atom(rng, [k for k, e in EVENT_KINDS.items() if e.ambient and k not in used])
        scene.background = Event(kind, attrs, float(rng.uniform(0.0, 0.2)), float(duration - rng.uniform(0.0, 0.2)))
    return scene


def synthesize(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Mix the scene's events into a float32 waveform [round(duration * SAMPLE_RATE)] with peak
    in [0.5, 0.9]: each event RMS-normalised, faded in/out, at a random gain (background
    quieter), plus faint white noise so no two clips are identical."""
    n = int(round(scene.duration * SAMPLE_RATE))
    mix = np.zeros(n)
    for event in scene.events:
        a, b = int(event.start * SAMPLE_RATE), min(int(event.end * SAMPLE_RATE), n)
        m = b - a
        if m <= 0:
            continue
        x = EVENT_KINDS[event.kind].synth(rng, m, event.attrs)
        x = x / (np.sqrt(np.mean(x ** 2)) + 1e-12)
        fade = min(int(0.02 * SAMPLE_RATE), m // 2)
        ramp = np.linspace(0.0, 1.0, fade, endpoint=False)
        x[:fade] *= ramp
        x[m - fade:] *= ramp[::-1]
        gain = rng.uniform(0.25, 0.45) if event is scene.background else rng.uniform(0.6, 1.0)
        mix[a:b] += gain * x
    mix += rng.uniform(0.003, 0.012) * rng.standard_normal(n)
    mix *= rng.uniform(0.5, 0.9) / (np.max(np.abs(mix)) + 1e-12)
    return mix.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Captions.

def _pick(rng: np.random.Generator, options):
    return options[rng.integers(len(options))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class _Phrase:
    text: str    # noun phrase with its article ("a rapid shrill beeping tone", "heavy rain")
    plural: bool


def noun_phrase(rng: np.random.Generator, event: Event, sound_of: bool = True) -> _Phrase:
    """A noun phrase naming the event and every one of its attribute values, in random words;
    `sound_of` allows "the sound of ..." before a mass noun (not as a clause's subject)."""
    kind = EVENT_KINDS[event.kind]
    noun, number = _pick(rng, kind.nouns)
    words = [_pick(rng, ADJECTIVES[(a, event.attrs[a])]) for a in ATTRIBUTE_ORDER if a in event.attrs]
    if kind.decor and rng.uniform() < 0.3:
        words.insert(0, _pick(rng, kind.decor))
    words.append(noun)
    text = " ".join(words)
    if number == "s":
        text = f"{_article(text)} {text}"
    elif number == "m" and sound_of and rng.uniform() < 0.25:
        text = f"the sound of {text}"
    return _Phrase(text, number == "p")


def _clause(rng: np.random.Generator, event: Event, generic: bool = True) -> str:
    """A clause with the event as subject: "heavy rain falls", "rapid knocks repeat"; `generic`
    also allows "... can be heard"."""
    p = noun_phrase(rng, event, sound_of=False)
    verbs = EVENT_KINDS[event.kind].verbs + ((("can be heard", "can be heard"),) if generic else ())
    singular, plural = _pick(rng, verbs)
    return f"{p.text} {plural if p.plural else singular}"


def _be(p: _Phrase) -> str:
    return "are" if p.plural else "is"


def _foreground_text(rng: np.random.Generator, fg: list[Event]) -> str:
    """One description of the foreground events, in their order."""
    phrase = lambda e: noun_phrase(rng, e).text  # noqa: E731 - short local helpers
    clause = lambda e: _clause(rng, e)  # noqa: E731
    if len(fg) == 1:
        a = fg[0]
        pa = noun_phrase(rng, a)
        return _pick(rng, [
            lambda: pa.text,
            lambda: f"{pa.text} can be heard",
            lambda: f"there {_be(pa)} {pa.text}",
            lambda: clause(a),
            lambda: f"{clause(a)} for a few seconds",
            lambda: f"a recording of {pa.text}",
            lambda: f"{pa.text} {_be(pa)} heard throughout",
        ])()
    if len(fg) == 2:
        a, b = fg
        pa = noun_phrase(rng, a)
        return _pick(rng, [
            lambda: f"{pa.text} followed by {phrase(b)}",
            lambda: f"{pa.text}, then {phrase(b)}",
            lambda: f"first {pa.text}, then {phrase(b)}",
            lambda: f"{clause(b)} after {pa.text}",
            lambda: f"{pa.text} and then {phrase(b)}",
            lambda: f"{pa.text} {_be(pa)} followed by {phrase(b)}",
            lambda: f"after {pa.text}, {clause(b)}",
            lambda: f"{clause(a)}, and afterwards {clause(b)}",
            lambda: f"{pa.text} stop{'' if pa.plural else 's'} and {clause(b)}",
        ])()
    a, b, c = fg
    pa = noun_phrase(rng, a)
    return _pick(rng, [
        lambda: f"{pa.text}, then {phrase(b)}, then {phrase(c)}",
        lambda: f"first {pa.text}, then {phrase(b)}, and finally {phrase(c)}",
        lambda: f"{pa.text} followed by {phrase(b)} and then {phrase(c)}",
        lambda: f"{clause(a)}, then {clause(b)}, and then {clause(c)}",
        lambda: f"{pa.text}, {phrase(b)} and finally {phrase(c)}, one after another",
        lambda: f"{pa.text} {_be(pa)} followed by {phrase(b)}, and then {phrase(c)}",
    ])()


def _with_background(rng: np.random.Generator, fg_text: str, bg: Event) -> str:
    bg_np = lambda: noun_phrase(rng, bg, sound_of=False).text  # noqa: E731
    return _pick(rng, [
        lambda: f"{fg_text} with {bg_np()} in the background",
        lambda: f"{fg_text} while {_clause(rng, bg, generic=False)} in the background",
        lambda: f"{fg_text}, accompanied by {bg_np()}",
        lambda: f"{fg_text} over a background of {bg_np()}",
        lambda: f"while {_clause(rng, bg, generic=False)}, {fg_text}",
        lambda: f"with {bg_np()} in the background, {fg_text}",
    ])()


def make_captions(rng: np.random.Generator, scene: Scene, n: int = CAPTIONS_PER_CLIP) -> list[str]:
    """`n` captions for the scene, each naming every event, its attribute values and the order;
    sentence case with a final period, like Clotho's."""
    captions: list[str] = []
    for _ in range(20 * n):  # redraw duplicates; the vocabulary always allows n distinct ones
        text = _foreground_text(rng, scene.foreground)
        if scene.background is not None:
            text = _with_background(rng, text, scene.background)
        text = text[0].upper() + text[1:] + "."
        if text not in captions:
            captions.append(text)
        if len(captions) == n:
            break
    while len(captions) < n:  # unreachable in practice; keeps the 5-caption contract regardless
        captions.append(captions[-1])
    return captions


# ----------------------------------------------------------------------------------------------
# Clips, files, the whole dataset.

@dataclass(frozen=True)
class DemoSettings:
    seed: int
    sizes: dict[str, int]
    min_seconds: float
    max_seconds: float

    def as_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "seed": self.seed, "sizes": dict(self.sizes),
                "min_seconds": self.min_seconds, "max_seconds": self.max_seconds,
                "sample_rate": SAMPLE_RATE}


def demo_settings(cfg: dict) -> DemoSettings:
    """Validated settings from the config's `demo:` section (UserError naming the bad key)."""
    demo = cfg.get("demo")
    if not isinstance(demo, dict):
        raise UserError("config key 'demo': missing (sizes, seed, min_seconds, max_seconds)")
    sizes = demo.get("sizes") or {}
    for split in SPLITS:
        value = sizes.get(split)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"config key 'demo.sizes.{split}': expected a positive number of clips, got {value!r}")
    lo, hi = float(demo["min_seconds"]), float(demo["max_seconds"])
    if lo < MIN_CLIP_SECONDS:
        raise UserError(f"config key 'demo.min_seconds': {lo} s is too short; at least {MIN_CLIP_SECONDS} s "
                        "gives CNN14 the 64 log-mel frames it needs")
    if hi < lo:
        raise UserError(f"config key 'demo.max_seconds': {hi} is below demo.min_seconds ({lo})")
    return DemoSettings(int(demo["seed"]), {s: int(sizes[s]) for s in SPLITS}, lo, hi)


def demo_workers(cfg: dict) -> int:
    """Processes that render clips: `demo.workers`, at least 1."""
    return max(1, int(cfg.get("demo", {}).get("workers", 1)))


def clip_name(split: str, index: int) -> str:
    """`demo_dev_0007.wav`; the development clip LEADING_SPACE_INDEX (or the last one of a
    smaller split) gets a leading space, as three real Clotho names do."""
    return f"demo_{SPLIT_TAGS[split]}_{index:04d}.wav"


def leading_space_index(n_development: int) -> int:
    return min(LEADING_SPACE_INDEX, n_development - 1)


def make_clip(settings: DemoSettings, split: str, index: int) -> tuple[Scene, np.ndarray, list[str]]:
    """Clip `index` of `split`: (scene, int16 waveform [samples], 5 captions). Its own random
    generator, seeded with (seed, split, index), makes it independent of every other clip."""
    rng = np.random.default_rng([settings.seed, SPLITS.index(split), index])
    duration = float(rng.uniform(settings.min_seconds, settings.max_seconds))
    scene = sample_scene(rng, duration)
    audio = synthesize(scene, rng)
    captions = make_captions(rng, scene)
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
    return scene, pcm, captions


def wav_bytes(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A canonical RIFF/WAVE file (mono, 16-bit PCM) as bytes: no timestamps, so deterministic."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.astype("<i2").tobytes())
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def _captions_csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)  # QUOTE_MINIMAL and CRLF line ends, as the official files
    writer.writerow(CAPTION_HEADER)
    writer.writerows(rows)
    return buf.getvalue()


def expected_files(dataset_dir: Path, settings: DemoSettings) -> list[Path]:
    files = [dataset_dir / f"clotho_captions_{s}.csv" for s in SPLITS]
    for split in SPLITS:
        names = [clip_name(split, i) for i in range(settings.sizes[split])]
        if split == "development":
            i = leading_space_index(settings.sizes[split])
            names[i] = " " + names[i]
        files += [dataset_dir / split / name for name in names]
    return files


def is_complete(dataset_dir: Path, settings: DemoSettings) -> bool:
    """True if a generation with exactly these settings finished here (marker written last)
    and all its files are still present."""
    marker = dataset_dir / MARKER
    try:
        if json.loads(marker.read_text(encoding="utf-8")) != {**settings.as_dict(), "complete": True}:
            return False
    except (OSError, ValueError):
        return False
    return all(p.is_file() and p.stat().st_size > 0 for p in expected_files(dataset_dir, settings))


def _write_marker(dataset_dir: Path, settings: DemoSettings, complete: bool) -> None:
    """The marker says this directory is the generator's; `complete` only once all files are in."""
    text = json.dumps({**settings.as_dict(), "complete": complete}, indent=1, sort_keys=True) + "\n"
    _write_bytes(dataset_dir / MARKER, text.encode())


def _check_target(dataset_dir: Path) -> None:
    """Write only into an empty directory or one this generator owns (its marker is there):
    never over a real Clotho copy or anything else, since stale files get deleted."""
    if (dataset_dir / MARKER).exists() or not any(dataset_dir.iterdir()):
        return
    raise UserError(f"{dataset_dir}: not empty and not written by the demo generator (no {MARKER}); "
                    "set paths.dataset_dir to a new directory")


def _remove_stale(dataset_dir: Path, keep: set[Path]) -> list[Path]:
    """Delete demo wavs not in this generation and files derived from an older generation."""
    removed = []
    for split in SPLITS:
        for path in sorted((dataset_dir / split).glob("*demo_*.wav")):
            if path not in keep:
                path.unlink()
                removed.append(path)
    for pattern in DERIVED_PATTERNS:
        for path in sorted(dataset_dir.glob(pattern)):
            if path.is_file():
                path.unlink()
                removed.append(path)
    for pattern in DERIVED_DIRS:
        for path in sorted(dataset_dir.glob(pattern)):
            if path.is_dir():
                shutil.rmtree(path)
                removed.append(path)
    return removed


@dataclass
class GenerationResult:
    dataset_dir: Path
    counts: dict[str, int]      # clips per split
    regenerated: bool           # False: an identical complete generation was already there
    removed: list[Path] = field(default_factory=list)


def _render(task: tuple[DemoSettings, str, int]) -> tuple[bytes, list[str]]:
    """Worker: one clip as (wav file bytes, captions)."""
    settings, split, index = task
    _, pcm, captions = make_clip(settings, split, index)
    return wav_bytes(pcm), captions


def _init_worker() -> None:
    """A forked worker inherits the parent's handlers: utils.cli's SIGTERM handler would raise
    inside it (a traceback per worker, and a worker unwinding while it holds the pool's queue
    lock leaves the other waiting forever). Workers die on SIGTERM, as processes do by default,
    and leave Ctrl-C to the parent, which stops the pool."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def generate_dataset(dataset_dir: str | Path, settings: DemoSettings, workers: int = 1,
                     progress: bool = True) -> GenerationResult:
    """Write the demo dataset into `dataset_dir` (Clotho layout) unless the same settings were
    already generated there completely. Clips are rendered by `workers` processes (the output
    does not depend on it: every clip has its own seed). Each file is written atomically; the
    marker says "complete" only after the last file, so an interrupted run is redone, not reused."""
    import multiprocessing

    from tqdm import tqdm

    dataset_dir = Path(dataset_dir)
    counts = dict(settings.sizes)
    if is_complete(dataset_dir, settings):
        return GenerationResult(dataset_dir, counts, regenerated=False)
    ensure_dir(dataset_dir)
    _check_target(dataset_dir)
    _write_marker(dataset_dir, settings, complete=False)  # owns the directory, not complete yet
    removed = _remove_stale(dataset_dir, set(expected_files(dataset_dir, settings)))
    tasks = [(settings, split, i) for split in SPLITS for i in range(counts[split])]
    pool = multiprocessing.Pool(workers, _init_worker) if workers > 1 else None
    try:
        results = pool.imap(_render, tasks, chunksize=8) if pool else map(_render, tasks)
        rows: dict[str, list[list[str]]] = {split: [] for split in SPLITS}
        space_at = leading_space_index(counts["development"])
        for (_, split, i), (data, captions) in tqdm(zip(tasks, results), total=len(tasks),
                                                     desc="demo clips", unit="clip", disable=not progress):
            name = (" " if split == "development" and i == space_at else "") + clip_name(split, i)
            _write_bytes(dataset_dir / split / name, data)
            rows[split].append([name] + captions)
            raise_if_stopped()
    except BaseException:
        if pool:
            pool.terminate()  # SIGTERM: a worker dies at once (see _init_worker)
            pool.join()
        raise
    if pool:
        pool.close()  # every clip is back: the workers are idle, let them exit
        pool.join()
    for split in SPLITS:
        # bytes, so the CRLF line ends of the csv module survive on every platform
        _write_bytes(dataset_dir / f"clotho_captions_{split}.csv", _captions_csv(rows[split]).encode("utf-8"))
    _write_marker(dataset_dir, settings, complete=True)
    return GenerationResult(dataset_dir, counts, regenerated=True, removed=removed)

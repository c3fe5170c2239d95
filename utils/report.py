"""The retrieval report of a run: `<run>/report/index.html`, a page to read and to listen to.

What a run retrieves, not only how well: the metrics with their chance levels, the training and
recall@k plots, a histogram of the true clip's rank, and listening panels for a sample of
queries in both directions (the `eval.report.worst` worst-ranked ones and `eval.report.random`
drawn with `eval.report.seed`). The page opens from the file system with no server and no
network, and the folder can be zipped and sent: its clips are transcoded into `report/audio/`
(Ogg Opus, mono, 24-48 kbit/s within a size budget), or, with `eval.report.audio: link`, linked to the dataset's wavs by
relative paths. Every piece of user text (captions, file names, run names) is HTML-escaped.

The same sample feeds the wandb tables (`log_to_tracker`) and `postprocessing/query.py --html`
(`write_query_page`).
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import quote

import numpy as np

from utils.errors import UserError
from utils.io_utils import atomic_path, atomic_write_text, ensure_dir, remove_stale_temps

REPORT_DIR = "report"
INDEX = "index.html"
AUDIO_DIR = "audio"
PLOTS_DIR = "plots"
DIRECTIONS = {"t2a": "text → audio", "a2t": "audio → text"}
TABLE_TOP = 10           # file names per caption in the wandb table of every query (the fork's)
AUDIO_MODES = ("copy", "link")

# Ogg Opus: every current browser plays it, and it keeps speech and environmental sound
# intelligible at a fraction of Vorbis's bitrate (libsndfile's Vorbis cannot go below ~50 kbit/s
# mono). Opus only takes 8/12/16/24/48 kHz input, hence the resampling to 48 kHz.
OPUS_RATE = 48000
OPUS_SUFFIX = ".opus"
# libsndfile maps compression_level 0..1 linearly onto Opus's (variable) target bitrate, from
# ~258 down to ~6 kbit/s. Measured on 30 s of noise / a tone: 21 / 25 kbit/s for a 24 target,
# 29 / 33 for 32, 45 / 49 for 48 (tests/test_report.py checks within 20 %).
OPUS_KBPS_AT_LEVEL_0, OPUS_KBPS_AT_LEVEL_1 = 258.0, 6.0
# The bitrate is chosen per report: as high as MAX_KBPS allows while the clips fit AUDIO_BUDGET
# (the "well under 50 MB", with room for the page and figures), but never below
# MIN_KBPS, where Opus still keeps environmental sound recognisable. A Clotho-sized sample
# (2 splits, ~560 clips of ~22 s) gets ~26 kbit/s; the demo's (~250 clips of 3.5 s) 48.
AUDIO_BUDGET = 40e6            # bytes
MIN_KBPS, MAX_KBPS = 24, 48
TRANSCODE_THREADS = 2    # libsndfile and soxr release the GIL: two clips at once


# --------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ReportSettings:
    worst: int = 20
    random: int = 20
    clips_per_query: int = 5
    seed: int = 0
    audio: str = "copy"


def settings(cfg: dict) -> ReportSettings:
    """`eval.report.*` (utils/config_schema.py has already checked the values)."""
    rc = cfg["eval"]["report"]
    return ReportSettings(worst=rc["worst"], random=rc["random"],
                          clips_per_query=rc["clips_per_query"], seed=rc["seed"], audio=rc["audio"])


# --------------------------------------------------------------------------- sampling

def sample_queries(ranks: np.ndarray, worst: int, n_random: int, seed: int) -> list[tuple[int, str]]:
    """The listening sample: `[(query index, "worst" | "random")]`, no query twice.

    The `worst` queries with the highest rank of their true item (ties: lower index first),
    worst first; then `n_random` drawn without replacement from the others with
    `numpy.random.default_rng(seed)`, in index order. The same inputs give the same sample.
    """
    ranks = np.asarray(ranks)
    n = len(ranks)
    order = np.lexsort((np.arange(n), -ranks))            # rank descending, index ascending
    worst_idx = order[:min(worst, n)]
    rest = np.setdiff1d(np.arange(n), worst_idx)          # sorted
    rng = np.random.default_rng(seed)
    drawn = np.sort(rng.choice(rest, size=min(n_random, len(rest)), replace=False)) if len(rest) else []
    return [(int(i), "worst") for i in worst_idx] + [(int(i), "random") for i in drawn]


# --------------------------------------------------------------------------- what a page shows

@dataclass(frozen=True)
class ClipRef:
    """A clip the page plays. `group` is its split (or "query"); `src` the audio file, None
    when it could not be found (then `problem` says so)."""
    group: str
    fname: str
    src: Path | None
    problem: str = ""


@dataclass
class Hit:
    text: str                    # a file name (t2a) or a caption (a2t)
    score: float
    correct: bool
    clip: ClipRef | None = None  # t2a: the retrieved clip
    note: str = ""               # what it is: t2a, one of the clip's captions; a2t, whose caption


@dataclass
class Panel:
    direction: str               # "t2a" | "a2t"
    why: str                     # "worst" | "random" | "query"
    query: str                   # the caption (t2a) or the clip's file name (a2t)
    n_candidates: int
    hits: list[Hit]
    rank: int | None = None      # rank of the first correct item; None for an ad-hoc query
    query_clip: ClipRef | None = None  # a2t: the clip that is the query
    true_clip: ClipRef | None = None   # t2a: the true clip, when it is not among the hits
    true_name: str = ""                # t2a: its file name
    true_score: float | None = None    # t2a: its score
    true_note: str = ""                # t2a: its first caption
    own: list[tuple[int, str, float]] = field(default_factory=list)  # a2t: (rank, caption, score)


@dataclass
class SplitSample:
    """What the report and wandb need from one split, without its score matrix."""
    split: str
    n_captions: int
    n_clips: int
    t2a_ranks: np.ndarray        # int64 [Q]: rank of each caption's clip
    a2t_ranks: np.ndarray        # int64 [C]: rank of each clip's best caption
    t2a: list[Panel]
    a2t: list[Panel]
    table_rows: list[list]       # every caption: caption, true file, rank, file_name_1..10


def _clip_ref(audio_root: Path, group: str, fname: str) -> ClipRef:
    from utils.clotho import resolve_wav

    src = resolve_wav(audio_root, fname) if audio_root.is_dir() else None
    if src is None:
        return ClipRef(group, fname, None, f"not found in the dataset folder ({group}/{fname})")
    return ClipRef(group, fname, src)


def split_sample(s, t2a_ranks: np.ndarray, top: np.ndarray, dataset_dir: str | Path,
                 opts: ReportSettings, a2t_ranks: np.ndarray | None = None) -> SplitSample:
    """The listening panels and the table of every query of one split.

    s: a utils.scores_db.ScoredSplit (scores `[Q, C]`); t2a_ranks: int `[Q]` (evaluation's);
    top: int `[Q, >=1]`, each caption's best clips (evaluation's top-k, for the table);
    dataset_dir: where `{split}/{fname}` wavs are (paths.dataset_dir); a2t_ranks: int `[C]`,
    each clip's best caption rank (evaluation's; computed here when not given).
    """
    from utils.evaluation import top_k_indices
    from utils.metrics import rank_of_first_relevant, relevant_ranks

    split, scores, own_clip = s.split, s.scores, np.asarray(s.caption_clip)
    n_q, n_c = scores.shape
    t2a_ranks = np.asarray(t2a_ranks, dtype=np.int64)
    rel = s.relevance()
    scores_t = np.ascontiguousarray(scores.T)             # [C, Q]: clips as queries
    if a2t_ranks is None:
        a2t_ranks = rank_of_first_relevant(scores_t, np.ascontiguousarray(rel.T))
    a2t_ranks = np.asarray(a2t_ranks, dtype=np.int64)
    from utils.clotho import split_paths

    audio_root = split_paths(dataset_dir, split)[1]  # Zenodo or aac-datasets layout
    refs: dict[int, ClipRef] = {}

    def ref(c: int) -> ClipRef:
        if c not in refs:
            refs[c] = _clip_ref(audio_root, split, s.fnames[c])
        return refs[c]

    k = opts.clips_per_query
    # what a wrong clip sounds like, in words, without listening to it: its first caption
    first_caption = {int(c): q for q, c in reversed(list(enumerate(own_clip.tolist())))}
    t2a = []
    picked = sample_queries(t2a_ranks, opts.worst, opts.random, opts.seed)
    if picked:
        rows = np.array([q for q, _ in picked])
        best = top_k_indices(scores[rows], k)             # [P, k]
        for (q, why), cols in zip(picked, best.tolist()):
            true_c = int(own_clip[q])
            hits = [Hit(s.fnames[c], float(scores[q, c]), c == true_c, ref(c),
                        note=s.captions[first_caption[c]]) for c in cols]
            shown = true_c in cols
            t2a.append(Panel("t2a", why, s.captions[q], n_c, hits, int(t2a_ranks[q]),
                             true_clip=None if shown else ref(true_c), true_name=s.fnames[true_c],
                             true_score=float(scores[q, true_c]),
                             true_note=s.captions[first_caption[true_c]]))

    a2t = []
    picked = sample_queries(a2t_ranks, opts.worst, opts.random, opts.seed)
    if picked:
        clips = np.array([c for c, _ in picked])
        best = top_k_indices(scores_t[clips], k)          # [P, k] caption indices
        q_idx, ranks = relevant_ranks(scores_t[clips], np.ascontiguousarray(rel.T[clips]))
        own_caps = np.nonzero(rel.T[clips])[1]            # caption index of each relevant pair
        for p, ((c, why), cols) in enumerate(zip(picked, best.tolist())):
            hits = [Hit(s.captions[q], float(scores[q, c]), int(own_clip[q]) == c,
                        note="" if int(own_clip[q]) == c else f"of {s.fnames[int(own_clip[q])]}")
                    for q in cols]
            mine = sorted((int(r), s.captions[int(q)], float(scores[q, c])) for r, q in
                          zip(ranks[q_idx == p], own_caps[q_idx == p]))
            a2t.append(Panel("a2t", why, s.fnames[c], n_q, hits, int(a2t_ranks[c]),
                             query_clip=ref(c), own=mine))

    top = np.asarray(top)[:, :TABLE_TOP].tolist()
    table_rows = [[s.captions[q], s.fnames[int(own_clip[q])], int(t2a_ranks[q])]
                  + [s.fnames[c] for c in top[q]] + [""] * (TABLE_TOP - len(top[q]))
                  for q in range(n_q)]
    return SplitSample(split, n_q, n_c, t2a_ranks, a2t_ranks, t2a, a2t, table_rows)


# --------------------------------------------------------------------------- audio

def _safe_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._")
    return stem[:40] or "clip"


def audio_name(clip: ClipRef) -> str:
    """`<group>/<readable stem>-<10 hex>.opus`: unique per (group, file name), URL-safe."""
    digest = hashlib.sha1(f"{clip.group}/{clip.fname}".encode()).hexdigest()[:10]
    group = _safe_stem(clip.group)
    return f"{group}/{_safe_stem(clip.fname)}-{digest}{OPUS_SUFFIX}"


def opus_kbps(total_seconds: float, budget: float = AUDIO_BUDGET) -> int:
    """The bitrate for `total_seconds` of audio: the budget spread over them, in [MIN, MAX]."""
    fits = budget * 8 / 1000 / max(total_seconds, 1e-9)
    return int(min(MAX_KBPS, max(MIN_KBPS, fits)))


def opus_level(kbps: float) -> float:
    """libsndfile's compression_level for a target Opus bitrate (see OPUS_KBPS_AT_LEVEL_*)."""
    span = OPUS_KBPS_AT_LEVEL_0 - OPUS_KBPS_AT_LEVEL_1
    return float(min(1.0, max(0.0, (OPUS_KBPS_AT_LEVEL_0 - kbps) / span)))


def transcode(src: Path, dest: Path, kbps: float = MAX_KBPS) -> Path:
    """Any audio libsndfile reads -> mono Ogg Opus at 48 kHz, ~`kbps` kbit/s (atomic write)."""
    import soundfile as sf
    import soxr  # installed with librosa

    from utils.audio_utils import load_audio

    y, sr = load_audio(src)                               # float32 [samples], mono
    if sr != OPUS_RATE:
        y = soxr.resample(y, sr, OPUS_RATE)
    y = np.clip(y, -1.0, 1.0)
    with atomic_path(dest) as tmp:                        # the temp name ends in .tmp: say the format
        sf.write(str(tmp), y, OPUS_RATE, format="OGG", subtype="OPUS",
                 compression_level=opus_level(kbps))
    return dest


@dataclass
class Playable:
    href: str | None             # URL relative to the page; None when it cannot be played
    path: Path | None            # the file that plays (for wandb), None when it cannot be played
    problem: str = ""


def _href(target: Path, page_dir: Path) -> str:
    """A relative URL from the page's folder to `target` (each path part percent-encoded)."""
    rel = os.path.relpath(Path(target).resolve(), Path(page_dir).resolve())
    return quote(Path(rel).as_posix(), safe="/")


def _reason(error: Exception, clip: ClipRef) -> str:
    """An audio error as page text, without the machine's absolute paths."""
    from utils.audio_utils import AudioError

    if isinstance(error, AudioError):
        detail = error.detail.replace(str(clip.src), clip.fname) if error.detail else ""
        return f"{error.reason} audio file" + (f" ({detail})" if detail else "")
    return f"could not be transcoded ({type(error).__name__})"


def _seconds(path: Path) -> float:
    import soundfile as sf

    try:
        return float(sf.info(str(path)).duration)
    except Exception:  # unreadable: transcode() says why on the panel
        return 0.0


def materialize(clips: Sequence[ClipRef], page_dir: Path, audio_dir: Path | None, mode: str
                ) -> tuple[dict[ClipRef, Playable], int | None]:
    """Make every clip playable from the page: transcoded into `audio_dir` (copy: each clip
    once, at the bitrate `opus_kbps` gives all of them; an existing file newer than its source
    is reused) or linked by a relative path. Returns ({clip: Playable}, kbit/s or None)."""
    out: dict[ClipRef, Playable] = {}
    todo = []
    for clip in dict.fromkeys(clips):                     # unique, in first-seen order
        if clip.src is None:
            out[clip] = Playable(None, None, clip.problem)
        elif mode == "link":
            out[clip] = Playable(_href(clip.src, page_dir), clip.src)
        else:
            dest = audio_dir / audio_name(clip)
            out[clip] = Playable(_href(dest, page_dir), dest)
            if not (dest.is_file() and dest.stat().st_mtime >= clip.src.stat().st_mtime):
                todo.append((clip, dest))

    kbps = None
    if mode != "link":
        kbps = opus_kbps(sum(_seconds(c.src) for c, p in out.items() if p.href))

    def work(item):
        clip, dest = item
        try:
            transcode(clip.src, dest, kbps)
            return clip, None
        except Exception as e:  # one bad clip is a note on its panel, not a failed report
            return clip, _reason(e, clip)

    if todo:
        with ThreadPoolExecutor(TRANSCODE_THREADS) as pool:
            for clip, problem in pool.map(work, todo):
                if problem:
                    out[clip] = Playable(None, None, problem)
    return out, kbps


def _prune(audio_dir: Path, keep: set[Path]) -> None:
    """Remove the report's own audio files (report/audio/**/*.opus) that the page no longer
    plays (an earlier sample), and folders left empty."""
    if not audio_dir.is_dir():
        return
    keep = {p.resolve() for p in keep}
    for path in sorted(audio_dir.rglob(f"*{OPUS_SUFFIX}")):
        if path.is_file() and path.resolve() not in keep:
            path.unlink()
    for folder in {p.parent for p in audio_dir.rglob("*.tmp")}:  # a killed run's half-written clips
        remove_stale_temps(folder)
    for path in sorted(audio_dir.rglob("*"), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if not any(audio_dir.iterdir()):
        audio_dir.rmdir()


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def format_size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 100_000 else f"{n_bytes / 1e3:.0f} kB"


# --------------------------------------------------------------------------- figures

def plot_rank_histogram(ranks: np.ndarray, n_candidates: int, split: str, out_png: Path) -> Path:
    """The page's own copy of a split's rank histogram (utils.plots.draw_rank_histogram), for a
    report written without the run's plots/: a small PNG, written atomically."""
    from utils.plots import draw_rank_histogram, plt

    fig = draw_rank_histogram(ranks, n_candidates, split)
    out_png = Path(out_png)
    try:
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return out_png


# --------------------------------------------------------------------------- HTML

def esc(value) -> str:
    """HTML-escape any value for text and for quoted attributes (quotes included)."""
    return html.escape(str(value), quote=True)


CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1280px;padding:0 18px 48px;color:#1d1d1f;background:#fafafa}
h1{font-size:1.5em;margin:18px 0 4px}h2{margin-top:32px;border-bottom:1px solid #ddd}
.meta{color:#555;margin:2px 0}.warn{color:#a40000;font-weight:600}.ok{color:#116611}
nav a{margin-right:12px}table{border-collapse:collapse;margin:8px 0}
td,th{padding:3px 9px;border-bottom:1px solid #e3e3e3;text-align:right}
th:first-child,td:first-child,th:nth-child(2),td:nth-child(2){text-align:left}
tr.chance td{color:#777;font-size:.9em;white-space:nowrap}figure{display:inline-block;margin:6px 12px 6px 0}
figure img{max-width:100%;border:1px solid #ddd;background:#fff}
figure.wide{display:block;margin-right:0}figure.wide img{width:100%;max-width:960px}
.scroll{overflow-x:auto;max-width:100%}figure.hist img{width:580px}
figure.full{display:block;margin-right:0}figure.full img{width:100%}
.panels{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
.panel{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 12px}
.panel h3{font-size:1em;margin:0 0 4px;font-weight:600}
.tag{display:inline-block;font-size:.75em;font-weight:600;padding:1px 6px;border-radius:8px;
margin-right:6px;vertical-align:1px;background:#eee;color:#444}.tag.worst{background:#fde2e1;color:#8a1010}
.rank{color:#555;font-size:.92em;margin:0 0 6px}
ol.hits{list-style:none;padding:0;margin:0}
ol.hits li{display:grid;grid-template-columns:2em 1.3em minmax(0,1fr) 4.2em;align-items:center;
gap:6px;padding:3px 4px;border-radius:4px}
ol.hits li.with-audio{grid-template-columns:2em 1.3em minmax(0,1fr) 4.2em 250px}
ol.hits li.correct{background:#e5f5e5}.pos{color:#777;text-align:right}.mark{color:#116611;font-weight:700}
.name{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.88em;overflow-wrap:anywhere}
.text{overflow-wrap:anywhere}
.note{display:block;color:#666;font:italic .85em system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
.score{color:#777;font-size:.85em;text-align:right}audio{width:250px;height:32px}
.missing{color:#a40000;font-size:.88em}.truth{margin-top:6px;padding:4px;border-top:1px dashed #ccc}
details{margin-top:6px;font-size:.92em}summary{cursor:pointer}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:4px 0 0 14px}
dt{font-weight:600}dd{margin:0;color:#333}
"""

# Players report their state into the page (data-* attributes and the status line): a reader
# sees at once whether every clip loads, and a headless browser test reads the same attributes.
SCRIPT = """
(function(){
var players=[].slice.call(document.querySelectorAll("audio")),ok=0,bad=0,
    out=document.getElementById("audio-status");
function show(){if(!out)return;
  out.textContent=bad?bad+" of "+players.length+" players could not load their audio"
    :ok+" of "+players.length+" players loaded";
  out.className=bad?"meta warn":(ok==players.length?"meta ok":"meta");}
function record(a){a.dataset.readyState=a.readyState;a.dataset.duration=a.duration;
  if(a.error)a.dataset.error=a.error.code;}
function loaded(a){if(!a.dataset.loaded){a.dataset.loaded="1";ok++;}record(a);show();}
function failed(a){if(!a.dataset.failed){a.dataset.failed="1";bad++;}record(a);show();}
players.forEach(function(a){
  a.addEventListener("loadeddata",function(){loaded(a);});
  a.addEventListener("error",function(){failed(a);});
  a.addEventListener("play",function(){players.forEach(function(b){if(b!==a)b.pause();});});
  if(a.error)failed(a);else if(a.readyState>=2)loaded(a);  // settled before this script ran
});
show();
})();
"""


def _player(play: Playable | None) -> str:
    if play is None:
        return ""
    if play.href is None:
        return f'<span class="missing">{esc(play.problem)}</span>'
    return f'<audio controls preload="metadata" src="{esc(play.href)}"></audio>'


def _hit_html(pos: int, hit: Hit, playable: Mapping[ClipRef, Playable]) -> str:
    audio = hit.clip is not None
    cls = " ".join(c for c in ("correct" if hit.correct else "", "with-audio" if audio else "") if c)
    mark = '<span class="mark" title="correct">✓</span>' if hit.correct else "<span></span>"
    player = f"<span>{_player(playable.get(hit.clip))}</span>" if audio else ""
    note = f'<span class="note">{esc(hit.note)}</span>' if hit.note else ""
    return (f'<li class="{cls}"><span class="pos">{pos}</span>{mark}'
            f'<span class="{"name" if audio else "text"}">{esc(hit.text)}{note}</span>'
            f'<span class="score" title="score: cosine similarity of the caption and '
            f'clip embeddings">{hit.score:+.3f}</span>{player}</li>')


def _hits_html(panel: Panel, playable: Mapping[ClipRef, Playable]) -> str:
    return ('<ol class="hits">' + "".join(_hit_html(pos, hit, playable)
                                          for pos, hit in enumerate(panel.hits, start=1)) + "</ol>")


def _truth_html(panel: Panel, playable: Mapping[ClipRef, Playable]) -> str:
    """The true clip below the hits, as a row of its own at its rank: its distance below rank 1
    tells a near miss (a few thousandths) from a clip the model places far off."""
    gap = panel.hits[0].score - panel.true_score
    row = Hit(panel.true_name, panel.true_score, True, panel.true_clip, panel.true_note)
    return (f'<div class="truth"><p class="rank">true clip, rank {panel.rank}: score '
            f"{panel.true_score:+.3f}, {gap:.3f} below rank 1</p>"
            f'<ol class="hits">{_hit_html(panel.rank, row, playable)}</ol></div>')


def panel_html(panel: Panel, playable: Mapping[ClipRef, Playable]) -> str:
    """One listening panel (t2a: a caption and its clips; a2t: a clip and its captions)."""
    tag = f'<span class="tag {esc(panel.why)}">{esc(panel.why)}</span>'
    parts = ['<article class="panel">']
    if panel.direction == "t2a":
        parts.append(f'<h3>{tag}<span class="caption">{esc(panel.query)}</span></h3>')
        if panel.rank is not None:
            parts.append(f'<p class="rank">true clip <span class="name">{esc(panel.true_name)}</span>: '
                         f"rank <b>{panel.rank}</b> of {panel.n_candidates}</p>")
        parts.append(_hits_html(panel, playable))
        if panel.true_clip is not None:
            parts.append(_truth_html(panel, playable))
    else:
        parts.append(f'<h3>{tag}<span class="name">{esc(panel.query)}</span></h3>')
        parts.append(f"<div>{_player(playable.get(panel.query_clip))}</div>")
        if panel.rank is not None:
            parts.append(f'<p class="rank">best correct caption: rank <b>{panel.rank}</b> of '
                         f"{panel.n_candidates}</p>")
        parts.append(_hits_html(panel, playable))
        if panel.own:
            own = "".join(f"<li>rank {r}, score {score:+.3f}: {esc(text)}</li>"
                          for r, text, score in panel.own)
            # open where the clip ranked worst: what it should have matched is the point
            parts.append(f"<details{' open' if panel.why == 'worst' else ''}><summary>its "
                         f"{len(panel.own)} captions, their ranks and scores</summary><ul>{own}</ul>"
                         "</details>")
    parts.append("</article>")
    return "".join(parts)


def _ci_text(interval) -> str:
    """"0.512–0.575" for a [low, high] pair, else nothing."""
    if isinstance(interval, (list, tuple)) and len(interval) == 2 and all(map(_is_number, interval)):
        return f"{interval[0]:.3f}–{interval[1]:.3f}"
    return ""


def _fmt(value, rank: bool = False) -> str:
    """Metrics (in [0, 1]) with 4 decimals; ranks and other large numbers with 1; None as –."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if abs(value) <= 1 and not rank else f"{value:.1f}"
    return str(value)


def _flat(d, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts -> [(dotted key, leaf value)]."""
    out = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _flat(value, name + ".")
        else:
            out.append((name, value if isinstance(value, (int, float, str, bool)) or value is None
                        else json.dumps(value)))
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# metrics.json's per-direction rank statistics ("ranks": {"t2a": {...}, "a2t": {...}}) as columns
RANK_COLUMNS = {"mean": "mean rank", "median": "median rank", "queries": "queries",
                "candidates": "candidates"}


TUNED_MARK = "†"


def tuning_notes(cfg: dict) -> dict[str, str]:
    """{data.val_split: how training used it}, for the metrics table. Every training.monitor is
    measured on that split and its val_loss drives the learning-rate schedule, so its numbers
    are biased upward whichever checkpoint is evaluated."""
    t = cfg["training"]
    lr = "its loss to schedule the learning rate"
    if cfg["eval"]["checkpoint"] == "best":
        use = f"used to choose the checkpoint (best.pt by training.monitor, {t['monitor']}) and {lr}"
    elif t["early_stopping"] > 0:
        use = (f"used to stop training early (training.early_stopping: {t['early_stopping']} epochs "
               f"without a better {t['monitor']}) and {lr}")
    else:
        use = f"used during training, {lr}"
    return {cfg["data"]["val_split"]: f"{use}: not a held-out estimate"}


def metrics_html(metrics: Mapping, chance: Mapping | None = None,
                 tuned: Mapping[str, str] | None = None) -> str:
    """The metrics table (every number of each split and direction, chance levels under each
    row), the splits' other entries, and metrics.json's definitions and provenance if present.

    metrics: a metrics.json document (utils.evaluation.metrics_document: chance levels in each
    split's "chance") or {split: {"t2a": {...}, "a2t": {...}}} with `chance` given apart;
    tuned: {split: why its numbers are not held-out} (tuning_notes), its rows marked."""
    tuned = tuned or {}
    from utils.evaluation import metrics_splits
    from utils.metrics import METRIC_NAMES

    splits = [k for k, v in metrics_splits(dict(metrics)).items()
              if isinstance(v, Mapping) and any(isinstance(v.get(d), Mapping) for d in DIRECTIONS)]
    columns = list(METRIC_NAMES)
    for split in splits:
        for d in DIRECTIONS:
            for key, value in metrics[split].get(d, {}).items():
                if _is_number(value) and key not in columns:
                    columns.append(key)
    rank_cols = [c for c in RANK_COLUMNS if any(
        isinstance((metrics[split].get("ranks") or {}).get(d), Mapping)
        and c in metrics[split]["ranks"][d] for split in splits for d in DIRECTIONS)]
    head = ("<tr><th>split</th><th>direction</th>" + "".join(f"<th>{esc(c)}</th>" for c in columns)
            + "".join(f"<th>{RANK_COLUMNS[c]}</th>" for c in rank_cols) + "</tr>")
    rows = []
    for split in splits:
        for d, label in DIRECTIONS.items():
            vals = metrics[split].get(d)
            if not isinstance(vals, Mapping):
                continue
            ranks = (metrics[split].get("ranks") or {}).get(d) or {}
            mark = (f'&nbsp;<span class="warn" title="{esc(tuned[split])}">{TUNED_MARK}</span>'
                    if split in tuned else "")
            rows.append(f"<tr><td>{esc(split)}{mark}</td><td>{label}</td>"
                        + "".join(f"<td>{esc(_fmt(vals[c])) if c in vals else ''}</td>" for c in columns)
                        + "".join(f"<td>{esc(_fmt(ranks[c], rank=True)) if c in ranks else ''}</td>"
                                  for c in rank_cols)
                        + "</tr>")
            ci = (metrics[split].get("ci95") or {}).get(d)
            if isinstance(ci, Mapping) and ci:
                rows.append('<tr class="chance"><td></td><td>95% CI</td>'
                            + "".join(f"<td>{_ci_text(ci.get(c))}</td>" for c in columns) + "</tr>")
            ch = ((chance or {}).get(split) or metrics[split].get("chance") or {}).get(d)
            if ch:
                rows.append('<tr class="chance"><td></td><td>chance</td>'
                            + "".join(f"<td>{esc(_fmt(ch[c])) if c in ch else ''}</td>" for c in columns)
                            + "</tr>")
    parts = [f'<div class="scroll"><table>{head}{"".join(rows)}</table></div>',  # narrow windows scroll it
             '<p class="meta">chance: the expected value under a random ranking; R@k: the share of '
             "a query's relevant items in its top k (the DCASE baseline's); R@k_any: whether any "
             "is (CLAP-style); ranks: of the best-ranked relevant item; 95% CI: the interval "
             "bootstrap resamples of the split's clips give. Exact definitions below."
             "</p>"]
    parts += [f'<p class="meta"><span class="warn">{TUNED_MARK}</span> {esc(split)}: {esc(why)}</p>'
              for split, why in tuned.items() if split in splits]
    extra = [(f"{split}.{k}", v) for split in splits
             for k, v in _flat({k: v for k, v in metrics[split].items()
                                if k not in DIRECTIONS and k not in ("chance", "ranks", "ci95")})]
    if extra:
        parts.append("<details><summary>more numbers per split</summary><table>"
                     + "".join(f"<tr><td>{esc(k)}</td><td>{esc(_fmt(v))}</td></tr>" for k, v in extra)
                     + "</table></details>")
    for key, title in (("definitions", "definitions"), ("provenance", "provenance")):
        if isinstance(metrics.get(key), Mapping) and metrics[key]:
            items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(_fmt(v))}</dd>" for k, v in _flat(metrics[key]))
            parts.append(f"<details><summary>{title}</summary><dl>{items}</dl></details>")
    return "\n".join(parts)


# marks a page as ours, and which kind: query.py --html may replace its own pages, never a report
GENERATOR = '<meta name="generator" content="dcase-retrieval {kind}">'
REPORT_PAGE, QUERY_PAGE = "report", "query page"


def _page(title: str, header: str, body: str, kind: str = REPORT_PAGE) -> str:
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            + GENERATOR.format(kind=kind) +
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n{header}\n"
            '<p id="audio-status" class="meta"></p>\n'
            f"{body}\n<script>{SCRIPT}</script>\n</body></html>\n")


def _write_sized(path: Path, render) -> int:
    """Write `render(size_text)` atomically, where size_text states the size of the page's
    folder including the page itself (a fixed point: the text's length changes the size)."""
    others = folder_size(path.parent) - (path.stat().st_size if path.is_file() else 0)
    text = render("…")
    for _ in range(4):
        total = others + len(text.encode("utf-8"))
        new = render(format_size(total))
        if new == text:
            break
        text = new
    atomic_write_text(path, text)
    return total


# --------------------------------------------------------------------------- the run's report

@dataclass
class Report:
    path: Path                               # report/index.html
    size: int                                # bytes of the report folder
    playable: dict[ClipRef, Playable]
    images: dict[str, Path]                  # name -> PNG (rank histograms, copied plots)
    audio: str = "copy"                      # eval.report.audio


def _sample_clips(samples: Sequence[SplitSample]) -> list[ClipRef]:
    clips = []
    for smp in samples:
        for p in smp.t2a + smp.a2t:
            clips += [h.clip for h in p.hits if h.clip is not None]
            clips += [c for c in (p.true_clip, p.query_clip) if c is not None]
    return clips


def write_report(run_dir: str | Path, samples: Sequence[SplitSample], metrics: Mapping,
                 chance: Mapping | None, plots: Sequence[Path], opts: ReportSettings,
                 subtitle: str = "", tuned: Mapping[str, str] | None = None) -> Report:
    """`<run>/report/`: index.html, audio/ (copy mode), plots/ (copies of `plots`) and a rank
    histogram per split. A clip that cannot be played gets a note on its panel; `tuned`: as
    metrics_html's."""
    run_dir = Path(run_dir)
    out = run_dir / REPORT_DIR
    ensure_dir(out)
    remove_stale_temps(out)  # the run is locked: temps here are a killed run's
    images: dict[str, Path] = {}
    for src in plots:
        if Path(src).is_file():
            dest = out / PLOTS_DIR / Path(src).name
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
            images[Path(src).stem] = dest
    for smp in samples:  # from plots/ when given there (plot_run_figures), else drawn here
        if f"{smp.split}_t2a_rank_histogram" not in images:
            images[f"{smp.split}_t2a_rank_histogram"] = plot_rank_histogram(
                smp.t2a_ranks, smp.n_clips, smp.split, out / f"{smp.split}_t2a_rank_histogram.png")

    audio_dir = out / AUDIO_DIR
    playable, kbps = materialize(_sample_clips(samples), out, audio_dir, opts.audio)
    _prune(audio_dir, {p.path for p in playable.values() if p.path is not None and opts.audio == "copy"})
    n_players = len({p.href for p in playable.values() if p.href})
    n_missing = sum(p.href is None for p in playable.values())

    nav = ["<a href=\"#metrics\">metrics</a>", "<a href=\"#plots\">plots</a>"]
    body = ['<section id="metrics"><h2>Metrics</h2>', metrics_html(metrics, chance, tuned), "</section>"]
    def fig(name: str, path: Path, cls: str) -> str:  # a click opens the full-size image
        href = esc(_href(path, out))
        return (f'<figure class="{cls}"><a href="{href}"><img src="{href}" alt="{esc(name)}"></a>'
                "</figure>")

    hists = {n for n in images if n.endswith("_t2a_rank_histogram")}
    body += ['<section id="plots"><h2>Training, recall@k and the rank of the true clip</h2>',
             # three panels of ten k each: legible only across the page
             "<div>" + "".join(fig(n, p, "full" if n == "recall_at_k" else "wide")
                               for n, p in images.items() if n not in hists)
             + "</div><div>" + "".join(fig(n, p, "hist") for n, p in images.items() if n in hists)
             + "</div></section>"]
    how = {"t2a": "each caption's top {k} clips; ✓ marks its own clip, which gets a row of its "
                  "own below, at its rank, when it is not among them",
           "a2t": "each clip's top {k} captions; ✓ marks its own captions"}
    for smp in samples:
        for d in DIRECTIONS:
            panels = smp.t2a if d == "t2a" else smp.a2t
            anchor = f"{smp.split}-{d}"
            nav.append(f'<a href="#{esc(anchor)}">{esc(smp.split)} {DIRECTIONS[d]}</a>')
            n_worst = sum(p.why == "worst" for p in panels)
            body.append(f'<section id="{esc(anchor)}"><h2>{esc(smp.split)}: {DIRECTIONS[d]}</h2>'
                        f'<p class="meta">{n_worst} worst-ranked and {len(panels) - n_worst} drawn at '
                        f"random (seed {opts.seed}) of {smp.n_captions if d == 't2a' else smp.n_clips} "
                        f"queries: {how[d].format(k=opts.clips_per_query)}; the number beside each "
                        "is its score, the dot product of the L2-normalised caption and clip "
                        "embeddings (cosine similarity, -1 to 1).</p>"
                        '<div class="panels">' + "".join(panel_html(p, playable) for p in panels)
                        + "</div></section>")
    audio_note = (f"clips transcoded to Ogg Opus (mono, ~{kbps} kbit/s) in audio/"
                  if opts.audio == "copy" else
                  "clips linked to the dataset's wavs by relative paths (move the page and the "
                  "dataset together)")
    missing = (f' · <span class="warn">{n_missing} clip(s) cannot be played</span>' if n_missing else "")
    title = f"Retrieval report: {run_dir.name}"

    def render(size_text: str) -> str:
        header = (f"<h1>{esc(title)}</h1>"
                  + (f'<p class="meta">{esc(subtitle)}</p>' if subtitle else "")
                  + f'<p class="meta">{n_players} clips, {audio_note}; this folder: '
                    f'<b id="folder-size">{esc(size_text)}</b>{missing}</p>'
                  + f"<nav>{' '.join(nav)}</nav>")
        return _page(title, header, "\n".join(body))

    index = out / INDEX
    size = _write_sized(index, render)
    return Report(index, size, playable, images, opts.audio)


# --------------------------------------------------------------------------- wandb

def table_columns() -> list[str]:
    return ["caption", "true_file", "rank"] + [f"file_name_{i}" for i in range(1, TABLE_TOP + 1)]


def listening_rows(smp: SplitSample, playable: Mapping[ClipRef, Playable], k: int
                   ) -> tuple[list[str], list[list], list[str]]:
    """(columns, rows, audio columns) of the t2a listening sample for wandb: caption, rank,
    the true clip and the top-k clips, each with its audio file (None when unplayable)."""
    def path(clip):
        p = playable.get(clip)
        return str(p.path) if p is not None and p.path is not None else None

    columns = ["why", "caption", "rank", "true_file", "true_audio"]
    for i in range(1, k + 1):
        columns += [f"file_name_{i}", f"audio_{i}"]
    rows = []
    for p in smp.t2a:
        true_clip = p.true_clip or next(h.clip for h in p.hits if h.correct)
        row = [p.why, p.query, p.rank, p.true_name, path(true_clip)]
        for i in range(k):
            hit = p.hits[i] if i < len(p.hits) else None
            row += [hit.text if hit else "", path(hit.clip) if hit else None]
        rows.append(row)
    return columns, rows, ["true_audio"] + [f"audio_{i}" for i in range(1, k + 1)]


def log_to_tracker(tracker, samples: Sequence[SplitSample], report: Report | None,
                   images: Mapping[str, Path], k: int) -> None:
    """Per split: `retrieval_results_{split}` (every caption: caption, true file, rank, top-10
    file names), `listening_{split}` (the t2a sample with wandb.Audio of the report's
    transcoded clips; in link mode no audio is copied anywhere, wandb included: the cells stay
    empty), `{split}/t2a_rank` (histogram); and the figures. No-op when wandb is disabled."""
    for smp in samples:
        tracker.log_table(f"retrieval_results_{smp.split}", table_columns(), smp.table_rows)
        if report is not None:
            playable = report.playable if report.audio == "copy" else {}
            columns, rows, audio_cols = listening_rows(smp, playable, k)
            tracker.log_audio_table(f"listening_{smp.split}", columns, rows, audio_cols)
        tracker.log_histogram(f"{smp.split}/t2a_rank", smp.t2a_ranks.tolist())
    if images:
        tracker.log_images({name: Path(p) for name, p in images.items()})


# --------------------------------------------------------------------------- ad-hoc queries

def write_query_page(out_html: str | Path, panels: Sequence[Panel], audio: str = "copy",
                     subtitle: str = "") -> Path:
    """A page of panels for ad-hoc queries (query.py --html). Copy mode puts the clips in
    `<OUT stem>_audio/` beside the page; link mode links the files where they are."""
    if audio not in AUDIO_MODES:
        raise ValueError(f"audio must be one of {AUDIO_MODES}, got {audio!r}")
    out_html = Path(out_html)
    ensure_dir(out_html.parent)
    audio_dir = out_html.parent / f"{_safe_stem(out_html.name)}_audio"
    clips = []
    for p in panels:
        clips += [h.clip for h in p.hits if h.clip is not None]
        clips += [c for c in (p.query_clip, p.true_clip) if c is not None]
    # no pruning here: the folder sits wherever the user pointed --html, and may not be ours alone
    playable, _ = materialize(clips, out_html.parent, audio_dir, audio)
    title = "Query: " + (panels[0].query if len(panels) == 1 else f"{len(panels)} queries")
    header = f"<h1>{esc(title)}</h1>" + (f'<p class="meta">{esc(subtitle)}</p>' if subtitle else "")
    if any(h.correct for p in panels for h in p.hits):
        header += ('<p class="meta">✓ marks the captions of the query clip itself (it is one of '
                   "the searched split's clips)</p>")
    body = '<div class="panels">' + "".join(panel_html(p, playable) for p in panels) + "</div>"
    atomic_write_text(out_html, _page(title, header, body, QUERY_PAGE))
    return out_html


def text_query_panel(query: str, hits: Sequence[tuple[str, float, str | Path | None]],
                     group: str = "query", captions: dict[str, str] | None = None) -> Panel:
    """A t2a panel for a typed query: hits are (file name, score, audio path or None);
    `captions`: {file name: its first caption}, shown beside each clip as in the report (a
    split's clips have them, a folder's do not)."""
    refs = [ClipRef(group, name, Path(src), "") if src is not None and Path(src).is_file()
            else ClipRef(group, name, None, f"audio file not found ({name})")
            for name, _, src in hits]
    return Panel("t2a", "query", query, 0, [Hit(name, float(score), False, ref, (captions or {}).get(name, ""))
                                            for (name, score, _), ref in zip(hits, refs)])


def _same_file(a: str | Path, b: str | Path | None) -> bool:
    try:
        return b is not None and os.path.samefile(a, b)
    except OSError:  # either one missing: not the same clip
        return False


def audio_query_panel(audio_path: str | Path,
                      hits: Sequence[tuple[str, float, str, str | Path | None]]) -> Panel:
    """An a2t panel for a clip given on the command line: hits are (caption, score, file name
    of the clip it describes, that clip's audio path or None). A caption of the query file
    itself (the query is one of the searched split's clips) is marked correct; any other names
    its clip. Same file, not same name: a recording of one's own may share a split clip's name."""
    audio_path = Path(audio_path)
    ref = (ClipRef("query", audio_path.name, audio_path) if audio_path.is_file()
           else ClipRef("query", audio_path.name, None, f"audio file not found ({audio_path.name})"))
    rows = []
    for caption, score, fname, src in hits:
        own = _same_file(audio_path, src)
        rows.append(Hit(caption, float(score), own, note="" if own else f"of {fname}"))
    return Panel("a2t", "query", audio_path.name, 0, rows, query_clip=ref)


def check_query_page_target(out_html: str | Path, inputs: Sequence[str | Path] = (),
                            folder: str | Path | None = None) -> None:
    """Refuse, before any work, an --html path that would replace something that is not a page
    of ours: another file (a config, the queries, a clip), a folder, or a name inside the
    searched `folder` (its clips would be copied in among the ones searched)."""
    out = Path(out_html)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--html {out}: give the page a .html name (it is written as a web page)")
    if out.is_dir():
        raise UserError(f"--html {out} is a folder; give a file name such as {out / 'results.html'}")
    if folder is not None and out.resolve().parent == Path(folder).resolve():
        raise UserError(f"--html {out} is inside the searched folder {folder}; write the page elsewhere")
    for given in inputs:
        if out.exists() and Path(given).exists() and os.path.samefile(out, given):
            raise UserError(f"--html {out} is the input {given}; write the page elsewhere")
    if out.is_file():
        with open(out, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
        if GENERATOR.format(kind=REPORT_PAGE) in head:
            raise UserError(f"--html {out} is a run's report page (postprocessing 02); choose "
                            "another name")
        if GENERATOR.format(kind=QUERY_PAGE) not in head:
            raise UserError(f"--html {out} exists and is not a page query.py wrote; delete it "
                            "or choose another name")


def write_query_results(out_html: str | Path, queries: Sequence[str], results: Sequence[Sequence],
                        audio_queries: bool = False, audio: str = "copy", subtitle: str = "",
                        clip_captions: dict[str, str] | None = None) -> Path:
    """`query.py --html OUT.html`: one panel per query. `results[i]` holds the hits of
    `queries[i]` (models.retrieval.Hit or anything with `fname`, `score`, `caption`, `path`):
    clips for a text query (with `clip_captions[fname]`, its first caption, where known),
    captions for an audio query (`audio_queries`: the queries are audio file paths, played at
    the top of their panels)."""
    panels = []
    for query, hits in zip(queries, results):
        if audio_queries:
            panels.append(audio_query_panel(query, [(h.caption, h.score, h.fname, h.path)
                                                    for h in hits]))
        else:
            panels.append(text_query_panel(query, [(h.fname, h.score, h.path) for h in hits],
                                           captions=clip_captions))
    return write_query_page(out_html, panels, audio, subtitle)


def now_text() -> str:
    return time.strftime("%Y-%m-%d %H:%M")

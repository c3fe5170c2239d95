"""Library code of the numbered scripts (see README "Layout")."""
import os
import sys
from pathlib import Path

# A job's log file gets every redraw of a progress bar (stderr is not a terminal there): ~80
# bytes a training step, megabytes of bar text over a Clotho training. For the repository's own
# scripts, bars redraw at most every LOG_BAR_INTERVAL_S seconds then (and once when done). Set
# here, before any module imports tqdm, which reads TQDM_* once at import; a notebook or another
# program importing utils keeps its own bars.
LOG_BAR_INTERVAL_S = 30
_REPO = Path(__file__).resolve().parents[1]


def _is_repo_script(argv0: str) -> bool:
    try:
        where = Path(argv0).resolve().parent
    except (OSError, RuntimeError):
        return False
    return where in (_REPO, _REPO / "preprocessing", _REPO / "postprocessing", _REPO / "benchmarks")


if (sys.argv and sys.argv[0] and _is_repo_script(sys.argv[0]) and "TQDM_MININTERVAL" not in os.environ
        and not (sys.stderr is not None and sys.stderr.isatty())):
    os.environ["TQDM_MININTERVAL"] = str(LOG_BAR_INTERVAL_S)
    # tqdm's monitor thread redraws a bar not drawn for `maxinterval` (10 s) with the count of
    # its last draw and the time of now ("598/1400 [00:50<00:40]" after "598/1400 [00:30<…]"),
    # which reads as a stall: it may do so only after a real pause, then
    os.environ.setdefault("TQDM_MAXINTERVAL", str(2 * LOG_BAR_INTERVAL_S))

"""The command line every numbered script shares: `--conf PATH`, `--set key=value ...`, `--print-config`.

    parser = utils.cli.make_parser(__doc__)
    args, cfg = utils.cli.parse(parser)        # prints the config and exits for --print-config
    ...
    if __name__ == "__main__":
        utils.cli.run(main)                    # UserError / disk errors: one line, exit 2

A script that acts on an existing run (it has a `--run` option) resolves the run's config
itself, then calls `print_config_if_asked(args, cfg)` with it.
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable, NoReturn, Sequence

import yaml

from utils.config import dump_config, load_config
from utils.errors import Terminated, UserError, forget_stop, os_error_message, stop, stopped

DEFAULT_INTERRUPT_ADVICE = "work already finished is kept; rerun the same command to continue"
_interrupt_advice = DEFAULT_INTERRUPT_ADVICE

# `key=value`: the key has no blanks and does not start with `-` (a query such as
# "a = b" or "x=1 and more" is not an override)
_ASSIGNMENT = re.compile(r"[^\s=-][^\s=]*=")


def split_set_arguments(argv: Sequence[str]) -> list[str]:
    """`--set a=1 b=2 "text"` -> `--set a=1 --set b=2 "text"`: after `--set`, only tokens of
    the form key=value belong to it, so a positional argument that follows stays one."""
    out: list[str] = []
    taking = False
    for i, token in enumerate(argv):
        if token == "--":
            out.extend(argv[i:])
            break
        if token == "--set":
            taking = True
            out.append(token)
            continue
        if taking and _ASSIGNMENT.match(token):
            if out[-1] != "--set":
                out.append("--set")
            out.append(token)
            continue
        taking = False
        out.append(token)
    return out


class Parser(argparse.ArgumentParser):
    """argparse with `--set` split as above; `--print-config` needs no positional argument."""

    def parse_known_args(self, args=None, namespace=None):
        args = split_set_arguments(sys.argv[1:] if args is None else list(args))
        if "--print-config" not in args:
            return super().parse_known_args(args, namespace)
        positionals = [a for a in self._actions if not a.option_strings and a.required]
        for action in positionals:  # e.g. query.py's text: not needed to print the config
            action.required = False
        try:
            return super().parse_known_args(args, namespace)
        finally:
            for action in positionals:
                action.required = True


def make_parser(description: str) -> Parser:
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conf", default="conf.yaml", help="config file (default: conf.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.lr=1e-3 training.amp=off "
                             "(several may follow one --set; --set may repeat)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML) and exit, doing nothing else")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """Parse arguments and load the config: returns (args, cfg). With --print-config, prints the
    config and exits here, unless the script acts on a run (`--run`): it prints the run's."""
    args = parser.parse_args(argv)
    cfg = load_config(args.conf, args.overrides)
    if "run" not in vars(args):
        print_config_if_asked(args, cfg)
    return args, cfg


def add_run_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="run directory, or a run's name in paths.output_dir "
                                      "(default: the run trained last there)")


def parse_run(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """For a script that acts on a run (`--run`): returns (args, run_dir, overrides, conf_cfg).

    `overrides` are args.overrides plus absolute paths for the run's relative ones (from any
    working directory: utils.provenance.resolved_overrides); load the run's config with them.
    conf_cfg is --conf's config where it was read (see find_run), else None. --print-config
    prints the run's config and exits."""
    from utils.provenance import resolved_overrides
    from utils.runs import load_run_config

    args = parser.parse_args(argv)
    run_dir, conf_cfg = find_run(args.run, args.conf, args.overrides,
                                 conf_given=args.conf != parser.get_default("conf"))
    overrides = resolved_overrides(run_dir, args.overrides)
    run_cfg = load_run_config(run_dir, overrides)
    print_config_if_asked(args, run_cfg)
    if conf_cfg is not None:
        note_unused_eval_keys(args.conf, conf_cfg, run_cfg)
    return args, run_dir, overrides, conf_cfg


def note_unused_eval_keys(conf: str, conf_cfg: dict, run_cfg: dict) -> None:
    """A note on stderr for each eval.* key that --conf sets otherwise than the run's config.yaml,
    which is the one used: conf.yaml invites adding development to eval.splits, and that edit
    would be ignored unseen. (03 reads eval.submission.* from --conf: not noted.)"""
    from utils.config import flat_config

    ours, theirs = flat_config(conf_cfg), flat_config(run_cfg)
    for key, value in ours.items():
        if key.startswith("eval.") and not key.startswith("eval.submission.") \
                and value != theirs.get(key):
            # one shell word: a list's `[a, b]` would be two, and zsh would glob it
            print(f"note: {key} is {_flow(value)} from {conf} but {_flow(theirs.get(key))} in the "
                  f"run's config.yaml, which is used; --set {shlex.quote(f'{key}={_flow(value)}')} "
                  "uses yours", file=sys.stderr)


def _flow(value) -> str:
    """`value` as --set takes it: `[a, b]`, `5`, `off` (a string key's text is taken as it is,
    unless it is a null word)."""
    from utils.config import NULL_WORDS

    if isinstance(value, str) and value.strip() not in NULL_WORDS:
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def find_run(run: str | None, conf: str, overrides: Sequence[str] = (), conf_given: bool = False
             ) -> tuple[Path, dict | None]:
    """(run folder, --conf's config or None) for `--run`/`--resume`: a run folder as given, else
    a run's name in --conf's paths.output_dir, else (None) the newest run there. --conf is read
    only for those two, or when given explicitly: with `--run DIR` from any directory, an
    unrelated or missing conf.yaml there does not matter."""
    from utils.runs import is_run_dir, not_a_run_error, resolve_run_dir

    if run is not None and not conf_given:
        if is_run_dir(Path(run)):
            return Path(run), None
        if len(Path(run).parts) != 1:  # a path that is no run: nothing to look up
            raise not_a_run_error(run)
    if not conf_given and not Path(conf).is_file():
        what = f"the run named {run}" if run is not None else "the newest run"
        raise UserError(f"{conf}: config file not found, to look for {what} in its "
                        "paths.output_dir — pass --run DIR (a run folder), or --conf PATH")
    conf_cfg = load_config(conf, overrides)
    return resolve_run_dir(run, conf_cfg), conf_cfg


def print_config_if_asked(args: argparse.Namespace, cfg: dict) -> None:
    """For --print-config: print `cfg` as YAML and exit 0, before any work is done."""
    if getattr(args, "print_config", False):
        sys.stdout.write(dump_config(cfg))
        sys.stdout.flush()
        sys.exit(0)


# --------------------------------------------------------------------------- Ctrl-C advice

def set_interrupt_advice(advice: str | Callable[[], str]) -> None:
    """How to continue, told after Ctrl-C and after a disk error (default: rerun the same command)."""
    global _interrupt_advice
    _interrupt_advice = advice


def interrupt_advice() -> str:
    """The advice as it stands now (a callable one is asked when it is said)."""
    advice = _interrupt_advice
    if callable(advice):
        try:
            return advice()
        except Exception:  # never let the advice hide the reason the run stopped
            return DEFAULT_INTERRUPT_ADVICE
    return advice


def script_command(*args: str | os.PathLike) -> str:
    """The command line that runs this script again with `args`, as the user started it
    (`python main.py ...`; under torchrun, `torchrun --nproc_per_node=N main.py ...`)."""
    script = sys.argv[0] if sys.argv and sys.argv[0] else "main.py"
    tail = " ".join(shlex.quote(str(a)) for a in (script, *args))
    local, world = os.environ.get("LOCAL_WORLD_SIZE"), os.environ.get("WORLD_SIZE")
    if local and world:
        if local == world:
            return f"torchrun --nproc_per_node={local} {tail}"
        return f"your torchrun command on every node, with {tail}"
    return f"python {tail}"


def advise_resume(run_dir: str | Path) -> None:
    """From now on, Ctrl-C or a full disk prints the exact command that resumes `run_dir`
    (main.py), and the last epoch kept, as it stands when said: a stop during an epoch's
    background checkpoint write finishes that write first, after the log's last epoch line,
    which then reads as if the epoch were lost."""
    run_dir = Path(run_dir)

    def advice() -> str:
        from utils.evaluation import checkpoint_epoch
        from utils.runs import checkpoint_path

        last = checkpoint_path(run_dir, "last")
        try:
            epoch = checkpoint_epoch(last) if last.is_file() else None
        except OSError:  # e.g. EACCES, EIO: is_file raises those; the way to resume still holds
            epoch = None
        kept = f"epochs 1-{epoch} are kept" if epoch else "finished epochs are kept"
        return f"{kept} in {run_dir}; resume with: {script_command('--resume', run_dir)}"

    set_interrupt_advice(advice)


# --------------------------------------------------------------------------- running main()

def _interrupt(signum, frame) -> None:
    stop(KeyboardInterrupt)


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    stop(Terminated)


def _quiet_once_stopped(hook: Callable) -> Callable:
    """A sys.unraisablehook around `hook`, silent once a Ctrl-C or SIGTERM was received: one that
    Python dropped (it landed in a weakref callback or a __del__) is raised again by the loop's
    next step (errors.raise_if_stopped), and what the signal left half-made fails as it is
    collected (a DataLoader iterator stopped while starting its workers: "no attribute
    '_shutdown'"); their "Exception ignored in ..." tracebacks would follow the stop's one line."""
    def quiet(unraisable) -> None:
        if stopped() is None:
            hook(unraisable)
    return quiet


def run(main: Callable[[], object]) -> None:
    """Run a script's main(): a UserError, or a file-system error the user can fix (disk full,
    read-only, permission, a file where a folder should be), is one line on stderr and exit 2;
    Ctrl-C (exit 130) or SIGTERM (exit 143) says what is kept and how to continue."""
    set_interrupt_advice(DEFAULT_INTERRUPT_ADVICE)  # until main() knows better (advise_resume)
    forget_stop()
    before = signal.signal(signal.SIGTERM, _terminate)
    # Python's own Ctrl-C handler, unless SIGINT is ignored (`nohup`, a background job)
    before_int = signal.getsignal(signal.SIGINT)
    if before_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    before_hook = sys.unraisablehook
    sys.unraisablehook = _quiet_once_stopped(before_hook)
    try:
        code = _run_or_report(main, _children())
    finally:
        if before is not None:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGTERM, before)
        if before_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, before_int)
        sys.unraisablehook = before_hook
        forget_stop()
    if code:
        sys.exit(code)


def _run_or_report(main: Callable[[], object], earlier: frozenset = frozenset()) -> int:
    """_run(main); for an error it did not turn into a message, the exit status after saying
    what happened: one line for a data-loader worker that died or out of GPU memory, else the
    traceback (a bug), each with how to resume where main() said so. After any failure or stop,
    the worker processes main() started are killed (`earlier`: the host's own, from before
    main(), are left alone): at exit, multiprocessing would SIGTERM and wait for them, and DataLoader workers
    leave SIGTERM to the parent (data_utils.leave_signals_to_the_parent) — a hang, and under
    torchrun every other rank waiting in a collective until its timeout."""
    try:
        _run(main)
    except SystemExit as e:  # a stop or an error that _run has reported
        _kill_worker_processes(earlier)
        if stopped() is not None:
            # the frames the signal interrupted, and what they held, go now, while the quiet
            # hook stands (kept by the exit's context, they went at interpreter shutdown)
            e.__context__ = None
            gc.collect()
        raise
    except Exception as e:
        known = None
        try:  # the workers go even where saying it fails (stderr on a full disk, a closed pipe)
            known = _resource_failure(e)
            _close_progress_bars()
            sys.stdout.flush()
            if known is None:
                traceback.print_exc()
            advice = f"; {interrupt_advice()}" if _interrupt_advice != DEFAULT_INTERRUPT_ADVICE else ""
            if known is not None or (advice and os.environ.get("RANK", "0") == "0"):
                print(f"error: {known or 'stopped by the unexpected error above'}{advice}", file=sys.stderr)
        finally:
            _kill_worker_processes(earlier)
        return 2 if known is not None else 1
    return 0


def _children() -> frozenset:
    mp = sys.modules.get("multiprocessing")
    return frozenset(mp.active_children()) if mp is not None else frozenset()


def _resource_failure(e: Exception) -> str | None:
    """One line for failures that are the machine's, not the code's, else None."""
    if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError (no torch import here)
        return (f"out of GPU memory ({_first_line(e)[:160]}) — lower the step's batch size "
                "(training.batch_size or training.max_frames when training, eval.batch_size when "
                "scoring, sbert.batch_size in step 03), or free the GPU of other processes")
    died = _worker_death(e)
    if died:
        return (f"{died.rstrip('. ')} (out of memory?) — lower the step's loader workers "
                "(training.num_workers when training) or batch size, or free memory")
    return None


def _worker_death(e: BaseException) -> str | None:
    """torch's "DataLoader worker (pid(s) N) exited unexpectedly" (from "... is killed by
    signal: Killed.") in `e` or its cause, else None."""
    died = [_first_line(x) for x in (e.__cause__, e) if isinstance(x, RuntimeError)
            and _first_line(x).startswith("DataLoader worker")]
    return died[0] if died else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _kill_worker_processes(earlier: frozenset = frozenset()) -> None:
    mine = [c for c in _children() if c not in earlier]
    if not mine:
        return
    # torch's SIGCHLD handler would raise "DataLoader worker … is killed" right here; put back
    # after the children are reaped (its check skips pids it cannot wait for)
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for child in mine:
            child.kill()
            child.join(timeout=5)
    finally:
        if previous is not None and all(c.exitcode is not None for c in mine):
            signal.signal(signal.SIGCHLD, previous)


def _run(main: Callable[[], object]) -> None:
    try:
        main()
    except UserError as e:
        _fail(str(e))
    except BrokenPipeError:  # `query.py --json | head`: the reader has all it wanted
        # Python would complain again flushing stdout at exit: point it at /dev/null first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        message = os_error_message(e)
        if message is None:
            raise  # not the user's to fix: a bug, keep the traceback
        if _interrupt_advice != DEFAULT_INTERRUPT_ADVICE:  # e.g. main.py: how to resume the run
            message = f"{message}; {interrupt_advice()}"
        _fail(message)
    except KeyboardInterrupt as e:
        _say_stopped(type(e))
    except RuntimeError as e:
        kind = stopped()
        if kind is None or _worker_death(e) is None:
            raise
        # a worker the signal to the process group ended before it could ignore it (each starts
        # with torch's handler, see data_utils.leave_signals_to_the_parent): the stop, not a
        # machine out of memory
        _say_stopped(kind)


def _say_stopped(kind: type[KeyboardInterrupt]) -> NoReturn:
    _close_progress_bars()
    what, code = ("terminated (SIGTERM)", 143) if issubclass(kind, Terminated) else ("interrupted", 130)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one message, not one per process
        print(f"{what}: {interrupt_advice()}", file=sys.stderr)
    sys.exit(code)


def _close_progress_bars() -> None:
    """Close the tqdm bars the failed step left open, so that the message starts its own line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def _fail(message: str) -> None:
    _close_progress_bars()
    sys.stdout.flush()
    print(f"error: {' '.join(message.splitlines())}", file=sys.stderr)  # one line, always
    sys.exit(2)

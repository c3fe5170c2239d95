"""DCASE challenge submission: rank an unlabelled retrieval set's clips for every caption.

Input: a folder of wavs (--audio-dir) and a CSV with a `caption` column (--captions, like the
challenge's retrieval_captions.csv). Log-mels are computed as preprocessing/02 does, captions
embedded with the run's sbert.model as preprocessing/03 does, both encoded by the trained model.
Output: `caption,file_name_1,...,file_name_10` (default <run>/submission.csv): always exactly
the 10 best-ranked files per caption, as the challenge requires, whatever eval.top_k says (that
key sets the retrieval CSVs of postprocessing/02 and query.py), so a retrieval set needs at
least 10 usable clips. Unreadable wavs stop the step (all listed) unless data.skip_bad_audio,
which skips them and lists them in <output>.skipped_audio.csv. --out never replaces the captions
CSV or an existing file that is not a submission, and is never an audio file of --audio-dir.
"""
import contextlib
import os
from pathlib import Path

import utils.cli
from utils import evaluation, provenance
from utils.config import load_config
from utils.errors import UserError
from utils.runs import load_run_config, lock_run
from utils.train_utils import load_trained_model
from utils.devices import resolve_device


SUBMISSION_RANKS = 10  # file_name_1..file_name_10 per caption: the DCASE Task 6B format
HEADER = ",".join(["caption"] + [f"file_name_{i}" for i in range(1, SUBMISSION_RANKS + 1)])


def check_enough_clips(n: int, where: Path, skipped: int = 0) -> None:
    if n < SUBMISSION_RANKS:
        usable = f"{n} usable audio files ({skipped} skipped)" if skipped else f"{n} audio files"
        raise UserError(f"{where}: {usable}; a submission ranks {SUBMISSION_RANKS} files per "
                        f"caption, so the retrieval set needs at least {SUBMISSION_RANKS}")


def _is_submission(path: Path) -> bool:
    """Written by this script (its header line), or empty: replacing it loses nothing."""
    with open(path, "rb") as f:
        first = f.readline(len(HEADER) + 3)
    return not first or first.rstrip(b"\r\n") == HEADER.encode()


def check_out(out: Path, captions_csv: Path, audio_dir: Path) -> None:
    """Refuse an --out that would replace an input or a file this script did not write. Paths
    are compared resolved (symlinks, `..`, relative spellings), files by identity (hard links)."""
    if out.exists() and captions_csv.exists() and os.path.samefile(out, captions_csv):
        raise UserError(f"--out {out} is the captions file {captions_csv}; write the submission "
                        "elsewhere")
    if out.resolve().parent == audio_dir.resolve() and out.suffix.lower() in evaluation.AUDIO_SUFFIXES:
        raise UserError(f"--out {out} would join the retrieval set in {audio_dir}; give the "
                        "submission a .csv name or write it elsewhere")
    if out.is_file() and not _is_submission(out):
        raise UserError(f"--out {out} exists and is not a submission this script wrote; delete "
                        "it or choose another path")


def setting(cli_value, key: str, *cfgs) -> str:
    """--option, else eval.submission.<key> of the run config, else of --conf."""
    if cli_value:
        return cli_value
    for cfg in filter(None, cfgs):  # --conf's is None when it was not read
        value = cfg["eval"]["submission"][key]
        if value:
            return value
    raise UserError(f"pass --{key.replace('_', '-')} (or set eval.submission.{key})")


def main():
    parser = utils.cli.make_parser(__doc__)
    utils.cli.add_run_argument(parser)
    parser.add_argument("--audio-dir", help="folder with the retrieval set's audio files")
    parser.add_argument("--captions", help="CSV with a `caption` column")
    parser.add_argument("--out", help="output CSV (default: <run>/submission.csv)")
    args, run_dir, overrides, conf_cfg = utils.cli.parse_run(parser)
    if conf_cfg is None and Path(args.conf).is_file():  # only for eval.submission.* below
        with contextlib.suppress(UserError):
            conf_cfg = load_config(args.conf, args.overrides)
    cfg = load_run_config(run_dir, overrides)
    audio_dir = Path(setting(args.audio_dir, "audio_dir", cfg, conf_cfg))
    captions_csv = Path(setting(args.captions, "captions", cfg, conf_cfg))
    out = Path(args.out) if args.out else Path(run_dir) / "submission.csv"
    check_out(out, captions_csv, audio_dir)

    # cheap input checks before any model is loaded
    captions = evaluation.read_caption_csv(captions_csv)
    files = evaluation.list_audio_files(audio_dir)
    check_enough_clips(len(files), audio_dir)
    with lock_run(run_dir):
        device = resolve_device(cfg["eval"]["device"], "eval.device")
        model, cfg, _ = load_trained_model(run_dir, cfg["eval"]["checkpoint"], device,
                                           overrides)
        audio = evaluation.encode_audio_files(model, files, cfg["features"], device,
                                              skip_bad=cfg["data"]["skip_bad_audio"],
                                              amp=cfg["eval"]["amp"],
                                              batch_size=cfg["eval"]["batch_size"])
        check_enough_clips(len(audio.fnames), audio_dir, len(audio.bad))
        rates = {f: evaluation.file_rate(audio_dir / f) for f in audio.fnames}
        note = evaluation.other_rates_message(rates, evaluation.training_sample_rates(cfg))
        if note:
            print(f"note: {note}")
        text = evaluation.embed_texts(cfg, model, captions, device)
        top, _ = evaluation.rank_clips(text, audio.embeds, SUBMISSION_RANKS)
        evaluation.write_retrieval_csv(out, captions, audio.fnames, top, SUBMISSION_RANKS)
        # beside the submission, so it always describes this one: an earlier run's list goes
        report = out.with_name(out.name + ".skipped_audio.csv")
        if audio.bad:
            evaluation.write_skipped_report(report, audio.bad)
        else:
            report.unlink(missing_ok=True)
        provenance.record_invocation(run_dir, device, args.overrides, action="submission",
                                     conf=args.conf if conf_cfg else None)
    print(f"ranked {len(audio.fnames)} clips for {len(captions)} captions")
    print(f"wrote {out}")
    if audio.bad:
        print(f"skipped {len(audio.bad)} unusable audio file(s); wrote {report}")


if __name__ == "__main__":
    utils.cli.run(main)

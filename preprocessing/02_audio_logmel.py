"""Step 02: log-mel features of every clip -> <paths.features_dir>/{split}_audio_logmels.hdf5.

Reads audio_info.pkl (step 01, in paths.features_dir) and the wavs (paths.dataset_dir, either
layout step 01 recognises); one float32 dataset [frames, 64] per fid, the baseline's log-mel
(utils.audio_utils.log_mel). `features.workers` processes compute in parallel; `features.device`
cuda (or auto) computes the transform on the GPU. Interrupted runs resume: finished clips are
kept in {split}_audio_logmels.parts/ and the final file appears only when complete; a wav
replaced since it was computed is computed again (see utils/features.py). A split whose clips
are at several sample rates, or at a rate the training split has none at, gets a note.
"""
import sys

import utils.cli
from utils.clotho import features_dir, features_lock
from utils.config import require_dir, save_config
from utils.features import compute_logmels, sample_rate_notes, set_up_process


def main():
    parser = utils.cli.make_parser(__doc__)
    args, cfg = utils.cli.parse(parser)
    require_dir(cfg, "dataset_dir")
    set_up_process()  # this process is the step's own (compute_logmels leaves a caller's alone)
    with features_lock(features_dir(cfg), "02"):
        results = compute_logmels(cfg)
        config_path = save_config(cfg, features_dir(cfg), "config.02_audio_logmel.yaml")
    for r in results:
        skipped = (f"; {len(r.bad)} unusable audio file(s) skipped, listed in {r.skipped_csv}"
                   if r.bad else "")
        if r.skipped_existing:
            print(f"{r.split}: {r.path} is already complete ({r.clips - len(r.bad)} clips{skipped}), skipped")
            continue
        source = "unchanged, kept from the previous file" if r.updated else "reused from an interrupted run"
        extra = f", {r.reused} {source}" if r.reused else ""
        print(f"{r.split}: wrote {r.path} ({r.clips - len(r.bad)} clips: {r.computed} computed{extra}{skipped})")
    print(f"wrote {config_path}")
    for note in sample_rate_notes(results, cfg["data"]["train_split"], features_dir(cfg)):
        print(f"note: {note}", file=sys.stderr)


if __name__ == "__main__":
    utils.cli.run(main)

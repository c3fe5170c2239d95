"""Step 01: index Clotho — captions CSVs + wavs -> audio_info.pkl, {split}_text.csv, vocab_info.pkl.

Reads each split's captions CSV and wavs from `paths.dataset_dir`, in the Zenodo layout
(`clotho_captions_{split}.csv`, `{split}/*.wav`) or the aac-datasets one
(`CLOTHO_v2.1/clotho_csv_files/`, `CLOTHO_v2.1/clotho_audio_files/{split}/`), for every split in
`data.splits`; writes its outputs into `paths.features_dir` (default: the dataset folder; formats
in CONTRIBUTING.md). A missing, empty or unreadable wav stops the step with a list of every such
file, unless `data.skip_bad_audio: true` (then they are skipped and listed in
`{split}_skipped_audio.csv`).
"""
import utils.cli
from utils.clotho import features_dir, features_lock, find_layout, prepare_clotho, split_paths
from utils.config import require_dir, save_config


def main():
    parser = utils.cli.make_parser(__doc__)
    args, cfg = utils.cli.parse(parser)
    dataset_dir = require_dir(cfg, "dataset_dir")
    out_dir = features_dir(cfg)
    print(f"{dataset_dir}: found {find_layout(dataset_dir).describe()}")
    with features_lock(out_dir, "01"):
        summaries = prepare_clotho(dataset_dir, cfg["data"]["splits"], cfg["data"]["skip_bad_audio"], out_dir)
        config_path = save_config(cfg, out_dir, "config.01_clotho_dataset.yaml")
    for s in summaries:
        notes = []
        if s.space_stripped:
            notes.append(f"{s.space_stripped} wav(s) matched without the CSV name's leading space")
        if s.uncaptioned:
            notes.append(f"{s.uncaptioned} wav(s) in {split_paths(dataset_dir, s.split)[1]} have no "
                         "caption row (ignored)")
        print(f"{s.split}: {s.clips} clips, {s.captions} captions" + (f" ({'; '.join(notes)})" if notes else ""))
        if s.skipped:
            print(f"{s.split}: skipped {len(s.skipped)} unusable audio file(s), listed in {s.skipped_csv}")
        if s.skipped_by_02:
            print(f"{s.split}: {s.skipped_by_02} clip(s) that step 02 could not use stay listed in "
                  f"{s.skipped_csv} (step 02 retries them when their wav changes)")
    print(f"wrote {out_dir / 'audio_info.pkl'}, {out_dir / 'vocab_info.pkl'}, "
          + ", ".join(str(s.text_csv) for s in summaries) + f" and {config_path}")


if __name__ == "__main__":
    utils.cli.run(main)

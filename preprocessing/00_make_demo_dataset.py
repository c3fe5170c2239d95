"""Generate the embedded demo dataset: synthetic sound scenes with captions, in the Clotho v2.1 layout.

Writes into paths.dataset_dir `clotho_captions_{development,validation,evaluation}.csv` and
`{split}/*.wav` (44.1 kHz mono 16-bit), as Clotho v2.1 is laid out, so every later step runs
unchanged on it. Sizes, seed and clip durations come from the config's `demo:` section. The same
settings give byte-identical files; rerunning with them does nothing. Runs offline.

    python preprocessing/00_make_demo_dataset.py --conf conf_demo.yaml
"""
import time

import utils.cli
from utils.config import save_config
from utils.demo_data import demo_settings, demo_workers, generate_dataset


def main() -> None:
    parser = utils.cli.make_parser(__doc__)
    _, cfg = utils.cli.parse(parser)
    settings = demo_settings(cfg)
    start = time.perf_counter()
    result = generate_dataset(cfg["paths"]["dataset_dir"], settings, workers=demo_workers(cfg))
    config_path = save_config(cfg, result.dataset_dir, "config.00_make_demo_dataset.yaml")
    if result.regenerated:
        print(f"generated the demo dataset in {time.perf_counter() - start:.1f} s (seed {settings.seed})")
        if result.removed:
            print(f"removed {len(result.removed)} stale files of an earlier generation "
                  "(other demo settings; later steps will rebuild their outputs)")
    else:
        print(f"the demo dataset with these settings is already complete (seed {settings.seed}); nothing rewritten")
    for split, n in result.counts.items():
        print(f"  {split:<12} {n:5d} clips, {5 * n:6d} captions: "
              f"{result.dataset_dir / f'clotho_captions_{split}.csv'}, {result.dataset_dir / split}/")
    print(f"config: {config_path}")


if __name__ == "__main__":
    utils.cli.run(main)

"""Download Clotho v2.1 (captions, metadata, audio archives) and the PANNs CNN14 checkpoint.

Every file is checked against the md5 in `download.clotho_files` / `download.panns_files`;
interrupted downloads resume on the next run, files already verified are not fetched again,
and the audio archives are extracted to `<paths.dataset_dir>/{split}/*.wav`.
"""
from pathlib import Path

import utils.cli
from utils.config import save_config
from utils.download import download_all


def main():
    parser = utils.cli.make_parser(__doc__)
    args, cfg = utils.cli.parse(parser)
    results, extracted = download_all(cfg)
    dataset_dir = Path(cfg["paths"]["dataset_dir"])
    conf_path = save_config(cfg, dataset_dir, "config.00_download_clotho.yaml")
    fetched = [r for r in results if r.status == "downloaded"]
    print(f"downloaded {len(fetched)} file(s), {len(results) - len(fetched)} already present")
    for r in results:
        if r.path.is_file():  # archives are gone when download.keep_archives is false
            print(f"  {r.path}")
    for split, n in extracted.items():
        print(f"  {dataset_dir / split}/: {n} wavs extracted")
    print(f"wrote {conf_path}")


if __name__ == "__main__":
    utils.cli.run(main)

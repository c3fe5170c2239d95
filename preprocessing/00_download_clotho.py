"""Download Clotho v2.1 (captions, metadata, audio archives) and the PANNs CNN14 checkpoint.

Every file is checked against the md5 in `download.clotho_files` / `download.panns_files`;
interrupted downloads resume on the next run, files already verified are not fetched again,
and the audio archives are extracted to `<paths.dataset_dir>/{split}/*.wav`. A present file
that differs from the official one is replaced only once the official file is downloaded and
verified; a caption or metadata CSV you edited is kept as `<name>.local-<md5>.csv` beside it.

--baseline also fetches the released DCASE 2023 baseline (Zenodo, DOI 10.5281/zenodo.7752975:
its training checkpoint and audio_encoder.pth) into `paths.pretrained_dir`, each file checked
against the md5 the record (`download.baseline_record`) lists; then
`python main.py --import-baseline <checkpoint>` makes a run of it.
"""
from pathlib import Path

import utils.cli
from utils.config import save_config
from utils.download import download_all


def main():
    parser = utils.cli.make_parser(__doc__)
    parser.add_argument("--baseline", action="store_true",
                        help="also fetch the released DCASE 2023 baseline checkpoint (Zenodo 7752975)")
    args, cfg = utils.cli.parse(parser)
    results, extracted = download_all(cfg, baseline=args.baseline)
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

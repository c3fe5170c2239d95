"""Encode every caption with a frozen Sentence-BERT model: `<paths.features_dir>/sbert_embeds.pkl`.

Reads `<paths.features_dir>/{split}_text.csv` (written by preprocessing/01_clotho_dataset.py) for
every split in `data.splits` and writes `{tid: float32 vector}` of each caption's raw text,
encoded by `sbert.model` (hub name, local directory, or "bundled:all-MiniLM-L6-v2").
"""
import utils.cli
from utils.clotho import features_dir, features_lock
from utils.config import save_config
from utils.data_utils import STEP_03_CONFIG, texts_path
from utils.sbert import compute_sbert_embeddings


def main():
    parser = utils.cli.make_parser(__doc__)
    args, cfg = utils.cli.parse(parser)
    dataset_dir = features_dir(cfg)
    sb = cfg["sbert"]
    with features_lock(dataset_dir, "03"):
        path, count, dim = compute_sbert_embeddings(
            dataset_dir, cfg["data"]["splits"], sb["model"], batch_size=sb["batch_size"],
            device=sb["device"], filename=cfg["text_encoder"]["embeddings"])
        conf_path = save_config(cfg, dataset_dir, STEP_03_CONFIG)
    print(f"encoded {count} captions ({', '.join(cfg['data']['splits'])}) with {sb['model']}: "
          f"{dim}-d float32")
    print(f"wrote {path}")
    print(f"wrote {texts_path(path)} (which text each embedding is of)")
    print(f"wrote {conf_path}")


if __name__ == "__main__":
    utils.cli.run(main)

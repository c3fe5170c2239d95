"""Reference points for a trained run's table: chance level and the untrained model.

    python benchmarks/reference_scores.py --conf conf_demo.yaml

Builds the model exactly as main.py does before its first step (same seed, same init), encodes
each evaluation split once and prints its text->audio and audio->text metrics next to the
chance level (the expected metrics of a random ranking). Needs steps 01-03 to have run.
"""
import torch

import utils.cli
from models.core import build_model
from utils import evaluation
from utils.data_utils import encode_split, features_dir, load_text_table
from utils.train_utils import seed_everything


def main():
    parser = utils.cli.make_parser(__doc__)
    _, cfg = utils.cli.parse(parser)
    dataset_dir = features_dir(cfg)
    table, tid2row = load_text_table(dataset_dir, cfg["text_encoder"]["embeddings"])
    seed_everything(cfg["seed"])
    model = build_model(cfg, text_in_dim=table.shape[1], table=table)
    untrained, chance = {}, {}
    with torch.no_grad():
        for split in cfg["eval"]["splits"]:
            emb = encode_split(model, dataset_dir, split, tid2row, cfg["eval"]["batch_size"], "cpu")
            scored = evaluation.scored_split(emb)
            untrained[split] = evaluation.split_metrics(scored)
            chance[split] = evaluation.split_chance(scored)
    print(f"untrained model ({cfg['audio_encoder']['init']} init, seed {cfg['seed']}), "
          "with the chance level under each row:")
    print(evaluation.format_table(untrained, chance))


if __name__ == "__main__":
    utils.cli.run(main)

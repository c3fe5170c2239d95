"""Step 04: transfer PANNs' AudioSet CNN14 (Cnn14_mAP=0.431.pth) into the baseline's encoder layout.

Reads <paths.pretrained_dir>/<audio_encoder.panns_checkpoint> and writes the full
CNN14Encoder(audio_encoder.out_dim) state dict to <paths.pretrained_dir>/<audio_encoder.weights>
(fc2, the projection, freshly initialised). Nothing to do when audio_encoder.init is "random".
"""
from pathlib import Path

import utils.cli
from models.audio_encoders import DEFAULT_CHANNELS
from utils.config import save_config
from utils.errors import UserError
from utils.checkpoint import save_checkpoint
from utils.panns import transfer_cnn14


def main():
    parser = utils.cli.make_parser(__doc__)
    args, cfg = utils.cli.parse(parser)
    a_cfg = cfg["audio_encoder"]
    if a_cfg["init"] == "random":
        print("audio_encoder.init is 'random': no PANNs weights need transferring; nothing written")
        return
    if tuple(a_cfg["channels"]) != DEFAULT_CHANNELS:
        raise UserError(f"config key 'audio_encoder.channels': {a_cfg['channels']} is not CNN14's "
                        f"{list(DEFAULT_CHANNELS)}, so PANNs weights cannot be used; "
                        f"set audio_encoder.init=random")
    pretrained_dir = Path(cfg["paths"]["pretrained_dir"])
    src = pretrained_dir / a_cfg["panns_checkpoint"]
    dst = pretrained_dir / a_cfg["weights"]
    encoder = transfer_cnn14(src, out_dim=a_cfg["out_dim"], url=cfg["download"]["panns_url"],
                             seed=cfg["seed"])
    save_checkpoint(dst, encoder.state_dict())
    conf_path = save_config(cfg, pretrained_dir, "config.04_cnn14_transfer.yaml")
    n_params = sum(v.numel() for k, v in encoder.state_dict().items() if not k.startswith("fc2."))
    print(f"transferred {n_params:,} CNN14 values from {src}")
    print(f"wrote {dst} (CNN14Encoder, out_dim={a_cfg['out_dim']}; fc2 freshly initialised)")
    print(f"wrote {conf_path}")


if __name__ == "__main__":
    utils.cli.run(main)

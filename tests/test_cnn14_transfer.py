"""Step 04: PANNs Cnn14 checkpoint -> CNN14Encoder weights, on a fake checkpoint with PANNs' real
key names, shapes and dtypes (random values; no PANNs code needed)."""
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from models.audio_encoders import CNN14Encoder
from models.core import build_model
from utils.errors import UserError
from utils.panns import load_panns_state, map_panns_state, panns_key_map, transfer_cnn14

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "preprocessing/04_cnn14_transfer.py"
CKPT_NAME = "Cnn14_mAP=0.431.pth"
CHANNELS = (64, 128, 256, 512, 1024, 2048)


def fake_panns_state(seed: int = 0) -> dict:
    """PANNs' Cnn14 state dict layout (32 kHz model: 1024-point STFT, 64 mel bins, 527 classes)."""
    gen = torch.Generator().manual_seed(seed)

    def bn(prefix, n):
        return {f"{prefix}.weight": torch.rand(n, generator=gen) + 0.5,
                f"{prefix}.bias": torch.randn(n, generator=gen),
                f"{prefix}.running_mean": torch.randn(n, generator=gen),
                f"{prefix}.running_var": torch.rand(n, generator=gen) + 0.5,
                f"{prefix}.num_batches_tracked": torch.tensor(int(torch.randint(1, 10**6, (1,), generator=gen)))}

    state = {"spectrogram_extractor.stft.conv_real.weight": torch.randn(513, 1, 1024, generator=gen),
             "spectrogram_extractor.stft.conv_imag.weight": torch.randn(513, 1, 1024, generator=gen),
             "logmel_extractor.melW": torch.rand(513, 64, generator=gen)}
    state.update(bn("bn0", 64))
    in_ch = 1
    for b, ch in enumerate(CHANNELS, start=1):
        state[f"conv_block{b}.conv1.weight"] = torch.randn(ch, in_ch, 3, 3, generator=gen)
        state[f"conv_block{b}.conv2.weight"] = torch.randn(ch, ch, 3, 3, generator=gen)
        state.update(bn(f"conv_block{b}.bn1", ch))
        state.update(bn(f"conv_block{b}.bn2", ch))
        in_ch = ch
    state["fc1.weight"] = torch.randn(2048, 2048, generator=gen)
    state["fc1.bias"] = torch.randn(2048, generator=gen)
    state["fc_audioset.weight"] = torch.randn(527, 2048, generator=gen)
    state["fc_audioset.bias"] = torch.randn(527, generator=gen)
    return state


@pytest.fixture(scope="module")
def panns_state():
    return fake_panns_state()


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, panns_state):
    """A pretrained dir holding the fake PANNs checkpoint (~330 MB, written once per module)."""
    d = tmp_path_factory.mktemp("pretrained")
    torch.save({"iteration": 660000, "model": panns_state}, d / CKPT_NAME)
    return d


def run_step(*overrides):
    return subprocess.run([sys.executable, SCRIPT, "--conf", "conf.yaml", "--set", *overrides],
                          cwd=REPO, capture_output=True, text=True)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_key_map_covers_every_encoder_tensor_but_fc2():
    enc_keys = set(CNN14Encoder(out_dim=3, channels=(1, 1, 1, 1, 1, 1)).state_dict())
    assert set(panns_key_map().values()) == {k for k in enc_keys if not k.startswith("fc2.")}
    assert panns_key_map()["conv_block3.bn2.running_var"] == "cnn.20.running_var"
    assert panns_key_map()["conv_block6.conv2.weight"] == "cnn.43.weight"


def test_script_transfers_every_tensor(pretrained_dir, panns_state):
    proc = run_step(f"paths.pretrained_dir={pretrained_dir}")
    assert proc.returncode == 0, proc.stderr
    out = pretrained_dir / "CNN14_300.pth"
    assert str(out) in proc.stdout
    assert (pretrained_dir / "config.04_cnn14_transfer.yaml").is_file()
    got = torch.load(out, weights_only=True, map_location="cpu")
    for src_key, dst_key in panns_key_map().items():
        assert torch.equal(got[dst_key], panns_state[src_key]), (src_key, dst_key)
    assert got["fc2.weight"].shape == (300, 2048) and torch.all(got["fc2.bias"] == 0)
    assert not any(k.startswith(("fc_audioset", "spectrogram", "logmel")) for k in got)
    assert not list(pretrained_dir.glob(".*.tmp"))  # atomic write left no temporary behind

    # The result is what build_model loads for init: prior.
    cfg = yaml.safe_load((REPO / "conf.yaml").read_text())
    cfg["paths"]["pretrained_dir"] = str(pretrained_dir)
    model = build_model(cfg, text_in_dim=16)
    assert torch.equal(model.audio_enc.cnn[43].weight, panns_state["conv_block6.conv2.weight"])
    assert torch.equal(model.audio_enc.fc[1].bias, panns_state["fc1.bias"])


def test_transfer_is_deterministic(pretrained_dir):
    a = transfer_cnn14(pretrained_dir / CKPT_NAME, out_dim=8, seed=3)
    b = transfer_cnn14(pretrained_dir / CKPT_NAME, out_dim=8, seed=3)
    assert torch.equal(a.fc2.weight, b.fc2.weight)
    # and the caller's random stream is its own: nothing reseeded behind its back
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    transfer_cnn14(pretrained_dir / CKPT_NAME, out_dim=8, seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_random_init_needs_nothing(tmp_path):
    proc = run_step(f"paths.pretrained_dir={tmp_path}", "audio_encoder.init=random")
    assert proc.returncode == 0, proc.stderr
    assert "nothing" in proc.stdout
    assert not (tmp_path / "CNN14_300.pth").exists()


def test_missing_checkpoint_says_where_to_get_it(tmp_path):
    proc = run_step(f"paths.pretrained_dir={tmp_path}")
    assert_one_line_error(proc, CKPT_NAME, "3987831", "00_download_clotho.py",
                          "https://zenodo.org/records/3987831/files/Cnn14_mAP=0.431.pth")
    assert not (tmp_path / "CNN14_300.pth").exists()


def test_narrow_channels_refused(tmp_path):
    proc = run_step(f"paths.pretrained_dir={tmp_path}", "audio_encoder.channels=[4,4,8,8,16,16]")
    assert_one_line_error(proc, "audio_encoder.channels", "init=random")


def test_non_dict_checkpoint(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / CKPT_NAME)
    with pytest.raises(UserError, match="expected a PANNs checkpoint.*got list"):
        load_panns_state(tmp_path / CKPT_NAME)


def test_plain_pickle_is_not_a_torch_file(tmp_path):
    (tmp_path / CKPT_NAME).write_bytes(pickle.dumps({"model": {}}))
    with pytest.raises(UserError, match="not a PyTorch file"):
        load_panns_state(tmp_path / CKPT_NAME)


def test_dict_without_model_entry(tmp_path):
    torch.save({"iteration": 1, "state_dict": {}}, tmp_path / CKPT_NAME)
    with pytest.raises(UserError, match="no 'model' entry.*iteration, state_dict"):
        load_panns_state(tmp_path / CKPT_NAME)


def test_missing_keys_are_listed(tmp_path, panns_state):
    partial = {k: v for k, v in panns_state.items() if k.startswith("bn0.")}
    torch.save({"model": partial}, tmp_path / CKPT_NAME)
    with pytest.raises(UserError, match=r"missing keys conv_block1.conv1.weight, .* and \d+ more"):
        transfer_cnn14(tmp_path / CKPT_NAME)


def test_wrong_shape_names_key_expected_and_got(panns_state):
    bad = dict(panns_state)
    bad["conv_block2.conv1.weight"] = torch.zeros(128, 32, 3, 3)
    encoder = CNN14Encoder()
    with pytest.raises(UserError, match=r"'conv_block2.conv1.weight' \(-> cnn.8.weight\) has shape "
                                        r"\[128, 32, 3, 3\], expected \[128, 64, 3, 3\]"):
        map_panns_state(bad, encoder)


def test_text_file_is_not_a_torch_file(tmp_path):
    (tmp_path / CKPT_NAME).write_text("<html>404 Not Found</html>\n")
    proc = run_step(f"paths.pretrained_dir={tmp_path}")
    assert_one_line_error(proc, CKPT_NAME, "not a PyTorch file")


def test_pickled_extras_are_refused_not_executed(tmp_path):
    # weights_only=True refuses arbitrary objects; the error explains instead of loading unsafely.
    import numpy as np

    # PANNs' training checkpoints also hold the sampler's numpy RandomState.
    torch.save({"model": {}, "sampler": np.random.RandomState(0).get_state()}, tmp_path / CKPT_NAME)
    with pytest.raises(UserError, match="weights_only=True"):
        load_panns_state(tmp_path / CKPT_NAME)

"""Models: CNN14 layout = the baseline's, text projection with a frozen table, dual encoder, build_model."""
import copy

import pytest
import torch
import yaml

from models.audio_encoders import CNN14Encoder
from models.core import DualEncoderModel, build_model, load_audio_encoder_weights
from models.text_encoders import SentBERTBaseEncoder
from utils.errors import UserError

SMALL = (4, 4, 8, 8, 16, 16)
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def baseline_shapes(out_dim=300, channels=(64, 128, 256, 512, 1024, 2048)):
    """The key -> shape table of the baseline's CNN14Encoder state dict, written out by hand."""
    shapes = {f"bn0.{s}": [64] if s != "num_batches_tracked" else [] for s in BN_SUFFIXES}
    in_ch = 1
    for b, ch in enumerate(channels):
        shapes[f"cnn.{8 * b}.weight"] = [ch, in_ch, 3, 3]
        shapes[f"cnn.{8 * b + 3}.weight"] = [ch, ch, 3, 3]
        for i in (8 * b + 1, 8 * b + 4):
            for s in BN_SUFFIXES:
                shapes[f"cnn.{i}.{s}"] = [ch] if s != "num_batches_tracked" else []
        in_ch = ch
    c = channels[-1]
    shapes.update({"fc.1.weight": [c, c], "fc.1.bias": [c],
                   "fc2.weight": [out_dim, c], "fc2.bias": [out_dim]})
    return shapes


@pytest.fixture(scope="module")
def full_encoder():
    torch.manual_seed(0)
    return CNN14Encoder()


def test_cnn14_state_dict_is_the_baselines(full_encoder):
    got = {k: list(v.shape) for k, v in full_encoder.state_dict().items()}
    assert got == baseline_shapes()


def test_released_audio_encoder_pth_loads_strict(full_encoder, tmp_path):
    # A file with exactly the baseline's keys and shapes, as its released audio_encoder.pth.
    gen = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(s, generator=gen) if s else torch.tensor(7))
             for k, s in baseline_shapes().items()}
    path = tmp_path / "audio_encoder.pth"
    torch.save(state, path)
    enc = copy.deepcopy(full_encoder)
    load_audio_encoder_weights(enc, path)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, state[k]), k
    # The same state wrapped as {"model": ...} also loads.
    torch.save({"model": state}, tmp_path / "wrapped.pth")
    enc2 = CNN14Encoder(channels=(64, 128, 256, 512, 1024, 2048))
    load_audio_encoder_weights(enc2, tmp_path / "wrapped.pth")
    assert torch.equal(enc2.fc2.weight, state["fc2.weight"])


def test_cnn14_forward_shapes_and_short_clips():
    torch.manual_seed(0)
    enc = CNN14Encoder(out_dim=12, channels=SMALL).eval()
    assert enc(torch.randn(3, 130, 64)).shape == (3, 12)
    # Fewer than 64 frames: padded inside forward, no error.
    assert enc(torch.randn(2, 10, 64)).shape == (2, 12)
    assert enc(torch.randn(1, 1, 64)).shape == (1, 12)
    with pytest.raises(ValueError, match="frames"):
        enc(torch.randn(2, 100, 40))


def test_cnn14_init():
    enc = CNN14Encoder(out_dim=5, channels=SMALL)
    assert torch.all(enc.fc2.bias == 0) and torch.all(enc.fc[1].bias == 0)
    assert torch.all(enc.bn0.weight == 1) and torch.all(enc.cnn[1].bias == 0)


def test_text_encoder_table_and_direct():
    torch.manual_seed(0)
    table = torch.randn(7, 10)
    enc = SentBERTBaseEncoder(10, 4, table)
    ids = torch.tensor([3, 0, 3])
    out = enc(ids)
    assert out.shape == (3, 4)
    assert torch.allclose(out, enc(table[ids]))
    # The table is a buffer that is never saved and never trained.
    assert "table" not in enc.state_dict()
    assert set(dict(enc.named_parameters())) == {"fc.weight", "fc.bias"}
    no_table = SentBERTBaseEncoder(10, 4)
    assert no_table(torch.randn(2, 10)).shape == (2, 4)
    with pytest.raises(ValueError, match="table"):
        no_table(ids)
    with pytest.raises(ValueError):
        SentBERTBaseEncoder(10, 4, torch.randn(7, 9))


def test_dual_encoder_outputs_are_unit_norm():
    torch.manual_seed(0)
    model = DualEncoderModel(CNN14Encoder(8, SMALL), SentBERTBaseEncoder(10, 8, torch.randn(5, 10))).eval()
    a, t = model(torch.randn(2, 70, 64), torch.tensor([1, 4]))
    assert a.shape == t.shape == (2, 8)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2)) and torch.allclose(t.norm(dim=-1), torch.ones(2))
    assert torch.allclose(model.text_branch(torch.tensor([4])), t[1:])


def make_cfg(repo, tmp_path, **audio):
    cfg = yaml.safe_load((repo / "conf.yaml").read_text())
    cfg["paths"]["pretrained_dir"] = str(tmp_path)
    cfg["audio_encoder"].update(audio)
    return cfg


def test_build_model_prior_random_and_frozen(repo, tmp_path):
    torch.manual_seed(0)
    src = CNN14Encoder(out_dim=6, channels=SMALL)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    cfg = make_cfg(repo, tmp_path, out_dim=6, channels=list(SMALL), init="prior", weights="w.pth")
    cfg["text_encoder"]["out_dim"] = 6
    model = build_model(cfg, text_in_dim=10, table=torch.randn(4, 10))
    for k, v in src.state_dict().items():
        assert torch.equal(model.audio_enc.state_dict()[k], v), k
    assert all(p.requires_grad for p in model.parameters())
    assert "text_enc.table" not in model.state_dict()

    cfg["audio_encoder"]["init"] = "random"
    cfg["audio_encoder"]["weights"] = "absent.pth"
    model = build_model(cfg, text_in_dim=10)
    assert not torch.equal(model.audio_enc.fc2.weight, src.fc2.weight)

    cfg["audio_encoder"]["trainable"] = False
    model = build_model(cfg, text_in_dim=10)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"audio_enc.fc2.weight", "audio_enc.fc2.bias", "text_enc.fc.weight", "text_enc.fc.bias"}


def test_build_model_missing_weights_names_the_script(repo, tmp_path):
    cfg = make_cfg(repo, tmp_path, channels=list(SMALL), init="prior", weights="CNN14_300.pth")
    with pytest.raises(UserError, match="04_cnn14_transfer.py"):
        build_model(cfg, text_in_dim=10)


def test_load_weights_wrong_keys_and_shapes(tmp_path):
    enc = CNN14Encoder(out_dim=6, channels=SMALL)
    state = enc.state_dict()
    bad_shape = dict(state, **{"fc2.weight": torch.zeros(7, 16)})
    torch.save(bad_shape, tmp_path / "shape.pth")
    with pytest.raises(UserError, match=r"'fc2.weight' has shape \[7, 16\], expected \[6, 16\]"):
        load_audio_encoder_weights(enc, tmp_path / "shape.pth")
    missing = {k: v for k, v in state.items() if not k.startswith("cnn.0")}
    missing["extra.weight"] = torch.zeros(1)
    torch.save(missing, tmp_path / "keys.pth")
    with pytest.raises(UserError, match=r"missing keys \['cnn.0.weight'.*unexpected keys \['extra.weight'\]"):
        load_audio_encoder_weights(enc, tmp_path / "keys.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    with pytest.raises(UserError, match="not a PyTorch file"):
        load_audio_encoder_weights(enc, tmp_path / "text.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(UserError, match="expected a state dict"):
        load_audio_encoder_weights(enc, tmp_path / "list.pth")


def test_build_model_narrow_channels_with_cnn14_weights_hint(repo, tmp_path):
    torch.save(CNN14Encoder(out_dim=300, channels=(4, 4, 8, 8, 16, 32)).state_dict(), tmp_path / "w.pth")
    cfg = make_cfg(repo, tmp_path, channels=list(SMALL), init="prior", weights="w.pth")
    with pytest.raises(UserError, match="init=random"):
        build_model(cfg, text_in_dim=10)

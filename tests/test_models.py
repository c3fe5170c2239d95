"""Models: CNN14 layout = the baseline's, text projection with a frozen table, dual encoder, build_model."""
import copy

import pytest
import torch
import yaml

from models.audio_encoders import CNN14Encoder, zero_beyond
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


def _trained_looking(enc: CNN14Encoder, seed: int = 0) -> CNN14Encoder:
    """Batch norms with statistics away from identity: bn0 then turns padding into non-zero
    frames, as a trained encoder's does."""
    g = torch.Generator().manual_seed(seed)
    for m in enc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.5 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return enc.eval()


@pytest.mark.parametrize("channels_last", [False, True])
def test_cnn14_with_lengths_embeds_each_clip_of_a_padded_batch_as_alone(channels_last):
    """Scoring batches clips of similar length, padded: with `lengths` each clip's embedding is
    the one it gets alone (odd lengths, and one under the 64 frames six poolings need), whatever
    the padding holds; without them the padding changes it."""
    torch.manual_seed(0)
    enc = _trained_looking(CNN14Encoder(out_dim=12, channels=SMALL)).use_channels_last(channels_last)
    lengths = [131, 130, 97, 64, 40]
    clips = [torch.randn(n, 64) - 4 for n in lengths]
    batch = torch.full((len(clips), max(lengths), 64), float("nan"))  # [B, T, F]
    for b, c in enumerate(clips):
        batch[b, :len(c)] = c
    with torch.no_grad():
        alone = torch.cat([enc(c[None]) for c in clips])
        masked = enc(batch, torch.tensor(lengths))
        assert (masked - alone).abs().max() < 1e-5 * alone.abs().max()
        zero_padded = torch.nan_to_num(batch, nan=0.0)
        assert (enc(zero_padded, torch.tensor(lengths)) - alone).abs().max() < 1e-5 * alone.abs().max()
        assert (enc(zero_padded)[:-1] - alone[:-1]).abs().max() > 1e-2  # padding, unmasked


def test_zero_beyond_keeps_the_memory_format_and_clears_nan():
    """A channels_last batch stays channels_last: otherwise each masked convolution on a GPU
    converts its input and output between the layouts (a quarter of the GPU's time)."""
    x = torch.randn(2, 3, 5, 4).to(memory_format=torch.channels_last)
    x[0, :, 3:] = float("nan")
    out = zero_beyond(x, torch.tensor([3, 5]))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out[0, :, 3:], torch.zeros(3, 2, 4)) and torch.equal(out[:, :, :3], x[:, :, :3])
    assert torch.equal(out[1], x[1])


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
    short = torch.randn(1, 64, 64)
    padded = torch.cat([short, torch.zeros(1, 6, 64)], dim=1)
    assert torch.allclose(model.audio_branch(padded, torch.tensor([64])), model.audio_branch(short), atol=1e-6)


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

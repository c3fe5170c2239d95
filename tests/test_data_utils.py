"""utils.data_utils: reading the feature files, datasets, padding, encoding each clip once."""
import pickle

import h5py
import numpy as np
import pytest
import torch

from models.core import build_model
from tests.cli_helpers import run_python
from tests.tiny_data import REPO, make_tiny_features
from utils import data_utils as du
from utils.io_utils import load_pickle
from utils.config import load_config
from utils.errors import UserError


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    clips = make_tiny_features(d)
    return d, clips


def tiny_model(tmp_path, table):
    cfg = load_config(REPO / "conf.yaml", [
        f"paths.pretrained_dir={tmp_path}", "audio_encoder.init=random",
        "audio_encoder.channels=[4, 8, 8, 16, 16, 16]", "audio_encoder.out_dim=8",
        "text_encoder.out_dim=8"])
    torch.manual_seed(0)
    return build_model(cfg, text_in_dim=table.shape[1], table=table)


def test_load_text_table(data):
    d, _ = data
    table, tid2row = du.load_text_table(d)
    assert table.dtype == torch.float32 and table.shape == (len(tid2row), 16)
    assert sorted(tid2row.values()) == list(range(len(tid2row)))


def test_collate_pad_shapes_and_zeros():
    batch = [(torch.ones(3, 64), 7, 0), (torch.full((5, 64), 2.0), 8, 1)]
    audio, rows, clips = du.collate_pad(batch)
    assert audio.shape == (2, 5, 64) and audio.dtype == torch.float32
    assert torch.all(audio[0, :3] == 1) and torch.all(audio[0, 3:] == 0)
    assert torch.all(audio[1] == 2)
    assert rows.dtype == torch.long and rows.tolist() == [7, 8]
    assert clips.tolist() == [0, 1]


def test_caption_dataset_items_and_clip_indices(data):
    d, clips = data
    _, tid2row = du.load_text_table(d)
    ds = du.CaptionDataset(d, "development", tid2row)
    assert len(ds) == 12 * 5
    x, row, clip = ds[7]
    assert x.dtype == torch.float32 and x.shape[1] == 64
    assert isinstance(row, int) and clip == 1  # captions 5..9 belong to the second clip
    assert ds.fids == [fid for fid, _, _ in clips["development"]]
    with h5py.File(d / "development_audio_logmels.hdf5", "r") as h5:
        np.testing.assert_array_equal(x.numpy(), h5[ds.fids[1]][()])
    ds.close()


def test_random_crop_only_when_training(data):
    d, _ = data
    _, tid2row = du.load_text_table(d)
    train = du.CaptionDataset(d, "development", tid2row, max_frames=32, train=True)
    assert all(train[i][0].shape[0] == 32 for i in range(0, 60, 7))
    full = du.CaptionDataset(d, "development", tid2row)
    assert full[0][0].shape[0] >= 64


def test_a_failure_in_this_code_is_not_reported_as_a_damaged_file(data, monkeypatch):
    """Only h5py's calls count as the file's: an error in the crop (this code) must surface as
    itself, not as "damaged HDF5 — delete it", which would cost a user a good file."""
    d, _ = data
    _, tid2row = du.load_text_table(d)
    train = du.CaptionDataset(d, "development", tid2row, max_frames=32, train=True)

    def broken_randint(*args, **kwargs):
        raise TypeError("a bug in the crop")
    monkeypatch.setattr(du.torch, "randint", broken_randint)
    with pytest.raises(TypeError, match="a bug in the crop"):
        train[0]


def test_dataset_opens_hdf5_lazily_and_pickles(data):
    d, _ = data
    _, tid2row = du.load_text_table(d)
    ds = du.CaptionDataset(d, "development", tid2row)
    assert ds._h5._h5 is None  # nothing open after __init__
    clone = pickle.loads(pickle.dumps(ds))
    ds[0]
    assert ds._h5._h5 is not None
    clone2 = pickle.loads(pickle.dumps(ds))  # an open handle is not pickled
    assert clone2._h5._h5 is None
    np.testing.assert_array_equal(clone[3][0].numpy(), ds[3][0].numpy())
    ds.close()


def test_dataloader_with_two_workers(data):
    d, _ = data
    _, tid2row = du.load_text_table(d)
    ds = du.CaptionDataset(d, "development", tid2row)
    ds[0]  # open in the parent first: workers must reopen, not reuse the handle
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2, collate_fn=du.collate_pad)
    n = sum(len(rows) for _, rows, _ in loader)
    assert n == len(ds)


def test_workers_are_quiet_when_their_link_to_the_stopping_parent_breaks():
    """A worker's helper thread serving a batch to a parent that stopped mid-handover printed
    a ConnectionResetError traceback after the parent's one-line message (1 in ~30 stops)."""
    code = ("import sys\n"
            "from utils.data_utils import leave_signals_to_the_parent\n"
            "leave_signals_to_the_parent(0)\n"
            "for e in (ConnectionResetError(104, 'reset by peer'), EOFError(), ValueError('a bug')):\n"
            "    sys.excepthook(type(e), e, None)\n")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "ValueError: a bug" in proc.stderr
    assert "ConnectionResetError" not in proc.stderr and "EOFError" not in proc.stderr


def test_encode_split_shapes_each_clip_once(data, tmp_path):
    d, clips = data
    table, tid2row = du.load_text_table(d)
    model = tiny_model(tmp_path, table)
    seen = []
    original = model.audio_branch

    def counting(x, lengths):
        seen.append(x.shape[0])
        return original(x, lengths)

    model.audio_branch = counting
    model.train()
    emb = du.encode_split(model, d, "validation", tid2row, batch_size=4, device="cpu")
    assert model.training  # mode restored
    assert sum(seen) == 6  # each of the 6 clips encoded exactly once
    assert emb.audio.shape == (6, 8) and emb.audio.dtype == np.float32
    assert emb.text.shape == (30, 8) and emb.text.dtype == np.float32
    assert len(emb.tids) == len(emb.captions) == 30 and emb.caption_clip.dtype == np.int64
    assert emb.fids == [fid for fid, _, _ in clips["validation"]]
    assert emb.fnames[0] == "validation_000.wav"
    np.testing.assert_allclose(np.linalg.norm(emb.audio, axis=1), 1, atol=1e-5)
    rel = du.relevance(emb)
    assert rel.shape == (30, 6) and rel.sum() == 30 and rel[7, 1]
    # padding masked out: a clip's embedding is the one it gets when encoded alone
    model.eval()
    with h5py.File(d / "validation_audio_logmels.hdf5", "r") as h5:
        alone = original(torch.from_numpy(h5[emb.fids[2]][()])[None]).detach().numpy()
    np.testing.assert_allclose(emb.audio[2], alone[0], atol=1e-5)


def test_missing_files_name_the_step(tmp_path):
    with pytest.raises(UserError, match="01_clotho_dataset"):
        du.read_text_csv(tmp_path, "development")
    with pytest.raises(UserError, match="03_sbert_embeddings"):
        du.load_text_table(tmp_path)
    with pytest.raises(UserError, match="02_audio_logmel"):
        du.open_logmels(tmp_path, "development")


def test_caption_fid_missing_from_hdf5(data):
    d, clips = data
    _, tid2row = du.load_text_table(d)
    fid = clips["development"][3][0]
    with h5py.File(d / "development_audio_logmels.hdf5", "a") as h5:
        del h5[fid]
    with pytest.raises(UserError, match=f"row 17: fid {fid}.*development_audio_logmels.hdf5"):
        du.CaptionDataset(d, "development", tid2row)


def test_tid_without_embedding(data):
    d, _ = data
    _, tid2row = du.load_text_table(d)
    tid = next(iter(tid2row))
    del tid2row[tid]
    with pytest.raises(UserError, match=f"row 2: tid {tid}") as e:
        du.CaptionDataset(d, "development", tid2row)
    # the embeddings file is text_encoder.embeddings, whatever its name: no default named
    assert "text_encoder.embeddings" in str(e.value) and "sbert_embeds.pkl" not in str(e.value)


def test_inconsistent_embedding_sizes(data):
    d, _ = data
    embeds = load_pickle(d / "sbert_embeds.pkl")
    tid = list(embeds)[5]
    embeds[tid] = np.zeros(7, dtype=np.float32)
    with open(d / "sbert_embeds.pkl", "wb") as f:
        pickle.dump(embeds, f)
    with pytest.raises(UserError, match=f"tid {tid}"):
        du.load_text_table(d)

"""LogSoftmaxLoss against a per-sample loop written from the definition."""
import math

import pytest
import torch
import torch.nn.functional as F

from utils.criterion_utils import LogSoftmaxLoss


def reference_loss(audio, text, fids, temperature=0.07, dist="dot_product"):
    """Pair i competes with itself and every j whose fid differs; both directions, summed, averaged."""
    if dist == "cosine_similarity":
        audio, text = F.normalize(audio, dim=-1), F.normalize(text, dim=-1)
    n = len(fids)
    total = 0.0
    for i in range(n):
        cands = [j for j in range(n) if j == i or fids[j] != fids[i]]
        row = torch.stack([audio[i] @ text[j] for j in cands]) / temperature    # audio i vs captions
        col = torch.stack([audio[j] @ text[i] for j in cands]) / temperature    # caption i vs clips
        pos = cands.index(i)
        total = total - torch.log_softmax(row, 0)[pos] - torch.log_softmax(col, 0)[pos]
    return total / n


def random_batch(seed, n=12, e=8, normalise=True):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, e, generator=gen, dtype=torch.float64)
    t = torch.randn(n, e, generator=gen, dtype=torch.float64)
    if normalise:
        a, t = F.normalize(a, dim=-1), F.normalize(t, dim=-1)
    return a, t


def check(fids, dist="dot_product", seed=0, normalise=True, fids_arg=None):
    a, t = random_batch(seed, n=len(fids), normalise=normalise)
    a1, t1 = a.clone().float().requires_grad_(), t.clone().float().requires_grad_()
    a2, t2 = a.clone().requires_grad_(), t.clone().requires_grad_()
    got = LogSoftmaxLoss(0.07, dist)(a1, t1, fids if fids_arg is None else fids_arg)
    want = reference_loss(a2, t2, list(fids), 0.07, dist)
    got.backward()
    want.backward()
    assert abs(got.item() - want.item()) < 1e-5 * max(1.0, abs(want.item()))
    assert torch.allclose(a1.grad.double(), a2.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(t1.grad.double(), t2.grad, atol=1e-5, rtol=1e-5)
    return got


@pytest.mark.parametrize("seed", range(4))
def test_repeated_fids_match_reference(seed):
    fids = ["clip_a", "clip_b", "clip_a", "clip_c", "clip_b", "clip_a", "clip_d", "clip_e", "clip_c", "clip_a"]
    check(fids, seed=seed)


def test_all_distinct_fids_is_plain_symmetric_cross_entropy():
    fids = list(range(9))
    got = check(fids, seed=7)
    a, t = random_batch(7, n=9)
    logits = (a @ t.T / 0.07).float()
    target = torch.arange(9)
    plain = F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
    assert abs(got.item() - plain.item()) < 1e-5


def test_cosine_mode_normalises_inputs():
    fids = [3, 3, 1, 2, 2, 2, 5, 6]
    check(fids, dist="cosine_similarity", seed=2, normalise=False)


def test_int_tensor_fids():
    fids = [4, 1, 4, 9, 1, 0]
    check(fids, seed=3, fids_arg=torch.tensor(fids))


def test_all_same_clip_gives_zero_loss():
    a, t = random_batch(0, n=4)
    loss = LogSoftmaxLoss()(a.float(), t.float(), ["x"] * 4)
    assert loss.item() == 0.0


def test_perfect_alignment_is_near_zero_and_random_near_2_log_n():
    n = 64
    a, _ = random_batch(1, n=n, e=128)
    assert LogSoftmaxLoss()(a.float(), a.float(), list(range(n))).item() < 1e-3
    b, t = random_batch(1, n=n, e=4096)
    assert abs(LogSoftmaxLoss(temperature=100.0)(b.float(), t.float(), list(range(n))).item() - 2 * math.log(n)) < 0.01


def test_bad_inputs():
    a, t = random_batch(0, n=4)
    with pytest.raises(ValueError, match="fids"):
        LogSoftmaxLoss()(a, t, [1, 2, 3])
    with pytest.raises(ValueError, match="shape"):
        LogSoftmaxLoss()(a, t[:3], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="dist"):
        LogSoftmaxLoss(dist="euclidean")

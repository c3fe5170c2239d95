"""The GPU speed paths, checked on the CPU: channels_last, torch.compile, padding, eval.amp.

Each must leave the numbers as they were (channels_last, compile) or change them only when a
key asks for it (training.pad_to_multiple); scoring follows eval.amp, not training.amp.
"""
from __future__ import annotations

import copy
import functools
import re
import time

import numpy as np
import pytest
import torch

from models.audio_encoders import CNN14Encoder
from models.core import DualEncoderModel
from models.text_encoders import SentBERTBaseEncoder
from tests.cli_helpers import drop_a_signal
from tests.tiny_data import REPO, make_tiny_features, tiny_config
from utils import cli
from utils import data_utils as du
from utils import train_utils as tu
from utils.config import load_config
from utils.criterion_utils import LogSoftmaxLoss
from utils.dist_utils import DistContext
from utils.errors import UserError

CHANNELS = (4, 8, 8, 16, 16, 16)


def tiny_model(seed: int = 0) -> DualEncoderModel:
    torch.manual_seed(seed)
    table = torch.randn(40, 12)
    model = DualEncoderModel(CNN14Encoder(8, CHANNELS), SentBERTBaseEncoder(12, 8, table))
    for m in model.modules():  # dropout draws random masks: off, so two models can be compared
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.train()


def batch(frames: int = 96, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(6, frames, 64, generator=g) - 5, torch.arange(6),
            torch.tensor([0, 0, 1, 2, 3, 4]))


def loss_and_grads(model, audio, rows, clips):
    model.zero_grad(set_to_none=True)
    a, t = model(audio, rows)
    loss = LogSoftmaxLoss(0.07)(a, t, clips)
    loss.backward()
    return loss.item(), grads_of(model)


def grads_of(model) -> dict:
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


def float64_grads(model) -> dict:
    """The gradients of `batch()` in float64: the reference both fp32 layouts are measured by."""
    return loss_and_grads(copy.deepcopy(model).double(), *(x.double() if x.is_floating_point() else x
                                                           for x in batch()))[1]


def grad_error(grads: dict, ref: dict) -> float:
    """Largest difference from `ref`, relative to each gradient's largest entry. fp32 sums in
    CNN14's batch norms cancel, so even the plain model is ~1e-3 from float64 here."""
    assert grads.keys() == ref.keys()
    return max(((grads[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in ref)


def test_channels_last_gives_the_same_loss_and_gradients():
    plain = tiny_model()
    nhwc = copy.deepcopy(plain)
    nhwc.audio_enc.use_channels_last()
    assert nhwc.audio_enc.cnn[0].weight.is_contiguous(memory_format=torch.channels_last)
    ref64 = float64_grads(plain)
    ref_loss, ref_grads = loss_and_grads(plain, *batch())
    loss, grads = loss_and_grads(nhwc, *batch())
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grad_error(grads, ref64) <= 2 * grad_error(ref_grads, ref64) + 1e-5
    # and its weights load back into a plain model unchanged
    fresh = tiny_model()  # the same caption table (a buffer that state dicts leave out)
    for p in fresh.parameters():
        p.data.add_(0.5)
    fresh.load_state_dict(nhwc.state_dict())
    assert loss_and_grads(fresh, *batch())[0] == pytest.approx(ref_loss, rel=1e-6)


def test_compiled_training_step_equals_the_eager_one(tmp_path):
    """One step of utils.train_utils.train_step, compiled (as main.py does with
    training.compile=on) and eager: same loss, same updated weights."""
    cfg = load_config(tiny_config(tmp_path), ["training.compile=on", "training.pad_to_multiple=32"])
    trainers = []
    for compiled in (False, True):
        model = tiny_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        tr = tu.Trainer(model, opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt), None,
                        LogSoftmaxLoss(0.07), torch.device("cpu"), "off", train_model=model)
        if compiled:
            tu.wrap_for_training(tr, cfg, DistContext(), torch.device("cpu"))
            assert tr.compiled
        trainers.append(tr)
    ref64 = float64_grads(trainers[0].model)
    losses = [tu.train_step(tr, *batch(), DistContext()).item() for tr in trainers]
    assert trainers[1].compiled, "the compiled step fell back to eager"
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    # the step's gradients (left in .grad) are as close to float64 as the eager step's
    eager, compiled = (grads_of(tr.model) for tr in trainers)
    assert grad_error(compiled, ref64) <= 2 * grad_error(eager, ref64) + 1e-5


def test_compile_auto_is_on_for_cuda_and_on_takes_the_cpu_too(tmp_path):
    conf = tiny_config(tmp_path)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # use_compile only reads .type
    whole = load_config(conf)
    assert tu.use_compile(whole, cuda) and not tu.use_compile(whole, cpu)  # auto, whole clips
    assert not tu.use_compile(load_config(conf, ["training.compile=off"]), cuda)
    assert not tu.use_compile(load_config(conf, ["training.pad_to_multiple=64"]), cpu)
    assert tu.use_compile(load_config(conf, ["training.pad_to_multiple=64"]), cuda)
    assert tu.use_compile(load_config(conf, ["training.max_frames=500"]), cuda)
    assert not tu.use_compile(load_config(conf, ["training.compile=off", "training.max_frames=500"]), cuda)
    assert tu.use_compile(load_config(conf, ["training.compile=on"]), cpu)  # symbolic time
    synced = load_config(conf, ["training.pad_to_multiple=64", "training.sync_batchnorm=true"])
    assert tu.use_compile(synced, cuda) and not tu.use_compile(synced, cuda, world_size=2)
    assert not tu.use_compile(load_config(conf, ["training.sync_batchnorm=true"]), cuda, world_size=2)
    assert tu.use_compile(whole, cuda, world_size=2)  # BatchNorm per process: compiled
    assert not tu.use_compile(load_config(REPO / "conf_demo.yaml"), cuda)  # six short epochs
    assert tu.use_compile(load_config(conf, ["training.compile=on", "training.sync_batchnorm=true"]), cuda, 2)


def test_compiled_whole_clips_build_one_graph_for_every_length(tmp_path, capsys):
    """training.compile=on with whole clips: one graph with a symbolic time axis serves batches
    of any length (a graph per length cost ~30 s each), each with the eager step's loss and
    gradients (lr 0: every length meets the same weights). A batch the graph does not fit is
    trained eagerly rather than compiled anew."""
    cfg = load_config(tiny_config(tmp_path), ["training.compile=on"])
    trainers = []
    for compiled in (False, True):
        model = tiny_model()
        opt = torch.optim.Adam(model.parameters(), lr=0.0)
        tr = tu.Trainer(model, opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt), None,
                        LogSoftmaxLoss(0.07), torch.device("cpu"), "off", train_model=model)
        if compiled:
            tu.wrap_for_training(tr, cfg, DistContext(), torch.device("cpu"))
            assert tr.compiled and tr.symbolic_time
        trainers.append(tr)
    graphs = tu.compiled_graphs()
    # >= 128 frames: CNN14's time axis stays > 1 after its 6 poolings; <= 171: inductor's C++
    # code for this CPU picks another reduction kernel above 4096 elements (a guard of its own).
    # 40 frames: shorter than CNN14's 64, padded inside the model, outside the graph's guards.
    for frames in (150, 131, 40, 171):
        losses = [tu.train_step(tr, *batch(frames), DistContext()).item() for tr in trainers]
        assert trainers[1].compiled, "the compiled step fell back to eager"
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
        # A tiny CNN14 has dead ReLUs and tied maxima, where fp32 subgradients part by up to
        # ~1e-2 between any two implementations (against float64, eager is the one that far
        # off at some lengths, compiled at others); a wrong graph would be off by ~1.
        eager, compiled = (grads_of(tr.model) for tr in trainers)
        assert grad_error(compiled, eager) < 3e-2
    assert tu.compiled_graphs() - graphs == 1
    assert trainers[1].eager_steps == 1
    out = capsys.readouterr().out
    assert out.count("does not fit the compiled graph") == 1 and "6 clips x 40 frames" in out


def test_pooled_lengths_do_not_split_the_graph_by_parity(monkeypatch):
    """torch < 2.13 rounded avg_pool2d's output length with a test of the remainder: a guard on
    the parity of T at each of CNN14's 6 poolings, so up to 64 graphs (seen with 2.11). Here
    that old rounding is put back, then compiling's fix is applied to it."""
    from torch import _meta_registrations as meta
    from torch._dynamo.testing import CompileCounter
    from utils import compiling

    def rounding_before_2_13(x, y):
        q, r = x // y, x % y
        if r != 0 and (bool(r < 0) != bool(y < 0)):
            q -= 1
        return q

    def graphs_for_lengths() -> int:
        torch._dynamo.reset()
        counter = CompileCounter()
        pool = torch.compile(lambda x: torch.nn.functional.avg_pool2d(x, 2), backend=counter)
        for frames in (150, 131, 171, 152):  # even, odd, odd, T // 2 even
            x = torch.ones(2, 1, frames, 8)
            torch._dynamo.mark_dynamic(x, 2)
            assert pool(x).shape[2] == frames // 2
        return counter.frame_count

    monkeypatch.setattr(meta, "div_rtn", rounding_before_2_13)
    assert graphs_for_lengths() > 1
    compiling._unguarded_pooled_lengths()
    assert graphs_for_lengths() == 1
    torch._dynamo.reset()


def test_a_compiler_failure_on_the_first_step_falls_back_to_eager_later_errors_stop(capsys):
    """The first compiled step failing (a compiler bug, a length pinned at once) leaves training
    eager, saying so; any error after that stops the run."""
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    def trainer(error, checked):
        model = tiny_model()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        tr = tu.Trainer(model, opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt), None,
                        LogSoftmaxLoss(0.07), torch.device("cpu"), "off", compiled=True,
                        symbolic_time=True, compile_checked=checked, plain_train_model=model)

        def failing(*args):
            raise error
        tr.train_model = failing
        return tr

    tr = trainer(ConstraintViolationError("specialized it to be a constant (150)"), checked=False)
    loss = tu.train_step(tr, *batch(150), DistContext())
    assert torch.isfinite(loss) and not tr.compiled and tr.train_model is tr.model
    assert "torch.compile failed on the first step" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="out of luck"):
        tu.train_step(trainer(RuntimeError("out of luck"), checked=True), *batch(150), DistContext())
    # several processes: the rank stops (torchrun then stops the others) rather than redoing
    # the step's collectives alone
    with pytest.raises(UserError, match="on rank 1 .*set training.compile=off"):
        tu.train_step(trainer(RuntimeError("inductor bug"), checked=False), *batch(150),
                      DistContext(rank=1, world_size=2))


def reference_collate(items):
    """collate_pad as it was before training.pad_to_multiple existed."""
    xs = [x for x, *_ in items]
    audio = torch.zeros(len(xs), max(x.shape[0] for x in xs), 64)
    for b, x in enumerate(xs):
        audio[b, :x.shape[0]] = x
    return (audio, *(torch.tensor([it[k] for it in items]) for k in range(1, len(items[0]))))


def test_default_padding_is_the_baselines_and_multiples_only_add_zero_frames():
    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(n, 64, generator=g), i, i // 2) for i, n in enumerate((70, 97, 33))]
    default = du.collate_pad(items)
    for got, ref in zip(default, reference_collate(items)):
        assert torch.equal(got, ref)
    padded = du.collate_pad(items, multiple=32)
    assert padded[0].shape == (3, 128, 64)
    assert torch.equal(padded[0][:, :97], default[0]) and not padded[0][:, 97:].any()
    assert du.collate_pad(items, multiple=97)[0].shape[1] == 97


def test_train_loader_pads_as_configured(tmp_path):
    make_tiny_features(tmp_path / "data")
    for overrides, check in (([], lambda a, longest: a.shape[1] == longest),
                             (["training.pad_to_multiple=64"], lambda a, longest: a.shape[1] % 64 == 0)):
        cfg = load_config(tiny_config(tmp_path), overrides)
        data = tu.load_training_data(cfg)
        loader, seeding = tu.make_train_loader(data.train_set, cfg, torch.device("cpu"), DistContext())
        seeding.set_epoch(1)
        for audio, rows, _ in loader:
            longest = max(data.train_set[data.train_set.rows.tolist().index(int(r))][0].shape[0]
                          for r in rows)
            assert check(audio, longest), (overrides, audio.shape, longest)


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # a CUDA autocast built on a CPU machine
def test_scoring_follows_eval_amp_not_training_amp(tmp_path, monkeypatch):
    """Validation metrics run with eval.amp (default off: fp32), whatever training.amp says."""
    make_tiny_features(tmp_path / "data")
    seen = []
    real = du.inference_autocast

    def spy(device, amp="off"):
        seen.append(amp)
        return real(device, amp)

    monkeypatch.setattr(du, "inference_autocast", spy)
    for eval_amp in ("off", "bf16"):
        seen.clear()
        cfg = load_config(tiny_config(tmp_path), ["training.amp=bf16", f"eval.amp={eval_amp}"])
        data = tu.load_training_data(cfg)
        tr = tu.build_trainer(cfg, data.table, torch.device("cpu"))
        val_loader = tu.make_val_loader(data.val_set, 8, 0, 0, "cpu")
        tu.validate(tr, cfg, data.tid2row, val_loader)
        assert seen and set(seen) == {eval_amp}
    # off is fp32 even on CUDA; the others autocast there (never on the CPU)
    from utils import devices
    monkeypatch.setattr(devices, "cuda_bf16", lambda: True)  # a GPU that computes bf16
    assert [du.inference_precision("cuda", a) for a in ("off", "auto", "bf16", "fp16")] == \
        ["fp32", "bf16", "bf16", "fp16"]
    assert {du.inference_precision("cpu", a) for a in ("off", "auto", "bf16", "fp16")} == {"fp32"}
    assert real("cuda", "bf16").fast_dtype == torch.bfloat16


def test_fused_adam_and_channels_last_only_on_cuda(tmp_path):
    make_tiny_features(tmp_path / "data")
    cfg = load_config(tiny_config(tmp_path))
    data = tu.load_training_data(cfg)
    tr = tu.build_trainer(cfg, data.table, torch.device("cpu"))
    assert not tr.model.audio_enc.channels_last
    assert not tr.optimizer.defaults.get("fused")


def test_a_cpu_checkpoint_resumes_into_the_cuda_trainers_layout_and_fused_adam(tmp_path):
    """On CUDA the weights are channels_last and Adam fused; a checkpoint written on the CPU
    (NCHW moments, unfused groups) must resume into that, not bring its own settings back.
    The CUDA trainer is imitated on the CPU, where fused Adam also exists."""
    cfg, data = _tiny_training(tmp_path)
    cpu, loader = _trainer_and_loader(cfg, data)
    batches = list(loader)
    for audio, rows, clips in batches[:2]:
        tu.train_step(cpu, audio, rows, clips, DistContext())
    saved = copy.deepcopy(tu.checkpoint_dict(cpu, cfg))  # as read from disk: shares no tensor

    cuda_like = tu.build_trainer(cfg, data.table, torch.device("cpu"), fresh=False)
    cuda_like.model.audio_enc.use_channels_last()
    params = [p for p in cuda_like.model.parameters() if p.requires_grad]
    cuda_like.optimizer = torch.optim.Adam(params, lr=cfg["training"]["lr"], fused=True)
    cuda_like.scheduler.optimizer = cuda_like.optimizer
    tu.restore(cuda_like, saved, tmp_path / "last.pt")

    group = cuda_like.optimizer.param_groups[0]
    assert group["fused"] is True and group["lr"] == cfg["training"]["lr"]
    convs = [p for p in params if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    for p in params:
        state = cuda_like.optimizer.state[p]
        assert state["exp_avg"].stride() == state["exp_avg_sq"].stride() == p.stride()
        assert state["step"].dtype == torch.float32 and state["step"].item() == 2
    # the same Adam update from the same state (a train step would draw other dropout masks:
    # dropout numbers channels_last tensors in memory order)
    for tr in (cpu, cuda_like):
        for i, p in enumerate(q for q in tr.model.parameters() if q.requires_grad):
            p.grad = torch.empty_like(p).copy_(torch.linspace(-1, 1, p.numel()).view(p.shape) * (i + 1))
        tr.optimizer.step()
    for a, b in zip(cpu.model.state_dict().values(), cuda_like.model.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_partial_collate_pickles_for_worker_processes():
    import pickle

    fn = functools.partial(du.collate_pad, multiple=16)
    assert pickle.loads(pickle.dumps(fn)).keywords == {"multiple": 16}


def _tiny_training(tmp_path):
    make_tiny_features(tmp_path / "data")
    cfg = load_config(tiny_config(tmp_path), ["training.log_every=1"])
    return cfg, tu.load_training_data(cfg)


def _trainer_and_loader(cfg, data):
    tu.seed_everything(cfg["seed"])
    tr = tu.build_trainer(cfg, data.table, torch.device("cpu"))
    loader, seeding = tu.make_train_loader(data.train_set, cfg, torch.device("cpu"), DistContext())
    seeding.set_epoch(1)
    return tr, loader


def test_losses_read_a_step_late_are_each_steps_own(tmp_path):
    """train_one_epoch reads a step's loss after queuing the next step (the GPU never waits
    idle for the Python loop); the logged losses are still exactly those of each step."""
    cfg, data = _tiny_training(tmp_path)
    tr, loader = _trainer_and_loader(cfg, data)
    logged = []
    stats = tu.train_one_epoch(tr, loader, 1, DistContext(), 1, logged.append)
    tr2, loader2 = _trainer_and_loader(cfg, data)
    each = [tu.train_step(tr2, audio, rows, clips, DistContext()).item() for audio, rows, clips in loader2]
    assert len(each) == stats.steps == 8
    assert [r["train/loss"] for r in logged] == each
    assert stats.loss == sum(each) / len(each) and stats.captions == 60
    for a, b in zip(tr.model.state_dict().values(), tr2.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_ctrl_c_python_dropped_stops_training_at_the_next_step(tmp_path):
    """A Ctrl-C that lands in a weakref callback raises nowhere; the step after it stops the
    run (a CI run trained all its epochs after such a Ctrl-C, and exited 0)."""
    cfg, data = _tiny_training(tmp_path)
    tr, loader = _trainer_and_loader(cfg, data)
    checks = []

    def check():  # runs after each step
        checks.append(1)
        if len(checks) == 2:
            drop_a_signal()

    with pytest.raises(SystemExit) as e:
        cli.run(lambda: tu.train_one_epoch(tr, loader, 1, DistContext(), check=check))
    assert e.value.code == 130 and len(checks) == 2 < len(loader)


def test_a_nan_loss_names_its_own_step_though_read_a_step_late(tmp_path):
    import h5py

    cfg, data = _tiny_training(tmp_path)
    fid = data.train_set.fids[5]
    with h5py.File(tmp_path / "data" / "development_audio_logmels.hdf5", "a") as h5:
        h5[fid][2, 3] = float("nan")
    data = tu.load_training_data(cfg)
    tr, loader = _trainer_and_loader(cfg, data)
    bad = next(step for step, (audio, _, _) in enumerate(loader, 1) if not torch.isfinite(audio).all())
    tr, loader = _trainer_and_loader(cfg, data)
    with pytest.raises(tu.UserError, match=rf"epoch 1, step {bad}: training loss is nan.*{fid}"):
        tu.train_one_epoch(tr, loader, 1, DistContext(), 1)


def test_validation_loss_summed_on_the_device_is_the_float_sum(tmp_path):
    """validation_loss reads the loss once, not per batch: the same float64 sum as before."""
    cfg, data = _tiny_training(tmp_path)
    tr = tu.build_trainer(cfg, data.table, torch.device("cpu"))
    val_loader = tu.make_val_loader(data.val_set, 8, 0, 0, "cpu")
    tr.model.eval()
    with torch.no_grad():
        losses = [tr.criterion(*tr.model(audio, rows), clips).item() for audio, rows, clips in val_loader]
    total = 0.0
    for v in losses:
        total += v
    assert tu.validation_loss(tr, val_loader) == total / len(losses)


def test_validation_loss_follows_eval_amp_not_training_amp(tmp_path):
    """The loss that picks best.pt is fp32 (eval.amp: off) however training autocasts; bf16
    autocast (which the CPU also runs) only where eval.amp asks for it."""
    cfg, data = _tiny_training(tmp_path)
    tr = tu.build_trainer(cfg, data.table, torch.device("cpu"))
    val_loader = tu.make_val_loader(data.val_set, 8, 0, 0, "cpu")
    fp32 = tu.validation_loss(tr, val_loader)
    tr.amp = "bf16"  # as training.amp: auto resolves on a bf16 GPU
    assert tu.validation_loss(tr, val_loader, "off") == fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what the training precision would give
        tr.model.eval()
        with torch.no_grad():
            bf16 = np.mean([tr.criterion(*(t.float() for t in tr.model(a, r)), c).item()
                            for a, r, c in val_loader])
    assert abs(bf16 - fp32) > 1e-6  # the test could tell them apart


def test_cudnn_autotuner_tunes_the_training_pass_only(tmp_path, monkeypatch):
    """fit() turns cudnn.benchmark on for padded or cropped training (on CUDA); validation
    encodes whole clips, a batch per distinct length (~550 for Clotho), and must not time
    kernels for each of them. Checked by what each phase sees, the CUDA decision forced."""
    cfg, data = _tiny_training(tmp_path)
    cfg["training"]["epochs"] = 1
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # put back after the test
    monkeypatch.setattr(tu, "cudnn_benchmark", lambda cfg, device: True)
    seen = {}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen.setdefault(name, set()).add(torch.backends.cudnn.benchmark)
            return fn(*args, **kwargs)
        monkeypatch.setattr(tu, name, wrapped)

    for name in ("train_one_epoch", "validation_loss", "encode_split"):
        spy(name, getattr(tu, name))
    run_dir = tmp_path / "outputs" / "run"
    run_dir.mkdir(parents=True)
    tu.fit(cfg, run_dir, data, DistContext(), torch.device("cpu"))
    assert seen == {"train_one_epoch": {True}, "validation_loss": {False}, "encode_split": {False}}
    assert not torch.backends.cudnn.benchmark  # as the process had it (a notebook scores next)


def test_validation_workers_live_for_the_run_and_each_epoch_draws_the_global_rng_as_before(tmp_path):
    """The validation loader's workers are forked once (each fork of a GPU process idles the
    GPU); the loss is unchanged, and every validation still takes the one global RNG draw a
    fresh loader took, so a seed's dropout masks (and numbers) stay those of earlier versions."""
    cfg, data = _tiny_training(tmp_path)
    tr = tu.build_trainer(cfg, data.table, torch.device("cpu"))
    loader = tu.make_val_loader(data.val_set, 8, 0, 2, "cpu")
    assert loader.persistent_workers
    fresh = torch.utils.data.DataLoader(loader.dataset, batch_size=8, num_workers=2,
                                        collate_fn=du.collate_pad)  # as earlier versions made it
    in_process = tu.validation_loss(tr, tu.make_val_loader(data.val_set, 8, 0, 0, "cpu"))
    for _ in range(2):  # epoch after epoch
        torch.manual_seed(5)
        for _ in fresh:  # what validation drew from the global RNG: a fresh iterator's seed
            pass
        expected = torch.rand(3)
        torch.manual_seed(5)
        assert tu.validation_loss(tr, loader) == in_process
        assert torch.equal(torch.rand(3), expected)


def test_length_sorted_batches_go_longest_first_ties_in_order():
    assert du.length_sorted_batches([5, 9, 5, 7, 9], 2) == [[1, 4], [3, 0], [2]]
    assert du.length_sorted_batches([], 4) == []
    # a frame budget (padded frames): a clip over it alone, then as many as fit
    assert du.length_sorted_batches([10, 4, 4, 4, 30], 3, max_frames=12) == [[4], [0], [1, 2, 3]]


def test_clip_batches_stop_at_a_frame_budget_small_on_the_cpu():
    """Long clips in large batches are slower on the CPU (they leave the caches): there a batch
    of 30-s clips holds 4; a GPU takes eval.batch_size of them, and fewer of long recordings,
    whose batch would not fit its memory."""
    assert [len(b) for b in du.clip_batches([1501] * 9, 32, "cpu")] == [4, 4, 1]
    assert [len(b) for b in du.clip_batches([150] * 40, 32, "cpu")] == [32, 8]  # short clips
    gpu = torch.device("cuda")
    assert [len(b) for b in du.clip_batches([1501] * 40, 32, gpu)] == [32, 8]
    assert [len(b) for b in du.clip_batches([20_000] * 3 + [100_000], 32, gpu)] == [1, 2, 1]


@pytest.mark.parametrize("workers", [0, 2])
def test_encode_audio_embeds_each_clip_of_a_padded_batch_as_alone(tmp_path, workers):
    """Clips of similar length share a batch, padded (one small batch per distinct length left
    the GPU waiting on the host); the model gets each batch's lengths, and every clip's
    embedding is the one it gets alone."""
    make_tiny_features(tmp_path / "data", frames=(60, 90))  # 12 clips, one under 64 frames
    model = tiny_model().eval()
    fids = du.read_split_captions(tmp_path / "data", "development")[0]["fid"].unique().tolist()
    dataset = du.ClipDataset(tmp_path / "data", "development", fids)
    assert dataset.lengths.min() < 64 and len(set(dataset.lengths)) > 6
    seen = []
    branch = model.audio_branch

    def recording(audio, lengths):
        seen.append((audio.shape, lengths.tolist()))
        return branch(audio, lengths)
    model.audio_branch = recording
    emb = du.encode_audio(model, dataset, 4, "cpu", num_workers=workers)
    order = sorted(range(12), key=lambda i: -dataset.lengths[i])
    assert seen == [((4, int(dataset.lengths[order[s]]), 64), [int(dataset.lengths[i]) for i in order[s:s + 4]])
                    for s in (0, 4, 8)]
    with torch.no_grad():
        for c in range(len(fids)):
            assert abs(branch(dataset[c][0][None])[0].numpy() - emb[c]).max() < 1e-5


def test_encode_logmels_embeds_each_file_as_alone_in_input_order():
    """query.py's path (log-mels of wav files in memory): batched by length, padding masked out,
    results in the order given."""
    from utils.evaluation import encode_logmels

    model = tiny_model().eval()
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(n, 64)).astype(np.float32) - 4 for n in (70, 131, 40, 131, 99)]
    emb = encode_logmels(model, feats, 3, "cpu", progress=False)
    with torch.no_grad():
        alone = np.stack([model.audio_branch(torch.from_numpy(x)[None])[0].numpy() for x in feats])
    assert emb.shape == (5, 8) and np.abs(emb - alone).max() < 1e-5


def test_embeddings_copied_off_the_device_in_chunks_land_in_clip_order(tmp_path):
    """encode_audio copies embeddings back every `copy_every` batches (not per batch, which would
    wait for the GPU each time); any chunking gives each clip its own embedding."""
    make_tiny_features(tmp_path / "data")
    model = tiny_model().eval()
    fids = du.read_split_captions(tmp_path / "data", "development")[0]["fid"].unique().tolist()

    def dataset():
        return du.ClipDataset(tmp_path / "data", "development", fids)

    once = du.encode_audio(model, dataset(), 2, "cpu", copy_every=10_000)
    chunked = du.encode_audio(model, dataset(), 2, "cpu", copy_every=1)
    assert once.shape == (12, 8) and (chunked == once).all()
    ds = dataset()
    with torch.no_grad():
        for c in (0, 7, 11):
            alone = model.audio_branch(ds[c][0][None])[0].numpy()
            assert abs(alone - once[c]).max() < 1e-5


def test_the_bar_does_not_count_a_graph_build_as_a_step(tmp_path, monkeypatch, capsys):
    """A compiled run's first step builds the graph (~45 s on an H200): the progress bar must
    not take it for a step's time (it promised 7:38:50 for a Clotho epoch), and the run says
    what it is doing before the wait."""
    cfg, data = _tiny_training(tmp_path)
    tr, loader = _trainer_and_loader(cfg, data)
    tr.compiled, tr.symbolic_time = True, True
    built = []
    step = tu.train_step

    def building_step(tr, *args):  # the first step "compiles" for 1.5 s
        if not tr.compile_checked:
            time.sleep(1.5)
            built.append(1)
            tr.compile_checked = True
        return step(tr, *args)

    monkeypatch.setattr(tu, "train_step", building_step)
    monkeypatch.setattr(tu, "compiled_graphs", lambda: len(built))
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    tu.train_one_epoch(tr, loader, 1, DistContext(), 1)
    out, err = capsys.readouterr()
    assert out.count("compiling the training step with torch.compile (one graph for every clip length") == 1
    rates = [float(r) for r in re.findall(r"([\d.]+)s/it", err)]
    elapsed = re.findall(r"\[(\d\d:\d\d)<", err)
    assert elapsed and all(e == "00:00" for e in elapsed), err  # the 1.5 s are not on the clock
    assert all(r < 1.0 for r in rates), err


def test_validation_clips_read_by_one_worker_for_the_run_give_the_same_metrics(tmp_path):
    """Validation's clip embeddings read by a worker that lives for the run (while the main
    process launches the GPU's work): the same metrics as clips read in-process, every epoch,
    from the same worker process."""
    make_tiny_features(tmp_path / "data")
    cfg = load_config(tiny_config(tmp_path), ["training.num_workers=2"])
    data = tu.load_training_data(cfg)
    tr = tu.build_trainer(cfg, data.table, torch.device("cpu"))
    val_loader = tu.make_val_loader(data.val_set, 8, 0, 0, "cpu")

    def validate(*clips):  # -> (metrics, the global RNG after): dropout draws from it next
        torch.manual_seed(5)
        return tu.validate(tr, cfg, data.tid2row, val_loader, *clips), torch.get_rng_state()

    in_process, rng = validate()
    clips = tu.make_val_clip_loader(cfg, torch.device("cpu"))
    assert clips.num_workers == 1 and clips.persistent_workers
    first, rng_first = validate(clips)
    workers = [w.pid for w in clips._iterator._workers]
    second, rng_second = validate(clips)
    assert first == second == in_process
    assert [w.pid for w in clips._iterator._workers] == workers  # not forked again
    # every epoch's validation draws from the global RNG as much as before: a resumed run
    # (whose worker starts in a later epoch) goes on as the uninterrupted one
    assert torch.equal(rng_first, rng) and torch.equal(rng_second, rng)
    assert tu.make_val_clip_loader(load_config(tiny_config(tmp_path), ["training.num_workers=0"]),
                                   torch.device("cpu")).num_workers == 0


@pytest.mark.parametrize("num_workers,device,expected", [(8, "cpu", 1), (8, "cuda", 4), (2, "cuda", 2),
                                                         (0, "cuda", 0)])
def test_validation_clips_are_read_by_more_workers_for_a_gpu(tmp_path, num_workers, device, expected):
    """On a GPU one worker was what the clip embeddings waited for; on the CPU the model is."""
    make_tiny_features(tmp_path / "data")
    cfg = load_config(tiny_config(tmp_path), [f"training.num_workers={num_workers}"])
    assert tu.make_val_clip_loader(cfg, torch.device(device)).num_workers == expected


def test_a_kept_clip_loader_of_other_clips_is_refused(tmp_path):
    """A split rewritten while a run holds its clip loader: a clear error, not wrong metrics."""
    make_tiny_features(tmp_path / "data")
    cfg = load_config(tiny_config(tmp_path))
    data = tu.load_training_data(cfg)
    tr = tu.build_trainer(cfg, data.table, torch.device("cpu"))
    kept = du.split_clip_loader(tmp_path / "data", "development", 8, "cpu")  # another split's clips
    with pytest.raises(UserError, match="split 'validation' .* changed while it was in use"):
        du.encode_split(tr.model, tmp_path / "data", "validation", data.tid2row, 8, "cpu", loader=kept)

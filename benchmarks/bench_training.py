"""Training-speed figures on this machine, the CPU (prints numbers, asserts nothing).
GPU figures: benchmarks/bench_gpu.py.

1. The InfoNCE loss at batch 32 (E = 300, captions drawn as in Clotho: 5 per clip, so some
   clips repeat in a batch): the vectorised LogSoftmaxLoss against the original code's
   per-sample loop (benchlib.original_infonce), forward + backward.
2. Training steps/s of the real training step (utils.train_utils.train_one_epoch) on the CPU:
   a narrow CNN14 and the full CNN14 widths, batch 32 of 3 s clips (150 frames).
3. The training DataLoader on a Clotho-shaped development split (HDF5 reads + collation of
   751-1501-frame log-mels): clips/s with 1 and 2 worker processes.
4. The end of an epoch that improved `training.monitor`: how long the training loop is held up
   by the checkpoint (full CNN14 + Adam's state), written the old way (best.pt, then last.pt,
   each in full, before training goes on) and as main.py writes it now (copied off the model,
   then written once in the background, best.pt a hard link to the same file).
5. Clip embeddings of a Clotho-validation-shaped split (1045 clips of 751-1501 frames), a narrow
   CNN14, read in-process: one unpadded batch per distinct length (the reference, as
   encode_audio did before) against batches of clips of similar length, padded, with the
   padding masked out in the encoder (utils.data_utils.encode_audio now: on the CPU up to
   CPU_BATCH_FRAMES frames a batch), and how far apart the two sets of embeddings are. On a GPU the full CNN14 is bound by the host at one small
   batch per length (bench_gpu.py --sections busy).

    python benchmarks/bench_training.py [--steps 10] [--full-steps 2] [--threads N]
                                        [--loader-clips 800] [--work /tmp/bench_training]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchlib import embed_per_length, loader_throughput, make_clotho_features, original_infonce
from models.audio_encoders import CNN14Encoder
from models.core import DualEncoderModel
from models.text_encoders import SentBERTBaseEncoder
from utils.criterion_utils import LogSoftmaxLoss
from utils.dist_utils import DistContext
from utils.train_utils import Trainer, train_one_epoch

SMALL = (16, 32, 64, 128, 128, 256)
FULL = (64, 128, 256, 512, 1024, 2048)


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_loss(batch: int = 32, dim: int = 300) -> None:
    g = torch.Generator().manual_seed(0)
    # 32 of the 5 x 48 captions of 48 clips: repeated clips, as Clotho's batches have
    fids = (torch.randint(0, 48, (batch,), generator=g)).tolist()
    audio = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    criterion = LogSoftmaxLoss(0.07)

    def vectorised():
        audio.grad = text.grad = None
        criterion(audio, text, fids).backward()

    def looped():
        audio.grad = text.grad = None
        original_infonce(audio, text, fids, 0.07).backward()

    ref = original_infonce(audio, text, fids, 0.07).item()
    got = criterion(audio, text, fids).item()
    t_vec, t_loop = time_it(vectorised, 200), time_it(looped, 5)
    print(f"loss, batch {batch}, E={dim}, {len(set(fids))} distinct clips "
          f"(values agree: {got:.6f} vs {ref:.6f})")
    print(f"  vectorised LogSoftmaxLoss  fwd+bwd {t_vec * 1e3:8.3f} ms")
    print(f"  the original's per-sample loop fwd+bwd {t_loop * 1e3:8.3f} ms")
    print(f"  speed-up                   {t_loop / t_vec:8.1f}x")


def bench_steps(channels, steps: int, batch: int = 32, frames: int = 150, text_dim: int = 768) -> None:
    torch.manual_seed(0)
    table = torch.randn(1000, text_dim)
    model = DualEncoderModel(CNN14Encoder(300, channels), SentBERTBaseEncoder(text_dim, 300, table))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    tr = Trainer(model, optimizer, scheduler, None, LogSoftmaxLoss(0.07), torch.device("cpu"), "off",
                 text_embed_dim=text_dim, train_model=model)
    batches = [(torch.randn(batch, frames, 64) - 5, torch.randint(0, 1000, (batch,)),
                torch.randint(0, batch // 2, (batch,))) for _ in range(steps + 1)]
    train_one_epoch(tr, batches[:1], 0, DistContext(rank=1))  # warm-up (rank 1: no progress bar)
    start = time.perf_counter()
    train_one_epoch(tr, batches[1:], 1, DistContext(rank=1))
    elapsed = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  channels {list(channels)} ({n_params / 1e6:.1f} M params): {steps} steps in "
          f"{elapsed:.1f} s -> {steps / elapsed:.2f} steps/s, {steps * batch / elapsed:.1f} captions/s")


def bench_loader(clips: int, work: Path, batches: int) -> None:
    from utils.data_utils import CaptionDataset, load_text_table

    root = work / f"clotho_shaped_{clips}"
    if not (root / "sbert_embeds.pkl").exists():
        make_clotho_features(root, {"development": clips}, embed_dim=16)
    _, tid2row = load_text_table(root)
    dataset = CaptionDataset(root, "development", tid2row, train=True)
    print(f"training DataLoader, {clips} Clotho-shaped clips (751-1501 frames), batch 32, shuffled")
    one = None
    for workers in (1, 2):
        r = loader_throughput(dataset, workers, batches)
        one = one or r["clips_per_s"]
        print(f"  {workers} worker(s): {r['clips_per_s']:7.0f} clips/s ({r['MB_per_s']:.0f} MB/s), "
              f"{r['clips_per_s'] / one:.2f}x one worker")


def bench_checkpoint(work: Path) -> None:
    import tempfile

    from utils.checkpoint import CheckpointWriter, save_checkpoint
    from utils.train_utils import checkpoint_dict

    torch.manual_seed(0)
    table = torch.randn(100, 768)
    model = DualEncoderModel(CNN14Encoder(300, FULL), SentBERTBaseEncoder(768, 300, table))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
    tr = Trainer(model, optimizer, scheduler, None, LogSoftmaxLoss(0.07), torch.device("cpu"), "off",
                 text_embed_dim=768, train_model=model)
    train_one_epoch(tr, [(torch.randn(2, 64, 64) - 5, torch.arange(2), torch.arange(2))], 1,
                    DistContext(rank=1))  # Adam's moments exist, as at a real epoch's end
    work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work) as d:
        best, last = Path(d) / "best.pt", Path(d) / "last.pt"
        start = time.perf_counter()
        state = checkpoint_dict(tr, {})
        save_checkpoint(best, state)
        save_checkpoint(last, state)
        old = time.perf_counter() - start
        size = last.stat().st_size / 1e6
        writer = CheckpointWriter()
        held = []
        for _ in range(2):  # the second epoch's end reuses the first one's buffers
            start = time.perf_counter()
            writer.submit("the checkpoint", save_checkpoint, last, writer.snapshot(checkpoint_dict(tr, {})),
                          copies=[best])
            held.append(time.perf_counter() - start)
            writer.wait()
            background = time.perf_counter() - start - held[-1]
    print(f"end of an improving epoch, full CNN14 + Adam ({size:.0f} MB a checkpoint), {work}'s disk")
    print(f"  best.pt then last.pt, in full, training waits   {old:6.2f} s")
    print(f"  copied off the model, written in the background {held[1]:6.2f} s (the first epoch's end "
          f"{held[0]:.2f} s; the write itself, once: {background:.2f} s)")


def bench_embeddings(work: Path, repeats: int = 3) -> None:
    import statistics

    import numpy as np

    from utils.data_utils import ClipDataset, clip_batches, encode_audio, read_text_csv

    root = work / "clotho_validation_shaped"
    if not (root / "sbert_embeds.pkl").exists():
        make_clotho_features(root, {"validation": 1045}, embed_dim=16)
    fids = list(dict.fromkeys(read_text_csv(root, "validation")["fid"]))
    torch.manual_seed(0)
    model = DualEncoderModel(CNN14Encoder(300, SMALL), SentBERTBaseEncoder(16, 300)).eval()

    def per_length() -> np.ndarray:
        return embed_per_length(model, ClipDataset(root, "validation", fids), 32, "cpu")

    def masked() -> np.ndarray:
        return encode_audio(model, ClipDataset(root, "validation", fids), 32, "cpu")

    runs = {"reference": per_length, "masked": masked}
    times: dict[str, list[float]] = {name: [] for name in runs}
    kept: dict[str, np.ndarray] = {}
    for _ in range(repeats):  # alternating, so drifts of the machine hit both alike
        for name, fn in runs.items():
            start = time.perf_counter()
            kept[name] = fn()
            times[name].append(time.perf_counter() - start)
    t = {name: statistics.median(v) for name, v in times.items()}
    lengths = ClipDataset(root, "validation", fids).lengths
    print(f"clip embeddings, 1045 Clotho-shaped clips, CNN14 {SMALL}, read in-process, median of {repeats}")
    print(f"  one unpadded batch per length ({len(set(lengths.tolist()))} batches)   {t['reference']:6.2f} s")
    masked_batches = len(clip_batches(lengths, 32, "cpu"))
    print(f"  eval.batch_size 32, padding masked out ({masked_batches} batches)   {t['masked']:6.2f} s "
          f"({t['reference'] / t['masked']:.2f}x); largest difference between the embeddings "
          f"{np.abs(kept['reference'] - kept['masked']).max():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="steps timed for the narrow CNN14")
    parser.add_argument("--full-steps", type=int, default=2, help="steps timed for the full CNN14")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--loader-clips", type=int, default=800, help="clips of the loader's split")
    parser.add_argument("--loader-batches", type=int, default=60, help="batches timed per setting")
    parser.add_argument("--work", default="/tmp/bench_training", help="folder for the generated split")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    bench_loss()
    print("training steps on the CPU, batch 32, 150 frames (3 s clips), Adam, AMP off")
    bench_steps(SMALL, args.steps)
    bench_steps(FULL, args.full_steps)
    bench_loader(args.loader_clips, Path(args.work), args.loader_batches)
    bench_checkpoint(Path(args.work))
    bench_embeddings(Path(args.work))


if __name__ == "__main__":
    main()

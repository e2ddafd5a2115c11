#!/usr/bin/env python3
"""Training-loop benchmark: a small PyTorch model fed two ways in one run.

(a) Ferry with GPU delivery: producer processes build batches and publish
    them into a Ferry stream; ferryd copies each into the trainer's GPU
    pool; the trainer iterates ``ferry.iterable_dataset(..., device="cuda:0")``
    and gets CUDA tensors, no copy in the training process.
(b) PyTorch's DataLoader with ``pin_memory=True`` and worker processes
    producing the same batches with the same per-batch CPU cost, moved to
    the GPU with ``.to("cuda", non_blocking=True)``.

Both use the same model, the same batch shape, the same number of
producer processes (``--workers``) and the same CPU work per batch
(``make_batch``: random images plus an augmentation pass). Reports, for
each, steps per second and the fraction of wall time the GPU was busy
(CUDA-event time of the training step's kernels / wall time), as one JSON
line per result with (b) as the baseline:

  {"bench":"train_loop","case":"ferry_steps_per_s",...,"baseline":"dataloader_pinned_steps_per_s",...}

Needs PyTorch with a CUDA GPU, ferryd and libferry.so (FERRY_BIN_DIR, or
target/release beside this file); it starts its own ferryd.
"""

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN_DIR = pathlib.Path(os.environ.get("FERRY_BIN_DIR", ROOT / "target" / "release"))
os.environ.setdefault("FERRY_LIB", str(BIN_DIR / "libferry.so"))
sys.path.insert(0, str(ROOT / "client-c" / "python"))

import numpy as np  # noqa: E402


def make_batch(seed, batch, side, cpu_passes):
    """The per-batch CPU cost both loaders pay: images + labels, with
    ``cpu_passes`` augmentation passes (flip, normalise)."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch, 3, side, side), dtype=np.float32)
    for _ in range(cpu_passes):
        x = x[:, :, :, ::-1] * 0.5 + 0.25
    y = rng.integers(0, 10, size=(batch,), dtype=np.int64)
    return np.ascontiguousarray(x), y


def batch_bytes(batch, side):
    return batch * 3 * side * side * 4 + batch * 8


def ferry_producer(socket, stream, worker, workers, steps, batch, side, cpu_passes):
    import ferry

    client = ferry.Client(socket)
    prod = client.producer(stream)
    for i in range(worker, steps, workers):
        x, y = make_batch(i, batch, side, cpu_passes)
        slot = prod.reserve(timeout_s=60)
        view = slot.data
        xb = x.view(np.uint8).reshape(-1)
        view[: xb.size] = xb
        view[xb.size : xb.size + y.nbytes] = y.view(np.uint8)
        prod.publish(slot, xb.size + y.nbytes)
    prod.close()
    client.close()


class SyntheticBatches:
    """The DataLoader's map-style dataset: the same batches, made the same
    way (module level, so that spawned workers can unpickle it)."""

    def __init__(self, steps, batch, side, cpu_passes):
        self.steps, self.batch, self.side, self.cpu_passes = steps, batch, side, cpu_passes

    def __len__(self):
        return self.steps

    def __getitem__(self, i):
        import torch

        x, y = make_batch(i, self.batch, self.side, self.cpu_passes)
        return torch.from_numpy(x), torch.from_numpy(y)


def build_model(torch, side):
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 16, 10),
    ).cuda()


def train(torch, batches, steps, side, batch, warmup):
    """Runs the training loop over ``batches`` (yielding (x, y) on the GPU);
    returns steps/s and GPU-busy fraction after ``warmup`` steps."""
    model = build_model(torch, side)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    events = []
    t0 = None
    n = 0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            events.clear()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        end.record()
        events.append((start, end))
        n = i + 1
        if n >= steps:
            break
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    busy = sum(s.elapsed_time(e) for s, e in events) / 1000.0
    timed = n - warmup
    return timed / wall, min(busy / wall, 1.0), timed


@contextlib.contextmanager
def ferryd(prefix, bin_dir=None):
    """A ferryd of our own in a fresh directory; yields its socket path."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    sock = tmp / "ferryd.sock"
    (tmp / "ferryd.toml").write_text(f'version = 1\n[daemon]\nsocket = "{sock}"\nlog = "warn"\n')
    daemon = subprocess.Popen([str((bin_dir or BIN_DIR) / "ferryd"), "--config", str(tmp / "ferryd.toml")])
    try:
        for _ in range(500):
            if sock.exists():
                break
            time.sleep(0.01)
        yield sock
    finally:
        daemon.terminate()
        daemon.wait()


def run_ferry(torch, args):
    import ferry

    with ferryd("ferry-train-") as sock:
        size = batch_bytes(args.batch, args.side)
        client = ferry.Client(str(sock))
        creator = client.producer("train", partitions=args.workers, slot_size=size, slot_count=4 * args.workers + 8)
        ds = ferry.iterable_dataset(
            "train", "trainer", socket=str(sock), timeout_s=60, device="cuda:0", prefetch=args.prefetch
        )
        procs = [
            mp.Process(
                target=ferry_producer,
                args=(str(sock), "train", w, args.workers, args.steps, args.batch, args.side, args.cpu_passes),
            )
            for w in range(args.workers)
        ]
        for p in procs:
            p.start()
        creator.close()
        nx = args.batch * 3 * args.side * args.side * 4

        def batches():
            for t in ds:  # uint8 CUDA tensor over the batch, in place
                x = t[:nx].view(torch.float32).view(args.batch, 3, args.side, args.side)
                y = t[nx:].view(torch.int64)
                yield x, y

        result = train(torch, batches(), args.steps, args.side, args.batch, args.warmup)
        for p in procs:
            p.join(timeout=60)
        client.close()
        return result


def run_dataloader(torch, args):
    loader = torch.utils.data.DataLoader(
        SyntheticBatches(args.steps, args.batch, args.side, args.cpu_passes),
        batch_size=None,
        num_workers=args.workers,
        pin_memory=True,
        prefetch_factor=max(2, args.prefetch // max(args.workers, 1)),
        persistent_workers=False,
    )

    def batches():
        for x, y in loader:
            yield x.to("cuda", non_blocking=True), y.to("cuda", non_blocking=True)

    return train(torch, batches(), args.steps, args.side, args.batch, args.warmup)


def emit(case, unit, value, baseline, baseline_value):
    print(
        json.dumps(
            {
                "bench": "train_loop",
                "case": case,
                "unit": unit,
                "value": round(value, 3),
                "baseline": baseline,
                "baseline_value": round(baseline_value, 3),
                "ratio": round(value / baseline_value, 3) if baseline_value else None,
            }
        ),
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--side", type=int, default=128, help="image side (3 x side x side float32)")
    ap.add_argument("--workers", type=int, default=4, help="producer / DataLoader worker processes")
    ap.add_argument("--cpu-passes", type=int, default=2, help="augmentation passes per batch (CPU cost)")
    ap.add_argument("--prefetch", type=int, default=8)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("train_loop.py needs PyTorch with a CUDA GPU")
    mp.set_start_method("spawn", force=True)
    f_sps, f_busy, f_n = run_ferry(torch, args)
    d_sps, d_busy, d_n = run_dataloader(torch, args)
    emit("ferry_steps_per_s", "steps/s", f_sps, "dataloader_pinned_steps_per_s", d_sps)
    emit("ferry_gpu_busy_fraction", "fraction", f_busy, "dataloader_pinned_gpu_busy_fraction", d_busy)


if __name__ == "__main__":
    main()

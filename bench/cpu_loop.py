#!/usr/bin/env python3
"""CPU training-loop benchmark: one small PyTorch model trained on the CPU,
fed two ways in one run.

(a) Ferry: ``--producers`` producer processes build batches (the same
    ``make_batch`` as train_loop.py: random images plus augmentation
    passes) and send them as typed records ``{"x": images, "y": labels}``;
    the trainer iterates ``ferry.iterable_dataset`` with ``num_workers=0``
    and gets tensors viewing the slots in place (no copy, no dtype or
    shape passed); each slot goes back to ferryd when its tensors die.
(b) PyTorch's DataLoader with as many worker processes producing the
    same batches with the same CPU cost (collated in shared memory by the
    workers, as DataLoader does).

Reports batches per second of the training loop for each, as one JSON
line with (b) as the baseline:

  {"bench":"cpu_loop","case":"ferry_batches_per_s",...,"baseline":"dataloader_batches_per_s",...}

Needs PyTorch, ferryd and libferry.so (FERRY_BIN_DIR, or target/release
beside this file); it starts its own ferryd. ``--smoke`` runs a few steps
to check that it works (the figures then mean nothing).
"""

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN_DIR = pathlib.Path(os.environ.get("FERRY_BIN_DIR", ROOT / "target" / "release"))
os.environ.setdefault("FERRY_LIB", str(BIN_DIR / "libferry.so"))
sys.path.insert(0, str(ROOT / "client-c" / "python"))
sys.path.insert(0, str(ROOT / "bench"))

from train_loop import ferryd, make_batch  # noqa: E402


def make(seed, batch, side, cpu_passes, uint8):
    """make_batch, as uint8 images (the decoded-JPEG case) when asked."""
    x, y = make_batch(seed, batch, side, cpu_passes)
    if uint8:
        x = (x * 255).astype("uint8")
    return x, y


def nbytes(batch, side, uint8):
    return batch * 3 * side * side * (1 if uint8 else 4) + batch * 8


def _timeout(fn, *args, **kw):
    """Calls fn with a 120 s timeout, in this package's keyword (timeout_s)
    or an older one's (timeout): --raw also measures older builds."""
    import inspect

    if "timeout_s" in inspect.signature(fn).parameters:
        return fn(*args, timeout_s=120, **kw)
    return fn(*args, timeout=120, **kw)


def producer(socket, worker, workers, steps, batch, side, cpu_passes, uint8, raw):
    import numpy as np
    import torch

    import ferry

    torch.set_num_threads(1)
    prod = ferry.Client(socket).producer("cpu")
    for i in range(worker, steps, workers):
        x, y = make(i, batch, side, cpu_passes, uint8)
        if raw:
            buf = np.concatenate([x.reshape(-1).view(np.uint8), y.view(np.uint8)])
            _timeout(prod.send, buf)
        else:
            prod.send({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, timeout_s=120)
    if hasattr(prod, "end"):
        prod.end()
    prod.close()


class Synthetic:
    """DataLoader source with the same per-batch work as the producers (an
    IterableDataset once PyTorch is imported; module level, so that it
    pickles)."""

    def __init__(self, steps, batch, side, cpu_passes, uint8):
        self.args = (steps, batch, side, cpu_passes, uint8)

    def __iter__(self):
        import torch

        steps, batch, side, cpu_passes, uint8 = self.args
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        for i in range(w, steps, n):
            x, y = make(i, batch, side, cpu_passes, uint8)
            yield torch.from_numpy(x), torch.from_numpy(y)


def model_for(torch, side):
    nn = torch.nn
    # Large images are pooled down to 32x32 first (cheap), so that the
    # model's cost does not grow with them.
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(32) if side > 32 else nn.Identity(),
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


def train(torch, batches, steps, side, warmup):
    """Steps of SGD over ``batches`` ((x, y) pairs); batches/s after
    ``warmup`` steps."""
    torch.manual_seed(0)
    model = model_for(torch, side)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    n = 0
    for i, (x, y) in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        n = i + 1
        if n >= steps:
            break
    if n <= warmup:
        raise SystemExit(f"cpu_loop.py: only {n} batches arrived")
    return (n - warmup) / (time.perf_counter() - t0)


def run_ferry(torch, args):
    import ferry

    with ferryd("ferry-cpu-", BIN_DIR) as sock:
        size = nbytes(args.batch, args.side, args.uint8) + 4096  # + the record's table
        client = ferry.Client(str(sock))
        client.producer("cpu", partitions=args.producers, slot_size=size, slot_count=4 * args.producers + 8).close()
        ds = _timeout(ferry.iterable_dataset, "cpu", "trainer", socket=str(sock))
        it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0))
        nx = nbytes(args.batch, args.side, args.uint8) - args.batch * 8
        shape = (args.batch, 3, args.side, args.side)
        xtype = torch.uint8 if args.uint8 else torch.float32

        def pairs():
            for r in it:
                if args.raw:  # plain bytes: the trainer must know the layout
                    yield r[:nx].view(xtype).view(shape), r[nx : nx + args.batch * 8].view(torch.int64)
                else:  # a typed record: it says itself
                    yield r["x"], r["y"]

        procs = [
            mp.get_context("spawn").Process(
                target=producer,
                args=(
                    str(sock),
                    w,
                    args.producers,
                    args.steps,
                    args.batch,
                    args.side,
                    args.cpu_passes,
                    args.uint8,
                    args.raw,
                ),
            )
            for w in range(args.producers)
        ]
        for p in procs:
            p.start()
        result = train(torch, pairs(), args.steps, args.side, args.warmup)
        for p in procs:
            p.join(timeout=60)
        return result


def run_dataloader(torch, args):
    loader = torch.utils.data.DataLoader(
        SyntheticDataset(args.steps, args.batch, args.side, args.cpu_passes, args.uint8),
        batch_size=None,
        num_workers=args.producers,
        prefetch_factor=4,
    )
    return train(torch, iter(loader), args.steps, args.side, args.warmup)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--side", type=int, default=32, help="image side (3 x side x side float32)")
    ap.add_argument("--producers", type=int, default=2, help="Ferry producers / DataLoader workers")
    ap.add_argument("--cpu-passes", type=int, default=2, help="augmentation passes per batch (CPU cost)")
    ap.add_argument("--uint8", action="store_true", help="uint8 images (as decoded JPEGs), converted by the trainer")
    ap.add_argument("--raw", action="store_true", help="plain bytes instead of typed records (works with older builds)")
    ap.add_argument("--smoke", action="store_true", help="a few steps: checks it runs, measures nothing")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.warmup = 12, 2
    import torch

    torch.set_num_threads(1)  # the trainer's share of a small machine, both runs
    global SyntheticDataset

    class SyntheticDataset(Synthetic, torch.utils.data.IterableDataset):
        pass

    ferry_bps = run_ferry(torch, args)
    loader_bps = run_dataloader(torch, args)
    print(
        json.dumps(
            {
                "bench": "cpu_loop",
                "case": "ferry_raw_batches_per_s" if args.raw else "ferry_batches_per_s",
                "unit": "batches/s",
                "value": round(ferry_bps, 2),
                "baseline": "dataloader_batches_per_s",
                "baseline_value": round(loader_bps, 2),
                "ratio": round(ferry_bps / loader_bps, 3),
                "config": {k: v for k, v in vars(args).items() if k != "smoke"},
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

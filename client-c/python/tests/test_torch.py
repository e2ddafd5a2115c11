"""PyTorch from the user's side: DataLoader workers, tensors that outlive
their batch, writes into batches, typed records, the end of an epoch,
groups that commit by themselves. Every byte is checked against what
its producer generated."""

import gc
import json
import os
import subprocess
import threading
import time

import pytest

import ferry
from conftest import BIN_DIR

if os.environ.get("FERRY_REQUIRE_TORCH"):
    import numpy as np  # scripts/test.sh installs both: never skip there
    import torch
else:
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")

SHAPE = (8, 3, 64, 64)
NBYTES = 8 * 3 * 64 * 64


def image(i):
    """Batch i's bytes: different in every batch and at every position."""
    return ((torch.arange(NBYTES, dtype=torch.int64) * (2 * i + 1) + i * 7) % 251).to(torch.uint8).reshape(SHAPE)


def produce(socket, stream, n, records=True, end=True, partitions=4, slot_count=16):
    def run():
        client = ferry.Client(socket)
        prod = client.producer(stream, partitions=partitions, slot_size=NBYTES + 4096, slot_count=slot_count)
        for i in range(n):
            if records:
                prod.send({"image": image(i), "id": i, "caption": f"batch {i}"}, timeout_s=60)
            else:
                prod.send(image(i).numpy(), meta=i.to_bytes(4, "little"), timeout_s=60)
        if end:
            prod.end()
        prod.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def status(daemon):
    out = subprocess.run(
        [str(BIN_DIR / "ferry"), "--admin-socket", str(daemon.admin), "status", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2, 4])
def test_dataloader_workers_deliver_every_batch_once_and_intact(daemon, workers):
    n = 240
    sock = str(daemon.socket)
    # The stream exists before the workers join (a group formed later
    # starts at the end by default). Its pool has room for more than the
    # workers hold at once (4 x prefetch 8): DataLoader takes the workers'
    # items in turn, and a worker that has not joined yet (or owns no
    # partition for a moment) holds up the others, whose batches then fill
    # a small pool until the producer waits (the README's DataLoader
    # caveat; a CI run on a loaded machine hit it with 16 slots).
    slots = 64
    ferry.Client(sock).producer("imgs", partitions=4, slot_size=NBYTES + 4096, slot_count=slots).close()
    ds = ferry.iterable_dataset("imgs", "trainers", socket=sock, timeout_s=60)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    it = iter(loader)
    prod = produce(sock, "imgs", n, slot_count=slots)
    seen = []
    addresses = set()
    for rec in it:
        i = rec["id"]
        assert rec["caption"] == f"batch {i}"
        assert rec["image"].shape == SHAPE and rec["image"].dtype == torch.uint8
        assert torch.equal(rec["image"], image(i)), f"batch {i} arrived with wrong bytes"
        assert rec.info.stream == "imgs" and rec.info.partition in range(4)
        addresses.add(rec["image"].data_ptr())
        seen.append(i)
        del rec
    prod.join(30)
    assert sorted(seen) == list(range(n)), (
        f"missing {sorted(set(range(n)) - set(seen))[:10]}, twice {[i for i in set(seen) if seen.count(i) > 1][:10]}"
    )
    if workers == 0:
        # In place: only the pool's slots are ever seen.
        assert len(addresses) <= slots
    # Workers release (and commit) their last batches as they shut down,
    # which may be just after the loop above ended.
    deadline = time.time() + 10
    while True:
        lag = {g["name"]: g["lag"] for s in status(daemon)["streams"] for g in s["groups"]}
        if lag["trainers"] == 0 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert lag["trainers"] == 0, "the dataset commits as it releases"


def test_tensor_kept_after_the_loop_moved_on_keeps_its_bytes(daemon):
    sock = str(daemon.socket)
    client = ferry.Client(sock)
    # (An open producer keeps slots granted ahead: close it.)
    client.producer("keep", slot_size=NBYTES + 4096, slot_count=3).close()
    cons = client.consumer("keep", "g", prefetch=3)
    done = produce(sock, "keep", 30, records=False, end=True, partitions=1, slot_count=3)
    kept = []
    n = 0
    for b in cons.batches(timeout_s=30):
        t = b.tensor(shape=SHAPE)
        i = int.from_bytes(b.meta, "little")
        assert torch.equal(t, image(i))
        if i in (0, 1):
            kept.append((i, t))  # outlives its batch: the loop moves on
        n += 1
        # (A loop variable keeps its item alive while the next is fetched:
        # with 2 of 3 slots kept, the third must be let go.)
        del t
    done.join(30)
    assert n == 30, "holding two tensors is back-pressure, not a stall"
    for i, t in kept:
        assert torch.equal(t, image(i)), f"kept tensor of batch {i} shows other bytes"
    # The last batch's release went onto the ring as the loop ended; ferryd
    # takes it on its next turn (bounded wait: a loaded machine read the
    # status just before).
    deadline = time.time() + 10
    while True:
        st = status(daemon)["streams"][0]
        if st["slots_held"] <= 2 or time.time() > deadline:
            break
        time.sleep(0.05)
    assert st["slots_held"] == 2, "the kept tensors hold their slots"
    del kept, t, b
    gc.collect()
    # Released when the last tensor went away; the consumer sends the
    # releases it queued.
    with pytest.raises(ferry.Timeout):
        cons.next(timeout_s=0.3)
    assert status(daemon)["streams"][0]["slots_held"] == 0


def test_writing_into_a_batch_is_private_and_gone_with_the_next_batch(daemon):
    client = ferry.Client(str(daemon.socket))
    # Two slots: every other batch reuses the pages just written.
    prod = client.producer("w", slot_size=NBYTES, slot_count=2)
    writer = client.consumer("w", "writer", prefetch=1)
    reader = client.consumer("w", "reader", prefetch=1)
    addresses = set()
    for i in range(6):
        prod.send(image(i).numpy(), timeout_s=5)
        b = writer.next(timeout_s=5)
        addresses.add(b.address)
        t = b.tensor(shape=SHAPE)
        assert torch.equal(t, image(i)), f"batch {i}: the writer's old private copy leaked into a new batch"
        t[0] = 0  # an in-place write: no SIGSEGV
        t.div_(2, rounding_mode="floor")  # an in-place normalisation
        assert int(t[0].sum()) == 0
        if i % 2:
            arr = b.numpy()
            arr[-10:] = 1  # NumPy views are writable too, privately
            del arr
        with reader.next(timeout_s=5) as r:
            assert torch.equal(r.tensor(shape=SHAPE), image(i)), "another group sees the producer's bytes"
        del t
        b.release()
    assert len(addresses) == 2, "slots were reused"


def test_typed_records_round_trip_without_copies(daemon):
    client = ferry.Client(str(daemon.socket))
    prod = client.producer("rec", slot_size=1 << 16, slot_count=4)
    cons = client.consumer("rec", "g")
    img = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    arr = np.arange(10, dtype=np.int16)
    bf = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    prod.send(
        {"image": img, "label": 7, "caption": "a cat", "blob": b"\x00\x01", "ok": True, "scale": 0.5, "ids": arr, "bf": bf},
        meta=b"m",
        key=3,
    )
    b = cons.next(timeout_s=5)
    assert b.is_record
    rec = b.record()
    assert list(rec) == ["image", "label", "caption", "blob", "ok", "scale", "ids", "bf"]
    assert rec["image"].dtype == torch.float32 and torch.equal(rec["image"], img)
    assert rec["label"] == 7 and rec["caption"] == "a cat" and rec["blob"] == b"\x00\x01"
    assert rec["ok"] is True and rec["scale"] == 0.5
    assert rec["ids"].dtype == torch.int16 and rec["ids"].tolist() == list(range(10))
    assert rec["bf"].dtype == torch.bfloat16 and rec["bf"].tolist() == [1.5, -2.0]
    assert rec.info == ("rec", b.partition, b.offset, b"m") and rec.meta == b"m"
    # In place: the tensor views the slot.
    assert b.address <= rec["image"].data_ptr() < b.address + len(b)
    with pytest.raises(ValueError, match="bfloat16 has no NumPy dtype"):
        b.record(numpy=True)
    del rec
    b.release()
    prod.send({"image": img.numpy(), "ids": arr})
    with cons.next(timeout_s=5) as b:
        nrec = b.record(numpy=True)
        assert nrec["image"].dtype == np.float32 and (nrec["image"] == img.numpy()).all()
        assert nrec["ids"].tolist() == list(range(10))
        assert b.address <= nrec["image"].__array_interface__["data"][0] < b.address + len(b)
        del nrec
    # Plain batches are not records; bad values are refused before a
    # slot is taken.
    prod.send(b"plain")
    with cons.next(timeout_s=5) as p:
        assert not p.is_record
        with pytest.raises(ValueError, match="not a typed record"):
            p.record()
    for bad, word in [({"x": object()}, "object"), ({}, "at least one"), ({"x": 2**70}, "64-bit"), ({1: 2}, "names")]:
        with pytest.raises((TypeError, ValueError), match=word):
            prod.send(bad)
    with pytest.raises(ferry.FerryError) as e:
        prod.send({"x": torch.zeros(1 << 15, dtype=torch.float32)})
    assert e.value.status == ferry.E_TOO_LARGE
    prod.send({"after": 1})  # the slot kept by the failed send is used
    with cons.next(timeout_s=5) as b:
        assert b.record() == {"after": 1}


def test_end_of_epoch_ends_every_member_and_the_next_epoch_follows(daemon):
    sock = str(daemon.socket)
    client = ferry.Client(sock)
    p1 = client.producer("ep", partitions=2, slot_size=64, slot_count=16)
    p2 = client.producer("ep")
    # Three members for two partitions: one owns none and must end too.
    members = [client.consumer("ep", "g") for _ in range(3)]
    for i in range(6):
        (p1 if i % 2 else p2).send(bytes([i]) * 8)
    p1.end()
    results = [[] for _ in members]

    def drain(k):
        for b in members[k].batches(timeout_s=20):
            results[k].append(b.data[0])

    threads = [threading.Thread(target=drain, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    assert all(t.is_alive() for t in threads), "one producer of two ended: the epoch goes on"
    p2.send(bytes([6]) * 8)
    p2.end()  # both ended: the epoch is over
    for t in threads:
        t.join(10)
        assert not t.is_alive(), "a member did not see the end of the epoch"
    assert sorted(sum(results, [])) == list(range(7))
    # The next epoch: what was sent after the end.
    p1.send(bytes([9]) * 8)
    got = [b.data[0] for m in members for b in m.batches(timeout_s=0.5)]
    assert got == [9]
    with pytest.raises(ferry.Timeout):
        members[0].next(timeout_s=0.1)


def test_group_start_positions(daemon):
    client = ferry.Client(str(daemon.socket))
    prod = client.producer("st", partitions=2, slot_size=16, slot_count=8)
    for i in range(4):
        prod.send(bytes([i]))  # round-robin: 2 per partition
    first = client.consumer("st", "first")  # the first group takes what waited
    assert len(list(first.batches(timeout_s=0.3))) == 4
    late = client.consumer("st", "late")  # the default: from now on
    earliest = client.consumer("st", "all", start="earliest")
    assert list(late.batches(timeout_s=0.2)) == []
    assert len(list(earliest.batches(timeout_s=0.3))) == 4
    offsets = client.consumer("st", "some", start=[1, 2])
    got = sorted((b.partition, b.offset) for b in offsets.batches(timeout_s=0.3))
    assert got == [(0, 1)]
    with pytest.raises(ferry.FerryError) as e:
        client.consumer("st", "bad", start=[0])
    assert e.value.status == ferry.E_INVALID_ARGUMENT and "2 partitions" in str(e.value)
    with pytest.raises(ValueError, match="start"):
        client.consumer("st", "bad", start="oldest")


def test_readme_trainer_snippet_ends_with_the_epoch(daemon):
    """The README's Python trainer, as written: one record into 4
    partitions (three hold only their end marker), a dataset formed after
    the end."""
    client = ferry.Client(str(daemon.socket))
    prod = client.producer("readme", partitions=4, slot_size=8 << 20, slot_count=64)
    prod.send({"image": image(0), "label": torch.tensor([7]), "caption": "..."})
    prod.end()
    ds = ferry.iterable_dataset("readme", "trainers", socket=str(daemon.socket), timeout_s=30)
    t0 = time.monotonic()
    recs = list(torch.utils.data.DataLoader(ds, batch_size=None))
    assert time.monotonic() - t0 < 20, "ended by the epoch, not the timeout"
    assert len(recs) == 1 and torch.equal(recs[0]["image"], image(0))


def test_record_values_are_checked_before_a_slot_is_taken(daemon):
    client = ferry.Client(str(daemon.socket))
    prod = client.producer("vals", slot_size=4096, slot_count=2)
    cons = client.consumer("vals", "g")
    for bad, err, word in [
        ({"a\0b": 1}, ValueError, "without NUL"),
        ({"x" * 64: 1}, ValueError, "1-63 bytes"),
        ({"t": torch.zeros([1] * 9)}, ValueError, "at most 8"),
    ]:
        with pytest.raises(err, match=word):
            prod.send(bad)
    with pytest.raises(TypeError, match="meta must be bytes"):
        prod.send({"x": 1}, meta="text")
    with pytest.raises(TypeError, match="unknown consumer option"):
        ferry.iterable_dataset("vals", "g", bogus=1)
    prod.send({"i": np.int64(5), "f": np.float32(0.5), "b": np.bool_(True)})
    with cons.next(timeout_s=5) as b:
        assert b.record() == {"i": 5, "f": 0.5, "b": True}
    with pytest.raises(ValueError, match="timeout_s"):
        prod.send({"x": 1}, timeout_s=-5)
    # What ferryd granted, not what was asked (ring_capacity caps it).
    assert client.consumer("vals", "big", prefetch=100000).prefetch == 256
    assert client.consumer("vals", "dflt").prefetch == 8


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_dataloader_workers_on_a_disk_stream_and_a_replay_from_disk(tmp_path):
    from conftest import Daemon

    d = Daemon(f'data_dir = "{tmp_path}"')
    try:
        sock = str(d.socket)
        n = 120
        # The stream lives on disk; its pool of 64 slots is a cache over it.
        client = ferry.Client(sock)
        client.producer("dimgs", partitions=4, slot_size=NBYTES + 4096, slot_count=64, durability="disk").close()
        ds = ferry.iterable_dataset("dimgs", "trainers", socket=sock, timeout_s=60)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        it = iter(loader)
        prod = client.producer("dimgs")
        for i in range(n):
            prod.send({"image": image(i), "id": i, "caption": f"batch {i}"}, timeout_s=60)
        prod.flush(timeout=30)
        prod.end()
        seen = []
        for rec in it:
            assert torch.equal(rec["image"], image(rec["id"])), f"batch {rec['id']} arrived with wrong bytes"
            seen.append(rec["id"])
            del rec
        assert sorted(seen) == list(range(n))
        # Another group reads it all again, from disk, the same bytes.
        again = ferry.iterable_dataset("dimgs", "replay", socket=sock, timeout_s=60, start="earliest")
        replayed = []
        for rec in torch.utils.data.DataLoader(again, batch_size=None):
            assert torch.equal(rec["image"], image(rec["id"]))
            replayed.append(rec["id"])
        assert sorted(replayed) == list(range(n))
    finally:
        d.stop()

import ctypes
import os
import subprocess
import sys
import zlib

import pytest

import ferry


def test_version():
    assert ferry.version().count(".") == 2
    assert ferry._lib.ferry_abi_version() == ferry.ABI_VERSION


def test_round_trip_zero_copy(daemon):
    client = ferry.Client(str(daemon.socket))
    prod = client.producer("py", partitions=2, slot_size=4096, slot_count=8)
    cons = client.consumer("py", "g")
    payload = bytes(range(256)) * 4
    prod.send(payload, meta=b"m1", key=7)
    b = cons.next(timeout=5)
    assert bytes(b.data) == payload
    assert (b.stream, b.meta) == ("py", b"m1")
    assert b.data.readonly
    # The memoryview points into the shared pool, not at a Python copy.
    assert isinstance(b.data.obj, ctypes.Array)
    assert ctypes.addressof(b.data.obj) == b.address
    b.release()
    with pytest.raises(ferry.FerryError) as e:
        b.release()
    assert e.value.status == ferry.E_NOT_HELD


def test_numpy_view_is_zero_copy(daemon):
    np = pytest.importorskip("numpy")
    client = ferry.Client(str(daemon.socket))
    prod = client.producer("np", slot_size=3 * 8 * 8, slot_count=4)
    cons = client.consumer("np", "g")
    img = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    slot = prod.reserve(timeout=5)
    np.frombuffer(slot.data, dtype=np.uint8)[:] = img.reshape(-1)
    prod.publish(slot, img.nbytes)
    b = cons.next(timeout=5)
    arr = b.numpy(shape=(3, 8, 8))
    assert arr.__array_interface__["data"][0] == b.address
    assert not arr.flags.writeable
    assert (arr == img).all()
    del arr
    b.release()


def test_iterator_releases_previous_batch(daemon):
    client = ferry.Client(str(daemon.socket))
    prod = client.producer("it", slot_size=64, slot_count=2)
    cons = client.consumer("it", "g", prefetch=2)
    got = []
    # Only 2 slots: without auto-release the producer would block forever.
    for i in range(6):
        prod.send(i.to_bytes(8, "little"), timeout=5)
        if i % 2 == 1:
            for b in cons.batches(timeout=0.5):
                got.append(int.from_bytes(bytes(b.data), "little"))
    assert got == list(range(6))


def test_errors_are_clear(daemon, tmp_path):
    missing = tmp_path / "nope.sock"
    with pytest.raises(ferry.FerryError) as e:
        ferry.Client(str(missing))
    assert e.value.status == ferry.E_NOT_RUNNING
    assert str(missing) in str(e.value)

    client = ferry.Client(str(daemon.socket))
    with pytest.raises(ferry.FerryError) as e:
        client.consumer("absent", "g")
    assert e.value.status == ferry.E_UNKNOWN_STREAM
    prod = client.producer("small", slot_size=16, slot_count=2)
    with pytest.raises(ferry.FerryError) as e:
        prod.send(b"x" * 17)
    assert e.value.status == ferry.E_TOO_LARGE
    # The slot was kept, not leaked: both slots still usable.
    prod.send(b"a" * 16)
    prod.send(b"b" * 16)
    with pytest.raises(ferry.Timeout):
        prod.reserve(timeout=0.1)
    cons = client.consumer("small", "g")
    # A group formed later starts at the earliest batch still held.
    assert bytes(client.consumer("small", "other").next(timeout=5).data) == b"a" * 16
    client.producer("empty", slot_size=8, slot_count=2)
    with pytest.raises(ferry.Timeout):
        client.consumer("empty", "g").next(timeout=0.05)
    assert bytes(cons.next(timeout=5).data) == b"a" * 16
    with pytest.raises(ValueError):
        cons.next(timeout=-1)


def test_gpu_delivery_is_refused_clearly_without_that_gpu(daemon):
    client = ferry.Client(str(daemon.socket))
    client.producer("g", slot_size=16, slot_count=2)
    with pytest.raises(ferry.FerryError) as e:
        client.consumer("g", "trainers", device="cuda:0")
    assert e.value.status in (ferry.E_NO_DEVICE, ferry.E_UNSUPPORTED)
    assert "cuda:0" in str(e.value)
    with pytest.raises(ferry.FerryError) as e:
        client.consumer("g", "trainers", device="gpu0")
    assert e.value.status == ferry.E_INVALID_ARGUMENT
    client.consumer("g", "trainers", device="cpu").close()


def test_consumer_process_killed_mid_batch_is_redelivered(daemon):
    client = ferry.Client(str(daemon.socket))
    prod = client.producer("kill", slot_size=64, slot_count=8)
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); import ferry\n"
        "c = ferry.Client(sys.argv[1]).consumer('kill', 'g')\n"
        "b = c.next(timeout=10); print(b.offset, flush=True); time.sleep(60)\n"
    )
    pkg = os.path.dirname(os.path.dirname(ferry.__file__))
    child = subprocess.Popen([sys.executable, "-c", code, str(daemon.socket), pkg], stdout=subprocess.PIPE, text=True)
    prod.send(b"precious", timeout=5)
    held = int(child.stdout.readline())
    child.kill()
    child.wait()
    cons = client.consumer("kill", "g")
    b = cons.next(timeout=10)
    assert (b.offset, bytes(b.data)) == (held, b"precious")


def test_crc_of_large_batch(daemon):
    client = ferry.Client(str(daemon.socket))
    size = 3 * 224 * 224 * 4
    prod = client.producer("big", slot_size=size, slot_count=4)
    cons = client.consumer("big", "g")
    data = os.urandom(size)
    prod.send(data, meta=zlib.crc32(data).to_bytes(4, "little"))
    b = cons.next(timeout=5)
    assert zlib.crc32(b.data) == int.from_bytes(b.meta, "little")


def test_torch_iterable_dataset(daemon):
    torch = pytest.importorskip("torch")
    client = ferry.Client(str(daemon.socket))
    prod = client.producer("t", slot_size=16, slot_count=4)
    for i in range(3):
        prod.send(bytes([i]) * 16)
    ds = ferry.iterable_dataset("t", "g", socket=str(daemon.socket), timeout=0.5)
    loader = torch.utils.data.DataLoader(ds, batch_size=None)
    seen = [int(t[0]) for t in loader]
    assert seen == [0, 1, 2]

import ctypes
import os
import subprocess
import sys
import time
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
    b = cons.next(timeout_s=5)
    assert bytes(b.data) == payload
    assert (b.stream, b.meta) == ("py", b"m1")
    # Copy-on-write by default: writable, privately.
    assert not b.data.readonly
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
    slot = prod.reserve(timeout_s=5)
    np.frombuffer(slot.data, dtype=np.uint8)[:] = img.reshape(-1)
    prod.publish(slot, img.nbytes)
    b = cons.next(timeout_s=5)
    arr = b.numpy(shape=(3, 8, 8))
    assert arr.__array_interface__["data"][0] == b.address
    assert arr.flags.writeable  # copy-on-write: private writes
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
        prod.send(i.to_bytes(8, "little"), timeout_s=5)
        if i % 2 == 1:
            for b in cons.batches(timeout_s=0.5):
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
        prod.reserve(timeout_s=0.1)
    cons = client.consumer("small", "g")
    # A group formed later asks for the batches still in the pool.
    assert bytes(client.consumer("small", "other", start="earliest").next(timeout_s=5).data) == b"a" * 16
    client.producer("empty", slot_size=8, slot_count=2)
    with pytest.raises(ferry.Timeout):
        client.consumer("empty", "g").next(timeout_s=0.05)
    assert bytes(cons.next(timeout_s=5).data) == b"a" * 16
    with pytest.raises(ValueError):
        cons.next(timeout_s=-1)
    # Numbers ctypes would wrap or that mean nothing are refused by name.
    for kw, word in [
        (dict(partitions=0, slot_size=8), "partitions"),
        (dict(slot_count=-1, slot_size=8), "slot_count"),
        (dict(slot_size=8.5), "slot_size"),
        (dict(partitions=2), "slot_size is needed"),
    ]:
        with pytest.raises(ValueError, match=word):
            client.producer("bad", **kw)
    for kw, word in [(dict(prefetch=-1), "prefetch"), (dict(spin_us=-5), "spin_us")]:
        with pytest.raises(ValueError, match=word):
            client.consumer("small", "g2", **kw)
    with pytest.raises(ValueError, match="partition"):
        cons.seek(2**32, 0)
    with pytest.raises(ValueError, match="offset"):
        cons.seek(0, -1)
    with pytest.raises(ValueError, match="key"):
        prod.send(b"k", key=-1)


FAKE_CUDA = bool(os.environ.get("FERRY_FAKE_CUDA"))


def _real_gpu():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_gpu_delivery_refusals_are_clear(daemon):
    client = ferry.Client(str(daemon.socket))
    client.producer("g", slot_size=16, slot_count=2)
    if not (FAKE_CUDA or _real_gpu()):
        with pytest.raises(ferry.FerryError) as e:
            client.consumer("g", "trainers", device="cuda:0")
        assert e.value.status == ferry.E_NO_DEVICE
        assert "cuda:0" in str(e.value)
        with pytest.raises(ferry.FerryError) as e:
            client.producer("g", device="cuda:0")
        assert e.value.status == ferry.E_NO_DEVICE
    with pytest.raises(ferry.FerryError) as e:
        client.consumer("g", "trainers", device="cuda:77")
    assert e.value.status == ferry.E_NO_DEVICE and "cuda:77" in str(e.value)
    with pytest.raises(ferry.FerryError) as e:
        client.consumer("g", "trainers", device="gpu0")
    assert e.value.status == ferry.E_INVALID_ARGUMENT
    client.consumer("g", "trainers", device="cpu").close()


@pytest.mark.skipif(not (FAKE_CUDA or _real_gpu()), reason="needs a CUDA GPU (or scripts/test.sh's fake driver run)")
def test_gpu_delivery_every_byte(daemon):
    client = ferry.Client(str(daemon.socket))
    size = 1 << 20
    prod = client.producer("gpu", slot_size=size, slot_count=8)
    cons = client.consumer("gpu", "trainers", device="cuda:0", prefetch=4)
    sent = [os.urandom(size - i) for i in range(12)]
    got = []

    def check(b):
        assert b.device == 0 and b.data is None and b.device_data != 0
        iface = b.__cuda_array_interface__
        assert iface["shape"] == (len(b),) and iface["typestr"] == "|u1"
        if FAKE_CUDA:  # the fake's device pointers are host addresses
            got.append(ctypes.string_at(b.device_data, len(b)))
        else:
            import torch

            t = b.tensor()
            assert t.is_cuda and t.data_ptr() == b.device_data
            got.append(bytes(t.cpu().numpy()))

    for i, data in enumerate(sent):
        prod.send(data, meta=i.to_bytes(4, "little"), timeout_s=5)
        if i % 3 == 2:  # several batches (and copies) in flight at a time
            for _ in range(3):
                with cons.next(timeout_s=5) as b:
                    check(b)
    assert got == sent
    with pytest.raises(ferry.Timeout):
        cons.next(timeout_s=0)


@pytest.mark.skipif(not _real_gpu(), reason="needs PyTorch with a CUDA GPU")
def test_torch_cuda_iterable_dataset(daemon):
    import torch

    client = ferry.Client(str(daemon.socket))
    prod = client.producer("tc", slot_size=4 * 256, slot_count=8)
    for i in range(5):
        prod.send(torch.full((256,), float(i)).numpy().tobytes(), timeout_s=5)
    ds = ferry.iterable_dataset("tc", "g", socket=str(daemon.socket), dtype=torch.float32, shape=(16, 16), timeout_s=0.5, device="cuda:0")
    seen = [(t.device.type, t.shape, float(t.sum())) for t in torch.utils.data.DataLoader(ds, batch_size=None)]
    assert seen == [("cuda", torch.Size([16, 16]), 256.0 * i) for i in range(5)]


def test_consumer_process_killed_mid_batch_is_redelivered(daemon):
    client = ferry.Client(str(daemon.socket))
    prod = client.producer("kill", slot_size=64, slot_count=8)
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); import ferry\n"
        "c = ferry.Client(sys.argv[1]).consumer('kill', 'g')\n"
        "b = c.next(timeout_s=10); print(b.offset, flush=True); time.sleep(60)\n"
    )
    pkg = os.path.dirname(os.path.dirname(ferry.__file__))
    child = subprocess.Popen([sys.executable, "-c", code, str(daemon.socket), pkg], stdout=subprocess.PIPE, text=True)
    prod.send(b"precious", timeout_s=5)
    held = int(child.stdout.readline())
    child.kill()
    child.wait()
    cons = client.consumer("kill", "g")
    b = cons.next(timeout_s=10)
    assert (b.offset, bytes(b.data)) == (held, b"precious")


def test_crc_of_large_batch(daemon):
    client = ferry.Client(str(daemon.socket))
    size = 3 * 224 * 224 * 4
    prod = client.producer("big", slot_size=size, slot_count=4)
    cons = client.consumer("big", "g")
    data = os.urandom(size)
    prod.send(data, meta=zlib.crc32(data).to_bytes(4, "little"))
    b = cons.next(timeout_s=5)
    assert zlib.crc32(b.data) == int.from_bytes(b.meta, "little")


def test_torch_iterable_dataset(daemon):
    torch = pytest.importorskip("torch")
    client = ferry.Client(str(daemon.socket))
    prod = client.producer("t", slot_size=16, slot_count=4)
    for i in range(3):
        prod.send(bytes([i]) * 16)
    ds = ferry.iterable_dataset("t", "g", socket=str(daemon.socket), timeout_s=0.5)
    loader = torch.utils.data.DataLoader(ds, batch_size=None)
    seen = [int(t[0]) for t in loader]
    assert seen == [0, 1, 2]


@pytest.mark.skipif(not FAKE_CUDA, reason="uses a stand-in torch; runs with scripts/test.sh's fake driver")
def test_gpu_batches_are_released_after_the_gpu_work_on_them(daemon, monkeypatch):
    """batches() keeps a GPU batch until an event recorded after it was
    used has completed (a stand-in torch records what happens)."""
    import types

    log = []

    class Event:
        def __init__(self):
            self.done = False

        def record(self, stream):
            log.append(("record", stream))

        def query(self):
            return self.done

        def synchronize(self):
            log.append("sync")
            self.done = True

    cuda = types.SimpleNamespace(Event=Event, is_available=lambda: True, current_stream=lambda dev: f"stream{dev}")
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    client = ferry.Client(str(daemon.socket))
    prod = client.producer("defer", slot_size=64, slot_count=8)
    cons = client.consumer("defer", "g", device="cuda:0", prefetch=4)
    for i in range(4):
        prod.send(bytes([i]) * 8)
    it = cons.batches(timeout_s=0.5)
    first = next(it)
    second = next(it)
    # The first batch was retired with an event, not released: its GPU
    # work may still run.
    assert not first.released and log == [("record", "stream0")]
    third = next(it)
    # Only one is kept back: the first is released after its event.
    assert first.released and not second.released and log.count("sync") == 1
    rest = list(it)
    assert len(rest) == 1 and second.released and third.released and rest[0].released
    assert [b.offset for b in (first, second, third, *rest)] == [0, 1, 2, 3]


@pytest.mark.skipif(not (FAKE_CUDA or _real_gpu()), reason="needs a CUDA GPU (or scripts/test.sh's fake driver run)")
def test_gpu_producer_to_host_and_gpu_consumers(daemon):
    client = ferry.Client(str(daemon.socket))
    prod = client.producer("from-gpu", slot_size=4096, slot_count=8, device="cuda:0")
    gpu = client.consumer("from-gpu", "gpu", device="cuda:0")
    host = client.consumer("from-gpu", "host")
    sent = [os.urandom(100 + 37 * i) for i in range(6)]
    for i, data in enumerate(sent):
        if FAKE_CUDA:  # the fake's device pointers are host addresses
            slot = prod.reserve(timeout_s=5)
            assert slot.data is None and slot.device_data != 0
            assert slot.__cuda_array_interface__["shape"] == (4096,)
            ctypes.memmove(slot.device_data, data, len(data))
            prod.publish(slot, len(data), meta=bytes([i]))
        else:
            prod.send(data, meta=bytes([i]), timeout_s=5)
    for i, data in enumerate(sent):
        with host.next(timeout_s=5) as b:
            assert (b.meta, bytes(b.data)) == (bytes([i]), data)
        with gpu.next(timeout_s=5) as b:
            assert b.meta == bytes([i]) and len(b) == len(data)
            if FAKE_CUDA:
                assert ctypes.string_at(b.device_data, len(b)) == data
            else:
                assert bytes(b.tensor().cpu().numpy()) == data
    with pytest.raises(ferry.FerryError) as e:
        client.producer("from-gpu", device="cuda:9")
    assert e.value.status == ferry.E_NO_DEVICE


@pytest.mark.skipif(not _real_gpu(), reason="needs PyTorch with a CUDA GPU (scripts/gpu-tests.sh runs it there)")
def test_cuda_tensor_kept_after_the_loop_moved_on_keeps_its_bytes(daemon):
    """A CUDA tensor of a GPU batch keeps its GPU slot while it lives, as a
    CPU tensor keeps its host slot."""
    import torch

    client = ferry.Client(str(daemon.socket))
    prod = client.producer("cuda-keep", slot_size=4096, slot_count=8)
    cons = client.consumer("cuda-keep", "g", device="cuda:0", prefetch=3)
    for i in range(12):
        prod.send(bytes([i]) * 4096, timeout_s=5)
    kept = None
    seen = []
    for b in cons.batches(timeout_s=1):
        t = b.tensor()
        seen.append(int(t[0]))
        if kept is None:
            kept = t
        del t
    assert seen == list(range(12))
    assert bool((kept == 0).all()), "the kept CUDA tensor shows another batch's bytes"


def test_disk_stream_flush_restart_and_commits(tmp_path):
    from conftest import Daemon

    d = Daemon(f'data_dir = "{tmp_path}"')
    try:
        client = ferry.Client(str(d.socket))
        with pytest.raises(ValueError):
            client.producer("bad", slot_size=64, durability={"fsync": "sometimes"})
        with pytest.raises(ValueError):
            client.producer("bad", slot_size=64, durability={"retention": "loose"})
        with pytest.raises(ValueError):
            client.producer("bad", durability="disk")  # durability creates: slot_size too
        prod = client.producer(
            "dur", slot_size=4096, slot_count=8, durability={"fsync": 20, "retention_bytes": 1 << 30}
        )
        for i in range(30):
            prod.send(bytes([i]) * 1000, meta=str(i).encode())
        prod.flush(timeout=10)
        cons = client.consumer("dur", "g", auto_commit=False)
        for i in range(12):
            b = cons.next(timeout_s=5)
            assert (b.meta, bytes(b.data)) == (str(i).encode(), bytes([i]) * 1000)
            b.release()
        cons.commit()
        time.sleep(0.4)  # past offsets_flush_ms
    finally:
        d.proc.kill()  # as a crash
        d.proc.wait()
    # The same data directory, a new ferryd.
    d2 = Daemon(f'data_dir = "{tmp_path}"')
    try:
        client = ferry.Client(str(d2.socket))
        cons = client.consumer("dur", "g")
        got = []
        while True:
            try:
                b = cons.next(timeout_s=1)
            except ferry.FerryError as e:
                assert e.status == ferry.E_TIMEOUT
                break
            got.append((b.meta, bytes(b.data)))
            b.release()
        assert got == [(str(i).encode(), bytes([i]) * 1000) for i in range(12, 30)]
    finally:
        d2.stop()

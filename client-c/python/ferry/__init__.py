"""Ferry for Python: a thin ctypes layer over libferry's C ABI.

    import ferry

    client = ferry.Client()                      # FERRY_SOCKET or the default
    prod = client.producer("images", partitions=4, slot_size=1 << 20, slot_count=64)
    prod.send(b"...", meta=b"...")

    cons = client.consumer("images", group="trainers")
    for batch in cons:                           # zero-copy, read in place
        arr = batch.numpy()                      # NumPy view, no copy
        ...                                      # released at the next step

A batch's ``data`` is a read-only memoryview straight into ferryd's data
pool. It is valid until the batch is released: by ``batch.release()``, at
the end of a ``with batch:`` block, or (when iterating with the default
``auto_release=True``) when the next batch is requested.
"""

import collections
import ctypes
import ctypes.util
import os
import pathlib
import sys

__all__ = [
    "Batch",
    "Client",
    "Consumer",
    "FerryError",
    "Producer",
    "Slot",
    "iterable_dataset",
    "version",
]

OK = 0
E_TIMEOUT = 1
E_INVALID_ARGUMENT = 2
E_NOT_RUNNING = 3
E_DISCONNECTED = 4
E_UNKNOWN_STREAM = 5
E_STREAM_MISMATCH = 6
E_TOO_LARGE = 7
E_NOT_HELD = 8
E_PERMISSION_DENIED = 9
E_PROTOCOL = 10
E_OFFSET_GONE = 11
E_LIMIT = 12
E_SHUTTING_DOWN = 13
E_INTERNAL = 14
E_NO_DEVICE = 15
E_UNSUPPORTED = 16


class FerryError(Exception):
    """A libferry call failed. ``status`` is the FERRY_E_* code."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class TimeoutError_(FerryError):
    pass


# Exported as ferry.Timeout; subclass of FerryError.
Timeout = TimeoutError_


class _Stream(ctypes.Structure):
    _fields_ = [
        ("partitions", ctypes.c_uint32),
        ("slot_count", ctypes.c_uint32),
        ("slot_size", ctypes.c_uint64),
    ]


class _ConsumerConfig(ctypes.Structure):
    _fields_ = [("prefetch", ctypes.c_uint32), ("spin_us", ctypes.c_uint32), ("device", ctypes.c_char_p)]


class _Slot(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("capacity", ctypes.c_uint64),
        ("slot", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("device_data", ctypes.c_uint64),
    ]


class _Batch(ctypes.Structure):
    _fields_ = [
        ("stream", ctypes.c_char_p),
        ("data", ctypes.c_void_p),
        ("len", ctypes.c_uint64),
        ("meta", ctypes.c_void_p),
        ("meta_len", ctypes.c_uint32),
        ("partition", ctypes.c_uint32),
        ("offset", ctypes.c_uint64),
        ("token", ctypes.c_uint64),
        ("device_data", ctypes.c_uint64),
        ("device", ctypes.c_int32),
        ("_reserved", ctypes.c_uint32),
    ]


def _candidates():
    env = os.environ.get("FERRY_LIB")
    if env:
        yield pathlib.Path(env)
    here = pathlib.Path(__file__).resolve().parent
    yield here / "libferry.so"
    # A checkout: client-c/python/ferry -> repository root.
    for parent in here.parents:
        for profile in ("release", "debug"):
            yield parent / "target" / profile / "libferry.so"
    found = ctypes.util.find_library("ferry")
    if found:
        yield pathlib.Path(found)


def _load():
    tried = []
    for path in _candidates():
        tried.append(str(path))
        if path.exists() or "/" not in str(path):
            try:
                return ctypes.CDLL(str(path))
            except OSError:
                continue
    raise ImportError(
        "libferry.so not found (set FERRY_LIB, or build it with `cargo build -p ferry-client`); tried: "
        + ", ".join(tried)
    )


# Must equal FERRY_ABI_VERSION in ferry.h: the struct layouts below mirror it.
ABI_VERSION = 3

_lib = _load()
_p = ctypes.c_void_p
_i32 = ctypes.c_int32
_found_abi = None
if hasattr(_lib, "ferry_abi_version"):
    _lib.ferry_abi_version.argtypes = []
    _lib.ferry_abi_version.restype = ctypes.c_uint32
    _found_abi = _lib.ferry_abi_version()
if _found_abi != ABI_VERSION:
    raise ImportError(
        f"{_lib._name} has C ABI version {_found_abi}, this package needs {ABI_VERSION}: "
        "rebuild libferry (cargo build -p ferry-client) or point FERRY_LIB at a matching one"
    )
_sigs = {
    "ferry_version": ([], ctypes.c_char_p),
    "ferry_status_str": ([_i32], ctypes.c_char_p),
    "ferry_last_error": ([], ctypes.c_char_p),
    "ferry_client_connect": ([ctypes.c_char_p, ctypes.POINTER(_p)], _i32),
    "ferry_client_free": ([_p], None),
    "ferry_producer_open": ([_p, ctypes.c_char_p, ctypes.POINTER(_Stream), ctypes.POINTER(_p)], _i32),
    "ferry_producer_open_device": (
        [_p, ctypes.c_char_p, ctypes.POINTER(_Stream), ctypes.c_char_p, ctypes.POINTER(_p)],
        _i32,
    ),
    "ferry_producer_reserve": ([_p, ctypes.c_int64, ctypes.POINTER(_Slot)], _i32),
    "ferry_producer_publish": (
        [_p, ctypes.POINTER(_Slot), ctypes.c_uint64, ctypes.c_char_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint64)],
        _i32,
    ),
    "ferry_producer_free": ([_p], None),
    "ferry_consumer_open": (
        [_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_ConsumerConfig), ctypes.POINTER(_p)],
        _i32,
    ),
    "ferry_consumer_next": ([_p, ctypes.c_int64, ctypes.POINTER(_Batch)], _i32),
    "ferry_consumer_release": ([_p, ctypes.POINTER(_Batch)], _i32),
    "ferry_consumer_commit": ([_p], _i32),
    "ferry_consumer_seek": ([_p, ctypes.c_uint32, ctypes.c_uint64], _i32),
    "ferry_consumer_free": ([_p], None),
}
for _name, (_args, _res) in _sigs.items():
    _f = getattr(_lib, _name)
    _f.argtypes = _args
    _f.restype = _res


def version():
    """libferry's version string."""
    return _lib.ferry_version().decode()


def _check(status):
    if status == OK:
        return
    detail = (_lib.ferry_last_error() or b"").decode(errors="replace")
    summary = _lib.ferry_status_str(status).decode()
    msg = detail or summary
    if status == E_TIMEOUT:
        raise Timeout(status, msg)
    raise FerryError(status, msg)


def _ms(timeout):
    """Seconds (None: forever) to the ABI's milliseconds (negative: forever)."""
    if timeout is None:
        return -1
    if timeout < 0:
        raise ValueError("timeout must be >= 0 seconds, or None to wait forever")
    return int(timeout * 1000)


def _view(address, length, readonly):
    if length == 0:
        return memoryview(b"")
    arr = (ctypes.c_ubyte * length).from_address(address)
    mv = memoryview(arr).cast("B")
    return mv.toreadonly() if readonly else mv


class _Handle:
    """Owns one libferry handle; closed by close(), a with-block, or GC."""

    _free = None  # name of the libferry function that frees the handle
    _h = None

    def close(self):
        if self._h:
            getattr(_lib, self._free)(self._h)
            self._h = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


class Client(_Handle):
    """A connection to ferryd. ``socket`` defaults to $FERRY_SOCKET, else
    /run/ferry/ferryd.sock (root) or $XDG_RUNTIME_DIR/ferry/ferryd.sock."""

    _free = "ferry_client_free"

    def __init__(self, socket=None):
        handle = _p()
        path = None if socket is None else os.fsencode(socket)
        _check(_lib.ferry_client_connect(path, ctypes.byref(handle)))
        self._h = handle

    def producer(self, stream, partitions=None, slot_size=None, slot_count=None, device=None):
        """Opens a producer on ``stream``. Giving any of partitions,
        slot_size, slot_count creates the stream when missing (defaults:
        1 partition, 16 slots); an existing stream must match them.
        ``device="cuda:N"``: publish from GPU N's memory (slots are then
        in GPU memory; see ``Slot``)."""
        return Producer(self, stream, partitions, slot_size, slot_count, device)

    def consumer(self, stream, group, prefetch=0, spin_us=50, auto_release=True, device=None):
        """Joins consumer group ``group`` of ``stream``. ``device``: None or
        "cpu" for host memory; "cuda:N" asks for GPU delivery into GPU N
        (as this process numbers them; E_NO_DEVICE without that GPU)."""
        return Consumer(self, stream, group, prefetch, spin_us, auto_release, device)


def _torch_sync(device):
    """Waits for the current CUDA stream's work when PyTorch is in use."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.current_stream(device).synchronize()


class Slot:
    """A reserved slot; fill it, then ``Producer.publish``. Host producers:
    ``data`` is a writable memoryview of ``capacity`` bytes in the data
    pool. GPU producers: ``data`` is None and the slot is GPU memory at
    ``device_data``, exposed (writable) through ``__cuda_array_interface__``
    and ``tensor()``."""

    def __init__(self, raw, device=None):
        self._raw = raw
        self.capacity = raw.capacity
        self.device = device
        self.device_data = raw.device_data
        self.data = None if device is not None else _view(raw.data, raw.capacity, readonly=False)

    @property
    def __cuda_array_interface__(self):
        if self.device is None:
            raise AttributeError("slot is in host memory")
        return {
            "shape": (self.capacity,),
            "typestr": "|u1",
            "data": (self.device_data, False),
            "version": 3,
            "stream": None,
        }

    def tensor(self):
        """A writable uint8 PyTorch tensor over the whole slot, no copy (on
        the GPU for GPU producers)."""
        import torch

        if self.device is None:
            return torch.frombuffer(self.data, dtype=torch.uint8)
        return torch.as_tensor(self, device=f"cuda:{self.device}")


def _uint(name, value, low, high=2**32 - 1):
    """`value` as an integer in [low, high], or a ValueError naming it
    (ctypes would silently wrap a negative number)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return value


class Producer(_Handle):
    _free = "ferry_producer_free"

    def __init__(self, client, stream, partitions, slot_size, slot_count, device=None):
        cfg = None
        if partitions is not None or slot_size is not None or slot_count is not None:
            if slot_size is None:
                raise ValueError(
                    "slot_size is needed to create a stream (to open an existing one, "
                    "give none of partitions, slot_size, slot_count)"
                )
            cfg = _Stream(
                _uint("partitions", 1 if partitions is None else partitions, 1),
                _uint("slot_count", 16 if slot_count is None else slot_count, 1),
                _uint("slot_size", slot_size, 1, 2**64 - 1),
            )
        handle = _p()
        _check(
            _lib.ferry_producer_open_device(
                client._h,
                stream.encode(),
                ctypes.byref(cfg) if cfg is not None else None,
                None if device is None else device.encode(),
                ctypes.byref(handle),
            )
        )
        self._h = handle
        self.stream = stream
        self.device = None if device in (None, "cpu", "") else int(device.split(":", 1)[1])
        self._spare = None

    def reserve(self, timeout=None):
        """Takes a free slot, waiting while all are in use downstream."""
        if self._spare is not None:
            slot, self._spare = self._spare, None
            return slot
        raw = _Slot()
        _check(_lib.ferry_producer_reserve(self._h, _ms(timeout), ctypes.byref(raw)))
        return Slot(raw, self.device)

    def publish(self, slot, length, meta=b"", key=None):
        """Publishes ``length`` bytes of a reserved slot with ``meta`` (at
        most 256 bytes) and an optional integer partitioning ``key``. For a
        GPU slot, the writes into it must have completed: with PyTorch this
        waits for the current CUDA stream first."""
        if slot.device is not None:
            _torch_sync(slot.device)
        meta = bytes(meta)
        length = _uint("length", length, 0, 2**64 - 1)
        k = None if key is None else ctypes.byref(ctypes.c_uint64(_uint("key", key, 0, 2**64 - 1)))
        _check(_lib.ferry_producer_publish(self._h, ctypes.byref(slot._raw), length, meta, len(meta), k))
        try:
            if slot.data is not None:
                slot.data.release()
        except (BufferError, ValueError):
            pass

    def send(self, data, meta=b"", key=None, timeout=None):
        """Copies ``data`` (any buffer) into a slot and publishes it. A GPU
        producer also takes a PyTorch tensor (a CUDA tensor is copied on the
        GPU); it needs PyTorch."""
        if key is not None:
            _uint("key", key, 0, 2**64 - 1)  # before taking a slot
        if self.device is not None:
            return self._send_device(data, meta, key, timeout)
        src = memoryview(data).cast("B")
        slot = self.reserve(timeout)
        if src.nbytes > slot.capacity:
            # Keep the slot reserved for the next call instead of leaking it.
            self._spare = slot
            raise FerryError(E_TOO_LARGE, f"payload of {src.nbytes} bytes does not fit the {slot.capacity}-byte slot")
        slot.data[: src.nbytes] = src
        self.publish(slot, src.nbytes, meta, key)

    def _send_device(self, data, meta, key, timeout):
        import torch

        if isinstance(data, torch.Tensor):
            flat = data.contiguous().reshape(-1).view(torch.uint8)
        else:
            flat = torch.tensor(memoryview(data).cast("B"), dtype=torch.uint8)
        slot = self.reserve(timeout)
        if flat.numel() > slot.capacity:
            self._spare = slot
            raise FerryError(E_TOO_LARGE, f"payload of {flat.numel()} bytes does not fit the {slot.capacity}-byte slot")
        slot.tensor()[: flat.numel()].copy_(flat)
        self.publish(slot, flat.numel(), meta, key)


class Batch:
    """A delivered batch, read in place, valid until it is released.

    Host delivery: ``data`` is a read-only memoryview into the data pool.
    GPU delivery (``device="cuda:N"``): the bytes are in GPU memory at
    ``device_data``, ``data`` is None, and the batch exposes
    ``__cuda_array_interface__`` (so ``torch.as_tensor(batch,
    device="cuda:N")``, CuPy or Numba view it without a copy); ``tensor()``
    does that for PyTorch. ``meta`` is always host bytes."""

    def __init__(self, consumer, raw):
        self._consumer = consumer
        self._raw = raw
        self.stream = raw.stream.decode()
        self.partition = raw.partition
        self.offset = raw.offset
        self.device = None if raw.device < 0 else raw.device
        self.device_data = raw.device_data
        self.address = raw.data or 0
        self.data = None if self.device is not None else _view(raw.data or 0, raw.len, readonly=True)
        self.meta = ctypes.string_at(raw.meta, raw.meta_len) if raw.meta_len else b""
        self.released = False

    def __len__(self):
        return self._raw.len

    @property
    def __cuda_array_interface__(self):
        if self.device is None:
            raise AttributeError("batch was delivered to host memory")
        if self.released:
            raise ValueError("batch was released")
        return {
            "shape": (self._raw.len,),
            "typestr": "|u1",
            # Zero-length batches still get a non-null address.
            "data": (self.device_data, False),
            "version": 3,
            # The copy finished before the batch was delivered: no stream
            # to wait on.
            "stream": None,
        }

    def numpy(self, dtype="uint8", shape=None):
        """A NumPy array over the batch's bytes, without a copy (host
        delivery only)."""
        import numpy as np

        if self.data is None:
            raise ValueError(f"batch is in GPU memory (cuda:{self.device}); use tensor()")
        arr = np.frombuffer(self.data, dtype=dtype)
        return arr.reshape(shape) if shape is not None else arr

    def tensor(self, dtype=None, shape=None):
        """A PyTorch tensor over the batch's bytes, without a copy: on the
        GPU for GPU delivery, on the CPU otherwise. Read-only in spirit:
        ferryd's pool is shared. Valid until the batch is released."""
        import torch

        if self.device is None:
            if len(self) == 0:
                t = torch.empty(0, dtype=torch.uint8)
            else:
                import warnings

                with warnings.catch_warnings():
                    # The pool is mapped read-only; torch warns about
                    # non-writable buffers. Do not write to the tensor.
                    warnings.simplefilter("ignore", UserWarning)
                    t = torch.frombuffer(self.data, dtype=torch.uint8)
        else:
            t = torch.as_tensor(self, device=f"cuda:{self.device}")
        if dtype is not None:
            t = t.view(dtype)
        return t.reshape(shape) if shape is not None else t

    def release(self):
        """Returns the slot to ferryd. A second release raises FerryError
        with status E_NOT_HELD."""
        self._consumer.release(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.released:
            self.release()


class Consumer(_Handle):
    _free = "ferry_consumer_free"

    def __init__(self, client, stream, group, prefetch, spin_us, auto_release, device=None):
        cfg = _ConsumerConfig(
            _uint("prefetch", prefetch, 0),
            _uint("spin_us", spin_us, 0),
            None if device is None else device.encode(),
        )
        handle = _p()
        _check(_lib.ferry_consumer_open(client._h, stream.encode(), group.encode(), ctypes.byref(cfg), ctypes.byref(handle)))
        self._h = handle
        self.stream = stream
        self.group = group
        self.auto_release = auto_release
        self.prefetch = prefetch
        self._last = None

    def next(self, timeout=None):
        """The next batch; raises ferry.Timeout when none came in time."""
        raw = _Batch()
        _check(_lib.ferry_consumer_next(self._h, _ms(timeout), ctypes.byref(raw)))
        return Batch(self, raw)

    def release(self, batch):
        _check(_lib.ferry_consumer_release(self._h, ctypes.byref(batch._raw)))
        batch.released = True
        try:
            if batch.data is not None:
                batch.data.release()
        except (BufferError, ValueError):
            # Still exported (e.g. a NumPy array views it): leave the view;
            # the caller promised not to use it after release.
            pass

    def batches(self, timeout=None):
        """Yields batches until none arrives within ``timeout`` seconds
        (None: forever). With auto_release, each batch is released when
        the next one is requested, and the last one when iteration ends.

        GPU batches are released only once the GPU work queued on them has
        finished: when PyTorch is in use, the release waits for an event
        recorded on the current CUDA stream when the next batch is
        requested, so the training step still running on one batch
        overlaps the hand-over of the next (at most one batch is kept back
        that way, when prefetch allows). Without PyTorch, release GPU
        batches yourself once your GPU work on them is done."""
        deferred = collections.deque()
        keep = 1 if self.prefetch == 0 or self.prefetch >= 3 else 0
        try:
            while True:
                if self.auto_release and self._last is not None and not self._last.released:
                    self._retire(self._last, deferred)
                self._last = None
                self._reap(deferred, keep)
                try:
                    b = self.next(timeout)
                except Timeout:
                    return
                self._last = b
                yield b
        finally:
            if self._h:
                if self.auto_release and self._last is not None and not self._last.released:
                    self._retire(self._last, deferred)
                self._last = None
                self._reap(deferred, 0)

    def _retire(self, batch, deferred):
        torch = sys.modules.get("torch")
        if batch.device is None or torch is None or not torch.cuda.is_available():
            self.release(batch)
            return
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(batch.device))
        deferred.append((batch, ev))

    def _reap(self, deferred, keep):
        while deferred and (len(deferred) > keep or deferred[0][1].query()):
            batch, ev = deferred.popleft()
            ev.synchronize()
            if not batch.released:
                self.release(batch)

    def __iter__(self):
        return self.batches(None)

    def commit(self):
        """Commits this member's partitions up to what it released."""
        _check(_lib.ferry_consumer_commit(self._h))

    def seek(self, partition, offset):
        """Replays ``partition`` from ``offset`` (while retained) or skips to it."""
        _check(
            _lib.ferry_consumer_seek(
                self._h, _uint("partition", partition, 0), _uint("offset", offset, 0, 2**64 - 1)
            )
        )


def iterable_dataset(stream, group, socket=None, dtype=None, shape=None, timeout=None, **consumer_options):
    """A ``torch.utils.data.IterableDataset`` over a Ferry stream.

    Each item is a tensor viewing the batch in place (no copy), valid until
    the next item is requested: a CPU tensor, or with
    ``device="cuda:N"`` a CUDA tensor in that GPU's memory, copied there by
    ferryd before the batch was handed over. Use it with
    ``DataLoader(ds, batch_size=None)`` so that no collation copies it
    (and, for CUDA tensors, ``num_workers=0``: CUDA memory does not cross
    worker processes). With ``num_workers > 0`` every worker joins the
    consumer group, so the stream's partitions are spread over the workers.
    """
    import torch

    class FerryIterableDataset(torch.utils.data.IterableDataset):
        def __iter__(self):
            client = Client(socket)
            cons = client.consumer(stream, group, **consumer_options)
            try:
                for batch in cons.batches(timeout):
                    yield batch.tensor(dtype, shape)
            finally:
                cons.close()
                client.close()

    return FerryIterableDataset()

"""Ferry for Python: a thin ctypes layer over libferry's C ABI.

    import ferry

    client = ferry.Client()                      # FERRY_SOCKET or the default
    prod = client.producer("images", partitions=4, slot_size=1 << 20, slot_count=64)
    prod.send({"image": tensor, "label": 7})     # a typed record
    prod.send(b"...", meta=b"...")               # or plain bytes
    prod.end()                                   # end of the epoch

    cons = client.consumer("images", group="trainers")
    for batch in cons:                           # zero-copy, read in place
        rec = batch.record()                     # {"image": tensor, "label": 7}
        ...                                      # ends at the end of the epoch

Lifetime: a batch's bytes stay valid for as long as anything made from it
is alive -- the Batch object itself, or a tensor, NumPy array or
memoryview viewing it. The slot goes back to ferryd when the batch is
retired (``release()``, the end of a ``with batch:`` block, the iterator
moving on, or the Batch object being garbage collected) *and* no such view
is left. Holding views of many batches is back-pressure (``next`` waits
for one of them to die), never corruption.

Writes: by default a consumer maps the pool copy-on-write, so a batch may
be modified in place (``t[0] = 1``, an in-place normalisation). The writes
stay in this process, cost only the pages they touch, and nobody else sees
them. ``copy_on_write=False`` maps it read-only instead (then a write
crashes the process, as with any read-only mapping).

Time is in seconds in Python (``timeout_s``), in milliseconds in C.
"""

import collections
import ctypes
import numbers
import ctypes.util
import os
import pathlib
import sys
import threading
import time
import warnings
import weakref

__all__ = [
    "Batch",
    "BatchInfo",
    "Client",
    "Consumer",
    "EndOfEpoch",
    "FerryError",
    "Producer",
    "Record",
    "Slot",
    "Timeout",
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
E_END_OF_EPOCH = 17

_CONSUMER_COPY_ON_WRITE = 1
_CONSUMER_MANUAL_COMMIT = 2
_START = {None: 0, "default": 0, "earliest": 1, "latest": 2}
_START_OFFSETS = 3
_BATCH_RECORD = 1

_FIELD_TENSOR, _FIELD_BYTES, _FIELD_STR, _FIELD_INT, _FIELD_FLOAT, _FIELD_BOOL = 1, 2, 3, 4, 5, 6
# FERRY_DTYPE_* code -> (name, item size, NumPy dtype string or None)
_DTYPES = {
    1: ("uint8", 1, "u1"),
    2: ("int8", 1, "i1"),
    3: ("uint16", 2, "u2"),
    4: ("int16", 2, "i2"),
    5: ("uint32", 4, "u4"),
    6: ("int32", 4, "i4"),
    7: ("uint64", 8, "u8"),
    8: ("int64", 8, "i8"),
    9: ("float16", 2, "f2"),
    10: ("bfloat16", 2, None),
    11: ("float32", 4, "f4"),
    12: ("float64", 8, "f8"),
    13: ("bool", 1, "?"),
}
_DTYPE_CODE = {name: code for code, (name, _, _) in _DTYPES.items()}


class FerryError(Exception):
    """A libferry call failed. ``status`` is the FERRY_E_* code."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class Timeout(FerryError):
    """Nothing came in time (``timeout_s``)."""


TimeoutError_ = Timeout  # the name of earlier versions


class EndOfEpoch(FerryError):
    """``Consumer.next``: the group passed the end of the epoch (every
    producer of the stream called ``end()``). Calling ``next`` again goes
    on with the next epoch."""


class _Stream(ctypes.Structure):
    _fields_ = [
        ("partitions", ctypes.c_uint32),
        ("slot_count", ctypes.c_uint32),
        ("slot_size", ctypes.c_uint64),
        ("durability", ctypes.c_uint32),
        ("fsync", ctypes.c_uint32),
        ("fsync_interval_ms", ctypes.c_uint32),
        ("retention_strict", ctypes.c_uint32),
        ("retention_ms", ctypes.c_uint64),
        ("retention_bytes", ctypes.c_uint64),
    ]


class _ConsumerConfig(ctypes.Structure):
    _fields_ = [
        ("prefetch", ctypes.c_uint32),
        ("spin_us", ctypes.c_uint32),
        ("device", ctypes.c_char_p),
        ("flags", ctypes.c_uint32),
        ("commit_interval_ms", ctypes.c_uint32),
        ("start", ctypes.c_uint32),
        ("start_offsets_len", ctypes.c_uint32),
        ("start_offsets", ctypes.POINTER(ctypes.c_uint64)),
    ]


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
        ("flags", ctypes.c_uint32),
    ]


class _RecordWriter(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_void_p),
        ("capacity", ctypes.c_uint64),
        ("used", ctypes.c_uint64),
        ("nfields", ctypes.c_uint32),
        ("added", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class _Field(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("kind", ctypes.c_uint32),
        ("dtype", ctypes.c_uint32),
        ("ndim", ctypes.c_uint32),
        ("big_endian", ctypes.c_uint32),
        ("data", ctypes.c_void_p),
        ("device_data", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("shape", ctypes.c_uint64 * 8),
        ("strides", ctypes.c_uint64 * 8),
        ("int_value", ctypes.c_int64),
        ("float_value", ctypes.c_double),
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


# Must equal FERRY_ABI_VERSION in ferry.h: the struct layouts above mirror it.
ABI_VERSION = 4

_lib = _load()
_p = ctypes.c_void_p
_i32 = ctypes.c_int32
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64
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
_W = ctypes.POINTER(_RecordWriter)
_B = ctypes.POINTER(_Batch)
_sigs = {
    "ferry_version": ([], ctypes.c_char_p),
    "ferry_status_str": ([_i32], ctypes.c_char_p),
    "ferry_last_error": ([], ctypes.c_char_p),
    "ferry_client_connect": ([ctypes.c_char_p, ctypes.POINTER(_p)], _i32),
    "ferry_client_free": ([_p], None),
    "ferry_producer_open_device": (
        [_p, ctypes.c_char_p, ctypes.POINTER(_Stream), ctypes.c_char_p, ctypes.POINTER(_p)],
        _i32,
    ),
    "ferry_producer_reserve": ([_p, ctypes.c_int64, ctypes.POINTER(_Slot)], _i32),
    "ferry_producer_publish": (
        [_p, ctypes.POINTER(_Slot), _u64, ctypes.c_char_p, _u32, ctypes.POINTER(_u64)],
        _i32,
    ),
    "ferry_producer_end": ([_p], _i32),
    "ferry_producer_flush": ([_p, ctypes.c_int64], _i32),
    "ferry_producer_free": ([_p], None),
    "ferry_record_begin": ([_p, ctypes.POINTER(_Slot), _u32, _W], _i32),
    "ferry_record_add_tensor": (
        [_W, ctypes.c_char_p, _u32, _u32, ctypes.POINTER(_u64), ctypes.POINTER(_u64), _u32, ctypes.POINTER(_p)],
        _i32,
    ),
    "ferry_record_add_bytes": ([_W, ctypes.c_char_p, _u32, ctypes.c_char_p, _u64], _i32),
    "ferry_record_add_int": ([_W, ctypes.c_char_p, ctypes.c_int64], _i32),
    "ferry_record_add_float": ([_W, ctypes.c_char_p, ctypes.c_double], _i32),
    "ferry_record_add_bool": ([_W, ctypes.c_char_p, _i32], _i32),
    "ferry_producer_publish_record": ([_p, _W, ctypes.c_char_p, _u32, ctypes.POINTER(_u64)], _i32),
    "ferry_consumer_open": (
        [_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_ConsumerConfig), ctypes.POINTER(_p)],
        _i32,
    ),
    "ferry_consumer_next": ([_p, ctypes.c_int64, _B], _i32),
    "ferry_consumer_release": ([_p, _B], _i32),
    "ferry_consumer_commit": ([_p], _i32),
    "ferry_consumer_seek": ([_p, _u32, _u64], _i32),
    "ferry_consumer_free": ([_p], None),
    "ferry_consumer_prefetch": ([_p], _u32),
    "ferry_batch_field_count": ([_p, _B, ctypes.POINTER(_u32)], _i32),
    "ferry_batch_field": ([_p, _B, _u32, ctypes.POINTER(_Field)], _i32),
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
    if status == E_END_OF_EPOCH:
        raise EndOfEpoch(status, msg)
    raise FerryError(status, msg)


def _ms(timeout_s):
    """Seconds (None: forever) to the ABI's milliseconds (negative: forever)."""
    if timeout_s is None:
        return -1
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s < 0:
        raise ValueError(f"timeout_s must be a number of seconds >= 0, or None to wait forever, not {timeout_s!r}")
    return int(timeout_s * 1000)


def _is_np_bool(value):
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.bool_)


def _meta(meta):
    if isinstance(meta, str):
        raise TypeError("meta must be bytes (at most 256), not str: encode it, e.g. meta.encode()")
    return bytes(meta)


def _uint(name, value, low, high=2**32 - 1):
    """`value` as an integer in [low, high], or a ValueError naming it
    (ctypes would silently wrap a negative number)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return value


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
        self.socket = socket

    def producer(self, stream, partitions=None, slot_size=None, slot_count=None, device=None, durability=None):
        """Opens a producer on ``stream``. Giving any of partitions,
        slot_size, slot_count creates the stream when missing (defaults:
        1 partition, 16 slots); an existing stream must match them.
        ``device="cuda:N"``: publish from GPU N's memory (slots are then
        in GPU memory; see ``Slot``).

        ``durability`` (with slot_size): None or "memory", "disk", or a
        dict ``{"fsync": "every" | "never" | <interval ms>, "retention_ms":
        ..., "retention_bytes": ..., "retention": "keep" | "strict"}`` for a
        disk stream with those settings. ``flush()`` waits until what was
        sent is as durable as the stream promises."""
        return Producer(self, stream, partitions, slot_size, slot_count, device, durability)

    def consumer(
        self,
        stream,
        group,
        prefetch=0,
        spin_us=50,
        device=None,
        copy_on_write=True,
        auto_commit=True,
        commit_interval_s=0.0,
        start=None,
    ):
        """Joins consumer group ``group`` of ``stream``.

        - ``prefetch``: most batches delivered and not yet released (0:
          ferryd's default, 8). Batches kept alive by tensors count.
        - ``device``: None or "cpu" for host memory; "cuda:N" asks for GPU
          delivery into GPU N (as this process numbers them; E_NO_DEVICE
          without that GPU).
        - ``copy_on_write``: map the pool copy-on-write (batches may be
          written in place, privately); False: read-only.
        - ``auto_commit``: commit as batches are released (every release
          with ``commit_interval_s=0``, else at most that often, and when
          the consumer closes); False: call ``commit()`` yourself.
        - ``start`` (only when this join creates the group): None (the
          default: batches published from now on, plus those published
          while the stream had no group at all), "earliest" (the oldest
          batch still in the pool), "latest" (from now on only), or a list
          of one offset per partition.
        """
        return Consumer(self, stream, group, prefetch, spin_us, device, copy_on_write, auto_commit, commit_interval_s, start)


def _torch_sync(device):
    """Waits for the current CUDA stream's work when PyTorch is in use."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.current_stream(device).synchronize()


def _view(address, length, readonly):
    if length == 0:
        return memoryview(b"")
    arr = (ctypes.c_ubyte * length).from_address(address)
    mv = memoryview(arr).cast("B")
    return mv.toreadonly() if readonly else mv


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


def _flat_bytes(value):
    """A value for a tensor field: (dtype code, shape, a function copying
    its elements into a writable memoryview)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        name = str(value.dtype).replace("torch.", "")
        if name not in _DTYPE_CODE:
            raise TypeError(f"tensor dtype {value.dtype} has no Ferry record dtype")
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        shape = tuple(t.shape)

        def copy(dst):
            if t.numel():
                torch.frombuffer(dst, dtype=torch.uint8).copy_(t.reshape(-1).view(torch.uint8))

        return _DTYPE_CODE[name], shape, copy
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray):
        kind = {"u1": 1, "i1": 2, "u2": 3, "i2": 4, "u4": 5, "i4": 6, "u8": 7, "i8": 8, "f2": 9, "f4": 11, "f8": 12, "b1": 13}
        key = value.dtype.kind + str(value.dtype.itemsize)
        if key not in kind:
            raise TypeError(f"array dtype {value.dtype} has no Ferry record dtype")
        a = np.ascontiguousarray(value)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))

        def copy(dst):
            if a.size:
                np.frombuffer(dst, dtype=np.uint8)[:] = a.reshape(-1).view(np.uint8)

        return kind[key], a.shape, copy
    return None


def _durability_into(cfg, d):
    if d is None or d == "memory":
        return
    if d == "disk":
        d = {}
    if not isinstance(d, dict):
        raise ValueError(f'durability must be None, "memory", "disk" or a dict, not {d!r}')
    unknown = set(d) - {"fsync", "retention_ms", "retention_bytes", "retention"}
    if unknown:
        raise ValueError(f"unknown durability settings: {sorted(unknown)}")
    cfg.durability = 1
    fsync = d.get("fsync", "every")
    if fsync == "every":
        cfg.fsync = 0
    elif fsync == "never":
        cfg.fsync = 2
    elif isinstance(fsync, int) and not isinstance(fsync, bool) and 1 <= fsync <= 60000:
        cfg.fsync, cfg.fsync_interval_ms = 1, fsync
    else:
        raise ValueError(f'fsync must be "every", "never" or an interval of 1..60000 ms, not {fsync!r}')
    cfg.retention_ms = _uint("retention_ms", d.get("retention_ms", 0), 0, 2**64 - 1)
    cfg.retention_bytes = _uint("retention_bytes", d.get("retention_bytes", 0), 0, 2**64 - 1)
    r = d.get("retention", "keep")
    if r not in ("keep", "strict"):
        raise ValueError(f'retention must be "keep" or "strict", not {r!r}')
    cfg.retention_strict = 1 if r == "strict" else 0


class Producer(_Handle):
    _free = "ferry_producer_free"

    def __init__(self, client, stream, partitions, slot_size, slot_count, device=None, durability=None):
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
            _durability_into(cfg, durability)
        elif durability is not None:
            raise ValueError("durability is set when creating a stream: give slot_size too")
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

    def reserve(self, timeout_s=None):
        """Takes a free slot, waiting (``timeout_s`` seconds; None:
        forever) while all are in use downstream."""
        ms = _ms(timeout_s)
        if self._spare is not None:
            slot, self._spare = self._spare, None
            return slot
        raw = _Slot()
        _check(_lib.ferry_producer_reserve(self._h, ms, ctypes.byref(raw)))
        return Slot(raw, self.device)

    def publish(self, slot, length, meta=b"", key=None):
        """Publishes ``length`` bytes of a reserved slot with ``meta`` (at
        most 256 bytes) and an optional integer partitioning ``key``. For a
        GPU slot, the writes into it must have completed: with PyTorch this
        waits for the current CUDA stream first."""
        if slot.device is not None:
            _torch_sync(slot.device)
        meta = _meta(meta)
        length = _uint("length", length, 0, 2**64 - 1)
        k = None if key is None else ctypes.byref(ctypes.c_uint64(_uint("key", key, 0, 2**64 - 1)))
        _check(_lib.ferry_producer_publish(self._h, ctypes.byref(slot._raw), length, meta, len(meta), k))
        self._done_with(slot)

    @staticmethod
    def _done_with(slot):
        try:
            if slot.data is not None:
                slot.data.release()
        except (BufferError, ValueError):
            pass

    def send(self, data, meta=b"", key=None, timeout_s=None):
        """Publishes ``data``, copied into a slot once. ``data`` is a
        buffer (bytes, bytearray, memoryview, a NumPy array), or a dict
        (a typed record): each value a tensor or NumPy array (dtype and
        shape travel with it), bytes, str, int, float or bool. A GPU
        producer also takes a PyTorch tensor (copied on the GPU)."""
        if key is not None:
            _uint("key", key, 0, 2**64 - 1)  # before taking a slot
        if isinstance(data, dict):
            return self._send_record(data, meta, key, timeout_s)
        if self.device is not None:
            return self._send_device(data, meta, key, timeout_s)
        src = memoryview(data).cast("B")
        slot = self.reserve(timeout_s)
        if src.nbytes > slot.capacity:
            # Keep the slot reserved for the next call instead of leaking it.
            self._spare = slot
            raise FerryError(E_TOO_LARGE, f"payload of {src.nbytes} bytes does not fit the {slot.capacity}-byte slot")
        slot.data[: src.nbytes] = src
        self.publish(slot, src.nbytes, meta, key)

    def _send_record(self, fields, meta, key, timeout_s):
        if self.device is not None:
            raise FerryError(E_UNSUPPORTED, "typed records are written from host memory: open the producer for the CPU")
        if not fields:
            raise ValueError("a record needs at least one field")
        # Check every value before taking a slot.
        plan = []
        for name, value in fields.items():
            if not isinstance(name, str):
                raise TypeError(f"field names are str, not {name!r}")
            if "\0" in name or not 1 <= len(name.encode()) <= 63:
                raise ValueError(f"field name {name!r} must be 1-63 bytes of UTF-8 without NUL")
            tensor = _flat_bytes(value)
            if tensor is not None:
                if len(tensor[1]) > 8:
                    raise ValueError(f"field {name!r}: {len(tensor[1])} dimensions, a record's tensors have at most 8")
                plan.append((name, "tensor", tensor))
            elif isinstance(value, bool) or _is_np_bool(value):
                plan.append((name, "bool", bool(value)))
            elif isinstance(value, numbers.Integral):
                value = int(value)
                if not -(2**63) <= value < 2**63:
                    raise ValueError(f"field {name!r}: {value} does not fit a signed 64-bit integer")
                plan.append((name, "int", value))
            elif isinstance(value, numbers.Real):
                plan.append((name, "float", float(value)))
            elif isinstance(value, str):
                plan.append((name, "str", value.encode()))
            elif isinstance(value, (bytes, bytearray, memoryview)):
                plan.append((name, "bytes", bytes(value)))
            else:
                raise TypeError(
                    f"field {name!r}: {type(value).__name__} is not a tensor, array, bytes, str, int, float or bool"
                )
        meta = _meta(meta)
        slot = self.reserve(timeout_s)
        try:
            w = _RecordWriter()
            _check(_lib.ferry_record_begin(self._h, ctypes.byref(slot._raw), len(plan), ctypes.byref(w)))
            for name, kind, value in plan:
                n = name.encode()
                if kind == "tensor":
                    code, shape, copy = value
                    dims = (ctypes.c_uint64 * max(len(shape), 1))(*shape)
                    where = _p()
                    _check(_lib.ferry_record_add_tensor(ctypes.byref(w), n, code, len(shape), dims, None, 0, ctypes.byref(where)))
                    size = _DTYPES[code][1]
                    for d in shape:
                        size *= d
                    off = (where.value or 0) - (slot._raw.data or 0)
                    copy(slot.data[off : off + size])
                elif kind == "int":
                    _check(_lib.ferry_record_add_int(ctypes.byref(w), n, value))
                elif kind == "float":
                    _check(_lib.ferry_record_add_float(ctypes.byref(w), n, value))
                elif kind == "bool":
                    _check(_lib.ferry_record_add_bool(ctypes.byref(w), n, int(value)))
                else:
                    code = _FIELD_STR if kind == "str" else _FIELD_BYTES
                    _check(_lib.ferry_record_add_bytes(ctypes.byref(w), n, code, value, len(value)))
            k = None if key is None else ctypes.byref(ctypes.c_uint64(key))
            _check(_lib.ferry_producer_publish_record(self._h, ctypes.byref(w), meta, len(meta), k))
        except BaseException:
            self._spare = slot  # still reserved: the next send uses it
            raise
        self._done_with(slot)

    def _send_device(self, data, meta, key, timeout_s):
        import torch

        if isinstance(data, torch.Tensor):
            flat = data.contiguous().reshape(-1).view(torch.uint8)
        else:
            flat = torch.tensor(memoryview(data).cast("B"), dtype=torch.uint8)
        slot = self.reserve(timeout_s)
        if flat.numel() > slot.capacity:
            self._spare = slot
            raise FerryError(E_TOO_LARGE, f"payload of {flat.numel()} bytes does not fit the {slot.capacity}-byte slot")
        slot.tensor()[: flat.numel()].copy_(flat)
        self.publish(slot, flat.numel(), meta, key)

    def end(self):
        """Ends the epoch for this producer. Once every producer attached
        to the stream has called it (or left), consumers that have read
        everything before it see the end: their iterators stop, and
        ``next`` raises ``EndOfEpoch``. Batches sent afterwards belong to
        the next epoch."""
        _check(_lib.ferry_producer_end(self._h))

    def flush(self, timeout=None):
        """Waits (up to ``timeout`` seconds; None: forever) until every
        batch this producer sent is acknowledged: for a disk stream, as
        durable as its ``fsync`` policy promises; for a memory stream,
        taken by ferryd; and until every ``end()`` was taken where the
        epoch is decided (by ferryd, or by the stream's home when this
        producer is on another host). Raises ``FerryError`` (E_TIMEOUT) when not."""
        ms = -1 if timeout is None else int(timeout * 1000)
        _check(_lib.ferry_producer_flush(self._h, ms))


class BatchInfo(tuple):
    """Where a batch came from: (stream, partition, offset, meta)."""

    __slots__ = ()

    def __new__(cls, stream, partition, offset, meta):
        return super().__new__(cls, (stream, partition, offset, meta))

    stream = property(lambda self: self[0])
    partition = property(lambda self: self[1])
    offset = property(lambda self: self[2])
    meta = property(lambda self: self[3])

    def __reduce__(self):
        return (BatchInfo, tuple(self))


class Record(dict):
    """A typed record: field name -> tensor (or NumPy array), bytes, str,
    int, float or bool. ``info`` says where it came from (a BatchInfo:
    stream, partition, offset, meta)."""

    def __init__(self, fields, info=None):
        super().__init__(fields)
        self.info = info

    @property
    def meta(self):
        return self.info.meta if self.info else b""

    def __reduce__(self):
        return (Record, (dict(self), self.info))


class _Hold:
    """A delivered batch's claim on its slot: released once retired and
    no view of it is alive."""

    __slots__ = ("cons", "raw", "views", "retired", "done", "released", "device")

    def __init__(self, cons, raw, device):
        self.cons = cons
        self.raw = raw
        self.views = 0
        self.retired = False
        self.done = False
        self.released = False
        self.device = device

    def view_died(self):
        with self.cons._lock:
            self.views -= 1
            ready = self._ready()
        if ready:
            self.cons._release_soon(self)

    def retire(self):
        with self.cons._lock:
            self.retired = True
            ready = self._ready()
        if ready:
            self.cons._release_soon(self)

    def _ready(self):
        if self.retired and self.views == 0 and not self.done:
            self.done = True
            return True
        return False


def _root(hold, address, length):
    """A ctypes array over [address, address + length) that counts as one
    live view of `hold`: when it is garbage collected (every tensor, array
    and memoryview made from it gone), the view is over."""
    arr = (ctypes.c_ubyte * max(length, 1)).from_address(address)
    with hold.cons._lock:
        hold.views += 1
    fin = weakref.finalize(arr, hold.view_died)
    fin.atexit = False
    return arr


def _np_dtype(code, big_endian):
    name, _, np_name = _DTYPES[code]
    if np_name is None:
        raise ValueError(f"{name} has no NumPy dtype: read this field with PyTorch (record())")
    if np_name in ("u1", "i1", "?"):
        return np_name
    return (">" if big_endian else "<") + np_name


def _field_values(fields, base_torch=None, base_np=None):
    """Builds the values of a record's fields as views of one base: a
    uint8 tensor (PyTorch) or uint8 array (NumPy) over the payload."""
    out = {}
    for f in fields:
        name, kind = f["name"], f["kind"]
        off, n = f["offset"], f["len"]
        if kind == _FIELD_TENSOR:
            code, shape, strides = f["dtype"], f["shape"], f["strides"]
            size = _DTYPES[code][1]
            if base_torch is not None:
                import torch

                if f["big_endian"]:
                    import numpy as np

                    arr = np.ndarray(shape, _np_dtype(code, True), base_torch.numpy(), off, [s * size for s in strides])
                    out[name] = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("=")))
                    continue
                dt = getattr(torch, _DTYPES[code][0])
                if n == 0:
                    out[name] = torch.empty(shape, dtype=dt)
                    continue
                out[name] = base_torch[off : off + n].view(dt).as_strided(shape, strides)
            else:
                import numpy as np

                out[name] = np.ndarray(shape, _np_dtype(code, f["big_endian"]), base_np, off, [s * size for s in strides])
        elif kind in (_FIELD_INT, _FIELD_FLOAT, _FIELD_BOOL):
            out[name] = f["value"]
        else:
            raw = bytes(base_torch[off : off + n].cpu().numpy()) if base_torch is not None else base_np[off : off + n].tobytes()
            out[name] = raw.decode() if kind == _FIELD_STR else raw
    return out


class Batch:
    """A delivered batch, read in place.

    Host delivery: ``data`` is a memoryview into the data pool (writable
    when the consumer maps it copy-on-write, the default). GPU delivery
    (``device="cuda:N"``): the bytes are in GPU memory at ``device_data``,
    ``data`` is None, and ``tensor()`` views them (also
    ``__cuda_array_interface__``, valid until the batch is retired).
    ``meta`` is always host bytes.

    The bytes stay valid while this object, or any tensor, array or
    memoryview made from it, is alive (see the module's documentation)."""

    def __init__(self, consumer, raw):
        self._raw = raw
        self.stream = raw.stream.decode()
        self.partition = raw.partition
        self.offset = raw.offset
        self.device = None if raw.device < 0 else raw.device
        self.device_data = raw.device_data
        self.address = raw.data or 0
        self.meta = ctypes.string_at(raw.meta, raw.meta_len) if raw.meta_len else b""
        self.is_record = bool(raw.flags & _BATCH_RECORD)
        self._hold = _Hold(consumer, raw, self.device)
        self._cons = consumer
        self._data = None
        self._fields = None

    def __len__(self):
        return self._raw.len

    @property
    def info(self):
        return BatchInfo(self.stream, self.partition, self.offset, self.meta)

    @property
    def released(self):
        """Whether the slot went back to ferryd."""
        return self._hold.released

    def _live(self):
        if self._hold.retired:
            raise ValueError("batch was released")

    def _root(self):
        self._live()
        return _root(self._hold, self._raw.data or 0, self._raw.len)

    @property
    def data(self):
        if self.device is not None:
            return None
        if self._data is None:
            self._live()
            if self._raw.len == 0:
                self._data = memoryview(b"")
            else:
                mv = memoryview(self._root()).cast("B")
                self._data = mv if self._cons.copy_on_write else mv.toreadonly()
        return self._data

    @property
    def __cuda_array_interface__(self):
        if self.device is None:
            raise AttributeError("batch was delivered to host memory")
        self._live()
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
        delivery only). Keeps the batch alive."""
        import numpy as np

        if self.device is not None:
            raise ValueError(f"batch is in GPU memory (cuda:{self.device}); use tensor()")
        if self._raw.len == 0:
            arr = np.empty(0, dtype=dtype)
        else:
            arr = np.frombuffer(self._view_buffer(), dtype=dtype)
        return arr.reshape(shape) if shape is not None else arr

    def _view_buffer(self):
        mv = memoryview(self._root()).cast("B")[: self._raw.len]
        return mv if self._cons.copy_on_write else mv.toreadonly()

    def _u8_tensor(self):
        import torch

        if self.device is not None:
            return torch.as_tensor(_CudaView(self), device=f"cuda:{self.device}")
        if self._raw.len == 0:
            return torch.empty(0, dtype=torch.uint8)
        buf = self._view_buffer()
        if buf.readonly:
            with warnings.catch_warnings():
                # Read-only mapping (copy_on_write=False): do not write.
                warnings.simplefilter("ignore", UserWarning)
                return torch.frombuffer(buf, dtype=torch.uint8)
        return torch.frombuffer(buf, dtype=torch.uint8)

    def tensor(self, dtype=None, shape=None):
        """A PyTorch tensor over the batch's bytes, without a copy: on the
        GPU for GPU delivery, on the CPU otherwise. Keeps the batch alive.
        For typed records, ``record()`` gives the fields as tensors."""
        t = self._u8_tensor()
        if dtype is not None:
            t = t.view(dtype)
        return t.reshape(shape) if shape is not None else t

    def _field_table(self):
        if self._fields is None:
            if not self.is_record:
                raise ValueError("this batch is plain bytes, not a typed record (tensor() and numpy() view it)")
            c = self._cons
            count = ctypes.c_uint32()
            with c._in_call:
                _check(_lib.ferry_batch_field_count(c._h, ctypes.byref(self._raw), ctypes.byref(count)))
                fields = []
                for i in range(count.value):
                    f = _Field()
                    _check(_lib.ferry_batch_field(c._h, ctypes.byref(self._raw), i, ctypes.byref(f)))
                    nd = f.ndim
                    fields.append(
                        {
                            "name": f.name.decode(),
                            "kind": f.kind,
                            "dtype": f.dtype,
                            "big_endian": bool(f.big_endian),
                            "offset": f.offset,
                            "len": f.len,
                            "shape": tuple(f.shape[:nd]),
                            "strides": tuple(f.strides[:nd]),
                            "value": f.float_value
                            if f.kind == _FIELD_FLOAT
                            else bool(f.int_value)
                            if f.kind == _FIELD_BOOL
                            else f.int_value,
                        }
                    )
            self._fields = fields
        return self._fields

    def record(self, numpy=False):
        """The typed record's fields (a ``Record``): tensors viewing the
        slot (on the GPU for GPU delivery; NumPy arrays with
        ``numpy=True``), no dtype or shape to pass; bytes, str and numbers
        as Python values. The tensors keep the batch alive."""
        self._live()
        fields = self._field_table()
        if numpy:
            if self.device is not None:
                raise ValueError(f"batch is in GPU memory (cuda:{self.device}); use record()")
            import numpy as np

            base = np.frombuffer(self._view_buffer(), dtype=np.uint8) if self._raw.len else np.empty(0, np.uint8)
            return Record(_field_values(fields, base_np=base), self.info)
        return Record(_field_values(fields, base_torch=self._u8_tensor()), self.info)

    def release(self):
        """Retires the batch: its slot goes back to ferryd now, or once the
        last tensor, array or memoryview made from it is gone. Retiring
        twice raises FerryError with status E_NOT_HELD."""
        if self._hold.retired:
            raise FerryError(E_NOT_HELD, "batch was already released")
        self._retire()

    def _retire(self):
        if self._hold.retired:
            return
        data, self._data = self._data, None
        if data is not None:
            try:
                data.release()
            except (BufferError, ValueError):
                pass  # viewed by an array: that view keeps the batch
        del data
        self._hold.retire()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._retire()

    def __del__(self):
        try:
            self._retire()
        except Exception:
            pass


class _CudaView:
    """One live view of a GPU batch (``torch.as_tensor`` keeps it alive
    as long as the tensor)."""

    def __init__(self, batch):
        batch._live()
        self.__cuda_array_interface__ = batch.__cuda_array_interface__
        hold = batch._hold
        with hold.cons._lock:
            hold.views += 1
        fin = weakref.finalize(self, hold.view_died)
        fin.atexit = False


_SLICE_S = 0.2  # next() checks releases from other threads this often


class Consumer(_Handle):
    _free = "ferry_consumer_free"

    def __init__(self, client, stream, group, prefetch, spin_us, device, copy_on_write, auto_commit, commit_interval_s, start):
        flags = (_CONSUMER_COPY_ON_WRITE if copy_on_write else 0) | (0 if auto_commit else _CONSUMER_MANUAL_COMMIT)
        if isinstance(commit_interval_s, bool) or not isinstance(commit_interval_s, (int, float)) or commit_interval_s < 0:
            raise ValueError(f"commit_interval_s must be a number of seconds >= 0, not {commit_interval_s!r}")
        offsets = None
        if isinstance(start, (list, tuple)):
            offsets = (ctypes.c_uint64 * len(start))(*[_uint("start offset", o, 0, 2**64 - 1) for o in start])
            start_code = _START_OFFSETS
        elif start in _START:
            start_code = _START[start]
        else:
            raise ValueError(f'start must be None, "earliest", "latest" or a list of offsets, not {start!r}')
        cfg = _ConsumerConfig(
            _uint("prefetch", prefetch, 0),
            _uint("spin_us", spin_us, 0),
            None if device is None else device.encode(),
            flags,
            _uint("commit_interval_s in ms", int(commit_interval_s * 1000), 0),
            start_code,
            len(start) if offsets is not None else 0,
            offsets,
        )
        handle = _p()
        _check(_lib.ferry_consumer_open(client._h, stream.encode(), group.encode(), ctypes.byref(cfg), ctypes.byref(handle)))
        self._h = handle
        self.stream = stream
        self.group = group
        # What ferryd granted (it caps the ask at its ring_capacity).
        self.prefetch = _lib.ferry_consumer_prefetch(handle)
        self.copy_on_write = bool(copy_on_write) and device in (None, "cpu", "")
        self._lock = threading.Lock()  # bookkeeping only, never held across a wait
        self._in_call = threading.Lock()  # held while a libferry call runs
        self._queued = collections.deque()  # holds to release, from other threads
        self._holds = 0  # delivered and not yet released
        self._deferred = collections.deque()  # (hold, CUDA event) of GPU batches
        self._closing = False
        self._warned = False

    # -- releases -------------------------------------------------------
    def _release_soon(self, hold):
        """Releases `hold` now when no other libferry call on this consumer
        runs, else queues it for the running (or next) call."""
        if hold.device is not None:
            torch = sys.modules.get("torch")
            if torch is not None and getattr(torch, "cuda", None) is not None and torch.cuda.is_available():
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(hold.device))
                self._deferred.append((hold, ev))
                return
        self._queued.append(hold)
        if self._in_call.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._in_call.release()
            self._maybe_free()

    def _drain(self):
        """Releases queued holds; the caller holds _in_call."""
        while self._queued:
            hold = self._queued.popleft()
            if not self._h or hold.released:
                continue
            status = _lib.ferry_consumer_release(self._h, ctypes.byref(hold.raw))
            hold.released = True
            with self._lock:
                self._holds -= 1
            if status not in (OK, E_NOT_HELD, E_DISCONNECTED):
                _check(status)

    def _reap(self, keep):
        """Releases GPU batches whose CUDA event completed (and the oldest
        beyond `keep` after waiting for theirs)."""
        while self._deferred and (len(self._deferred) > keep or self._deferred[0][1].query()):
            hold, ev = self._deferred.popleft()
            ev.synchronize()
            self._queued.append(hold)

    def _maybe_free(self):
        if self._closing and self._holds == 0 and not self._deferred and self._h:
            with self._in_call:
                if self._h:
                    _lib.ferry_consumer_free(self._h)
                    self._h = None

    def release(self, batch):
        """Same as ``batch.release()``."""
        batch.release()

    # -- delivery -------------------------------------------------------
    def next(self, timeout_s=None):
        """The next batch, waiting ``timeout_s`` seconds (None: forever);
        raises ``ferry.Timeout`` when none came in time, and
        ``ferry.EndOfEpoch`` at the end of an epoch."""
        ms = _ms(timeout_s)
        if not self._h or self._closing:
            raise FerryError(E_INVALID_ARGUMENT, "consumer is closed")
        deadline = None if ms < 0 else time.monotonic() + ms / 1000
        started = time.monotonic()
        raw = _Batch()
        while True:
            with self._in_call:
                self._reap(1 if self.prefetch >= 3 else 0)
                self._drain()
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                wait = _SLICE_S if left is None else min(left, _SLICE_S)
                status = _lib.ferry_consumer_next(self._h, int(wait * 1000), ctypes.byref(raw))
                if status == OK:
                    with self._lock:
                        self._holds += 1
                    return Batch(self, raw)
            if status != E_TIMEOUT or (deadline is not None and time.monotonic() >= deadline):
                _check(status)
            if self._deferred:
                continue
            if not self._warned and self._holds >= self.prefetch and time.monotonic() - started > 5:
                self._warned = True
                warnings.warn(
                    f"ferry: next() on stream {self.stream!r} has waited 5 s while all {self.prefetch} batches this "
                    "consumer may hold (prefetch) are still alive (a Batch, or a tensor, array or memoryview of one, "
                    "is still referenced): nothing more can be delivered until one is dropped; keep fewer, or raise prefetch",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def batches(self, timeout_s=None):
        """Yields batches until none arrives within ``timeout_s`` seconds
        (None: forever) or the epoch ends. Each batch is retired when the
        next one is requested (and the last when iteration ends): its slot
        goes back to ferryd once no tensor, array or memoryview of it is
        alive either.

        GPU batches go back only once the GPU work queued on them has
        finished: when PyTorch is in use, an event is recorded on the
        current CUDA stream when a GPU batch is retired and no view of it
        is alive, and the slot goes back when the event completes, so the
        training step still running on one batch overlaps the hand-over of
        the next (at most one batch is kept back that way, with prefetch of
        3 or more).
        Without PyTorch, release GPU batches yourself once your GPU work on
        them is done."""
        last = None
        try:
            while True:
                if last is not None:
                    last._retire()
                    last = None
                try:
                    last = self.next(timeout_s)
                except (Timeout, EndOfEpoch):
                    return
                yield last
        finally:
            if last is not None:
                last._retire()
            if self._h:
                with self._in_call:
                    self._reap(0)
                    self._drain()
                self._maybe_free()

    def __iter__(self):
        return self.batches(None)

    def commit(self):
        """Commits this member's partitions up to what it released."""
        with self._in_call:
            self._drain()
            _check(_lib.ferry_consumer_commit(self._h))

    def seek(self, partition, offset):
        """Replays ``partition`` from ``offset`` (while retained) or skips to it."""
        partition = _uint("partition", partition, 0)
        offset = _uint("offset", offset, 0, 2**64 - 1)
        with self._in_call:
            _check(_lib.ferry_consumer_seek(self._h, partition, offset))

    def close(self):
        """Leaves the group. If tensors or arrays still view some of its
        batches, the consumer stays a member until they are gone (their
        bytes stay valid), then leaves; batches not released are
        redelivered to the other members."""
        if not self._h:
            return
        self._closing = True
        if self._deferred:
            with self._in_call:
                self._reap(0)
                self._drain()
        self._maybe_free()

    def __del__(self):
        # Only reached once no batch refers to us any more.
        if not getattr(self, "_h", None):
            return
        self._closing = True
        self._holds = 0
        self._deferred.clear()
        self._maybe_free()


def iterable_dataset(stream, group, socket=None, dtype=None, shape=None, timeout_s=None, with_info=False, **consumer_options):
    """A ``torch.utils.data.IterableDataset`` over a Ferry stream; an
    iteration ends at the end of the epoch (or after ``timeout_s`` seconds
    without a batch; None: never).

    Items: a typed record gives a ``Record`` (a dict of tensors and
    values, with ``.info``); plain bytes give a uint8 tensor (viewed as
    ``dtype``/``shape`` when given). ``with_info=True`` yields
    ``(item, BatchInfo)`` pairs (stream, partition, offset, meta).

    With ``num_workers=0`` items view the batch in place (no copy); a
    batch goes back to ferryd when its item is garbage collected. Use it
    with ``DataLoader(ds, batch_size=None)`` so that no collation copies
    it. With ``num_workers > 0`` each worker joins the consumer group (the
    partitions are spread over the workers) and copies each batch once,
    into shared memory, before releasing its slot; the main process then
    receives that copy without another one (as DataLoader's own collation
    output). CUDA delivery (``device="cuda:N"``) needs ``num_workers=0``.
    The dataset pickles (for the "spawn" start method).
    """
    import inspect

    known = set(inspect.signature(Client.consumer).parameters) - {"self", "stream", "group"}
    unknown = sorted(set(consumer_options) - known)
    if unknown:
        raise TypeError(f"iterable_dataset: unknown consumer option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return _dataset_class()(stream, group, socket, dtype, shape, timeout_s, with_info, consumer_options)


_DATASET = None


def _dataset_class():
    """The IterableDataset class, made on first use (importing ferry does
    not import PyTorch); reachable as ``ferry.FerryIterableDataset`` so that
    pickle finds it in a spawned worker."""
    global _DATASET
    if _DATASET is not None:
        return _DATASET
    import torch

    class FerryIterableDataset(torch.utils.data.IterableDataset):
        def __init__(self, stream, group, socket, dtype, shape, timeout_s, with_info, consumer_options):
            super().__init__()
            self.stream, self.group, self.socket = stream, group, socket
            self.dtype, self.shape, self.timeout_s = dtype, shape, timeout_s
            self.with_info, self.consumer_options = with_info, dict(consumer_options)

        def __iter__(self):
            worker = torch.utils.data.get_worker_info()
            if worker is not None and self.consumer_options.get("device") not in (None, "cpu"):
                raise ValueError("CUDA delivery needs num_workers=0: CUDA memory does not cross worker processes")
            client = Client(self.socket)
            cons = client.consumer(self.stream, self.group, **self.consumer_options)
            dtype, shape = self.dtype, self.shape
            try:
                for batch in cons.batches(self.timeout_s):
                    item = _shared_item(batch, dtype, shape) if worker is not None else _item(batch, dtype, shape)
                    if worker is not None:
                        batch._retire()
                    info = batch.info
                    del batch
                    yield (item, info) if self.with_info else item
                    del item
            finally:
                cons.close()
                client.close()

    FerryIterableDataset.__module__ = __name__
    FerryIterableDataset.__qualname__ = "FerryIterableDataset"
    _DATASET = FerryIterableDataset
    return _DATASET


def __getattr__(name):
    if name == "FerryIterableDataset":
        return _dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _item(batch, dtype, shape):
    if batch.is_record:
        return batch.record()
    return batch.tensor(dtype, shape)


def _shared_item(batch, dtype, shape):
    """The item of `batch` copied once into shared memory (for a
    DataLoader worker): PyTorch sends it to the main process as is."""
    import torch

    n = len(batch)
    storage = torch.UntypedStorage._new_shared(max(n, 1))
    base = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (n,), (1,))
    if n:
        base.copy_(batch._u8_tensor())
    if batch.is_record:
        return Record(_field_values(batch._field_table(), base_torch=base), batch.info)
    t = base
    if dtype is not None:
        t = t.view(dtype)
    return t.reshape(shape) if shape is not None else t

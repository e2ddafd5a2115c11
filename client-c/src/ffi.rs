//! The C ABI of libferry. Conventions (see README "C API"):
//! - opaque handles; `ferry_<object>_<verb>` names; every constructor has a
//!   `_free` that accepts NULL;
//! - every call that can fail returns a `FERRY_*` status (0 is success);
//!   output parameters come last and are written only on success;
//!   `ferry_last_error()` gives the detail of this thread's last failure;
//! - a panic never crosses the boundary: it becomes `FERRY_E_INTERNAL`;
//! - a producer or consumer handle is used by one thread at a time (calls
//!   from several threads are serialised by a lock, not undefined).
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use crate::client::{Client, Consumer, ConsumerOptions, Error, Producer, Status};
use ferry_shm::proto::{GroupStart, StreamSpec};

use crate::record::{self, NewField, Writer};

/// Version of this C ABI (struct layouts, signatures). Bumped on any
/// incompatible change; bindings compare it with `ferry_abi_version()`.
pub const FERRY_ABI_VERSION: u32 = 4;

/// Success.
pub const FERRY_OK: i32 = 0;
/// The wait ended before anything arrived.
pub const FERRY_E_TIMEOUT: i32 = 1;
/// A NULL pointer, a bad name or an out-of-range number.
pub const FERRY_E_INVALID_ARGUMENT: i32 = 2;
/// No ferryd answers at the socket path (the message names it).
pub const FERRY_E_NOT_RUNNING: i32 = 3;
/// ferryd closed the session (it stopped, or judged the client faulty).
pub const FERRY_E_DISCONNECTED: i32 = 4;
/// The stream does not exist.
pub const FERRY_E_UNKNOWN_STREAM: i32 = 5;
/// The stream exists with a different configuration.
pub const FERRY_E_STREAM_MISMATCH: i32 = 6;
/// Payload larger than the slot, or metadata larger than 256 bytes.
pub const FERRY_E_TOO_LARGE: i32 = 7;
/// The batch or slot is not held by this handle (e.g. released twice).
pub const FERRY_E_NOT_HELD: i32 = 8;
/// ferryd's peer policy refused this user.
pub const FERRY_E_PERMISSION_DENIED: i32 = 9;
/// Client and daemon disagree on the protocol, or shared memory is corrupt.
pub const FERRY_E_PROTOCOL: i32 = 10;
/// Seek target out of range or no longer retained.
pub const FERRY_E_OFFSET_GONE: i32 = 11;
/// A resource limit was reached.
pub const FERRY_E_LIMIT: i32 = 12;
/// ferryd is draining for shutdown.
pub const FERRY_E_SHUTTING_DOWN: i32 = 13;
/// A bug (including a caught panic).
pub const FERRY_E_INTERNAL: i32 = 14;
/// The requested device does not exist (GPU delivery without that GPU).
pub const FERRY_E_NO_DEVICE: i32 = 15;
/// The request is valid but this ferryd cannot do it.
pub const FERRY_E_UNSUPPORTED: i32 = 16;
/// `ferry_consumer_next`: the group passed the end of the epoch (every
/// producer of the stream called `ferry_producer_end`). Not an error: the
/// next call goes on with the next epoch's batches.
pub const FERRY_E_END_OF_EPOCH: i32 = 17;

/// `ferry_consumer_config.flags`: map the pool copy-on-write, so that a
/// batch's bytes may be written in place (writes stay in this process,
/// cost the pages they touch, and are gone when the slot carries another
/// batch). Without it `ferry_batch.data` must only be read.
pub const FERRY_CONSUMER_COPY_ON_WRITE: u32 = 1;
/// `ferry_consumer_config.flags`: no automatic commit; call
/// `ferry_consumer_commit` yourself.
pub const FERRY_CONSUMER_MANUAL_COMMIT: u32 = 2;

/// `ferry_consumer_config.start` (only for a group the join creates):
/// batches published from now on, plus those published while the stream
/// had no group at all (kept for the first group, so starting producers
/// first loses nothing).
pub const FERRY_START_DEFAULT: u32 = 0;
/// The oldest batch still in the pool, released ones included.
pub const FERRY_START_EARLIEST: u32 = 1;
/// Only batches published from now on.
pub const FERRY_START_LATEST: u32 = 2;
/// `start_offsets`: one offset per partition.
pub const FERRY_START_OFFSETS: u32 = 3;

/// `ferry_batch.flags`: the payload is a typed record (read its fields
/// with `ferry_batch_field`).
pub const FERRY_BATCH_RECORD: u32 = 1;

/// Field kinds of a typed record.
pub const FERRY_FIELD_TENSOR: u32 = 1;
pub const FERRY_FIELD_BYTES: u32 = 2;
/// UTF-8 text.
pub const FERRY_FIELD_STR: u32 = 3;
/// A signed 64-bit integer (`ferry_field.int_value`).
pub const FERRY_FIELD_INT: u32 = 4;
/// A 64-bit float (`ferry_field.float_value`).
pub const FERRY_FIELD_FLOAT: u32 = 5;
/// A boolean (`ferry_field.int_value` 0 or 1).
pub const FERRY_FIELD_BOOL: u32 = 6;

/// Tensor element types.
pub const FERRY_DTYPE_U8: u32 = 1;
pub const FERRY_DTYPE_I8: u32 = 2;
pub const FERRY_DTYPE_U16: u32 = 3;
pub const FERRY_DTYPE_I16: u32 = 4;
pub const FERRY_DTYPE_U32: u32 = 5;
pub const FERRY_DTYPE_I32: u32 = 6;
pub const FERRY_DTYPE_U64: u32 = 7;
pub const FERRY_DTYPE_I64: u32 = 8;
pub const FERRY_DTYPE_F16: u32 = 9;
pub const FERRY_DTYPE_BF16: u32 = 10;
pub const FERRY_DTYPE_F32: u32 = 11;
pub const FERRY_DTYPE_F64: u32 = 12;
pub const FERRY_DTYPE_BOOL: u32 = 13;

/// `ferry_record_add_tensor` flags: the elements are big-endian.
pub const FERRY_FIELD_BIG_ENDIAN: u32 = 1;

/// Most dimensions of a record's tensor field.
pub const FERRY_MAX_DIMS: u32 = 8;

/// A typed record is a payload that starts with this table (integers
/// little-endian, offsets from the payload's start):
///
/// ```text
/// header (16 bytes): uint32 magic = FERRY_RECORD_MAGIC ("FRC1"),
///   uint16 version = FERRY_RECORD_VERSION, uint16 nfields (1-256),
///   uint32 data_start (the table's end, a multiple of 64), uint32 0
/// nfields entries of FERRY_RECORD_FIELD_SIZE (224) bytes:
///   char name[64] (UTF-8, 1-63 bytes, NUL-terminated, zero-padded),
///   uint8 kind (FERRY_FIELD_*), uint8 dtype (FERRY_DTYPE_*, tensors),
///   uint8 ndim (0-8), uint8 byte_order (0 little, 1 big), uint32 0,
///   uint64 offset, uint64 len (the field's bytes, inside the payload
///   after data_start; tensors aligned to their element size),
///   uint64 shape[8], uint64 strides[8] (in elements), uint64 0
/// then the fields' bytes (tensors from a 64-byte boundary, numbers
/// from an 8-byte one): tensors as shape and strides say, bytes and
/// UTF-8 text as they are, an int as int64, a float as float64, a bool
/// as one byte 0 or 1.
/// ```
///
/// Each field is one contiguous range, addressable on its own. The
/// `ferry_record_*` calls write it; `ferry_batch_field*` read it back after
/// checking every bound (a malformed table is FERRY_E_PROTOCOL).
pub const FERRY_RECORD_MAGIC: u32 = 0x3143_5246;
pub const FERRY_RECORD_VERSION: u32 = 1;
pub const FERRY_RECORD_HEADER_SIZE: u32 = 16;
pub const FERRY_RECORD_FIELD_SIZE: u32 = 224;
pub const FERRY_RECORD_MAX_FIELDS: u32 = 256;
/// Longest field name in bytes (without its NUL).
pub const FERRY_FIELD_NAME_MAX: u32 = 63;

const _: () = {
    assert!(FERRY_RECORD_MAGIC == record::MAGIC);
    assert!(FERRY_RECORD_VERSION == record::VERSION as u32);
    assert!(FERRY_RECORD_HEADER_SIZE as u64 == record::HEADER);
    assert!(FERRY_RECORD_FIELD_SIZE as u64 == record::ENTRY);
    assert!(FERRY_RECORD_MAX_FIELDS == record::MAX_FIELDS);
    assert!(FERRY_FIELD_NAME_MAX as usize == record::NAME_MAX);
    assert!(FERRY_MAX_DIMS as usize == record::MAX_DIMS);
    assert!(
        FERRY_FIELD_TENSOR == record::KIND_TENSOR as u32
            && FERRY_FIELD_BOOL == record::KIND_BOOL as u32
    );
    assert!(FERRY_BATCH_RECORD == crate::client::BATCH_RECORD);
};

/// Configuration of a stream a producer may create.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ferry_stream_config {
    pub partitions: u32,
    pub slot_count: u32,
    /// Bytes per slot (largest batch).
    pub slot_size: u64,
    /// FERRY_DURABILITY_MEMORY (0: the pool only) or FERRY_DURABILITY_DISK
    /// (a log on disk under the pool; see `ferry_producer_flush`).
    pub durability: u32,
    /// Disk streams: FERRY_FSYNC_EVERY (0), FERRY_FSYNC_INTERVAL (with
    /// `fsync_interval_ms`) or FERRY_FSYNC_NEVER.
    pub fsync: u32,
    pub fsync_interval_ms: u32,
    /// Disk streams: nonzero: retention may delete what a live group has
    /// not committed.
    pub retention_strict: u32,
    /// Disk streams: keep whole segments at most this old (0: no limit).
    pub retention_ms: u64,
    /// Disk streams: keep at most this many bytes per partition (0: no
    /// limit).
    pub retention_bytes: u64,
}

/// `ferry_stream_config::durability`: memory only.
pub const FERRY_DURABILITY_MEMORY: u32 = 0;
/// `ferry_stream_config::durability`: a log on disk under the pool.
pub const FERRY_DURABILITY_DISK: u32 = 1;
/// `ferry_stream_config::fsync`: acknowledged once on stable storage.
pub const FERRY_FSYNC_EVERY: u32 = 0;
/// `ferry_stream_config::fsync`: one sync per `fsync_interval_ms`.
pub const FERRY_FSYNC_INTERVAL: u32 = 1;
/// `ferry_stream_config::fsync`: acknowledged once written; the OS syncs.
pub const FERRY_FSYNC_NEVER: u32 = 2;

fn durability_of(c: &ferry_stream_config) -> ferry_shm::proto::Durability {
    use ferry_shm::proto::{Durability, Fsync};
    if c.durability != FERRY_DURABILITY_DISK {
        return Durability::MEMORY;
    }
    Durability {
        disk: true,
        fsync: match c.fsync {
            FERRY_FSYNC_INTERVAL => Fsync::IntervalMs(c.fsync_interval_ms),
            FERRY_FSYNC_NEVER => Fsync::Never,
            _ => Fsync::Every,
        },
        retention_ms: c.retention_ms,
        retention_bytes: c.retention_bytes,
        strict: c.retention_strict != 0,
    }
}

/// Consumer options; pass NULL for defaults.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ferry_consumer_config {
    /// Most batches delivered and not released at a time (0: default 8).
    pub prefetch: u32,
    /// Microseconds `ferry_consumer_next` busy-polls before sleeping.
    pub spin_us: u32,
    /// Where batches are delivered: NULL or "cpu" for host memory,
    /// "cuda:N" for GPU N as this process numbers them (libferry then
    /// loads libcuda, opens the consumer's GPU pool through its CUDA IPC
    /// handle in GPU N's primary context, and each batch's payload is at
    /// `ferry_batch.device_data`).
    pub device: *const c_char,
    /// `FERRY_CONSUMER_*` bits.
    pub flags: u32,
    /// Automatic commit at most this often, in milliseconds (0: with
    /// every release). Releases not yet committed are committed by a later
    /// call once due, and when the consumer is freed.
    pub commit_interval_ms: u32,
    /// `FERRY_START_*`: where a group this join creates starts.
    pub start: u32,
    /// With FERRY_START_OFFSETS: the number of offsets (one per
    /// partition) at `start_offsets`.
    pub start_offsets_len: u32,
    pub start_offsets: *const u64,
}

/// A reserved slot: write up to `capacity` bytes at `data`, then publish.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ferry_slot {
    /// Where to write the payload in host memory; NULL for a producer that
    /// publishes from a GPU.
    pub data: *mut u8,
    pub capacity: u64,
    pub slot: u32,
    pub reserved: u32,
    /// For a producer that publishes from a GPU: where to write the payload
    /// in GPU memory (a CUdeviceptr valid in this process's context of the
    /// producer's GPU); 0 otherwise. Publish only after those writes
    /// completed.
    pub device_data: u64,
}

/// A delivered batch, read in place. Valid until released.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ferry_batch {
    /// Name of the stream (owned by the consumer handle; valid until it is
    /// freed).
    pub stream: *const c_char,
    /// The payload in host memory; NULL when it was delivered to a GPU.
    pub data: *const u8,
    pub len: u64,
    pub meta: *const u8,
    pub meta_len: u32,
    pub partition: u32,
    /// Offset of the batch in its partition.
    pub offset: u64,
    /// Identifies the batch to `ferry_consumer_release`.
    pub token: u64,
    /// With GPU delivery: the payload's address in GPU memory (a
    /// CUdeviceptr, valid in this process's current CUDA context of GPU
    /// `device`); 0 otherwise.
    pub device_data: u64,
    /// The GPU holding the payload (this process's ordinal), or -1 for
    /// host memory.
    pub device: i32,
    /// `FERRY_BATCH_*` bits.
    pub flags: u32,
}

/// Writes a typed record into a reserved slot: `ferry_record_begin`, one
/// `ferry_record_add_*` per field, then `ferry_producer_publish_record`.
/// Allocated by the caller (on the stack); its fields are libferry's.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ferry_record_writer {
    pub _base: *mut u8,
    pub _capacity: u64,
    pub _used: u64,
    pub _nfields: u32,
    pub _added: u32,
    pub _slot: u32,
    pub _reserved: u32,
}

/// One field of a delivered typed record. Everything it points to is valid
/// until the batch is released.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ferry_field {
    /// NUL-terminated UTF-8 (a copy owned by libferry).
    pub name: *const c_char,
    /// `FERRY_FIELD_*`.
    pub kind: u32,
    /// `FERRY_DTYPE_*` for tensors, 0 otherwise.
    pub dtype: u32,
    /// Dimensions of a tensor (0 for a scalar tensor and other kinds).
    pub ndim: u32,
    /// 0: little-endian, 1: big-endian.
    pub big_endian: u32,
    /// The field's bytes in host memory; NULL when the batch was delivered
    /// to a GPU (then see `device_data`).
    pub data: *const u8,
    /// With GPU delivery: the field's bytes in GPU memory; 0 otherwise.
    pub device_data: u64,
    /// Bytes of the field.
    pub len: u64,
    /// Where the field starts, from the start of the payload.
    pub offset: u64,
    pub shape: [u64; 8],
    /// In elements, not bytes.
    pub strides: [u64; 8],
    /// FERRY_FIELD_INT and FERRY_FIELD_BOOL.
    pub int_value: i64,
    /// FERRY_FIELD_FLOAT.
    pub float_value: f64,
}

/// A connection to ferryd.
pub struct ferry_client {
    inner: Client,
}

/// A producer session on one stream.
pub struct ferry_producer {
    inner: Mutex<Producer>,
}

/// A consumer-group member on one stream.
pub struct ferry_consumer {
    inner: Mutex<Consumer>,
    stream: CString,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn fail(e: Error) -> i32 {
    set_last_error(&e.message);
    e.status as i32
}

fn invalid(msg: &str) -> i32 {
    set_last_error(msg);
    FERRY_E_INVALID_ARGUMENT
}

/// Runs `f`, turning a panic into FERRY_E_INTERNAL.
fn guard(f: impl FnOnce() -> i32) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(code) => code,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error (panic in libferry): {msg}"));
            FERRY_E_INTERNAL
        }
    }
}

fn timeout_of(ms: i64) -> Option<Duration> {
    (ms >= 0).then(|| Duration::from_millis(ms as u64))
}

/// Reads a C string argument; `Err` is the status to return.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, i32> {
    if p.is_null() {
        return Err(invalid(&format!("{what} is NULL")));
    }
    // SAFETY: non-null and NUL-terminated per the caller's contract.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| invalid(&format!("{what} is not UTF-8")))
}

/// Reads a device argument: NULL (host memory), "cpu" or "cuda:N"; `Err`
/// is the status to return.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
unsafe fn device_arg(p: *const c_char, what: &str) -> Result<Option<u32>, i32> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: per the caller's contract.
    let d = unsafe { str_arg(p, what) }?;
    crate::client::parse_device(d).map_err(fail)
}

/// The library version, e.g. "0.1.0". Static; never free it.
#[no_mangle]
pub extern "C" fn ferry_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The ABI version of the loaded library (FERRY_ABI_VERSION when built).
/// A program built against another ferry.h must not use it.
#[no_mangle]
pub extern "C" fn ferry_abi_version() -> u32 {
    FERRY_ABI_VERSION
}

/// A short static description of a status code.
#[no_mangle]
pub extern "C" fn ferry_status_str(status: i32) -> *const c_char {
    let text = usize::try_from(status)
        .ok()
        .and_then(|i| crate::client::STATUS_TEXT.get(i))
        .copied()
        .unwrap_or("unknown status code\0");
    text.as_ptr().cast()
}

/// Detail of the last failed call on this thread (names the socket path,
/// the stream, the sizes...). Valid until the next failing call on this
/// thread; never free it. Empty when nothing failed yet.
#[no_mangle]
pub extern "C" fn ferry_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Connects to ferryd. `socket_path` may be NULL: then FERRY_SOCKET, else
/// /run/ferry/ferryd.sock (root) or $XDG_RUNTIME_DIR/ferry/ferryd.sock.
///
/// # Safety
/// `socket_path` is NULL or a NUL-terminated string; `out` is a valid
/// pointer to write the handle to.
#[no_mangle]
pub unsafe extern "C" fn ferry_client_connect(
    socket_path: *const c_char,
    out: *mut *mut ferry_client,
) -> i32 {
    guard(|| {
        if out.is_null() {
            return invalid("out is NULL");
        }
        let path = if socket_path.is_null() {
            None
        } else {
            // SAFETY: non-null and NUL-terminated per the contract.
            match unsafe { str_arg(socket_path, "socket_path") } {
                Ok(p) => Some(Path::new(p)),
                Err(code) => return code,
            }
        };
        match Client::connect(path) {
            Ok(c) => {
                // SAFETY: out is non-null and valid per the contract.
                unsafe { *out = Box::into_raw(Box::new(ferry_client { inner: c })) };
                FERRY_OK
            }
            Err(e) => fail(e),
        }
    })
}

/// Closes a client. NULL is ignored.
///
/// # Safety
/// `client` is NULL or a handle from `ferry_client_connect` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn ferry_client_free(client: *mut ferry_client) {
    if !client.is_null() {
        // SAFETY: the handle came from Box::into_raw and is freed once.
        drop(unsafe { Box::from_raw(client) });
    }
}

/// Opens a producer on `stream`. With `create` non-NULL, a missing stream is
/// created with that configuration (an existing stream must match it);
/// with NULL the stream must exist.
///
/// # Safety
/// `client` is a live handle; `stream` a NUL-terminated string; `create`
/// NULL or valid; `out` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn ferry_producer_open(
    client: *const ferry_client,
    stream: *const c_char,
    create: *const ferry_stream_config,
    out: *mut *mut ferry_producer,
) -> i32 {
    // SAFETY: the same contract.
    unsafe { ferry_producer_open_device(client, stream, create, std::ptr::null(), out) }
}

/// As `ferry_producer_open`, publishing from `device`: NULL or "cpu" for
/// host memory, "cuda:N" for GPU N as this process numbers them. A GPU
/// producer's slots are in the stream's mirror on that GPU
/// (`ferry_slot.device_data`); ferryd copies each published batch to host
/// memory for host consumers and straight from GPU memory for GPU
/// consumers. FERRY_E_NO_DEVICE without that GPU or without libcuda.
///
/// # Safety
/// As `ferry_producer_open`; `device` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn ferry_producer_open_device(
    client: *const ferry_client,
    stream: *const c_char,
    create: *const ferry_stream_config,
    device: *const c_char,
    out: *mut *mut ferry_producer,
) -> i32 {
    guard(|| {
        if client.is_null() || out.is_null() {
            return invalid("client or out is NULL");
        }
        // SAFETY: per the contract.
        let device = match unsafe { device_arg(device, "device") } {
            Ok(d) => d,
            Err(c) => return c,
        };
        // SAFETY: per the contract.
        let stream = match unsafe { str_arg(stream, "stream") } {
            Ok(s) => s,
            Err(c) => return c,
        };
        // SAFETY: create is NULL or valid per the contract.
        let spec = unsafe { create.as_ref() }.map(|c| StreamSpec {
            durability: durability_of(c),
            partitions: c.partitions,
            slot_size: c.slot_size,
            slot_count: c.slot_count,
        });
        // SAFETY: client is a live handle per the contract.
        let client = unsafe { &*client };
        match client.inner.producer_on(stream, spec, device) {
            Ok(p) => {
                // SAFETY: out is valid per the contract.
                unsafe {
                    *out = Box::into_raw(Box::new(ferry_producer {
                        inner: Mutex::new(p),
                    }))
                };
                FERRY_OK
            }
            Err(e) => fail(e),
        }
    })
}

/// Reserves a free slot, waiting up to `timeout_ms` (negative: forever;
/// 0: do not wait) while every slot is in use downstream.
///
/// # Safety
/// `producer` is a live handle; `out` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn ferry_producer_reserve(
    producer: *mut ferry_producer,
    timeout_ms: i64,
    out: *mut ferry_slot,
) -> i32 {
    guard(|| {
        // SAFETY: per the contract.
        let Some(p) = (unsafe { producer.as_ref() }) else {
            return invalid("producer is NULL");
        };
        if out.is_null() {
            return invalid("out is NULL");
        }
        let mut p = match p.inner.lock() {
            Ok(g) => g,
            Err(_) => return fail_poisoned(),
        };
        match p.reserve(timeout_of(timeout_ms)) {
            Ok(s) => {
                // SAFETY: out is valid per the contract.
                unsafe {
                    *out = ferry_slot {
                        data: s.ptr,
                        capacity: s.capacity,
                        slot: s.slot,
                        reserved: 0,
                        device_data: s.device_ptr,
                    }
                };
                FERRY_OK
            }
            Err(e) => fail(e),
        }
    })
}

/// Publishes a reserved slot holding `len` bytes. `meta` (may be NULL when
/// `meta_len` is 0, at most 256 bytes) is copied next to the slot; `key`,
/// when non-NULL, picks the partition (equal keys, same partition).
///
/// # Safety
/// `producer` is a live handle; `slot` points to a slot from
/// `ferry_producer_reserve`; `meta` is valid for `meta_len` bytes; `key` is
/// NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn ferry_producer_publish(
    producer: *mut ferry_producer,
    slot: *const ferry_slot,
    len: u64,
    meta: *const c_void,
    meta_len: u32,
    key: *const u64,
) -> i32 {
    guard(|| {
        // SAFETY: per the contract.
        let (Some(p), Some(slot)) = (unsafe { producer.as_ref() }, unsafe { slot.as_ref() }) else {
            return invalid("producer or slot is NULL");
        };
        if meta.is_null() && meta_len > 0 {
            return invalid("meta is NULL but meta_len is not 0");
        }
        if meta_len > ferry_shm::layout::META_MAX {
            set_last_error(&format!("metadata of {meta_len} bytes exceeds 256"));
            return FERRY_E_TOO_LARGE;
        }
        let meta: &[u8] = if meta_len == 0 {
            &[]
        } else {
            // SAFETY: non-null and valid for meta_len bytes per the contract.
            unsafe { std::slice::from_raw_parts(meta.cast::<u8>(), meta_len as usize) }
        };
        // SAFETY: key is NULL or valid per the contract.
        let key = unsafe { key.as_ref() }.copied();
        locked(&p.inner, |p| p.publish(slot.slot, len, meta, key))
    })
}

/// Closes a producer. Batches it published stay in the stream; slots it
/// reserved and did not publish return to the pool. NULL is ignored.
///
/// # Safety
/// `producer` is NULL or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ferry_producer_free(producer: *mut ferry_producer) {
    if !producer.is_null() {
        // SAFETY: the handle came from Box::into_raw and is freed once.
        drop(unsafe { Box::from_raw(producer) });
    }
}

/// Joins consumer group `group` of `stream`. `config` may be NULL.
///
/// # Safety
/// `client` is a live handle; `stream`, `group` NUL-terminated strings;
/// `config` NULL or valid; `out` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn ferry_consumer_open(
    client: *const ferry_client,
    stream: *const c_char,
    group: *const c_char,
    config: *const ferry_consumer_config,
    out: *mut *mut ferry_consumer,
) -> i32 {
    guard(|| {
        if client.is_null() || out.is_null() {
            return invalid("client or out is NULL");
        }
        // SAFETY: per the contract.
        let stream = match unsafe { str_arg(stream, "stream") } {
            Ok(s) => s,
            Err(c) => return c,
        };
        // SAFETY: per the contract.
        let group = match unsafe { str_arg(group, "group") } {
            Ok(s) => s,
            Err(c) => return c,
        };
        let mut opts = ConsumerOptions::default();
        // SAFETY: config is NULL or valid per the contract.
        if let Some(c) = unsafe { config.as_ref() } {
            opts.prefetch = c.prefetch;
            opts.spin_us = c.spin_us;
            if c.flags & !(FERRY_CONSUMER_COPY_ON_WRITE | FERRY_CONSUMER_MANUAL_COMMIT) != 0 {
                return invalid(&format!("config->flags {:#x} has unknown bits", c.flags));
            }
            opts.copy_on_write = c.flags & FERRY_CONSUMER_COPY_ON_WRITE != 0;
            opts.auto_commit = c.flags & FERRY_CONSUMER_MANUAL_COMMIT == 0;
            opts.commit_interval = Duration::from_millis(c.commit_interval_ms as u64);
            opts.start = match c.start {
                FERRY_START_DEFAULT => GroupStart::Default,
                FERRY_START_EARLIEST => GroupStart::Earliest,
                FERRY_START_LATEST => GroupStart::Latest,
                FERRY_START_OFFSETS => {
                    if c.start_offsets.is_null() || c.start_offsets_len == 0 {
                        return invalid(
                            "FERRY_START_OFFSETS needs start_offsets and start_offsets_len",
                        );
                    }
                    // SAFETY: valid for start_offsets_len values per the
                    // contract.
                    let o = unsafe {
                        std::slice::from_raw_parts(c.start_offsets, c.start_offsets_len as usize)
                    };
                    GroupStart::Offsets(o.to_vec())
                }
                other => {
                    return invalid(&format!(
                        "config->start {other} is not a FERRY_START_* value"
                    ))
                }
            };
            // SAFETY: NULL or NUL-terminated per the contract.
            opts.device = match unsafe { device_arg(c.device, "config->device") } {
                Ok(d) => d,
                Err(code) => return code,
            };
        }
        // SAFETY: client is live per the contract.
        let client = unsafe { &*client };
        match client.inner.consumer(stream, group, opts) {
            Ok(c) => {
                let handle = ferry_consumer {
                    inner: Mutex::new(c),
                    stream: CString::new(stream).unwrap_or_default(),
                };
                // SAFETY: out is valid per the contract.
                unsafe { *out = Box::into_raw(Box::new(handle)) };
                FERRY_OK
            }
            Err(e) => fail(e),
        }
    })
}

/// Takes the next batch, waiting up to `timeout_ms` (negative: forever;
/// 0: do not wait). The batch is read in place until released.
///
/// # Safety
/// `consumer` is a live handle; `out` a valid pointer.
#[no_mangle]
pub unsafe extern "C" fn ferry_consumer_next(
    consumer: *mut ferry_consumer,
    timeout_ms: i64,
    out: *mut ferry_batch,
) -> i32 {
    guard(|| {
        // SAFETY: per the contract.
        let Some(handle) = (unsafe { consumer.as_ref() }) else {
            return invalid("consumer is NULL");
        };
        if out.is_null() {
            return invalid("out is NULL");
        }
        let mut c = match handle.inner.lock() {
            Ok(g) => g,
            Err(_) => return fail_poisoned(),
        };
        match c.next(timeout_of(timeout_ms)) {
            Ok(b) => {
                // SAFETY: out is valid per the contract.
                unsafe {
                    *out = ferry_batch {
                        stream: handle.stream.as_ptr(),
                        data: b.data,
                        len: b.len,
                        meta: b.meta,
                        meta_len: b.meta_len,
                        partition: b.partition,
                        offset: b.offset,
                        token: b.token,
                        device_data: b.device_data,
                        device: b.device,
                        flags: b.flags,
                    }
                };
                FERRY_OK
            }
            Err(e) => fail(e),
        }
    })
}

/// The most batches this consumer may hold delivered and unreleased: the
/// `prefetch` it asked for, or ferryd's default (8), at most ferryd's
/// `ring_capacity`. 0 for NULL.
///
/// # Safety
/// `consumer` is NULL or a live handle.
#[no_mangle]
pub unsafe extern "C" fn ferry_consumer_prefetch(consumer: *const ferry_consumer) -> u32 {
    // SAFETY: per the contract.
    let Some(c) = (unsafe { consumer.as_ref() }) else {
        return 0;
    };
    c.inner.lock().map_or(0, |c| c.prefetch())
}

/// Returns a batch's slot to ferryd. Releasing the same batch twice gives
/// FERRY_E_NOT_HELD. For a batch delivered to a GPU, release it only once
/// the GPU work reading it has finished (synchronize the stream that reads
/// it, or wait for an event recorded after that work): ferryd copies the
/// next batch into the same GPU slot as soon as it is released.
///
/// # Safety
/// `consumer` is a live handle; `batch` points to a batch (its token is
/// what counts).
#[no_mangle]
pub unsafe extern "C" fn ferry_consumer_release(
    consumer: *mut ferry_consumer,
    batch: *const ferry_batch,
) -> i32 {
    guard(|| {
        // SAFETY: per the contract.
        let (Some(c), Some(b)) = (unsafe { consumer.as_ref() }, unsafe { batch.as_ref() }) else {
            return invalid("consumer or batch is NULL");
        };
        locked(&c.inner, |c| c.release(b.token))
    })
}

/// Commits this member's partitions at their low watermark (every offset
/// below it released).
///
/// # Safety
/// `consumer` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn ferry_consumer_commit(consumer: *mut ferry_consumer) -> i32 {
    guard(|| {
        // SAFETY: per the contract.
        let Some(c) = (unsafe { consumer.as_ref() }) else {
            return invalid("consumer is NULL");
        };
        locked(&c.inner, |c| c.commit())
    })
}

/// Moves the group's position in `partition` to `offset`: back to replay
/// batches still retained (FERRY_E_OFFSET_GONE when they are not), or
/// forward to skip.
///
/// # Safety
/// `consumer` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn ferry_consumer_seek(
    consumer: *mut ferry_consumer,
    partition: u32,
    offset: u64,
) -> i32 {
    guard(|| {
        // SAFETY: per the contract.
        let Some(c) = (unsafe { consumer.as_ref() }) else {
            return invalid("consumer is NULL");
        };
        locked(&c.inner, |c| c.seek(partition, offset))
    })
}

/// Leaves the group. Batches not released are redelivered to the other
/// members. NULL is ignored.
///
/// # Safety
/// `consumer` is NULL or a live handle, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ferry_consumer_free(consumer: *mut ferry_consumer) {
    if !consumer.is_null() {
        // SAFETY: the handle came from Box::into_raw and is freed once.
        drop(unsafe { Box::from_raw(consumer) });
    }
}

/// Says this producer is done with the current epoch. When every producer
/// attached to the stream has said so (or left), ferryd puts an end marker
/// in every partition: consumers get FERRY_E_END_OF_EPOCH from
/// `ferry_consumer_next` once their group has passed all of them. Batches
/// published afterwards belong to the next epoch.
///
/// # Safety
/// `producer` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn ferry_producer_end(producer: *mut ferry_producer) -> i32 {
    guard(|| {
        // SAFETY: per the contract.
        let Some(p) = (unsafe { producer.as_ref() }) else {
            return invalid("producer is NULL");
        };
        locked(&p.inner, |p| p.end())
    })
}

/// Waits up to `timeout_ms` (negative: forever) until every batch this
/// producer published is acknowledged by ferryd: for a disk stream, as
/// durable as its fsync policy promises (synced with FERRY_FSYNC_EVERY and
/// FERRY_FSYNC_INTERVAL, written with FERRY_FSYNC_NEVER); for a memory
/// stream, taken by ferryd; and until every end of epoch it submitted
/// was taken where the epoch is decided (by ferryd, or by the stream's
/// home on another host: two producers whose publishes must not fall
/// into each other's epoch flush after ferry_producer_end). Publishing never waits for this: call it where
/// the training job needs the guarantee (before a checkpoint, at the end).
/// FERRY_E_TIMEOUT when they are not all acknowledged in time (the message
/// says how many are, and whether ferryd cannot write the log).
///
/// # Safety
/// `producer` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn ferry_producer_flush(
    producer: *mut ferry_producer,
    timeout_ms: i64,
) -> i32 {
    guard(|| {
        // SAFETY: per the contract.
        let Some(p) = (unsafe { producer.as_ref() }) else {
            return invalid("producer is NULL");
        };
        locked(&p.inner, |p| p.flush(timeout_of(timeout_ms)))
    })
}

fn writer_of(w: &ferry_record_writer) -> Writer {
    // SAFETY: the fields were written by ferry_record_begin / _add from a
    // Writer over a slot the caller keeps reserved.
    unsafe { Writer::from_raw(w._base, w._capacity, w._used, w._nfields, w._added) }
}

fn store_writer(out: &mut ferry_record_writer, w: Writer) {
    let (base, capacity, used, nfields, added) = w.to_raw();
    out._base = base;
    out._capacity = capacity;
    out._used = used;
    out._nfields = nfields;
    out._added = added;
}

/// Starts a typed record of `nfields` fields (1-256) in a reserved host
/// slot: writes its table header and fills `*w`.
///
/// # Safety
/// `producer` is a live handle; `slot` a slot it reserved; `w` valid.
#[no_mangle]
pub unsafe extern "C" fn ferry_record_begin(
    producer: *const ferry_producer,
    slot: *const ferry_slot,
    nfields: u32,
    w: *mut ferry_record_writer,
) -> i32 {
    guard(|| {
        // SAFETY: per the contract.
        let (Some(p), Some(slot), Some(w)) = (
            unsafe { producer.as_ref() },
            unsafe { slot.as_ref() },
            unsafe { w.as_mut() },
        ) else {
            return invalid("producer, slot or w is NULL");
        };
        let p = match p.inner.lock() {
            Ok(g) => g,
            Err(_) => return fail_poisoned(),
        };
        let buf = crate::client::SlotBuf {
            slot: slot.slot,
            ptr: slot.data,
            device_ptr: slot.device_data,
            capacity: slot.capacity,
        };
        match p.record_writer(&buf, nfields) {
            Ok(writer) => {
                store_writer(w, writer);
                w._slot = slot.slot;
                w._reserved = 0;
                FERRY_OK
            }
            Err(e) => fail(e),
        }
    })
}

/// Reads a field name argument; `Err` is the status to return.
///
/// # Safety
/// `name` is NULL or NUL-terminated.
unsafe fn field_name<'a>(name: *const c_char) -> Result<&'a str, i32> {
    // SAFETY: per the caller's contract.
    unsafe { str_arg(name, "field name") }
}

fn add_status(r: Result<u64, String>) -> Result<u64, i32> {
    r.map_err(|m| {
        let code = if m.contains("does not fit") {
            FERRY_E_TOO_LARGE
        } else {
            FERRY_E_INVALID_ARGUMENT
        };
        set_last_error(&m);
        code
    })
}

/// Adds a tensor field: `ndim` (0-8) dimensions of `shape`, `strides` in
/// elements (NULL: C-contiguous), elements of `dtype` (FERRY_DTYPE_*),
/// little-endian unless `flags` has FERRY_FIELD_BIG_ENDIAN. `*data` is set
/// to where its bytes go (64-byte aligned, in the slot): write them there.
///
/// # Safety
/// `w` is a writer from `ferry_record_begin` whose slot is still reserved;
/// `name` NUL-terminated; `shape` (and `strides` unless NULL) valid for
/// `ndim` values; `data` valid.
#[no_mangle]
pub unsafe extern "C" fn ferry_record_add_tensor(
    w: *mut ferry_record_writer,
    name: *const c_char,
    dtype: u32,
    ndim: u32,
    shape: *const u64,
    strides: *const u64,
    flags: u32,
    data: *mut *mut u8,
) -> i32 {
    guard(|| {
        // SAFETY: per the contract.
        let Some(w) = (unsafe { w.as_mut() }) else {
            return invalid("w is NULL");
        };
        if data.is_null() || (shape.is_null() && ndim > 0) {
            return invalid("data or shape is NULL");
        }
        if ndim > FERRY_MAX_DIMS {
            return invalid(&format!(
                "{ndim} dimensions: a record's tensors have at most {FERRY_MAX_DIMS}"
            ));
        }
        if dtype > u8::MAX as u32 || record::itemsize(dtype as u8).is_none() {
            return invalid(&format!("dtype {dtype} is not a FERRY_DTYPE_* value"));
        }
        if flags & !FERRY_FIELD_BIG_ENDIAN != 0 {
            return invalid(&format!(
                "flags {flags:#x} has bits other than FERRY_FIELD_BIG_ENDIAN"
            ));
        }
        // SAFETY: per the contract.
        let name = match unsafe { field_name(name) } {
            Ok(n) => n,
            Err(c) => return c,
        };
        // SAFETY: valid for ndim values per the contract.
        let shape = if ndim == 0 {
            &[][..]
        } else {
            unsafe { std::slice::from_raw_parts(shape, ndim as usize) }
        };
        // SAFETY: NULL or valid for ndim values per the contract.
        let strides = (!strides.is_null() && ndim > 0)
            .then(|| unsafe { std::slice::from_raw_parts(strides, ndim as usize) });
        let mut writer = writer_of(w);
        let off = match add_status(writer.add(&NewField {
            name,
            kind: record::KIND_TENSOR,
            dtype: dtype as u8,
            big_endian: flags & FERRY_FIELD_BIG_ENDIAN != 0,
            shape,
            strides,
            len: 0,
        })) {
            Ok(o) => o,
            Err(c) => return c,
        };
        store_writer(w, writer);
        // SAFETY: `off` lies inside the slot (checked by add); data is
        // valid per the contract.
        unsafe { *data = w._base.add(off as usize) };
        FERRY_OK
    })
}

/// Adds a field holding a copy of `len` bytes at `value` (`kind`:
/// FERRY_FIELD_BYTES or FERRY_FIELD_STR, which must be UTF-8).
///
/// # Safety
/// As `ferry_record_add_tensor`; `value` valid for `len` bytes (may be
/// NULL when `len` is 0).
#[no_mangle]
pub unsafe extern "C" fn ferry_record_add_bytes(
    w: *mut ferry_record_writer,
    name: *const c_char,
    kind: u32,
    value: *const c_void,
    len: u64,
) -> i32 {
    guard(|| {
        if kind != FERRY_FIELD_BYTES && kind != FERRY_FIELD_STR {
            return invalid(&format!(
                "kind {kind} is neither FERRY_FIELD_BYTES nor FERRY_FIELD_STR"
            ));
        }
        if value.is_null() && len > 0 {
            return invalid("value is NULL");
        }
        let bytes: &[u8] = if len == 0 {
            &[]
        } else {
            // SAFETY: valid for len bytes per the contract.
            unsafe { std::slice::from_raw_parts(value.cast::<u8>(), len as usize) }
        };
        // SAFETY: per the contract.
        unsafe { add_copy(w, name, kind as u8, bytes) }
    })
}

/// # Safety
/// As `ferry_record_add_tensor`.
unsafe fn add_copy(
    w: *mut ferry_record_writer,
    name: *const c_char,
    kind: u8,
    bytes: &[u8],
) -> i32 {
    // SAFETY: per the contract.
    let Some(w) = (unsafe { w.as_mut() }) else {
        return invalid("w is NULL");
    };
    // SAFETY: per the contract.
    let name = match unsafe { field_name(name) } {
        Ok(n) => n,
        Err(c) => return c,
    };
    let mut writer = writer_of(w);
    if let Err(c) = add_status(writer.add_copy(name, kind, bytes)) {
        return c;
    }
    store_writer(w, writer);
    FERRY_OK
}

/// Adds a signed 64-bit integer field.
///
/// # Safety
/// As `ferry_record_add_tensor`.
#[no_mangle]
pub unsafe extern "C" fn ferry_record_add_int(
    w: *mut ferry_record_writer,
    name: *const c_char,
    value: i64,
) -> i32 {
    // SAFETY: per the contract.
    guard(|| unsafe { add_copy(w, name, record::KIND_INT, &value.to_le_bytes()) })
}

/// Adds a 64-bit float field.
///
/// # Safety
/// As `ferry_record_add_tensor`.
#[no_mangle]
pub unsafe extern "C" fn ferry_record_add_float(
    w: *mut ferry_record_writer,
    name: *const c_char,
    value: f64,
) -> i32 {
    // SAFETY: per the contract.
    guard(|| unsafe { add_copy(w, name, record::KIND_FLOAT, &value.to_le_bytes()) })
}

/// Adds a boolean field (`value` non-zero: true).
///
/// # Safety
/// As `ferry_record_add_tensor`.
#[no_mangle]
pub unsafe extern "C" fn ferry_record_add_bool(
    w: *mut ferry_record_writer,
    name: *const c_char,
    value: i32,
) -> i32 {
    // SAFETY: per the contract.
    guard(|| unsafe { add_copy(w, name, record::KIND_BOOL, &[(value != 0) as u8]) })
}

/// Publishes the typed record `w` wrote (every field it was begun with
/// must have been added), with `meta` and `key` as `ferry_producer_publish`.
///
/// # Safety
/// `producer` is a live handle; `w` a writer from `ferry_record_begin` on
/// one of its reserved slots; `meta`, `key` as for `ferry_producer_publish`.
#[no_mangle]
pub unsafe extern "C" fn ferry_producer_publish_record(
    producer: *mut ferry_producer,
    w: *const ferry_record_writer,
    meta: *const c_void,
    meta_len: u32,
    key: *const u64,
) -> i32 {
    guard(|| {
        // SAFETY: per the contract.
        let (Some(p), Some(w)) = (unsafe { producer.as_ref() }, unsafe { w.as_ref() }) else {
            return invalid("producer or w is NULL");
        };
        if meta.is_null() && meta_len > 0 {
            return invalid("meta is NULL but meta_len is not 0");
        }
        let meta: &[u8] = if meta_len == 0 {
            &[]
        } else {
            // SAFETY: valid for meta_len bytes per the contract.
            unsafe { std::slice::from_raw_parts(meta.cast::<u8>(), meta_len as usize) }
        };
        // SAFETY: key is NULL or valid per the contract.
        let key = unsafe { key.as_ref() }.copied();
        locked(&p.inner, |p| {
            p.publish_record(w._slot, &writer_of(w), meta, key)
        })
    })
}

/// Runs `f` on the checked fields of `batch`, after the checks every
/// field call shares (NULL arguments, the handle's lock, the batch being a
/// held, well-formed record).
///
/// # Safety
/// `consumer` is NULL or a live handle; `batch` NULL or valid.
unsafe fn with_fields(
    consumer: *mut ferry_consumer,
    batch: *const ferry_batch,
    out_null: bool,
    f: impl FnOnce(&[record::Field], &ferry_batch) -> i32,
) -> i32 {
    // SAFETY: per the contract.
    let (Some(c), Some(b)) = (unsafe { consumer.as_ref() }, unsafe { batch.as_ref() }) else {
        return invalid("consumer or batch is NULL");
    };
    if out_null {
        return invalid("the output pointer is NULL");
    }
    let c = match c.inner.lock() {
        Ok(g) => g,
        Err(_) => return fail_poisoned(),
    };
    match c.fields(b.token) {
        Ok(fields) => f(fields, b),
        Err(e) => fail(e),
    }
}

/// The number of fields of a typed record batch. FERRY_E_INVALID_ARGUMENT
/// for a plain batch, FERRY_E_PROTOCOL for a malformed record (the message
/// says what is wrong), FERRY_E_NOT_HELD for a released one.
///
/// # Safety
/// `consumer` is a live handle; `batch` one of its batches; `count` valid.
#[no_mangle]
pub unsafe extern "C" fn ferry_batch_field_count(
    consumer: *mut ferry_consumer,
    batch: *const ferry_batch,
    count: *mut u32,
) -> i32 {
    // SAFETY: per the contract; `count` is checked non-NULL first.
    guard(|| unsafe {
        with_fields(consumer, batch, count.is_null(), |f, _| {
            *count = f.len() as u32;
            FERRY_OK
        })
    })
}

fn field_view(b: &ferry_batch, f: &record::Field) -> ferry_field {
    let on_gpu = b.data.is_null() && b.device_data != 0;
    ferry_field {
        name: f.name.as_ptr(),
        kind: f.kind as u32,
        dtype: f.dtype as u32,
        ndim: f.ndim as u32,
        big_endian: f.big_endian as u32,
        // In range: parse checked offset + len <= the batch's len.
        data: if on_gpu {
            std::ptr::null()
        } else {
            b.data.wrapping_add(f.offset as usize)
        },
        device_data: if on_gpu { b.device_data + f.offset } else { 0 },
        len: f.len,
        offset: f.offset,
        shape: f.shape,
        strides: f.strides,
        int_value: f.int_value,
        float_value: f.float_value,
    }
}

/// Field `index` of a typed record batch (see `ferry_batch_field_count`
/// for the errors; FERRY_E_INVALID_ARGUMENT past the last field).
///
/// # Safety
/// As `ferry_batch_field_count`; `out` valid.
#[no_mangle]
pub unsafe extern "C" fn ferry_batch_field(
    consumer: *mut ferry_consumer,
    batch: *const ferry_batch,
    index: u32,
    out: *mut ferry_field,
) -> i32 {
    // SAFETY: per the contract; `out` is checked non-NULL first.
    guard(|| unsafe {
        with_fields(consumer, batch, out.is_null(), |f, b| {
            match f.get(index as usize) {
                Some(field) => {
                    *out = field_view(b, field);
                    FERRY_OK
                }
                None => invalid(&format!("field {index} of a record of {} fields", f.len())),
            }
        })
    })
}

/// The field named `name` of a typed record batch
/// (FERRY_E_INVALID_ARGUMENT when it has none of that name).
///
/// # Safety
/// As `ferry_batch_field`; `name` NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn ferry_batch_field_by_name(
    consumer: *mut ferry_consumer,
    batch: *const ferry_batch,
    name: *const c_char,
    out: *mut ferry_field,
) -> i32 {
    guard(|| {
        // SAFETY: per the contract.
        let name = match unsafe { field_name(name) } {
            Ok(n) => n,
            Err(c) => return c,
        };
        // SAFETY: per the contract; `out` is checked non-NULL first.
        unsafe {
            with_fields(consumer, batch, out.is_null(), |f, b| {
                match f.iter().find(|x| x.name.as_bytes() == name.as_bytes()) {
                    Some(field) => {
                        *out = field_view(b, field);
                        FERRY_OK
                    }
                    None => invalid(&format!("the record has no field named {name:?}")),
                }
            })
        }
    })
}

/// Runs `f` on the object behind `m` and turns its result into a status.
fn locked<T>(m: &Mutex<T>, f: impl FnOnce(&mut T) -> crate::client::Result<()>) -> i32 {
    match m.lock() {
        Ok(mut g) => match f(&mut g) {
            Ok(()) => FERRY_OK,
            Err(e) => fail(e),
        },
        Err(_) => fail_poisoned(),
    }
}

fn fail_poisoned() -> i32 {
    set_last_error("handle is unusable after an earlier internal error");
    Status::Internal as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_match_the_rust_enum() {
        assert_eq!(Status::Timeout.describe(), "timed out");
        assert_eq!(Status::Timeout as i32, FERRY_E_TIMEOUT);
        assert_eq!(Status::NotHeld as i32, FERRY_E_NOT_HELD);
        assert_eq!(Status::Internal as i32, FERRY_E_INTERNAL);
        assert_eq!(Status::Unsupported as i32, FERRY_E_UNSUPPORTED);
        assert_eq!(Status::EndOfEpoch as i32, FERRY_E_END_OF_EPOCH);
        for code in 0..=FERRY_E_END_OF_EPOCH {
            // SAFETY (test): static NUL-terminated strings.
            let s = unsafe { CStr::from_ptr(ferry_status_str(code)) }
                .to_str()
                .unwrap();
            assert_ne!(s, "unknown status code", "code {code}");
        }
    }

    #[test]
    fn panics_become_internal_errors() {
        let code = guard(|| panic!("boom"));
        assert_eq!(code, FERRY_E_INTERNAL);
        // SAFETY (test): ferry_last_error returns a live C string.
        let msg = unsafe { CStr::from_ptr(ferry_last_error()) }
            .to_str()
            .unwrap()
            .to_string();
        assert!(msg.contains("boom"), "{msg}");
    }

    #[test]
    fn not_running_names_the_socket() {
        let mut out: *mut ferry_client = std::ptr::null_mut();
        let path = CString::new("/nonexistent/ferry/ferryd.sock").unwrap();
        // SAFETY (test): valid string and out pointer.
        let code = unsafe { ferry_client_connect(path.as_ptr(), &mut out) };
        assert_eq!(code, FERRY_E_NOT_RUNNING);
        assert!(out.is_null(), "out written only on success");
        // SAFETY (test): ferry_last_error returns a live C string.
        let msg = unsafe { CStr::from_ptr(ferry_last_error()) }
            .to_str()
            .unwrap()
            .to_string();
        assert!(msg.contains("/nonexistent/ferry/ferryd.sock"), "{msg}");
        // SAFETY (test): NULL is accepted.
        unsafe { ferry_client_free(std::ptr::null_mut()) };
    }
}

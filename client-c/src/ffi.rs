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
use ferry_shm::proto::StreamSpec;

/// Version of this C ABI (struct layouts, signatures). Bumped on any
/// incompatible change; bindings compare it with `ferry_abi_version()`.
pub const FERRY_ABI_VERSION: u32 = 3;

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

/// Configuration of a stream a producer may create.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ferry_stream_config {
    pub partitions: u32,
    pub slot_count: u32,
    /// Bytes per slot (largest batch).
    pub slot_size: u64,
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
    pub _reserved: u32,
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
        let mut p = match p.inner.lock() {
            Ok(g) => g,
            Err(_) => return fail_poisoned(),
        };
        match p.publish(slot.slot, len, meta, key) {
            Ok(()) => FERRY_OK,
            Err(e) => fail(e),
        }
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
                        _reserved: 0,
                    }
                };
                FERRY_OK
            }
            Err(e) => fail(e),
        }
    })
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
        let mut c = match c.inner.lock() {
            Ok(g) => g,
            Err(_) => return fail_poisoned(),
        };
        match c.release(b.token) {
            Ok(()) => FERRY_OK,
            Err(e) => fail(e),
        }
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
        let mut c = match c.inner.lock() {
            Ok(g) => g,
            Err(_) => return fail_poisoned(),
        };
        match c.commit() {
            Ok(()) => FERRY_OK,
            Err(e) => fail(e),
        }
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
        let mut c = match c.inner.lock() {
            Ok(g) => g,
            Err(_) => return fail_poisoned(),
        };
        match c.seek(partition, offset) {
            Ok(()) => FERRY_OK,
            Err(e) => fail(e),
        }
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
        for code in 0..=FERRY_E_UNSUPPORTED {
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

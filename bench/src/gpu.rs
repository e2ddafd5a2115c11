//! `ferry-bench gpu`: staged host-to-GPU delivery through ferryd against
//! the host's own limit, a pinned-memory host-to-device copy of the same
//! size in the same run.
//!
//! Cases:
//! - `staged_delivery_{1MiB,16MiB}`: a producer process publishes batches
//!   (written once per slot, then only stamped, so that the producer's CPU
//!   is not what is measured); ferryd copies each into the GPU pool of a
//!   consumer process that asked for `cuda:0`; the consumer releases each
//!   batch once it has it. GiB/s from the first batch's arrival on.
//!   Baseline `pinned_h2d_copy`: the same bytes from page-locked host memory
//!   to device memory with cuMemcpyHtoDAsync, four copies in flight on one
//!   stream, in this process.
//!
//! Needs a CUDA driver and a GPU (on a machine without one it says so and
//! fails); `--smoke` runs against whatever driver is present, which in
//! scripts/test.sh is the fake one in tests/fakecuda.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::{Client, ConsumerOptions, StreamSpec};

use crate::{emit_for, me, run_millis, run_pair, start_daemon, Res, END, MIN_BATCHES};

const SLOTS: u32 = 16;
const PREFETCH: u32 = 8;

pub(crate) fn bench_gpu(quick: bool, smoke: bool, ferryd: Option<PathBuf>) -> Res<()> {
    let probe =
        ferry_cuda::probe().map_err(|e| format!("ferry-bench gpu needs a CUDA GPU: {e}"))?;
    let gpu0 = probe
        .gpus
        .first()
        .ok_or("ferry-bench gpu needs a CUDA GPU: the driver reports none")?;
    eprintln!(
        "ferry-bench gpu: {} ({}), driver {}",
        gpu0.name, gpu0.pci_bus_id, probe.driver_version
    );
    let millis = run_millis(quick, smoke);
    let ferryd = ferryd.unwrap_or_else(|| me().with_file_name("ferryd"));
    let d = start_daemon(&ferryd, 100, "")?;
    for (name, size) in [("1MiB", 1u64 << 20), ("16MiB", 16 << 20)] {
        let baseline = pinned_h2d(size as usize, millis)?;
        let stream = format!("gpu-{name}");
        let client = Client::connect(Some(&d.socket))?;
        let p = client.producer(
            &stream,
            Some(StreamSpec {
                durability: Default::default(),
                partitions: 1,
                slot_size: size,
                slot_count: SLOTS,
            }),
        )?;
        let sock = d.socket.display().to_string();
        let reader = ["gpu-consume".to_string(), sock.clone(), stream.clone()];
        let writer = [
            "gpu-produce".to_string(),
            sock,
            stream.clone(),
            size.to_string(),
            millis.to_string(),
        ];
        let report = run_pair(&reader, &writer, move || drop(p))?;
        let gib = report["bytes"].as_f64().unwrap_or(0.0)
            / report["secs"].as_f64().unwrap_or(1.0).max(1e-9)
            / (1u64 << 30) as f64;
        emit_for(
            "gpu",
            &format!("staged_delivery_{name}"),
            "GiB/s",
            gib,
            "pinned_h2d_copy",
            baseline,
        );
    }
    Ok(())
}

/// GiB/s of pinned host -> device copies of `size` bytes, four in flight.
fn pinned_h2d(size: usize, millis: u64) -> Res<f64> {
    use ferry_cuda::Mem;
    let gpu = ferry_cuda::Gpu::open(0)?;
    let depth = 4;
    let mut host = gpu.alloc_pinned(size * depth)?;
    host.as_mut_slice().fill(0x5A);
    let host = Mem::Pinned(Arc::new(host));
    let dev = Mem::Device(Arc::new(gpu.alloc(size * depth)?));
    let stream = gpu.stream()?;
    // Warm up (first-touch and driver set-up costs).
    stream.copy(&dev, 0, &host, 0, size)?.wait()?;
    let mut inflight = std::collections::VecDeque::new();
    let start = Instant::now();
    let until = start + Duration::from_millis(millis);
    let mut copies = 0u64;
    while Instant::now() < until || copies < MIN_BATCHES {
        if inflight.len() == depth {
            let e: ferry_cuda::Event = inflight.pop_front().expect("non-empty");
            e.wait()?;
        }
        let i = (copies as usize) % depth;
        inflight.push_back(stream.copy(&dev, i * size, &host, i * size, size)?);
        copies += 1;
    }
    for e in inflight {
        e.wait()?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(copies as f64 * size as f64 / secs / (1u64 << 30) as f64)
}

/// The producer process: publishes `size`-byte batches for `millis`.
pub(crate) fn produce(socket: &Path, stream: &str, size: u64, millis: u64) -> Res<()> {
    let client = Client::connect(Some(socket))?;
    let mut p = client.producer(stream, None)?;
    let mut written = std::collections::HashSet::new();
    let end = Instant::now() + Duration::from_millis(millis);
    let mut seq = 0u64;
    while Instant::now() < end || seq < MIN_BATCHES {
        let slot = p.reserve(Some(Duration::from_secs(30)))?;
        // SAFETY: the reserved slot is ours for `capacity` (= size) bytes
        // until published.
        let buf = unsafe { std::slice::from_raw_parts_mut(slot.ptr, size as usize) };
        if written.insert(slot.slot) {
            buf.fill(0xA5);
        }
        buf[..8].copy_from_slice(&seq.to_le_bytes());
        p.publish(slot.slot, size, &seq.to_le_bytes(), None)?;
        seq += 1;
    }
    let slot = p.reserve(Some(Duration::from_secs(30)))?;
    p.publish(slot.slot, 0, END, None)?;
    Ok(())
}

/// The consumer process: GPU delivery into cuda:0; prints "ready", then a
/// JSON report of bytes and seconds from the first batch on.
pub(crate) fn consume(socket: &Path, stream: &str) -> Res<()> {
    let client = Client::connect(Some(socket))?;
    let mut c = client.consumer(
        stream,
        "bench",
        ConsumerOptions {
            prefetch: PREFETCH,
            device: Some(0),
            ..Default::default()
        },
    )?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut first: Option<Instant> = None;
    let (mut bytes, mut count) = (0u64, 0u64);
    loop {
        let b = c.next(Some(Duration::from_secs(30)))?;
        // SAFETY: held until the release below.
        if unsafe { b.meta() } == END {
            c.release(b.token)?;
            break;
        }
        if b.device_data == 0 {
            return Err("a batch arrived outside GPU memory".into());
        }
        if first.is_some() {
            bytes += b.len;
        }
        first.get_or_insert_with(Instant::now);
        count += 1;
        c.release(b.token)?;
    }
    let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(0.0);
    println!(
        "{}",
        serde_json::json!({"count": count, "bytes": bytes, "secs": secs})
    );
    Ok(())
}

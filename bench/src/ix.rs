//! The hand-off and 1 MiB cases through iceoryx2 publish-subscribe (built
//! with `--features iceoryx2`): a publisher process and a subscriber
//! process, no daemon in between.

use std::time::{Duration, Instant};

use iceoryx2::prelude::*;

use crate::{monotonic_ns, Res, END, MIN_BATCHES};

fn service_name(tag: &str) -> String {
    format!("ferry-bench/{}/{tag}", std::process::id())
}

type Service =
    iceoryx2::service::port_factory::publish_subscribe::PortFactory<ipc::Service, [u8], ()>;

fn open(name: &str) -> Res<(Node<ipc::Service>, Service)> {
    // Without a config file iceoryx2 warns that it uses its defaults.
    set_log_level(LogLevel::Error);
    let node = NodeBuilder::new().create::<ipc::Service>()?;
    let svc = node
        .service_builder(&name.try_into()?)
        .publish_subscribe::<[u8]>()
        .enable_safe_overflow(false)
        .subscriber_max_buffer_size(8)
        .max_publishers(1)
        .max_subscribers(1)
        .open_or_create()?;
    Ok((node, svc))
}

/// Subscriber process: busy-polls, records latency (first 8 bytes are the
/// publish timestamp) and touches every byte; prints a JSON report.
pub fn sub(name: &str) -> Res<()> {
    let (_node, svc) = open(name)?;
    let subscriber = svc.subscriber_builder().create()?;
    println!("ready");
    use std::io::Write;
    std::io::stdout().flush()?;
    let mut rec = crate::Recorder::default();
    let give_up = Instant::now() + Duration::from_secs(120);
    loop {
        let Some(sample) = subscriber.receive()? else {
            if Instant::now() > give_up {
                return Err("iceoryx2 subscriber: no END marker".into());
            }
            std::hint::spin_loop();
            continue;
        };
        let now = monotonic_ns();
        let data = sample.payload();
        if data == END {
            break;
        }
        rec.record(now, u64::from_le_bytes(data[..8].try_into()?), data);
    }
    println!("{}", rec.report());
    Ok(())
}

/// Publisher process: generates each sample in place (loaned memory), puts
/// the timestamp in its first 8 bytes, sends, then sleeps `pace_us`.
pub fn publish(name: &str, size: usize, millis: u64, pace_us: u64) -> Res<()> {
    let (_node, svc) = open(name)?;
    let publisher = svc
        .publisher_builder()
        .initial_max_slice_len(size.max(END.len()))
        .backpressure_strategy(BackpressureStrategy::RetryUntilDelivered)
        .create()?;
    let end = Instant::now() + Duration::from_millis(millis);
    let mut seq = 0u64;
    while Instant::now() < end || seq < MIN_BATCHES {
        let mut sample = publisher.loan_slice_uninit(size)?;
        // Same generation work as the other transports (a fill with the
        // sequence number, as `generate` does: one memset), then the
        // timestamp.
        let payload = sample.payload_mut();
        // SAFETY: `payload` is `size` loaned bytes, ours until sent;
        // writing every one of them initialises the whole sample.
        unsafe { std::ptr::write_bytes(payload.as_mut_ptr(), seq as u8, payload.len()) };
        // SAFETY: every byte was written just above.
        let mut sample = unsafe { sample.assume_init() };
        let buf = sample.payload_mut();
        buf[..8].copy_from_slice(&monotonic_ns().to_le_bytes());
        if sample.send()? == 0 && seq == 0 {
            // Not connected yet: retry the first sample.
            continue;
        }
        seq += 1;
        if pace_us > 0 {
            std::thread::sleep(Duration::from_micros(pace_us));
        }
    }
    let sample = publisher.loan_slice_uninit(END.len())?;
    sample.write_from_slice(END).send()?;
    Ok(())
}

/// Runs a publisher and a subscriber process; returns the subscriber's report.
pub fn run(tag: &str, size: usize, millis: u64, pace_us: u64) -> Res<serde_json::Value> {
    let name = service_name(tag);
    let reader = ["ix-sub".to_string(), name.clone()];
    let writer = [
        "ix-pub".to_string(),
        name,
        size.to_string(),
        millis.to_string(),
        pace_us.to_string(),
    ];
    crate::run_pair(&reader, &writer, || {})
}

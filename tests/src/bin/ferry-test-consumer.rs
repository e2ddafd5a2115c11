//! A consumer process for tests that kill consumers: joins a group, takes
//! `count` batches without releasing them, prints "held P:O" for each, then
//! waits to be killed. An optional fifth argument names the device
//! ("cuda:0") to deliver into.

use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (socket, stream, group, count) = (
        &args[1],
        &args[2],
        &args[3],
        args[4].parse::<usize>().unwrap(),
    );
    let client = ferry::Client::connect(Some(std::path::Path::new(socket))).expect("connect");
    let mut c = client
        .consumer(
            stream,
            group,
            ferry::ConsumerOptions {
                prefetch: count as u32,
                device: ferry::client::parse_device(args.get(5).map_or("cpu", |s| s.as_str()))
                    .expect("device"),
                ..Default::default()
            },
        )
        .expect("consumer");
    for _ in 0..count {
        let b = c.next(Some(Duration::from_secs(10))).expect("batch");
        println!("held {}:{}", b.partition, b.offset);
    }
    println!("ready");
    std::thread::sleep(Duration::from_secs(600));
}

//! Operating ferryd: the admin HTTP endpoint (`/metrics`, `/live`,
//! `/ready`) under real traffic and scraped by a real Prometheus server,
//! and systemd's notify protocol (READY, STATUS, WATCHDOG from the loop,
//! STOPPING) against a real notify socket, a wedged loop included.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_admin::{Request, Response};
use ferry_tests::{eventually, free_port, http_get, Daemon, HonestPair};

/// The value of sample `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn http_daemon(port: u16, extra: &str) -> Daemon {
    Daemon::start(
        "",
        &format!("[admin]\nhttp = \"127.0.0.1:{port}\"\ndebug_requests = true\n{extra}"),
    )
}

/// Asks the loop to sleep `ms` (on a thread: the answer comes after).
fn stall(d: &Daemon, ms: u64) -> std::thread::JoinHandle<String> {
    let admin = d.admin.clone();
    std::thread::spawn(
        move || match ferry_admin::request(&admin, &Request::DebugStall { ms }) {
            Ok(Response::Ok(s)) => s,
            other => panic!("debug-stall: {other:?}"),
        },
    )
}

#[test]
fn metrics_count_real_traffic_and_live_turns_false_while_the_loop_is_wedged() {
    let port = free_port();
    let d = http_daemon(port, "");
    let addr = format!("127.0.0.1:{port}");
    let pair = HonestPair::start(&d, "honest", "g");
    assert!(
        pair.wait_progress(64, Duration::from_secs(20)),
        "{}",
        d.log()
    );
    let (code, text) = http_get(&addr, "/metrics").unwrap();
    assert_eq!(code, 200, "{text}");
    let published = sample(
        &text,
        r#"ferry_stream_published_batches_total{stream="honest"}"#,
    )
    .unwrap_or_else(|| panic!("{text}"));
    assert!(published >= 64.0, "{text}");
    let delivered = sample(
        &text,
        r#"ferry_stream_delivered_batches_total{stream="honest"}"#,
    )
    .unwrap();
    assert!(delivered >= 64.0 && delivered <= published, "{text}");
    let bytes = sample(
        &text,
        r#"ferry_stream_published_bytes_total{stream="honest"}"#,
    )
    .unwrap();
    assert!(
        bytes >= published,
        "each honest batch has a payload: {text}"
    );
    let timed = sample(
        &text,
        r#"ferry_stream_delivery_latency_seconds_count{stream="honest",path="local"}"#,
    )
    .unwrap();
    assert!(
        timed >= 1.0 && timed <= delivered,
        "one batch in 16 is timed: {text}"
    );
    assert_eq!(
        sample(&text, r#"ferry_group_members{stream="honest",group="g"}"#),
        Some(1.0),
        "{text}"
    );
    assert!(sample(
        &text,
        r#"ferry_group_lag_batches{stream="honest",group="g",partition="1"}"#
    )
    .is_some());
    assert_eq!(http_get(&addr, "/live").unwrap(), (200, "live\n".into()));
    assert_eq!(http_get(&addr, "/ready").unwrap(), (200, "ready\n".into()));
    assert_eq!(http_get(&addr, "/nothing").unwrap().0, 404);

    // A loop that does not turn: /live says so (while the HTTP side still
    // answers), /metrics gives up on it, and both recover after.
    let turns = sample(&text, "ferry_daemon_loop_turns_total").unwrap();
    // (Under the admin socket's 5 s answer timeout.)
    let wedge = stall(&d, 4500);
    // Asked while the loop sleeps: given up on after 2 s.
    std::thread::sleep(Duration::from_millis(200));
    let (code, body) = http_get(&addr, "/metrics").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("did not answer"), "{body}");
    // By now (2.2 s) the loop has not turned for longer than /live allows.
    assert!(
        eventually(Duration::from_millis(1500), || {
            http_get(&addr, "/live").is_ok_and(|(c, b)| c == 503 && b.contains("has not turned"))
        }),
        "/live still says live while the loop sleeps"
    );
    assert_eq!(http_get(&addr, "/ready").unwrap().0, 503);
    wedge.join().unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        http_get(&addr, "/live").is_ok_and(|(c, _)| c == 200)
    }));
    let (_, text) = http_get(&addr, "/metrics").unwrap();
    assert!(sample(&text, "ferry_daemon_loop_turns_total").unwrap() > turns);
    pair.finish().assert_clean();
}

#[test]
fn ready_waits_for_peers_that_are_not_up() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("ferry-ready-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = ferry_tests::secret_file(&dir, "secret", "a cluster secret for the tests");
    let ports = [free_port(), free_port()];
    let cluster = ferry_tests::cluster_table(0, &ports, &secret, "");
    let d = http_daemon(port, &cluster);
    let addr = format!("127.0.0.1:{port}");
    // Its one peer never comes.
    let (code, body) = http_get(&addr, "/ready").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("peer(s) not up: n1"), "{body}");
    assert_eq!(http_get(&addr, "/live").unwrap().0, 200);
    let (_, text) = http_get(&addr, "/metrics").unwrap();
    assert_eq!(
        sample(&text, r#"ferry_peer_up{peer="n1"}"#),
        Some(0.0),
        "{text}"
    );
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn batches_that_cross_hosts_show_in_both_daemons_metrics() {
    let dir = std::env::temp_dir().join(format!("ferry-xmetrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = ferry_tests::secret_file(&dir, "secret", "a cluster secret for the tests");
    let ports = [free_port(), free_port()];
    let http = [free_port(), free_port()];
    let d: Vec<Daemon> = (0..2)
        .map(|i| {
            let stream = if i == 0 {
                "[[streams]]\nname = \"s0\"\nslot_size = 4096\nslot_count = 8\n"
            } else {
                ""
            };
            Daemon::start(
                "",
                &format!(
                    "{stream}[admin]\nhttp = \"127.0.0.1:{}\"\n{}",
                    http[i],
                    ferry_tests::cluster_table(i, &ports, &secret, "")
                ),
            )
        })
        .collect();
    let addr = |i: usize| format!("127.0.0.1:{}", http[i]);
    assert!(eventually(Duration::from_secs(10), || {
        http_get(&addr(1), "/ready").is_ok_and(|(c, _)| c == 200)
    }));
    assert!(eventually(Duration::from_secs(10), || d[1]
        .status()
        .peers
        .iter()
        .any(|p| p.streams.iter().any(|s| s == "s0"))));
    let far = d[1].client();
    let mut k = far.consumer("s0", "g", Default::default()).unwrap();
    let near = d[0].client();
    let mut p = near.producer("s0", None).unwrap();
    for i in 0..64u64 {
        p.send(&i.to_le_bytes(), b"", None, Some(Duration::from_secs(5)))
            .unwrap();
        let b = k.next(Some(Duration::from_secs(5))).unwrap();
        k.release(b.token).unwrap();
    }
    let (_, home) = http_get(&addr(0), "/metrics").unwrap();
    let s = |text: &str, series: &str| {
        sample(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert!(
        s(
            &home,
            r#"ferry_stream_delivery_latency_seconds_count{stream="s0",path="remote"}"#
        ) >= 4.0,
        "64 batches, one in 16 timed"
    );
    assert!(
        s(
            &home,
            r#"ferry_fabric_write_latency_seconds_count{peer="n1"}"#
        ) >= 4.0
    );
    // A header, the payload (no metadata) per batch.
    assert!(
        s(
            &home,
            r#"ferry_fabric_operations_total{peer="n1",op="write"}"#
        ) >= 128.0
    );
    assert!(s(&home, r#"ferry_fabric_write_bytes_total{peer="n1"}"#) >= 64.0 * 8.0);
    assert_eq!(s(&home, r#"ferry_fabric_errors_total{peer="n1"}"#), 0.0);
    assert!(sample(&home, r#"ferry_peer_credits_outstanding{peer="n1"}"#).is_some());
    assert_eq!(s(&home, r#"ferry_peer_up{peer="n1"}"#), 1.0);
    let (_, far_text) = http_get(&addr(1), "/metrics").unwrap();
    assert!(
        s(
            &far_text,
            r#"ferry_fabric_operations_total{peer="n0",op="receive"}"#
        ) >= 64.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The datagrams a notify socket received until `until`.
fn notifications(sock: &UnixDatagram, until: Instant) -> Vec<(Instant, String)> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                for line in String::from_utf8_lossy(&buf[..n]).lines() {
                    out.push((Instant::now(), line.to_string()));
                }
            }
            Err(_) => break,
        }
    }
    out
}

#[test]
fn systemd_hears_ready_status_watchdog_pings_from_the_loop_and_stopping() {
    let dir = std::env::temp_dir().join(format!("ferry-notify-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut d = Daemon::start_with_env(
        "",
        "[admin]\ndebug_requests = true\n",
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            // Pings every 100 ms.
            ("WATCHDOG_USEC", "300000"),
        ],
    );
    let heard = notifications(&sock, Instant::now() + Duration::from_millis(1500));
    let lines: Vec<&str> = heard.iter().map(|(_, l)| l.as_str()).collect();
    assert!(lines.contains(&"READY=1"), "{lines:?}\n{}", d.log());
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.contains("streams")),
        "{lines:?}"
    );
    let pings = lines.iter().filter(|l| **l == "WATCHDOG=1").count();
    assert!(pings >= 3, "{pings} watchdog pings in 1.5 s: {lines:?}");

    // A wedged loop stops the pings (the other threads are fine)...
    let wedge = stall(&d, 2000);
    let start = Instant::now();
    let heard = notifications(&sock, start + Duration::from_millis(1800));
    let during: Vec<_> = heard
        .iter()
        .filter(|(t, l)| l == "WATCHDOG=1" && *t > start + Duration::from_millis(300))
        .collect();
    assert!(during.is_empty(), "pings while the loop slept: {during:?}");
    wedge.join().unwrap();
    // ...and they come back with it.
    let heard = notifications(&sock, Instant::now() + Duration::from_millis(1000));
    assert!(
        heard.iter().any(|(_, l)| l == "WATCHDOG=1"),
        "no ping after the loop woke: {heard:?}"
    );

    d.signal(libc::SIGTERM);
    let heard = notifications(&sock, Instant::now() + Duration::from_secs(3));
    assert!(
        heard.iter().any(|(_, l)| l == "STOPPING=1"),
        "{heard:?}\n{}",
        d.log()
    );
    assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0), "{}", d.log());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn debug_requests_are_refused_unless_enabled() {
    let d = Daemon::start("", "");
    match ferry_admin::request(&d.admin, &Request::DebugStall { ms: 10 }) {
        Err(ferry_admin::AdminError::Refused(e)) => {
            assert!(e.contains("debug_requests = true"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

/// Percent-encodes a query for a URL.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus server, killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("prometheus is not installed (Debian package prometheus; scripts/setup.sh installs it)");
        let dir = std::env::temp_dir().join(format!("ferry-prom-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: ferry\n    static_configs:\n      - targets: ['{target}']\n"
        );
        std::fs::write(dir.join("prometheus.yml"), cfg).unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus");
        let p = Prometheus { child, addr, dir };
        assert!(
            eventually(Duration::from_secs(30), || {
                http_get(&p.addr, "/-/ready").is_ok_and(|(c, _)| c == 200)
            }),
            "prometheus did not become ready:\n{}",
            p.log()
        );
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// The values of an instant query's result vector.
    fn query(&self, q: &str) -> Vec<(serde_json::Value, f64)> {
        let Ok((200, body)) = http_get(
            &self.addr,
            &format!("/api/v1/query?query={}", url_encode(q)),
        ) else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                let x = r["value"][1].as_str()?.parse().ok()?;
                Some((r["metric"].clone(), x))
            })
            .collect()
    }

    /// Whether Prometheus accepts `q` (its answer when not).
    fn accepts(&self, q: &str) -> Result<(), String> {
        let (code, body) = http_get(
            &self.addr,
            &format!("/api/v1/query?query={}", url_encode(q)),
        )
        .map_err(|e| e.to_string())?;
        if code == 200 && body.contains(r#""status":"success""#) {
            Ok(())
        } else {
            Err(format!("{code}: {body}"))
        }
    }

    /// Waits (at most 30 s) until `q` has a result with a value for which
    /// `ok` holds; returns it.
    fn wait_for(&self, q: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let mut last = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            last = self.query(q);
            if let Some((_, v)) = last.iter().find(|(_, v)| ok(*v)) {
                return *v;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "prometheus: {q} never gave a fitting value; last {last:?}\n{}",
            self.log()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_real_prometheus_scrapes_the_rates_and_the_lag() {
    let port = free_port();
    let d = http_daemon(port, "");
    let prom = Prometheus::start(&format!("127.0.0.1:{port}"));
    let pair = HonestPair::start(&d, "honest", "g");
    prom.wait_for(r#"up{job="ferry"}"#, |v| v == 1.0);
    let rate = prom.wait_for(
        r#"rate(ferry_stream_published_batches_total{stream="honest"}[5s])"#,
        |v| v > 0.0,
    );
    // The honest producer sleeps 1 ms between batches: at most ~1000/s.
    assert!(rate < 2000.0, "{rate} batches/s");
    prom.wait_for(
        r#"rate(ferry_stream_delivered_bytes_total{stream="honest"}[5s])"#,
        |v| v > 0.0,
    );
    prom.wait_for(
        r#"histogram_quantile(0.99, sum by (le) (rate(ferry_stream_delivery_latency_seconds_bucket{stream="honest"}[10s])))"#,
        |v| v > 0.0 && v < 10.0,
    );
    // A consumer that stops taking: the producer fills the pool, the lag
    // is what it holds, and publishing stops.
    pair.pause(true);
    let lag = prom.wait_for(
        r#"ferry_group_lag_total_batches{stream="honest",group="g"}"#,
        |v| v >= 8.0,
    );
    assert!(lag <= 16.0 + 1.0, "lag {lag} beyond the 16 slots");
    prom.wait_for(
        r#"rate(ferry_stream_published_batches_total{stream="honest"}[3s])"#,
        |v| v == 0.0,
    );
    pair.pause(false);
    prom.wait_for(
        r#"ferry_group_lag_total_batches{stream="honest",group="g"}"#,
        |v| v < 8.0,
    );
    // Every query of the shipped dashboard is one this Prometheus runs.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/ferry.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut n = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let q = t["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".*")
                .replace("$stream", ".*")
                .replace("$__rate_interval", "5s");
            if let Err(e) = prom.accepts(&q) {
                panic!("panel {:?}: {q}: {e}", panel["title"]);
            }
            n += 1;
        }
    }
    assert!(n >= 14, "{n} queries");
    // And its latency panel has data from this run.
    prom.wait_for(
        r#"histogram_quantile(0.5, sum by (le, instance, stream, path) (rate(ferry_stream_delivery_latency_seconds_bucket{stream="honest"}[10s])))"#,
        |v| v > 0.0,
    );
    pair.finish().assert_clean();
}

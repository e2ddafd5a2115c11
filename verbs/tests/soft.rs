//! The fabric conformance suite on the soft (TCP) backend.

mod conformance;

conformance_suite!(ferry_verbs::soft::SoftProvider::default());

/// Dials a soft domain as a hand-made peer (qpn 0) of its endpoint `qpn`,
/// saying the hello a real soft endpoint says.
fn fake_peer(target: std::net::SocketAddr, qpn: u32) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(target).unwrap();
    let mut hello = Vec::new();
    hello.extend_from_slice(&0x5346_4552u32.to_le_bytes());
    hello.extend_from_slice(&qpn.to_le_bytes());
    hello.extend_from_slice(&0u32.to_le_bytes());
    s.write_all(&hello).unwrap();
    s
}

/// The info of a peer that dials us: port 1 sorts below any ephemeral
/// port, so our endpoint waits for it instead of dialing.
fn dialing_peer() -> EndpointInfo {
    EndpointInfo {
        gid: [0; 16],
        qpn: 0,
        psn: 0,
        mtu: 4096,
        addr: Some("127.0.0.1:1".parse().unwrap()),
    }
}

#[test]
fn soft_peer_that_never_answers_times_out() {
    // A "peer" that connects, says hello, and then never answers: the
    // request must fail with RetryExceeded after the endpoint's timeout.
    use std::io::Read;
    let p = ferry_verbs::soft::SoftProvider::default();
    let dom = p.open("soft0").unwrap();
    let cq = dom.create_cq(16).unwrap();
    let mut c = cfg();
    c.timeout = Duration::from_millis(500);
    let pending = dom.endpoint(&c, &cq, &cq).unwrap();
    let mine = pending.info();
    // Port 1 sorts below any ephemeral port, so this peer is the one that
    // dials, and we wait for it.
    let silent = dialing_peer();
    let target = mine.addr.unwrap();
    let my_qpn = mine.qpn;
    let holder = std::thread::spawn(move || {
        let mut s = fake_peer(target, my_qpn);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let ep = pending.connect(&silent).unwrap();
    let mut buf = vec![0u8; 64];
    let mr = unsafe { dom.register(buf.as_mut_ptr(), 64, access::ALL) }.unwrap();
    let sge = [mr.sge(0, 8)];
    let start = std::time::Instant::now();
    unsafe {
        ep.post_send(&SendWr {
            wr_id: 1,
            op: SendOp::Write {
                remote_addr: 0,
                rkey: 0,
                imm: None,
            },
            sges: &sge,
            signaled: true,
        })
        .unwrap()
    };
    let c = next(&*cq);
    assert_eq!((c.wr_id, c.status), (1, WcStatus::RetryExceeded));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    drop(ep);
    holder.join().unwrap();
    drop(mr);
    drop(buf);
}

#[test]
fn malformed_frame_closes_the_connection_with_an_error() {
    // A peer that sends garbage instead of a frame header: pending work
    // fails (no panic, no hang) and the endpoint refuses new work.
    use std::io::Write;
    let p = ferry_verbs::soft::SoftProvider::default();
    let dom = p.open("soft0").unwrap();
    let cq = dom.create_cq(16).unwrap();
    let pending = dom.endpoint(&cfg(), &cq, &cq).unwrap();
    let mine = pending.info();
    let garbage_peer = dialing_peer();
    let (target, my_qpn) = (mine.addr.unwrap(), mine.qpn);
    let t = std::thread::spawn(move || {
        let mut s = fake_peer(target, my_qpn);
        let mut msg = Vec::new();
        msg.extend_from_slice(&[0xEE; 40]);
        s.write_all(&msg).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    let ep = pending.connect(&garbage_peer).unwrap();
    let mut buf = vec![0u8; 64];
    let mr = unsafe { dom.register(buf.as_mut_ptr(), 64, access::ALL) }.unwrap();
    unsafe { ep.post_recv(9, &[mr.sge(0, 64)]).unwrap() };
    let c = next(&*cq);
    assert_eq!((c.wr_id, c.status), (9, WcStatus::WrFlush), "{c:?}");
    // Later work is flushed too.
    let sge = [mr.sge(0, 8)];
    unsafe {
        ep.post_send(&SendWr {
            wr_id: 1,
            op: SendOp::Send { imm: None },
            sges: &sge,
            signaled: true,
        })
        .unwrap()
    };
    let c = next(&*cq);
    assert_eq!((c.wr_id, c.status), (1, WcStatus::WrFlush), "{c:?}");
    t.join().unwrap();
    drop(ep);
    drop(mr);
    drop(buf);
}

#[test]
fn dropping_a_region_waits_for_a_copy_in_flight() {
    // A hand-made peer sends a write into our region, half its payload,
    // then stalls. Dropping the region must wait for the copy to finish
    // (the memory may be freed right after), and later writes are refused.
    use ferry_verbs::frame::{Header, Kind, FLAG_ACK_REQ};
    use std::io::{Read, Write};
    use std::time::Instant;
    let p = ferry_verbs::soft::SoftProvider::default();
    let dom = p.open("soft0").unwrap();
    let cq = dom.create_cq(16).unwrap();
    let pending = dom.endpoint(&cfg(), &cq, &cq).unwrap();
    let mine = pending.info();
    let peer = dialing_peer();
    let len = 1 << 20;
    let mut buf = vec![0u8; len];
    let mr = unsafe { dom.register(buf.as_mut_ptr(), len, access::ALL) }.unwrap();
    let (addr, rkey) = (mr.addr(), mr.rkey());
    let (target, my_qpn) = (mine.addr.unwrap(), mine.qpn);
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let (half_tx, half_rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        let mut s = fake_peer(target, my_qpn);
        let mut h = Header::new(Kind::Write, 1);
        h.remote_addr = addr;
        h.rkey = rkey;
        h.payload_len = len as u32;
        h.flags = FLAG_ACK_REQ;
        s.write_all(&h.encode()).unwrap();
        s.write_all(&vec![0xAB; len / 2]).unwrap();
        half_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(&vec![0xAB; len / 2]).unwrap();
        // A second write to the same rkey, after deregistration.
        let mut h2 = Header::new(Kind::Write, 2);
        h2.remote_addr = addr;
        h2.rkey = rkey;
        h2.payload_len = 8;
        h2.flags = FLAG_ACK_REQ;
        s.write_all(&h2.encode()).unwrap();
        s.write_all(&[0xCD; 8]).unwrap();
        // Read the answers: an Ack for 1, a Nak (remote access) for 2.
        let mut answers = Vec::new();
        for _ in 0..2 {
            let mut hb = [0u8; 40];
            s.read_exact(&mut hb).unwrap();
            answers.push(Header::decode(&hb).unwrap());
        }
        answers
    });
    let ep = pending.connect(&peer).unwrap();
    half_rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(50)); // the copy is under way
    go_tx.send(()).unwrap();
    let start = Instant::now();
    drop(mr);
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(200),
        "drop returned after {waited:?}, before the copy finished"
    );
    assert!(
        buf.iter().all(|&x| x == 0xAB),
        "the copy in flight completed"
    );
    let answers = t.join().unwrap();
    assert_eq!((answers[0].kind, answers[0].seq), (Kind::Ack, 1));
    assert_eq!(
        (answers[1].kind, answers[1].seq),
        (Kind::Nak, 2),
        "writes after deregistration are refused"
    );
    assert!(
        buf.iter().all(|&x| x == 0xAB),
        "nothing written after deregistration"
    );
    drop(ep);
    drop(buf);
}

/// Spins on `cq` (no `wait`) until a completion comes: a polling consumer,
/// which makes the soft backend progress in this thread.
fn spin<C: CompletionQueue>(cq: &C) -> Completion {
    let start = std::time::Instant::now();
    let mut out = Vec::new();
    while start.elapsed() < WAIT {
        if cq.poll(&mut out, 1) == 1 {
            return out[0];
        }
        std::hint::spin_loop();
    }
    panic!("no completion within {WAIT:?} of polling");
}

#[test]
fn polling_and_waiting_consumers_both_get_every_frame_whole() {
    // Frames small enough for a poller to handle and large ones left to
    // the reader thread, interleaved: first while the receiver waits on
    // its queue for each, then while another thread spins on it without
    // pause (busy-poll progress all along, so the large frames must be
    // handed to the reader thread).
    let (mut a, b) = pair(&ferry_verbs::soft::SoftProvider::default(), 1 << 20);
    let sizes = [8u32, 3000, 20_000, 200_000, 64, 16 << 10];
    fill(&mut a.buf, 5);
    let frame = |round: u32| {
        let len = sizes[round as usize % sizes.len()];
        let off = (round as usize * 7919) % ((1 << 20) - len as usize);
        (off, len)
    };
    let post = |round: u32| {
        let (off, len) = frame(round);
        unsafe {
            write(
                &a,
                round as u64,
                off,
                len,
                b.mr.addr() + off as u64,
                b.mr.rkey(),
                Some(round),
                round.is_multiple_of(5),
            )
            .unwrap()
        };
    };
    let check = |round: u32, c: Completion| {
        let (off, len) = frame(round);
        assert_eq!(
            (c.status, c.imm, c.byte_len),
            (WcStatus::Success, Some(round), len),
            "round {round}"
        );
        assert_eq!(
            &b.buf[off..off + len as usize],
            &a.buf[off..off + len as usize],
            "round {round}: {len} bytes"
        );
    };
    for round in 0..30u32 {
        unsafe { b.ep.post_recv(round as u64, &[]).unwrap() };
        post(round);
        check(round, next(&*b.recv_cq));
    }
    for round in 30..90u32 {
        unsafe { b.ep.post_recv(round as u64, &[]).unwrap() };
    }
    let cq = b.recv_cq.clone();
    let poller = std::thread::spawn(move || (30..90).map(|_| spin(&*cq)).collect::<Vec<_>>());
    // Spaced out, so that the reader thread sees the poller between frames
    // (and leaves the small ones to it). A poller that did not hand the
    // large frames over would stall each until it paused for a
    // millisecond: not a failure here, the reader's fallback.
    for round in 30..90u32 {
        std::thread::sleep(Duration::from_millis(3));
        post(round);
    }
    for (round, c) in (30..90u32).zip(poller.join().unwrap()) {
        check(round, c);
    }
    let mut sent = 0;
    while sent < 90 / 5 {
        assert_eq!(next(&*a.send_cq).status, WcStatus::Success);
        sent += 1;
    }
}

#[test]
fn a_send_before_its_receive_is_served_while_the_receiver_polls() {
    // The send needs a receive the receiver posts only later: a poller
    // leaves it to the reader thread, which waits (within the RNR timeout).
    let (mut a, b) = pair(&ferry_verbs::soft::SoftProvider::default(), 4096);
    fill(&mut a.buf, 9);
    let sge = [a.mr.sge(0, 100)];
    unsafe {
        a.ep.post_send(&SendWr {
            wr_id: 1,
            op: SendOp::Send { imm: Some(7) },
            sges: &sge,
            signaled: true,
        })
        .unwrap()
    };
    let mut out = Vec::new();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(50) {
        assert_eq!(b.recv_cq.poll(&mut out, 1), 0);
    }
    unsafe { b.ep.post_recv(5, &[b.mr.sge(1000, 200)]).unwrap() };
    let c = spin(&*b.recv_cq);
    assert_eq!((c.wr_id, c.status, c.imm), (5, WcStatus::Success, Some(7)));
    assert_eq!(&b.buf[1000..1100], &a.buf[..100]);
    assert_eq!(spin(&*a.send_cq).status, WcStatus::Success);
}

#[test]
fn the_queue_fd_is_readable_exactly_while_completions_wait() {
    let (a, b) = pair(&ferry_verbs::soft::SoftProvider::default(), 4096);
    let fd = b.recv_cq.fd();
    let readable = |ms: i32| {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY (test): one live pollfd.
        unsafe { libc::poll(&mut p, 1, ms) > 0 }
    };
    assert!(!readable(0), "nothing queued yet");
    unsafe { b.ep.post_recv(1, &[]).unwrap() };
    unsafe { write(&a, 1, 0, 8, b.mr.addr(), b.mr.rkey(), Some(3), false).unwrap() };
    assert!(readable(10_000), "a completion makes the fd readable");
    assert!(readable(0), "and it stays so until polled");
    let mut out = Vec::new();
    assert_eq!(b.recv_cq.poll(&mut out, 8), 1);
    assert!(!readable(0), "drained with the queue");
}

#[test]
fn a_refused_write_is_refused_also_while_the_responder_polls() {
    // The responder's queue is being polled, so its frames are handled in
    // the polling thread; a write outside the region must still be refused
    // (left to the reader thread, which discards it and answers a Nak).
    let (a, b) = pair(&ferry_verbs::soft::SoftProvider::default(), 4096);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (cq, st) = (b.recv_cq.clone(), stop.clone());
    let poller = std::thread::spawn(move || {
        let mut out = Vec::new();
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            cq.poll(&mut out, 8);
        }
        out
    });
    std::thread::sleep(Duration::from_millis(20));
    unsafe { write(&a, 1, 0, 64, b.mr.addr() + 4090, b.mr.rkey(), None, true).unwrap() };
    let c = next(&*a.send_cq);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!((c.wr_id, c.status), (1, WcStatus::RemoteAccess));
    assert!(poller.join().unwrap().is_empty(), "no receive completed");
    assert!(b.buf.iter().all(|&x| x == 0), "nothing landed");
}

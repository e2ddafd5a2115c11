//! The fabric conformance suite, generic over the backend. A backend's test
//! file instantiates it with `conformance_suite!(provider expression)`.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_verbs::*;

pub const WAIT: Duration = Duration::from_secs(10);

/// One side of a connected pair: domain, queues, endpoint, and a registered
/// buffer (boxed so that its address is stable).
pub struct Side<D: Domain> {
    pub ep: D::Ep,
    pub send_cq: Arc<D::Cq>,
    pub recv_cq: Arc<D::Cq>,
    pub mr: D::Mr,
    pub buf: Box<[u8]>,
    pub dom: D,
}

pub fn cfg() -> EndpointConfig {
    EndpointConfig {
        max_send_wr: 2048,
        max_recv_wr: 2048,
        timeout: Duration::from_secs(3),
        rnr_timeout: Duration::from_millis(300),
        mtu: 4096,
        max_inline: 64,
    }
}

/// One side before connection.
struct Half<D: Domain> {
    dom: D,
    pending: D::Pending,
    send_cq: Arc<D::Cq>,
    recv_cq: Arc<D::Cq>,
    mr: D::Mr,
    buf: Box<[u8]>,
}

fn half<P: Provider>(p: &P, size: usize, access_bits: u32, c: &EndpointConfig) -> Half<P::Domain> {
    let dev = p
        .devices()
        .expect("devices")
        .into_iter()
        .next()
        .expect("a device");
    let dom = p.open(&dev.name).expect("open");
    let send_cq = dom.create_cq(4096).expect("cq");
    let recv_cq = dom.create_cq(4096).expect("cq");
    let mut buf = vec![0u8; size].into_boxed_slice();
    // SAFETY (test): the buffer is moved into the Side next to its region
    // and outlives every operation of the test.
    let mr = unsafe { dom.register(buf.as_mut_ptr(), size, access_bits) }.expect("register");
    let pending = dom.endpoint(c, &send_cq, &recv_cq).expect("endpoint");
    Half {
        dom,
        pending,
        send_cq,
        recv_cq,
        mr,
        buf,
    }
}

/// Two connected endpoints with `size`-byte buffers.
pub fn pair_with<P: Provider>(
    p: &P,
    size: usize,
    a_access: u32,
    b_access: u32,
    c: &EndpointConfig,
) -> (Side<P::Domain>, Side<P::Domain>)
where
    P::Domain: 'static,
{
    let a = half(p, size, a_access, c);
    let b = half(p, size, b_access, c);
    // The info crosses "out of band" encoded, as ferryd will send it.
    let ia = EndpointInfo::decode(&a.pending.info().encode()).expect("decode");
    let ib = EndpointInfo::decode(&b.pending.info().encode()).expect("decode");
    let (pa, pb) = (a.pending, b.pending);
    let (ea, eb) = std::thread::scope(|sc| {
        let ta = sc.spawn(move || pa.connect(&ib).expect("connect a"));
        let tb = sc.spawn(move || pb.connect(&ia).expect("connect b"));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    (
        Side {
            ep: ea,
            send_cq: a.send_cq,
            recv_cq: a.recv_cq,
            mr: a.mr,
            buf: a.buf,
            dom: a.dom,
        },
        Side {
            ep: eb,
            send_cq: b.send_cq,
            recv_cq: b.recv_cq,
            mr: b.mr,
            buf: b.buf,
            dom: b.dom,
        },
    )
}

pub fn pair<P: Provider>(p: &P, size: usize) -> (Side<P::Domain>, Side<P::Domain>)
where
    P::Domain: 'static,
{
    pair_with(p, size, access::ALL, access::ALL, &cfg())
}

/// Waits for the next completion on `cq`.
pub fn next<C: CompletionQueue>(cq: &C) -> Completion {
    let start = Instant::now();
    let mut out = Vec::new();
    while start.elapsed() < WAIT {
        if cq.poll(&mut out, 1) == 1 {
            return out[0];
        }
        cq.wait(Duration::from_millis(50));
    }
    panic!("no completion within {WAIT:?}");
}

/// True when no completion arrives within `d`.
pub fn quiet<C: CompletionQueue>(cq: &C, d: Duration) -> bool {
    let mut out = Vec::new();
    std::thread::sleep(d);
    cq.poll(&mut out, 1) == 0
}

pub fn fill(buf: &mut [u8], seed: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
}

/// Posts a write (with immediate when `imm` is set) from `s`'s buffer.
///
/// # Safety
/// The side's buffer outlives the operation (it does in these tests).
#[allow(
    clippy::too_many_arguments,
    reason = "mirrors the fields of a write work request"
)]
pub unsafe fn write<D: Domain>(
    s: &Side<D>,
    wr_id: u64,
    off: usize,
    len: u32,
    remote_addr: u64,
    rkey: u32,
    imm: Option<u32>,
    signaled: bool,
) -> Result<()> {
    let sge = [s.mr.sge(off, len)];
    // SAFETY: per this function's contract.
    unsafe {
        s.ep.post_send(&SendWr {
            wr_id,
            op: SendOp::Write {
                remote_addr,
                rkey,
                imm,
            },
            sges: &sge,
            signaled,
        })
    }
}

/// `conformance_suite!(provider)`, or with attributes for every test, e.g.
/// `conformance_suite!(provider, #[ignore = "requires an RDMA device"])`.
#[macro_export]
macro_rules! conformance_suite {
    ($provider:expr $(, #[$attr:meta])* $(,)?) => {
        use ferry_verbs::*;
        use std::time::Duration;
        use $crate::conformance::*;

        #[test]
        $(#[$attr])*
        fn discovers_a_device_with_an_active_port() {
            let devs = $provider.devices().unwrap();
            assert!(!devs.is_empty());
            let port = &devs[0].ports[0];
            assert!(port.active && port.active_mtu >= 1024 && !port.gids.is_empty());
        }

        #[test]
        $(#[$attr])*
        fn path_mtu_is_the_minimum_of_both_sides() {
            let mut small = cfg();
            small.mtu = 1024;
            let (a, b) = pair_with(&$provider, 64, access::ALL, access::ALL, &small);
            assert_eq!(a.ep.mtu(), 1024);
            assert_eq!(b.ep.mtu(), 1024);
        }

        #[test]
        $(#[$attr])*
        fn write_with_imm_lands_bytes_and_immediate() {
            let (mut a, b) = pair(&$provider, 1 << 16);
            fill(&mut a.buf[..4096], 7);
            unsafe { b.ep.post_recv(99, &[]).unwrap() };
            let dst = b.mr.addr() + 1000;
            unsafe { write(&a, 1, 0, 4096, dst, b.mr.rkey(), Some(0xC0FFEE), true).unwrap() };
            let c = next(&*a.send_cq);
            assert_eq!(
                (c.wr_id, c.status, c.opcode),
                (1, WcStatus::Success, WcOpcode::Write)
            );
            let r = next(&*b.recv_cq);
            assert_eq!(
                (r.wr_id, r.status, r.opcode, r.imm, r.byte_len),
                (
                    99,
                    WcStatus::Success,
                    WcOpcode::RecvWriteImm,
                    Some(0xC0FFEE),
                    4096
                )
            );
            assert_eq!(&b.buf[1000..5096], &a.buf[..4096]);
            assert!(
                b.buf[..1000].iter().all(|&x| x == 0),
                "nothing written before the target"
            );
            assert!(
                b.buf[5096..].iter().all(|&x| x == 0),
                "nothing written after it"
            );
        }

        #[test]
        $(#[$attr])*
        fn sends_arrive_in_order_with_their_immediates() {
            let (mut a, b) = pair(&$provider, 1 << 16);
            let n = 50u32;
            for i in 0..n {
                let sge = [b.mr.sge((i as usize) * 256, 256)];
                unsafe { b.ep.post_recv(i as u64, &sge).unwrap() };
            }
            for i in 0..n {
                a.buf[(i as usize) * 8] = i as u8;
                let sge = [a.mr.sge((i as usize) * 8, 8)];
                unsafe {
                    a.ep.post_send(&SendWr {
                        wr_id: 1000 + i as u64,
                        op: SendOp::Send { imm: Some(i) },
                        sges: &sge,
                        signaled: i == n - 1,
                    })
                    .unwrap()
                };
            }
            for i in 0..n {
                let r = next(&*b.recv_cq);
                assert_eq!(
                    (r.wr_id, r.status, r.byte_len, r.imm),
                    (i as u64, WcStatus::Success, 8, Some(i))
                );
                assert_eq!(b.buf[(i as usize) * 256], i as u8);
            }
            let c = next(&*a.send_cq);
            assert_eq!(
                (c.wr_id, c.status),
                (1000 + n as u64 - 1, WcStatus::Success)
            );
        }

        #[test]
        $(#[$attr])*
        fn large_tiny_and_empty_transfers() {
            let big = 8 << 20;
            let (mut a, b) = pair(&$provider, big);
            fill(&mut a.buf, 3);
            unsafe { write(&a, 1, 0, big as u32, b.mr.addr(), b.mr.rkey(), None, true).unwrap() };
            assert_eq!(next(&*a.send_cq).status, WcStatus::Success);
            assert!(a.buf == b.buf, "8 MiB arrived intact");
            a.buf[5] = 0xAB;
            unsafe { write(&a, 2, 5, 1, b.mr.addr() + 77, b.mr.rkey(), None, true).unwrap() };
            assert_eq!(next(&*a.send_cq).status, WcStatus::Success);
            assert_eq!(b.buf[77], 0xAB);
            unsafe { b.ep.post_recv(5, &[]).unwrap() };
            unsafe { write(&a, 3, 0, 0, b.mr.addr(), b.mr.rkey(), Some(42), true).unwrap() };
            assert_eq!(next(&*a.send_cq).status, WcStatus::Success);
            let r = next(&*b.recv_cq);
            assert_eq!((r.byte_len, r.imm), (0, Some(42)));
        }

        #[test]
        $(#[$attr])*
        fn many_outstanding_unsignaled_writes() {
            let (mut a, b) = pair(&$provider, 1 << 20);
            fill(&mut a.buf, 9);
            let n = 1024usize;
            let chunk = (1 << 20) / n;
            for i in 0..n {
                let off = i * chunk;
                unsafe {
                    write(
                        &a,
                        i as u64,
                        off,
                        chunk as u32,
                        b.mr.addr() + off as u64,
                        b.mr.rkey(),
                        None,
                        i == n - 1,
                    )
                    .unwrap()
                };
            }
            let c = next(&*a.send_cq);
            assert_eq!(
                (c.wr_id, c.status),
                (n as u64 - 1, WcStatus::Success),
                "only the signalled one reports"
            );
            assert!(a.buf == b.buf);
            assert!(quiet(&*a.send_cq, Duration::from_millis(50)));
        }

        #[test]
        $(#[$attr])*
        fn unsignaled_writes_alone_never_time_out() {
            let mut c = cfg();
            c.timeout = Duration::from_millis(400);
            let (mut a, b) = pair_with(&$provider, 4096, access::ALL, access::ALL, &c);
            fill(&mut a.buf, 4);
            for i in 0..3u64 {
                unsafe { write(&a, i, 0, 64, b.mr.addr(), b.mr.rkey(), None, false).unwrap() };
            }
            // Nothing follows them; they must still be acknowledged.
            assert!(
                quiet(&*a.send_cq, Duration::from_millis(900)),
                "no error completion"
            );
            unsafe { write(&a, 9, 0, 8, b.mr.addr(), b.mr.rkey(), None, true).unwrap() };
            assert_eq!(next(&*a.send_cq).status, WcStatus::Success);
            assert_eq!(&b.buf[..64], &a.buf[..64]);
        }

        #[test]
        $(#[$attr])*
        fn read_after_write_sees_the_write() {
            let (mut a, b) = pair(&$provider, 8192);
            fill(&mut a.buf[..1024], 11);
            unsafe { write(&a, 1, 0, 1024, b.mr.addr() + 2048, b.mr.rkey(), None, false).unwrap() };
            let sge = [a.mr.sge(4096, 1024)];
            unsafe {
                a.ep.post_send(&SendWr {
                    wr_id: 2,
                    op: SendOp::Read {
                        remote_addr: b.mr.addr() + 2048,
                        rkey: b.mr.rkey(),
                    },
                    sges: &sge,
                    signaled: true,
                })
                .unwrap()
            };
            let c = next(&*a.send_cq);
            assert_eq!((c.wr_id, c.status), (2, WcStatus::Success));
            assert_eq!(&a.buf[4096..5120], &a.buf[..1024]);
        }

        #[test]
        $(#[$attr])*
        fn inline_sends_free_the_buffer_at_once() {
            let big = 2 << 20;
            let (mut a, b) = pair(&$provider, big + 4096);
            unsafe { b.ep.post_recv(1, &[b.mr.sge(big, 64)]).unwrap() };
            // A large write first keeps the sender busy, so a backend that
            // read the small send's buffer late would see the overwrite.
            unsafe { write(&a, 0, 0, big as u32, b.mr.addr(), b.mr.rkey(), None, false).unwrap() };
            a.buf[big..big + 8].copy_from_slice(b"original");
            let sge = [a.mr.sge(big, 8)];
            unsafe { a.ep.post_send(&SendWr { wr_id: 1, op: SendOp::Send { imm: None }, sges: &sge, signaled: true }).unwrap() };
            // max_inline is 64: the bytes were copied when posted.
            a.buf[big..big + 8].copy_from_slice(b"CHANGED!");
            let c = next(&*a.send_cq);
            assert_eq!((c.wr_id, c.status), (1, WcStatus::Success));
            assert_eq!(next(&*b.recv_cq).byte_len, 8);
            assert_eq!(&b.buf[big..big + 8], b"original");
        }

        #[test]
        $(#[$attr])*
        fn deregistered_region_is_never_written_again() {
            let size = 1 << 20;
            let (mut a, mut b) = pair(&$provider, size);
            fill(&mut a.buf, 2);
            let (addr, rkey) = (b.mr.addr(), b.mr.rkey());
            // Writes in flight while the region goes away.
            for i in 0..16u64 {
                let off = (i as usize % 16) * (size / 16);
                unsafe { write(&a, i, off, (size / 16) as u32, addr + off as u64, rkey, None, false).unwrap() };
            }
            drop(std::mem::replace(&mut b.mr, unsafe { b.dom.register(b.buf.as_mut_ptr(), 64, access::LOCAL_WRITE) }.unwrap()));
            // From here on the old rkey names nothing.
            b.buf.fill(0);
            unsafe { write(&a, 99, 0, 4096, addr, rkey, None, true).unwrap() };
            let mut last = next(&*a.send_cq);
            while last.wr_id != 99 && last.status != WcStatus::RemoteAccess {
                last = next(&*a.send_cq);
            }
            assert_eq!(last.status, WcStatus::RemoteAccess, "{last:?}");
            std::thread::sleep(Duration::from_millis(100));
            assert!(b.buf.iter().all(|&x| x == 0), "memory written after deregistration");
        }

        #[test]
        $(#[$attr])*
        fn dmabuf_registration_of_a_non_dmabuf_is_refused_clearly() {
            // A memfd is not a dma-buf: the backend must refuse it with an
            // error (Unsupported where dma-buf regions do not exist at all).
            let dev = $provider.devices().unwrap().into_iter().next().unwrap();
            let dom = $provider.open(&dev.name).unwrap();
            let name = std::ffi::CString::new("not-a-dmabuf").unwrap();
            let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0);
            unsafe { libc::ftruncate(fd, 4096) };
            let r = unsafe { dom.register_dmabuf(fd, 0, 4096, 0, access::ALL) };
            match r {
                Err(VerbsError::Unsupported(_)) | Err(VerbsError::InvalidArgument(_)) => {}
                Err(e) => panic!("unexpected error kind: {e}"),
                Ok(_) => panic!("a memfd was registered as a dma-buf"),
            }
            assert!(matches!(
                unsafe { dom.register_dmabuf(-1, 0, 4096, 0, access::ALL) },
                Err(VerbsError::InvalidArgument(_)) | Err(VerbsError::Unsupported(_))
            ));
            unsafe { libc::close(fd) };
        }

        #[test]
        $(#[$attr])*
        fn scatter_gather_both_ways() {
            let (mut a, b) = pair(&$provider, 4096);
            fill(&mut a.buf, 1);
            let sges = [a.mr.sge(0, 10), a.mr.sge(100, 20), a.mr.sge(500, 30)];
            unsafe {
                a.ep.post_send(&SendWr {
                    wr_id: 1,
                    op: SendOp::Write {
                        remote_addr: b.mr.addr(),
                        rkey: b.mr.rkey(),
                        imm: None,
                    },
                    sges: &sges,
                    signaled: true,
                })
                .unwrap()
            };
            assert_eq!(next(&*a.send_cq).status, WcStatus::Success);
            assert_eq!(&b.buf[..10], &a.buf[..10]);
            assert_eq!(&b.buf[10..30], &a.buf[100..120]);
            assert_eq!(&b.buf[30..60], &a.buf[500..530]);
            let rs = [b.mr.sge(1000, 5), b.mr.sge(2000, 100)];
            unsafe { b.ep.post_recv(7, &rs).unwrap() };
            let ss = [a.mr.sge(0, 40)];
            unsafe {
                a.ep.post_send(&SendWr {
                    wr_id: 2,
                    op: SendOp::Send { imm: None },
                    sges: &ss,
                    signaled: true,
                })
                .unwrap()
            };
            assert_eq!(next(&*b.recv_cq).byte_len, 40);
            assert_eq!(&b.buf[1000..1005], &a.buf[..5]);
            assert_eq!(&b.buf[2000..2035], &a.buf[5..40]);
        }

        #[test]
        $(#[$attr])*
        fn read_fetches_remote_bytes() {
            let (a, mut b) = pair(&$provider, 1 << 16);
            fill(&mut b.buf, 5);
            let sge = [a.mr.sge(100, 5000)];
            unsafe {
                a.ep.post_send(&SendWr {
                    wr_id: 8,
                    op: SendOp::Read {
                        remote_addr: b.mr.addr() + 300,
                        rkey: b.mr.rkey(),
                    },
                    sges: &sge,
                    signaled: true,
                })
                .unwrap()
            };
            let c = next(&*a.send_cq);
            assert_eq!(
                (c.wr_id, c.status, c.opcode), (8, WcStatus::Success, WcOpcode::Read)
            );
            assert_eq!(&a.buf[100..5100], &b.buf[300..5300]);
        }

        #[test]
        $(#[$attr])*
        fn wrong_rkey_is_a_remote_access_error_and_flushes_the_rest() {
            let (a, b) = pair(&$provider, 4096);
            unsafe { write(&a, 1, 0, 8, b.mr.addr(), b.mr.rkey() ^ 0x5555, None, true).unwrap() };
            let _ = unsafe { write(&a, 2, 0, 8, b.mr.addr(), b.mr.rkey(), None, true) };
            let c = next(&*a.send_cq);
            assert_eq!((c.wr_id, c.status), (1, WcStatus::RemoteAccess));
            // The endpoint is in the error state: later work is flushed or refused.
            let mut out = Vec::new();
            std::thread::sleep(Duration::from_millis(100));
            a.send_cq.poll(&mut out, 16);
            assert!(out.iter().all(|c| c.status == WcStatus::WrFlush), "{out:?}");
            assert!(b.buf.iter().all(|&x| x == 0), "nothing landed");
        }

        #[test]
        $(#[$attr])*
        fn write_outside_the_region_is_a_remote_access_error() {
            let (a, b) = pair(&$provider, 4096);
            unsafe {
                write(
                    &a,
                    1,
                    0,
                    64,
                    b.mr.addr() + 4096 - 32,
                    b.mr.rkey(),
                    None,
                    true,
                )
                .unwrap()
            };
            assert_eq!(next(&*a.send_cq).status, WcStatus::RemoteAccess);
            assert!(b.buf.iter().all(|&x| x == 0));
        }

        #[test]
        $(#[$attr])*
        fn missing_access_rights_are_enforced() {
            let (a, b) = pair_with(&$provider, 4096, access::ALL, access::LOCAL_WRITE, &cfg());
            unsafe { write(&a, 1, 0, 8, b.mr.addr(), b.mr.rkey(), None, true).unwrap() };
            assert_eq!(
                next(&*a.send_cq).status,
                WcStatus::RemoteAccess,
                "no remote write right"
            );
            let (a, b) = pair_with(
                &$provider,
                4096,
                access::ALL,
                access::LOCAL_WRITE | access::REMOTE_WRITE,
                &cfg(),
            );
            let sge = [a.mr.sge(0, 8)];
            unsafe {
                a.ep.post_send(&SendWr {
                    wr_id: 2,
                    op: SendOp::Read {
                        remote_addr: b.mr.addr(),
                        rkey: b.mr.rkey(),
                    },
                    sges: &sge,
                    signaled: true,
                })
                .unwrap()
            };
            assert_eq!(
                next(&*a.send_cq).status,
                WcStatus::RemoteAccess,
                "no remote read right"
            );
        }

        #[test]
        $(#[$attr])*
        fn bad_lkey_is_a_local_protection_error() {
            let (a, b) = pair(&$provider, 4096);
            let sge = [Sge {
                addr: a.mr.addr(),
                len: 8,
                lkey: a.mr.lkey() ^ 0x7777,
            }];
            unsafe {
                a.ep.post_send(&SendWr {
                    wr_id: 3,
                    op: SendOp::Write {
                        remote_addr: b.mr.addr(),
                        rkey: b.mr.rkey(),
                        imm: None,
                    },
                    sges: &sge,
                    signaled: true,
                })
                .unwrap()
            };
            // Devices differ here: NICs say LocalProtection, rxe says
            // LocalQpOperation; both are local errors that fail the request.
            let st = next(&*a.send_cq).status;
            assert!(matches!(st, WcStatus::LocalProtection | WcStatus::LocalQpOperation), "{st:?}");
        }

        #[test]
        $(#[$attr])*
        fn send_without_a_posted_receive_fails_after_the_rnr_timeout() {
            let (a, _b) = pair(&$provider, 4096);
            let sge = [a.mr.sge(0, 8)];
            let start = std::time::Instant::now();
            unsafe {
                a.ep.post_send(&SendWr {
                    wr_id: 4,
                    op: SendOp::Send { imm: None },
                    sges: &sge,
                    signaled: true,
                })
                .unwrap()
            };
            assert_eq!(next(&*a.send_cq).status, WcStatus::RnrRetryExceeded);
            assert!(start.elapsed() < Duration::from_secs(5));
        }

        #[test]
        $(#[$attr])*
        fn receive_too_small_for_a_send_fails_both_sides() {
            let (a, b) = pair(&$provider, 4096);
            unsafe { b.ep.post_recv(1, &[b.mr.sge(0, 4)]).unwrap() };
            let sge = [a.mr.sge(0, 16)];
            unsafe {
                a.ep.post_send(&SendWr {
                    wr_id: 2,
                    op: SendOp::Send { imm: None },
                    sges: &sge,
                    signaled: true,
                })
                .unwrap()
            };
            // NICs say RemoteInvalidRequest, rxe says RemoteOperation.
            let st = next(&*a.send_cq).status;
            assert!(matches!(st, WcStatus::RemoteInvalidRequest | WcStatus::RemoteOperation), "{st:?}");
            // NICs say LocalLength, rxe says LocalQpOperation.
            let st = next(&*b.recv_cq).status;
            assert!(matches!(st, WcStatus::LocalLength | WcStatus::LocalQpOperation), "{st:?}");
        }

        #[test]
        $(#[$attr])*
        fn vanished_peer_fails_pending_work_in_bounded_time() {
            let (a, b) = pair(&$provider, 4096);
            unsafe { a.ep.post_recv(50, &[a.mr.sge(0, 64)]).unwrap() };
            drop(b);
            let start = std::time::Instant::now();
            unsafe { write(&a, 1, 0, 8, 0, 0, None, true).unwrap() };
            let c = next(&*a.send_cq);
            assert!(
                matches!(c.status, WcStatus::RetryExceeded | WcStatus::WrFlush),
                "{c:?}"
            );
            let r = next(&*a.recv_cq);
            assert_eq!((r.wr_id, r.status), (50, WcStatus::WrFlush));
            assert!(
                start.elapsed() < cfg().timeout + Duration::from_secs(2),
                "took {:?}",
                start.elapsed()
            );
        }
    };
}

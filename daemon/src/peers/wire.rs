//! The control connection's frames: a little-endian u32 length, then one
//! [`Frame`] encoded with postcard. Everything read is untrusted: a frame
//! over [`MAX_FRAME`] bytes, one that does not decode, or one that comes
//! out of turn ends the connection (and is logged); it never panics.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::auth::{Nonce, Proof};

/// The first bytes a dialer sends (in its Hello).
pub const MAGIC: [u8; 4] = *b"FRYP";
/// The control protocol's version; peers must speak the same.
pub const VERSION: u16 = 2;
/// Largest frame read.
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Dialer -> acceptor, first.
    Hello {
        magic: [u8; 4],
        version: u16,
        node: String,
        nonce: Nonce,
    },
    /// Acceptor -> dialer: its own name and nonce, and its proof.
    Challenge {
        node: String,
        nonce: Nonce,
        proof: Proof,
    },
    /// Dialer -> acceptor: the dialer's proof.
    Proof { proof: Proof },
    /// Acceptor -> dialer: both proofs checked.
    Welcome,
    /// Either side, then it closes. Says nothing about streams.
    Refused { reason: String },
    /// After the handshake.
    Msg(PeerMsg),
}

/// What authenticated peers say to each other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// Sent by both right after the handshake, before anything else.
    Fabric(FabricOffer),
    /// A heartbeat; `t_us` is the sender's clock, echoed in the answer.
    Ping {
        seq: u64,
        t_us: u64,
    },
    Pong {
        seq: u64,
        t_us: u64,
    },
    /// The sender closes the connection after this.
    Bye {
        reason: String,
    },
    /// The streams whose home is the sender: all of them, after the
    /// handshake and whenever one is created or deleted.
    Streams(Vec<StreamAnnounce>),
    /// The sender's end of the data link for this connection.
    Endpoint(ferry_verbs::EndpointInfo),
    /// Consumer host -> home: a trainer joins a group of a stream homed at
    /// the receiver; its batches go to `landing`.
    Join(Join),
    /// Home -> consumer host: the answer to a Join.
    Joined {
        member: u64,
        result: Result<Joined, WireRefusal>,
    },
    /// Consumer host -> home: the trainer left (or its daemon lets it go).
    Leave {
        member: u64,
    },
    /// Consumer host -> home: the trainer released a batch (committing its
    /// partitions when `commit`); its landing slot is free again.
    Release {
        member: u64,
        partition: u32,
        offset: u64,
        home_slot: u32,
        landing_slot: u32,
        commit: bool,
    },
    /// Consumer host -> home: a landing slot is free again (after an end
    /// of epoch).
    Credit {
        member: u64,
        landing_slot: u32,
    },
    /// Consumer host -> home: commit one partition (or, with `None`, every
    /// partition the member owns).
    Commit {
        member: u64,
        partition: Option<u32>,
        offset: u64,
    },
    /// Consumer host -> home: the trainer seeks.
    Seek {
        member: u64,
        partition: u32,
        offset: u64,
    },
    /// Home -> consumer host: the answer to a Seek.
    SeekDone {
        member: u64,
        result: Result<(), WireRefusal>,
    },
    /// Home -> consumer host: the member is no longer one (its stream or
    /// group was deleted).
    Evicted {
        member: u64,
        why: String,
    },
    /// Producer host -> home: a producer there publishes into a stream
    /// homed at the receiver.
    Produce {
        producer: u64,
        stream: String,
        uid: u32,
    },
    /// Home -> producer host: the answer to a Produce.
    Producing {
        producer: u64,
        result: Result<Producing, WireRefusal>,
    },
    /// Home -> producer host: slots of the stream's pool the producer's
    /// host may write batches into (one each).
    Grant {
        producer: u64,
        slots: Vec<u32>,
    },
    /// Home -> producer host: the batch from that outbox slot is in the
    /// stream (the producer may use the slot again).
    Published {
        producer: u64,
        outbox_slot: u32,
    },
    /// Home -> producer host: its end of epoch was taken.
    EndTaken {
        producer: u64,
    },
    /// For `ferry status --cluster`: the sender asks for the receiver's
    /// summary...
    StatusAsk {
        id: u64,
    },
    /// ...which comes back with the same id.
    StatusTell {
        id: u64,
        summary: ferry_admin::NodeSummary,
    },
}

/// Where a producer on another host writes its batches at the home (see
/// `crate::landing`): slots of the stream's pool, each with a header
/// entry, and one more header entry for its control records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Producing {
    pub partitions: u32,
    pub slot_size: u64,
    pub slot_count: u32,
    pub pool_addr: u64,
    pub pool_rkey: u32,
    pub header_addr: u64,
    pub header_rkey: u32,
    /// The id in the immediates of its writes.
    pub inbox: u16,
}

/// What a trainer on another host asks of a stream's home.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Join {
    /// The consumer host's id for the member (its trainer's session).
    pub member: u64,
    pub stream: String,
    pub group: String,
    pub prefetch: u32,
    pub start: ferry_shm::proto::GroupStart,
    /// The trainer's uid on its host, for the home's access rules.
    pub uid: u32,
    pub landing: Landing,
    /// Landing slots its trainer still holds from an earlier membership
    /// (not free for writes until credited).
    pub busy: Vec<u32>,
}

/// A landing area, as its daemon registered it (see `crate::landing`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Landing {
    /// Its id in immediates.
    pub id: u16,
    pub slots: u32,
    /// The slots and their metadata, laid out as a pool of `slots` slots
    /// of the stream's slot size.
    pub pool_addr: u64,
    pub pool_rkey: u32,
    pub header_addr: u64,
    pub header_rkey: u32,
}

/// The home's answer to a Join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    pub partitions: u32,
    pub slot_size: u64,
}

/// A request refused by a peer: the code and message the trainer gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRefusal {
    pub code: ferry_shm::proto::ErrorCode,
    pub message: String,
}

/// A stream as its home daemon announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamAnnounce {
    pub name: String,
    pub partitions: u32,
    pub slot_size: u64,
    pub slot_count: u32,
    pub durability: ferry_shm::proto::Durability,
}

impl StreamAnnounce {
    /// The spec of the stream announced.
    pub fn spec(&self) -> ferry_shm::proto::StreamSpec {
        ferry_shm::proto::StreamSpec {
            partitions: self.partitions,
            slot_size: self.slot_size,
            slot_count: self.slot_count,
            durability: self.durability,
        }
    }
}

/// The fabrics a daemon can use with a peer: they use ibv when both offer
/// it, else soft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FabricOffer {
    /// The RDMA device it would use, when it has one.
    pub ibv: Option<String>,
}

impl FabricOffer {
    /// What two daemons with these offers use.
    pub fn agree(&self, other: &FabricOffer) -> String {
        match (&self.ibv, &other.ibv) {
            (Some(mine), Some(theirs)) => format!("ibv ({mine} here, {theirs} there)"),
            (Some(_), None) => "soft (the peer has no RDMA device)".into(),
            (None, Some(_)) => "soft (this host has no RDMA device)".into(),
            (None, None) => "soft (neither host has an RDMA device)".into(),
        }
    }
}

/// A frame as the bytes that go on the wire, length included.
pub fn encode(f: &Frame) -> Vec<u8> {
    let body = postcard::to_stdvec(f).expect("frames serialise");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// A frame's body as read off the wire.
pub fn decode(body: &[u8]) -> Result<Frame, String> {
    let (f, rest) =
        postcard::take_from_bytes::<Frame>(body).map_err(|e| format!("undecodable frame: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} stray bytes after a frame", rest.len()));
    }
    Ok(f)
}

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol.
    #[error("{0}")]
    Protocol(String),
}

/// Reads one frame; the byte count read is added to `bytes`.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R, bytes: &mut u64) -> Result<Frame, ReadError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ReadError::Closed),
        Err(e) => return Err(e.into()),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(ReadError::Protocol(format!(
            "a frame of {n} bytes, over the limit of {MAX_FRAME}"
        )));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ReadError::Protocol(format!("connection closed inside a frame of {n} bytes"))
        } else {
            e.into()
        }
    })?;
    *bytes += 4 + n as u64;
    decode(&body).map_err(ReadError::Protocol)
}

/// Writes one frame; returns the bytes written.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> std::io::Result<u64> {
    let b = encode(f);
    w.write_all(&b).await?;
    Ok(b.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Hello {
                magic: MAGIC,
                version: VERSION,
                node: "a".into(),
                nonce: [7; 32],
            },
            Frame::Challenge {
                node: "b".into(),
                nonce: [1; 32],
                proof: [2; 32],
            },
            Frame::Proof { proof: [3; 32] },
            Frame::Welcome,
            Frame::Refused {
                reason: "no".into(),
            },
            Frame::Msg(PeerMsg::Fabric(FabricOffer {
                ibv: Some("rxe0".into()),
            })),
            Frame::Msg(PeerMsg::Ping { seq: 9, t_us: 1 }),
            Frame::Msg(PeerMsg::Pong {
                seq: u64::MAX,
                t_us: 2,
            }),
            Frame::Msg(PeerMsg::Bye {
                reason: "stopping".into(),
            }),
            Frame::Msg(PeerMsg::Join(Join {
                member: 5,
                stream: "s".into(),
                group: "g".into(),
                prefetch: 4,
                start: ferry_shm::proto::GroupStart::Earliest,
                uid: 1000,
                landing: Landing {
                    id: 3,
                    slots: 4,
                    pool_addr: 1 << 40,
                    pool_rkey: 7,
                    header_addr: 2 << 40,
                    header_rkey: 8,
                },
                busy: vec![1],
            })),
            Frame::Msg(PeerMsg::Joined {
                member: 5,
                result: Err(WireRefusal {
                    code: ferry_shm::proto::ErrorCode::PermissionDenied,
                    message: "no".into(),
                }),
            }),
            Frame::Msg(PeerMsg::Release {
                member: 5,
                partition: 1,
                offset: 99,
                home_slot: 3,
                landing_slot: 2,
                commit: true,
            }),
            Frame::Msg(PeerMsg::Streams(vec![StreamAnnounce {
                name: "s".into(),
                partitions: 2,
                slot_size: 4096,
                slot_count: 8,
                durability: ferry_shm::proto::Durability::MEMORY,
            }])),
        ]
    }

    #[test]
    fn frames_round_trip() {
        for f in samples() {
            let b = encode(&f);
            assert_eq!(
                u32::from_le_bytes(b[..4].try_into().unwrap()) as usize,
                b.len() - 4
            );
            assert_eq!(decode(&b[4..]).unwrap(), f);
        }
    }

    #[test]
    fn truncated_and_padded_frames_are_refused() {
        for f in samples() {
            let b = encode(&f);
            for cut in 0..b.len() - 4 {
                assert!(decode(&b[4..4 + cut]).is_err(), "{f:?} cut to {cut}");
            }
            let mut long = b[4..].to_vec();
            long.push(0);
            assert!(decode(&long).is_err(), "{f:?} with a stray byte");
        }
    }

    #[test]
    fn oversized_and_cut_frames_end_the_read() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut n = 0;
            let big = ((MAX_FRAME + 1) as u32).to_le_bytes();
            let e = read(&mut &big[..], &mut n).await.unwrap_err();
            assert!(matches!(e, ReadError::Protocol(_)), "{e}");
            let mut cut = encode(&Frame::Welcome);
            cut.extend_from_slice(&100u32.to_le_bytes());
            cut.extend_from_slice(&[0; 10]);
            let mut r = &cut[..];
            assert_eq!(read(&mut r, &mut n).await.unwrap(), Frame::Welcome);
            let e = read(&mut r, &mut n).await.unwrap_err();
            assert!(e.to_string().contains("inside a frame"), "{e}");
            assert!(matches!(
                read(&mut &[][..], &mut n).await,
                Err(ReadError::Closed)
            ));
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// The decoder takes any bytes without panicking, and what it
        /// accepts encodes back to the same bytes.
        #[test]
        fn decoder_takes_any_bytes(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(f) = decode(&body) {
                prop_assert_eq!(&encode(&f)[4..], &body[..]);
            }
        }

        /// Frames with a bit flipped decode to something else or not at all.
        #[test]
        fn flipped_bits_never_panic(i in 0usize..13, bit in 0usize..2048) {
            let b = encode(&samples()[i]);
            let mut body = b[4..].to_vec();
            let at = bit / 8 % body.len();
            body[at] ^= 1 << (bit % 8);
            let _ = decode(&body);
        }
    }
}

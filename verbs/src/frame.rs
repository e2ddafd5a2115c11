//! The soft backend's wire format: a fixed 40-byte little-endian header,
//! then `payload_len` bytes. Everything decoded here comes from the network
//! and is checked; a malformed header is an error, never a panic.

/// Bytes of every header.
pub const HEADER_LEN: usize = 40;
/// Largest payload one frame may carry (1 GiB).
pub const MAX_PAYLOAD: u32 = 1 << 30;
const MAGIC: u16 = 0x4653; // "FS"

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Requester: a send; payload is the message.
    Send = 1,
    /// Requester: an RDMA write to (remote_addr, rkey); payload is the data.
    Write = 2,
    /// Requester: read `read_len` bytes at (remote_addr, rkey).
    ReadReq = 3,
    /// Responder: the data of a read.
    ReadResp = 4,
    /// Responder: request `seq` done.
    Ack = 5,
    /// Responder: request `seq` refused with `status`.
    Nak = 6,
}

/// `flags`: the frame carries immediate data in `imm`.
pub const FLAG_IMM: u16 = 1;
/// `flags` (send, write): answer with an Ack. Answers are cumulative: an
/// Ack, read response or Nak for `seq` also settles every earlier request.
pub const FLAG_ACK_REQ: u16 = 2;

/// Why a responder refused a request (the `status` of a `Nak`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum NakStatus {
    RemoteAccess = 1,
    RemoteInvalidRequest = 2,
    RnrRetryExceeded = 3,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub status: u8,
    pub flags: u16,
    pub payload_len: u32,
    pub imm: u32,
    pub seq: u64,
    pub remote_addr: u64,
    pub rkey: u32,
    pub read_len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("bad magic {0:#06x}")]
    Magic(u16),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("unknown flags {0:#x}")]
    Flags(u16),
    #[error("payload of {0} bytes exceeds the limit")]
    TooLong(u32),
    #[error("{0}")]
    Inconsistent(&'static str),
}

impl Header {
    pub fn new(kind: Kind, seq: u64) -> Header {
        Header {
            kind,
            status: 0,
            flags: 0,
            payload_len: 0,
            imm: 0,
            seq,
            remote_addr: 0,
            rkey: 0,
            read_len: 0,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = self.kind as u8;
        b[3] = self.status;
        b[4..6].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.imm.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.remote_addr.to_le_bytes());
        b[32..36].copy_from_slice(&self.rkey.to_le_bytes());
        b[36..40].copy_from_slice(&self.read_len.to_le_bytes());
        b
    }

    /// Decodes and checks a header received from the peer.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let magic = u16_at(0);
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        let kind = match b[2] {
            1 => Kind::Send,
            2 => Kind::Write,
            3 => Kind::ReadReq,
            4 => Kind::ReadResp,
            5 => Kind::Ack,
            6 => Kind::Nak,
            k => return Err(FrameError::Kind(k)),
        };
        let flags = u16_at(4);
        if flags & !(FLAG_IMM | FLAG_ACK_REQ) != 0 {
            return Err(FrameError::Flags(flags));
        }
        let h = Header {
            kind,
            status: b[3],
            flags,
            payload_len: u32_at(8),
            imm: u32_at(12),
            seq: u64_at(16),
            remote_addr: u64_at(24),
            rkey: u32_at(32),
            read_len: u32_at(36),
        };
        if h.payload_len > MAX_PAYLOAD {
            return Err(FrameError::TooLong(h.payload_len));
        }
        match kind {
            Kind::ReadReq if h.payload_len != 0 => {
                return Err(FrameError::Inconsistent("read request with payload"))
            }
            Kind::ReadReq if h.read_len > MAX_PAYLOAD => {
                return Err(FrameError::TooLong(h.read_len))
            }
            Kind::Ack | Kind::Nak if h.payload_len != 0 => {
                return Err(FrameError::Inconsistent("ack with payload"))
            }
            Kind::Nak if !(1..=3).contains(&h.status) => {
                return Err(FrameError::Inconsistent("unknown nak status"))
            }
            Kind::ReadReq | Kind::ReadResp | Kind::Ack | Kind::Nak if flags != 0 => {
                return Err(FrameError::Inconsistent(
                    "flags on a frame that cannot carry them",
                ))
            }
            _ => {}
        }
        Ok(h)
    }

    pub fn ack_requested(&self) -> bool {
        self.flags & FLAG_ACK_REQ != 0
    }

    pub fn imm(&self) -> Option<u32> {
        (self.flags & FLAG_IMM != 0).then_some(self.imm)
    }
}

/// Walks a byte stream the way the soft reader does: a header, then its
/// payload, repeatedly. Returns the headers of the complete frames, or the
/// first decoding error. (The fuzz target's entry point; the reader applies
/// the same decoding to a socket.)
pub fn walk(mut bytes: &[u8]) -> Result<Vec<Header>, FrameError> {
    let mut out = Vec::new();
    while bytes.len() >= HEADER_LEN {
        let (hb, rest) = bytes.split_at(HEADER_LEN);
        let h = Header::decode(hb.try_into().expect("HEADER_LEN bytes"))?;
        let len = h.payload_len as usize;
        if rest.len() < len {
            break;
        }
        bytes = &rest[len..];
        out.push(h);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_stops_at_the_first_bad_frame() {
        let mut w = Header::new(Kind::Write, 1);
        w.payload_len = 3;
        let mut stream = w.encode().to_vec();
        stream.extend_from_slice(b"abc");
        stream.extend_from_slice(&Header::new(Kind::Ack, 1).encode());
        assert_eq!(walk(&stream).unwrap().len(), 2);
        stream.extend_from_slice(&[0xFF; HEADER_LEN]);
        assert!(walk(&stream).is_err());
    }

    #[test]
    fn round_trip() {
        let mut h = Header::new(Kind::Write, 77);
        h.flags = FLAG_IMM;
        h.imm = 0xDEAD_BEEF;
        h.payload_len = 4096;
        h.remote_addr = 0x1234_5678_9ABC;
        h.rkey = 9;
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        assert_eq!(h.imm(), Some(0xDEAD_BEEF));
    }

    #[test]
    fn malformed_headers_are_errors() {
        let good = Header::new(Kind::Ack, 1).encode();
        let mut b = good;
        b[0] = 0;
        assert!(matches!(Header::decode(&b), Err(FrameError::Magic(_))));
        let mut b = good;
        b[2] = 99;
        assert!(matches!(Header::decode(&b), Err(FrameError::Kind(99))));
        let mut b = good;
        b[4] = 0x80;
        assert!(matches!(Header::decode(&b), Err(FrameError::Flags(_))));
        let mut b = good;
        b[4] = FLAG_ACK_REQ as u8; // flags on an ack
        assert!(matches!(
            Header::decode(&b),
            Err(FrameError::Inconsistent(_))
        ));
        let mut b = good;
        b[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        assert!(Header::decode(&b).is_err());
        let mut b = good;
        b[8] = 1; // an ack with a payload
        assert!(Header::decode(&b).is_err());
        let mut nak = Header::new(Kind::Nak, 1);
        nak.status = 9;
        assert!(Header::decode(&nak.encode()).is_err());
        // Every byte pattern decodes or errs; none panics.
        let mut x = 0x9E37_79B9u32;
        for _ in 0..20_000 {
            let mut b = [0u8; HEADER_LEN];
            for byte in b.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *byte = x as u8;
            }
            b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
            let _ = Header::decode(&b);
        }
    }
}

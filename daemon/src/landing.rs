//! What crosses the fabric with a batch. A consumer's daemon gives each
//! of its trainers that reads a stream homed elsewhere a landing area:
//! `slots` slots laid out as a stream pool (payload, then metadata), and
//! a header table of one [`HEADER_BYTES`] entry per slot. The home daemon
//! writes a batch into a free slot the consumer's daemon credited it
//! with: the header, the metadata, then the payload with an immediate
//! ([`Imm`]) naming the landing area and the slot. One connection keeps
//! the writes in order, so when the immediate arrives, all three are
//! there. An end of epoch travels the same way, in a slot of its own that
//! is credited back at once.
//!
//! A header is read from memory the peer wrote: it is checked before
//! anything in it is used.

/// Bytes of one header entry.
pub const HEADER_BYTES: u64 = 64;

/// What a header says the slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Batch,
    EndOfEpoch,
    /// From a producer on another host: it ended the epoch.
    ProducerEnd,
    /// From a producer on another host: it closed.
    ProducerLeave,
}

/// One header entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// The consumer daemon's id of the member (its trainer's session).
    pub member: u64,
    pub partition: u32,
    pub offset: u64,
    pub len: u64,
    pub meta_len: u32,
    /// The descriptor flags the trainer sees (records, ...).
    pub flags: u16,
    /// The slot of the batch in its home's pool (echoed in the release).
    pub home_slot: u32,
    /// For an end of epoch: the epoch that ended.
    pub epoch: u64,
    /// A producer's partition key (with `flags` saying it has one).
    pub key: u64,
}

const MAGIC_BATCH: u32 = 0x4654_4231; // "FTB1"
const MAGIC_EOE: u32 = 0x4654_4531; // "FTE1"
const MAGIC_PEND: u32 = 0x4654_5031; // "FTP1"
const MAGIC_PLEAVE: u32 = 0x4654_4C31; // "FTL1"

impl Header {
    pub fn encode(&self) -> [u8; HEADER_BYTES as usize] {
        let mut b = [0u8; HEADER_BYTES as usize];
        let magic = match self.kind {
            Kind::Batch => MAGIC_BATCH,
            Kind::EndOfEpoch => MAGIC_EOE,
            Kind::ProducerEnd => MAGIC_PEND,
            Kind::ProducerLeave => MAGIC_PLEAVE,
        };
        b[0..4].copy_from_slice(&magic.to_le_bytes());
        b[4..8].copy_from_slice(&self.partition.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..28].copy_from_slice(&self.meta_len.to_le_bytes());
        b[28..32].copy_from_slice(&self.home_slot.to_le_bytes());
        b[32..34].copy_from_slice(&self.flags.to_le_bytes());
        b[40..48].copy_from_slice(&self.member.to_le_bytes());
        b[48..56].copy_from_slice(&self.epoch.to_le_bytes());
        b[56..64].copy_from_slice(&self.key.to_le_bytes());
        b
    }

    /// A header as read from a landing area; the error says what is wrong.
    pub fn decode(b: &[u8]) -> Result<Header, String> {
        if b.len() < HEADER_BYTES as usize {
            return Err(format!("a header of {} bytes", b.len()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let kind = match u32_at(0) {
            MAGIC_BATCH => Kind::Batch,
            MAGIC_EOE => Kind::EndOfEpoch,
            MAGIC_PEND => Kind::ProducerEnd,
            MAGIC_PLEAVE => Kind::ProducerLeave,
            m => return Err(format!("a header with magic {m:#x}")),
        };
        Ok(Header {
            kind,
            partition: u32_at(4),
            offset: u64_at(8),
            len: u64_at(16),
            meta_len: u32_at(24),
            home_slot: u32_at(28),
            flags: u16::from_le_bytes([b[32], b[33]]),
            member: u64_at(40),
            epoch: u64_at(48),
            key: u64_at(56),
        })
    }
}

/// The immediate of a landing write: the landing area's id (unique among
/// its daemon's live landing areas) and the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Imm {
    pub landing: u16,
    pub slot: u16,
}

impl Imm {
    pub fn encode(self) -> u32 {
        (self.landing as u32) << 16 | self.slot as u32
    }

    pub fn decode(imm: u32) -> Imm {
        Imm {
            landing: (imm >> 16) as u16,
            slot: imm as u16,
        }
    }
}

/// Most slots of one landing area (a slot index fits the immediate).
pub const MAX_LANDING_SLOTS: u32 = 1 << 16;

/// The immediate's slot for a producer's control record (end of epoch,
/// leave), written to the header entry after the pool's slots.
pub const CONTROL_SLOT: u16 = u16::MAX;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_and_immediates_round_trip_and_garbage_is_refused() {
        let h = Header {
            kind: Kind::Batch,
            member: u64::MAX - 3,
            partition: 7,
            offset: 1 << 40,
            len: 9 << 20,
            meta_len: 256,
            flags: 3,
            home_slot: 65535,
            epoch: 0,
            key: 42,
        };
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
        let e = Header {
            kind: Kind::EndOfEpoch,
            epoch: 12,
            ..h
        };
        assert_eq!(Header::decode(&e.encode()).unwrap(), e);
        assert!(Header::decode(&[0u8; 64]).is_err());
        assert!(Header::decode(&h.encode()[..63]).is_err());
        for (landing, slot) in [(0, 0), (1, 2), (u16::MAX, u16::MAX)] {
            let i = Imm { landing, slot };
            assert_eq!(Imm::decode(i.encode()), i);
        }
    }
}

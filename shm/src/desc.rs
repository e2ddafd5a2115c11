//! The fixed-size descriptor carried by both rings of a session.

/// One 64-byte ring entry. `#[repr(C)]`, no pointers: offsets and indices
/// only, so it means the same in every process that maps the ring.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Desc {
    /// One of the `OP_*` constants.
    pub op: u16,
    /// `FLAG_*` bits.
    pub flags: u16,
    /// Reserved; zero.
    pub status: u32,
    /// Stream id (as given when the session was opened).
    pub stream: u32,
    /// Partition of the stream.
    pub partition: u32,
    /// Slot index in the stream's data pool.
    pub slot: u32,
    /// Metadata bytes stored in the slot's metadata area.
    pub meta_len: u32,
    /// Payload bytes in the slot.
    pub len: u64,
    /// Offset of the batch in its partition.
    pub offset: u64,
    /// Partitioning key for `OP_PUBLISH` with `FLAG_HAS_KEY`.
    pub key: u64,
    /// Free for the sender (request ids, timestamps); echoed nowhere.
    pub cookie: u64,
    /// `OP_DELIVER` with `FLAG_DEVICE` (and the matching `OP_RELEASE`):
    /// the slot of the consumer's GPU pool that holds the payload.
    pub dslot: u32,
    /// Reserved; zero.
    pub reserved: u32,
}

const _: () = assert!(std::mem::size_of::<Desc>() == 64);

// Submission ring (client -> daemon).
/// Producer: the slot named by `slot` holds `len` bytes and `meta_len`
/// metadata bytes; put it into the stream.
pub const OP_PUBLISH: u16 = 1;
/// Consumer: done with (`partition`, `offset`) held in `slot`.
pub const OP_RELEASE: u16 = 2;
/// Consumer: record the committed offset. `partition == COMMIT_ALL` commits
/// every partition this consumer owns at its low watermark; otherwise
/// `offset` is committed for `partition`.
pub const OP_COMMIT: u16 = 3;

// Completion ring (daemon -> client).
/// Producer: the slot is yours to fill.
pub const OP_GRANT: u16 = 16;
/// Consumer: a batch (`partition`, `offset`, `slot`, `len`, `meta_len`).
pub const OP_DELIVER: u16 = 17;

/// `OP_PUBLISH`: `key` is valid and picks the partition.
pub const FLAG_HAS_KEY: u16 = 1;

/// `OP_DELIVER`: the payload was copied into the consumer's GPU pool, slot
/// `dslot`; the metadata stays in the stream's (host) pool, slot `slot`.
/// `OP_PUBLISH`: the payload is in the stream's mirror on the producer's
/// GPU (slot `slot` there); the metadata in the host slot.
pub const FLAG_DEVICE: u16 = 2;

/// Producer: this producer is done with the current epoch. When every
/// producer attached to the stream has said so, the daemon puts an end
/// marker into each partition.
pub const OP_END: u16 = 4;

/// Consumer: the group has passed the end marker of every partition (and
/// delivered everything before them): the epoch is over. Carries no batch.
pub const OP_END_OF_EPOCH: u16 = 18;
/// Daemon -> producer: `offset` of its publishes (counted from its first)
/// are acknowledged: as durable as the stream promises (at once for a
/// memory stream). With [`FLAG_STALLED`]: the daemon cannot write the
/// stream's disk log now (a full disk); publishes wait.
pub const OP_ACK: u16 = 19;
/// Daemon -> producer: its end of epoch was taken where the epoch is
/// decided (this daemon, or the stream's home on another host): `offset`
/// of its `OP_END`s so far. Its `flush` waits for them.
pub const OP_END_TAKEN: u16 = 20;
/// On `OP_ACK`: writes to the stream's disk log fail; no slot is granted
/// until they succeed again.
pub const FLAG_STALLED: u16 = 16;

/// `OP_RELEASE`: after this release, commit every partition this consumer
/// owns at its low watermark (automatic commit).
pub const FLAG_COMMIT: u16 = 4;

/// `OP_PUBLISH` and `OP_DELIVER`: the payload is a typed record (a field
/// table, then the fields; see libferry's `record` module).
pub const FLAG_RECORD: u16 = 8;

/// `OP_COMMIT` partition value meaning "every partition I own".
pub const COMMIT_ALL: u32 = u32::MAX;

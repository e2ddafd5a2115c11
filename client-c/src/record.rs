//! Typed records: a batch payload made of named fields (tensors with
//! dtype, shape, strides and byte order; bytes; UTF-8 strings; integers;
//! floats; booleans), described by a small table at the start of the
//! payload, so that a consumer gets the structure back without being told
//! it, and a wrong view of the bytes cannot be taken by accident.
//!
//! Layout (all integers little-endian; offsets from the payload start):
//!
//! ```text
//! header, 16 bytes:  u32 magic "FRC1" | u16 version 1 | u16 nfields
//!                    | u32 data_start (end of the table, a multiple of 64)
//!                    | u32 reserved 0
//! nfields entries of 224 bytes each:
//!   0  char name[64]   UTF-8, 1-63 bytes, NUL-terminated, zero-padded
//!   64 u8 kind         FERRY_FIELD_*
//!   65 u8 dtype        FERRY_DTYPE_* (tensors; 0 otherwise)
//!   66 u8 ndim         0-8 (tensors; 0 otherwise)
//!   67 u8 byte_order   0 little-endian, 1 big-endian
//!   68 u32 reserved 0
//!   72 u64 offset      where the field's bytes start (>= data_start;
//!                      tensors: a multiple of the element size)
//!   80 u64 len         how many bytes it has
//!   88 u64 shape[8]    (tensors; unused dimensions 0)
//!   152 u64 strides[8] in elements, not bytes (tensors)
//!   216 u64 reserved 0
//! then the fields' bytes: tensors from a 64-byte boundary, numbers from
//! an 8-byte one.
//! ```
//!
//! An integer field is 8 bytes (i64), a float 8 bytes (f64), a boolean 1
//! byte (0 or 1). Every field is one contiguous range of the payload, so
//! it can be read, copied or (later) delivered on its own.
//!
//! The writer works on a slot through raw pointers (the pool is shared
//! memory); the parser works on a private copy of the table, checks every
//! bound, and never trusts the producer.

use std::ffi::CString;

pub const MAGIC: u32 = u32::from_le_bytes(*b"FRC1");
pub const VERSION: u16 = 1;
pub const HEADER: u64 = 16;
pub const ENTRY: u64 = 224;
pub const NAME_MAX: usize = 63;
pub const MAX_DIMS: usize = 8;
pub const MAX_FIELDS: u32 = 256;
const ALIGN: u64 = 64;

pub const KIND_TENSOR: u8 = 1;
pub const KIND_BYTES: u8 = 2;
pub const KIND_STR: u8 = 3;
pub const KIND_INT: u8 = 4;
pub const KIND_FLOAT: u8 = 5;
pub const KIND_BOOL: u8 = 6;

/// Element size of each `FERRY_DTYPE_*` (index = code; 0: not a dtype).
const ITEMSIZE: [u64; 14] = [0, 1, 1, 2, 2, 4, 4, 8, 8, 2, 2, 4, 8, 1];

pub fn itemsize(dtype: u8) -> Option<u64> {
    ITEMSIZE.get(dtype as usize).copied().filter(|&s| s > 0)
}

fn round_up(v: u64, to: u64) -> Option<u64> {
    v.checked_add(to - 1).map(|x| x / to * to)
}

/// Bytes a tensor of `shape` and `strides` (elements) spans.
pub fn tensor_extent(itemsize: u64, shape: &[u64], strides: &[u64]) -> Option<u64> {
    if shape.contains(&0) {
        return Some(0);
    }
    let mut last = 0u64;
    for (&n, &s) in shape.iter().zip(strides) {
        last = last.checked_add((n - 1).checked_mul(s)?)?;
    }
    last.checked_add(1)?.checked_mul(itemsize)
}

/// C-contiguous strides (elements) of `shape`.
pub fn contiguous_strides(shape: &[u64]) -> Vec<u64> {
    let mut strides = vec![0u64; shape.len()];
    let mut acc = 1u64;
    for i in (0..shape.len()).rev() {
        strides[i] = acc;
        acc = acc.saturating_mul(shape[i].max(1));
    }
    strides
}

/// A record being written into a reserved slot.
#[derive(Debug, Clone, Copy)]
pub struct Writer {
    base: *mut u8,
    capacity: u64,
    /// Bytes used so far (table included).
    used: u64,
    nfields: u32,
    added: u32,
}

/// One field to add.
pub struct NewField<'a> {
    pub name: &'a str,
    pub kind: u8,
    pub dtype: u8,
    pub big_endian: bool,
    pub shape: &'a [u64],
    /// None: C-contiguous.
    pub strides: Option<&'a [u64]>,
    /// Bytes of a non-tensor field (tensors: computed from the shape).
    pub len: u64,
}

impl Writer {
    /// Starts a record of `nfields` fields in `[base, base + capacity)`,
    /// which the caller owns (a reserved slot) for the writer's lifetime.
    pub fn begin(base: *mut u8, capacity: u64, nfields: u32) -> Result<Writer, String> {
        if base.is_null() {
            return Err(
                "the slot has no host memory (typed records are written from host memory)".into(),
            );
        }
        if nfields == 0 || nfields > MAX_FIELDS {
            return Err(format!("a record has 1-{MAX_FIELDS} fields, not {nfields}"));
        }
        let data_start = round_up(HEADER + ENTRY * nfields as u64, ALIGN).expect("small");
        if data_start > capacity {
            return Err(format!(
                "a table of {nfields} fields takes {data_start} bytes, more than the {capacity}-byte slot"
            ));
        }
        let mut header = [0u8; HEADER as usize];
        header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        header[4..6].copy_from_slice(&VERSION.to_le_bytes());
        header[6..8].copy_from_slice(&(nfields as u16).to_le_bytes());
        header[8..12].copy_from_slice(&(data_start as u32).to_le_bytes());
        let w = Writer {
            base,
            capacity,
            used: data_start,
            nfields,
            added: 0,
        };
        w.put(0, &header);
        Ok(w)
    }

    /// Raw state, for the C ABI's caller-allocated writer.
    pub fn to_raw(self) -> (*mut u8, u64, u64, u32, u32) {
        (
            self.base,
            self.capacity,
            self.used,
            self.nfields,
            self.added,
        )
    }

    /// # Safety
    /// The values come from `to_raw` of a writer whose slot is still
    /// reserved by the caller.
    pub unsafe fn from_raw(
        base: *mut u8,
        capacity: u64,
        used: u64,
        nfields: u32,
        added: u32,
    ) -> Writer {
        Writer {
            base,
            capacity,
            used,
            nfields,
            added,
        }
    }

    fn put(&self, at: u64, bytes: &[u8]) {
        debug_assert!(at + bytes.len() as u64 <= self.capacity);
        // SAFETY: callers check `at + len <= capacity`; `base..base+capacity`
        // is the caller's reserved slot (begin's contract), which nobody else
        // reads or writes until it is published; a raw copy forms no
        // reference to the shared memory.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(at as usize), bytes.len())
        }
    }

    fn name_at(&self, i: u32) -> [u8; 64] {
        let mut name = [0u8; 64];
        // SAFETY: entry `i < added <= nfields` lies inside the table, which
        // begin checked fits the slot.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.add((HEADER + ENTRY * i as u64) as usize),
                name.as_mut_ptr(),
                64,
            )
        };
        name
    }

    /// Adds a field and returns where its bytes go (an offset from the
    /// payload start); the caller writes them there.
    pub fn add(&mut self, f: &NewField) -> Result<u64, String> {
        if self.added >= self.nfields {
            return Err(format!(
                "the record was begun with {} fields; all are added",
                self.nfields
            ));
        }
        let name = f.name.as_bytes();
        if name.is_empty() || name.len() > NAME_MAX || name.contains(&0) {
            return Err(format!(
                "field name {:?} must be 1-{NAME_MAX} bytes of UTF-8 without NUL",
                f.name
            ));
        }
        for i in 0..self.added {
            let other = self.name_at(i);
            if &other[..name.len()] == name && other[name.len()] == 0 {
                return Err(format!("the record already has a field named {:?}", f.name));
            }
        }
        let mut shape = [0u64; MAX_DIMS];
        let mut strides = [0u64; MAX_DIMS];
        let (len, align, ndim) = match f.kind {
            KIND_TENSOR => {
                let size = itemsize(f.dtype)
                    .ok_or_else(|| format!("field {:?}: unknown dtype {}", f.name, f.dtype))?;
                if f.shape.len() > MAX_DIMS {
                    return Err(format!(
                        "field {:?}: {} dimensions, at most {MAX_DIMS}",
                        f.name,
                        f.shape.len()
                    ));
                }
                let st = match f.strides {
                    Some(s) if s.len() != f.shape.len() => {
                        return Err(format!(
                            "field {:?}: {} strides for {} dimensions",
                            f.name,
                            s.len(),
                            f.shape.len()
                        ))
                    }
                    Some(s) => s.to_vec(),
                    None => contiguous_strides(f.shape),
                };
                shape[..f.shape.len()].copy_from_slice(f.shape);
                strides[..st.len()].copy_from_slice(&st);
                let len = tensor_extent(size, f.shape, &st)
                    .ok_or_else(|| format!("field {:?}: shape {:?} overflows", f.name, f.shape))?;
                (len, ALIGN, f.shape.len() as u8)
            }
            KIND_BYTES | KIND_STR => (f.len, 1, 0),
            KIND_INT | KIND_FLOAT => (8, 8, 0),
            KIND_BOOL => (1, 1, 0),
            k => return Err(format!("field {:?}: unknown kind {k}", f.name)),
        };
        let offset = round_up(self.used, align).ok_or("record too large")?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.capacity)
            .ok_or_else(|| {
                format!(
                    "field {:?} ({len} bytes) does not fit: the {}-byte slot has {} bytes left",
                    f.name,
                    self.capacity,
                    self.capacity.saturating_sub(offset)
                )
            })?;
        let mut e = [0u8; ENTRY as usize];
        e[..name.len()].copy_from_slice(name);
        e[64] = f.kind;
        e[65] = if f.kind == KIND_TENSOR { f.dtype } else { 0 };
        e[66] = ndim;
        e[67] = f.big_endian as u8;
        e[72..80].copy_from_slice(&offset.to_le_bytes());
        e[80..88].copy_from_slice(&len.to_le_bytes());
        for d in 0..MAX_DIMS {
            e[88 + 8 * d..96 + 8 * d].copy_from_slice(&shape[d].to_le_bytes());
            e[152 + 8 * d..160 + 8 * d].copy_from_slice(&strides[d].to_le_bytes());
        }
        self.put(HEADER + ENTRY * self.added as u64, &e);
        self.added += 1;
        self.used = end;
        Ok(offset)
    }

    /// Adds a field whose bytes are `data` (bytes, str, int, float, bool).
    pub fn add_copy(&mut self, name: &str, kind: u8, data: &[u8]) -> Result<u64, String> {
        if kind == KIND_STR && std::str::from_utf8(data).is_err() {
            return Err(format!("field {name:?}: a str field must be UTF-8"));
        }
        let off = self.add(&NewField {
            name,
            kind,
            dtype: 0,
            big_endian: false,
            shape: &[],
            strides: None,
            len: data.len() as u64,
        })?;
        self.put(off, data);
        Ok(off)
    }

    /// The record's length, once every field was added.
    pub fn finish(&self) -> Result<u64, String> {
        if self.added != self.nfields {
            return Err(format!(
                "the record was begun with {} fields and has {}",
                self.nfields, self.added
            ));
        }
        Ok(self.used)
    }
}

/// A field of a received record, checked.
#[derive(Debug, Clone)]
pub struct Field {
    pub name: CString,
    pub kind: u8,
    pub dtype: u8,
    pub ndim: u8,
    pub big_endian: bool,
    pub offset: u64,
    pub len: u64,
    pub shape: [u64; MAX_DIMS],
    pub strides: [u64; MAX_DIMS],
    pub int_value: i64,
    pub float_value: f64,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses and checks a record of `len` bytes; `read(offset, buf)` copies
/// payload bytes (false when out of range). Everything is checked: a
/// malformed record is an error naming what is wrong, never a panic or an
/// out-of-bounds view.
pub fn parse(len: u64, read: &dyn Fn(u64, &mut [u8]) -> bool) -> Result<Vec<Field>, String> {
    let mut header = [0u8; HEADER as usize];
    if len < HEADER || !read(0, &mut header) {
        return Err(format!("{len} bytes are too short for a record header"));
    }
    let magic = u32::from_le_bytes(header[0..4].try_into().expect("4"));
    let version = u16::from_le_bytes(header[4..6].try_into().expect("2"));
    let nfields = u16::from_le_bytes(header[6..8].try_into().expect("2")) as u64;
    let data_start = u32::from_le_bytes(header[8..12].try_into().expect("4")) as u64;
    if magic != MAGIC {
        return Err(format!("bad magic {magic:#x} (not a Ferry record)"));
    }
    if version != VERSION {
        return Err(format!(
            "record version {version}, this libferry reads {VERSION}"
        ));
    }
    if nfields == 0 || nfields > MAX_FIELDS as u64 {
        return Err(format!("{nfields} fields (1-{MAX_FIELDS})"));
    }
    let table_end = HEADER + ENTRY * nfields;
    if data_start < table_end || data_start > len {
        return Err(format!(
            "data start {data_start} is not between the table's end {table_end} and the record's end {len}"
        ));
    }
    let mut table = vec![0u8; (ENTRY * nfields) as usize];
    if !read(HEADER, &mut table) {
        return Err("field table out of range".into());
    }
    let mut fields: Vec<Field> = Vec::with_capacity(nfields as usize);
    for (i, e) in table.chunks_exact(ENTRY as usize).enumerate() {
        let nul = e[..64]
            .iter()
            .position(|&b| b == 0)
            .ok_or(format!("field {i}: name not NUL-terminated"))?;
        let name =
            std::str::from_utf8(&e[..nul]).map_err(|_| format!("field {i}: name not UTF-8"))?;
        if name.is_empty() {
            return Err(format!("field {i}: empty name"));
        }
        if fields.iter().any(|f| f.name.as_bytes() == name.as_bytes()) {
            return Err(format!("field name {name:?} appears twice"));
        }
        let (kind, dtype, ndim, order) = (e[64], e[65], e[66], e[67]);
        let offset = u64_at(e, 72);
        let flen = u64_at(e, 80);
        let bad = |m: String| format!("field {name:?}: {m}");
        if order > 1 {
            return Err(bad(format!("byte order {order}")));
        }
        let end = offset
            .checked_add(flen)
            .ok_or_else(|| bad("range overflows".into()))?;
        if offset < data_start || end > len {
            return Err(bad(format!(
                "bytes [{offset}, {end}) outside the record's data [{data_start}, {len})"
            )));
        }
        let mut shape = [0u64; MAX_DIMS];
        let mut strides = [0u64; MAX_DIMS];
        let (mut int_value, mut float_value) = (0i64, 0f64);
        match kind {
            KIND_TENSOR => {
                let size = itemsize(dtype).ok_or_else(|| bad(format!("unknown dtype {dtype}")))?;
                if ndim as usize > MAX_DIMS {
                    return Err(bad(format!("{ndim} dimensions")));
                }
                for d in 0..MAX_DIMS {
                    shape[d] = u64_at(e, 88 + 8 * d);
                    strides[d] = u64_at(e, 152 + 8 * d);
                }
                let n = ndim as usize;
                let extent = tensor_extent(size, &shape[..n], &strides[..n])
                    .ok_or_else(|| bad("shape and strides overflow".into()))?;
                if extent > flen {
                    return Err(bad(format!(
                        "shape {:?} strides {:?} span {extent} bytes, the field has {flen}",
                        &shape[..n],
                        &strides[..n]
                    )));
                }
                if !offset.is_multiple_of(size) {
                    return Err(bad(format!(
                        "offset {offset} not aligned to its {size}-byte elements"
                    )));
                }
            }
            KIND_BYTES => {}
            KIND_STR => {
                let mut s = vec![0u8; flen as usize];
                if !read(offset, &mut s) || std::str::from_utf8(&s).is_err() {
                    return Err(bad("str field is not UTF-8".into()));
                }
            }
            KIND_INT | KIND_FLOAT | KIND_BOOL => {
                let want = if kind == KIND_BOOL { 1 } else { 8 };
                if flen != want {
                    return Err(bad(format!("{flen} bytes, a number has {want}")));
                }
                let mut v = [0u8; 8];
                if !read(offset, &mut v[..want as usize]) {
                    return Err(bad("out of range".into()));
                }
                let raw = if order == 1 && want == 8 {
                    u64::from_be_bytes(v)
                } else {
                    u64::from_le_bytes(v)
                };
                match kind {
                    KIND_INT => int_value = raw as i64,
                    KIND_FLOAT => float_value = f64::from_bits(raw),
                    _ => {
                        if v[0] > 1 {
                            return Err(bad(format!("bool byte {}", v[0])));
                        }
                        int_value = v[0] as i64;
                    }
                }
            }
            k => return Err(bad(format!("unknown kind {k}"))),
        }
        fields.push(Field {
            name: CString::new(name).expect("no NUL inside (checked)"),
            kind,
            dtype,
            ndim: if kind == KIND_TENSOR { ndim } else { 0 },
            big_endian: order == 1,
            offset,
            len: flen,
            shape,
            strides,
            int_value,
            float_value,
        });
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(buf: &[u8]) -> impl Fn(u64, &mut [u8]) -> bool + '_ {
        move |off, out| {
            let Some(end) = off.checked_add(out.len() as u64) else {
                return false;
            };
            if end > buf.len() as u64 {
                return false;
            }
            out.copy_from_slice(&buf[off as usize..end as usize]);
            true
        }
    }

    fn sample(buf: &mut [u8]) -> u64 {
        let mut w = Writer::begin(buf.as_mut_ptr(), buf.len() as u64, 4).unwrap();
        let off = w
            .add(&NewField {
                name: "image",
                kind: KIND_TENSOR,
                dtype: 11,
                big_endian: false,
                shape: &[2, 3],
                strides: None,
                len: 0,
            })
            .unwrap();
        assert_eq!(off % 64, 0);
        for i in 0..6u32 {
            buf[off as usize + 4 * i as usize..][..4].copy_from_slice(&(i as f32).to_le_bytes());
        }
        w.add_copy("label", KIND_INT, &7i64.to_le_bytes()).unwrap();
        w.add_copy("caption", KIND_STR, "a cat".as_bytes()).unwrap();
        assert!(w
            .add_copy("label", KIND_INT, &1i64.to_le_bytes())
            .unwrap_err()
            .contains("already"));
        assert!(w.finish().is_err(), "3 of 4 fields");
        w.add_copy("ok", KIND_BOOL, &[1]).unwrap();
        assert!(w.add_copy("more", KIND_BOOL, &[1]).is_err(), "all added");
        w.finish().unwrap()
    }

    #[test]
    fn round_trip() {
        let mut buf = vec![0u8; 4096];
        let len = sample(&mut buf);
        let f = parse(len, &reader(&buf)).unwrap();
        assert_eq!(f.len(), 4);
        assert_eq!(f[0].name.to_str().unwrap(), "image");
        assert_eq!(
            (f[0].ndim, &f[0].shape[..2], &f[0].strides[..2], f[0].len),
            (2, &[2u64, 3][..], &[3u64, 1][..], 24)
        );
        assert_eq!(f[1].int_value, 7);
        assert_eq!(f[2].len, 5);
        assert_eq!((f[3].kind, f[3].int_value), (KIND_BOOL, 1));
    }

    #[test]
    fn writer_refuses_what_does_not_fit() {
        let mut buf = vec![0u8; 512];
        assert!(
            Writer::begin(buf.as_mut_ptr(), 100, 1).is_err(),
            "table alone too large"
        );
        let mut w = Writer::begin(buf.as_mut_ptr(), 512, 2).unwrap();
        let big = NewField {
            name: "t",
            kind: KIND_TENSOR,
            dtype: 12,
            big_endian: false,
            shape: &[1000],
            strides: None,
            len: 0,
        };
        assert!(w.add(&big).unwrap_err().contains("does not fit"));
        assert!(w.add_copy("s", KIND_STR, &[0xff]).is_err(), "not UTF-8");
        assert!(
            w.add_copy(&"x".repeat(64), KIND_BYTES, b"").is_err(),
            "name too long"
        );
    }

    /// Every single-byte corruption of the table is either still a valid
    /// record whose views stay inside the payload, or an error: never a
    /// panic or an out-of-range view.
    #[test]
    fn corrupt_tables_are_errors_not_overruns() {
        let mut buf = vec![0u8; 4096];
        let len = sample(&mut buf);
        let table = (HEADER + 4 * ENTRY) as usize;
        for at in 0..table {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut b = buf.clone();
                b[at] = v;
                let parsed = parse(len, &reader(&b));
                if let Ok(fields) = parsed {
                    for f in fields {
                        assert!(f.offset + f.len <= len, "field outside the record");
                        if f.kind == KIND_TENSOR {
                            let n = f.ndim as usize;
                            let e = tensor_extent(
                                itemsize(f.dtype).unwrap(),
                                &f.shape[..n],
                                &f.strides[..n],
                            )
                            .unwrap();
                            assert!(e <= f.len);
                        }
                    }
                }
            }
        }
        assert!(parse(8, &reader(&buf)).is_err());
        assert!(parse(len, &reader(&buf[..100])).is_err(), "short buffer");
    }
}

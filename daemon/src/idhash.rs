//! A fast hasher for the hot maps keyed by numbers ferryd hands out itself
//! (slot indices, partition offsets). std's SipHash guards against keys
//! chosen to collide; these keys are never chosen by a client (a client's
//! release only looks a key up, it never inserts one), so a multiply-mix
//! is enough, and it shows in the hand-off path's profile.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

/// splitmix64's finaliser: every input bit reaches every output bit, so
/// hashbrown's use of the top bits for its control bytes stays spread.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = mix(self.0 ^ b as u64);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = mix(self.0.rotate_left(5) ^ n);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
pub type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_keys_spread_over_the_top_bits() {
        let tops: HashSet<u64> = (0..1024u64)
            .map(|k| {
                let mut h = IdHasher::default();
                h.write_u64(k);
                h.finish() >> 57
            })
            .collect();
        assert!(
            tops.len() > 100,
            "only {} of 128 top-7-bit values",
            tops.len()
        );
    }
}

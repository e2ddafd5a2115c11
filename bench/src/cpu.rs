//! CPU time spent by every process of a case, from getrusage: this process
//! (and its threads) plus every child it has waited for. A case starts the
//! processes it needs (ferryd included) and waits for all of them before
//! its meter is read, so nothing else of the benchmark is counted, and a
//! daemon left spinning would show up as cost.

/// User plus system seconds of this process and its waited-for children.
pub fn used_s() -> f64 {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage writes one `rusage` into the zeroed value we
        // pass, and reads nothing else.
        let ru = unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            if libc::getrusage(who, &mut ru) != 0 {
                continue;
            }
            ru
        };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        total += tv(ru.ru_utime) + tv(ru.ru_stime);
    }
    total
}

/// What one case cost: CPU seconds over the bytes and batches it moved.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    pub cpu_s: f64,
    pub bytes: f64,
    pub batches: f64,
}

impl Cost {
    /// CPU seconds spent since `start` (a [`used_s`] reading) moving
    /// `batches` batches of `size` bytes.
    pub fn since(start: f64, batches: f64, size: f64) -> Cost {
        Cost {
            cpu_s: (used_s() - start).max(0.0),
            bytes: batches * size,
            batches,
        }
    }

    pub fn s_per_gib(&self) -> f64 {
        if self.bytes > 0.0 {
            self.cpu_s / (self.bytes / (1u64 << 30) as f64)
        } else {
            f64::NAN
        }
    }

    pub fn us_per_batch(&self) -> f64 {
        if self.batches > 0.0 {
            self.cpu_s * 1e6 / self.batches
        } else {
            f64::NAN
        }
    }
}

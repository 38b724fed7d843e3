//! What guests may write to the node's log: each message escaped (a guest cannot start
//! a line of its own and forge the node's), cut to `MESSAGE_BYTES_MAX`, at most
//! `TXN_BYTES_MAX` per transaction (on one node) and, per function, at the rate of a
//! token bucket; what is dropped is counted and reported.
//!
//! Leaves the logging itself (and the function and transaction it is tagged with) to
//! `host`.

use std::fmt::Write as _;
use std::time::Instant;

use parking_lot::Mutex;

/// Bytes of one message that reach the log; the rest is cut (the line says how much).
pub const MESSAGE_BYTES_MAX: usize = 2 << 10;
/// Bytes one transaction's guests may log on one node, every function it calls there
/// included.
pub const TXN_BYTES_MAX: usize = 16 << 10;
/// Bytes per second one function may log, over all its transactions...
pub const FUNCTION_BYTES_PER_S: u64 = 64 << 10;
/// ...after a burst of this many.
pub const FUNCTION_BURST_BYTES: u64 = 256 << 10;

/// One function's log rate: a token bucket of bytes.
#[derive(Debug)]
pub struct Budget {
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    bytes: u64,
    refilled_at: Option<Instant>,
    /// Messages and bytes dropped since the last message let through.
    dropped: Dropped,
}

/// Messages and bytes that did not reach the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub messages: u64,
    pub bytes: u64,
}

impl Dropped {
    pub fn add(&mut self, bytes: usize) {
        self.messages += 1;
        self.bytes += bytes as u64;
    }

    pub fn any(&self) -> bool {
        self.messages > 0
    }
}

impl Default for Budget {
    fn default() -> Budget {
        Budget {
            bucket: Mutex::new(Bucket {
                bytes: FUNCTION_BURST_BYTES,
                refilled_at: None,
                dropped: Dropped::default(),
            }),
        }
    }
}

impl Budget {
    /// Take `bytes` from the bucket at `now`: what was dropped since the last message let
    /// through (to be reported with this one), or `None` when this one is dropped too.
    pub fn take(&self, bytes: usize, now: Instant) -> Option<Dropped> {
        let mut bucket = self.bucket.lock();
        let elapsed = bucket
            .refilled_at
            .map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        let refill = (elapsed * FUNCTION_BYTES_PER_S as f64) as u64;
        if refill > 0 || bucket.refilled_at.is_none() {
            bucket.bytes = (bucket.bytes + refill).min(FUNCTION_BURST_BYTES);
            bucket.refilled_at = Some(now);
        }
        let bytes = bytes as u64;
        if bucket.bytes < bytes {
            bucket.dropped.add(bytes as usize);
            return None;
        }
        bucket.bytes -= bytes;
        Some(std::mem::take(&mut bucket.dropped))
    }
}

/// `message` as one line: control characters (newlines, carriage returns, escape
/// sequences) written as Rust-style escapes, and anything past `MESSAGE_BYTES_MAX` cut.
pub fn escape(message: &str) -> String {
    let mut line = String::with_capacity(message.len().min(MESSAGE_BYTES_MAX) + 16);
    for (at, c) in message.char_indices() {
        if line.len() >= MESSAGE_BYTES_MAX {
            let _ = write!(line, "... ({} more bytes cut)", message.len() - at);
            break;
        }
        match c {
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push_str("\\t"),
            '\\' => line.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(line, "\\u{{{:x}}}", c as u32);
            }
            c => line.push(c),
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_guest_cannot_start_a_line_of_its_own() {
        let forged = "ok\n2026-01-01T00:00:00Z  WARN understudy::node: forged\r\x1b[2K";
        let line = escape(forged);
        assert!(!line.contains('\n') && !line.contains('\r') && !line.contains('\x1b'));
        assert_eq!(
            line,
            "ok\\n2026-01-01T00:00:00Z  WARN understudy::node: forged\\r\\u{1b}[2K"
        );
    }

    #[test]
    fn long_messages_are_cut_and_say_so() {
        let line = escape(&"x".repeat(MESSAGE_BYTES_MAX * 3));
        assert!(line.len() < MESSAGE_BYTES_MAX + 64);
        assert!(line.ends_with(&format!("({} more bytes cut)", MESSAGE_BYTES_MAX * 2)));
    }

    #[test]
    fn the_bucket_drops_past_the_burst_counts_and_refills() {
        let budget = Budget::default();
        let start = Instant::now();
        let chunk = (FUNCTION_BURST_BYTES / 4) as usize;
        for _ in 0..4 {
            assert_eq!(budget.take(chunk, start), Some(Dropped::default()));
        }
        assert_eq!(budget.take(chunk, start), None);
        assert_eq!(budget.take(10, start), None);
        let later = start + Duration::from_secs(1);
        assert_eq!(
            budget.take(10, later),
            Some(Dropped {
                messages: 2,
                bytes: chunk as u64 + 10
            })
        );
    }
}

//! The frame format of the control plane's files, and reading frames back with the
//! distinction between a torn tail (a write cut off by a crash: dropped) and damage in
//! the middle (refused). A frame is `[payload length u32][crc32 of payload u32][payload]`,
//! little-endian; payloads are never empty, so a run of zeros is never a valid frame.
//! This module does no I/O: it encodes into and decodes from byte slices.

use std::ops::Range;

pub const FRAME_HEADER_LEN: usize = 8;
/// A frame longer than this is damage, not data: control records are kilobytes.
pub const PAYLOAD_LEN_MAX: usize = 64 << 20;

/// Append one frame holding `payload` to `out`.
///
/// Fails, appending nothing, when `payload` is empty or longer than [`PAYLOAD_LEN_MAX`].
pub fn encode(out: &mut Vec<u8>, payload: &[u8]) -> Result<(), String> {
    if payload.is_empty() || payload.len() > PAYLOAD_LEN_MAX {
        return Err(format!(
            "a record must encode to 1 byte to {PAYLOAD_LEN_MAX} bytes, got {}",
            payload.len()
        ));
    }
    let len = u32::try_from(payload.len()).map_err(|e| e.to_string())?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// What reading a run of frames found.
#[derive(Debug, PartialEq, Eq)]
pub struct Scan {
    /// Where each good payload lies in the input.
    pub payloads: Vec<Range<usize>>,
    /// Where the good frames end: the input's length unless the tail was torn.
    pub len_valid: usize,
    /// Why the tail was cut, when it was.
    pub torn: Option<String>,
}

/// Damage before the last good frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Damage {
    pub offset: usize,
    pub reason: String,
}

/// Read the frames in `bytes` from `start` to the end. A bad frame with no good frame
/// anywhere after it is a torn tail, reported in [`Scan::torn`]; a bad frame followed by a
/// good one is damage.
pub fn scan(bytes: &[u8], start: usize) -> Result<Scan, Damage> {
    let mut payloads = Vec::new();
    let mut offset = start;
    while offset < bytes.len() {
        match frame_at(bytes, offset) {
            Ok(payload) => {
                offset = payload.end;
                payloads.push(payload);
            }
            Err(reason) => {
                if let Some(good) = (offset + 1..bytes.len()).find(|p| frame_at(bytes, *p).is_ok())
                {
                    return Err(Damage {
                        offset,
                        reason: format!("{reason}, yet a good frame follows at offset {good}"),
                    });
                }
                return Ok(Scan {
                    payloads,
                    len_valid: offset,
                    torn: Some(format!("{reason} at offset {offset}")),
                });
            }
        }
    }
    Ok(Scan {
        payloads,
        len_valid: offset,
        torn: None,
    })
}

/// The payload of the frame starting at `offset`, or why there is none.
fn frame_at(bytes: &[u8], offset: usize) -> Result<Range<usize>, String> {
    let header = bytes
        .get(offset..offset + FRAME_HEADER_LEN)
        .ok_or_else(|| {
            format!(
                "frame header cut short ({} bytes left)",
                bytes.len() - offset
            )
        })?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len > PAYLOAD_LEN_MAX {
        return Err(format!("frame length {len} out of range"));
    }
    let payload = offset + FRAME_HEADER_LEN..offset + FRAME_HEADER_LEN + len;
    let data = bytes
        .get(payload.clone())
        .ok_or_else(|| format!("frame of {len} bytes cut short"))?;
    if crc32fast::hash(data) != crc {
        return Err("frame checksum mismatch".to_owned());
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            encode(&mut out, p).expect("test payloads fit");
        }
        out
    }

    #[test]
    fn empty_and_oversized_payloads_are_refused() {
        let mut out = Vec::new();
        assert!(encode(&mut out, b"").is_err());
        assert!(encode(&mut out, &vec![1u8; PAYLOAD_LEN_MAX + 1]).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn good_frames_read_back() {
        let bytes = frames(&[b"one", b"two", b"three"]);
        let scan = scan(&bytes, 0).expect("no damage");
        let read: Vec<&[u8]> = scan.payloads.iter().map(|r| &bytes[r.clone()]).collect();
        assert_eq!(read, vec![&b"one"[..], b"two", b"three"]);
        assert_eq!(scan.len_valid, bytes.len());
        assert_eq!(scan.torn, None);
    }

    #[test]
    fn torn_tail_is_cut_at_the_last_good_frame() {
        let good = frames(&[b"one", b"two"]);
        let mut bytes = good.clone();
        bytes.extend_from_slice(&frames(&[b"three"])[..6]);
        let scan = scan(&bytes, 0).expect("a torn tail is not damage");
        assert_eq!(scan.payloads.len(), 2);
        assert_eq!(scan.len_valid, good.len());
        assert!(scan.torn.is_some());
    }

    #[test]
    fn zeroed_tail_is_torn_not_damage() {
        let mut bytes = frames(&[b"one"]);
        let len = bytes.len();
        bytes.extend_from_slice(&[0u8; 4096]);
        let scan = scan(&bytes, 0).expect("zeros are a torn tail");
        assert_eq!(scan.len_valid, len);
    }

    #[test]
    fn damage_before_a_good_frame_is_refused() {
        let mut bytes = frames(&[b"one", b"two", b"three"]);
        bytes[FRAME_HEADER_LEN] ^= 0xff;
        let damage = scan(&bytes, 0).expect_err("a flipped byte mid-file is damage");
        assert_eq!(damage.offset, 0);
    }
}

//! FLV container framing for the load tool: the clip ffmpeg encodes is an FLV file, what the
//! pacer feeds the publishing ffmpeg is an FLV stream, and node-media-server's WS-FLV viewers
//! receive one too. Tag bodies are parsed by `onair_protocol::flv`; this is only the envelope
//! (design.md: no FLV crate is fit; flv-rs reads whole files and panics on bad input).

use bytes::Bytes;

pub const TAG_AUDIO: u8 = 8;
pub const TAG_VIDEO: u8 = 9;
pub const TAG_SCRIPT: u8 = 18;

const HEADER_LEN: usize = 9;
const TAG_HEADER_LEN: usize = 11;

/// One FLV tag: its type, timestamp in milliseconds and body.
#[derive(Debug, Clone)]
pub struct Tag {
    pub kind: u8,
    pub ts: u32,
    pub body: Bytes,
}

/// The 13 bytes that open an FLV stream (header plus PreviousTagSize0).
pub fn stream_header(audio: bool, video: bool) -> [u8; 13] {
    let flags = (u8::from(audio) << 2) | u8::from(video);
    [b'F', b'L', b'V', 1, flags, 0, 0, 0, 9, 0, 0, 0, 0]
}

/// Appends `tag` framed as FLV (tag header, body, PreviousTagSize) to `out`.
pub fn write_tag(out: &mut Vec<u8>, kind: u8, ts: u32, body: &[&[u8]]) {
    let len: usize = body.iter().map(|b| b.len()).sum();
    assert!(len < 1 << 24, "FLV tag body of {len} bytes");
    let len = len as u32;
    out.push(kind);
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&ts.to_be_bytes()[1..]);
    out.push((ts >> 24) as u8);
    out.extend_from_slice(&[0, 0, 0]);
    for b in body {
        out.extend_from_slice(b);
    }
    out.extend_from_slice(&(len + TAG_HEADER_LEN as u32).to_be_bytes());
}

/// Incremental FLV stream reader: feed it bytes in any chunking, take out whole tags.
#[derive(Default)]
pub struct Reader {
    buf: Vec<u8>,
    header_done: bool,
}

impl Reader {
    /// Feeds `data` and calls `on_tag(kind, ts, body)` for every tag completed by it.
    pub fn feed(
        &mut self,
        data: &[u8],
        mut on_tag: impl FnMut(u8, u32, &[u8]),
    ) -> Result<(), String> {
        // Common case: nothing buffered, so parse in place and keep only a partial tail.
        let mut owned = std::mem::take(&mut self.buf);
        let input: &[u8] = if owned.is_empty() {
            data
        } else {
            owned.extend_from_slice(data);
            &owned
        };
        let mut pos = 0;
        if !self.header_done {
            if input.len() < HEADER_LEN + 4 {
                self.buf = input.to_vec();
                return Ok(());
            }
            if &input[..3] != b"FLV" {
                return Err(format!("not an FLV stream: starts {:02x?}", &input[..3]));
            }
            let offset = u32::from_be_bytes([input[5], input[6], input[7], input[8]]) as usize;
            if !(HEADER_LEN..=64).contains(&offset) {
                return Err(format!("bad FLV header offset {offset}"));
            }
            pos = offset + 4;
            self.header_done = true;
        }
        while input.len() - pos >= TAG_HEADER_LEN {
            let h = &input[pos..pos + TAG_HEADER_LEN];
            let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
            let ts = u32::from_be_bytes([h[7], h[4], h[5], h[6]]);
            let end = pos + TAG_HEADER_LEN + len + 4;
            if input.len() < end {
                break;
            }
            on_tag(h[0] & 0x1f, ts, &input[pos + TAG_HEADER_LEN..end - 4]);
            pos = end;
        }
        let rest = &input[pos..];
        if rest.len() > 32 << 20 {
            return Err("FLV tag larger than 32 MiB".into());
        }
        let rest = rest.to_vec();
        owned.clear();
        self.buf = if rest.is_empty() { owned } else { rest };
        Ok(())
    }
}

/// Reads every tag of a whole FLV file.
pub fn read_all(data: &[u8]) -> Result<Vec<Tag>, String> {
    let mut tags = Vec::new();
    let mut r = Reader::default();
    r.feed(data, |kind, ts, body| {
        tags.push(Tag {
            kind,
            ts,
            body: Bytes::copy_from_slice(body),
        })
    })?;
    if !r.buf.is_empty() {
        return Err(format!("{} trailing bytes after the last tag", r.buf.len()));
    }
    Ok(tags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_survive_any_chunking() {
        let mut s = stream_header(true, true).to_vec();
        write_tag(&mut s, TAG_VIDEO, 0x0123_4567, &[b"abc", b"de"]);
        write_tag(&mut s, TAG_AUDIO, 7, &[&[9u8; 300]]);
        for chunk in [1, 2, 7, 13, 64, s.len()] {
            let mut r = Reader::default();
            let mut got = Vec::new();
            for c in s.chunks(chunk) {
                r.feed(c, |k, ts, b| got.push((k, ts, b.to_vec())))
                    .expect("valid");
            }
            assert_eq!(got.len(), 2, "chunk {chunk}");
            assert_eq!(got[0], (TAG_VIDEO, 0x0123_4567, b"abcde".to_vec()));
            assert_eq!(got[1], (TAG_AUDIO, 7, vec![9u8; 300]));
        }
        assert!(
            Reader::default()
                .feed(b"GIF89a-not-flv", |_, _, _| ())
                .is_err()
        );
    }
}

//! A sans-IO check of a publisher's RTMP chunk stream (RTMP 1.0, 5.3.1), run on every byte
//! before rml_rtmp's session sees it, refusing what the session's chunk deserializer cannot
//! take:
//!
//! - a message started on one chunk stream while another's is unfinished, or a new message
//!   header on a chunk stream mid-message: rml_rtmp keeps one payload buffer for every chunk
//!   stream and underflows an integer on either;
//! - a chunk that continues a chunk stream which never had a full header;
//! - an extended timestamp below 0xFFFFFF on a delta header (rml_rtmp subtracts 0xFFFFFF);
//! - a SetChunkSize of 0 or beyond RTMP's largest message (rml_rtmp applies it unchecked);
//! - AMF messages over 64 KiB, or with more than 256 bytes that could open a nested value
//!   (rml_amf0 recurses once per level with no limit, so deep nesting would overflow the stack);
//! - an AMF command of fewer than three values (name, transaction id, command object): rml_rtmp
//!   drains three from it and panics (found by fuzz/rtmp).
//!
//! It keeps a few bytes of header and the payload of the AMF or SetChunkSize message being
//! checked (at most 64 KiB); media payloads are counted, not kept.

use std::collections::HashMap;

/// Message types: SetChunkSize, and the AMF-encoded data, shared object and command messages
/// (AMF3 variants included, as rml_rtmp decodes those as AMF0 too).
const SET_CHUNK_SIZE: u8 = 1;
const AMF_MESSAGES: [u8; 6] = [15, 16, 17, 18, 19, 20];
/// Command messages: AMF0, and "AMF3" that rml_rtmp decodes as AMF0 after a leading 0.
const AMF0_COMMAND: u8 = 20;
const AMF3_COMMAND: u8 = 17;
/// OBS's and ffmpeg's connect commands and metadata are a few hundred bytes.
pub const MAX_AMF_MESSAGE: usize = 64 * 1024;
/// Bytes that could open a nested AMF0 value (object, ECMA array, strict array). Every nesting
/// level needs one, so this bounds rml_amf0's recursion depth; real messages have a handful.
pub const MAX_AMF_CONTAINER_MARKERS: usize = 256;
/// Largest chunk size accepted: a chunk larger than RTMP's largest message (24-bit length) is
/// pointless, and the spec forbids the top bit.
pub const MAX_CHUNK_SIZE: u32 = 0xff_ffff;
/// Chunk streams one publisher may use (OBS and ffmpeg use four or five).
const MAX_CHUNK_STREAMS: usize = 64;
/// The timestamp field's value that says an extended timestamp follows.
const EXTENDED: u32 = 0xff_ffff;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error(
        "malformed RTMP chunk stream: a message on chunk stream {csid} started before the one \
         on chunk stream {open} was complete"
    )]
    Interleaved { csid: u32, open: u32 },
    #[error("malformed RTMP chunk stream: a new message header on chunk stream {0} mid-message")]
    HeaderMidMessage(u32),
    #[error("malformed RTMP chunk stream: chunk stream {0} continues a message it never started")]
    NoPreviousHeader(u32),
    #[error("malformed RTMP chunk stream: extended timestamp {0} on a delta header")]
    ExtendedTimestamp(u32),
    #[error("more than {MAX_CHUNK_STREAMS} RTMP chunk streams")]
    TooManyChunkStreams,
    #[error("SetChunkSize without a size")]
    NoChunkSize,
    #[error("chunk size {0} refused: must be 1..=16777215 (RTMP's largest message)")]
    ChunkSize(u32),
    #[error("AMF message refused: {0}")]
    Amf(String),
}

/// What the check remembers of one chunk stream.
#[derive(Debug, Default, Clone, Copy)]
struct Stream {
    /// Had a full (type 0) header.
    started: bool,
    length: u32,
    type_id: u8,
    /// The last header's timestamp field was 0xFFFFFF: its type 3 chunks carry one too.
    extended: bool,
    /// Bytes of the current message not yet received.
    remaining: u32,
}

#[derive(Debug)]
pub struct ChunkCheck {
    chunk_size: u32,
    streams: HashMap<u32, Stream>,
    /// Bytes of a chunk header received so far (at most 18).
    header: Vec<u8>,
    /// In a chunk's payload: its chunk stream and the payload bytes left in the chunk.
    payload: Option<(u32, u32)>,
    /// The chunk stream whose message is unfinished, if any.
    open: Option<u32>,
    /// The payload of the message being checked (SetChunkSize, AMF), if it is one.
    message: Option<Vec<u8>>,
}

impl Default for ChunkCheck {
    fn default() -> Self {
        Self {
            chunk_size: 128,
            streams: HashMap::new(),
            header: Vec::with_capacity(18),
            payload: None,
            open: None,
            message: None,
        }
    }
}

impl ChunkCheck {
    /// Checks the next bytes of the stream, in any split.
    pub fn push(&mut self, mut input: &[u8]) -> Result<(), ChunkError> {
        while !input.is_empty() {
            if let Some((csid, left)) = self.payload {
                let take = (left as usize).min(input.len());
                if let Some(m) = self.message.as_mut() {
                    m.extend_from_slice(&input[..take]);
                }
                input = &input[take..];
                let left = left - take as u32;
                let stream = self.streams.entry(csid).or_default();
                stream.remaining -= take as u32;
                if stream.remaining == 0 {
                    let type_id = stream.type_id;
                    self.payload = None;
                    self.open = None;
                    self.complete(type_id)?;
                } else {
                    self.payload = (left > 0).then_some((csid, left));
                }
                continue;
            }
            self.header.push(input[0]);
            input = &input[1..];
            if let Some(len) = self.header_len()
                && self.header.len() == len
            {
                self.start_chunk()?;
                self.header.clear();
            }
        }
        Ok(())
    }

    /// The whole header's length once the bytes so far tell it.
    fn header_len(&self) -> Option<usize> {
        let h = &self.header;
        let b0 = *h.first()?;
        let basic = match b0 & 0x3f {
            0 => 2,
            1 => 3,
            _ => 1,
        };
        let fmt = b0 >> 6;
        let message = [11, 7, 3, 0][usize::from(fmt)];
        if h.len() < basic + message {
            return Some(basic + message + 4); // at least; known once the fields are in
        }
        let extended = if fmt == 3 {
            let csid = csid(h)?;
            self.streams.get(&csid).is_some_and(|s| s.extended)
        } else {
            u24(&h[basic..basic + 3]) == EXTENDED
        };
        Some(basic + message + if extended { 4 } else { 0 })
    }

    fn start_chunk(&mut self) -> Result<(), ChunkError> {
        let h = &self.header;
        let fmt = h[0] >> 6;
        let Some(csid) = csid(h) else {
            return Ok(());
        };
        let basic = match h[0] & 0x3f {
            0 => 2,
            1 => 3,
            _ => 1,
        };
        if !self.streams.contains_key(&csid) && self.streams.len() >= MAX_CHUNK_STREAMS {
            return Err(ChunkError::TooManyChunkStreams);
        }
        let mut stream = self.streams.get(&csid).copied().unwrap_or_default();
        if let Some(open) = self.open
            && open != csid
        {
            return Err(ChunkError::Interleaved { csid, open });
        }
        if fmt != 3 && stream.remaining > 0 {
            return Err(ChunkError::HeaderMidMessage(csid));
        }
        if fmt != 0 && !stream.started {
            return Err(ChunkError::NoPreviousHeader(csid));
        }
        let fields = &h[basic..];
        if fmt < 3 {
            let field = u24(&fields[..3]);
            stream.extended = field == EXTENDED;
        }
        if fmt <= 1 {
            stream.length = u24(&fields[3..6]);
            stream.type_id = fields[6];
        }
        stream.started = true;
        let new_message = stream.remaining == 0;
        if stream.extended && fmt != 0 && new_message {
            let ext = u32::from_be_bytes([
                h[h.len() - 4],
                h[h.len() - 3],
                h[h.len() - 2],
                h[h.len() - 1],
            ]);
            if ext < EXTENDED {
                return Err(ChunkError::ExtendedTimestamp(ext));
            }
        }
        if new_message {
            stream.remaining = stream.length;
            let checked =
                stream.type_id == SET_CHUNK_SIZE || AMF_MESSAGES.contains(&stream.type_id);
            if checked && stream.length as usize > MAX_AMF_MESSAGE {
                return Err(ChunkError::Amf(format!(
                    "{} bytes, the limit is {MAX_AMF_MESSAGE}",
                    stream.length
                )));
            }
            self.message = checked.then(|| Vec::with_capacity(stream.length as usize));
        }
        let type_id = stream.type_id;
        let remaining = stream.remaining;
        self.streams.insert(csid, stream);
        if remaining == 0 {
            // An empty message: complete with its header.
            return self.complete(type_id);
        }
        self.open = Some(csid);
        self.payload = Some((csid, remaining.min(self.chunk_size)));
        Ok(())
    }

    fn complete(&mut self, type_id: u8) -> Result<(), ChunkError> {
        let Some(data) = self.message.take() else {
            return Ok(());
        };
        if type_id == SET_CHUNK_SIZE {
            let b = data.get(..4).ok_or(ChunkError::NoChunkSize)?;
            let size = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            if size == 0 || size > MAX_CHUNK_SIZE {
                return Err(ChunkError::ChunkSize(size));
            }
            self.chunk_size = size;
            return Ok(());
        }
        check_amf(&data)?;
        if type_id == AMF0_COMMAND || type_id == AMF3_COMMAND {
            let amf0 = match data.split_first() {
                Some((0, rest)) if type_id == AMF3_COMMAND => rest,
                _ => &data[..],
            };
            // Decoded as rml_rtmp will (depth bounded by check_amf); an undecodable one is left
            // to the session, which reports it.
            let mut cursor = std::io::Cursor::new(amf0);
            if let Ok(values) = rml_rtmp::rml_amf0::deserialize(&mut cursor)
                && values.len() < 3
            {
                return Err(ChunkError::Amf(format!(
                    "a command of {} values: it needs a name, a transaction id and an object",
                    values.len()
                )));
            }
        }
        Ok(())
    }
}

fn check_amf(data: &[u8]) -> Result<(), ChunkError> {
    let containers = data
        .iter()
        .filter(|&&b| matches!(b, 0x03 | 0x08 | 0x0a))
        .count();
    if containers > MAX_AMF_CONTAINER_MARKERS {
        return Err(ChunkError::Amf(format!(
            "too deeply nested or complex ({containers} possible container markers, the limit is \
             {MAX_AMF_CONTAINER_MARKERS})"
        )));
    }
    Ok(())
}

/// The chunk stream id of a basic header, once its bytes are in.
fn csid(h: &[u8]) -> Option<u32> {
    match h.first()? & 0x3f {
        0 => Some(u32::from(*h.get(1)?) + 64),
        1 => Some(u32::from(*h.get(1)?) + u32::from(*h.get(2)?) * 256 + 64),
        n => Some(u32::from(n)),
    }
}

fn u24(b: &[u8]) -> u32 {
    u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rml_rtmp::chunk_io::ChunkSerializer;
    use rml_rtmp::messages::MessagePayload;
    use rml_rtmp::time::RtmpTimestamp;

    fn payload(type_id: u8, csid_hint: u32, ts: u32, len: usize) -> MessagePayload {
        MessagePayload {
            timestamp: RtmpTimestamp::new(ts),
            type_id,
            message_stream_id: csid_hint,
            data: bytes::Bytes::from(vec![0x55; len]),
        }
    }

    /// What rml_rtmp's own serializer writes (the session's deserializer takes it) passes, in
    /// any split: small and large messages, header compression, a chunk size change and
    /// timestamps past the 24-bit field.
    #[test]
    fn what_a_real_serializer_writes_passes_in_any_split() {
        let mut s = ChunkSerializer::new();
        let mut stream = Vec::new();
        let mut ts = 0;
        for (i, len) in [10usize, 300, 5000, 0, 70_000, 128, 129]
            .into_iter()
            .enumerate()
        {
            for type_id in [9u8, 8] {
                ts += 33;
                let p = payload(type_id, 1, ts, len);
                stream.extend(s.serialize(&p, false, false).expect("serialize").bytes);
            }
            if i == 2 {
                // SetChunkSize 4096, written with the old size; the serializer switches after.
                let p = s
                    .set_max_chunk_size(4096, RtmpTimestamp::new(ts))
                    .expect("set chunk size");
                stream.extend(p.bytes);
            }
        }
        for big in [0x00ff_fff0u32, 0x0100_0000, 0x7fff_0000] {
            let p = payload(9, 1, big, 9000);
            stream.extend(s.serialize(&p, false, false).expect("serialize").bytes);
        }
        for step in [1, 7, 128, 1000, stream.len()] {
            let mut check = ChunkCheck::default();
            for piece in stream.chunks(step) {
                check
                    .push(piece)
                    .unwrap_or_else(|e| panic!("step {step}: {e}"));
            }
            assert_eq!(check.open, None, "step {step}: everything complete");
            assert_eq!(check.chunk_size, 4096);
        }
    }

    /// A basic header, fmt 0, on `csid`: timestamp 0, `len`, type 9, stream 1.
    fn full_header(csid: u8, len: u32) -> Vec<u8> {
        let l = len.to_be_bytes();
        vec![csid & 0x3f, 0, 0, 0, l[1], l[2], l[3], 9, 1, 0, 0, 0]
    }

    #[test]
    fn an_interleaved_or_headless_chunk_stream_is_refused() {
        // A 300-byte message on chunk stream 4, cut after its first chunk, then a message on 5.
        let mut b = full_header(4, 300);
        b.extend([0u8; 128]);
        b.extend(full_header(5, 10));
        assert_eq!(
            ChunkCheck::default().push(&b),
            Err(ChunkError::Interleaved { csid: 5, open: 4 })
        );
        // A new full header on 4 itself mid-message.
        let mut b = full_header(4, 300);
        b.extend([0u8; 128]);
        b.extend(full_header(4, 10));
        assert_eq!(
            ChunkCheck::default().push(&b),
            Err(ChunkError::HeaderMidMessage(4))
        );
        // A type 3 chunk on a stream that never had a header.
        assert_eq!(
            ChunkCheck::default().push(&[0xc7]),
            Err(ChunkError::NoPreviousHeader(7))
        );
        // An extended timestamp below 0xFFFFFF on a delta header.
        let mut b = full_header(4, 1);
        b.push(0);
        b.extend([0x84, 0xff, 0xff, 0xff, 0, 0, 0, 2]);
        assert_eq!(
            ChunkCheck::default().push(&b),
            Err(ChunkError::ExtendedTimestamp(2))
        );
    }

    /// Found by fuzz/rtmp: rml_rtmp panics on a command of fewer than three AMF values.
    #[test]
    fn a_command_too_short_for_rml_rtmp_is_refused() {
        let input = include_bytes!("../../../../fuzz/regressions/rtmp/command-of-one-value");
        let mut check = ChunkCheck::default();
        // As the fuzz target cuts it: the first byte says the read size.
        let step = (usize::from(input[0]) + 1) * 16;
        let refused = input[1..]
            .chunks(step)
            .map(|piece| check.push(piece))
            .find(|r| r.is_err());
        assert!(
            matches!(refused, Some(Err(ChunkError::Amf(ref e))) if e.contains("a command of")),
            "{refused:?}"
        );
    }

    #[test]
    fn bad_chunk_sizes_and_deep_amf_are_refused() {
        for (size, err) in [
            (0u32, Some(ChunkError::ChunkSize(0))),
            (0x8000_0000, Some(ChunkError::ChunkSize(0x8000_0000))),
            (4096, None),
        ] {
            let mut b = vec![0x02, 0, 0, 0, 0, 0, 4, SET_CHUNK_SIZE, 0, 0, 0, 0];
            b.extend(size.to_be_bytes());
            assert_eq!(ChunkCheck::default().push(&b).err(), err);
        }
        let nested = vec![0x0a; 1000];
        let l = (nested.len() as u32).to_be_bytes();
        let mut b = vec![0x03, 0, 0, 0, l[1], l[2], l[3], 20, 0, 0, 0, 0];
        b.extend(&nested[..128]);
        for c in nested[128..].chunks(128) {
            b.push(0xc3);
            b.extend(c);
        }
        assert!(matches!(
            ChunkCheck::default().push(&b),
            Err(ChunkError::Amf(e)) if e.contains("too deeply nested")
        ));
        let l = (100_000u32).to_be_bytes();
        let b = [0x03, 0, 0, 0, l[1], l[2], l[3], 20, 0, 0, 0, 0];
        assert!(matches!(
            ChunkCheck::default().push(&b),
            Err(ChunkError::Amf(_))
        ));
    }
}

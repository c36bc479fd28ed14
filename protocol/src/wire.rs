//! The onair wire protocol: one WebSocket binary message is one protocol message.
//!
//! Every message starts with a one-byte kind. Media messages have a fixed 16-byte header followed
//! by the codec payload exactly as published (AVCC NAL units, raw AAC), so the server encodes each
//! frame once and every viewer receives the same bytes. The byte layouts are in docs/protocol.md;
//! keep the two in step.
//!
//! Decoding takes one whole message (the WebSocket layer frames them) and never panics: every
//! length is checked against the remaining input before it is used.

use thiserror::Error;

/// Protocol version carried in [`Hello`]. Bump it on any incompatible layout change.
pub const VERSION: u8 = 2;

/// Size of the fixed media header that precedes every media payload.
pub const MEDIA_HEADER_LEN: usize = 16;

/// Largest cts offset a media header can carry, in track timescale units (i16).
pub const MAX_CTS: i32 = i16::MAX as i32;

/// Largest dts a media header can carry (u40).
pub const MAX_DTS: u64 = (1 << 40) - 1;

/// Largest ingest time a media header can carry (u56 microseconds since the Unix epoch).
pub const MAX_INGEST_US: u64 = (1 << 56) - 1;

pub mod kind {
    pub const HELLO: u8 = 0x01;
    pub const INIT: u8 = 0x02;
    pub const STATUS: u8 = 0x03;
    pub const MEDIA: u8 = 0x10;
    pub const TIME_SYNC_REQUEST: u8 = 0x20;
    pub const TIME_SYNC_RESPONSE: u8 = 0x21;
    pub const VIEWER_STATS: u8 = 0x30;
    pub const SERVER_STATS: u8 = 0x31;
    pub const RECEIPT: u8 = 0x32;
    pub const CONTROL: u8 = 0x40;
}

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    #[error("empty message")]
    Empty,
    #[error("unknown message kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("message truncated: {kind} needs {needed} more bytes")]
    Truncated { kind: &'static str, needed: usize },
    #[error("{kind} has {extra} trailing bytes")]
    TrailingBytes { kind: &'static str, extra: usize },
    #[error("invalid {field}: {value}")]
    InvalidField { field: &'static str, value: u64 },
    #[error("string field {0} is not UTF-8")]
    NotUtf8(&'static str),
    #[error("{field} is {len} bytes, the limit is {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

/// First message on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello<'a> {
    pub version: u8,
    /// Server-assigned id of this viewer, as shown in stats and the API.
    pub viewer_id: u64,
    /// Server wall clock when the hello was sent, microseconds since the Unix epoch.
    pub server_time_us: u64,
    pub stream: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TrackKind {
    Video = 0,
    Audio = 1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackParams {
    Video {
        width: u16,
        height: u16,
        /// Frames per second × 1000, 0 when unknown.
        fps_milli: u32,
    },
    Audio {
        sample_rate: u32,
        channels: u8,
    },
}

/// Codec configuration of one track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackInit<'a> {
    /// Track id used in media headers (0..=15).
    pub id: u8,
    /// Units per second of this track's dts and cts.
    pub timescale: u32,
    /// RFC 6381 codec string, as MSE wants it (`avc1.64001f`, `mp4a.40.2`).
    pub codec: &'a str,
    pub params: TrackParams,
    /// The video codec's configuration record (avcC, hvcC, av1C, vpcC: the codec string's
    /// family says which), `AudioSpecificConfig` for AAC.
    pub config: &'a [u8],
}

impl TrackInit<'_> {
    pub fn kind(&self) -> TrackKind {
        match self.params {
            TrackParams::Video { .. } => TrackKind::Video,
            TrackParams::Audio { .. } => TrackKind::Audio,
        }
    }
}

/// The codec configuration of a rendition. A new init means a new decoder configuration:
/// the media that follows it starts at a keyframe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Init<'a> {
    pub rendition: u8,
    pub tracks: Vec<TrackInit<'a>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StatusCode {
    /// No publisher yet, or the publisher left: stay connected, media resumes with a new init.
    Waiting = 1,
    /// A publisher is live; media follows.
    Live = 2,
    /// The stream ended for good (removed by an operator, server shutting down).
    Ended = 3,
    /// The publisher came back; a new init follows.
    Republished = 4,
    /// This viewer skipped media to catch up; the next media is a keyframe.
    Skipped = 5,
}

impl StatusCode {
    fn from_u8(v: u8) -> Result<Self, WireError> {
        Ok(match v {
            1 => Self::Waiting,
            2 => Self::Live,
            3 => Self::Ended,
            4 => Self::Republished,
            5 => Self::Skipped,
            _ => {
                return Err(WireError::InvalidField {
                    field: "status code",
                    value: v.into(),
                });
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status<'a> {
    pub code: StatusCode,
    /// Human-readable reason, for logs and the player's overlay.
    pub message: &'a str,
}

/// The fixed header of a media message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaHeader {
    /// 0..=15, as in [`TrackInit::id`].
    pub track: u8,
    /// A sync sample: an IDR for video; every AAC frame is one.
    pub keyframe: bool,
    /// Decode timestamp in track timescale (u40).
    pub dts: u64,
    /// Composition offset (pts - dts) in track timescale.
    pub cts: i16,
    /// Server wall clock when the frame was ingested, microseconds since the Unix epoch (u56).
    pub ingest_us: u64,
}

impl MediaHeader {
    /// Writes the 16-byte header.
    ///
    /// Layout: kind, flags (bit 7 keyframe, bits 0..3 track), cts i16, dts u40, ingest_us u56;
    /// all big-endian. Values wider than their field are a caller bug and are masked.
    pub fn encode(&self, out: &mut [u8; MEDIA_HEADER_LEN]) {
        out[0] = kind::MEDIA;
        out[1] = (self.track & 0x0f) | if self.keyframe { 0x80 } else { 0 };
        out[2..4].copy_from_slice(&self.cts.to_be_bytes());
        out[4..9].copy_from_slice(&(self.dts & MAX_DTS).to_be_bytes()[3..]);
        out[9..16].copy_from_slice(&(self.ingest_us & MAX_INGEST_US).to_be_bytes()[1..]);
    }

    /// Reads the header at the start of a media message; the payload is the rest. The player
    /// uses this to copy the payload straight from the browser's buffer into its fragment.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        if b.len() < MEDIA_HEADER_LEN {
            return Err(WireError::Truncated {
                kind: "media",
                needed: MEDIA_HEADER_LEN - b.len(),
            });
        }
        if b[1] & 0x70 != 0 {
            return Err(WireError::InvalidField {
                field: "media flags",
                value: b[1].into(),
            });
        }
        let mut dts = [0u8; 8];
        dts[3..].copy_from_slice(&b[4..9]);
        let mut ingest = [0u8; 8];
        ingest[1..].copy_from_slice(&b[9..16]);
        Ok(Self {
            track: b[1] & 0x0f,
            keyframe: b[1] & 0x80 != 0,
            cts: i16::from_be_bytes([b[2], b[3]]),
            dts: u64::from_be_bytes(dts),
            ingest_us: u64::from_be_bytes(ingest),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeSyncRequest {
    /// Client clock when sent (opaque to the server, echoed back).
    pub t0: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeSyncResponse {
    pub t0: u64,
    /// Server wall clock (µs since the Unix epoch) when the request arrived.
    pub t1: u64,
    /// Server wall clock when the response left.
    pub t2: u64,
}

/// `ViewerStats::state` values.
pub const PLAYER_IDLE: u8 = 0;
pub const PLAYER_PLAYING: u8 = 1;
pub const PLAYER_BUFFERING: u8 = 2;
pub const PLAYER_PAUSED: u8 = 3;
pub const PLAYER_ERROR: u8 = 4;

/// What a viewer reports about itself, about once a second. Times in milliseconds;
/// `latency_ms` 0 means not known yet (no clock sync, nothing shown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ViewerStats {
    pub latency_ms: u32,
    pub buffer_ms: u32,
    pub decoded_frames: u32,
    pub dropped_frames: u32,
    pub stalls: u32,
    pub bandwidth_kbps: u32,
    pub rendition: u8,
    /// Player state: 0 idle, 1 playing, 2 buffering, 3 paused, 4 error.
    pub state: u8,
}

/// What the server measured about this viewer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerStats {
    pub bytes_sent: u64,
    pub send_kbps: u32,
    pub backlog_bytes: u32,
    pub keyframe_skips: u32,
}

/// What a viewer has received, a few times a second: the bytes of every WebSocket message the
/// server sent it so far, headers included (the same count as the server's `bytes_sent`). The
/// server compares it with what it wrote to see what the network holds for this viewer, and
/// what the link delivers while it holds something (docs/protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Receipt {
    pub bytes: u64,
}

/// The bytes a server's message of `len` bytes takes on the wire: one unfragmented, unmasked
/// binary WebSocket frame, a 2-byte header plus a 2-byte length beyond 125 bytes or an 8-byte
/// one beyond 65535 (docs/protocol.md, receipt). What a [`Receipt`] counts.
pub fn framed_len(len: usize) -> u64 {
    let ext = match len {
        0..=125 => 0,
        126..=65535 => 2,
        _ => 8,
    };
    (2 + ext + len) as u64
}

/// `SwitchRendition`'s rendition for "let the server choose".
pub const RENDITION_AUTO: u8 = 0xff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Switch to rendition n at its next keyframe; 0xff means automatic.
    SwitchRendition(u8),
    /// Ask the player (server → viewer) or server (viewer → server) for a target latency.
    SetTargetLatency { ms: u32 },
    /// Server → viewer: send a [`Receipt`] every this many milliseconds; 0 stops them.
    Receipts { every_ms: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Hello(Hello<'a>),
    Init(Init<'a>),
    Status(Status<'a>),
    Media {
        header: MediaHeader,
        payload: &'a [u8],
    },
    TimeSyncRequest(TimeSyncRequest),
    TimeSyncResponse(TimeSyncResponse),
    ViewerStats(ViewerStats),
    ServerStats(ServerStats),
    Receipt(Receipt),
    Control(Control),
}

/// Limits that keep a hostile peer from making us allocate: no string or config is longer.
const MAX_STR: usize = u8::MAX as usize;
const MAX_CONFIG: usize = u16::MAX as usize;
const MAX_TRACKS: usize = 16;

impl<'a> Message<'a> {
    pub fn kind_name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Init(_) => "init",
            Message::Status(_) => "status",
            Message::Media { .. } => "media",
            Message::TimeSyncRequest(_) => "time sync request",
            Message::TimeSyncResponse(_) => "time sync response",
            Message::ViewerStats(_) => "viewer stats",
            Message::ServerStats(_) => "server stats",
            Message::Receipt(_) => "receipt",
            Message::Control(_) => "control",
        }
    }

    /// Decodes one whole message. Borrowed fields point into `buf`.
    pub fn decode(buf: &'a [u8]) -> Result<Self, WireError> {
        let (&k, _) = buf.split_first().ok_or(WireError::Empty)?;
        if k == kind::MEDIA {
            let header = MediaHeader::decode(buf)?;
            return Ok(Message::Media {
                header,
                payload: &buf[MEDIA_HEADER_LEN..],
            });
        }
        let name = match k {
            kind::HELLO => "hello",
            kind::INIT => "init",
            kind::STATUS => "status",
            kind::TIME_SYNC_REQUEST => "time sync request",
            kind::TIME_SYNC_RESPONSE => "time sync response",
            kind::VIEWER_STATS => "viewer stats",
            kind::SERVER_STATS => "server stats",
            kind::RECEIPT => "receipt",
            kind::CONTROL => "control",
            other => return Err(WireError::UnknownKind(other)),
        };
        let mut r = Reader {
            buf: &buf[1..],
            kind: name,
        };
        let msg = match k {
            kind::HELLO => Message::Hello(Hello {
                version: r.u8()?,
                viewer_id: r.u64()?,
                server_time_us: r.u64()?,
                stream: r.str8("stream")?,
            }),
            kind::INIT => {
                let rendition = r.u8()?;
                let n = r.u8()? as usize;
                if n > MAX_TRACKS {
                    return Err(WireError::InvalidField {
                        field: "track count",
                        value: n as u64,
                    });
                }
                let mut tracks = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = r.u8()?;
                    if id > 15 {
                        return Err(WireError::InvalidField {
                            field: "track id",
                            value: id.into(),
                        });
                    }
                    let kind = r.u8()?;
                    let timescale = r.u32()?;
                    if timescale == 0 {
                        // Every timestamp is divided by it.
                        return Err(WireError::InvalidField {
                            field: "timescale",
                            value: 0,
                        });
                    }
                    let codec = r.str8("codec")?;
                    let params = match kind {
                        0 => TrackParams::Video {
                            width: r.u16()?,
                            height: r.u16()?,
                            fps_milli: r.u32()?,
                        },
                        1 => TrackParams::Audio {
                            sample_rate: r.u32()?,
                            channels: r.u8()?,
                        },
                        v => {
                            return Err(WireError::InvalidField {
                                field: "track kind",
                                value: v.into(),
                            });
                        }
                    };
                    let len = r.u16()? as usize;
                    let config = r.bytes(len)?;
                    tracks.push(TrackInit {
                        id,
                        timescale,
                        codec,
                        params,
                        config,
                    });
                }
                Message::Init(Init { rendition, tracks })
            }
            kind::STATUS => Message::Status(Status {
                code: StatusCode::from_u8(r.u8()?)?,
                message: r.str8("status message")?,
            }),
            kind::TIME_SYNC_REQUEST => Message::TimeSyncRequest(TimeSyncRequest { t0: r.u64()? }),
            kind::TIME_SYNC_RESPONSE => Message::TimeSyncResponse(TimeSyncResponse {
                t0: r.u64()?,
                t1: r.u64()?,
                t2: r.u64()?,
            }),
            kind::VIEWER_STATS => Message::ViewerStats(ViewerStats {
                latency_ms: r.u32()?,
                buffer_ms: r.u32()?,
                decoded_frames: r.u32()?,
                dropped_frames: r.u32()?,
                stalls: r.u32()?,
                bandwidth_kbps: r.u32()?,
                rendition: r.u8()?,
                state: r.u8()?,
            }),
            kind::SERVER_STATS => Message::ServerStats(ServerStats {
                bytes_sent: r.u64()?,
                send_kbps: r.u32()?,
                backlog_bytes: r.u32()?,
                keyframe_skips: r.u32()?,
            }),
            kind::RECEIPT => Message::Receipt(Receipt { bytes: r.u64()? }),
            kind::CONTROL => Message::Control(match r.u8()? {
                1 => Control::SwitchRendition(r.u8()?),
                2 => Control::SetTargetLatency { ms: r.u32()? },
                3 => Control::Receipts { every_ms: r.u16()? },
                v => {
                    return Err(WireError::InvalidField {
                        field: "control op",
                        value: v.into(),
                    });
                }
            }),
            _ => unreachable!("kinds are matched above"),
        };
        r.finish()?;
        Ok(msg)
    }

    /// Appends the encoded message to `out`.
    ///
    /// Fails only when a field does not fit its length prefix (a string over 255 bytes, a codec
    /// config over 65535 bytes, more than 16 tracks): a caller bug or unsupported input, never
    /// something to truncate silently.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        match self {
            Message::Hello(h) => {
                out.push(kind::HELLO);
                out.push(h.version);
                out.extend_from_slice(&h.viewer_id.to_be_bytes());
                out.extend_from_slice(&h.server_time_us.to_be_bytes());
                put_str8(out, "stream", h.stream)?;
            }
            Message::Init(init) => {
                if init.tracks.len() > MAX_TRACKS {
                    return Err(WireError::TooLong {
                        field: "tracks",
                        len: init.tracks.len(),
                        max: MAX_TRACKS,
                    });
                }
                out.push(kind::INIT);
                out.push(init.rendition);
                out.push(init.tracks.len() as u8);
                for t in &init.tracks {
                    out.push(t.id);
                    out.push(t.kind() as u8);
                    out.extend_from_slice(&t.timescale.to_be_bytes());
                    put_str8(out, "codec", t.codec)?;
                    match t.params {
                        TrackParams::Video {
                            width,
                            height,
                            fps_milli,
                        } => {
                            out.extend_from_slice(&width.to_be_bytes());
                            out.extend_from_slice(&height.to_be_bytes());
                            out.extend_from_slice(&fps_milli.to_be_bytes());
                        }
                        TrackParams::Audio {
                            sample_rate,
                            channels,
                        } => {
                            out.extend_from_slice(&sample_rate.to_be_bytes());
                            out.push(channels);
                        }
                    }
                    if t.config.len() > MAX_CONFIG {
                        return Err(WireError::TooLong {
                            field: "codec config",
                            len: t.config.len(),
                            max: MAX_CONFIG,
                        });
                    }
                    out.extend_from_slice(&(t.config.len() as u16).to_be_bytes());
                    out.extend_from_slice(t.config);
                }
            }
            Message::Status(s) => {
                out.push(kind::STATUS);
                out.push(s.code as u8);
                put_str8(out, "status message", s.message)?;
            }
            Message::Media { header, payload } => {
                let mut h = [0u8; MEDIA_HEADER_LEN];
                header.encode(&mut h);
                out.extend_from_slice(&h);
                out.extend_from_slice(payload);
            }
            Message::TimeSyncRequest(t) => {
                out.push(kind::TIME_SYNC_REQUEST);
                out.extend_from_slice(&t.t0.to_be_bytes());
            }
            Message::TimeSyncResponse(t) => {
                out.push(kind::TIME_SYNC_RESPONSE);
                for v in [t.t0, t.t1, t.t2] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Message::ViewerStats(s) => {
                out.push(kind::VIEWER_STATS);
                for v in [
                    s.latency_ms,
                    s.buffer_ms,
                    s.decoded_frames,
                    s.dropped_frames,
                    s.stalls,
                    s.bandwidth_kbps,
                ] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
                out.push(s.rendition);
                out.push(s.state);
            }
            Message::ServerStats(s) => {
                out.push(kind::SERVER_STATS);
                out.extend_from_slice(&s.bytes_sent.to_be_bytes());
                for v in [s.send_kbps, s.backlog_bytes, s.keyframe_skips] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
            }
            Message::Receipt(r) => {
                out.push(kind::RECEIPT);
                out.extend_from_slice(&r.bytes.to_be_bytes());
            }
            Message::Control(c) => {
                out.push(kind::CONTROL);
                match *c {
                    Control::SwitchRendition(n) => {
                        out.push(1);
                        out.push(n);
                    }
                    Control::SetTargetLatency { ms } => {
                        out.push(2);
                        out.extend_from_slice(&ms.to_be_bytes());
                    }
                    Control::Receipts { every_ms } => {
                        out.push(3);
                        out.extend_from_slice(&every_ms.to_be_bytes());
                    }
                }
            }
        }
        Ok(())
    }

    /// Convenience for tests and rare messages: encode into a fresh buffer.
    pub fn to_vec(&self) -> Result<Vec<u8>, WireError> {
        let mut v = Vec::new();
        self.encode(&mut v)?;
        Ok(v)
    }
}

fn put_str8(out: &mut Vec<u8>, field: &'static str, s: &str) -> Result<(), WireError> {
    if s.len() > MAX_STR {
        return Err(WireError::TooLong {
            field,
            len: s.len(),
            max: MAX_STR,
        });
    }
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    kind: &'static str,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                kind: self.kind,
                needed: n - self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn str8(&mut self, field: &'static str) -> Result<&'a str, WireError> {
        let n = self.u8()? as usize;
        std::str::from_utf8(self.bytes(n)?).map_err(|_| WireError::NotUtf8(field))
    }
    fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                kind: self.kind,
                extra: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message<'static>> {
        vec![
            Message::Hello(Hello {
                version: VERSION,
                viewer_id: 42,
                server_time_us: 1_763_600_000_000_000,
                stream: "mystream",
            }),
            Message::Init(Init {
                rendition: 0,
                tracks: vec![
                    TrackInit {
                        id: 0,
                        timescale: 1000,
                        codec: "avc1.64001f",
                        params: TrackParams::Video {
                            width: 1280,
                            height: 720,
                            fps_milli: 30_000,
                        },
                        config: &[1, 0x64, 0, 0x1f, 0xff, 0xe1, 0, 0],
                    },
                    TrackInit {
                        id: 1,
                        timescale: 1000,
                        codec: "mp4a.40.2",
                        params: TrackParams::Audio {
                            sample_rate: 44100,
                            channels: 2,
                        },
                        config: &[0x12, 0x10],
                    },
                ],
            }),
            Message::Init(Init {
                rendition: 3,
                tracks: vec![],
            }),
            Message::Status(Status {
                code: StatusCode::Waiting,
                message: "publisher disconnected",
            }),
            Message::Status(Status {
                code: StatusCode::Republished,
                message: "",
            }),
            Message::Media {
                header: MediaHeader {
                    track: 0,
                    keyframe: true,
                    dts: MAX_DTS,
                    cts: -5,
                    ingest_us: MAX_INGEST_US,
                },
                payload: &[0, 0, 0, 2, 0x65, 0x88],
            },
            Message::Media {
                header: MediaHeader {
                    track: 15,
                    keyframe: false,
                    dts: 0,
                    cts: i16::MAX,
                    ingest_us: 0,
                },
                payload: &[],
            },
            Message::TimeSyncRequest(TimeSyncRequest { t0: u64::MAX }),
            Message::TimeSyncResponse(TimeSyncResponse {
                t0: 1,
                t1: 2,
                t2: 3,
            }),
            Message::ViewerStats(ViewerStats {
                latency_ms: 150,
                buffer_ms: 120,
                decoded_frames: 9000,
                dropped_frames: 3,
                stalls: 1,
                bandwidth_kbps: 5000,
                rendition: 1,
                state: 1,
            }),
            Message::ServerStats(ServerStats {
                bytes_sent: 1 << 40,
                send_kbps: 1200,
                backlog_bytes: 4096,
                keyframe_skips: 2,
            }),
            Message::Receipt(Receipt { bytes: 1 << 50 }),
            Message::Control(Control::SwitchRendition(0xff)),
            Message::Control(Control::SetTargetLatency { ms: 150 }),
            Message::Control(Control::Receipts { every_ms: 250 }),
        ]
    }

    #[test]
    fn a_message_takes_its_frame_header_on_the_wire() {
        assert_eq!(framed_len(0), 2);
        assert_eq!(framed_len(125), 127);
        assert_eq!(framed_len(126), 130);
        assert_eq!(framed_len(65535), 65539);
        assert_eq!(framed_len(65536), 65546);
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let bytes = m.to_vec().unwrap();
            let back = Message::decode(&bytes).unwrap();
            assert_eq!(back, m, "{}", m.kind_name());
            assert_eq!(back.to_vec().unwrap(), bytes);
        }
    }

    #[test]
    fn media_header_is_16_bytes_and_payload_is_untouched() {
        let payload = [9u8, 8, 7];
        let m = Message::Media {
            header: MediaHeader {
                track: 1,
                keyframe: true,
                dts: 1234,
                cts: 40,
                ingest_us: 5,
            },
            payload: &payload,
        };
        let b = m.to_vec().unwrap();
        assert_eq!(b.len(), MEDIA_HEADER_LEN + payload.len());
        assert_eq!(&b[MEDIA_HEADER_LEN..], &payload);
        assert_eq!(b[1], 0x81);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for m in samples() {
            let bytes = m.to_vec().unwrap();
            // Media payloads may be any length, so only the fixed header can be cut short.
            let min = if matches!(m, Message::Media { .. }) {
                MEDIA_HEADER_LEN
            } else {
                bytes.len()
            };
            for cut in 0..min {
                assert!(
                    Message::decode(&bytes[..cut]).is_err(),
                    "{} cut at {cut}",
                    m.kind_name()
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_and_unknown_kinds_are_rejected() {
        let mut b = Message::TimeSyncRequest(TimeSyncRequest { t0: 1 })
            .to_vec()
            .unwrap();
        b.push(0);
        assert_eq!(
            Message::decode(&b),
            Err(WireError::TrailingBytes {
                kind: "time sync request",
                extra: 1
            })
        );
        assert_eq!(Message::decode(&[0x7f]), Err(WireError::UnknownKind(0x7f)));
    }

    #[test]
    fn a_zero_timescale_is_refused() {
        let Message::Init(mut init) = samples().remove(1) else {
            panic!("the second sample is an init");
        };
        init.tracks[0].timescale = 0;
        let b = Message::Init(init).to_vec().unwrap();
        assert_eq!(
            Message::decode(&b),
            Err(WireError::InvalidField {
                field: "timescale",
                value: 0
            })
        );
    }

    #[test]
    fn oversize_fields_fail_to_encode() {
        let long = "x".repeat(256);
        let m = Message::Status(Status {
            code: StatusCode::Ended,
            message: &long,
        });
        assert!(matches!(m.to_vec(), Err(WireError::TooLong { .. })));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        // A cheap deterministic sweep of random bytes, not a fuzzer.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..200usize {
            for _ in 0..50 {
                let mut buf = Vec::with_capacity(len);
                for _ in 0..len {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    buf.push(x as u8);
                }
                if let Some(first) = buf.first_mut() {
                    *first = [1u8, 2, 3, 0x10, 0x20, 0x21, 0x30, 0x31, 0x40][len % 9];
                }
                let _ = Message::decode(&buf);
            }
        }
    }
}

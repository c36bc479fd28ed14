//! FLV audio and video tag headers, as RTMP delivers them (the tag body, without the 11-byte
//! FLV tag header), including the Enhanced RTMP ex-header (veovera enhanced-rtmp v2).
//!
//! Written by hand rather than with `flv-rs`: that crate (0.1) only reads whole FLV files, has
//! about 70 `unwrap`s and panics on malformed script tags. RTMP already hands us the tag body, so
//! all that is needed is a few bytes of header parsing that must never panic on network input.

use thiserror::Error;

pub use crate::codec::VideoCodec;

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlvError {
    #[error("{0} tag is empty")]
    Empty(&'static str),
    #[error("{kind} tag truncated: header needs {needed} bytes, got {got}")]
    Truncated {
        kind: &'static str,
        needed: usize,
        got: usize,
    },
    #[error("unsupported video codec: {0}")]
    UnsupportedVideoCodec(String),
    #[error("unsupported audio codec: {0}")]
    UnsupportedAudioCodec(String),
    #[error("unsupported {kind} packet type {packet_type}")]
    UnsupportedPacketType { kind: &'static str, packet_type: u8 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VideoTag<'a> {
    /// The codec's configuration record (avcC, hvcC, av1C or vpcC).
    SequenceHeader {
        codec: VideoCodec,
        config: &'a [u8],
    },
    /// One access unit: length-prefixed NAL units (H.264, HEVC), OBUs (AV1) or a frame (VP9).
    Frame {
        codec: VideoCodec,
        keyframe: bool,
        /// Composition time offset in milliseconds (SI24).
        cts: i32,
        data: &'a [u8],
    },
    EndOfSequence,
    /// Video info/command frames and Enhanced RTMP metadata: nothing to deliver.
    Ignored,
    /// Enhanced RTMP v2 multitrack: packets of one or more tracks in one message.
    Multitrack(Multitrack<'a>),
}

/// The tracks of an Enhanced RTMP multitrack video message; [`Multitrack::tracks`] reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Multitrack<'a> {
    frame_type: u8,
    packet_type: u8,
    split: TrackSplit<'a>,
}

impl<'a> Multitrack<'a> {
    /// Each track's id and packet, in order; an error ends the message.
    pub fn tracks(&self) -> impl Iterator<Item = Result<(u8, VideoTag<'a>), FlvError>> + 'a {
        let (frame_type, packet_type) = (self.frame_type, self.packet_type);
        self.split.clone().map(move |track| {
            let (fourcc, id, body) = track?;
            let codec = VideoCodec::from_fourcc(fourcc).ok_or_else(|| {
                FlvError::UnsupportedVideoCodec(format!("{} (Enhanced RTMP)", fourcc_name(fourcc)))
            })?;
            Ok((id, packet(codec, frame_type, packet_type, body)?))
        })
    }
}

/// AvMultitrackType.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    OneTrack,
    ManyTracks,
    ManyTracksManyCodecs,
}

/// The tracks of a multitrack message (video or audio, whose layouts are the same), each as
/// its FourCC, id and packet body; it stops at the first error.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TrackSplit<'a> {
    kind: &'static str,
    layout: Layout,
    /// The codec of every track, unless each names its own.
    codec: Option<&'a [u8]>,
    rest: Option<&'a [u8]>,
}

impl<'a> TrackSplit<'a> {
    /// Reads the multitrack header (`[4 layout][4 packetType]`, then the FourCC unless each
    /// track has its own) from `rest`; returns the split and the tracks' packet type.
    fn new(kind: &'static str, rest: &'a [u8]) -> Result<(Self, u8), FlvError> {
        need(kind, rest, 1)?;
        let layout = match rest[0] >> 4 {
            0 => Layout::OneTrack,
            1 => Layout::ManyTracks,
            2 => Layout::ManyTracksManyCodecs,
            t => {
                return Err(FlvError::UnsupportedPacketType {
                    kind: "multitrack layout",
                    packet_type: t,
                });
            }
        };
        let packet_type = rest[0] & 0x0f;
        let rest = &rest[1..];
        let (codec, rest) = if layout == Layout::ManyTracksManyCodecs {
            (None, rest)
        } else {
            need(kind, rest, 4)?;
            (Some(&rest[..4]), &rest[4..])
        };
        let split = TrackSplit {
            kind,
            layout,
            codec,
            rest: Some(rest),
        };
        Ok((split, packet_type))
    }

    fn track(&mut self, rest: &'a [u8]) -> Result<(&'a [u8], u8, &'a [u8]), FlvError> {
        let kind = self.kind;
        let (fourcc, rest) = match self.codec {
            Some(f) => (f, rest),
            None => {
                need(kind, rest, 4)?;
                rest.split_at(4)
            }
        };
        let (&id, rest) = rest.split_first().ok_or(FlvError::Truncated {
            kind,
            needed: 1,
            got: 0,
        })?;
        if self.layout == Layout::OneTrack {
            return Ok((fourcc, id, rest));
        }
        need(kind, rest, 3)?;
        let size = usize::try_from(u32::from_be_bytes([0, rest[0], rest[1], rest[2]]))
            .unwrap_or(usize::MAX);
        let rest = &rest[3..];
        need(kind, rest, size)?;
        self.rest = Some(&rest[size..]);
        Ok((fourcc, id, &rest[..size]))
    }
}

impl<'a> Iterator for TrackSplit<'a> {
    type Item = Result<(&'a [u8], u8, &'a [u8]), FlvError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.rest.take()?;
        if rest.is_empty() && self.layout != Layout::OneTrack {
            return None;
        }
        // A failed track leaves nothing to read: the split ends with its error.
        Some(self.track(rest))
    }
}

const FRAME_TYPE_KEY: u8 = 1;
const FRAME_TYPE_COMMAND: u8 = 5;

fn legacy_video_codec_name(id: u8) -> String {
    match id {
        2 => "Sorenson H.263".into(),
        3 => "Screen video".into(),
        4 => "On2 VP6".into(),
        5 => "On2 VP6 with alpha".into(),
        6 => "Screen video v2".into(),
        12 => "HEVC (legacy codec id 12)".into(),
        other => format!("legacy codec id {other}"),
    }
}

fn fourcc_name(f: &[u8]) -> String {
    if f.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("'{}'", String::from_utf8_lossy(f))
    } else {
        format!("fourcc {f:02x?}")
    }
}

fn si24(b: &[u8]) -> i32 {
    // Sign-extend a big-endian 24-bit value.
    (i32::from_be_bytes([b[0], b[1], b[2], 0])) >> 8
}

fn need(kind: &'static str, data: &[u8], n: usize) -> Result<(), FlvError> {
    if data.len() < n {
        Err(FlvError::Truncated {
            kind,
            needed: n,
            got: data.len(),
        })
    } else {
        Ok(())
    }
}

/// Parses a video tag body.
pub fn parse_video(data: &[u8]) -> Result<VideoTag<'_>, FlvError> {
    let &b0 = data.first().ok_or(FlvError::Empty("video"))?;
    if b0 & 0x80 != 0 {
        return parse_video_ex(data);
    }
    let frame_type = b0 >> 4;
    let codec_id = b0 & 0x0f;
    if frame_type == FRAME_TYPE_COMMAND {
        return Ok(VideoTag::Ignored);
    }
    if codec_id != 7 {
        return Err(FlvError::UnsupportedVideoCodec(legacy_video_codec_name(
            codec_id,
        )));
    }
    need("video", data, 5)?;
    let codec = VideoCodec::Avc;
    match data[1] {
        0 => Ok(VideoTag::SequenceHeader {
            codec,
            config: &data[5..],
        }),
        1 => Ok(VideoTag::Frame {
            codec,
            keyframe: frame_type == FRAME_TYPE_KEY,
            cts: si24(&data[2..5]),
            data: &data[5..],
        }),
        2 => Ok(VideoTag::EndOfSequence),
        t => Err(FlvError::UnsupportedPacketType {
            kind: "AVC",
            packet_type: t,
        }),
    }
}

/// Enhanced RTMP video packet types.
const PACKET_SEQUENCE_START: u8 = 0;
const PACKET_CODED_FRAMES: u8 = 1;
const PACKET_SEQUENCE_END: u8 = 2;
const PACKET_CODED_FRAMES_X: u8 = 3;
const PACKET_METADATA: u8 = 4;
const PACKET_MPEG2TS_SEQUENCE_START: u8 = 5;
const PACKET_MULTITRACK: u8 = 6;
const PACKET_MOD_EX: u8 = 7;

/// Enhanced RTMP: `[1 isExHeader][3 frameType][4 packetType]`, any ModEx prefixes, then the
/// FourCC, or the multitrack header.
fn parse_video_ex(data: &[u8]) -> Result<VideoTag<'_>, FlvError> {
    let kind = "enhanced video";
    let frame_type = (data[0] >> 4) & 0x07;
    let (packet_type, rest) = skip_mod_ex(kind, data[0] & 0x0f, &data[1..])?;
    if packet_type != PACKET_METADATA && frame_type == FRAME_TYPE_COMMAND {
        return Ok(VideoTag::Ignored);
    }
    if packet_type == PACKET_MULTITRACK {
        let (split, packet_type) = TrackSplit::new("multitrack video", rest)?;
        if packet_type == PACKET_MULTITRACK || packet_type == PACKET_MOD_EX {
            return Err(FlvError::UnsupportedPacketType {
                kind: "packet inside a multitrack",
                packet_type,
            });
        }
        return Ok(VideoTag::Multitrack(Multitrack {
            frame_type,
            packet_type,
            split,
        }));
    }
    need(kind, rest, 4)?;
    let (fourcc, body) = rest.split_at(4);
    if packet_type == PACKET_METADATA {
        return Ok(VideoTag::Ignored);
    }
    let codec = VideoCodec::from_fourcc(fourcc).ok_or_else(|| {
        FlvError::UnsupportedVideoCodec(format!("{} (Enhanced RTMP)", fourcc_name(fourcc)))
    })?;
    packet(codec, frame_type, packet_type, body)
}

/// Skips ModEx prefixes (video and audio have the same, and the same packet type 7): `[UI8
/// size-1 (UI16 size-1 after 0xFF)][data][4 modExType][4 packetType]`. The one ModEx type so
/// far (a nanosecond timestamp offset) is below what is carried. Returns the real packet type
/// and what follows.
fn skip_mod_ex<'a>(
    kind: &'static str,
    mut packet_type: u8,
    mut rest: &'a [u8],
) -> Result<(u8, &'a [u8]), FlvError> {
    while packet_type == PACKET_MOD_EX {
        need(kind, rest, 1)?;
        let (size, after) = match rest[0] {
            0xff => {
                need(kind, rest, 3)?;
                (
                    usize::from(u16::from_be_bytes([rest[1], rest[2]])) + 1,
                    &rest[3..],
                )
            }
            n => (usize::from(n) + 1, &rest[1..]),
        };
        need(kind, after, size + 1)?;
        packet_type = after[size] & 0x0f;
        rest = &after[size + 1..];
    }
    Ok((packet_type, rest))
}

/// One packet's body, after its FourCC (and track id).
fn packet(
    codec: VideoCodec,
    frame_type: u8,
    packet_type: u8,
    body: &[u8],
) -> Result<VideoTag<'_>, FlvError> {
    let keyframe = frame_type == FRAME_TYPE_KEY;
    match packet_type {
        PACKET_SEQUENCE_START => Ok(VideoTag::SequenceHeader {
            codec,
            config: body,
        }),
        PACKET_CODED_FRAMES if codec.has_cts() => {
            need("enhanced video", body, 3)?;
            Ok(VideoTag::Frame {
                codec,
                keyframe,
                cts: si24(&body[..3]),
                data: &body[3..],
            })
        }
        PACKET_CODED_FRAMES | PACKET_CODED_FRAMES_X => Ok(VideoTag::Frame {
            codec,
            keyframe,
            cts: 0,
            data: body,
        }),
        PACKET_SEQUENCE_END => Ok(VideoTag::EndOfSequence),
        PACKET_METADATA | PACKET_MPEG2TS_SEQUENCE_START => Ok(VideoTag::Ignored),
        t => Err(FlvError::UnsupportedPacketType {
            kind: "enhanced video",
            packet_type: t,
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioCodec {
    Aac,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudioTag<'a> {
    /// `AudioSpecificConfig`.
    SequenceHeader {
        codec: AudioCodec,
        config: &'a [u8],
    },
    /// One raw AAC frame.
    Frame {
        codec: AudioCodec,
        data: &'a [u8],
    },
    Ignored,
    /// Enhanced RTMP v2 multitrack audio: packets of one or more tracks in one message.
    Multitrack(AudioMultitrack<'a>),
}

fn legacy_audio_codec_name(format: u8) -> String {
    match format {
        0 | 3 => "Linear PCM".into(),
        1 => "ADPCM".into(),
        2 | 14 => "MP3".into(),
        4..=6 => "Nellymoser".into(),
        7 => "G.711 A-law".into(),
        8 => "G.711 mu-law".into(),
        11 => "Speex".into(),
        15 => "device-specific sound".into(),
        other => format!("sound format {other}"),
    }
}

/// Parses an audio tag body.
pub fn parse_audio(data: &[u8]) -> Result<AudioTag<'_>, FlvError> {
    let &b0 = data.first().ok_or(FlvError::Empty("audio"))?;
    let format = b0 >> 4;
    match format {
        10 => {
            need("AAC audio", data, 2)?;
            let codec = AudioCodec::Aac;
            match data[1] {
                0 => Ok(AudioTag::SequenceHeader {
                    codec,
                    config: &data[2..],
                }),
                1 => Ok(AudioTag::Frame {
                    codec,
                    data: &data[2..],
                }),
                t => Err(FlvError::UnsupportedPacketType {
                    kind: "AAC",
                    packet_type: t,
                }),
            }
        }
        // Enhanced RTMP audio: `[4 soundFormat=9][4 packetType][fourcc]...`
        9 => {
            let kind = "enhanced audio";
            let (packet_type, rest) = skip_mod_ex(kind, b0 & 0x0f, &data[1..])?;
            if packet_type == AUDIO_MULTITRACK {
                let (split, packet_type) = TrackSplit::new("multitrack audio", rest)?;
                if packet_type == AUDIO_MULTITRACK || packet_type == PACKET_MOD_EX {
                    return Err(FlvError::UnsupportedPacketType {
                        kind: "packet inside a multitrack",
                        packet_type,
                    });
                }
                return Ok(AudioTag::Multitrack(AudioMultitrack { packet_type, split }));
            }
            need(kind, rest, 4)?;
            let (fourcc, body) = rest.split_at(4);
            audio_packet(fourcc, packet_type, body)
        }
        other => Err(FlvError::UnsupportedAudioCodec(legacy_audio_codec_name(
            other,
        ))),
    }
}

/// Enhanced RTMP audio: the packet type of a multitrack message (ModEx is 7, as for video).
const AUDIO_MULTITRACK: u8 = 5;

/// One Enhanced RTMP audio packet's body, after its FourCC (and track id).
fn audio_packet<'a>(
    fourcc: &[u8],
    packet_type: u8,
    body: &'a [u8],
) -> Result<AudioTag<'a>, FlvError> {
    if fourcc != b"mp4a" {
        return Err(FlvError::UnsupportedAudioCodec(format!(
            "{} (Enhanced RTMP)",
            fourcc_name(fourcc)
        )));
    }
    let codec = AudioCodec::Aac;
    match packet_type {
        0 => Ok(AudioTag::SequenceHeader {
            codec,
            config: body,
        }),
        1 => Ok(AudioTag::Frame { codec, data: body }),
        // SequenceEnd, MultichannelConfig: nothing to deliver.
        2 | 4 => Ok(AudioTag::Ignored),
        t => Err(FlvError::UnsupportedPacketType {
            kind: "enhanced audio",
            packet_type: t,
        }),
    }
}

/// The tracks of an Enhanced RTMP multitrack audio message; [`AudioMultitrack::tracks`] reads
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioMultitrack<'a> {
    packet_type: u8,
    split: TrackSplit<'a>,
}

impl<'a> AudioMultitrack<'a> {
    /// Each track's id and packet, in order; an error ends the message.
    pub fn tracks(&self) -> impl Iterator<Item = Result<(u8, AudioTag<'a>), FlvError>> + 'a {
        let packet_type = self.packet_type;
        self.split.clone().map(move |track| {
            let (fourcc, id, body) = track?;
            Ok((id, audio_packet(fourcc, packet_type, body)?))
        })
    }
}

/// An FLV bytestream (a file, `ffmpeg -f flv` on a pipe or socket) read tag by tag, from
/// chunks of any size. "Need more bytes" is `Ok(None)`.
#[derive(Debug, Default)]
pub struct TagReader {
    buf: bytes::BytesMut,
    header_done: bool,
}

/// One tag of an FLV bytestream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    /// 8 audio, 9 video, 18 script data.
    pub kind: u8,
    /// Milliseconds, with the extended byte.
    pub timestamp: u32,
    pub body: bytes::Bytes,
}

/// The largest tag a reader takes: an IDR of a high-bitrate 4K stream fits.
pub const MAX_TAG: usize = 16 << 20;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("no FLV signature")]
    NotFlv,
    #[error("FLV header of {0} bytes")]
    BadHeader(u32),
    #[error("FLV tag of {0} bytes (more than {MAX_TAG})")]
    TagTooLarge(usize),
}

impl TagReader {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete tag.
    pub fn next_tag(&mut self) -> Result<Option<Tag>, StreamError> {
        use bytes::Buf;
        if !self.header_done {
            if self.buf.len() < 9 {
                return Ok(None);
            }
            if &self.buf[..3] != b"FLV" {
                return Err(StreamError::NotFlv);
            }
            let header = u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]]);
            if !(9..=1024).contains(&header) {
                return Err(StreamError::BadHeader(header));
            }
            let skip = header as usize + 4; // the header, then PreviousTagSize0
            if self.buf.len() < skip {
                return Ok(None);
            }
            self.buf.advance(skip);
            self.header_done = true;
        }
        if self.buf.len() < 11 {
            return Ok(None);
        }
        let kind = self.buf[0] & 0x1f;
        let size = u32::from_be_bytes([0, self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if size > MAX_TAG {
            return Err(StreamError::TagTooLarge(size));
        }
        let timestamp = u32::from_be_bytes([self.buf[7], self.buf[4], self.buf[5], self.buf[6]]);
        if self.buf.len() < 11 + size + 4 {
            return Ok(None);
        }
        self.buf.advance(11);
        let body = self.buf.split_to(size).freeze();
        self.buf.advance(4); // PreviousTagSize
        Ok(Some(Tag {
            kind,
            timestamp,
            body,
        }))
    }
}

/// Writing an FLV bytestream: what the ladder's ffmpeg reads on its standard input.
pub mod write {
    /// The file header (audio and/or video flagged) and PreviousTagSize0.
    pub fn header(video: bool, audio: bool, out: &mut Vec<u8>) {
        let flags = if video { 0x01 } else { 0 } | if audio { 0x04 } else { 0 };
        out.extend_from_slice(&[b'F', b'L', b'V', 1, flags, 0, 0, 0, 9, 0, 0, 0, 0]);
    }

    /// One tag: its header, the body in parts (copied once, here), then PreviousTagSize.
    pub fn tag(kind: u8, timestamp: u32, body: &[&[u8]], out: &mut Vec<u8>) {
        let size: usize = body.iter().map(|b| b.len()).sum();
        let size = size as u32 & 0x00ff_ffff;
        let ts = timestamp.to_be_bytes();
        out.push(kind);
        out.extend_from_slice(&size.to_be_bytes()[1..]);
        out.extend_from_slice(&[ts[1], ts[2], ts[3], ts[0]]);
        out.extend_from_slice(&[0, 0, 0]); // stream id
        for b in body {
            out.extend_from_slice(b);
        }
        out.extend_from_slice(&(size + 11).to_be_bytes());
    }

    /// An AVC video tag body's first five bytes: frame type and codec, packet type (0 sequence
    /// header, 1 frame), composition time (SI24, ms).
    pub fn avc_prefix(keyframe: bool, sequence_header: bool, cts: i32) -> [u8; 5] {
        let c = cts.clamp(-(1 << 23), (1 << 23) - 1).to_be_bytes();
        [
            if keyframe { 0x17 } else { 0x27 },
            u8::from(!sequence_header),
            c[1],
            c[2],
            c[3],
        ]
    }

    /// An AAC audio tag body's first two bytes (the flags say 44 kHz stereo 16-bit, as FLV
    /// requires for AAC; the AudioSpecificConfig is what decoders go by).
    pub fn aac_prefix(sequence_header: bool) -> [u8; 2] {
        [0xaf, u8::from(!sequence_header)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_avc() {
        let seq = [0x17, 0, 0, 0, 0, 1, 0x64];
        assert_eq!(
            parse_video(&seq),
            Ok(VideoTag::SequenceHeader {
                codec: VideoCodec::Avc,
                config: &[1, 0x64]
            })
        );
        let nalu = [0x27, 1, 0xff, 0xff, 0xfe, 0, 0, 0, 1, 0x41];
        assert_eq!(
            parse_video(&nalu),
            Ok(VideoTag::Frame {
                codec: VideoCodec::Avc,
                keyframe: false,
                cts: -2,
                data: &[0, 0, 0, 1, 0x41]
            })
        );
        let key = [0x17, 1, 0, 0, 0x50, 9];
        assert!(matches!(
            parse_video(&key),
            Ok(VideoTag::Frame {
                keyframe: true,
                cts: 80,
                ..
            })
        ));
    }

    #[test]
    fn enhanced_rtmp_avc1_and_refused_codecs() {
        let mut seq = vec![0x80 | 0x10];
        seq.extend_from_slice(b"avc1");
        seq.push(1);
        assert!(matches!(
            parse_video(&seq),
            Ok(VideoTag::SequenceHeader { .. })
        ));
        let mut framex = vec![0x80 | 0x20 | 3];
        framex.extend_from_slice(b"avc1");
        framex.push(7);
        assert_eq!(
            parse_video(&framex),
            Ok(VideoTag::Frame {
                codec: VideoCodec::Avc,
                keyframe: false,
                cts: 0,
                data: &[7]
            })
        );
        let mut vvc = vec![0x80 | 0x10 | 1];
        vvc.extend_from_slice(b"vvc1");
        vvc.extend_from_slice(&[0, 0, 0]);
        assert_eq!(
            parse_video(&vvc),
            Err(FlvError::UnsupportedVideoCodec(
                "'vvc1' (Enhanced RTMP)".into()
            ))
        );
        assert_eq!(
            parse_video(&[0x12, 0]),
            Err(FlvError::UnsupportedVideoCodec("Sorenson H.263".into()))
        );
    }

    /// An Enhanced RTMP video tag: `[0x80 | frame type | packet type][rest]`.
    fn ex(frame_type: u8, packet_type: u8, rest: &[&[u8]]) -> Vec<u8> {
        let mut v = vec![0x80 | frame_type << 4 | packet_type];
        for r in rest {
            v.extend_from_slice(r);
        }
        v
    }

    #[test]
    fn hevc_av1_and_vp9_frames_and_their_composition_offsets() {
        // CodedFrames: HEVC has a composition offset, AV1 and VP9 do not.
        assert_eq!(
            parse_video(&ex(1, 1, &[b"hvc1", &[0, 0, 40], &[9]])),
            Ok(VideoTag::Frame {
                codec: VideoCodec::Hevc,
                keyframe: true,
                cts: 40,
                data: &[9]
            })
        );
        for (fourcc, codec) in [(b"av01", VideoCodec::Av1), (b"vp09", VideoCodec::Vp9)] {
            assert_eq!(
                parse_video(&ex(2, 1, &[fourcc, &[1, 2]])),
                Ok(VideoTag::Frame {
                    codec,
                    keyframe: false,
                    cts: 0,
                    data: &[1, 2]
                })
            );
            assert_eq!(
                parse_video(&ex(1, 0, &[fourcc, &[0x81]])),
                Ok(VideoTag::SequenceHeader {
                    codec,
                    config: &[0x81]
                })
            );
        }
        assert_eq!(
            parse_video(&ex(1, 2, &[b"av01"])),
            Ok(VideoTag::EndOfSequence)
        );
        assert_eq!(
            parse_video(&ex(1, 4, &[b"hvc1", &[2, 0, 0]])),
            Ok(VideoTag::Ignored),
            "metadata"
        );
        assert!(parse_video(&ex(1, 1, &[b"hvc1", &[0, 0]])).is_err());
    }

    #[test]
    fn mod_ex_prefixes_are_skipped() {
        // ModEx: one byte of size-1, a 3-byte nanosecond offset, then type 0 | CodedFramesX.
        assert_eq!(
            parse_video(&ex(1, 7, &[&[2, 0, 0, 7, 0x03], b"avc1", &[5]])),
            Ok(VideoTag::Frame {
                codec: VideoCodec::Avc,
                keyframe: true,
                cts: 0,
                data: &[5]
            })
        );
        // Two in a row, the second with the 16-bit size.
        let mut big = vec![0xff, 0x01, 0x00];
        big.extend(std::iter::repeat_n(0u8, 257));
        big.push(0x00); // then SequenceStart
        assert_eq!(
            parse_video(&ex(1, 7, &[&[0, 9, 0x07], &big, b"hvc1", &[1]])),
            Ok(VideoTag::SequenceHeader {
                codec: VideoCodec::Hevc,
                config: &[1]
            })
        );
        assert!(parse_video(&ex(1, 7, &[&[4, 0, 0]])).is_err(), "cut short");
    }

    fn tracks(tag: &[u8]) -> Vec<(u8, VideoTag<'_>)> {
        match parse_video(tag) {
            Ok(VideoTag::Multitrack(m)) => m.tracks().collect::<Result<_, _>>().unwrap(),
            other => panic!("not a multitrack message: {other:?}"),
        }
    }

    #[test]
    fn multitrack_in_its_three_layouts() {
        // OneTrack (as OBS sends every track but the first): layout 0, CodedFrames, FourCC,
        // track id, then the packet.
        assert_eq!(
            tracks(&ex(1, 6, &[&[0x01], b"avc1", &[1], &[0, 0, 0], &[7, 7]])),
            vec![(
                1,
                VideoTag::Frame {
                    codec: VideoCodec::Avc,
                    keyframe: true,
                    cts: 0,
                    data: &[7, 7]
                }
            )]
        );
        // ManyTracks: one FourCC, then each track's id and UI24 size.
        assert_eq!(
            tracks(&ex(
                1,
                6,
                &[
                    &[0x10],
                    b"hvc1",
                    &[0, 0, 0, 1],
                    &[0xaa],
                    &[2, 0, 0, 2],
                    &[0xbb, 0xcc]
                ]
            )),
            vec![
                (
                    0,
                    VideoTag::SequenceHeader {
                        codec: VideoCodec::Hevc,
                        config: &[0xaa]
                    }
                ),
                (
                    2,
                    VideoTag::SequenceHeader {
                        codec: VideoCodec::Hevc,
                        config: &[0xbb, 0xcc]
                    }
                )
            ]
        );
        // ManyTracksManyCodecs: each track names its codec.
        assert_eq!(
            tracks(&ex(
                2,
                6,
                &[
                    &[0x23],
                    b"avc1",
                    &[0, 0, 0, 1],
                    &[1],
                    b"av01",
                    &[1, 0, 0, 1],
                    &[2]
                ]
            )),
            vec![
                (
                    0,
                    VideoTag::Frame {
                        codec: VideoCodec::Avc,
                        keyframe: false,
                        cts: 0,
                        data: &[1]
                    }
                ),
                (
                    1,
                    VideoTag::Frame {
                        codec: VideoCodec::Av1,
                        keyframe: false,
                        cts: 0,
                        data: &[2]
                    }
                )
            ]
        );
    }

    #[test]
    fn a_bad_multitrack_message_is_an_error_not_a_panic() {
        let good = ex(
            1,
            6,
            &[
                &[0x10],
                b"hvc1",
                &[0, 0, 0, 1],
                &[0xaa],
                &[2, 0, 0, 2],
                &[1, 2],
            ],
        );
        for n in 0..good.len() {
            if let Ok(VideoTag::Multitrack(m)) = parse_video(&good[..n]) {
                let all: Result<Vec<_>, _> = m.tracks().collect();
                // Cut between tracks, a message is whole (with no track, or with the first);
                // cut inside one, it is an error.
                assert!(all.is_err() == !matches!(n, 6 | 11), "cut at {n}: {all:?}");
            }
        }
        assert!(
            parse_video(&ex(1, 6, &[&[0x30], b"avc1"])).is_err(),
            "layout 3"
        );
        assert!(
            parse_video(&ex(1, 6, &[&[0x16], b"avc1"])).is_err(),
            "a multitrack in a multitrack"
        );
    }

    /// The first video tags ffmpeg 9 writes (`scripts/fuzz-corpus.py` made them; the fuzz
    /// seeds are these files): HEVC and AV1 sequence starts, and the sequence start of a
    /// second video track as a multitrack message.
    #[test]
    fn what_ffmpeg_9_sends_parses_with_its_configurations() {
        use crate::codec::{av1::Av1Info, avc::AvcInfo, hevc::HevcInfo};
        let hevc = include_bytes!("../../fuzz/corpus/flv/ffmpeg9-hevc-video-0");
        let Ok(VideoTag::SequenceHeader {
            codec: VideoCodec::Hevc,
            config,
        }) = parse_video(hevc)
        else {
            panic!("{:?}", parse_video(hevc));
        };
        let info = HevcInfo::parse(config).unwrap();
        assert!(info.codec.starts_with("hvc1.1.6.L"), "{}", info.codec);
        assert_eq!((info.width, info.height), (160, 90));

        let av1 = include_bytes!("../../fuzz/corpus/flv/ffmpeg9-av1-video-0");
        let Ok(VideoTag::SequenceHeader {
            codec: VideoCodec::Av1,
            config,
        }) = parse_video(av1)
        else {
            panic!("{:?}", parse_video(av1));
        };
        let info = Av1Info::parse(config).unwrap();
        assert!(info.codec.starts_with("av01.0."), "{}", info.codec);
        assert_eq!((info.width, info.height), (160, 90));

        let second = include_bytes!("../../fuzz/corpus/flv/ffmpeg9-two-tracks-video-1");
        let t = tracks(second);
        let [
            (
                1,
                VideoTag::SequenceHeader {
                    codec: VideoCodec::Avc,
                    config,
                },
            ),
        ] = t.as_slice()
        else {
            panic!("{t:?}");
        };
        let info = AvcInfo::parse(config).unwrap();
        assert_eq!((info.width, info.height), (80, 44));
    }

    /// A second audio track as ffmpeg 9 sends it (OneTrack multitrack): its AudioSpecificConfig,
    /// its MultichannelConfig, then its frames.
    #[test]
    fn a_second_audio_track_as_ffmpeg_9_sends_it() {
        fn read(tag: &[u8]) -> Vec<(u8, AudioTag<'_>)> {
            match parse_audio(tag) {
                Ok(AudioTag::Multitrack(m)) => m.tracks().collect::<Result<_, _>>().unwrap(),
                other => panic!("not a multitrack message: {other:?}"),
            }
        }
        let start = include_bytes!("../../fuzz/corpus/flv/ffmpeg9-two-audio-audio-1");
        assert_eq!(
            read(start),
            vec![(
                1,
                AudioTag::SequenceHeader {
                    codec: AudioCodec::Aac,
                    config: &[0x12, 0x08, 0x56, 0xe5, 0x00]
                }
            )]
        );
        let multichannel = include_bytes!("../../fuzz/corpus/flv/ffmpeg9-two-audio-audio-2");
        assert_eq!(read(multichannel), vec![(1, AudioTag::Ignored)]);
        // `[0x95 ex|Multitrack][0x01 OneTrack|CodedFrames]["mp4a"][track 1]`, then the frame.
        let frame = include_bytes!("../../fuzz/corpus/flv/ffmpeg9-two-audio-audio-4");
        assert!(matches!(
            read(frame).as_slice(),
            [(1, AudioTag::Frame { codec: AudioCodec::Aac, data })] if data.len() == frame.len() - 7
        ));
        // ModEx before an audio packet, as before a video one.
        let mut modex = vec![0x97, 2, 0, 0, 7, 0x01];
        modex.extend_from_slice(b"mp4a");
        modex.push(5);
        assert_eq!(
            parse_audio(&modex),
            Ok(AudioTag::Frame {
                codec: AudioCodec::Aac,
                data: &[5]
            })
        );
        assert!(
            parse_audio(&[0x95, 0x05]).is_err(),
            "a multitrack in a multitrack"
        );
    }

    #[test]
    fn audio() {
        assert_eq!(
            parse_audio(&[0xaf, 0, 0x12, 0x10]),
            Ok(AudioTag::SequenceHeader {
                codec: AudioCodec::Aac,
                config: &[0x12, 0x10]
            })
        );
        assert_eq!(
            parse_audio(&[0xaf, 1, 5]),
            Ok(AudioTag::Frame {
                codec: AudioCodec::Aac,
                data: &[5]
            })
        );
        assert_eq!(
            parse_audio(&[0x2f, 0xff]),
            Err(FlvError::UnsupportedAudioCodec("MP3".into()))
        );
        let mut opus = vec![0x91];
        opus.extend_from_slice(b"Opus");
        assert_eq!(
            parse_audio(&opus),
            Err(FlvError::UnsupportedAudioCodec(
                "'Opus' (Enhanced RTMP)".into()
            ))
        );
    }

    #[test]
    fn short_tags_are_errors() {
        for n in 0..5 {
            let v = [0x17u8, 1, 0, 0, 0];
            assert!(parse_video(&v[..n]).is_err());
        }
        assert!(parse_audio(&[]).is_err());
        assert!(parse_audio(&[0xaf]).is_err());
        assert!(parse_video(&[0x90, b'a', b'v']).is_err());
    }

    #[test]
    fn written_tags_read_back_in_any_chunking() {
        let mut out = Vec::new();
        write::header(true, true, &mut out);
        let avcc = [1u8, 0x64, 0, 0x1f, 0xff, 0xe1, 0, 0];
        write::tag(9, 0, &[&write::avc_prefix(true, true, 0), &avcc], &mut out);
        let frame = [0u8, 0, 0, 1, 0x65];
        write::tag(
            9,
            0x0123_4567,
            &[&write::avc_prefix(true, false, -33), &frame],
            &mut out,
        );
        write::tag(8, 40, &[&write::aac_prefix(false), b"aac"], &mut out);
        for chunk in [1, 3, 7, 1000] {
            let mut r = TagReader::default();
            let mut tags = Vec::new();
            for c in out.chunks(chunk) {
                r.push(c);
                while let Some(t) = r.next_tag().expect("tag") {
                    tags.push(t);
                }
            }
            assert_eq!(tags.len(), 3, "chunk {chunk}");
            assert_eq!(
                parse_video(&tags[0].body),
                Ok(VideoTag::SequenceHeader {
                    codec: VideoCodec::Avc,
                    config: &avcc
                })
            );
            assert_eq!(tags[1].timestamp, 0x0123_4567, "extended timestamp byte");
            assert_eq!(
                parse_video(&tags[1].body),
                Ok(VideoTag::Frame {
                    codec: VideoCodec::Avc,
                    keyframe: true,
                    cts: -33,
                    data: &frame
                })
            );
            assert_eq!(
                parse_audio(&tags[2].body),
                Ok(AudioTag::Frame {
                    codec: AudioCodec::Aac,
                    data: b"aac"
                })
            );
        }
        let mut bad = TagReader::default();
        bad.push(b"NOTFLV123");
        assert_eq!(bad.next_tag(), Err(StreamError::NotFlv));
    }
}

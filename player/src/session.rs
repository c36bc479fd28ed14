//! The player's protocol side, with no browser in it: it turns server messages into what MSE
//! needs (a source buffer per track with its init segment, then one fMP4 fragment per frame) and
//! keeps one continuous media timeline across republishes and reconnects.
//!
//! Frames are boxed one per fragment as they arrive: waiting for the next frame to learn the
//! exact duration would add a frame time (33 ms at 30 fps) to the latency. The duration written
//! is the last step seen on that track; the next fragment's `tfdt` is exact, so an estimate that
//! is off never accumulates.

use onair_protocol::fmp4::{self, Codec, Run, Sample, Track};
use onair_protocol::wire::{
    self, Init, MEDIA_HEADER_LEN, MediaHeader, Message, Status, TimeSyncResponse, TrackKind,
    TrackParams, WireError,
};

/// Where the media timeline starts. Headroom below it absorbs a track whose first frame after an
/// init comes slightly before the other's (audio decoded a little ahead of video).
const TIMELINE_ORIGIN_US: i64 = 10_000_000;

/// A step between frames longer than this is not a frame rate but a clock jump.
const MAX_FRAME_STEP_S: u64 = 2;

/// Frames remembered for mapping the playhead back to the server's ingest time: ~10 s of video.
const INGEST_MAP_LEN: usize = 600;

/// A source buffer to create (or re-initialise): its MIME type and init segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    pub kind: TrackKind,
    /// `video/mp4; codecs="avc1.64001f"`: what `MediaSource.isTypeSupported` and
    /// `addSourceBuffer` take.
    pub mime: String,
    pub init: Vec<u8>,
}

/// A fragment to append to the source buffer of `kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    pub kind: TrackKind,
    pub data: Vec<u8>,
    pub keyframe: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Hello {
        viewer_id: u64,
        server_time_us: u64,
        stream: String,
    },
    Status {
        code: wire::StatusCode,
        message: String,
    },
    /// Set up source buffers for these tracks. `same_tracks` says the kinds are the ones already
    /// set up, so the existing buffers can take the new init segments (a resolution change, a
    /// reconnect) instead of a new MediaSource.
    Configure {
        sources: Vec<SourceConfig>,
        same_tracks: bool,
    },
    Fragment(Fragment),
    TimeSync(TimeSyncResponse),
    /// The stream plays in sync: hold exactly this latency (ms).
    Sync(u32),
    /// The server asks for a receipt every this many ms (0: no more).
    Receipts(u16),
    /// What the server measured about this viewer.
    ServerStats(wire::ServerStats),
    /// A message the player does not act on.
    Ignored,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("protocol: {0}")]
    Wire(#[from] WireError),
    #[error("muxing: {0}")]
    Fmp4(#[from] fmp4::Fmp4Error),
    #[error("init has no track the player can play")]
    NoTracks,
}

struct TrackState {
    wire_id: u8,
    kind: TrackKind,
    /// Units per second of the wire's dts/cts.
    wire_timescale: u32,
    /// Units per second written into the fMP4 track (the sample rate for AAC).
    timescale: u32,
    /// Estimated duration of the next frame, in `timescale`.
    duration: u32,
    last_dts: Option<u64>,
    /// Where the next audio frame would start if frames are contiguous, in `timescale`.
    next_dts: Option<u64>,
}

/// Maps wire timestamps of the current publish onto the player's continuous timeline.
#[derive(Default)]
struct Timeline {
    /// (wire time of the first frame after an init, its timeline position), in µs.
    base: Option<(i64, i64)>,
    /// Where the next publish starts: the end of everything appended so far.
    next_origin_us: i64,
    end_us: i64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct IngestMark {
    pts_us: i64,
    ingest_us: u64,
}

pub struct Session {
    /// The rendition of the last init: what the server is sending.
    pub rendition: u8,
    tracks: Vec<TrackState>,
    timeline: Timeline,
    sequence: u32,
    /// Media is dropped until a keyframe: after an init, or after the player dropped data.
    need_keyframe: bool,
    /// Audio is kept while waiting for the video keyframe: after a rendition switch, whose
    /// audio continues right after the last audio frame (it may come before the keyframe).
    audio_continues: bool,
    /// A hello or a status came since the last init, so the next init starts a new publish
    /// (a reconnect, a republish, a skip that may have crossed one) whose clock is unrelated.
    /// Without one, an init with the same kinds of track is a rendition switch: renditions
    /// share one timeline, so the mapping onto the player's timeline stays.
    new_timeline: bool,
    ingest_map: std::collections::VecDeque<IngestMark>,
    /// Newest ingest time received, and the server time it was received at, for the delivery
    /// latency when nothing is buffered yet.
    last_ingest_us: u64,
    bytes_received: u64,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    pub fn new() -> Self {
        Self {
            rendition: 0,
            tracks: Vec::new(),
            timeline: Timeline {
                base: None,
                next_origin_us: TIMELINE_ORIGIN_US,
                end_us: TIMELINE_ORIGIN_US,
            },
            sequence: 0,
            need_keyframe: true,
            audio_continues: false,
            new_timeline: true,
            ingest_map: std::collections::VecDeque::with_capacity(INGEST_MAP_LEN),
            last_ingest_us: 0,
            bytes_received: 0,
        }
    }

    /// Handles one whole message that is not media (media goes through [`Session::media`], so
    /// its payload can be copied once, straight into the fragment).
    pub fn message(&mut self, buf: &[u8]) -> Result<Event, SessionError> {
        let msg = Message::decode(buf)?;
        if !matches!(msg, Message::Media { .. }) {
            self.bytes_received += buf.len() as u64;
        }
        if matches!(msg, Message::Hello(_) | Message::Status(_)) {
            self.new_timeline = true;
        }
        Ok(match msg {
            Message::Hello(h) => Event::Hello {
                viewer_id: h.viewer_id,
                server_time_us: h.server_time_us,
                stream: h.stream.to_owned(),
            },
            Message::Status(Status { code, message }) => Event::Status {
                code,
                message: message.to_owned(),
            },
            Message::Init(init) => self.init(&init)?,
            Message::Media { header, payload } => {
                match self.media(&header, payload.len(), |dst| dst.copy_from_slice(payload))? {
                    Some(f) => Event::Fragment(f),
                    None => Event::Ignored,
                }
            }
            Message::TimeSyncResponse(r) => Event::TimeSync(r),
            Message::Control(wire::Control::SetTargetLatency { ms }) => Event::Sync(ms),
            Message::Control(wire::Control::Receipts { every_ms }) => Event::Receipts(every_ms),
            Message::ServerStats(s) => Event::ServerStats(s),
            _ => Event::Ignored,
        })
    }

    fn init(&mut self, init: &Init<'_>) -> Result<Event, SessionError> {
        self.rendition = init.rendition;
        let old_kinds: Vec<TrackKind> = self.tracks.iter().map(|t| t.kind).collect();
        let mut tracks = Vec::new();
        let mut sources = Vec::new();
        for t in &init.tracks {
            // One kind per source buffer: a second video track would need a second <video>.
            if tracks.iter().any(|s: &TrackState| s.kind == t.kind()) {
                continue;
            }
            let (codec, timescale, duration) = match t.params {
                TrackParams::Video {
                    width,
                    height,
                    fps_milli,
                } => {
                    let duration = if fps_milli > 0 {
                        (u64::from(t.timescale) * 1000 / u64::from(fps_milli)).max(1) as u32
                    } else {
                        (t.timescale / 30).max(1)
                    };
                    let Some(codec) = Codec::video(t.codec, width, height, t.config) else {
                        continue; // a codec this player cannot box: left out, like a second track
                    };
                    (codec, t.timescale, duration)
                }
                TrackParams::Audio {
                    sample_rate,
                    channels,
                } => (
                    Codec::Aac {
                        sample_rate,
                        channels,
                        asc: t.config,
                    },
                    // AAC frames are 1024 samples: in the sample rate's timescale every
                    // duration is exact.
                    sample_rate,
                    1024,
                ),
            };
            if t.timescale == 0 || timescale == 0 {
                continue;
            }
            let kind = t.kind();
            let init = fmp4::init_segment(&[Track {
                id: 1,
                timescale,
                codec,
            }])?;
            let mut mime = String::from(match kind {
                TrackKind::Video => "video/mp4; codecs=\"",
                TrackKind::Audio => "audio/mp4; codecs=\"",
            });
            mime.push_str(t.codec);
            mime.push('"');
            sources.push(SourceConfig { kind, mime, init });
            tracks.push(TrackState {
                wire_id: t.id,
                kind,
                wire_timescale: t.timescale,
                timescale,
                duration,
                last_dts: None,
                next_dts: None,
            });
        }
        if tracks.is_empty() {
            return Err(SessionError::NoTracks);
        }
        let same_tracks = !old_kinds.is_empty()
            && old_kinds.len() == tracks.len()
            && tracks.iter().all(|t| old_kinds.contains(&t.kind));
        let switch = same_tracks && !self.new_timeline;
        if switch {
            // The same timeline goes on: what each track knows of it (the last dts, where the
            // next audio frame starts) carries over, when the clocks are the same.
            for t in &mut tracks {
                if let Some(old) = self
                    .tracks
                    .iter()
                    .find(|o| o.kind == t.kind && o.wire_timescale == t.wire_timescale)
                    && old.timescale == t.timescale
                {
                    t.last_dts = old.last_dts;
                    t.next_dts = old.next_dts;
                    t.duration = old.duration;
                }
            }
        } else {
            // The new publish continues the timeline where the old one ended.
            self.timeline.next_origin_us = self.timeline.end_us;
            self.timeline.base = None;
        }
        self.tracks = tracks;
        self.need_keyframe = true;
        self.audio_continues = switch;
        self.new_timeline = false;
        Ok(Event::Configure {
            sources,
            same_tracks,
        })
    }

    /// Boxes one media frame. `fill` copies the `payload_len` payload bytes into the slice it
    /// is given (the fragment's mdat). `None`: the frame is not playable yet (no init, or
    /// waiting for a keyframe) or belongs to a track the player does not use.
    pub fn media(
        &mut self,
        header: &MediaHeader,
        payload_len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<Option<Fragment>, SessionError> {
        self.bytes_received += (MEDIA_HEADER_LEN + payload_len) as u64;
        self.last_ingest_us = header.ingest_us;
        let Some(ti) = self.tracks.iter().position(|t| t.wire_id == header.track) else {
            return Ok(None);
        };
        let kind = self.tracks[ti].kind;
        if self.need_keyframe {
            // Video decides where playback can start; audio before that would only be cut.
            let waits_for_video =
                kind != TrackKind::Video && self.tracks.iter().any(|t| t.kind == TrackKind::Video);
            if waits_for_video && !self.audio_continues {
                return Ok(None);
            }
            if !waits_for_video {
                if !header.keyframe {
                    return Ok(None);
                }
                self.need_keyframe = false;
            }
        }
        let has_video = self.tracks.iter().any(|t| t.kind == TrackKind::Video);
        let primary = kind == TrackKind::Video || !has_video;
        let track = &mut self.tracks[ti];
        // dts is at most 2^40, so dts × 10^6 fits in a u64 (and the result in an i64).
        let wire_us = (header.dts * 1_000_000 / u64::from(track.wire_timescale)) as i64;
        if primary
            && let Some(last) = track.last_dts
            && (header.dts < last
                || header.dts - last > u64::from(track.wire_timescale) * MAX_FRAME_STEP_S)
        {
            // The publisher's clock went back or leapt ahead (an encoder restart behind a relay):
            // continue the timeline where it is instead of leaving a hole the playhead would
            // never cross, or placing frames behind it.
            self.timeline.base = Some((wire_us, self.timeline.end_us));
        }
        let (base_wire, base_pos) = *self
            .timeline
            .base
            .get_or_insert((wire_us, self.timeline.next_origin_us));
        let pos_us = base_pos + (wire_us - base_wire);
        if pos_us < 0 {
            return Ok(None);
        }
        if let Some(last) = track.last_dts
            && header.dts > last
        {
            // In u128: a dts step of up to 2^40 times a 32-bit timescale (fuzz/player_session).
            let step = u128::from(header.dts - last) * u128::from(track.timescale)
                / u128::from(track.wire_timescale.max(1));
            let step = u64::try_from(step).unwrap_or(u64::MAX);
            // Audio keeps its exact 1024; a video step longer than a second is a gap in the
            // stream, not a frame rate.
            if track.kind == TrackKind::Video && step > 0 && step < u64::from(track.timescale) {
                track.duration = step as u32;
            }
        }
        track.last_dts = Some(header.dts);
        let mut base_dts = rescale_us(pos_us as u64, track.timescale);
        if track.kind == TrackKind::Audio {
            // RTMP stamps audio in whole milliseconds while AAC frames are 1024 samples: keep
            // the samples back to back unless the stamp really moved (a gap, a seam).
            if let Some(expected) = track.next_dts
                && base_dts.abs_diff(expected) < u64::from(track.duration) / 2
            {
                base_dts = expected;
            }
            track.next_dts = Some(base_dts + u64::from(track.duration));
        }
        let cts =
            i64::from(header.cts) * i64::from(track.timescale) / i64::from(track.wire_timescale);
        let duration_us = i64::from(track.duration) * 1_000_000 / i64::from(track.timescale.max(1));
        let sample = [Sample {
            duration: track.duration,
            size: u32::try_from(payload_len).map_err(|_| fmp4::Fmp4Error::TooLarge {
                what: "sample",
                len: payload_len as u64,
            })?,
            cts: cts as i32,
            keyframe: header.keyframe,
        }];
        let runs = [Run {
            track_id: 1,
            base_dts,
            samples: &sample,
        }];
        self.sequence = self.sequence.wrapping_add(1);
        let head_len = fmp4::fragment_header_len(&runs);
        let mut data = Vec::with_capacity(head_len + payload_len);
        fmp4::write_fragment_header(&mut data, self.sequence, &runs)?;
        data.resize(head_len + payload_len, 0);
        fill(&mut data[head_len..]);
        let wire_timescale = track.wire_timescale;
        if kind == TrackKind::Video || !has_video {
            // The seam of the next publish follows the video: were it placed after audio that
            // runs a frame longer, the video would have a hole there that the decoder stalls
            // at. The new audio overlaps the old by under a frame instead, which MSE resolves
            // by replacing the old frames.
            self.timeline.end_us = self.timeline.end_us.max(pos_us + duration_us);
            if self.ingest_map.len() == INGEST_MAP_LEN {
                self.ingest_map.pop_front();
            }
            let cts_us = i64::from(header.cts) * 1_000_000 / i64::from(wire_timescale);
            self.ingest_map.push_back(IngestMark {
                pts_us: pos_us + cts_us,
                ingest_us: header.ingest_us,
            });
        }
        Ok(Some(Fragment {
            kind,
            data,
            keyframe: header.keyframe,
        }))
    }

    /// After the player had to drop appended data: start again from the next keyframe.
    pub fn resync(&mut self) {
        self.need_keyframe = true;
        self.audio_continues = false;
    }

    /// Server ingest time of the frame showing at `media_time` seconds: the latest frame whose
    /// presentation time is not after it.
    pub fn ingest_at(&self, media_time: f64) -> Option<u64> {
        self.frame_at(media_time).map(|(m, _)| m.ingest_us)
    }

    /// Server ingest time of the playback position itself: the frame's, plus how long that
    /// frame has been showing. Now minus this is the glass-to-glass latency of the frame on
    /// screen (ingest to first display), without the frame-time sawtooth.
    pub fn position_ingest_us(&self, media_time: f64) -> Option<u64> {
        self.frame_at(media_time)
            .map(|(m, t)| m.ingest_us + t.saturating_sub(m.pts_us) as u64)
    }

    fn frame_at(&self, media_time: f64) -> Option<(&IngestMark, i64)> {
        let t = (media_time * 1_000_000.0) as i64;
        self.ingest_map
            .iter()
            .filter(|m| m.pts_us <= t)
            .max_by_key(|m| m.pts_us)
            .map(|m| (m, t))
    }

    /// Ingest time of the newest frame received.
    pub fn last_ingest_us(&self) -> u64 {
        self.last_ingest_us
    }

    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// The timeline end, in seconds: where the next publish will be placed.
    pub fn timeline_end(&self) -> f64 {
        self.timeline.end_us as f64 / 1e6
    }
}

/// `us` microseconds in units of `timescale`, without overflow (and without 128-bit division,
/// which costs the Wasm bundle a kilobyte).
fn rescale_us(us: u64, timescale: u32) -> u64 {
    let ts = u64::from(timescale);
    (us / 1_000_000) * ts + (us % 1_000_000) * ts / 1_000_000
}

/// Clock offset to the server from NTP-style samples (docs/protocol.md): of the recent samples,
/// the one with the smallest round trip, whose one-way delays are least asymmetric. Only recent
/// ones, so that the drift between the two clocks (tens of ppm) is followed over hours.
#[derive(Debug, Default, Clone)]
pub struct ClockSync {
    /// (round trip, offset) of the last [`CLOCK_SAMPLES`] samples, µs.
    recent: std::collections::VecDeque<(i64, i64)>,
    /// Offset from the hello, until a sample arrives.
    hello_offset_us: i64,
    pub samples: u32,
}

/// Samples the offset is chosen from: at one per 10 s, the last two minutes.
const CLOCK_SAMPLES: usize = 12;

impl ClockSync {
    /// `t3_us`: client clock when the response arrived (same clock as the request's t0).
    pub fn add(&mut self, r: &TimeSyncResponse, t3_us: u64) {
        let (t0, t1, t2, t3) = (r.t0 as i64, r.t1 as i64, r.t2 as i64, t3_us as i64);
        let rtt = (t3 - t0) - (t2 - t1);
        if rtt < 0 {
            return;
        }
        self.samples += 1;
        if self.recent.len() == CLOCK_SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back((rtt, ((t1 - t0) + (t2 - t3)) / 2));
    }

    fn best(&self) -> Option<(i64, i64)> {
        self.recent.iter().copied().min_by_key(|(rtt, _)| *rtt)
    }

    /// Rough offset from the hello alone, until a sample arrives: assumes no transit time.
    pub fn hello(&mut self, server_time_us: u64, now_us: u64) {
        self.hello_offset_us = server_time_us as i64 - now_us as i64;
    }

    /// Server clock at client time `now_us`.
    pub fn server_time(&self, now_us: u64) -> u64 {
        let offset = self.best().map_or(self.hello_offset_us, |(_, o)| o);
        (now_us as i64 + offset).max(0) as u64
    }

    pub fn rtt_us(&self) -> Option<i64> {
        self.best().map(|(rtt, _)| rtt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use onair_protocol::wire::{TrackInit, VERSION};

    fn init_msg(width: u16, audio: bool) -> Vec<u8> {
        // A real avcC is not needed here: the muxer writes it verbatim.
        let mut tracks = vec![TrackInit {
            id: 0,
            timescale: 1000,
            codec: "avc1.64001f",
            params: TrackParams::Video {
                width,
                height: 360,
                fps_milli: 30_000,
            },
            config: &[1, 0x64, 0, 0x1f, 0xff, 0xe0, 0],
        }];
        if audio {
            tracks.push(TrackInit {
                id: 1,
                timescale: 1000,
                codec: "mp4a.40.2",
                params: TrackParams::Audio {
                    sample_rate: 48000,
                    channels: 2,
                },
                config: &[0x11, 0x90],
            });
        }
        Message::Init(Init {
            rendition: 0,
            tracks,
        })
        .to_vec()
        .expect("encode")
    }

    fn media(track: u8, keyframe: bool, dts: u64, cts: i16, ingest_us: u64) -> Vec<u8> {
        let mut h = [0u8; MEDIA_HEADER_LEN];
        MediaHeader {
            track,
            keyframe,
            dts,
            cts,
            ingest_us,
        }
        .encode(&mut h);
        let mut v = h.to_vec();
        v.extend_from_slice(&[0xAB; 10]);
        v
    }

    fn republished() -> Vec<u8> {
        Message::Status(Status {
            code: wire::StatusCode::Republished,
            message: "publisher is back",
        })
        .to_vec()
        .expect("encode")
    }

    /// `base_dts` of a one-sample fragment: the moof's tfdt (version 1, after mfhd and tfhd).
    fn tfdt(f: &Fragment) -> u64 {
        let at = f.data.windows(4).position(|w| w == b"tfdt").expect("tfdt");
        u64::from_be_bytes(f.data[at + 8..at + 16].try_into().expect("8 bytes"))
    }

    fn fragment(s: &mut Session, msg: &[u8]) -> Option<Fragment> {
        match s.message(msg).expect("message") {
            Event::Fragment(f) => Some(f),
            _ => None,
        }
    }

    #[test]
    fn hello_then_init_configures_one_source_per_kind() {
        let mut s = Session::new();
        let hello = Message::Hello(wire::Hello {
            version: VERSION,
            viewer_id: 7,
            server_time_us: 5,
            stream: "cam",
        })
        .to_vec()
        .expect("encode");
        assert!(matches!(
            s.message(&hello),
            Ok(Event::Hello { viewer_id: 7, .. })
        ));
        match s.message(&init_msg(640, true)).expect("init") {
            Event::Configure {
                sources,
                same_tracks,
            } => {
                assert!(!same_tracks);
                assert_eq!(sources.len(), 2);
                assert_eq!(sources[0].mime, "video/mp4; codecs=\"avc1.64001f\"");
                assert_eq!(sources[1].mime, "audio/mp4; codecs=\"mp4a.40.2\"");
                assert_eq!(&sources[0].init[4..8], b"ftyp");
            }
            e => panic!("unexpected {e:?}"),
        }
        // Same kinds again (a resolution change): the buffers can stay.
        assert!(matches!(
            s.message(&init_msg(1280, true)),
            Ok(Event::Configure {
                same_tracks: true,
                ..
            })
        ));
        assert!(matches!(
            s.message(&init_msg(1280, false)),
            Ok(Event::Configure {
                same_tracks: false,
                ..
            })
        ));
    }

    #[test]
    fn media_waits_for_a_video_keyframe_and_carries_the_payload() {
        let mut s = Session::new();
        s.message(&init_msg(640, true)).expect("init");
        assert_eq!(
            fragment(&mut s, &media(1, true, 0, 0, 1)),
            None,
            "audio first"
        );
        assert_eq!(
            fragment(&mut s, &media(0, false, 0, 0, 1)),
            None,
            "delta first"
        );
        let f = fragment(&mut s, &media(0, true, 100, 0, 2)).expect("keyframe");
        assert!(f.keyframe);
        assert_eq!(&f.data[4..8], b"moof");
        assert!(f.data.ends_with(&[0xAB; 10]));
        let a = fragment(&mut s, &media(1, true, 90, 0, 2)).expect("audio after");
        assert_eq!(a.kind, TrackKind::Audio);
    }

    #[test]
    fn republish_continues_the_timeline() {
        let mut s = Session::new();
        s.message(&init_msg(640, false)).expect("init");
        for i in 0..30u64 {
            fragment(&mut s, &media(0, i == 0, 5000 + i * 33, 0, i)).expect("frame");
        }
        let end = s.timeline_end();
        assert!((end - (10.0 + 30.0 * 0.033)).abs() < 0.002, "{end}");
        // The new publisher starts its clock at zero.
        s.message(&republished()).expect("status");
        s.message(&init_msg(1280, false)).expect("init");
        fragment(&mut s, &media(0, true, 0, 0, 99)).expect("frame");
        assert_eq!(s.ingest_at(end), Some(99));
        assert_eq!(s.ingest_at(end - 0.01), Some(29));
        assert!(s.timeline_end() > end);
    }

    #[test]
    fn a_rendition_switch_keeps_the_timeline_and_the_audio_before_its_keyframe() {
        let mut s = Session::new();
        s.message(&init_msg(1280, true)).expect("init");
        fragment(&mut s, &media(0, true, 5000, 0, 1)).expect("video");
        let a0 = fragment(&mut s, &media(1, true, 5000, 0, 1)).expect("audio");
        fragment(&mut s, &media(0, false, 5033, 0, 2)).expect("video");
        let a1 = fragment(&mut s, &media(1, true, 5021, 0, 2)).expect("audio");
        assert_eq!(tfdt(&a1) - tfdt(&a0), 1024, "audio back to back");
        // A switch: the other rendition's init with no status before it, then audio that
        // continues right after the last one (before the keyframe), then the keyframe.
        s.message(&init_msg(640, true)).expect("init");
        let a2 = fragment(&mut s, &media(1, true, 5043, 0, 3))
            .expect("audio before the new rendition's keyframe is kept");
        assert_eq!(tfdt(&a2) - tfdt(&a1), 1024, "no hole or overlap in audio");
        let v = fragment(&mut s, &media(0, true, 5066, 0, 3)).expect("keyframe");
        // 66 ms after the first frame, which sits at the timeline's origin: the same
        // timeline, not a new publish placed at its end.
        assert_eq!(
            tfdt(&v),
            10_066,
            "video at its own time on the same timeline"
        );
        assert_eq!(s.ingest_at(10.066), Some(3));

        // After a skip (which may cross a republish) an init starts a new timeline again.
        let skipped = Message::Status(Status {
            code: wire::StatusCode::Skipped,
            message: "fell behind",
        })
        .to_vec()
        .expect("encode");
        s.message(&skipped).expect("status");
        let end = s.timeline_end();
        s.message(&init_msg(1280, true)).expect("init");
        assert_eq!(
            fragment(&mut s, &media(1, true, 20, 0, 4)),
            None,
            "audio waits"
        );
        let v = fragment(&mut s, &media(0, true, 0, 0, 4)).expect("keyframe");
        assert_eq!(
            tfdt(&v),
            (end * 1000.0).round() as u64,
            "placed at the end: {end}"
        );
    }

    #[test]
    fn the_seam_follows_the_video_not_longer_audio() {
        let mut s = Session::new();
        s.message(&init_msg(640, true)).expect("init");
        fragment(&mut s, &media(0, true, 0, 0, 1)).expect("video");
        // Audio runs 40 ms past the last video frame's end (33 ms).
        fragment(&mut s, &media(1, true, 50, 0, 1)).expect("audio");
        let end = s.timeline_end();
        assert!((end - 10.033).abs() < 0.0015, "{end}");
    }

    #[test]
    fn ingest_lookup_uses_presentation_time() {
        let mut s = Session::new();
        s.message(&init_msg(640, false)).expect("init");
        // I P B: the B frame (dts 66) shows before the P frame (dts 33, cts 66).
        fragment(&mut s, &media(0, true, 0, 33, 1000)).expect("I");
        fragment(&mut s, &media(0, false, 33, 100, 2000)).expect("P");
        fragment(&mut s, &media(0, false, 66, 0, 3000)).expect("B");
        assert_eq!(s.ingest_at(10.034), Some(1000));
        assert_eq!(s.ingest_at(10.067), Some(3000));
        assert_eq!(s.ingest_at(10.134), Some(2000));
        assert_eq!(s.ingest_at(9.0), None);
        // The position: 10 ms into the B frame's display.
        assert_eq!(s.position_ingest_us(10.076), Some(3000 + 10_000));
        assert_eq!(s.position_ingest_us(9.0), None);
    }

    #[test]
    fn rescaling_is_exact_and_does_not_overflow() {
        assert_eq!(rescale_us(1_500_000, 48_000), 72_000);
        assert_eq!(rescale_us(33_333, 90_000), 2_999);
        let big = (wire::MAX_DTS) * 1000;
        assert_eq!(rescale_us(big, 1_000_000), big);
    }

    #[test]
    fn clock_sync_prefers_the_shortest_round_trip() {
        let mut c = ClockSync::default();
        // Server is 1 s ahead. Sample 1: 40 ms out, 0 back (asymmetric, long).
        c.add(
            &TimeSyncResponse {
                t0: 0,
                t1: 1_040_000,
                t2: 1_040_000,
            },
            40_000,
        );
        // Sample 2: 1 ms each way.
        c.add(
            &TimeSyncResponse {
                t0: 100_000,
                t1: 1_101_000,
                t2: 1_101_000,
            },
            102_000,
        );
        assert_eq!(c.rtt_us(), Some(2000));
        assert_eq!(c.server_time(0), 1_000_000);
        assert_eq!(c.samples, 2);
        // The clocks drift apart by 5 ms; once the good sample is old, newer ones rule.
        for i in 0..CLOCK_SAMPLES as u64 {
            let t0 = 1_000_000 + i * 10_000_000;
            c.add(
                &TimeSyncResponse {
                    t0,
                    t1: t0 + 1_005_000 + 1500,
                    t2: t0 + 1_005_000 + 1500,
                },
                t0 + 3000,
            );
        }
        assert_eq!(c.rtt_us(), Some(3000));
        assert_eq!(c.server_time(0), 1_005_000);
    }

    #[test]
    fn a_publisher_clock_jump_continues_the_timeline() {
        let mut s = Session::new();
        s.message(&init_msg(640, false)).expect("init");
        fragment(&mut s, &media(0, true, 1_000_000, 0, 1)).expect("frame");
        fragment(&mut s, &media(0, false, 1_000_033, 0, 2)).expect("frame");
        let end = s.timeline_end();
        // Back to zero without a new init, then a leap of an hour.
        fragment(&mut s, &media(0, false, 0, 0, 3)).expect("frame");
        assert_eq!(s.ingest_at(end), Some(3));
        let end = s.timeline_end();
        fragment(&mut s, &media(0, false, 3_600_000, 0, 4)).expect("frame");
        assert_eq!(s.ingest_at(end), Some(4));
        assert!(s.timeline_end() - end < 0.1);
    }

    #[test]
    fn audio_frames_stay_back_to_back_despite_millisecond_stamps() {
        let mut s = Session::new();
        s.message(&init_msg(640, true)).expect("init");
        fragment(&mut s, &media(0, true, 0, 0, 1)).expect("video");
        // 48 kHz AAC: 21.333 ms per frame, stamped 0, 21, 43, 64 ms.
        let mut tfdts = Vec::new();
        for dts in [0, 21, 43, 64] {
            let f = fragment(&mut s, &media(1, true, dts, 0, 1)).expect("audio");
            // tfdt v1 sits at a fixed offset in a one-run fragment: moof(8) mfhd(16) traf(8)
            // tfhd(16) tfdt header(12).
            let at = 8 + 16 + 8 + 16 + 12;
            let b: [u8; 8] = f.data[at..at + 8].try_into().expect("8 bytes");
            tfdts.push(u64::from_be_bytes(b));
        }
        let steps: Vec<u64> = tfdts.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(steps, [1024, 1024, 1024], "{tfdts:?}");
    }

    #[test]
    fn hostile_messages_are_errors_not_panics() {
        let mut s = Session::new();
        assert!(s.message(&[]).is_err());
        assert!(s.message(&[0x10, 0, 0]).is_err());
        // An init with a zero timescale (every timestamp is divided by it) is refused.
        let bad = Message::Init(Init {
            rendition: 0,
            tracks: vec![TrackInit {
                id: 0,
                timescale: 0,
                codec: "avc1.64001f",
                params: TrackParams::Video {
                    width: 1,
                    height: 1,
                    fps_milli: 0,
                },
                config: &[],
            }],
        })
        .to_vec()
        .expect("encode");
        assert!(matches!(
            s.message(&bad),
            Err(SessionError::Wire(WireError::InvalidField {
                field: "timescale",
                ..
            }))
        ));
        s.message(&init_msg(640, false)).expect("init");
        // A dts at the top of the range does not overflow.
        let f = fragment(&mut s, &media(0, true, wire::MAX_DTS, i16::MIN, 0));
        assert!(f.is_some());
        // Time running back to zero from there continues the timeline instead of wrapping.
        let end = s.timeline_end();
        assert!(fragment(&mut s, &media(0, false, 0, i16::MAX, 7)).is_some());
        assert!(s.timeline_end() > end && s.timeline_end() - end < 0.1);
    }

    /// Inputs fuzz/player_session found panicking, replayed as that target does (messages
    /// behind u16 lengths): a dts step times a large timescale overflowed a u64.
    #[test]
    fn fuzz_regressions_replay_without_a_panic() {
        let inputs: [&[u8]; 1] = [include_bytes!(
            "../../fuzz/regressions/player_session/dts-step-overflow"
        )];
        for input in inputs {
            let mut s = Session::new();
            let mut rest = input;
            while rest.len() >= 2 {
                let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
                let end = (2 + len).min(rest.len());
                let _ = s.message(&rest[2..end]);
                rest = &rest[end..];
            }
        }
    }
}

//! The LL-HLS segmenter: a stream's frames in, CMAF parts and segments out. No I/O in here.
//!
//! - A **part** is one moof+mdat with every frame of a time slice, both tracks (video run, then
//!   audio run), boxed by the same muxer as the browser player (`onair_protocol::fmp4`). A part
//!   closes on the frame boundary that keeps it within the part target, and always at a keyframe
//!   that starts a segment. It is INDEPENDENT when it starts with a keyframe.
//! - A **segment** is the concatenation of its parts. It starts at a keyframe and closes at the
//!   first keyframe once it has its target duration (so a GOP longer than the target makes a
//!   longer segment).
//! - Parts are named by one sequence number across segments, so the preload hint for the next
//!   part is always right, even when that part turns out to start a new segment.
//!
//! Audio is retimed as the player does: AAC frames are 1024 samples, so in a timescale of the
//! sample rate they lie back to back exactly; the RTMP millisecond timestamps only anchor them.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use onair_protocol::fmp4::{self, Codec, Run, Sample, Track};
use onair_protocol::wire::{Init, TrackKind, TrackParams};

/// fMP4 track ids.
const VIDEO_ID: u32 = 1;
const AUDIO_ID: u32 = 2;
const AAC_FRAME: u64 = 1024;
/// A part that never meets a boundary (timestamps that stall) is closed anyway at this size,
/// and a segment at [`MAX_SEGMENT_BYTES`]: with the window's segments counted, memory per
/// rendition stays bounded whatever timestamps the publisher sends.
const MAX_PENDING_BYTES: usize = 8 << 20;
/// A segment this large closes after its part, keyframe or not (the next one starts at the
/// next keyframe): 4K at 20 Mbit/s for three segment targets of 6 s is about 45 MB.
const MAX_SEGMENT_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub part_target_ms: u32,
    pub segment_target_ms: u32,
    /// Complete segments kept (and listed).
    pub window: usize,
}

/// One finished part.
#[derive(Debug)]
pub struct Part {
    /// Sequence number across the stream: the `p{seq}.m4s` of its URL.
    pub seq: u64,
    pub bytes: Bytes,
    pub duration_s: f64,
    pub independent: bool,
    /// Unix µs when it was closed (and could be served).
    pub ready_us: u64,
}

#[derive(Debug)]
pub struct Segment {
    pub msn: u64,
    pub init_id: u32,
    /// The first segment after a new init (a republish): the timeline restarts.
    pub discontinuity: bool,
    /// Ingest time of its first frame, unix ms: EXT-X-PROGRAM-DATE-TIME.
    pub program_date_ms: u64,
    pub parts: Vec<Arc<Part>>,
    pub duration_s: f64,
    pub complete: bool,
    /// Where it starts on the stream's timeline, µs (its first keyframe's dts).
    pub start_us: u64,
}

/// The current codec configuration.
#[derive(Debug, Clone)]
pub struct InitSegment {
    pub id: u32,
    pub bytes: Bytes,
    /// RFC 6381 codec strings of its tracks, video first: a variant's `CODECS`.
    pub codecs: Vec<String>,
    /// The video's size and frame rate, if it has video.
    pub resolution: Option<(u16, u16)>,
    pub fps: Option<f64>,
    video: Option<VideoTrack>,
    audio: Option<AudioTrack>,
}

/// Where a segment may start when this rendition follows another one's segments (a ladder
/// rung follows the source), so that every rendition is cut at the same instants with the
/// same sequence numbers and players can switch between them at any segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// No leader, or it has not got there yet: cut by this segmenter's own rule.
    Own,
    /// The leader has a segment starting at this keyframe, numbered so.
    At(u64),
    /// The leader went past this keyframe without starting a segment there.
    No,
}

#[derive(Debug, Clone, Copy)]
struct VideoTrack {
    wire_id: u8,
    timescale: u32,
    /// Expected frame duration, µs, until measured.
    frame_us: u64,
}

#[derive(Debug, Clone, Copy)]
struct AudioTrack {
    wire_id: u8,
    wire_timescale: u32,
    sample_rate: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("init without a track onair can package")]
    NoTracks,
    #[error("fMP4: {0}")]
    Fmp4(#[from] fmp4::Fmp4Error),
}

/// One frame as the hub carries it.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub track: u8,
    pub keyframe: bool,
    /// In the track's wire timescale.
    pub dts: u64,
    pub cts: i16,
    pub ingest_us: u64,
    pub payload: &'a [u8],
}

struct Pending {
    video: bool,
    keyframe: bool,
    /// Output decode time: the wire timescale for video, the sample rate for audio.
    dts: u64,
    /// The same instant in µs, for boundaries.
    t_us: u64,
    cts: i32,
    payload: Vec<u8>,
}

pub struct Segmenter {
    settings: Settings,
    init: Option<InitSegment>,
    /// Init segments the window's segments refer to (a republish leaves older ones in it).
    inits: Vec<InitSegment>,
    next_init_id: u32,
    segments: VecDeque<Segment>,
    next_msn: u64,
    next_part_seq: u64,
    /// Segments that ever ended in a discontinuity and left the window: the playlist's
    /// EXT-X-DISCONTINUITY-SEQUENCE.
    discontinuity_seq: u64,
    discontinuity_next: bool,
    pending: Vec<Pending>,
    pending_bytes: usize,
    part_start_us: Option<u64>,
    segment_start_us: u64,
    last_video_us: Option<u64>,
    video_delta_us: u64,
    audio_next: Option<u64>,
    /// The part target in use: the configured one rounded to whole frames of the current
    /// video (24 fps makes 5 × 41.7 ms), so that parts come out even.
    part_target_us: u64,
    /// EXT-X-TARGETDURATION, s: it never goes down (a live playlist's must not change; it
    /// only rises if a segment is longer than any before).
    target_duration: u64,
}

/// The counters a playlist URL must keep increasing, carried from one packager of a stream to
/// the next.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub next_msn: u64,
    pub next_part_seq: u64,
    pub discontinuity_seq: u64,
}

/// A segment with no keyframe for this many segment targets is closed anyway (the next starts
/// without INDEPENDENT): an encoder without keyframes must not grow one segment forever.
const MAX_SEGMENT_TARGETS: u64 = 3;
/// Segments kept beyond the listed window, for clients that read the playlist just before the
/// window moved.
const UNLISTED_KEPT: usize = 2;
/// A timestamp step bigger than this, or backwards, is a new timeline (a broken or restarted
/// publisher clock): a discontinuity, not a giant part.
const MAX_STEP_US: u64 = 5_000_000;

fn to_us(t: u64, timescale: u32) -> u64 {
    let ts = u64::from(timescale.max(1));
    (t / ts)
        .saturating_mul(1_000_000)
        .saturating_add((t % ts) * 1_000_000 / ts)
}

fn rescale(t: u64, from: u32, to: u32) -> u64 {
    let (from, to) = (u64::from(from.max(1)), u64::from(to));
    (t / from) * to + (t % from) * to / from
}

impl Segmenter {
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            init: None,
            inits: Vec::new(),
            next_init_id: 0,
            segments: VecDeque::new(),
            next_msn: 0,
            next_part_seq: 0,
            discontinuity_seq: 0,
            discontinuity_next: false,
            pending: Vec::new(),
            pending_bytes: 0,
            part_start_us: None,
            segment_start_us: 0,
            last_video_us: None,
            video_delta_us: 33_333,
            audio_next: None,
            part_target_us: u64::from(settings.part_target_ms) * 1000,
            target_duration: u64::from(settings.segment_target_ms).div_ceil(1000).max(1),
        }
    }

    /// Continues the numbering of an earlier packager of the same stream, after a
    /// discontinuity.
    pub fn resume(&mut self, c: Counters) {
        self.next_msn = c.next_msn;
        self.next_part_seq = c.next_part_seq;
        self.discontinuity_seq = c.discontinuity_seq;
        self.discontinuity_next = c.next_msn > 0;
    }

    /// Where the numbering stands: for the next packager of this stream.
    pub fn counters(&self) -> Counters {
        Counters {
            next_msn: self.next_msn,
            next_part_seq: self.next_part_seq,
            discontinuity_seq: self.discontinuity_seq
                + self.segments.iter().filter(|s| s.discontinuity).count() as u64,
        }
    }

    /// PART-TARGET, s.
    pub fn part_target_s(&self) -> f64 {
        self.part_target_us as f64 / 1e6
    }

    /// EXT-X-TARGETDURATION, s.
    pub fn target_duration(&self) -> u64 {
        self.target_duration
    }

    /// The segments to list, oldest first: the window (the open one last), without the few
    /// older ones still kept for late requests.
    pub fn listed(&self) -> impl Iterator<Item = &Segment> {
        let complete = self.segments.iter().filter(|s| s.complete).count();
        self.segments
            .iter()
            .skip(complete.saturating_sub(self.settings.window))
    }

    /// EXT-X-DISCONTINUITY-SEQUENCE of the listed window.
    pub fn listed_discontinuity_seq(&self) -> u64 {
        let complete = self.segments.iter().filter(|s| s.complete).count();
        let hidden = complete.saturating_sub(self.settings.window);
        self.discontinuity_seq
            + self
                .segments
                .iter()
                .take(hidden)
                .filter(|s| s.discontinuity)
                .count() as u64
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// The segments in the window, oldest first; the last may be open (still taking parts).
    pub fn segments(&self) -> &VecDeque<Segment> {
        &self.segments
    }

    /// The current init segment, if a publisher is live.
    pub fn init(&self) -> Option<&InitSegment> {
        self.init.as_ref()
    }

    /// An init segment the window refers to, by id.
    pub fn init_by_id(&self, id: u32) -> Option<&InitSegment> {
        self.inits.iter().find(|i| i.id == id)
    }

    /// Sequence number the next part will have: the preload hint.
    /// For a follower's keyframe at `t_us`: whether this segmenter started a segment there
    /// (within a millisecond), or went past it without one.
    pub fn cut_at(&self, t_us: u64) -> Cut {
        if let Some(g) = self
            .segments
            .iter()
            .find(|g| g.start_us.abs_diff(t_us) <= 1000)
        {
            return Cut::At(g.msn);
        }
        match self.last_video_us {
            Some(last) if last >= t_us => Cut::No,
            _ => Cut::Own,
        }
    }

    /// Peak and average bitrate of the complete segments listed, bit/s: a variant's
    /// `BANDWIDTH` and `AVERAGE-BANDWIDTH`.
    pub fn bitrates(&self) -> Option<(u64, u64)> {
        let done: Vec<(u64, f64)> = self
            .listed()
            .filter(|g| g.complete && g.duration_s > 0.0)
            .map(|g| {
                (
                    g.parts.iter().map(|p| p.bytes.len() as u64).sum(),
                    g.duration_s,
                )
            })
            .collect();
        if done.is_empty() {
            return None;
        }
        let peak = done
            .iter()
            .map(|&(b, d)| (b as f64 * 8.0 / d) as u64)
            .max()?;
        let (bytes, secs) = done
            .iter()
            .fold((0u64, 0.0), |(b, s), &(gb, gs)| (b + gb, s + gs));
        Some((peak, (bytes as f64 * 8.0 / secs) as u64))
    }

    pub fn next_part_seq(&self) -> u64 {
        self.next_part_seq
    }

    /// A new codec configuration: what is pending is closed, and the next segment starts a new
    /// timeline (EXT-X-DISCONTINUITY) with this init.
    pub fn set_init(&mut self, init: &Init<'_>) -> Result<(), SegmentError> {
        self.end_of_media();
        let mut tracks = Vec::new();
        let mut video = None;
        let mut audio = None;
        let (mut video_codec, mut audio_codec, mut resolution, mut fps) = (None, None, None, None);
        for t in &init.tracks {
            match (t.kind(), t.params) {
                (
                    TrackKind::Video,
                    TrackParams::Video {
                        width,
                        height,
                        fps_milli,
                    },
                ) if video.is_none() && t.timescale > 0 => {
                    let Some(codec) = Codec::video(t.codec, width, height, t.config) else {
                        continue; // no sample entry for it: the packager leaves it out
                    };
                    tracks.push(Track {
                        id: VIDEO_ID,
                        timescale: t.timescale,
                        codec,
                    });
                    let frame_us = if fps_milli > 0 {
                        1_000_000_000 / u64::from(fps_milli)
                    } else {
                        33_333
                    };
                    video = Some(VideoTrack {
                        wire_id: t.id,
                        timescale: t.timescale,
                        frame_us,
                    });
                    video_codec = Some(t.codec.to_string());
                    resolution = Some((width, height));
                    fps = (fps_milli > 0).then(|| f64::from(fps_milli) / 1000.0);
                }
                (
                    TrackKind::Audio,
                    TrackParams::Audio {
                        sample_rate,
                        channels,
                    },
                ) if audio.is_none() && sample_rate > 0 && t.timescale > 0 => {
                    tracks.push(Track {
                        id: AUDIO_ID,
                        timescale: sample_rate,
                        codec: Codec::Aac {
                            sample_rate,
                            channels,
                            asc: t.config,
                        },
                    });
                    audio = Some(AudioTrack {
                        wire_id: t.id,
                        wire_timescale: t.timescale,
                        sample_rate,
                    });
                    audio_codec = Some(t.codec.to_string());
                }
                _ => {}
            }
        }
        if tracks.is_empty() {
            self.init = None;
            return Err(SegmentError::NoTracks);
        }
        let bytes = Bytes::from(fmp4::init_segment(&tracks)?);
        let id = self.next_init_id;
        self.next_init_id += 1;
        self.discontinuity_next |= !self.segments.is_empty();
        self.video_delta_us = video.map_or(33_333, |v| v.frame_us);
        if self.next_part_seq == 0 {
            // Whole frames, plus a millisecond for timestamp jitter. Fixed from the first init
            // on: PART-TARGET must not change in a live playlist.
            let configured = u64::from(self.settings.part_target_ms) * 1000;
            let frame = match (video, audio) {
                (Some(v), _) => v.frame_us,
                (None, Some(a)) => AAC_FRAME * 1_000_000 / u64::from(a.sample_rate.max(1)),
                (None, None) => configured,
            }
            .max(1);
            let frames = ((configured as f64 / frame as f64).round() as u64).max(1);
            self.part_target_us = frames * frame + 1000;
        }
        self.last_video_us = None;
        self.audio_next = None;
        let init = InitSegment {
            id,
            bytes,
            codecs: video_codec.into_iter().chain(audio_codec).collect(),
            resolution,
            fps,
            video,
            audio,
        };
        self.inits.push(init.clone());
        self.init = Some(init);
        self.forget_unused_inits();
        Ok(())
    }

    /// The publisher left: close what is pending. Nothing more is packaged until a new init.
    pub fn end_of_media(&mut self) {
        if let Some(last) = self.pending.iter().rev().find(|p| p.video).map(|p| p.t_us) {
            self.close_part(last + self.video_delta_us);
        } else if let Some(last) = self.pending.last().map(|p| p.t_us) {
            self.close_part(last + 21_333);
        }
        self.close_segment();
        self.init = None;
        self.pending.clear();
        self.pending_bytes = 0;
        self.part_start_us = None;
    }

    /// Adds one frame; returns whether a part was completed.
    pub fn push(&mut self, f: &Frame<'_>, now_us: u64) -> Result<bool, SegmentError> {
        self.push_following(f, now_us, None)
    }

    /// Like [`Segmenter::push`], with segments cut where a leader's are: `leader` tells, for
    /// a video keyframe at `t_us` (µs of the shared timeline), whether the leader starts a
    /// segment there. Until the first such keyframe nothing is packaged, so that the first
    /// segment already has the leader's number.
    pub fn push_following(
        &mut self,
        f: &Frame<'_>,
        now_us: u64,
        leader: Option<&dyn Fn(u64) -> Cut>,
    ) -> Result<bool, SegmentError> {
        let Some(init) = &self.init else {
            return Ok(false);
        };
        let (video, audio) = (init.video, init.audio);
        let mut closed = false;
        if let Some(v) = video.filter(|v| v.wire_id == f.track) {
            let t_us = to_us(f.dts, v.timescale);
            if let Some(last) = self.last_video_us
                && (t_us.saturating_add(1_000_000) < last
                    || t_us > last.saturating_add(MAX_STEP_US))
            {
                self.new_timeline(last);
            }
            if !self.segment_open() && !f.keyframe {
                return Ok(false); // a segment starts at a keyframe
            }
            let cut = match leader {
                Some(leader) if f.keyframe => leader(t_us),
                Some(_) => Cut::No,
                None => Cut::Own,
            };
            if !self.segment_open() && leader.is_some() && !matches!(cut, Cut::At(_)) {
                return Ok(false); // the first segment starts where one of the leader's does
            }
            closed = self.boundary(
                t_us,
                f.keyframe,
                self.video_delta_us,
                f.ingest_us,
                now_us,
                cut,
            )?;
            if let Some(last) = self.last_video_us
                && t_us > last
            {
                self.video_delta_us = (t_us - last).min(1_000_000);
            }
            self.last_video_us = Some(t_us);
            self.add(Pending {
                video: true,
                keyframe: f.keyframe,
                dts: f.dts,
                t_us,
                cts: i32::from(f.cts),
                payload: f.payload.to_vec(),
            });
        } else if let Some(a) = audio.filter(|a| a.wire_id == f.track) {
            let anchored = rescale(f.dts, a.wire_timescale, a.sample_rate);
            let dts = match self.audio_next {
                // Back to back, unless the timestamps moved away (a gap, a jump).
                Some(next) if next.abs_diff(anchored) <= 2 * AAC_FRAME => next,
                _ => anchored,
            };
            self.audio_next = Some(dts.saturating_add(AAC_FRAME));
            let t_us = to_us(dts, a.sample_rate);
            if video.is_none() {
                // Audio only: audio drives the parts, and every frame can start a segment.
                let frame_us = AAC_FRAME * 1_000_000 / u64::from(a.sample_rate);
                closed = self.boundary(t_us, true, frame_us, f.ingest_us, now_us, Cut::Own)?;
            } else if !self.segment_open() {
                return Ok(false); // before the first video keyframe
            }
            self.add(Pending {
                video: false,
                keyframe: true,
                dts,
                t_us,
                cts: 0,
                payload: f.payload.to_vec(),
            });
        }
        if self.pending_bytes > MAX_PENDING_BYTES {
            let last = self.pending.last().map_or(0, |p| p.t_us);
            let end = last.saturating_add(self.video_delta_us);
            self.close_part(end);
            closed = true;
        }
        Ok(closed)
    }

    /// The publisher's clock jumped: close what is open at the old clock, and start the next
    /// segment (at a keyframe) as a discontinuity.
    fn new_timeline(&mut self, last_video_us: u64) {
        self.close_part(last_video_us.saturating_add(self.video_delta_us));
        self.close_segment();
        self.discontinuity_next = !self.segments.is_empty();
        self.last_video_us = None;
        self.audio_next = None;
        self.pending.clear();
        self.pending_bytes = 0;
        self.part_start_us = None;
    }

    /// A segment is taking parts.
    fn segment_open(&self) -> bool {
        self.segments.back().is_some_and(|s| !s.complete)
    }

    fn add(&mut self, p: Pending) {
        if self.part_start_us.is_none() {
            self.part_start_us = Some(p.t_us);
        }
        self.pending_bytes += p.payload.len();
        self.pending.push(p);
    }

    /// A frame of the driving track at `t_us` is about to be added: close the part (and the
    /// segment) before it if it is time; open a segment if none is open.
    fn boundary(
        &mut self,
        t_us: u64,
        keyframe: bool,
        frame_us: u64,
        ingest_us: u64,
        now_us: u64,
        cut: Cut,
    ) -> Result<bool, SegmentError> {
        let mut closed = false;
        if let Some(start) = self.part_start_us {
            let segment_target = u64::from(self.settings.segment_target_ms) * 1000;
            let in_segment = t_us.saturating_sub(self.segment_start_us);
            let own = keyframe && in_segment + frame_us / 2 >= segment_target;
            let cut_segment = match cut {
                Cut::Own => own,
                Cut::At(_) => keyframe,
                Cut::No => false,
            } || in_segment >= MAX_SEGMENT_TARGETS * segment_target;
            // Close on the frame boundary nearest the part target (which is whole frames).
            let cut_part =
                cut_segment || t_us.saturating_sub(start) + frame_us / 2 >= self.part_target_us;
            if cut_part {
                self.close_part_at(t_us, now_us);
                closed = true;
            }
            if cut_segment {
                self.close_segment();
            }
        }
        if !self.segment_open() {
            let Some(init) = &self.init else {
                return Ok(closed);
            };
            if let Cut::At(msn) = cut
                && self.segments.is_empty()
            {
                // The first segment takes the leader's number; the rest follow one by one,
                // cut where the leader's are (a playlist's numbers have no holes).
                self.next_msn = self.next_msn.max(msn);
            }
            self.segments.push_back(Segment {
                msn: self.next_msn,
                init_id: init.id,
                discontinuity: std::mem::take(&mut self.discontinuity_next),
                program_date_ms: ingest_us / 1000,
                parts: Vec::new(),
                duration_s: 0.0,
                complete: false,
                start_us: t_us,
            });
            self.next_msn += 1;
            self.segment_start_us = t_us;
        }
        Ok(closed)
    }

    fn close_part(&mut self, end_us: u64) {
        self.close_part_at(end_us, crate::hub::now_us());
    }

    /// Boxes the pending frames before `end_us` into a part of the open segment.
    fn close_part_at(&mut self, end_us: u64, now_us: u64) {
        let Some(start) = self.part_start_us else {
            return;
        };
        let Some(init) = &self.init else {
            return;
        };
        let video_ts = init.video.map_or(1000, |v| v.timescale);
        // Video always goes in whole; audio up to the boundary (the rest starts the next part).
        let split = |p: &Pending| p.video || p.t_us < end_us;
        let (now, later): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(split);
        self.pending = later;
        self.pending_bytes = self.pending.iter().map(|p| p.payload.len()).sum();
        // The next part starts where this one ends, whatever frame comes first.
        self.part_start_us = Some(end_us);
        let videos: Vec<&Pending> = now.iter().filter(|p| p.video).collect();
        let audios: Vec<&Pending> = now.iter().filter(|p| !p.video).collect();
        if videos.is_empty() && audios.is_empty() {
            return;
        }
        let end_video_dts = rescale(end_us, 1_000_000, video_ts);
        let video_samples: Vec<Sample> = videos
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let next = videos.get(i + 1).map_or(end_video_dts, |n| n.dts);
                Sample {
                    duration: u32::try_from(next.saturating_sub(p.dts).max(1)).unwrap_or(1),
                    size: p.payload.len() as u32,
                    cts: p.cts,
                    keyframe: p.keyframe,
                }
            })
            .collect();
        let audio_samples: Vec<Sample> = audios
            .iter()
            .map(|p| Sample {
                duration: AAC_FRAME as u32,
                size: p.payload.len() as u32,
                cts: 0,
                keyframe: true,
            })
            .collect();
        let mut runs = Vec::new();
        if let Some(first) = videos.first() {
            runs.push(Run {
                track_id: VIDEO_ID,
                base_dts: first.dts,
                samples: &video_samples,
            });
        }
        if let Some(first) = audios.first() {
            runs.push(Run {
                track_id: AUDIO_ID,
                base_dts: first.dts,
                samples: &audio_samples,
            });
        }
        let body: usize = now.iter().map(|p| p.payload.len()).sum();
        let mut out = Vec::with_capacity(fmp4::fragment_header_len(&runs) + body);
        let seq = self.next_part_seq;
        if fmp4::write_fragment_header(&mut out, (seq as u32).wrapping_add(1), &runs).is_err() {
            // Sizes beyond what a part can hold: drop it rather than serve a broken one.
            return;
        }
        for p in videos.iter().chain(audios.iter()) {
            out.extend_from_slice(&p.payload);
        }
        let independent = videos.first().is_some_and(|p| p.keyframe)
            || (videos.is_empty() && init.video.is_none());
        let duration_s = end_us.saturating_sub(start) as f64 / 1e6;
        self.next_part_seq += 1;
        let mut full = false;
        if let Some(seg) = self.segments.back_mut().filter(|s| !s.complete) {
            seg.duration_s += duration_s;
            seg.parts.push(Arc::new(Part {
                seq,
                bytes: Bytes::from(out),
                duration_s,
                independent,
                ready_us: now_us,
            }));
            full = seg.parts.iter().map(|p| p.bytes.len()).sum::<usize>() > MAX_SEGMENT_BYTES;
        }
        if full {
            // Timestamps that never reach a segment boundary.
            self.close_segment();
        }
    }

    fn close_segment(&mut self) {
        let Some(seg) = self.segments.back_mut().filter(|s| !s.complete) else {
            return;
        };
        if seg.parts.is_empty() {
            // Nothing was boxed into it: forget it, and reuse its number.
            self.segments.pop_back();
            self.next_msn -= 1;
            return;
        }
        seg.complete = true;
        self.target_duration = self.target_duration.max(seg.duration_s.round() as u64);
        while self.segments.iter().filter(|s| s.complete).count()
            > self.settings.window + UNLISTED_KEPT
        {
            if let Some(old) = self.segments.pop_front()
                && old.discontinuity
            {
                self.discontinuity_seq += 1;
            }
        }
        self.forget_unused_inits();
    }

    fn forget_unused_inits(&mut self) {
        let current = self.init.as_ref().map(|i| i.id);
        let segments = &self.segments;
        self.inits
            .retain(|i| Some(i.id) == current || segments.iter().any(|s| s.init_id == i.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use onair_protocol::wire::TrackInit;

    fn init(audio: bool) -> Init<'static> {
        let mut tracks = vec![TrackInit {
            id: 0,
            timescale: 1000,
            codec: "avc1.64001E",
            params: TrackParams::Video {
                width: 320,
                height: 240,
                fps_milli: 30_000,
            },
            // A minimal avcC: version 1, profile/compat/level, length size 4, no SPS/PPS.
            config: &[1, 0x64, 0, 0x1e, 0xff, 0xe0, 0],
        }];
        if audio {
            tracks.push(TrackInit {
                id: 1,
                timescale: 1000,
                codec: "mp4a.40.2",
                params: TrackParams::Audio {
                    sample_rate: 48_000,
                    channels: 2,
                },
                config: &[0x11, 0x90],
            });
        }
        Init {
            rendition: 0,
            tracks,
        }
    }

    fn settings() -> Settings {
        Settings {
            part_target_ms: 200,
            segment_target_ms: 2000,
            window: 3,
        }
    }

    /// 30 fps video with a keyframe every `gop` frames, and 48 kHz audio, for `secs`.
    fn feed(s: &mut Segmenter, from_ms: u64, secs: u64, gop: u64) {
        feed_fps(s, from_ms, secs, gop, 30);
    }

    fn feed_fps(s: &mut Segmenter, from_ms: u64, secs: u64, gop: u64, fps: u64) {
        let frames = secs * fps;
        let mut audio_ms = from_ms as f64;
        for i in 0..frames {
            let dts = from_ms + i * 1000 / fps;
            while audio_ms <= dts as f64 {
                let f = Frame {
                    track: 1,
                    keyframe: true,
                    dts: audio_ms as u64,
                    cts: 0,
                    ingest_us: 0,
                    payload: &[0xAA; 10],
                };
                s.push(&f, 0).unwrap();
                audio_ms += 1024.0 / 48.0;
            }
            let f = Frame {
                track: 0,
                keyframe: i % gop == 0,
                dts,
                cts: 0,
                ingest_us: dts * 1000,
                payload: &[0x55; 100],
            };
            s.push(&f, 0).unwrap();
        }
    }

    #[test]
    fn a_follower_cuts_where_its_leader_cut_and_takes_its_numbers() {
        // The leader: keyframes every second from 0, segments of 2 s at 0, 2, 4, … s.
        let mut leader = Segmenter::new(settings());
        leader.set_init(&init(false)).unwrap();
        leader.resume(Counters {
            next_msn: 40,
            ..Counters::default()
        });
        feed(&mut leader, 0, 14, 30);
        // A rung that starts at 3 s: by its own rule it would cut at 3, 5, 7, … s.
        let mut rung = Segmenter::new(settings());
        rung.set_init(&init(false)).unwrap();
        let follow = |t_us: u64| leader.cut_at(t_us);
        for i in 90..420u64 {
            let dts = i * 1000 / 30;
            let f = Frame {
                track: 0,
                keyframe: i % 30 == 0,
                dts,
                cts: 0,
                ingest_us: dts * 1000,
                payload: &[0x55; 100],
            };
            rung.push_following(&f, 0, Some(&follow)).unwrap();
        }
        let starts = |s: &Segmenter| -> Vec<(u64, u64)> {
            s.segments().iter().map(|g| (g.msn, g.start_us)).collect()
        };
        let rung_starts = starts(&rung);
        assert_eq!(
            rung_starts.first(),
            Some(&(42, 4_000_000)),
            "the first segment waits for a cut of the leader's and takes its number"
        );
        let leader_starts = starts(&leader);
        for g in &rung_starts {
            assert!(leader_starts.contains(g), "{g:?} not in {leader_starts:?}");
        }
        assert!(rung_starts.len() >= 5, "{rung_starts:?}");
        assert_eq!(leader.cut_at(5_000_000), Cut::No, "passed without a cut");
        assert_eq!(leader.cut_at(20_000_000), Cut::Own, "not there yet");
        let (peak, average) = leader.bitrates().expect("complete segments");
        assert!(peak >= average && average > 0);
    }

    #[test]
    fn parts_keep_within_the_target_and_segments_start_at_keyframes() {
        let mut s = Segmenter::new(settings());
        s.set_init(&init(true)).unwrap();
        feed(&mut s, 0, 14, 30);
        let complete: Vec<&Segment> = s.listed().filter(|g| g.complete).collect();
        assert_eq!(complete.len(), 3, "the window lists 3");
        assert_eq!(
            s.segments().iter().filter(|g| g.complete).count(),
            3 + UNLISTED_KEPT,
            "and keeps a few more for late requests"
        );
        for seg in &complete {
            assert!(
                (seg.duration_s - 2.0).abs() < 0.01,
                "segment of {} s",
                seg.duration_s
            );
            assert!(seg.parts[0].independent, "a segment starts at a keyframe");
            for p in &seg.parts {
                assert!(
                    p.duration_s <= s.part_target_s(),
                    "part of {} s",
                    p.duration_s
                );
                assert!(p.duration_s >= 0.19, "part of {} s", p.duration_s);
            }
            let total: f64 = seg.parts.iter().map(|p| p.duration_s).sum();
            assert!((total - seg.duration_s).abs() < 1e-9);
        }
        // Parts are numbered across segments, without gaps.
        let seqs: Vec<u64> = s
            .segments()
            .iter()
            .flat_map(|g| g.parts.iter().map(|p| p.seq))
            .collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        assert_eq!(s.next_part_seq(), seqs[seqs.len() - 1] + 1);
    }

    #[test]
    fn a_long_gop_makes_a_longer_segment() {
        let mut s = Segmenter::new(settings());
        s.set_init(&init(false)).unwrap();
        feed(&mut s, 0, 12, 90);
        let seg = &s.segments()[0];
        assert!(seg.complete);
        assert!((seg.duration_s - 3.0).abs() < 0.01, "{}", seg.duration_s);
    }

    #[test]
    fn a_new_init_is_a_discontinuity_and_parts_decode_with_the_reference_parser() {
        let mut s = Segmenter::new(settings());
        s.set_init(&init(true)).unwrap();
        feed(&mut s, 5000, 3, 30);
        s.end_of_media();
        assert!(s.segments().iter().all(|g| g.complete));
        s.set_init(&init(true)).unwrap();
        feed(&mut s, 0, 3, 30);
        let after: Vec<&Segment> = s.segments().iter().filter(|g| g.init_id == 1).collect();
        assert!(after[0].discontinuity);
        assert!(after.iter().skip(1).all(|g| !g.discontinuity));
        // Every part is a moof followed by an mdat holding exactly its samples.
        for p in s.segments().iter().flat_map(|g| g.parts.iter()) {
            let b = &p.bytes;
            let moof = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
            assert_eq!(&b[4..8], b"moof");
            assert_eq!(&b[moof + 4..moof + 8], b"mdat");
            let mdat = u32::from_be_bytes([b[moof], b[moof + 1], b[moof + 2], b[moof + 3]]);
            assert_eq!(moof + mdat as usize, b.len());
        }
    }

    #[test]
    fn parts_are_whole_frames_at_24_fps() {
        let mut s = Segmenter::new(settings());
        let mut i = init(false);
        if let TrackParams::Video { fps_milli, .. } = &mut i.tracks[0].params {
            *fps_milli = 24_000;
        }
        s.set_init(&i).unwrap();
        feed_fps(&mut s, 0, 6, 48, 24);
        // 5 frames of 41.7 ms: not 4 (167 ms, under 85 % of 200) and not a ragged mix.
        assert!(
            (s.part_target_s() - 0.2093).abs() < 0.001,
            "{}",
            s.part_target_s()
        );
        // (The last part of a segment ends at the keyframe, and may be shorter.)
        for g in s.segments().iter().filter(|g| g.complete) {
            for p in &g.parts[..g.parts.len() - 1] {
                assert!(
                    (0.200..=s.part_target_s()).contains(&p.duration_s),
                    "part of {} s",
                    p.duration_s
                );
            }
        }
    }

    #[test]
    fn a_clock_jump_is_a_discontinuity_not_a_giant_part() {
        let mut s = Segmenter::new(settings());
        s.set_init(&init(true)).unwrap();
        feed(&mut s, 100_000, 3, 30);
        // Backwards, then an hour ahead.
        feed(&mut s, 0, 3, 30);
        feed(&mut s, 3_600_000, 3, 30);
        let segs: Vec<&Segment> = s.segments().iter().filter(|g| g.complete).collect();
        assert_eq!(segs.iter().filter(|g| g.discontinuity).count(), 2);
        for g in &segs {
            assert!(g.duration_s <= 2.1, "segment of {} s", g.duration_s);
        }
        assert_eq!(s.target_duration(), 2);
    }

    #[test]
    fn timestamps_that_stop_advancing_leave_memory_bounded() {
        let mut s = Segmenter::new(settings());
        s.set_init(&init(false)).unwrap();
        // Keyframes and frames of 1 MiB, all at the same dts: no part or segment boundary is
        // ever reached by time.
        let payload = vec![0x55; 1 << 20];
        for i in 0..400u64 {
            let f = Frame {
                track: 0,
                keyframe: i % 30 == 0,
                dts: 1000,
                cts: 0,
                ingest_us: 0,
                payload: &payload,
            };
            s.push(&f, 0).unwrap();
        }
        let held: usize = s
            .segments()
            .iter()
            .flat_map(|g| g.parts.iter())
            .map(|p| p.bytes.len())
            .sum();
        let bound = (3 + UNLISTED_KEPT + 1) * (MAX_SEGMENT_BYTES + MAX_PENDING_BYTES);
        assert!(held <= bound, "{} MiB held", held >> 20);
        assert!(s.segments().len() <= 3 + UNLISTED_KEPT + 1);
        assert!(
            s.segments().iter().filter(|g| g.complete).count() >= 3,
            "segments closed"
        );
    }

    #[test]
    fn a_stream_without_keyframes_still_gets_bounded_segments() {
        let mut s = Segmenter::new(settings());
        s.set_init(&init(false)).unwrap();
        feed(&mut s, 0, 20, 100_000); // one keyframe, then none
        let segs: Vec<&Segment> = s.segments().iter().filter(|g| g.complete).collect();
        assert!(!segs.is_empty());
        for g in &segs {
            assert!(g.duration_s <= 6.1, "segment of {} s", g.duration_s);
        }
        assert!(s.segments().len() <= 3 + UNLISTED_KEPT + 1);
    }

    #[test]
    fn a_later_packager_continues_the_numbering() {
        let mut s = Segmenter::new(settings());
        s.set_init(&init(true)).unwrap();
        feed(&mut s, 0, 5, 30);
        s.end_of_media();
        let c = s.counters();
        let mut next = Segmenter::new(settings());
        next.resume(c);
        next.set_init(&init(true)).unwrap();
        feed(&mut next, 0, 3, 30);
        let first = &next.segments()[0];
        assert_eq!(first.msn, c.next_msn);
        assert!(first.discontinuity);
        assert_eq!(first.parts[0].seq, c.next_part_seq);
    }

    #[test]
    fn nothing_before_the_first_keyframe() {
        let mut s = Segmenter::new(settings());
        s.set_init(&init(true)).unwrap();
        let p = Frame {
            track: 0,
            keyframe: false,
            dts: 0,
            cts: 0,
            ingest_us: 0,
            payload: &[1],
        };
        s.push(&p, 0).unwrap();
        s.push(&Frame { track: 1, ..p }, 0).unwrap();
        assert!(s.segments().is_empty());
    }
}

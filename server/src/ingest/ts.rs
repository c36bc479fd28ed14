//! MPEG-TS into the hub, for every input that carries it (SRT, pulled sources): H.264 and
//! HEVC access units become avcC or hvcC and length-prefixed frames, ADTS becomes raw AAC, and
//! 90 kHz timestamps become the hub's milliseconds with their composition offsets (a B-frame
//! source keeps its cts). The demuxer is `onair_protocol::ts`.

use bytes::Bytes;
use onair_protocol::codec::VideoCodec;
use onair_protocol::codec::aac;
use onair_protocol::codec::annexb::split_nals;
use onair_protocol::codec::avc::avcc_from_parameter_sets;
use onair_protocol::codec::hevc::hvcc_from_parameter_sets;
use onair_protocol::ts::{TsDemuxer, TsError, TsFrame, TsStats, TsStreamType};

use super::MediaIngest;

/// How long video waits for the audio's configuration at the start, in 90 kHz ticks (1 s),
/// and in frames at most.
const AUDIO_WAIT_90K: u64 = 90_000;
const MAX_HELD: usize = 120;

#[derive(Debug, thiserror::Error)]
pub enum TsIngestError {
    #[error("{0}")]
    Ingest(#[from] super::IngestError),
    #[error("MPEG-TS: {0}")]
    Ts(#[from] TsError),
    #[error("bad H.264 parameter sets: {0}")]
    Avc(#[from] onair_protocol::codec::avc::AvcError),
    #[error("bad HEVC parameter sets: {0}")]
    Hevc(#[from] onair_protocol::codec::hevc::HevcError),
    #[error("bad ADTS: {0}")]
    Adts(#[from] aac::AacError),
}

/// 90 kHz MPEG timestamps (33 bits, wrapping every 26.5 hours) as the hub's milliseconds from
/// the first one seen.
#[derive(Debug, Default)]
struct Clock {
    /// The last timestamp seen, extended past its wraps.
    last: Option<u64>,
    origin: u64,
}

const WRAP: u64 = 1 << 33;

impl Clock {
    /// Extends `t` to the one nearest the last timestamp (a little before or after it, across
    /// a wrap either way).
    fn extend(&mut self, t: u64) -> u64 {
        let t = t % WRAP;
        let Some(last) = self.last else {
            // Far from zero, so that timestamps a little before the first stay positive.
            let ext = WRAP + t;
            self.last = Some(ext);
            self.origin = ext;
            return ext;
        };
        let base = last - last % WRAP;
        let ext = [base.saturating_sub(WRAP) + t, base + t, base + WRAP + t]
            .into_iter()
            .min_by_key(|c| c.abs_diff(last))
            .unwrap_or(base + t);
        self.last = Some(ext);
        ext
    }

    /// Milliseconds from the first timestamp (0 for one before it).
    fn ms(&self, ext: u64) -> u64 {
        ext.saturating_sub(self.origin) / 90
    }
}

/// The parameter sets one access unit carries.
#[derive(Default)]
struct ParameterSets<'a> {
    vps: Option<&'a [u8]>,
    sps: Option<&'a [u8]>,
    pps: Option<&'a [u8]>,
}

impl ParameterSets<'_> {
    /// All the codec needs, owned, to compare with the last ones; `None` if one is missing.
    fn key(&self, codec: VideoCodec) -> Option<Vec<Vec<u8>>> {
        let (sps, pps) = (self.sps?, self.pps?);
        Some(match codec {
            VideoCodec::Hevc => vec![self.vps?.to_vec(), sps.to_vec(), pps.to_vec()],
            _ => vec![sps.to_vec(), pps.to_vec()],
        })
    }
}

/// One publisher's MPEG-TS, into the hub.
pub struct TsIngest {
    ingest: MediaIngest,
    demux: TsDemuxer,
    clock: Clock,
    /// The parameter sets of the configuration record sent last.
    parameter_sets: Option<Vec<Vec<u8>>>,
    /// The AudioSpecificConfig sent last.
    asc: Option<[u8; 2]>,
    got_keyframe: bool,
    frames: Vec<TsFrame>,
    /// Video waiting for the audio's configuration ([`TsIngest::holding_for_audio`]).
    held: Vec<TsFrame>,
    audio_wait_over: bool,
    video_frames: u64,
    /// The frame being built, reused.
    sample: Vec<u8>,
}

impl TsIngest {
    pub fn new(mut ingest: MediaIngest) -> Self {
        // MPEG-TS from an encoder carries video; audio waits for it, as an RTMP publish's does.
        ingest.expect_video();
        Self {
            ingest,
            demux: TsDemuxer::new(),
            clock: Clock::default(),
            parameter_sets: None,
            asc: None,
            got_keyframe: false,
            frames: Vec::new(),
            held: Vec::new(),
            audio_wait_over: false,
            video_frames: 0,
            sample: Vec::new(),
        }
    }

    /// Bytes of the transport stream, in any chunking.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), TsIngestError> {
        let mut frames = std::mem::take(&mut self.frames);
        let demuxed = self.demux.push(bytes, &mut frames);
        let done = self.frames_in(&mut frames);
        self.frames = frames;
        demuxed?;
        done
    }

    /// The end of the stream: what the demuxer still holds (its last frames).
    pub fn finish(&mut self) -> Result<(), TsIngestError> {
        let mut frames = std::mem::take(&mut self.frames);
        self.demux.finish(&mut frames);
        let done = self
            .frames_in(&mut frames)
            .and_then(|()| self.release_held());
        self.frames = frames;
        done
    }

    /// Whether a keyframe (with its parameter sets) has reached the hub.
    pub fn got_keyframe(&self) -> bool {
        self.got_keyframe
    }

    /// Video frames handed to the hub.
    pub fn video_frames(&self) -> u64 {
        self.video_frames
    }

    pub fn stats(&self) -> TsStats {
        self.demux.stats()
    }

    /// Resolves when an operator removed the publisher.
    pub async fn removed(&self) {
        self.ingest.removed().await
    }

    fn frames_in(&mut self, frames: &mut Vec<TsFrame>) -> Result<(), TsIngestError> {
        for f in frames.drain(..) {
            match f.stream {
                TsStreamType::Aac => self.aac(&f)?,
                _ if self.holding_for_audio(&f) => self.held.push(f),
                _ => {
                    self.release_held()?;
                    self.video_frame(&f)?;
                }
            }
        }
        Ok(())
    }

    /// Whether video waits for the audio's configuration: the first audio PES completes only
    /// when the next starts, after the first video frames, and an init with both tracks from
    /// the start spares viewers a second one. It waits at most [`AUDIO_WAIT_90K`] of media
    /// (a source without audio), [`MAX_HELD`] frames.
    fn holding_for_audio(&mut self, f: &TsFrame) -> bool {
        if self.asc.is_some() || self.audio_wait_over {
            return false;
        }
        let waited = self
            .held
            .first()
            .map_or(0, |first| f.dts.wrapping_sub(first.dts) % WRAP);
        if waited > AUDIO_WAIT_90K || self.held.len() >= MAX_HELD {
            self.audio_wait_over = true;
            return false;
        }
        true
    }

    fn release_held(&mut self) -> Result<(), TsIngestError> {
        for f in std::mem::take(&mut self.held) {
            self.video_frame(&f)?;
        }
        Ok(())
    }

    fn video_frame(&mut self, f: &TsFrame) -> Result<(), TsIngestError> {
        match f.stream {
            TsStreamType::Hevc => self.video(f, VideoCodec::Hevc),
            _ => self.video(f, VideoCodec::Avc),
        }
    }

    /// One access unit (Annex B): its parameter sets become the codec's configuration record
    /// (avcC, hvcC), the rest a frame of length-prefixed NAL units.
    fn video(&mut self, f: &TsFrame, codec: VideoCodec) -> Result<(), TsIngestError> {
        let mut sets = ParameterSets::default();
        let mut keyframe = false;
        self.sample.clear();
        for nal in split_nals(&f.data) {
            let Some(&h) = nal.first() else { continue };
            // Parameter sets go into the configuration record, delimiters nowhere (MP4 samples
            // go without); the rest is the frame.
            let keep = match codec {
                VideoCodec::Hevc => match (h >> 1) & 0x3f {
                    32 => {
                        sets.vps = Some(nal);
                        false
                    }
                    33 => {
                        sets.sps = Some(nal);
                        false
                    }
                    34 => {
                        sets.pps = Some(nal);
                        false
                    }
                    35 => false,
                    t => {
                        keyframe |= (16..=21).contains(&t); // IRAP pictures
                        true
                    }
                },
                _ => match h & 0x1f {
                    7 => {
                        sets.sps = Some(nal);
                        false
                    }
                    8 => {
                        sets.pps = Some(nal);
                        false
                    }
                    9 => false,
                    t => {
                        keyframe |= t == 5;
                        true
                    }
                },
            };
            if keep {
                let len = u32::try_from(nal.len()).unwrap_or(u32::MAX);
                self.sample.extend_from_slice(&len.to_be_bytes());
                self.sample.extend_from_slice(nal);
            }
        }
        if let Some(key) = sets.key(codec)
            && self.parameter_sets.as_ref() != Some(&key)
        {
            let record = match (codec, sets.vps, sets.sps, sets.pps) {
                (VideoCodec::Hevc, Some(v), Some(s), Some(p)) => {
                    Some(hvcc_from_parameter_sets(v, s, p)?)
                }
                (VideoCodec::Avc, _, Some(s), Some(p)) => Some(avcc_from_parameter_sets(s, p)?),
                _ => None,
            };
            if let Some(record) = record {
                self.ingest.video_config(codec, Bytes::from(record))?;
                self.parameter_sets = Some(key);
            }
        }
        // Until the first keyframe (with its parameter sets) nothing can be decoded.
        self.got_keyframe |= keyframe && self.parameter_sets.is_some();
        if !self.got_keyframe {
            return Ok(());
        }
        let dts = self.clock.extend(f.dts);
        let pts = self.clock.extend(f.pts);
        // Back to the dts, so that the next frame's extension is taken from it.
        self.clock.last = Some(dts);
        let cts = (pts as i64 - dts as i64) / 90;
        let cts = i32::try_from(cts).unwrap_or(i32::MAX);
        // The hub takes RTMP's 32-bit milliseconds and extends them past their wraps.
        let dts_ms = self.clock.ms(dts) as u32;
        self.ingest
            .video_frame(dts_ms, cts, keyframe, &self.sample)?;
        self.video_frames += 1;
        Ok(())
    }

    /// One PES of ADTS frames: raw AAC frames, 1024 samples apart.
    fn aac(&mut self, f: &TsFrame) -> Result<(), TsIngestError> {
        let pts = self.clock.extend(f.pts);
        for (i, frame) in aac::split_adts(&f.data).enumerate() {
            let (header, raw) = frame?;
            let asc = header.audio_specific_config();
            if self.asc != Some(asc) {
                self.ingest.audio_config(Bytes::copy_from_slice(&asc))?;
                self.asc = Some(asc);
                // The video held for it goes first: it came before this audio.
                self.release_held()?;
            }
            let rate = u64::from(header.sample_rate()).max(1);
            let t = pts + i as u64 * 1024 * 90_000 / rate;
            self.ingest.audio_frame(self.clock.ms(t) as u32, raw)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_starts_at_zero_and_runs_on_across_a_wrap() {
        let mut c = Clock::default();
        let start = WRAP - 90_000; // a second before the wrap
        let e0 = c.extend(start);
        assert_eq!(c.ms(e0), 0);
        let e1 = c.extend(start + 45_000);
        assert_eq!(c.ms(e1), 500);
        let e2 = c.extend(45_000); // wrapped: 1.5 s after the start
        assert_eq!(c.ms(e2), 1500);
        // A pts a little ahead, then a dts a little behind, either side of the wrap.
        let e3 = c.extend(WRAP - 900);
        assert_eq!(c.ms(e3), 990);
        let e4 = c.extend(10);
        assert!(c.ms(e4) > 990);
        // Before the first timestamp: 0, not a wrap.
        let mut c = Clock::default();
        c.extend(900_000);
        let early = c.extend(899_100);
        assert_eq!(c.ms(early), 0);
    }
}

//! Ingest: every input becomes track configs and frames for the hub.
//!
//! [`MediaIngest`] is the part every input shares: it keeps the codec configuration, decides when
//! an init is due, normalises timestamps and hands frames to the hub with their ingest time.

pub mod raw;
pub mod rtmp;
pub mod tcp;
pub mod ws;

use bytes::Bytes;
use onair_protocol::codec::aac::{AacError, AudioSpecificConfig};
use onair_protocol::codec::avc::{AvcError, AvcInfo};
use onair_protocol::flv::FlvError;
use onair_protocol::wire::{self, MediaHeader, TrackParams};

use crate::hub::{
    AudioInfo, InitConfig, MediaInfo, Publisher, RenditionWriter, TrackConfig, VIDEO_TRACK,
    VideoInfo, now_us,
};

pub const AUDIO_TRACK: u8 = 1;
/// RTMP timestamps are milliseconds; we keep them.
pub const TIMESCALE: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Flv(#[from] FlvError),
    #[error("bad AVC sequence header: {0}")]
    Avc(#[from] AvcError),
    #[error("bad AAC sequence header: {0}")]
    Aac(#[from] AacError),
    #[error("composition offset {0} ms is out of range")]
    Cts(i32),
    #[error("init: {0}")]
    Wire(#[from] wire::WireError),
}

impl IngestError {
    /// Whether the publisher sent something we cannot carry at all (as opposed to bad data).
    pub fn is_unsupported_codec(&self) -> bool {
        matches!(
            self,
            IngestError::Flv(
                FlvError::UnsupportedVideoCodec(_)
                    | FlvError::UnsupportedAudioCodec(_)
                    | FlvError::UnsupportedPacketType { .. }
            ) | IngestError::Aac(AacError::UnsupportedObjectType(_) | AacError::Channels(_))
        )
    }
}

/// A multitrack packet of a track beside the default one: counted in
/// `onair_ingest_tracks_left_out_total`, and said once per publisher and kind.
fn left_out(said: &mut bool, kind: &'static str, track: u8) {
    if !std::mem::replace(said, true) {
        tracing::info!(
            track,
            "left out: {kind} tracks beside the default one are not carried (counted in onair_ingest_tracks_left_out_total)"
        );
    }
    crate::metrics::track_left_out(kind);
}

/// Extends 32-bit millisecond timestamps (which wrap after ~49 days) to 64 bits.
#[derive(Debug, Default)]
struct Unwrap {
    last: Option<u32>,
    epoch: u64,
}

impl Unwrap {
    fn extend(&mut self, ts: u32) -> u64 {
        if let Some(last) = self.last
            && ts < last
            && last - ts > u32::MAX / 2
        {
            self.epoch += 1 << 32;
        }
        self.last = Some(ts);
        self.epoch + ts as u64
    }
}

struct Video {
    config: Bytes,
    info: AvcInfo,
}

struct Audio {
    config: Bytes,
    asc: AudioSpecificConfig,
    /// RFC 6381 codec string, derived from `asc` once.
    codec: String,
}

/// Where [`MediaIngest`] puts what it reads: a stream's source ([`Publisher`]), or another
/// rendition of it (a ladder rung read back from ffmpeg, [`RenditionWriter`]).
pub trait Target {
    /// For log lines.
    fn name(&self) -> &str;
    fn set_init(&self, init: InitConfig, media: MediaInfo) -> Result<(), wire::WireError>;
    fn push_media(&self, header: &MediaHeader, payload: &[u8], sync: bool);
}

impl Target for Publisher {
    fn name(&self) -> &str {
        Publisher::name(self)
    }

    fn set_init(&self, init: InitConfig, media: MediaInfo) -> Result<(), wire::WireError> {
        Publisher::set_init(self, init, media)
    }

    fn push_media(&self, header: &MediaHeader, payload: &[u8], sync: bool) {
        Publisher::push_media(self, header, payload, sync)
    }
}

impl Target for RenditionWriter {
    fn name(&self) -> &str {
        RenditionWriter::label(self)
    }

    fn set_init(&self, init: InitConfig, _media: MediaInfo) -> Result<(), wire::WireError> {
        RenditionWriter::set_init(self, init)
    }

    fn push_media(&self, header: &MediaHeader, payload: &[u8], sync: bool) {
        RenditionWriter::push_media(self, header, payload, sync)
    }
}

pub struct MediaIngest<T: Target = Publisher> {
    publisher: T,
    video: Option<Video>,
    audio: Option<Audio>,
    /// From metadata: whether the publisher announced a video track.
    expect_video: bool,
    init_sent: bool,
    /// One timeline for both tracks, so that they unwrap together.
    timeline: Unwrap,
    /// The video frame rate, when the source says it rather than the SPS.
    video_fps: Option<f64>,
    /// Enhanced RTMP multitrack: whether packets of a video, an audio track other than the
    /// default one (track 0) have been left out yet (said once, counted always).
    video_left_out: bool,
    audio_left_out: bool,
}

impl<T: Target> MediaIngest<T> {
    pub fn new(publisher: T) -> Self {
        Self {
            publisher,
            video: None,
            audio: None,
            expect_video: false,
            init_sent: false,
            timeline: Unwrap::default(),
            video_fps: None,
            video_left_out: false,
            audio_left_out: false,
        }
    }

    /// The video frame rate as the source states it (raw H.264 with `?fps=`), over the SPS's.
    pub fn set_video_fps(&mut self, fps: f64) {
        self.video_fps = Some(fps);
    }
}

impl MediaIngest<Publisher> {
    /// See [`Publisher::set_clock_source`].
    pub fn set_clock_source(&self, clock: &'static str) {
        self.publisher.set_clock_source(clock);
    }

    /// Resolves when an operator removed the publisher.
    pub async fn removed(&self) {
        self.publisher.removed().await
    }
}

impl<T: Target> MediaIngest<T> {
    pub fn name(&self) -> &str {
        self.publisher.name()
    }

    /// Metadata said a video track is coming: hold the init (and audio) until its config.
    pub fn expect_video(&mut self) {
        self.expect_video = true;
    }

    pub fn video_config(&mut self, config: Bytes) -> Result<(), IngestError> {
        if self.video.as_ref().is_some_and(|v| v.config == config) {
            return Ok(()); // encoders repeat sequence headers; same config, nothing to do
        }
        let info = AvcInfo::parse(&config)?;
        tracing::info!(
            stream = self.name(),
            codec = %info.codec,
            width = info.width,
            height = info.height,
            fps = ?info.fps,
            "video config"
        );
        self.video = Some(Video { config, info });
        if self.init_sent {
            self.send_init()?;
        }
        Ok(())
    }

    pub fn audio_config(&mut self, config: Bytes) -> Result<(), IngestError> {
        if self.audio.as_ref().is_some_and(|a| a.config == config) {
            return Ok(());
        }
        let asc = AudioSpecificConfig::parse(&config)?;
        let codec = asc.codec();
        tracing::info!(
            stream = self.name(),
            codec = %codec,
            sample_rate = asc.sampling_frequency,
            channels = asc.channels(),
            "audio config"
        );
        self.audio = Some(Audio { config, asc, codec });
        if self.init_sent {
            self.send_init()?;
        }
        Ok(())
    }

    fn send_init(&mut self) -> Result<(), IngestError> {
        let mut tracks = Vec::new();
        let mut media = MediaInfo::default();
        if let Some(v) = &self.video {
            let fps = self.video_fps.or(v.info.fps);
            tracks.push(TrackConfig {
                id: VIDEO_TRACK,
                timescale: TIMESCALE,
                codec: v.info.codec.clone(),
                params: TrackParams::Video {
                    width: v.info.width as u16,
                    height: v.info.height as u16,
                    fps_milli: fps.map_or(0, |f| (f * 1000.0).round() as u32),
                },
                config: v.config.clone(),
            });
            media.video = Some(VideoInfo {
                codec: v.info.codec.clone(),
                width: v.info.width,
                height: v.info.height,
                fps,
            });
        }
        if let Some(a) = &self.audio {
            tracks.push(TrackConfig {
                id: AUDIO_TRACK,
                timescale: TIMESCALE,
                codec: a.codec.clone(),
                params: TrackParams::Audio {
                    sample_rate: a.asc.sampling_frequency,
                    channels: a.asc.channels(),
                },
                config: a.config.clone(),
            });
            media.audio = Some(AudioInfo {
                codec: a.codec.clone(),
                sample_rate: a.asc.sampling_frequency,
                channels: a.asc.channels(),
            });
        }
        self.publisher.set_init(InitConfig { tracks }, media)?;
        self.init_sent = true;
        Ok(())
    }

    /// One access unit of AVCC NAL units. `dts` in ms as published (32-bit, may wrap).
    pub fn video_frame(
        &mut self,
        dts: u32,
        cts: i32,
        keyframe: bool,
        data: &[u8],
    ) -> Result<(), IngestError> {
        if self.video.is_none() {
            return Ok(()); // before the sequence header: nothing can decode it
        }
        if !self.init_sent {
            self.send_init()?;
        }
        let cts = i16::try_from(cts).map_err(|_| IngestError::Cts(cts))?;
        let dts = self.timeline.extend(dts);
        self.publisher.push_media(
            &MediaHeader {
                track: VIDEO_TRACK,
                keyframe,
                dts,
                cts,
                ingest_us: now_us(),
            },
            data,
            keyframe,
        );
        Ok(())
    }

    /// One FLV video tag body (RTMP video message, or a tag of an FLV bytestream).
    pub fn flv_video(&mut self, data: &Bytes, ts: u32) -> Result<(), IngestError> {
        use onair_protocol::flv::VideoTag;
        match onair_protocol::flv::parse_video(data)? {
            VideoTag::Multitrack(m) => {
                // The default track is the stream; the others (OBS's Enhanced Broadcasting,
                // ffmpeg with several video maps) are left out until they become renditions.
                for track in m.tracks() {
                    match track? {
                        (0, tag) => self.video_tag(data, tag, ts)?,
                        (id, _) => left_out(&mut self.video_left_out, "video", id),
                    }
                }
                Ok(())
            }
            tag => self.video_tag(data, tag, ts),
        }
    }

    fn video_tag(
        &mut self,
        data: &Bytes,
        tag: onair_protocol::flv::VideoTag<'_>,
        ts: u32,
    ) -> Result<(), IngestError> {
        use onair_protocol::flv::{VideoCodec, VideoTag};
        match tag {
            VideoTag::SequenceHeader {
                codec: VideoCodec::Avc,
                config,
            } => self.video_config(data.slice_ref(config)),
            VideoTag::Frame {
                codec: VideoCodec::Avc,
                keyframe,
                cts,
                data: payload,
            } => self.video_frame(ts, cts, keyframe, payload),
            VideoTag::SequenceHeader { codec, .. } | VideoTag::Frame { codec, .. } => {
                Err(IngestError::Flv(FlvError::UnsupportedVideoCodec(format!(
                    "{} (Enhanced RTMP): only H.264 is carried yet",
                    codec.name()
                ))))
            }
            // The parser never nests multitrack messages.
            VideoTag::EndOfSequence | VideoTag::Ignored | VideoTag::Multitrack(_) => Ok(()),
        }
    }

    /// One FLV audio tag body.
    pub fn flv_audio(&mut self, data: &Bytes, ts: u32) -> Result<(), IngestError> {
        use onair_protocol::flv::AudioTag;
        match onair_protocol::flv::parse_audio(data)? {
            AudioTag::Multitrack(m) => {
                // The default track is the stream's audio; the others are counted and left out.
                for track in m.tracks() {
                    match track? {
                        (0, tag) => self.audio_tag(data, tag, ts)?,
                        (id, _) => left_out(&mut self.audio_left_out, "audio", id),
                    }
                }
                Ok(())
            }
            tag => self.audio_tag(data, tag, ts),
        }
    }

    fn audio_tag(
        &mut self,
        data: &Bytes,
        tag: onair_protocol::flv::AudioTag<'_>,
        ts: u32,
    ) -> Result<(), IngestError> {
        use onair_protocol::flv::AudioTag;
        match tag {
            AudioTag::SequenceHeader { config, .. } => self.audio_config(data.slice_ref(config)),
            AudioTag::Frame { data: payload, .. } => self.audio_frame(ts, payload),
            // The parser never nests multitrack messages.
            AudioTag::Ignored | AudioTag::Multitrack(_) => Ok(()),
        }
    }

    /// One raw AAC frame.
    pub fn audio_frame(&mut self, dts: u32, data: &[u8]) -> Result<(), IngestError> {
        if self.audio.is_none() {
            return Ok(()); // before the sequence header: nothing can decode it
        }
        let has_video = self.video.is_some() || self.expect_video;
        if !self.init_sent {
            if has_video {
                // The init waits for the video config; audio before it precedes any keyframe
                // and no viewer could start there anyway.
                return Ok(());
            }
            self.send_init()?;
        }
        let dts = self.timeline.extend(dts);
        self.publisher.push_media(
            &MediaHeader {
                track: AUDIO_TRACK,
                keyframe: true,
                dts,
                cts: 0,
                ingest_us: now_us(),
            },
            data,
            // In an audio-only stream every AAC frame is a place to start.
            !has_video,
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Unwrap;

    #[test]
    fn timestamps_unwrap_past_32_bits() {
        let mut u = Unwrap::default();
        assert_eq!(u.extend(u32::MAX - 10), (u32::MAX - 10) as u64);
        assert_eq!(u.extend(5), (1u64 << 32) + 5);
        // A small step back (B-frame reorder, audio/video interleave) is not a wrap.
        assert_eq!(u.extend(3), (1u64 << 32) + 3);
    }
}

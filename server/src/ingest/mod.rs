//! Ingest: every input becomes track configs and frames for the hub.
//!
//! [`MediaIngest`] is the part every input shares: it keeps the codec configuration, decides when
//! an init is due, normalises timestamps and hands frames to the hub with their ingest time.

pub mod cmaf;
pub mod pull;
pub mod raw;
pub mod rtmp;
pub mod srt;
pub mod tcp;
pub mod ts;
pub mod ws;

use bytes::Bytes;
use onair_protocol::codec::aac::{AacError, AudioSpecificConfig};
use onair_protocol::codec::{VideoCodec, VideoConfig, VideoConfigError};
use onair_protocol::flv::FlvError;
use onair_protocol::wire::{self, MediaHeader, TrackParams};

use crate::hub::{
    AudioInfo, InitConfig, MediaInfo, Publisher, RenditionInfo, RenditionWriter, TrackConfig,
    VIDEO_TRACK, VideoInfo, now_us,
};

pub const AUDIO_TRACK: u8 = 1;
/// RTMP timestamps are milliseconds; we keep them.
pub const TIMESCALE: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Flv(#[from] FlvError),
    #[error("bad {} sequence header: {source}", codec.name())]
    VideoConfig {
        codec: VideoCodec,
        source: VideoConfigError,
    },
    #[error("{frames} frames after a {config} sequence header")]
    CodecChanged {
        config: &'static str,
        frames: &'static str,
    },
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

/// A multitrack packet that is not carried (an audio track beside the default one, a video
/// track before its sequence header or past [`MAX_EXTRA_TRACKS`]): counted in
/// `onair_ingest_tracks_left_out_total`, and said once per publisher and kind.
fn left_out(said: &mut bool, kind: &'static str, track: u8) {
    if !std::mem::replace(said, true) {
        tracing::info!(
            track,
            "left out: {kind} track packets not carried (counted in onair_ingest_tracks_left_out_total)"
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
    info: VideoConfig,
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
    /// A rendition of the same stream for another video track of a multitrack publish; `None`
    /// where there is none to add (the name is taken, or this target is not a stream's source).
    fn add_track(&self, info: RenditionInfo) -> Option<RenditionWriter>;
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

    fn add_track(&self, info: RenditionInfo) -> Option<RenditionWriter> {
        self.stream().add_rendition(info)
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

    fn add_track(&self, _info: RenditionInfo) -> Option<RenditionWriter> {
        None // a ladder rung is one track
    }
}

/// Video tracks of a multitrack publish beside the default one that become renditions; the
/// rest are left out and counted.
pub const MAX_EXTRA_TRACKS: usize = 7;

/// What a multitrack publisher's `onMetaData.videoTrackIdInfoMap` says of one video track.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrackMeta {
    /// A name the encoder gave the track (`name`), if it is one a rendition can have.
    pub name: Option<String>,
    /// `videodatarate`, kbit/s.
    pub kbps: Option<u32>,
}

impl TrackMeta {
    /// Reads one track's properties: `name` (a rendition name: letters, digits, `_`, `-`, at
    /// most 32, not `source`) and `videodatarate`.
    pub fn new(name: Option<String>, videodatarate: Option<f64>) -> Self {
        let name = name.filter(|n| {
            !n.is_empty()
                && n.len() <= 32
                && n != "source"
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
        });
        let kbps = videodatarate
            .filter(|r| r.is_finite() && *r >= 1.0 && *r <= 1_000_000.0)
            .map(|r| r.round() as u32);
        Self { name, kbps }
    }
}

/// A video track of a multitrack publish beside the default one (OBS's Enhanced Broadcasting,
/// ffmpeg with several video maps): a rendition of the stream of its own, named as the
/// publisher's `videoTrackIdInfoMap` names it, else by its picture height, and fed with its
/// video and the stream's audio.
struct ExtraTrack {
    id: u8,
    ingest: MediaIngest<RenditionWriter>,
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
    /// The other video tracks, each its own rendition.
    tracks: Vec<ExtraTrack>,
    /// From metadata: what the publisher says of its video tracks, by track id.
    track_meta: Vec<(u8, TrackMeta)>,
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
            tracks: Vec::new(),
            track_meta: Vec::new(),
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

    /// Metadata's `videoTrackIdInfoMap`: names and nominal bitrates of the video tracks beside
    /// the default one, for the renditions they become.
    pub fn set_track_meta(&mut self, meta: Vec<(u8, TrackMeta)>) {
        self.track_meta = meta;
    }

    /// A video sequence header: `config` is the codec's record (avcC, hvcC, av1C, vpcC).
    pub fn video_config(&mut self, codec: VideoCodec, config: Bytes) -> Result<(), IngestError> {
        if self
            .video
            .as_ref()
            .is_some_and(|v| v.info.codec == codec && v.config == config)
        {
            return Ok(()); // encoders repeat sequence headers; same config, nothing to do
        }
        let info = VideoConfig::parse(codec, &config)
            .map_err(|source| IngestError::VideoConfig { codec, source })?;
        tracing::info!(
            stream = self.name(),
            codec = %info.codec_string,
            width = info.width,
            height = info.height,
            fps = ?info.fps,
            "video config"
        );
        let complete = info.is_complete();
        self.video = Some(Video { config, info });
        if self.init_sent {
            if complete {
                self.send_init()?;
            } else {
                // A VP9 record has no picture size: the next keyframe brings it and the init.
                self.init_sent = false;
            }
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
                codec: v.info.codec_string.clone(),
                params: TrackParams::Video {
                    width: v.info.width as u16,
                    height: v.info.height as u16,
                    fps_milli: fps.map_or(0, |f| (f * 1000.0).round() as u32),
                },
                config: v.config.clone(),
            });
            media.video = Some(VideoInfo {
                codec: v.info.codec_string.clone(),
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

    /// One access unit in the form the codec's MP4 binding stores (length-prefixed NAL units,
    /// OBUs, a VP9 frame). `dts` in ms as published (32-bit, may wrap).
    pub fn video_frame(
        &mut self,
        dts: u32,
        cts: i32,
        keyframe: bool,
        data: &[u8],
    ) -> Result<(), IngestError> {
        let Some(video) = &mut self.video else {
            return Ok(()); // before the sequence header: nothing can decode it
        };
        if !self.init_sent {
            let complete =
                video.info.is_complete() || (keyframe && video.info.complete_from_keyframe(data));
            if !complete {
                return Ok(()); // no picture size yet (VP9): no viewer could start here
            }
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
                // The default track is the source; each other one is a rendition of its own.
                for track in m.tracks() {
                    match track? {
                        (0, tag) => self.video_tag(data, tag, ts)?,
                        (id, tag) => self.extra_video(data, id, tag, ts)?,
                    }
                }
                Ok(())
            }
            tag => self.video_tag(data, tag, ts),
        }
    }

    /// A packet of video track `id` (not the default one).
    fn extra_video(
        &mut self,
        data: &Bytes,
        id: u8,
        tag: onair_protocol::flv::VideoTag<'_>,
        ts: u32,
    ) -> Result<(), IngestError> {
        use onair_protocol::flv::VideoTag;
        if let Some(t) = self.tracks.iter_mut().find(|t| t.id == id) {
            return t.ingest.video_tag(data, tag, ts);
        }
        // A track becomes a rendition at its sequence header; what comes before it, and
        // tracks past the bound, are left out.
        let VideoTag::SequenceHeader { codec, config } = tag else {
            left_out(&mut self.video_left_out, "video", id);
            return Ok(());
        };
        if self.tracks.len() >= MAX_EXTRA_TRACKS {
            left_out(&mut self.video_left_out, "video", id);
            return Ok(());
        }
        let info = VideoConfig::parse(codec, config)
            .map_err(|source| IngestError::VideoConfig { codec, source })?;
        let height = info.height;
        let meta = self
            .track_meta
            .iter()
            .find(|(t, _)| *t == id)
            .map(|(_, m)| m.clone())
            .unwrap_or_default();
        let Some(writer) = meta
            .name
            .into_iter()
            .chain([format!("{height}p"), format!("{height}p-{id}")])
            .find_map(|name| {
                self.publisher.add_track(RenditionInfo {
                    name,
                    height,
                    nominal_kbps: meta.kbps.unwrap_or(0),
                    ..Default::default()
                })
            })
        else {
            left_out(&mut self.video_left_out, "video", id);
            return Ok(());
        };
        tracing::info!(
            stream = self.name(),
            track = id,
            rendition = writer.rendition.name(),
            "multitrack: video track {id} is a rendition"
        );
        let mut ingest = MediaIngest::new(writer);
        ingest.expect_video();
        if let Some(a) = &self.audio {
            ingest.audio_config(a.config.clone())?;
        }
        ingest.video_tag(data, tag, ts)?;
        self.tracks.push(ExtraTrack { id, ingest });
        Ok(())
    }

    fn video_tag(
        &mut self,
        data: &Bytes,
        tag: onair_protocol::flv::VideoTag<'_>,
        ts: u32,
    ) -> Result<(), IngestError> {
        use onair_protocol::flv::VideoTag;
        match tag {
            VideoTag::SequenceHeader { codec, config } => {
                self.video_config(codec, data.slice_ref(config))
            }
            VideoTag::Frame {
                codec,
                keyframe,
                cts,
                data: payload,
            } => {
                if let Some(v) = &self.video
                    && v.info.codec != codec
                {
                    return Err(IngestError::CodecChanged {
                        config: v.info.codec.name(),
                        frames: codec.name(),
                    });
                }
                self.video_frame(ts, cts, keyframe, payload)
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
        // The stream's audio goes with every video track's rendition.
        for t in &mut self.tracks {
            t.ingest.audio_tag(data, tag.clone(), ts)?;
        }
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
    use super::{TrackMeta, Unwrap};

    #[test]
    fn track_names_from_metadata_are_rendition_names_or_nothing() {
        let m = |name: &str, rate| TrackMeta::new(Some(name.to_string()), rate);
        assert_eq!(
            m("low-1", Some(299.6)),
            TrackMeta {
                name: Some("low-1".into()),
                kbps: Some(300)
            }
        );
        for bad in ["", "source", "a/b", "../x", "ünïcode", &"x".repeat(33)] {
            assert_eq!(m(bad, None).name, None, "{bad:?}");
        }
        for bad in [f64::NAN, -1.0, 0.0, 2e6] {
            assert_eq!(m("ok", Some(bad)).kbps, None, "{bad}");
        }
    }

    #[test]
    fn timestamps_unwrap_past_32_bits() {
        let mut u = Unwrap::default();
        assert_eq!(u.extend(u32::MAX - 10), (u32::MAX - 10) as u64);
        assert_eq!(u.extend(5), (1u64 << 32) + 5);
        // A small step back (B-frame reorder, audio/video interleave) is not a wrap.
        assert_eq!(u.extend(3), (1u64 << 32) + 3);
    }
}

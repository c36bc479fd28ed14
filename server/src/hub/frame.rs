//! What a rendition's log holds: codec-neutral frames, codec configurations and statuses, and
//! the hook through which delivery frames each of them once for its viewers.
//!
//! The hub knows no WebSocket. It asks a [`Framer`] (delivery's) for the bytes a viewer is sent,
//! once per entry, and keeps those bytes beside the entry; a media frame's payload is a slice of
//! the very same buffer, so the log holds each payload once whichever way it is read.

use std::sync::Arc;

use bytes::Bytes;
use onair_protocol::wire::{
    Init, MediaHeader, Message, StatusCode, TrackInit, TrackParams, WireError,
};

/// One media frame as ingest made it: video stays length-prefixed, AAC raw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: MediaHeader,
    pub payload: Bytes,
}

/// The track id ingest gives video (audio is 1).
pub const VIDEO_TRACK: u8 = 0;

impl Frame {
    pub fn is_video(&self) -> bool {
        self.header.track == VIDEO_TRACK
    }
}

/// One track's codec configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackConfig {
    pub id: u8,
    pub timescale: u32,
    /// RFC 6381 codec string.
    pub codec: String,
    pub params: TrackParams,
    /// The video codec's configuration record (avcC, hvcC, av1C, vpcC), AudioSpecificConfig
    /// for AAC.
    pub config: Bytes,
}

/// A rendition's codec configuration: every track, owned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InitConfig {
    pub tracks: Vec<TrackConfig>,
}

impl InitConfig {
    /// The wire message for rendition `id`.
    pub fn wire(&self, rendition: u8) -> Init<'_> {
        Init {
            rendition,
            tracks: self
                .tracks
                .iter()
                .map(|t| TrackInit {
                    id: t.id,
                    timescale: t.timescale,
                    codec: &t.codec,
                    params: t.params,
                    config: &t.config,
                })
                .collect(),
        }
    }

    pub fn video(&self) -> Option<&TrackConfig> {
        self.tracks
            .iter()
            .find(|t| matches!(t.params, TrackParams::Video { .. }))
    }
}

/// An entry of a rendition's log, as consumers other than WebSocket viewers read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Media(Frame),
    Init(Arc<InitConfig>),
    Status(StatusCode, &'static str),
}

/// Frames the hub's entries for WebSocket viewers: once per entry, shared by every viewer.
pub trait Framer: Send + Sync + 'static {
    /// A media message; returns its bytes and where the payload starts in them.
    fn media(&self, header: &MediaHeader, payload: &[u8]) -> (Bytes, usize);
    /// Any other message.
    fn message(&self, msg: &Message<'_>) -> Result<Bytes, WireError>;
}

/// A framer that writes the bare wire messages: for the hub's own tests, and for anything that
/// needs no WebSocket header.
pub struct WireFramer;

impl Framer for WireFramer {
    fn media(&self, header: &MediaHeader, payload: &[u8]) -> (Bytes, usize) {
        let mut h = [0u8; onair_protocol::wire::MEDIA_HEADER_LEN];
        header.encode(&mut h);
        let mut buf = Vec::with_capacity(h.len() + payload.len());
        buf.extend_from_slice(&h);
        buf.extend_from_slice(payload);
        (Bytes::from(buf), h.len())
    }

    fn message(&self, msg: &Message<'_>) -> Result<Bytes, WireError> {
        let mut buf = Vec::new();
        msg.encode(&mut buf)?;
        Ok(Bytes::from(buf))
    }
}

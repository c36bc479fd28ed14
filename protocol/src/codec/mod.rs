//! Codec configuration: what a player needs to set up a decoder, and the conversions between
//! the bytestream forms that ingest and tests meet.

pub mod aac;
pub mod annexb;
pub mod av1;
pub mod avc;
pub mod hevc;
pub mod vp9;

use thiserror::Error;

/// The video codecs onair carries: what an FLV tag (legacy codec id 7, or an Enhanced RTMP
/// FourCC) or an MP4 sample entry names, each with its configuration record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VideoCodec {
    /// H.264; its config is an avcC, its samples AVCC NAL units.
    Avc,
    /// HEVC; its config is an hvcC, its samples length-prefixed NAL units.
    Hevc,
    /// AV1; its config is an av1C, its samples low-overhead OBUs.
    Av1,
    /// VP9; its config is a vpcC, its samples VP9 frames (or superframes).
    Vp9,
}

impl VideoCodec {
    pub const ALL: [VideoCodec; 4] = [Self::Avc, Self::Hevc, Self::Av1, Self::Vp9];

    /// From an Enhanced RTMP FourCC (`avc1`, `hvc1`, `av01`, `vp09`).
    pub fn from_fourcc(f: &[u8]) -> Option<Self> {
        match f {
            b"avc1" => Some(Self::Avc),
            b"hvc1" => Some(Self::Hevc),
            b"av01" => Some(Self::Av1),
            b"vp09" => Some(Self::Vp9),
            _ => None,
        }
    }

    /// From an RFC 6381 codec string (`avc1.64001f`, `hvc1.1.6.L93.B0`, `av01.0.08M.08`,
    /// `vp09.00.10.08`; `avc3` and `hev1` too).
    pub fn of_codec_string(codec: &str) -> Option<Self> {
        let family = codec.split('.').next()?;
        match family {
            "avc1" | "avc3" => Some(Self::Avc),
            "hvc1" | "hev1" => Some(Self::Hevc),
            "av01" => Some(Self::Av1),
            "vp09" => Some(Self::Vp9),
            _ => None,
        }
    }

    /// Human name, for log lines and errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::Avc => "H.264",
            Self::Hevc => "HEVC",
            Self::Av1 => "AV1",
            Self::Vp9 => "VP9",
        }
    }

    /// The FourCC: the Enhanced RTMP one, the ISOBMFF sample entry written for it, and the
    /// family a player names when it says what it decodes.
    pub fn fourcc(self) -> &'static [u8; 4] {
        match self {
            Self::Avc => b"avc1",
            Self::Hevc => b"hvc1",
            Self::Av1 => b"av01",
            Self::Vp9 => b"vp09",
        }
    }

    /// [`Self::fourcc`] as text.
    pub fn family(self) -> &'static str {
        match self {
            Self::Avc => "avc1",
            Self::Hevc => "hvc1",
            Self::Av1 => "av01",
            Self::Vp9 => "vp09",
        }
    }

    /// The ISOBMFF box that holds its configuration record.
    pub fn config_box(self) -> &'static [u8; 4] {
        match self {
            Self::Avc => b"avcC",
            Self::Hevc => b"hvcC",
            Self::Av1 => b"av1C",
            Self::Vp9 => b"vpcC",
        }
    }

    /// Whether its samples may be presented out of decode order (composition offsets).
    pub fn has_cts(self) -> bool {
        matches!(self, Self::Avc | Self::Hevc)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum VideoConfigError {
    #[error(transparent)]
    Avc(#[from] avc::AvcError),
    #[error(transparent)]
    Hevc(#[from] hevc::HevcError),
    #[error(transparent)]
    Av1(#[from] av1::Av1Error),
    #[error(transparent)]
    Vp9(#[from] vp9::Vp9Error),
}

/// What a video configuration record says, whatever its codec: enough for an init segment,
/// a playlist's CODECS and RESOLUTION, and the API.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoConfig {
    pub codec: VideoCodec,
    /// RFC 6381 codec string.
    pub codec_string: String,
    /// 0 while unknown: a vpcC holds no picture size, the first keyframe does
    /// ([`VideoConfig::complete_from_keyframe`]).
    pub width: u32,
    pub height: u32,
    pub fps: Option<f64>,
}

impl VideoConfig {
    pub fn parse(codec: VideoCodec, config: &[u8]) -> Result<Self, VideoConfigError> {
        Ok(match codec {
            VideoCodec::Avc => {
                let i = avc::AvcInfo::parse(config)?;
                Self {
                    codec,
                    codec_string: i.codec,
                    width: i.width,
                    height: i.height,
                    fps: i.fps,
                }
            }
            VideoCodec::Hevc => {
                let i = hevc::HevcInfo::parse(config)?;
                Self {
                    codec,
                    codec_string: i.codec,
                    width: i.width,
                    height: i.height,
                    fps: None,
                }
            }
            VideoCodec::Av1 => {
                let i = av1::Av1Info::parse(config)?;
                Self {
                    codec,
                    codec_string: i.codec,
                    width: i.width,
                    height: i.height,
                    fps: i.fps,
                }
            }
            VideoCodec::Vp9 => {
                let i = vp9::Vp9Info::parse(config)?;
                Self {
                    codec,
                    codec_string: i.codec,
                    width: 0,
                    height: 0,
                    fps: None,
                }
            }
        })
    }

    /// Whether the picture size is known.
    pub fn is_complete(&self) -> bool {
        self.width > 0 && self.height > 0
    }

    /// Takes the picture size from a keyframe where the record lacks it (VP9); returns
    /// whether the size is known now.
    pub fn complete_from_keyframe(&mut self, frame: &[u8]) -> bool {
        if !self.is_complete()
            && self.codec == VideoCodec::Vp9
            && let Some((w, h)) = vp9::keyframe_size(frame)
        {
            self.width = w;
            self.height = h;
        }
        self.is_complete()
    }
}

/// A set of video codecs: what a player says it can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decodes(u8);

impl Decodes {
    /// Every codec: what a player that says nothing is taken to decode.
    pub const ALL: Decodes = Decodes(0b1111);

    fn bit(c: VideoCodec) -> u8 {
        match c {
            VideoCodec::Avc => 1,
            VideoCodec::Hevc => 2,
            VideoCodec::Av1 => 4,
            VideoCodec::Vp9 => 8,
        }
    }

    /// From a comma-separated list of families (`avc1,av01`); unknown ones are ignored, so a
    /// newer player's list still means what this server knows of it. An empty list is none.
    pub fn parse_list(list: &str) -> Decodes {
        Decodes(
            list.split(',')
                .filter_map(|f| VideoCodec::of_codec_string(f.trim()))
                .fold(0, |set, c| set | Self::bit(c)),
        )
    }

    pub fn contains(self, c: VideoCodec) -> bool {
        self.0 & Self::bit(c) != 0
    }

    /// Whether a rendition with this codec string can be decoded: a codec onair does not
    /// know (none today) is left to the player.
    pub fn can(self, codec_string: &str) -> bool {
        VideoCodec::of_codec_string(codec_string).is_none_or(|c| self.contains(c))
    }

    /// The list, as [`Decodes::parse_list`] reads it.
    pub fn list(self) -> String {
        VideoCodec::ALL
            .into_iter()
            .filter(|&c| self.contains(c))
            .map(VideoCodec::family)
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codec_strings_name_their_codec() {
        assert_eq!(
            VideoCodec::of_codec_string("avc1.64001f"),
            Some(VideoCodec::Avc)
        );
        assert_eq!(
            VideoCodec::of_codec_string("hev1.1.6.L93.B0"),
            Some(VideoCodec::Hevc)
        );
        assert_eq!(
            VideoCodec::of_codec_string("av01.0.08M.08"),
            Some(VideoCodec::Av1)
        );
        assert_eq!(VideoCodec::of_codec_string("vp09"), Some(VideoCodec::Vp9));
        assert_eq!(VideoCodec::of_codec_string("mp4a.40.2"), None);
        for c in VideoCodec::ALL {
            assert_eq!(VideoCodec::from_fourcc(c.fourcc()), Some(c));
            assert_eq!(VideoCodec::of_codec_string(c.family()), Some(c));
        }
    }

    #[test]
    fn a_players_list_is_read_leniently() {
        let d = Decodes::parse_list("avc1, av01,opus,xyz1");
        assert!(d.contains(VideoCodec::Avc) && d.contains(VideoCodec::Av1));
        assert!(!d.contains(VideoCodec::Hevc) && !d.contains(VideoCodec::Vp9));
        assert!(d.can("av01.0.08M.08") && !d.can("hvc1.1.6.L93.B0"));
        assert_eq!(d.list(), "avc1,av01");
        assert_eq!(Decodes::parse_list(&Decodes::ALL.list()), Decodes::ALL);
        assert!(!Decodes::parse_list("").can("avc1.64001f"));
    }
}

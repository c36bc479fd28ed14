//! H.264: the `AVCDecoderConfigurationRecord` (avcC), its SPS, and AVCC <-> Annex B.

use h264_reader::avcc::AvcDecoderConfigurationRecord;
use h264_reader::nal::sps::SeqParameterSet;
use h264_reader::nal::{Nal, RefNal};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AvcError {
    #[error("avcC: {0}")]
    Config(String),
    #[error("avcC has no SPS")]
    NoSps,
    #[error("avcC has no PPS")]
    NoPps,
    #[error("SPS: {0}")]
    Sps(String),
    #[error("picture size {width}x{height} is out of range")]
    Dimensions { width: u32, height: u32 },
    #[error("NAL unit length {len} at offset {offset} runs past the {total}-byte access unit")]
    NalOverrun {
        offset: usize,
        len: usize,
        total: usize,
    },
    #[error("truncated NAL length prefix at offset {offset}")]
    TruncatedLength { offset: usize },
}

/// What the player and the API need from an avcC.
#[derive(Debug, Clone, PartialEq)]
pub struct AvcInfo {
    /// RFC 6381 codec string, e.g. `avc1.64001F`.
    pub codec: String,
    pub width: u32,
    pub height: u32,
    /// From the SPS VUI timing info, when present.
    pub fps: Option<f64>,
    /// Bytes in each NAL length prefix (1, 2 or 4).
    pub length_size: u8,
    pub sps: Vec<Vec<u8>>,
    pub pps: Vec<Vec<u8>>,
}

impl AvcInfo {
    pub fn parse(avcc: &[u8]) -> Result<Self, AvcError> {
        check_layout(avcc)?;
        let record = AvcDecoderConfigurationRecord::try_from(avcc)
            .map_err(|e| AvcError::Config(format!("{e:?}")))?;
        let length_size = record.length_size_minus_one() + 1;
        if length_size == 3 {
            // ISO/IEC 14496-15 allows 1, 2 or 4 only.
            return Err(AvcError::Config("NAL length size 3 is not allowed".into()));
        }
        let mut sps = Vec::new();
        for s in record.sequence_parameter_sets() {
            sps.push(s.map_err(|e| AvcError::Config(format!("{e:?}")))?.to_vec());
        }
        let mut pps = Vec::new();
        for p in record.picture_parameter_sets() {
            pps.push(p.map_err(|e| AvcError::Config(format!("{e:?}")))?.to_vec());
        }
        let first = sps.first().ok_or(AvcError::NoSps)?;
        if pps.is_empty() {
            return Err(AvcError::NoPps);
        }
        let parsed = parse_sps(first)?;
        let (width, height) = parsed
            .pixel_dimensions()
            .map_err(|e| AvcError::Sps(format!("{e:?}")))?;
        if width == 0 || height == 0 || width > u16::MAX as u32 || height > u16::MAX as u32 {
            return Err(AvcError::Dimensions { width, height });
        }
        let fps = parsed
            .fps()
            .filter(|f| f.is_finite() && *f > 0.0 && *f <= 1000.0);
        Ok(Self {
            codec: parsed.rfc6381().to_string(),
            width,
            height,
            fps,
            length_size,
            sps,
            pps,
        })
    }
}

/// Builds an avcC (ISO/IEC 14496-15 5.3.3.1) from one SPS and one PPS (with their NAL
/// headers, as raw H.264 carries them), with 4-byte NAL lengths: for ingest of raw H.264.
pub fn avcc_from_parameter_sets(sps: &[u8], pps: &[u8]) -> Result<Vec<u8>, AvcError> {
    if sps.len() < 4 || sps.len() > u16::MAX as usize {
        return Err(AvcError::Sps(format!("{} bytes", sps.len())));
    }
    if pps.is_empty() || pps.len() > u16::MAX as usize {
        return Err(AvcError::NoPps);
    }
    let parsed = parse_sps(sps)?;
    let mut out = Vec::with_capacity(16 + sps.len() + pps.len());
    // version, profile, compatibility, level, 6 bits reserved + length size 4, 3 bits reserved +
    // one SPS.
    out.extend_from_slice(&[1, sps[1], sps[2], sps[3], 0xff, 0xe1]);
    out.extend_from_slice(&(sps.len() as u16).to_be_bytes());
    out.extend_from_slice(sps);
    out.push(1);
    out.extend_from_slice(&(pps.len() as u16).to_be_bytes());
    out.extend_from_slice(pps);
    if matches!(sps[1], 100 | 110 | 122 | 144) {
        // The high profiles' extension: chroma format and bit depths, no SPS extensions.
        let c = &parsed.chroma_info;
        out.push(0xfc | (c.chroma_format.to_u32() & 3) as u8);
        out.push(0xf8 | (c.bit_depth_luma_minus8 & 7));
        out.push(0xf8 | (c.bit_depth_chroma_minus8 & 7));
        out.push(0);
    }
    Ok(out)
}

/// Walks an avcC's parameter set lists (ISO/IEC 14496-15 5.3.3.1) with every length checked.
/// h264-reader's iterators index past the end of a truncated list and panic (found by
/// fuzz/avc), so nothing reaches them that this has not walked.
fn check_layout(avcc: &[u8]) -> Result<(), AvcError> {
    let count = |at: usize, mask: u8| {
        avcc.get(at)
            .map(|n| usize::from(n & mask))
            .ok_or_else(truncated)
    };
    let sps = count(5, 0x1f)?;
    let at = skip_parameter_sets(avcc, 6, sps)?;
    let pps = count(at, 0xff)?;
    skip_parameter_sets(avcc, at + 1, pps).map(|_| ())
}

fn truncated() -> AvcError {
    AvcError::Config("truncated parameter set list".into())
}

/// Skips `count` parameter sets (each a u16 length and that many bytes) from `at`.
fn skip_parameter_sets(avcc: &[u8], mut at: usize, count: usize) -> Result<usize, AvcError> {
    for _ in 0..count {
        let len = avcc.get(at..at + 2).ok_or_else(truncated)?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        if len == 0 || avcc.len() < at + 2 + len {
            return Err(truncated());
        }
        at += 2 + len;
    }
    Ok(at)
}

/// Parses one SPS NAL unit (with its one-byte NAL header).
pub fn parse_sps(nal: &[u8]) -> Result<SeqParameterSet, AvcError> {
    if nal.is_empty() {
        // h264-reader's RefNal panics on an empty NAL (found by fuzz/avc).
        return Err(AvcError::Sps("empty SPS".into()));
    }
    let nal = RefNal::new(nal, &[], true);
    SeqParameterSet::from_bits(nal.rbsp_bits()).map_err(|e| AvcError::Sps(format!("{e:?}")))
}

/// Iterates the NAL units of a length-prefixed access unit.
pub fn nal_units(data: &[u8], length_size: u8) -> NalUnits<'_> {
    NalUnits {
        data,
        offset: 0,
        length_size: length_size as usize,
    }
}

pub struct NalUnits<'a> {
    data: &'a [u8],
    offset: usize,
    length_size: usize,
}

impl<'a> Iterator for NalUnits<'a> {
    type Item = Result<&'a [u8], AvcError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.offset >= self.data.len() {
            return None;
        }
        let at = self.offset;
        let Some(prefix) = self.data.get(at..at + self.length_size) else {
            self.offset = self.data.len();
            return Some(Err(AvcError::TruncatedLength { offset: at }));
        };
        let len = prefix
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        let start = at + self.length_size;
        let Some(nal) = self.data.get(start..start.saturating_add(len)) else {
            self.offset = self.data.len();
            return Some(Err(AvcError::NalOverrun {
                offset: at,
                len,
                total: self.data.len(),
            }));
        };
        self.offset = start + len;
        Some(Ok(nal))
    }
}

/// NAL unit type of a NAL unit (low five bits of its first byte).
pub fn nal_type(nal: &[u8]) -> u8 {
    nal.first().map_or(0, |b| b & 0x1f)
}

pub const NAL_IDR: u8 = 5;
pub const NAL_SPS: u8 = 7;
pub const NAL_PPS: u8 = 8;
pub const NAL_AUD: u8 = 9;

const START_CODE: [u8; 4] = [0, 0, 0, 1];

/// Appends an access unit as Annex B. When `params` is given (on keyframes), the SPS and PPS are
/// written first, so that the bytestream can be decoded from that point.
pub fn avcc_to_annexb(
    data: &[u8],
    length_size: u8,
    params: Option<&AvcInfo>,
    out: &mut Vec<u8>,
) -> Result<(), AvcError> {
    if let Some(info) = params {
        for ps in info.sps.iter().chain(&info.pps) {
            out.extend_from_slice(&START_CODE);
            out.extend_from_slice(ps);
        }
    }
    for nal in nal_units(data, length_size) {
        out.extend_from_slice(&START_CODE);
        out.extend_from_slice(nal?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// avcC of an x264 640x360 Constrained Baseline stream at 30 fps (ffmpeg -preset ultrafast).
    pub(crate) const AVCC_640X360: &[u8] = &[
        0x01, 0x42, 0xc0, 0x1e, 0xff, 0xe1, 0x00, 0x19, 0x67, 0x42, 0xc0, 0x1e, 0xda, 0x02, 0x80,
        0xbf, 0xe5, 0xc0, 0x44, 0x00, 0x00, 0x03, 0x00, 0x04, 0x00, 0x00, 0x03, 0x00, 0xf0, 0x3c,
        0x58, 0xba, 0x80, 0x01, 0x00, 0x04, 0x68, 0xce, 0x0f, 0xc8,
    ];

    #[test]
    fn parses_x264_avcc() {
        let info = AvcInfo::parse(AVCC_640X360).unwrap();
        assert_eq!(info.codec.to_ascii_lowercase(), "avc1.42c01e");
        assert_eq!(info.fps, Some(30.0));
        assert_eq!((info.width, info.height), (640, 360));
        assert_eq!(info.length_size, 4);
        assert_eq!(info.sps.len(), 1);
        assert_eq!(info.pps.len(), 1);
    }

    #[test]
    fn truncated_avcc_is_an_error() {
        for n in 0..AVCC_640X360.len() - 1 {
            assert!(AvcInfo::parse(&AVCC_640X360[..n]).is_err(), "cut at {n}");
        }
    }

    #[test]
    fn nal_iteration_and_annexb() {
        let au = [0, 0, 0, 2, 0x65, 0xaa, 0, 0, 0, 1, 0x06];
        let nals: Vec<_> = nal_units(&au, 4).collect::<Result<_, _>>().unwrap();
        assert_eq!(nals, vec![&[0x65, 0xaa][..], &[0x06][..]]);
        let mut out = Vec::new();
        avcc_to_annexb(&au, 4, None, &mut out).unwrap();
        assert_eq!(out, [0, 0, 0, 1, 0x65, 0xaa, 0, 0, 0, 1, 0x06]);
        let bad = [0, 0, 0, 9, 0x65];
        assert!(matches!(
            nal_units(&bad, 4).next(),
            Some(Err(AvcError::NalOverrun { .. }))
        ));
        assert!(matches!(
            nal_units(&[0, 0], 4).next(),
            Some(Err(AvcError::TruncatedLength { offset: 0 }))
        ));
    }

    /// Found by fuzz/avc: h264-reader panics on an empty NAL unit, and on a truncated
    /// parameter set list.
    #[test]
    fn an_empty_sps_is_an_error_not_a_panic() {
        let truncated = [
            0x01, 0x61, 0x00, 0x0a, 0xff, 0xe1, 0x00, 0x19, 0x67, 0x25, 0x00, 0x0a, 0xac, 0xd9,
            0x00, 0x04, 0x68, 0xef, 0x99, 0xcb, 0xfd, 0xf8, 0x64, 0x01, 0xb8, 0x00, 0x05, 0x27,
            0xff, 0x0f, 0x12, 0x25, 0x96, 0x01, 0x00, 0x00,
        ];
        assert!(AvcInfo::parse(&truncated).is_err());
        assert!(parse_sps(&[]).is_err());
        // An avcC whose one SPS is empty.
        assert!(AvcInfo::parse(&[1, 0x64, 0, 0x1f, 0xff, 0xe1, 0, 0, 1, 0, 1, 0x68]).is_err());
    }
}

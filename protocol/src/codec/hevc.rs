//! H.265/HEVC: the `HEVCDecoderConfigurationRecord` (hvcC, ISO/IEC 14496-15 8.3.3), the picture
//! size from its SPS, and the RFC 6381 codec string MSE and HLS want (`hvc1.1.6.L93.B0`).
//!
//! By hand: no crate in the field parses hvcC (h264-reader is H.264 only); its RBSP reader is
//! reused for the SPS, whose emulation prevention is the same as H.264's.

use std::num::NonZeroUsize;

use h264_reader::rbsp::{BitRead, BitReader, ByteReader};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HevcError {
    #[error("hvcC: {0}")]
    Config(String),
    #[error("hvcC has no {0}")]
    Missing(&'static str),
    #[error("SPS: {0}")]
    Sps(String),
    #[error("picture size {width}x{height} is out of range")]
    Dimensions { width: u32, height: u32 },
}

/// NAL unit types of the parameter sets (ITU-T H.265 table 7-1).
const VPS: u8 = 32;
const SPS: u8 = 33;
const PPS: u8 = 34;

/// What the player, the muxer and the API need from an hvcC.
#[derive(Debug, Clone, PartialEq)]
pub struct HevcInfo {
    /// RFC 6381 codec string, e.g. `hvc1.1.6.L93.B0`.
    pub codec: String,
    pub width: u32,
    pub height: u32,
    /// Bytes in each NAL length prefix (1, 2 or 4).
    pub length_size: u8,
    pub vps: Vec<Vec<u8>>,
    pub sps: Vec<Vec<u8>>,
    pub pps: Vec<Vec<u8>>,
}

/// The fixed part of an hvcC, before its arrays.
const HEADER: usize = 23;

impl HevcInfo {
    pub fn parse(hvcc: &[u8]) -> Result<Self, HevcError> {
        let bad = |what: &str| HevcError::Config(what.to_string());
        if hvcc.len() < HEADER {
            return Err(bad("shorter than its 23-byte header"));
        }
        if hvcc[0] != 1 {
            return Err(HevcError::Config(format!(
                "configuration version {} (only 1 exists)",
                hvcc[0]
            )));
        }
        let profile_space = hvcc[1] >> 6;
        let high_tier = hvcc[1] & 0x20 != 0;
        let profile_idc = hvcc[1] & 0x1f;
        let compatibility = u32::from_be_bytes([hvcc[2], hvcc[3], hvcc[4], hvcc[5]]);
        let constraints = &hvcc[6..12];
        let level_idc = hvcc[12];
        let length_size = (hvcc[21] & 0x03) + 1;
        if length_size == 3 {
            return Err(bad("NAL length size 3 is not allowed"));
        }
        let (mut vps, mut sps, mut pps) = (Vec::new(), Vec::new(), Vec::new());
        let arrays = hvcc[22];
        let mut rest = &hvcc[HEADER..];
        for _ in 0..arrays {
            let [kind, n0, n1, tail @ ..] = rest else {
                return Err(bad("an array header runs past the end"));
            };
            let nal_type = kind & 0x3f;
            let count = u16::from_be_bytes([*n0, *n1]);
            rest = tail;
            for _ in 0..count {
                let [l0, l1, tail @ ..] = rest else {
                    return Err(bad("a NAL unit length runs past the end"));
                };
                let len = usize::from(u16::from_be_bytes([*l0, *l1]));
                let nal = tail
                    .get(..len)
                    .ok_or_else(|| bad("a NAL unit runs past the end"))?;
                rest = &tail[len..];
                match nal_type {
                    VPS => vps.push(nal.to_vec()),
                    SPS => sps.push(nal.to_vec()),
                    PPS => pps.push(nal.to_vec()),
                    _ => {} // SEI and others: not needed to decode
                }
            }
        }
        let first_sps = sps.first().ok_or(HevcError::Missing("SPS"))?;
        if vps.is_empty() {
            return Err(HevcError::Missing("VPS"));
        }
        if pps.is_empty() {
            return Err(HevcError::Missing("PPS"));
        }
        let (width, height) = sps_dimensions(first_sps)?;
        Ok(HevcInfo {
            codec: codec_string(
                profile_space,
                profile_idc,
                compatibility,
                high_tier,
                level_idc,
                constraints,
            ),
            width,
            height,
            length_size,
            vps,
            sps,
            pps,
        })
    }
}

/// ISO/IEC 14496-15 annex E.3: `hvc1.` profile space (none, A, B or C) and profile, the
/// compatibility flags in reverse bit order in hex, tier (L or H) and level, then the six
/// constraint bytes in hex with the trailing zero ones left out.
fn codec_string(
    space: u8,
    profile: u8,
    compatibility: u32,
    high_tier: bool,
    level: u8,
    constraints: &[u8],
) -> String {
    let space = match space {
        1 => "A",
        2 => "B",
        3 => "C",
        _ => "",
    };
    let tier = if high_tier { 'H' } else { 'L' };
    let mut s = format!(
        "hvc1.{space}{profile}.{:X}.{tier}{level}",
        compatibility.reverse_bits()
    );
    let kept = constraints
        .iter()
        .rposition(|b| *b != 0)
        .map_or(0, |i| i + 1);
    for b in &constraints[..kept] {
        s.push_str(&format!(".{b:X}"));
    }
    s
}

/// The cropped picture size an SPS declares (ITU-T H.265 7.3.2.2).
pub fn sps_dimensions(nal: &[u8]) -> Result<(u32, u32), HevcError> {
    sps_fields(nal).map(|f| (f.width, f.height))
}

/// What an hvcC repeats of its SPS.
struct SpsFields {
    width: u32,
    height: u32,
    max_sub_layers_minus1: u8,
    temporal_id_nesting: bool,
    chroma_format_idc: u32,
    bit_depth_luma_minus8: u32,
    bit_depth_chroma_minus8: u32,
}

fn sps_fields(nal: &[u8]) -> Result<SpsFields, HevcError> {
    let e = |e: h264_reader::rbsp::BitReaderError| HevcError::Sps(format!("{e:?}"));
    if nal.len() < 3 {
        return Err(HevcError::Sps("shorter than its header".into()));
    }
    if (nal[0] >> 1) & 0x3f != SPS {
        return Err(HevcError::Sps(format!(
            "NAL unit type {} is not an SPS",
            (nal[0] >> 1) & 0x3f
        )));
    }
    let two = NonZeroUsize::new(2).expect("two is not zero");
    let mut r = BitReader::new(ByteReader::skipping_bytes(nal, two));
    r.skip(4, "sps_video_parameter_set_id").map_err(e)?;
    let max_sub_layers_minus1: u8 = r.read::<3, u8>("sps_max_sub_layers_minus1").map_err(e)?;
    let temporal_id_nesting = r.read_bit("sps_temporal_id_nesting_flag").map_err(e)?;
    // profile_tier_level(1, sps_max_sub_layers_minus1): the general part is 88 bits of
    // profile and 8 of level.
    r.skip(88, "general profile").map_err(e)?;
    r.skip(8, "general_level_idc").map_err(e)?;
    let mut present = [(false, false); 8];
    for p in present.iter_mut().take(usize::from(max_sub_layers_minus1)) {
        p.0 = r.read_bit("sub_layer_profile_present_flag").map_err(e)?;
        p.1 = r.read_bit("sub_layer_level_present_flag").map_err(e)?;
    }
    if max_sub_layers_minus1 > 0 {
        r.skip(
            2 * (8 - u32::from(max_sub_layers_minus1)),
            "reserved_zero_2bits",
        )
        .map_err(e)?;
    }
    for (profile, level) in present.iter().take(usize::from(max_sub_layers_minus1)) {
        if *profile {
            r.skip(88, "sub_layer profile").map_err(e)?;
        }
        if *level {
            r.skip(8, "sub_layer_level_idc").map_err(e)?;
        }
    }
    r.read_ue("sps_seq_parameter_set_id").map_err(e)?;
    let chroma_format_idc = r.read_ue("chroma_format_idc").map_err(e)?;
    let separate_planes =
        chroma_format_idc == 3 && r.read_bit("separate_colour_plane_flag").map_err(e)?;
    let width = r.read_ue("pic_width_in_luma_samples").map_err(e)?;
    let height = r.read_ue("pic_height_in_luma_samples").map_err(e)?;
    let (mut w, mut h) = (width, height);
    if r.read_bit("conformance_window_flag").map_err(e)? {
        let left = r.read_ue("conf_win_left_offset").map_err(e)?;
        let right = r.read_ue("conf_win_right_offset").map_err(e)?;
        let top = r.read_ue("conf_win_top_offset").map_err(e)?;
        let bottom = r.read_ue("conf_win_bottom_offset").map_err(e)?;
        // Offsets are in chroma samples (table 6-1).
        let (sub_w, sub_h) = match (chroma_format_idc, separate_planes) {
            (1, _) => (2, 2),
            (2, _) => (2, 1),
            _ => (1, 1),
        };
        let crop_w = u64::from(left) + u64::from(right);
        let crop_h = u64::from(top) + u64::from(bottom);
        w = u32::try_from(u64::from(width).saturating_sub(crop_w * sub_w)).unwrap_or(0);
        h = u32::try_from(u64::from(height).saturating_sub(crop_h * sub_h)).unwrap_or(0);
    }
    // Level 6.2's largest picture is 8192x4320; a 16K side is already beyond any decoder.
    if w == 0 || h == 0 || w > 16384 || h > 16384 {
        return Err(HevcError::Dimensions {
            width: w,
            height: h,
        });
    }
    let bit_depth_luma_minus8 = r.read_ue("bit_depth_luma_minus8").map_err(e)?;
    let bit_depth_chroma_minus8 = r.read_ue("bit_depth_chroma_minus8").map_err(e)?;
    if chroma_format_idc > 3 || bit_depth_luma_minus8 > 8 || bit_depth_chroma_minus8 > 8 {
        return Err(HevcError::Sps(format!(
            "chroma format {chroma_format_idc}, bit depths {} and {} (8 to 16 exist)",
            bit_depth_luma_minus8 + 8,
            bit_depth_chroma_minus8 + 8
        )));
    }
    Ok(SpsFields {
        width: w,
        height: h,
        max_sub_layers_minus1,
        temporal_id_nesting,
        chroma_format_idc,
        bit_depth_luma_minus8,
        bit_depth_chroma_minus8,
    })
}

/// The first `n` bytes of a NAL unit's payload after its 2-byte header, with emulation
/// prevention bytes (the 0x03 of 0x000003) removed.
fn rbsp_prefix(nal: &[u8], n: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(n);
    let mut zeros = 0;
    for &b in nal.get(2..)? {
        if out.len() == n {
            break;
        }
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    (out.len() == n).then_some(out)
}

/// An hvcC (ISO/IEC 14496-15 8.3.3.1) from one VPS, SPS and PPS, each a whole NAL unit with its
/// header: what an Annex B source (MPEG-TS) carries in band. Profile, tier, level and
/// constraints are the SPS's general profile_tier_level, copied; NAL lengths are 4 bytes.
pub fn hvcc_from_parameter_sets(vps: &[u8], sps: &[u8], pps: &[u8]) -> Result<Vec<u8>, HevcError> {
    let nal_type = |n: &[u8]| n.first().map(|b| (b >> 1) & 0x3f);
    if nal_type(vps) != Some(VPS) {
        return Err(HevcError::Missing("VPS"));
    }
    if nal_type(pps) != Some(PPS) {
        return Err(HevcError::Missing("PPS"));
    }
    let fields = sps_fields(sps)?;
    // The byte of vps id, sub-layers and nesting, then the 12 bytes of general
    // profile_tier_level: byte-aligned in every SPS.
    let ptl = rbsp_prefix(sps, 13).ok_or_else(|| HevcError::Sps("truncated".into()))?;
    let mut out = Vec::with_capacity(23 + 3 * 5 + vps.len() + sps.len() + pps.len());
    out.push(1); // configurationVersion
    out.extend_from_slice(&ptl[1..13]);
    out.extend_from_slice(&[0xf0, 0x00]); // min_spatial_segmentation_idc 0
    out.push(0xfc); // parallelismType 0: unknown
    out.push(0xfc | (fields.chroma_format_idc as u8 & 3));
    out.push(0xf8 | (fields.bit_depth_luma_minus8 as u8 & 7));
    out.push(0xf8 | (fields.bit_depth_chroma_minus8 as u8 & 7));
    out.extend_from_slice(&[0, 0]); // avgFrameRate: unknown
    // constantFrameRate 0, numTemporalLayers, temporalIdNested, lengthSizeMinusOne 3.
    out.push(
        (((fields.max_sub_layers_minus1 + 1) & 7) << 3)
            | (u8::from(fields.temporal_id_nesting) << 2)
            | 3,
    );
    out.push(3); // numOfArrays
    for (kind, nal) in [(VPS, vps), (SPS, sps), (PPS, pps)] {
        let len = u16::try_from(nal.len())
            .map_err(|_| HevcError::Config(format!("a {}-byte parameter set", nal.len())))?;
        out.push(0x80 | kind); // array_completeness 1
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(nal);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// x265 3.5 (Debian's ffmpeg, `testsrc2` 640x360, Main, level 2.1), from the hvcC of the MP4
    /// it wrote, with its VPS, SPS and PPS arrays (the SEI array of x265's options left out).
    pub(crate) const HVCC_640X360: &[u8] = &[
        0x01, 0x01, 0x60, 0x00, 0x00, 0x00, 0x90, 0x00, 0x00, 0x00, 0x00, 0x00, 0x3f, 0xf0, 0x00,
        0xfc, 0xfd, 0xf8, 0xf8, 0x00, 0x00, 0x0f, 0x03, // 3 arrays
        0x20, 0x00, 0x01, 0x00, 0x18, // VPS
        0x40, 0x01, 0x0c, 0x01, 0xff, 0xff, 0x01, 0x60, 0x00, 0x00, 0x03, 0x00, 0x90, 0x00, 0x00,
        0x03, 0x00, 0x00, 0x03, 0x00, 0x3f, 0x95, 0x98, 0x09, //
        0x21, 0x00, 0x01, 0x00, 0x2a, // SPS
        0x42, 0x01, 0x01, 0x01, 0x60, 0x00, 0x00, 0x03, 0x00, 0x90, 0x00, 0x00, 0x03, 0x00, 0x00,
        0x03, 0x00, 0x3f, 0xa0, 0x05, 0x02, 0x01, 0x69, 0x65, 0x95, 0x9a, 0x49, 0x32, 0xbc, 0x05,
        0xa0, 0x20, 0x00, 0x00, 0x03, 0x00, 0x20, 0x00, 0x00, 0x03, 0x03, 0xc1, //
        0x22, 0x00, 0x01, 0x00, 0x07, // PPS
        0x44, 0x01, 0xc1, 0x72, 0xb4, 0x62, 0x40,
    ];

    #[test]
    fn a_real_hvcc_gives_its_codec_string_and_size() {
        let info = HevcInfo::parse(HVCC_640X360).unwrap();
        assert_eq!(info.codec, "hvc1.1.6.L63.90");
        assert_eq!((info.width, info.height), (640, 360));
        assert_eq!(info.length_size, 4);
        assert_eq!((info.vps.len(), info.sps.len(), info.pps.len()), (1, 1, 1));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for n in 0..HVCC_640X360.len() {
            assert!(HevcInfo::parse(&HVCC_640X360[..n]).is_err(), "cut at {n}");
        }
    }

    #[test]
    fn codec_strings_follow_annex_e() {
        // The examples of ISO/IEC 14496-15 E.3 and what Apple's HLS authoring spec lists.
        assert_eq!(
            codec_string(0, 1, 0x6000_0000, false, 93, &[0xb0, 0, 0, 0, 0, 0]),
            "hvc1.1.6.L93.B0"
        );
        assert_eq!(
            codec_string(0, 2, 0x2000_0000, true, 120, &[0xb0, 0, 0, 0, 0, 0]),
            "hvc1.2.4.H120.B0"
        );
        assert_eq!(codec_string(1, 3, 0, false, 30, &[0; 6]), "hvc1.A3.0.L30");
        assert_eq!(
            codec_string(0, 1, 0x6000_0000, false, 93, &[0x90, 0, 0x10, 0, 0, 0]),
            "hvc1.1.6.L93.90.0.10"
        );
    }

    #[test]
    fn missing_parameter_sets_are_named() {
        let mut no_pps = HVCC_640X360[..HVCC_640X360.len() - 12].to_vec();
        no_pps[22] = 2;
        assert_eq!(HevcInfo::parse(&no_pps), Err(HevcError::Missing("PPS")));
    }

    #[test]
    fn an_sps_that_is_not_one_is_refused() {
        assert!(matches!(
            sps_dimensions(&[0x40, 0x01, 0x0c]),
            Err(HevcError::Sps(_))
        ));
    }

    #[test]
    fn an_hvcc_rebuilt_from_its_parameter_sets_says_the_same() {
        let info = HevcInfo::parse(HVCC_640X360).unwrap();
        let hvcc = hvcc_from_parameter_sets(&info.vps[0], &info.sps[0], &info.pps[0]).unwrap();
        let again = HevcInfo::parse(&hvcc).unwrap();
        assert_eq!(again.codec, info.codec);
        assert_eq!((again.width, again.height), (640, 360));
        assert_eq!(again.length_size, 4);
        assert_eq!(
            (&again.vps, &again.sps, &again.pps),
            (&info.vps, &info.sps, &info.pps)
        );
        // The fixed part matches ffmpeg's (x265's) record but for what it leaves unknown.
        assert_eq!(
            hvcc[..13],
            HVCC_640X360[..13],
            "profile, tier, level, constraints"
        );
        assert_eq!(
            hvcc[16..19],
            HVCC_640X360[16..19],
            "chroma format and bit depths"
        );
        assert!(hvcc_from_parameter_sets(&info.sps[0], &info.sps[0], &info.pps[0]).is_err());
        // Cut anywhere: no panic; cut before the fields the record repeats: an error.
        for n in 0..info.sps[0].len() {
            let cut = &info.sps[0][..n];
            let built = hvcc_from_parameter_sets(&info.vps[0], cut, &info.pps[0]);
            assert!(n >= 16 || built.is_err(), "cut at {n}");
        }
    }
}

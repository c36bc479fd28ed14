//! VP9: the `VPCodecConfigurationRecord` (vpcC, "VP Codec ISO Media File Format Binding" 2.2)
//! and the codec string (`vp09.00.10.08`). The record holds no picture size: that comes from
//! the frames or the stream's metadata: [`keyframe_size`] reads it from a keyframe's
//! uncompressed header (VP9 bitstream specification, 6.2).
//!
//! By hand: twelve bytes of record and a few fields of frame header, no crate needed.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Vp9Error {
    #[error("vpcC: {0}")]
    Config(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Vp9Info {
    /// Codec string, e.g. `vp09.00.10.08`.
    pub codec: String,
    pub profile: u8,
    pub level: u8,
    pub bit_depth: u8,
}

impl Vp9Info {
    /// The record, with or without the FullBox version and flags (version 1) in front of it:
    /// MP4's vpcC box has them; a record never starts with them, since its bit depth (the
    /// third byte's high nibble) is never 0.
    pub fn parse(vpcc: &[u8]) -> Result<Self, Vp9Error> {
        let [
            profile,
            level,
            depth_chroma,
            _primaries,
            _transfer,
            _matrix,
            s0,
            s1,
            rest @ ..,
        ] = record(vpcc)
        else {
            return Err(Vp9Error::Config("shorter than its 8-byte record".into()));
        };
        let init = usize::from(u16::from_be_bytes([*s0, *s1]));
        if rest.len() < init {
            return Err(Vp9Error::Config(
                "its initialization data runs past the end".into(),
            ));
        }
        if *profile > 3 {
            return Err(Vp9Error::Config(format!(
                "profile {profile} (0 to 3 exist)"
            )));
        }
        let bit_depth = depth_chroma >> 4;
        if !matches!(bit_depth, 8 | 10 | 12) {
            return Err(Vp9Error::Config(format!(
                "bit depth {bit_depth} (8, 10 or 12)"
            )));
        }
        Ok(Vp9Info {
            codec: format!("vp09.{profile:02}.{level:02}.{bit_depth:02}"),
            profile: *profile,
            level: *level,
            bit_depth,
        })
    }
}

/// The record itself, without the FullBox version and flags an MP4 vpcC box has in front.
pub fn record(vpcc: &[u8]) -> &[u8] {
    match vpcc {
        [1, 0, 0, 0, rest @ ..] => rest,
        _ => vpcc,
    }
}

/// The picture size a keyframe (or the first frame of a superframe) states, when it is one.
pub fn keyframe_size(frame: &[u8]) -> Option<(u32, u32)> {
    let mut r = Bits { data: frame, at: 0 };
    if r.read(2)? != 2 {
        return None; // frame_marker
    }
    let low = r.read(1)?;
    let profile = (r.read(1)? << 1) | low;
    if profile == 3 {
        r.read(1)?; // reserved_zero
    }
    if r.read(1)? == 1 {
        return None; // show_existing_frame: no header of its own
    }
    if r.read(1)? != 0 {
        return None; // frame_type: not a keyframe
    }
    r.read(2)?; // show_frame, error_resilient_mode
    if r.read(24)? != 0x49_83_42 {
        return None; // frame_sync_code
    }
    // color_config
    if profile >= 2 {
        r.read(1)?; // ten_or_twelve_bit
    }
    let color_space = r.read(3)?;
    if color_space != 7 {
        r.read(1)?; // color_range
        if profile == 1 || profile == 3 {
            r.read(3)?; // subsampling_x, subsampling_y, reserved_zero
        }
    } else if profile == 1 || profile == 3 {
        r.read(1)?; // reserved_zero
    }
    let width = r.read(16)? + 1;
    let height = r.read(16)? + 1;
    Some((width, height))
}

/// MSB-first bit reader; `None` past the end.
struct Bits<'a> {
    data: &'a [u8],
    at: usize,
}

impl Bits<'_> {
    fn read(&mut self, n: u32) -> Option<u32> {
        let mut v = 0u32;
        for _ in 0..n {
            let byte = *self.data.get(self.at / 8)?;
            v = (v << 1) | u32::from((byte >> (7 - self.at % 8)) & 1);
            self.at += 1;
        }
        Some(v)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// From the vpcC box of an MP4 Debian's ffmpeg (libvpx-vp9) wrote of `testsrc2` 640x360:
    /// version 1 and flags, then profile 0, level 2.1, 8 bit 4:2:0, BT.709.
    pub(crate) const VPCC_BOX: &[u8] = &[
        0x01, 0x00, 0x00, 0x00, 0x00, 0x15, 0x82, 0x02, 0x02, 0x02, 0x00, 0x00,
    ];

    #[test]
    fn a_real_vpcc_gives_its_codec_string_with_or_without_the_box_header() {
        for vpcc in [VPCC_BOX, &VPCC_BOX[4..]] {
            let info = Vp9Info::parse(vpcc).unwrap();
            assert_eq!(info.codec, "vp09.00.21.08");
        }
    }

    /// The first bytes of a keyframe Debian's ffmpeg (libvpx-vp9) made of `testsrc2` 640x360.
    const KEYFRAME: &[u8] = &[
        0x82, 0x49, 0x83, 0x42, 0x00, 0x27, 0xf0, 0x16, 0x76, 0x04, 0x38, 0x24,
    ];

    #[test]
    fn a_keyframe_states_its_size_and_a_truncated_one_nothing() {
        assert_eq!(keyframe_size(KEYFRAME), Some((640, 360)));
        for n in 0..9 {
            assert_eq!(keyframe_size(&KEYFRAME[..n]), None, "cut at {n}");
        }
        let mut inter = KEYFRAME.to_vec();
        inter[0] |= 0x04; // frame_type 1
        assert_eq!(keyframe_size(&inter), None);
        assert_eq!(record(VPCC_BOX), &VPCC_BOX[4..]);
        assert_eq!(record(&VPCC_BOX[4..]), &VPCC_BOX[4..]);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for n in 0..VPCC_BOX.len() {
            assert!(Vp9Info::parse(&VPCC_BOX[..n]).is_err(), "cut at {n}");
        }
    }

    #[test]
    fn impossible_values_are_refused() {
        let mut ten_bit = VPCC_BOX[4..].to_vec();
        ten_bit[0] = 2;
        ten_bit[2] = 0xa2;
        assert_eq!(Vp9Info::parse(&ten_bit).unwrap().codec, "vp09.02.21.10");
        let mut bad_depth = ten_bit.clone();
        bad_depth[2] = 0x92;
        assert!(Vp9Info::parse(&bad_depth).is_err());
        let mut bad_profile = ten_bit;
        bad_profile[0] = 4;
        assert!(Vp9Info::parse(&bad_profile).is_err());
    }
}

//! AV1: the `AV1CodecConfigurationRecord` (av1C, AV1-ISOBMFF 2.3), the picture size and frame
//! rate from the sequence header OBU it carries, and the codec string (`av01.0.08M.08`).
//!
//! By hand: no crate in the field parses av1C without pulling in a decoder; the sequence
//! header's fields up to the frame size are a few dozen bits.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Av1Error {
    #[error("av1C: {0}")]
    Config(String),
    #[error("av1C carries no sequence header OBU")]
    NoSequenceHeader,
    #[error("sequence header: {0}")]
    SequenceHeader(String),
    #[error("picture size {width}x{height} is out of range")]
    Dimensions { width: u32, height: u32 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Av1Info {
    /// Codec string (AV1-ISOBMFF "Codecs Parameter String"), e.g. `av01.0.08M.08`.
    pub codec: String,
    pub width: u32,
    pub height: u32,
    /// From the sequence header's timing info, when present.
    pub fps: Option<f64>,
}

const OBU_SEQUENCE_HEADER: u8 = 1;

impl Av1Info {
    pub fn parse(av1c: &[u8]) -> Result<Self, Av1Error> {
        let [marker, b1, b2, _b3, obus @ ..] = av1c else {
            return Err(Av1Error::Config("shorter than its 4-byte header".into()));
        };
        if *marker != 0x81 {
            return Err(Av1Error::Config(format!(
                "marker and version {marker:#04x} (only 0x81 exists)"
            )));
        }
        let profile = b1 >> 5;
        let level = b1 & 0x1f;
        let high_tier = b2 & 0x80 != 0;
        let high_bitdepth = b2 & 0x40 != 0;
        let twelve_bit = b2 & 0x20 != 0;
        let depth = match (high_bitdepth, twelve_bit) {
            (true, true) => 12,
            (true, false) => 10,
            _ => 8,
        };
        let codec = format!(
            "av01.{profile}.{level:02}{}.{depth:02}",
            if high_tier { 'H' } else { 'M' }
        );
        let header = sequence_header(obus)?.ok_or(Av1Error::NoSequenceHeader)?;
        let (width, height, fps) = parse_sequence_header(header)?;
        Ok(Av1Info {
            codec,
            width,
            height,
            fps,
        })
    }
}

/// The payload of the first sequence header OBU among `obus` (each with its size field).
fn sequence_header(mut obus: &[u8]) -> Result<Option<&[u8]>, Av1Error> {
    let bad = |what: &str| Av1Error::Config(what.to_string());
    while let [header, rest @ ..] = obus {
        let kind = (header >> 3) & 0x0f;
        let extension = header & 0x04 != 0;
        if header & 0x02 == 0 {
            return Err(bad("a config OBU without its size field"));
        }
        let rest = if extension {
            rest.get(1..)
                .ok_or_else(|| bad("an OBU extension runs past the end"))?
        } else {
            rest
        };
        let (size, rest) = leb128(rest).ok_or_else(|| bad("an OBU size runs past the end"))?;
        let size = usize::try_from(size).map_err(|_| bad("an OBU size is too large"))?;
        let payload = rest
            .get(..size)
            .ok_or_else(|| bad("an OBU runs past the end"))?;
        if kind == OBU_SEQUENCE_HEADER {
            return Ok(Some(payload));
        }
        obus = &rest[size..];
    }
    Ok(None)
}

/// A leb128 value of at most 8 bytes (AV1 4.10.5) and what follows it.
fn leb128(b: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, byte) in b.iter().take(8).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, &b[i + 1..]));
        }
    }
    None
}

/// Big-endian bits of a byte slice (AV1 has no emulation prevention).
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bits<'_> {
    fn f(&mut self, n: u32) -> Result<u64, Av1Error> {
        let mut v = 0u64;
        for _ in 0..n {
            let byte = self
                .data
                .get(self.pos / 8)
                .ok_or_else(|| Av1Error::SequenceHeader("ends early".into()))?;
            v = (v << 1) | u64::from((byte >> (7 - self.pos % 8)) & 1);
            self.pos += 1;
        }
        Ok(v)
    }

    fn flag(&mut self) -> Result<bool, Av1Error> {
        Ok(self.f(1)? == 1)
    }

    /// `uvlc()` (AV1 4.10.3).
    fn uvlc(&mut self) -> Result<u64, Av1Error> {
        let mut zeros = 0;
        while !self.flag()? {
            zeros += 1;
            if zeros >= 32 {
                return Ok(u64::from(u32::MAX));
            }
        }
        Ok(self.f(zeros)? + (1u64 << zeros) - 1)
    }
}

/// Frame size and rate from a sequence header OBU's payload (AV1 5.5.1), read up to
/// `max_frame_height_minus_1`.
fn parse_sequence_header(payload: &[u8]) -> Result<(u32, u32, Option<f64>), Av1Error> {
    let mut r = Bits {
        data: payload,
        pos: 0,
    };
    let _seq_profile = r.f(3)?;
    let _still_picture = r.flag()?;
    let reduced = r.flag()?;
    let mut fps = None;
    if reduced {
        r.f(5)?; // seq_level_idx[0]
    } else {
        let timing_info_present = r.flag()?;
        let mut decoder_model_info_present = false;
        let mut buffer_delay_length = 0;
        if timing_info_present {
            let num_units_in_display_tick = r.f(32)?;
            let time_scale = r.f(32)?;
            let equal_picture_interval = r.flag()?;
            let mut ticks_per_picture = 1;
            if equal_picture_interval {
                ticks_per_picture = r.uvlc()? + 1;
            }
            if num_units_in_display_tick > 0 && time_scale > 0 {
                fps = Some(
                    time_scale as f64
                        / (num_units_in_display_tick as f64 * ticks_per_picture as f64),
                );
            }
            decoder_model_info_present = r.flag()?;
            if decoder_model_info_present {
                buffer_delay_length = r.f(5)? as u32 + 1;
                r.f(32)?; // num_units_in_decoding_tick
                r.f(5)?; // buffer_removal_time_length_minus_1
                r.f(5)?; // frame_presentation_time_length_minus_1
            }
        }
        let initial_display_delay_present = r.flag()?;
        let operating_points = r.f(5)? + 1;
        for _ in 0..operating_points {
            r.f(12)?; // operating_point_idc
            let level = r.f(5)?;
            if level > 7 {
                r.f(1)?; // seq_tier
            }
            if decoder_model_info_present && r.flag()? {
                r.f(buffer_delay_length)?; // decoder_buffer_delay
                r.f(buffer_delay_length)?; // encoder_buffer_delay
                r.f(1)?; // low_delay_mode_flag
            }
            if initial_display_delay_present && r.flag()? {
                r.f(4)?; // initial_display_delay_minus_1
            }
        }
    }
    let width_bits = r.f(4)? as u32 + 1;
    let height_bits = r.f(4)? as u32 + 1;
    let width = r.f(width_bits)? + 1;
    let height = r.f(height_bits)? + 1;
    let (width, height) = (width as u32, height as u32);
    // AV1's largest level (6.3) has 16384 x 8704.
    if width > 16384 || height > 16384 {
        return Err(Av1Error::Dimensions { width, height });
    }
    Ok((width, height, fps.filter(|f| f.is_finite() && *f > 0.0)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// From the av1C of MP4s Debian's ffmpeg wrote of `testsrc2` 640x360 at 30 fps: libaom
    /// (`-cpu-used 8`) and SVT-AV1 (`-preset 12`).
    const AV1C_AOM: &[u8] = &[
        0x81, 0x01, 0x0c, 0x00, 0x0a, 0x0b, 0x00, 0x00, 0x00, 0x0c, 0xc4, 0xff, 0x67, 0x36, 0xbe,
        0x40, 0x10,
    ];
    pub(crate) const AV1C_SVT: &[u8] = &[
        0x81, 0x01, 0x0c, 0x00, 0x0a, 0x0b, 0x00, 0x00, 0x00, 0x0c, 0xc4, 0xff, 0x67, 0x00, 0xbe,
        0x00, 0x10,
    ];

    #[test]
    fn real_av1c_records_give_their_codec_string_and_size() {
        for av1c in [AV1C_AOM, AV1C_SVT] {
            let info = Av1Info::parse(av1c).unwrap();
            assert_eq!(info.codec, "av01.0.01M.08");
            assert_eq!((info.width, info.height), (640, 360));
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for n in 0..AV1C_AOM.len() {
            assert!(Av1Info::parse(&AV1C_AOM[..n]).is_err(), "cut at {n}");
        }
    }

    #[test]
    fn tier_and_depth_are_in_the_codec_string() {
        let mut high = AV1C_AOM.to_vec();
        high[1] = (2 << 5) | 13; // profile 2, level 5.1
        high[2] = 0x80 | 0x40 | 0x20; // high tier, 12 bit
        assert_eq!(Av1Info::parse(&high).unwrap().codec, "av01.2.13H.12");
    }

    #[test]
    fn a_record_without_a_sequence_header_says_so() {
        assert_eq!(
            Av1Info::parse(&AV1C_AOM[..4]),
            Err(Av1Error::NoSequenceHeader)
        );
    }

    #[test]
    fn leb128_reads_what_it_can_and_stops() {
        assert_eq!(leb128(&[0x0b, 9]), Some((11, &[9u8][..])));
        assert_eq!(leb128(&[0x80, 0x01]), Some((128, &[][..])));
        assert_eq!(leb128(&[0x80; 9]), None);
    }
}

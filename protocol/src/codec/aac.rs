//! AAC: the `AudioSpecificConfig` (ISO/IEC 14496-3 1.6.2.1) and ADTS headers.
//!
//! Parsed by hand: it is a handful of bit fields, and no crate in our dependency set reads it.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AacError {
    #[error("AudioSpecificConfig is {0} bytes, needs at least 2")]
    Truncated(usize),
    #[error("audio object type {0} is not AAC-LC, HE-AAC or HE-AACv2")]
    UnsupportedObjectType(u8),
    #[error("invalid sampling frequency index {0}")]
    SamplingFrequency(u8),
    #[error("channel configuration {0} is not supported")]
    Channels(u8),
    #[error("AAC frame of {0} bytes does not fit an ADTS header")]
    FrameTooLong(usize),
}

const SAMPLE_RATES: [u32; 13] = [
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioSpecificConfig {
    pub audio_object_type: u8,
    pub sampling_frequency_index: u8,
    pub sampling_frequency: u32,
    pub channel_configuration: u8,
}

impl AudioSpecificConfig {
    pub fn parse(b: &[u8]) -> Result<Self, AacError> {
        if b.len() < 2 {
            return Err(AacError::Truncated(b.len()));
        }
        let audio_object_type = b[0] >> 3;
        // 1 AAC Main, 2 AAC-LC, 3 SSR, 4 LTP, 5 SBR (HE-AAC), 29 PS (HE-AACv2). 31 is the escape
        // for extended types, which no browser decodes.
        if !matches!(audio_object_type, 1..=5 | 29) {
            return Err(AacError::UnsupportedObjectType(audio_object_type));
        }
        let sampling_frequency_index = ((b[0] & 0x07) << 1) | (b[1] >> 7);
        let (sampling_frequency, channel_configuration) =
            match SAMPLE_RATES.get(sampling_frequency_index as usize) {
                Some(&f) => (f, (b[1] >> 3) & 0x0f),
                // 15: an explicit 24-bit frequency follows, then the channel configuration.
                None if sampling_frequency_index == 15 => {
                    if b.len() < 5 {
                        return Err(AacError::Truncated(b.len()));
                    }
                    let f = (u32::from(b[1] & 0x7f) << 17)
                        | (u32::from(b[2]) << 9)
                        | (u32::from(b[3]) << 1)
                        | u32::from(b[4] >> 7);
                    (f, (b[4] >> 3) & 0x0f)
                }
                None => return Err(AacError::SamplingFrequency(sampling_frequency_index)),
            };
        if channel_configuration == 0 || channel_configuration > 7 {
            // 0 means a program config element, which MSE decoders do not support.
            return Err(AacError::Channels(channel_configuration));
        }
        Ok(Self {
            audio_object_type,
            sampling_frequency_index,
            sampling_frequency,
            channel_configuration,
        })
    }

    /// RFC 6381 codec string.
    pub fn codec(&self) -> String {
        format!("mp4a.40.{}", self.audio_object_type)
    }

    pub fn channels(&self) -> u8 {
        match self.channel_configuration {
            7 => 8,
            c => c,
        }
    }

    /// The 7-byte ADTS header (no CRC) for one raw AAC frame of `payload_len` bytes.
    pub fn adts_header(&self, payload_len: usize) -> Result<[u8; 7], AacError> {
        // Saturating: a length near usize::MAX is too long, not an overflow (fuzz/aac).
        let frame_len = payload_len.saturating_add(7);
        if frame_len > 0x1fff || self.sampling_frequency_index > 12 {
            return Err(AacError::FrameTooLong(payload_len));
        }
        // ADTS has two bits for the profile, object type - 1, so only types 1..=4 fit.
        // HE-AAC (5) and HE-AACv2 (29) are signalled as AAC-LC with implicit SBR, as encoders do.
        let profile = match self.audio_object_type {
            t @ 1..=4 => t - 1,
            _ => 1,
        };
        let ch = self.channel_configuration;
        Ok([
            0xff,
            0xf1,
            (profile << 6) | (self.sampling_frequency_index << 2) | (ch >> 2),
            ((ch & 3) << 6) | ((frame_len >> 11) as u8),
            (frame_len >> 3) as u8,
            (((frame_len & 7) as u8) << 5) | 0x1f,
            0xfc,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lc_44100_stereo() {
        let asc = AudioSpecificConfig::parse(&[0x12, 0x10]).unwrap();
        assert_eq!(asc.audio_object_type, 2);
        assert_eq!(asc.sampling_frequency, 44100);
        assert_eq!(asc.channels(), 2);
        assert_eq!(asc.codec(), "mp4a.40.2");
        let h = asc.adts_header(100).unwrap();
        assert_eq!(h[0..2], [0xff, 0xf1]);
        let len = ((h[3] as usize & 3) << 11) | ((h[4] as usize) << 3) | (h[5] as usize >> 5);
        assert_eq!(len, 107);
    }

    #[test]
    fn errors() {
        assert_eq!(
            AudioSpecificConfig::parse(&[0x12]),
            Err(AacError::Truncated(1))
        );
        assert_eq!(
            AudioSpecificConfig::parse(&[0xf8, 0x10]),
            Err(AacError::UnsupportedObjectType(31))
        );
        assert_eq!(
            AudioSpecificConfig::parse(&[0x16, 0x90]),
            Err(AacError::SamplingFrequency(13))
        );
        assert_eq!(
            AudioSpecificConfig::parse(&[0x12, 0x00]),
            Err(AacError::Channels(0))
        );
        assert!(AudioSpecificConfig::parse(&[0x17, 0x80, 0, 0]).is_err());
    }

    #[test]
    fn explicit_frequency_and_he_aac() {
        // AAC-LC, index 15, 44100 Hz explicit, stereo: 00010 1111 <24-bit 44100> 0010 ...
        let bits: u64 = (2u64 << 35) | (15 << 31) | (44100 << 7) | (2 << 3);
        let b = bits.to_be_bytes();
        let asc = AudioSpecificConfig::parse(&b[3..8]).unwrap();
        assert_eq!(asc.sampling_frequency, 44100);
        assert_eq!(asc.channel_configuration, 2);
        let he = AudioSpecificConfig::parse(&[0x2b, 0x10]).unwrap(); // object type 5
        assert_eq!(he.audio_object_type, 5);
        assert_eq!(
            he.adts_header(10).unwrap()[2] >> 6,
            1,
            "signalled as AAC-LC"
        );
    }

    /// Found by fuzz/aac: the frame length overflowed.
    #[test]
    fn a_payload_length_near_the_maximum_is_too_long_not_an_overflow() {
        let asc = AudioSpecificConfig::parse(&[0x12, 0x10]).unwrap();
        assert_eq!(
            asc.adts_header(usize::MAX),
            Err(AacError::FrameTooLong(usize::MAX))
        );
    }
}

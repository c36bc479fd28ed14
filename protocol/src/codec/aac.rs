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
        let channel_configuration = (b[1] >> 3) & 0x0f;
        let sampling_frequency = match SAMPLE_RATES.get(sampling_frequency_index as usize) {
            Some(&f) => f,
            // 15 means an explicit 24-bit frequency follows.
            None if sampling_frequency_index == 15 => {
                if b.len() < 5 {
                    return Err(AacError::Truncated(b.len()));
                }
                let v = u32::from_be_bytes([0, b[1], b[2], b[3]]) << 1 | (b[4] as u32 >> 7);
                v & 0x00ff_ffff
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
        let frame_len = payload_len + 7;
        if frame_len > 0x1fff || self.sampling_frequency_index > 12 {
            return Err(AacError::FrameTooLong(payload_len));
        }
        // ADTS has two bits for the profile: object type - 1, so only types 1..=4 fit.
        // HE-AAC streams are signalled as AAC-LC with implicit SBR, as encoders do.
        let profile = self.audio_object_type.min(4) - 1;
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
}

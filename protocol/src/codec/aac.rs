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
    #[error("no ADTS syncword (0xFFF, layer 0) at the start of the frame")]
    AdtsSync,
    #[error("ADTS frame needs {needed} bytes, {available} are left")]
    AdtsTruncated { needed: usize, available: usize },
    #[error("ADTS aac_frame_length {0} is shorter than its header")]
    AdtsFrameLength(usize),
    #[error("ADTS frame with a CRC and {0} raw data blocks is not supported")]
    AdtsCrcBlocks(u8),
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

    /// The AudioSpecificConfig bytes [`Self::parse`] reads: object type, frequency index (and
    /// the 24-bit frequency after index 15), channel configuration, and a GASpecificConfig of
    /// zeros (1024-sample frames, no core coder, no extension). For object types 5 and 29 the
    /// SBR extension fields are not written, as `parse` does not read them.
    pub fn to_bytes(&self) -> Vec<u8> {
        if usize::from(self.sampling_frequency_index) < SAMPLE_RATES.len() {
            return self.two_bytes().to_vec();
        }
        // 5 + 4 + 24 + 4 + 3 bits in the low 40 bits of a u64.
        let aot = u64::from(self.audio_object_type & 0x1f);
        let f = u64::from(self.sampling_frequency & 0x00ff_ffff);
        let ch = u64::from(self.channel_configuration & 0x0f);
        let bits = (aot << 35) | (15 << 31) | (f << 7) | (ch << 3);
        let [_, _, _, five @ ..] = bits.to_be_bytes();
        five.to_vec()
    }

    /// The two-byte form, for a frequency index from the table (0..=12).
    fn two_bytes(&self) -> [u8; 2] {
        let aot = self.audio_object_type & 0x1f;
        let sfi = self.sampling_frequency_index & 0x0f;
        let ch = self.channel_configuration & 0x0f;
        [(aot << 3) | (sfi >> 1), ((sfi & 1) << 7) | (ch << 3)]
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

/// Length of the ADTS fixed and variable header without the CRC.
pub const ADTS_HEADER: usize = 7;
/// The CRC after the header when `protection_absent` is 0.
const ADTS_CRC: usize = 2;

/// One ADTS frame header (ISO/IEC 13818-7 6.2), fields as the spec names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdtsHeader {
    /// What the header's profile, sampling_frequency_index and channel_configuration say, as
    /// an AudioSpecificConfig (object type = profile + 1).
    pub config: AudioSpecificConfig,
    /// `ID`: false for MPEG-4, true for MPEG-2 AAC.
    pub mpeg2: bool,
    pub protection_absent: bool,
    /// The whole frame: header, CRC and raw data.
    pub aac_frame_length: usize,
    pub adts_buffer_fullness: u16,
    /// The number of raw data blocks in the frame minus one, as coded (1024 samples each).
    pub number_of_raw_data_blocks_in_frame: u8,
}

impl AdtsHeader {
    /// Reads the header at the start of `b`; `b` need not hold the rest of the frame.
    pub fn parse(b: &[u8]) -> Result<Self, AacError> {
        // syncword 0xFFF, then ID, then layer (always 00): judged on what bytes there are.
        let synced = match b {
            [] | [0xff] => true,
            [0xff, b1, ..] => b1 & 0xf6 == 0xf0,
            _ => false,
        };
        if !synced {
            return Err(AacError::AdtsSync);
        }
        let Some(h) = b.first_chunk::<ADTS_HEADER>() else {
            return Err(AacError::AdtsTruncated {
                needed: ADTS_HEADER,
                available: b.len(),
            });
        };
        let mpeg2 = h[1] & 0x08 != 0;
        let protection_absent = h[1] & 0x01 != 0;
        let profile = h[2] >> 6;
        let sampling_frequency_index = (h[2] >> 2) & 0x0f;
        let channel_configuration = ((h[2] & 0x01) << 2) | (h[3] >> 6);
        let aac_frame_length =
            (usize::from(h[3] & 0x03) << 11) | (usize::from(h[4]) << 3) | usize::from(h[5] >> 5);
        let adts_buffer_fullness = (u16::from(h[5] & 0x1f) << 6) | u16::from(h[6] >> 2);
        let number_of_raw_data_blocks_in_frame = h[6] & 0x03;
        let sampling_frequency = *SAMPLE_RATES
            .get(usize::from(sampling_frequency_index))
            .ok_or(AacError::SamplingFrequency(sampling_frequency_index))?;
        if channel_configuration == 0 {
            // The channels are then in a program_config_element inside the raw data.
            return Err(AacError::Channels(0));
        }
        let header = Self {
            config: AudioSpecificConfig {
                audio_object_type: profile + 1,
                sampling_frequency_index,
                sampling_frequency,
                channel_configuration,
            },
            mpeg2,
            protection_absent,
            aac_frame_length,
            adts_buffer_fullness,
            number_of_raw_data_blocks_in_frame,
        };
        if aac_frame_length < header.header_length() {
            return Err(AacError::AdtsFrameLength(aac_frame_length));
        }
        if !protection_absent && number_of_raw_data_blocks_in_frame > 0 {
            // Then raw_data_block_position fields and a CRC per block are interleaved with the
            // data; no encoder we take from writes that.
            return Err(AacError::AdtsCrcBlocks(
                number_of_raw_data_blocks_in_frame + 1,
            ));
        }
        Ok(header)
    }

    /// Header bytes before the raw data: 7, or 9 with the CRC.
    pub fn header_length(&self) -> usize {
        if self.protection_absent {
            ADTS_HEADER
        } else {
            ADTS_HEADER + ADTS_CRC
        }
    }

    /// The two-byte AudioSpecificConfig for this frame (an ADTS frequency index is always in
    /// the table, so two bytes suffice).
    pub fn audio_specific_config(&self) -> [u8; 2] {
        self.config.two_bytes()
    }

    pub fn sample_rate(&self) -> u32 {
        self.config.sampling_frequency
    }

    /// Samples per channel in the frame: 1024 per raw data block.
    pub fn samples(&self) -> u32 {
        1024 * (u32::from(self.number_of_raw_data_blocks_in_frame) + 1)
    }
}

/// The ADTS frames of `data` (a PES payload, say), each as its header and raw AAC data (the CRC,
/// if any, skipped). The frames must follow one another with nothing between them: the first
/// error ends the iteration.
pub fn split_adts(data: &[u8]) -> AdtsFrames<'_> {
    AdtsFrames { rest: data }
}

/// The iterator [`split_adts`] returns.
#[derive(Debug, Clone)]
pub struct AdtsFrames<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for AdtsFrames<'a> {
    type Item = Result<(AdtsHeader, &'a [u8]), AacError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let frame = AdtsHeader::parse(self.rest).and_then(|h| {
            let frame = self
                .rest
                .get(..h.aac_frame_length)
                .ok_or(AacError::AdtsTruncated {
                    needed: h.aac_frame_length,
                    available: self.rest.len(),
                })?;
            let raw = frame.get(h.header_length()..).unwrap_or_default();
            Ok((h, raw, h.aac_frame_length))
        });
        match frame {
            Ok((h, raw, len)) => {
                self.rest = self.rest.get(len..).unwrap_or_default();
                Some(Ok((h, raw)))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

impl std::iter::FusedIterator for AdtsFrames<'_> {}

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

    const MONO_48K: &[u8] = include_bytes!("../../tests/data/ffmpeg-sine-48k-mono.adts");
    const STEREO_44K1: &[u8] = include_bytes!("../../tests/data/ffmpeg-sine-44k1-stereo.adts");

    /// `ffmpeg -f lavfi -i sine=frequency=440:sample_rate=48000 -t 0.07 -c:a aac -b:a 32k -ac 1
    /// -f adts`; ffprobe gives the frame sizes.
    #[test]
    fn ffmpeg_adts_splits_into_its_frames() {
        let frames: Vec<_> = split_adts(MONO_48K).map(Result::unwrap).collect();
        let sizes: Vec<usize> = frames.iter().map(|(h, _)| h.aac_frame_length).collect();
        assert_eq!(sizes, [149, 166, 132, 101, 12]);
        for (h, raw) in &frames {
            assert_eq!(raw.len(), h.aac_frame_length - 7);
            assert!(h.protection_absent && !h.mpeg2);
            assert_eq!(h.sample_rate(), 48000);
            assert_eq!(h.samples(), 1024);
            assert_eq!(h.config.audio_object_type, 2);
            assert_eq!(h.config.channels(), 1);
            // What ffmpeg writes as the FLV/MP4 AudioSpecificConfig for AAC-LC 48 kHz mono.
            assert_eq!(h.audio_specific_config(), [0x11, 0x88]);
            assert_eq!(
                AudioSpecificConfig::parse(&h.audio_specific_config()),
                Ok(h.config)
            );
        }
        // The first raw frame starts where the header ends: ffmpeg's fill element with its
        // encoder name.
        assert_eq!(frames[0].1, &MONO_48K[7..149]);

        let frames: Vec<_> = split_adts(STEREO_44K1).map(Result::unwrap).collect();
        let sizes: Vec<usize> = frames.iter().map(|(h, _)| h.aac_frame_length).collect();
        assert_eq!(sizes, [140, 237, 157, 14]);
        assert_eq!(frames[0].0.audio_specific_config(), [0x12, 0x10]);
        assert_eq!(frames[0].0.config.channels(), 2);
        assert_eq!(frames[0].0.sample_rate(), 44100);
    }

    #[test]
    fn a_crc_is_skipped() {
        let first = &MONO_48K[..149];
        // The same frame with protection_absent = 0 and a (not checked) CRC after the header.
        let mut f = first[..7].to_vec();
        f[1] &= !1;
        let len = 149 + 2;
        f[3] = (f[3] & !3) | (len >> 11) as u8;
        f[4] = (len >> 3) as u8;
        f[5] = (f[5] & 0x1f) | (((len & 7) as u8) << 5);
        f.extend_from_slice(&[0xab, 0xcd]);
        f.extend_from_slice(&first[7..]);
        let mut frames = split_adts(&f);
        let (h, raw) = frames.next().unwrap().unwrap();
        assert!(!h.protection_absent);
        assert_eq!(h.header_length(), 9);
        assert_eq!(raw, &first[7..]);
        assert!(frames.next().is_none());
    }

    #[test]
    fn truncations_and_bad_headers_are_errors() {
        for cut in 1..MONO_48K.len() {
            let all: Vec<_> = split_adts(&MONO_48K[..cut]).collect();
            let (last, whole) = all.split_last().unwrap();
            assert!(whole.iter().all(Result::is_ok));
            // Whole frames, then the cut one as an error; or only whole frames when the cut
            // falls between two.
            if let Err(e) = last {
                assert!(matches!(e, AacError::AdtsTruncated { .. }), "{e}");
            } else {
                assert!([149, 315, 447, 548].contains(&cut), "cut {cut}");
            }
        }
        assert_eq!(split_adts(&[]).count(), 0);
        assert_eq!(
            AdtsHeader::parse(&[0xff, 0xf1, 0x4c]),
            Err(AacError::AdtsTruncated {
                needed: 7,
                available: 3
            })
        );
        assert_eq!(AdtsHeader::parse(&[0x00, 0xf1]), Err(AacError::AdtsSync));
        // Layer 1 is not ADTS.
        assert_eq!(
            AdtsHeader::parse(&[0xff, 0xf3, 0x4c, 0x40, 0x12, 0xbf, 0xfc]),
            Err(AacError::AdtsSync)
        );
        let header = |b2: u8, b3: u8, len: usize, b6: u8| {
            [
                0xff,
                0xf1,
                b2,
                (b3 & 0xc0) | (len >> 11) as u8,
                (len >> 3) as u8,
                (((len & 7) as u8) << 5) | 0x1f,
                b6,
            ]
        };
        // Frequency index 13, channel configuration 0, a length shorter than the header.
        assert_eq!(
            AdtsHeader::parse(&header((0x4c & !0x3c) | (13 << 2), 0x40, 20, 0xfc)),
            Err(AacError::SamplingFrequency(13))
        );
        assert_eq!(
            AdtsHeader::parse(&header(0x4c, 0x00, 20, 0xfc)),
            Err(AacError::Channels(0))
        );
        assert_eq!(
            AdtsHeader::parse(&header(0x4c, 0x40, 6, 0xfc)),
            Err(AacError::AdtsFrameLength(6))
        );
        // After an error the iterator is done, even if frames follow.
        let mut bad = vec![0u8; 3];
        bad.extend_from_slice(MONO_48K);
        let mut frames = split_adts(&bad);
        assert_eq!(frames.next(), Some(Err(AacError::AdtsSync)));
        assert_eq!(frames.next(), None);
    }

    #[test]
    fn to_bytes_round_trips() {
        for b in [
            [0x12u8, 0x10],
            [0x11, 0x88],
            [0x13, 0x90],
            [0x2b, 0x10],
            [0x0a, 0x10],
        ] {
            let asc = AudioSpecificConfig::parse(&b).unwrap();
            assert_eq!(asc.to_bytes(), b, "{asc:?}");
        }
        let bits: u64 = (2u64 << 35) | (15 << 31) | (44100 << 7) | (2 << 3);
        let b = &bits.to_be_bytes()[3..8];
        let asc = AudioSpecificConfig::parse(b).unwrap();
        assert_eq!(asc.to_bytes(), b);
        assert_eq!(AudioSpecificConfig::parse(&asc.to_bytes()), Ok(asc));
    }
}

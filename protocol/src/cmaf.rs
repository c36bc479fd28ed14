//! CMAF (fragmented MP4) read back: what an encoder pushes over HTTP, ffmpeg's dash muxer with
//! `-streaming 1 -ldash 1` first. An init segment per representation says what its tracks
//! carry; media segments follow as `styp`, then `moof` + `mdat` pairs (one frame each from
//! ffmpeg in streaming mode), in chunks whose boundaries are not box boundaries.
//!
//! - [`BoxSplitter`] cuts a byte stream in any chunking into whole top-level boxes, each at most
//!   a bound in size (so a peer's memory is bounded by it).
//! - [`Init::parse`] reads an init segment: per track its id, timescale, the codec and its
//!   configuration record (avcC, hvcC, av1C, vpcC; the AudioSpecificConfig for AAC) and the
//!   `trex` sample defaults.
//! - [`Fragments`] pairs each `moof` with the `mdat` after it and yields the samples: track, decode
//!   time, composition offset (in the track's timescale), sync flag and the bytes, shared with the
//!   `mdat` (no copy).
//!
//! The boxes themselves are decoded by mp4-atom, which is written for untrusted input (it never
//! allocates from a count it has not read the bytes for); what is here is the streaming around
//! it and the sample table walk, with every offset checked.

use bytes::{Bytes, BytesMut};
use mp4_atom::{Atom, Decode, Encode};

use crate::codec::VideoCodec;

/// Largest top-level box taken: an `mdat` of one 4K keyframe at a high bitrate fits, and a whole
/// two-second segment of 1080p (if an encoder sends segments as one fragment) too.
pub const MAX_BOX: usize = 16 << 20;
/// Most samples one `moof` may describe (ffmpeg's streaming mode sends one).
pub const MAX_SAMPLES: usize = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmafError {
    #[error("box {kind:?} of {size} bytes is larger than the {max} taken")]
    BoxTooLarge { kind: String, size: u64, max: usize },
    #[error("bad box header: size {0}")]
    BadBoxSize(u64),
    #[error("box that runs to the end of the stream (size 0) cannot be streamed")]
    OpenEnded,
    #[error("bad {box_name} box: {reason}")]
    Decode {
        box_name: &'static str,
        reason: String,
    },
    #[error("no moov in the init segment")]
    NoMoov,
    #[error("the init segment has no video or AAC track")]
    NoTracks,
    #[error("track {0}: AAC without an AudioSpecificConfig")]
    NoAudioConfig(u32),
    #[error("track {0}: timescale 0")]
    Timescale(u32),
    #[error("{0} samples in one moof (at most {MAX_SAMPLES})")]
    TooManySamples(usize),
    #[error("track {0}: sample data outside its mdat")]
    SampleOutside(u32),
    #[error("track {0}: base_data_offset (absolute file offsets) cannot be streamed")]
    AbsoluteOffset(u32),
    #[error("mdat without a moof before it")]
    MdatWithoutMoof,
}

fn decode_err(box_name: &'static str, e: mp4_atom::Error) -> CmafError {
    CmafError::Decode {
        box_name,
        reason: e.to_string(),
    }
}

/// A box's four-character type.
pub type Kind = [u8; 4];

/// Cuts a byte stream into whole top-level boxes.
#[derive(Debug)]
pub struct BoxSplitter {
    buf: BytesMut,
    max: usize,
}

impl Default for BoxSplitter {
    fn default() -> Self {
        Self::new(MAX_BOX)
    }
}

impl BoxSplitter {
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Takes the next bytes, in any chunking.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes held that are not a whole box yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next whole box (its type, and all its bytes with the header), if it is all here.
    /// After an error the stream cannot be followed any further.
    pub fn next_box(&mut self) -> Result<Option<(Kind, Bytes)>, CmafError> {
        if self.buf.len() < 8 {
            return Ok(None);
        }
        let size32 = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let kind: Kind = [self.buf[4], self.buf[5], self.buf[6], self.buf[7]];
        let size = match size32 {
            0 => return Err(CmafError::OpenEnded),
            1 => {
                if self.buf.len() < 16 {
                    return Ok(None);
                }
                let mut large = [0u8; 8];
                large.copy_from_slice(&self.buf[8..16]);
                let size = u64::from_be_bytes(large);
                if size < 16 {
                    return Err(CmafError::BadBoxSize(size));
                }
                size
            }
            s if s < 8 => return Err(CmafError::BadBoxSize(s.into())),
            s => s.into(),
        };
        if size > self.max as u64 {
            return Err(CmafError::BoxTooLarge {
                kind: String::from_utf8_lossy(&kind).into_owned(),
                size,
                max: self.max,
            });
        }
        let size = size as usize; // at most `max`
        if self.buf.len() < size {
            // Nothing reserved ahead for the rest: the size is the peer's word, and memory
            // grows only with bytes that came.
            return Ok(None);
        }
        Ok(Some((kind, self.buf.split_to(size).freeze())))
    }
}

/// What a track of an init segment carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackMedia {
    /// `config` is the codec's configuration record, as Enhanced RTMP carries it.
    Video { codec: VideoCodec, config: Vec<u8> },
    /// `config` is the AudioSpecificConfig.
    Aac { config: Vec<u8> },
}

/// One track of an init segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitTrack {
    pub track_id: u32,
    pub timescale: u32,
    pub media: TrackMedia,
    /// `trex`: duration, size and flags of samples that do not say theirs.
    defaults: (u32, u32, u32),
}

/// An init segment (`ftyp` + `moov`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Init {
    pub tracks: Vec<InitTrack>,
    /// Tracks of other kinds (subtitles, other audio codecs), by their sample entry, left out.
    pub left_out: Vec<String>,
}

/// A configuration record's bytes, as the box mp4-atom re-encodes carries them (after the
/// 8-byte box header).
fn record<A: Atom>(atom: &A) -> Result<Vec<u8>, CmafError> {
    let mut out = Vec::new();
    atom.encode(&mut out)
        .map_err(|e| decode_err("configuration record", e))?;
    Ok(out.split_off(8.min(out.len())))
}

impl Init {
    /// Reads an init segment: its `moov`, whatever precedes it (`ftyp`).
    pub fn parse(segment: &[u8]) -> Result<Init, CmafError> {
        // No box can be larger than the segment.
        let mut splitter = BoxSplitter::new(segment.len());
        splitter.push(segment);
        let moov = loop {
            match splitter.next_box()? {
                Some((kind, b)) if &kind == b"moov" => break b,
                Some(_) => continue,
                None => return Err(CmafError::NoMoov),
            }
        };
        let moov = mp4_atom::Moov::decode(&mut moov.as_ref()).map_err(|e| decode_err("moov", e))?;
        let trex = moov.mvex.as_ref().map(|m| m.trex.as_slice()).unwrap_or(&[]);
        let mut init = Init {
            tracks: Vec::new(),
            left_out: Vec::new(),
        };
        for trak in &moov.trak {
            let track_id = trak.tkhd.track_id;
            let timescale = trak.mdia.mdhd.timescale;
            let Some(codec) = trak.mdia.minf.stbl.stsd.codecs.first() else {
                continue;
            };
            use mp4_atom::Codec as C;
            let media = match codec {
                C::Avc1(c) => TrackMedia::Video {
                    codec: VideoCodec::Avc,
                    config: record(&c.avcc)?,
                },
                C::Avc3(c) => TrackMedia::Video {
                    codec: VideoCodec::Avc,
                    config: record(&c.avcc)?,
                },
                C::Hvc1(c) => TrackMedia::Video {
                    codec: VideoCodec::Hevc,
                    config: record(&c.hvcc)?,
                },
                C::Hev1(c) => TrackMedia::Video {
                    codec: VideoCodec::Hevc,
                    config: record(&c.hvcc)?,
                },
                C::Av01(c) => TrackMedia::Video {
                    codec: VideoCodec::Av1,
                    config: record(&c.av1c)?,
                },
                C::Vp09(c) => TrackMedia::Video {
                    codec: VideoCodec::Vp9,
                    config: record(&c.vpcc)?,
                },
                C::Mp4a(c) => {
                    let config = c
                        .esds
                        .es_desc
                        .dec_config
                        .dec_specific
                        .as_ref()
                        .map(|d| d.raw.clone())
                        .filter(|raw| !raw.is_empty())
                        .ok_or(CmafError::NoAudioConfig(track_id))?;
                    TrackMedia::Aac { config }
                }
                other => {
                    init.left_out
                        .push(format!("{other:?}").chars().take(12).collect());
                    continue;
                }
            };
            if timescale == 0 {
                return Err(CmafError::Timescale(track_id));
            }
            let defaults = trex
                .iter()
                .find(|t| t.track_id == track_id)
                .map_or((0, 0, 0), |t| {
                    (
                        t.default_sample_duration,
                        t.default_sample_size,
                        t.default_sample_flags,
                    )
                });
            init.tracks.push(InitTrack {
                track_id,
                timescale,
                media,
                defaults,
            });
        }
        if init.tracks.is_empty() {
            return Err(CmafError::NoTracks);
        }
        Ok(init)
    }

    pub fn track(&self, track_id: u32) -> Option<&InitTrack> {
        self.tracks.iter().find(|t| t.track_id == track_id)
    }
}

/// One sample of a fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub track_id: u32,
    /// Decode time, in the track's timescale.
    pub dts: u64,
    /// Composition offset, in the track's timescale.
    pub cts: i64,
    /// A sync sample (not flagged `sample_is_non_sync_sample`).
    pub keyframe: bool,
    pub data: Bytes,
}

/// `sample_is_non_sync_sample` in the sample flags.
const NON_SYNC: u32 = 0x0001_0000;

/// Pairs `moof`s with their `mdat`s and yields the samples.
#[derive(Debug, Default)]
pub struct Fragments {
    moof: Option<(usize, mp4_atom::Moof)>,
    /// Per track, the decode time after the last sample, for a `traf` without `tfdt`.
    next_dts: Vec<(u32, u64)>,
}

impl Fragments {
    /// One top-level box of a media segment (from [`BoxSplitter`]): a `moof` is held until its
    /// `mdat`, which yields the samples into `out`; other boxes (`styp`, `sidx`, `prft`, `emsg`,
    /// `free`) are skipped.
    pub fn push_box(
        &mut self,
        init: &Init,
        kind: Kind,
        data: Bytes,
        out: &mut Vec<Sample>,
    ) -> Result<(), CmafError> {
        match &kind {
            b"moof" => {
                let moof = mp4_atom::Moof::decode(&mut data.as_ref())
                    .map_err(|e| decode_err("moof", e))?;
                self.moof = Some((data.len(), moof));
                Ok(())
            }
            b"mdat" => {
                let (moof_len, moof) = self.moof.take().ok_or(CmafError::MdatWithoutMoof)?;
                self.samples(init, moof_len, &moof, data, out)
            }
            _ => Ok(()),
        }
    }

    fn samples(
        &mut self,
        init: &Init,
        moof_len: usize,
        moof: &mp4_atom::Moof,
        mdat: Bytes,
        out: &mut Vec<Sample>,
    ) -> Result<(), CmafError> {
        // Offsets count from the start of the moof (default-base-is-moof, or no base for the
        // first traf), and the mdat box starts right after the moof: its payload after its header.
        let header = match mdat.get(..4) {
            Some([0, 0, 0, 1]) => 16,
            Some(_) => 8,
            None => return Err(CmafError::BadBoxSize(mdat.len() as u64)),
        };
        let payload_at = moof_len + header;
        let mut count = 0usize;
        // Where the next run's data starts when it does not say (after the previous run's).
        let mut next_offset = payload_at;
        for traf in &moof.traf {
            let tfhd = &traf.tfhd;
            let Some(track) = init.track(tfhd.track_id) else {
                continue; // a track the init did not describe (or one left out)
            };
            if tfhd.base_data_offset.is_some() {
                return Err(CmafError::AbsoluteOffset(tfhd.track_id));
            }
            let (trex_duration, trex_size, trex_flags) = track.defaults;
            let default_duration = tfhd.default_sample_duration.unwrap_or(trex_duration);
            let default_size = tfhd.default_sample_size.unwrap_or(trex_size);
            let default_flags = tfhd.default_sample_flags.unwrap_or(trex_flags);
            let mut dts = match &traf.tfdt {
                Some(t) => t.base_media_decode_time,
                None => self.next_dts(tfhd.track_id),
            };
            for trun in &traf.trun {
                let mut at = match trun.data_offset {
                    Some(o) => {
                        usize::try_from(o).map_err(|_| CmafError::SampleOutside(track.track_id))?
                    }
                    None => next_offset,
                };
                if at < payload_at && !trun.samples.is_empty() {
                    return Err(CmafError::SampleOutside(track.track_id));
                }
                count += trun.samples.len();
                if count > MAX_SAMPLES {
                    return Err(CmafError::TooManySamples(count));
                }
                for entry in trun.samples.iter() {
                    let size = entry.size.unwrap_or(default_size) as usize;
                    let start = at - moof_len;
                    let end = start
                        .checked_add(size)
                        .filter(|&e| e <= mdat.len())
                        .ok_or(CmafError::SampleOutside(track.track_id))?;
                    let flags = entry.flags.unwrap_or(default_flags);
                    let keyframe = match track.media {
                        TrackMedia::Aac { .. } => true,
                        TrackMedia::Video { .. } => flags & NON_SYNC == 0,
                    };
                    out.push(Sample {
                        track_id: track.track_id,
                        dts,
                        cts: entry.cts.unwrap_or(0),
                        keyframe,
                        data: mdat.slice(start..end),
                    });
                    dts = dts.wrapping_add(entry.duration.unwrap_or(default_duration).into());
                    at += size;
                }
                next_offset = at;
            }
            self.set_next_dts(tfhd.track_id, dts);
        }
        Ok(())
    }

    fn next_dts(&self, track: u32) -> u64 {
        self.next_dts
            .iter()
            .find(|(t, _)| *t == track)
            .map_or(0, |(_, d)| *d)
    }

    fn set_next_dts(&mut self, track: u32, dts: u64) {
        match self.next_dts.iter_mut().find(|(t, _)| *t == track) {
            Some(slot) => slot.1 = dts,
            None => self.next_dts.push((track, dts)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fmp4::{self, Run};

    // A real x264 avcC and an AAC-LC AudioSpecificConfig, fmp4's test fixtures.
    use crate::fmp4::tests::{ASC, avcc, tracks};

    /// fmp4's test tracks (H.264 1280x720, AAC-LC 44.1 kHz), the video in ffmpeg's dash
    /// timescale for 30 fps rather than milliseconds.
    fn init_bytes(avcc: &[u8]) -> Vec<u8> {
        let mut tracks = tracks(avcc);
        tracks[0].timescale = 15360;
        fmp4::init_segment(&tracks).unwrap()
    }

    /// A fragment with two video samples (a keyframe with a composition offset, then a
    /// non-sync one) and one AAC frame: moof + mdat.
    fn fragment() -> Vec<u8> {
        let v = [
            fmp4::Sample {
                duration: 512,
                size: 5,
                cts: 1024,
                keyframe: true,
            },
            fmp4::Sample {
                duration: 512,
                size: 3,
                cts: 0,
                keyframe: false,
            },
        ];
        let a = [fmp4::Sample {
            duration: 1024,
            size: 2,
            cts: 0,
            keyframe: true,
        }];
        let runs = [
            Run {
                track_id: 1,
                base_dts: 15360 * 10,
                samples: &v,
            },
            Run {
                track_id: 2,
                base_dts: 441_000,
                samples: &a,
            },
        ];
        let mut out = Vec::new();
        fmp4::write_fragment_header(&mut out, 1, &runs).unwrap();
        out.extend_from_slice(b"KEYFRnonAA");
        out
    }

    #[test]
    fn an_init_segment_gives_each_track_and_its_record() {
        let avcc = avcc();
        let init = Init::parse(&init_bytes(&avcc)).unwrap();
        assert_eq!(init.tracks.len(), 2);
        let v = init.track(1).unwrap();
        assert_eq!(v.timescale, 15360);
        assert_eq!(
            v.media,
            TrackMedia::Video {
                codec: VideoCodec::Avc,
                config: avcc.clone()
            },
            "the avcC exactly as written"
        );
        let a = init.track(2).unwrap();
        assert_eq!(a.timescale, 44100);
        assert_eq!(
            a.media,
            TrackMedia::Aac {
                config: ASC.to_vec()
            }
        );
        assert_eq!(Init::parse(b"\0\0\0\x08free"), Err(CmafError::NoMoov));
        assert!(matches!(
            Init::parse(b"\0\0\0\x10moovgarbagegarb"),
            Err(CmafError::Decode { .. })
        ));
    }

    /// The same samples whatever the chunking of the bytes, each frame's bytes and flags.
    #[test]
    fn fragments_in_any_chunking_give_their_samples() {
        let init = Init::parse(&init_bytes(&avcc())).unwrap();
        let mut bytes = b"\0\0\0\x10stypmsdhmsdh".to_vec();
        bytes.extend_from_slice(&fragment());
        bytes.extend_from_slice(&fragment());
        for step in [1, 7, 100, bytes.len()] {
            let mut splitter = BoxSplitter::default();
            let mut fragments = Fragments::default();
            let mut got = Vec::new();
            for chunk in bytes.chunks(step) {
                splitter.push(chunk);
                while let Some((kind, data)) = splitter.next_box().unwrap() {
                    fragments.push_box(&init, kind, data, &mut got).unwrap();
                }
            }
            assert_eq!(splitter.pending(), 0);
            assert_eq!(got.len(), 6, "step {step}");
            let key = &got[0];
            assert_eq!(
                (key.track_id, key.dts, key.cts, key.keyframe, &key.data[..]),
                (1, 153_600, 1024, true, &b"KEYFR"[..])
            );
            let next = &got[1];
            assert_eq!(
                (next.dts, next.cts, next.keyframe, &next.data[..]),
                (154_112, 0, false, &b"non"[..])
            );
            let aac = &got[2];
            assert_eq!(
                (aac.track_id, aac.dts, aac.keyframe, &aac.data[..]),
                (2, 441_000, true, &b"AA"[..])
            );
        }
    }

    /// The fuzzer's find: a box header in an init segment claiming 4 GB made the splitter
    /// reserve 4 GB for it. Now a box beyond the segment is an error, and nothing is reserved
    /// ahead of the bytes.
    #[test]
    fn a_box_claiming_more_than_the_segment_is_refused() {
        let input = include_bytes!("../../fuzz/regressions/cmaf/init-claims-4gb");
        let init_len = usize::from(u16::from_be_bytes([input[0], input[1]])).min(input.len() - 3);
        let init = &input[3..3 + init_len];
        assert!(matches!(
            Init::parse(init),
            Err(CmafError::BoxTooLarge { .. } | CmafError::Decode { .. })
        ));
        let mut moov = b"\xff\xff\xff\xffmoov".to_vec();
        moov.extend_from_slice(&[0; 64]);
        assert!(matches!(
            Init::parse(&moov),
            Err(CmafError::BoxTooLarge {
                size: 0xffff_ffff,
                ..
            })
        ));
    }

    #[test]
    fn bad_boxes_are_errors() {
        let init = Init::parse(&init_bytes(&avcc())).unwrap();
        let mut s = BoxSplitter::new(64);
        s.push(b"\0\0\x01\0mdat");
        assert!(matches!(s.next_box(), Err(CmafError::BoxTooLarge { .. })));
        let mut s = BoxSplitter::default();
        s.push(b"\0\0\0\x04moof");
        assert_eq!(s.next_box(), Err(CmafError::BadBoxSize(4)));
        let mut s = BoxSplitter::default();
        s.push(b"\0\0\0\0mdat");
        assert_eq!(s.next_box(), Err(CmafError::OpenEnded));
        let mut f = Fragments::default();
        let mut out = Vec::new();
        assert_eq!(
            f.push_box(
                &init,
                *b"mdat",
                Bytes::from_static(b"\0\0\0\x08mdat"),
                &mut out
            ),
            Err(CmafError::MdatWithoutMoof)
        );
        // A moof whose samples need more bytes than its mdat has.
        let frag = fragment();
        let moof_len = u32::from_be_bytes(frag[..4].try_into().unwrap()) as usize;
        let mut short = frag[moof_len..moof_len + 8 + 4].to_vec();
        short[..4].copy_from_slice(&12u32.to_be_bytes());
        f.push_box(
            &init,
            *b"moof",
            Bytes::copy_from_slice(&frag[..moof_len]),
            &mut out,
        )
        .unwrap();
        assert_eq!(
            f.push_box(&init, *b"mdat", Bytes::from(short), &mut out),
            Err(CmafError::SampleOutside(1))
        );
    }
}

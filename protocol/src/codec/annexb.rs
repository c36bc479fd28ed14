//! Raw H.264 (an Annex B bytestream, as cameras and `ffmpeg -f h264` write it) into access
//! units: what one frame is, whether it is an IDR, and the parameter sets to build an avcC from.
//!
//! NAL units are split by h264-reader's Annex B reader, fed in chunks of any size (a NAL may
//! span chunks, a chunk may hold many NALs). Access units are cut (ITU-T H.264 7.4.1.2.3) at:
//! an access unit delimiter; an SPS, PPS or SEI after the picture's slices; or a slice with
//! `first_mb_in_slice` 0 after the picture's slices. Nothing that changes the picture is added:
//! AUDs, SPS and PPS leave the frame (the parameter sets go to the avcC instead), filler is
//! dropped, and every other NAL is kept as sent.
//!
//! An access unit is only known to be complete when the next one starts (Annex B has no
//! lengths), so each frame leaves one frame time after it arrived.
//!
//! Whether the bytes are H.264 at all is decided from the bytes alone, never from how long
//! they took: more than [`MAX_BYTES_WITHOUT_NAL`] bytes in a row that belong to no NAL unit
//! (before the first start code, or rejected by the reader later) end the stream with
//! [`AnnexBError::NoStartCode`]. Bytes before the first start code are found here and never
//! reach h264-reader, whose reader logs an error for every byte it rejects.

use std::io::{BufRead, Read};

use h264_reader::annexb::AnnexBReader;
use h264_reader::nal::{Nal, RefNal};
use h264_reader::push::{AccumulatedNalHandler, NalAccumulator, NalInterest};
use thiserror::Error;

use super::avc::{AvcError, parse_sps};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AnnexBError {
    #[error("NAL unit larger than {limit} bytes: not a camera's H.264 (or a broken one)")]
    NalTooLarge { limit: usize },
    #[error("access unit larger than {limit} bytes: no new picture starts (a broken stream)")]
    AccessUnitTooLarge { limit: usize },
    #[error("{bytes} bytes without an H.264 start code: this is not an H.264 Annex B stream")]
    NoStartCode { bytes: usize },
    #[error("invalid NAL header 0x{0:02x}: this is not H.264 (forbidden bit set or unknown type)")]
    BadNalHeader(u8),
    #[error("bad SPS: {0}")]
    Sps(AvcError),
}

/// An SPS and a PPS, each a whole NAL unit with its header.
pub type ParameterSets = (Vec<u8>, Vec<u8>);

/// One frame: its NAL units without start codes, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessUnit {
    pub nals: Vec<Vec<u8>>,
    /// It holds an IDR slice: a decoder (a viewer) can start here.
    pub idr: bool,
}

impl AccessUnit {
    /// The frame as AVCC: each NAL behind a 4-byte big-endian length.
    pub fn to_avcc(&self) -> Vec<u8> {
        let len: usize = self.nals.iter().map(|n| n.len() + 4).sum();
        let mut out = Vec::with_capacity(len);
        for n in &self.nals {
            out.extend_from_slice(&(n.len() as u32).to_be_bytes());
            out.extend_from_slice(n);
        }
        out
    }
}

/// The NAL units of a complete Annex B buffer (a PES, say), without their start codes. The
/// zero bytes in front of a start code (`trailing_zero_8bits`, or a four-byte start code's
/// first byte) are not part of the NAL unit before it; bytes before the first start code are
/// not a NAL unit.
pub fn split_nals(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut starts = memchr::memmem::find_iter(data, &[0u8, 0, 1])
        .map(|i| i + 3)
        .peekable();
    std::iter::from_fn(move || {
        let start = starts.next()?;
        let end = starts.peek().map_or(data.len(), |&next| next - 3);
        let mut nal = data.get(start..end).unwrap_or_default();
        while let [rest @ .., 0] = nal {
            nal = rest;
        }
        Some(nal)
    })
}

const NAL_SLICE: u8 = 1;
const NAL_IDR: u8 = 5;
const NAL_SEI: u8 = 6;
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;
const NAL_AUD: u8 = 9;
const NAL_FILLER: u8 = 12;

/// Collects complete NAL units, refusing any that grows past the limit.
struct Collect {
    nals: Vec<Vec<u8>>,
    limit: usize,
    too_big: bool,
    /// Calls so far, complete or not: a push that makes none had no byte inside a NAL unit.
    calls: u64,
}

impl AccumulatedNalHandler for Collect {
    fn nal(&mut self, nal: RefNal<'_>) -> NalInterest {
        self.calls += 1;
        if !nal.is_complete() {
            // Called again as the NAL grows: count what is buffered so far.
            let mut r = nal.reader();
            let mut len = 0;
            while let Ok(buf) = r.fill_buf() {
                if buf.is_empty() {
                    break;
                }
                let n = buf.len();
                len += n;
                r.consume(n);
            }
            if len > self.limit {
                self.too_big = true;
                return NalInterest::Ignore;
            }
            return NalInterest::Buffer;
        }
        let mut bytes = Vec::new();
        if nal.reader().read_to_end(&mut bytes).is_ok() && !bytes.is_empty() {
            if bytes.len() > self.limit {
                self.too_big = true;
            } else {
                self.nals.push(bytes);
            }
        }
        NalInterest::Buffer
    }
}

/// Raw H.264 in, access units and parameter sets out.
pub struct AccessUnits {
    reader: AnnexBReader<NalAccumulator<Collect>>,
    /// The access unit being gathered, what it holds (bytes, plus [`NAL_OVERHEAD`] per NAL),
    /// and whether it has slices yet.
    current: Vec<Vec<u8>>,
    current_bytes: usize,
    has_vcl: bool,
    idr: bool,
    sps: Option<Vec<u8>>,
    pps: Option<Vec<u8>>,
    /// The parameter sets changed since [`AccessUnits::take_parameter_sets`].
    parameter_sets_changed: bool,
    /// A start code was seen: from there on every byte goes to the reader.
    synced: bool,
    /// Before `synced`: the last bytes pushed (at most 2), for a start code split over pushes.
    tail: Vec<u8>,
    /// Bytes in a row that belonged to no NAL unit.
    bytes_without_nal: usize,
    max_nal: usize,
    max_au: usize,
}

/// What a NAL costs an access unit beyond its bytes (its Vec), so that many tiny NAL units
/// count too.
const NAL_OVERHEAD: usize = 32;

/// Bytes in a row outside any NAL unit tolerated before the stream is refused as not H.264.
/// A source joined in the middle of a NAL unit (a camera's TCP stream picked up mid-frame)
/// reaches the next start code within one NAL; 1 MiB covers a large IDR slice.
pub const MAX_BYTES_WITHOUT_NAL: usize = 1 << 20;

const START_CODE: &[u8] = &[0, 0, 1];

impl AccessUnits {
    /// `max_nal`: the largest NAL unit accepted (an IDR of a big picture is a few MB at most);
    /// `max_au`: the largest access unit, all its NAL units together.
    pub fn new(max_nal: usize, max_au: usize) -> Self {
        Self {
            reader: AnnexBReader::accumulate(Collect {
                nals: Vec::new(),
                limit: max_nal,
                too_big: false,
                calls: 0,
            }),
            current: Vec::new(),
            current_bytes: 0,
            has_vcl: false,
            idr: false,
            sps: None,
            pps: None,
            parameter_sets_changed: false,
            synced: false,
            tail: Vec::new(),
            bytes_without_nal: 0,
            max_nal,
            max_au,
        }
    }

    /// Pushes bytes; appends the access units they completed to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<AccessUnit>) -> Result<(), AnnexBError> {
        let data = if self.synced {
            data
        } else {
            match self.find_start_code(data) {
                Some(from) => {
                    self.synced = true;
                    &data[from..]
                }
                None => return self.outside_units(data.len()),
            }
        };
        let calls = self.reader.nal_handler_ref().calls;
        self.reader.push(data);
        let collect = self.reader.nal_handler_mut();
        if collect.too_big {
            return Err(AnnexBError::NalTooLarge {
                limit: self.max_nal,
            });
        }
        let nals = std::mem::take(&mut collect.nals);
        if collect.calls == calls {
            // Not one byte of this push was inside a NAL unit: the reader rejected it all.
            self.outside_units(data.len())?;
        } else {
            self.bytes_without_nal = 0;
        }
        for nal in nals {
            self.nal(nal, out)?;
        }
        Ok(())
    }

    /// Counts bytes that belong to no NAL unit; an error once there are too many in a row.
    fn outside_units(&mut self, n: usize) -> Result<(), AnnexBError> {
        self.bytes_without_nal += n;
        if self.bytes_without_nal > MAX_BYTES_WITHOUT_NAL {
            return Err(AnnexBError::NoStartCode {
                bytes: self.bytes_without_nal,
            });
        }
        Ok(())
    }

    /// Before the first start code: where in `data` the reader should begin (a start code
    /// split over pushes begins before `data`, and its first bytes are handed over here).
    fn find_start_code(&mut self, data: &[u8]) -> Option<usize> {
        // A start code that began in the previous push: 00 00 | 01, or 00 | 00 01.
        for held in (1..=self.tail.len()).rev() {
            let head = &self.tail[self.tail.len() - held..];
            let need = START_CODE.len() - held;
            if head == &START_CODE[..held] && data.get(..need) == Some(&START_CODE[held..]) {
                let head = head.to_vec();
                self.reader.push(&head);
                self.tail.clear();
                return Some(0);
            }
        }
        if let Some(at) = memchr::memmem::find(data, START_CODE) {
            self.tail.clear();
            return Some(at);
        }
        self.tail
            .extend_from_slice(&data[data.len().saturating_sub(2)..]);
        let excess = self.tail.len().saturating_sub(2);
        self.tail.drain(..excess);
        None
    }
    /// The end of the stream: the last access unit is complete.
    pub fn finish(&mut self, out: &mut Vec<AccessUnit>) -> Result<(), AnnexBError> {
        self.reader.reset();
        let nals = std::mem::take(&mut self.reader.nal_handler_mut().nals);
        for nal in nals {
            self.nal(nal, out)?;
        }
        self.emit(out);
        Ok(())
    }

    /// The latest SPS and PPS, if they changed since the last call.
    pub fn take_parameter_sets(&mut self) -> Option<ParameterSets> {
        if !self.parameter_sets_changed {
            return None;
        }
        let (Some(sps), Some(pps)) = (&self.sps, &self.pps) else {
            return None;
        };
        self.parameter_sets_changed = false;
        Some((sps.clone(), pps.clone()))
    }

    fn emit(&mut self, out: &mut Vec<AccessUnit>) {
        if self.has_vcl {
            out.push(AccessUnit {
                nals: std::mem::take(&mut self.current),
                idr: self.idr,
            });
        }
        self.current.clear();
        self.current_bytes = 0;
        self.has_vcl = false;
        self.idr = false;
    }

    fn nal(&mut self, nal: Vec<u8>, out: &mut Vec<AccessUnit>) -> Result<(), AnnexBError> {
        let header = nal[0];
        let kind = header & 0x1f;
        if header & 0x80 != 0 || kind == 0 || (24..=31).contains(&kind) {
            return Err(AnnexBError::BadNalHeader(header));
        }
        match kind {
            NAL_AUD => self.emit(out),
            NAL_SPS | NAL_PPS => {
                if self.has_vcl {
                    self.emit(out);
                }
                if kind == NAL_SPS {
                    parse_sps(&nal).map_err(AnnexBError::Sps)?;
                }
                let slot = if kind == NAL_SPS {
                    &mut self.sps
                } else {
                    &mut self.pps
                };
                if slot.as_deref() != Some(&nal[..]) {
                    *slot = Some(nal);
                    self.parameter_sets_changed = true;
                }
            }
            NAL_FILLER => {}
            NAL_SEI | 13..=18 => {
                if self.has_vcl {
                    self.emit(out);
                }
                self.add(nal)?;
            }
            NAL_SLICE..=NAL_IDR => {
                // first_mb_in_slice is the slice header's first ue(v): it is 0 exactly when the
                // first bit is 1. A new picture starts there.
                let first_mb_zero = nal.get(1).is_some_and(|b| b & 0x80 != 0);
                if self.has_vcl && first_mb_zero {
                    self.emit(out);
                }
                self.has_vcl = true;
                self.idr |= kind == NAL_IDR;
                self.add(nal)?;
            }
            _ => self.add(nal)?, // end of sequence/stream, and the like
        }
        Ok(())
    }

    /// Adds a NAL unit to the access unit being gathered, within `max_au`.
    fn add(&mut self, nal: Vec<u8>) -> Result<(), AnnexBError> {
        self.current_bytes = self.current_bytes.saturating_add(nal.len() + NAL_OVERHEAD);
        if self.current_bytes > self.max_au {
            return Err(AnnexBError::AccessUnitTooLarge { limit: self.max_au });
        }
        self.current.push(nal);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A baseline 320x240 SPS (profile 66, level 13) and a PPS, as x264 writes them.
    const SPS: &[u8] = &[
        0x67, 0x42, 0xc0, 0x0d, 0xd9, 0x01, 0x41, 0xfb, 0x01, 0x10, 0x00, 0x00, 0x03, 0x00, 0x10,
        0x00, 0x00, 0x03, 0x03, 0xc0, 0xf1, 0x42, 0xa4, 0x80,
    ];
    const PPS: &[u8] = &[0x68, 0xcb, 0x83, 0xcb, 0x20];

    fn idr(first: bool) -> Vec<u8> {
        vec![0x65, if first { 0x88 } else { 0x08 }, 0x84, 0x00, 0x33]
    }

    fn p_slice(first: bool) -> Vec<u8> {
        vec![0x41, if first { 0x9a } else { 0x1a }, 0x21, 0x6c]
    }

    fn annexb(nals: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for n in nals {
            out.extend_from_slice(&[0, 0, 0, 1]);
            out.extend_from_slice(n);
        }
        out
    }

    fn run(bytes: &[u8], chunk: usize) -> (Vec<AccessUnit>, Option<ParameterSets>) {
        let mut aus = AccessUnits::new(1 << 20, 4 << 20);
        let mut out = Vec::new();
        for c in bytes.chunks(chunk) {
            aus.push(c, &mut out).expect("push");
        }
        aus.finish(&mut out).expect("finish");
        let ps = aus.take_parameter_sets();
        (out, ps)
    }

    #[test]
    fn an_access_unit_that_never_ends_is_refused_at_its_limit() {
        // Slices that never start a new picture (first_mb_in_slice is never 0), and SEIs that
        // never reach a slice: either would grow one access unit forever.
        let mut aus = AccessUnits::new(1000, 4000);
        let mut out = Vec::new();
        let mut stream = annexb(&[SPS.to_vec(), PPS.to_vec(), idr(true)]);
        for _ in 0..200 {
            stream.extend_from_slice(&annexb(&[p_slice(false)]));
        }
        assert_eq!(
            aus.push(&stream, &mut out),
            Err(AnnexBError::AccessUnitTooLarge { limit: 4000 })
        );
        let mut aus = AccessUnits::new(1000, 4000);
        let sei = vec![0x06, 0x05, 0x01, 0x00, 0x80];
        let seis = annexb(&vec![sei; 200]);
        assert_eq!(
            aus.push(&seis, &mut out),
            Err(AnnexBError::AccessUnitTooLarge { limit: 4000 })
        );
    }

    #[test]
    fn frames_without_delimiters_in_any_chunking() {
        // Two slices per picture: the second (first_mb != 0) stays in the same frame.
        let stream = annexb(&[
            SPS.to_vec(),
            PPS.to_vec(),
            idr(true),
            idr(false),
            p_slice(true),
            p_slice(false),
            vec![0x06, 0x05, 0x01, 0x80], // SEI: starts the next frame
            p_slice(true),
        ]);
        for chunk in [1, 2, 3, 7, 5000] {
            let (aus, ps) = run(&stream, chunk);
            assert_eq!(aus.len(), 3, "chunk {chunk}");
            assert!(aus[0].idr && !aus[1].idr && !aus[2].idr);
            assert_eq!(
                aus[0].nals,
                vec![idr(true), idr(false)],
                "no SPS/PPS inside"
            );
            assert_eq!(aus[1].nals.len(), 2);
            assert_eq!(aus[2].nals[0][0], 0x06, "the SEI opens its frame");
            assert_eq!(ps, Some((SPS.to_vec(), PPS.to_vec())));
        }
    }

    #[test]
    fn delimiters_cut_and_are_dropped() {
        let aud = vec![0x09, 0xf0];
        let stream = annexb(&[
            aud.clone(),
            SPS.to_vec(),
            PPS.to_vec(),
            idr(true),
            aud.clone(),
            p_slice(true),
            aud,
            p_slice(true),
        ]);
        let (aus, _) = run(&stream, 4);
        assert_eq!(aus.len(), 3);
        assert!(aus.iter().all(|a| a.nals.iter().all(|n| n[0] & 0x1f != 9)));
        let avcc = aus[1].to_avcc();
        assert_eq!(&avcc[..4], &4u32.to_be_bytes());
    }

    #[test]
    fn parameter_sets_make_an_avcc_the_parser_reads_back() {
        let avcc = super::super::avc::avcc_from_parameter_sets(SPS, PPS).expect("avcC");
        let info = super::super::avc::AvcInfo::parse(&avcc).expect("parse");
        assert_eq!((info.width, info.height, info.length_size), (320, 240, 4));
        assert_eq!(info.codec, "avc1.42C00D");
        assert_eq!((info.sps[0].as_slice(), info.pps[0].as_slice()), (SPS, PPS));
    }

    #[test]
    fn repeated_parameter_sets_are_not_a_change() {
        let gop = [SPS.to_vec(), PPS.to_vec(), idr(true), p_slice(true)];
        let mut aus = AccessUnits::new(1 << 20, 4 << 20);
        let mut out = Vec::new();
        aus.push(&annexb(&gop), &mut out).expect("push");
        assert!(aus.take_parameter_sets().is_some());
        aus.push(&annexb(&gop), &mut out).expect("push");
        assert!(aus.take_parameter_sets().is_none(), "same SPS/PPS again");
    }

    #[test]
    fn garbage_and_oversize_units_are_errors() {
        let mut aus = AccessUnits::new(1 << 20, 4 << 20);
        let mut out = Vec::new();
        let noise: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 251 + 1) as u8).collect();
        let err = noise
            .chunks(4096)
            .find_map(|c| aus.push(c, &mut out).err())
            .expect("noise refused");
        assert!(matches!(err, AnnexBError::NoStartCode { .. }), "{err}");

        let mut aus = AccessUnits::new(1000, 4000);
        let mut big = vec![0, 0, 0, 1, 0x65, 0x88];
        big.extend(std::iter::repeat_n(0x55u8, 5000));
        let err = big
            .chunks(100)
            .find_map(|c| aus.push(c, &mut out).err())
            .expect("oversize refused");
        assert_eq!(err, AnnexBError::NalTooLarge { limit: 1000 });

        let mut aus = AccessUnits::new(1000, 4000);
        let err = aus
            .push(&annexb(&[vec![0x80, 1, 2], vec![0x41, 0x9a]]), &mut out)
            .expect_err("forbidden bit");
        assert_eq!(err, AnnexBError::BadNalHeader(0x80));
    }

    #[test]
    fn junk_before_the_first_start_code_is_skipped_in_any_chunking() {
        let mut stream: Vec<u8> = (0..10_000u32).map(|i| (i % 200 + 1) as u8).collect();
        stream.extend_from_slice(&[0, 0]); // zeros that are not yet a start code
        stream.extend(annexb(&[
            SPS.to_vec(),
            PPS.to_vec(),
            idr(true),
            p_slice(true),
        ]));
        for chunk in [1, 2, 3, 7, 5000] {
            let (aus, ps) = run(&stream, chunk);
            assert_eq!(aus.len(), 2, "chunk {chunk}");
            assert!(aus[0].idr);
            assert_eq!(ps, Some((SPS.to_vec(), PPS.to_vec())), "chunk {chunk}");
        }
    }

    /// Refused once MAX_BYTES_WITHOUT_NAL bytes outside any NAL unit have arrived, whatever
    /// the chunking: before any start code, and after one, where the reader rejects them
    /// (counted per push: a push that reached into a NAL unit does not count, so the refusal
    /// may come up to two pushes late).
    #[test]
    fn bytes_outside_nal_units_are_refused_at_the_same_count_in_any_chunking() {
        let plain: Vec<u8> = (0..(2 << 20)).map(|i| (i % 251 + 1) as u8).collect();
        let mut after_start = vec![0, 0, 0, 1, 0x09, 0xf0, 0, 0, 0, 2];
        after_start.extend((0..(2 << 20)).map(|i| (i % 250 + 2) as u8));
        for (name, noise) in [("plain", &plain), ("after a start code", &after_start)] {
            for chunk in [1, 1000, 4096, 65536] {
                let mut aus = AccessUnits::new(1 << 20, 4 << 20);
                let mut out = Vec::new();
                let mut fed = 0;
                let err = noise
                    .chunks(chunk)
                    .find_map(|c| {
                        fed += c.len();
                        aus.push(c, &mut out).err()
                    })
                    .unwrap_or_else(|| panic!("{name}, chunk {chunk}: not refused"));
                assert!(
                    matches!(err, AnnexBError::NoStartCode { .. }),
                    "{name}: {err}"
                );
                assert!(
                    fed <= MAX_BYTES_WITHOUT_NAL + 2 * chunk + 16,
                    "{name}, chunk {chunk}: refused only after {fed} bytes"
                );
                assert!(out.is_empty());
            }
        }
    }

    #[test]
    fn a_complete_buffer_splits_at_its_start_codes() {
        let data = [
            0xff, 0, 0, 0, 1, 0x09, 0xf0, 0, 0, 1, 0x67, 0x42, 0, 0, 0, 0, 1, 0x65, 0x88, 0, 0, 1,
        ];
        let nals: Vec<&[u8]> = split_nals(&data).collect();
        assert_eq!(
            nals,
            [
                &[0x09, 0xf0][..],
                &[0x67, 0x42][..],
                &[0x65, 0x88][..],
                &[][..]
            ]
        );
        assert_eq!(split_nals(&[1, 2, 3]).count(), 0);
        assert_eq!(split_nals(&[]).count(), 0);
    }
}

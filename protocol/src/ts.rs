//! MPEG-TS demuxing (ISO/IEC 13818-1) for SRT ingest: TS bytes in any chunking, out come the
//! PES payloads of one H.264 or HEVC stream and one AAC (ADTS) stream with their 90 kHz
//! timestamps.
//!
//! mpeg2ts-reader does the parsing that is spec work and easy to get subtly wrong: TS packet
//! headers and adaptation fields, PSI sections (pointer field, sections across packets, CRC-32),
//! the PAT and PMT entries, PES headers and their PTS/DTS. It also dispatches packets by PID
//! ([`Demultiplex`]). What it leaves out, this module adds:
//!
//! - **Carry-over and resync.** `Demultiplex::push` drops a trailing partial packet and stops at
//!   the first packet without the sync byte, so it is given only single whole packets that start
//!   at a sync byte. A partial packet waits here for the next push. At the start of input, and
//!   when the byte where a packet should start is not 0x47, the demuxer takes the next offset
//!   where 0x47 repeats at +188 and +376 (it waits for those bytes if need be, so every
//!   chunking of the same bytes gives the same frames), and counts the bytes it skipped.
//! - **Damage.** The packet before a lost sync may hold the garbage (the demuxer cannot tell
//!   garbage inserted in a packet from garbage inserted after it), so the PES it belongs to is
//!   dropped, unless that packet completed it (a `PES_packet_length` reached): then it is out
//!   already. A continuity counter gap in a PES drops that PES: it lacks data. Duplicate
//!   packets (the same counter twice) are skipped, and a `discontinuity_indicator` is honoured.
//! - **PES assembly with bounds.** The crate hands over PES data piecewise and reads the header
//!   from the first packet only; here the whole PES is collected, at most [`MAX_VIDEO_PES`] or
//!   [`MAX_AUDIO_PES`] bytes, and its header read once it is complete (so a header split across
//!   packets is read too). A PES ends when the next one starts on its PID, when its
//!   `PES_packet_length` is reached (ffmpeg bounds audio PES, so audio comes out without
//!   waiting for the next PES), or at [`TsDemuxer::finish`].
//! - **Program selection.** The first program of the PAT, in its PMT the first H.264 (0x1b) or
//!   HEVC (0x24) stream and the first AAC (0x0f) stream. Selections are re-made on every PMT
//!   with a valid CRC, so a new version (other PIDs or stream types) is followed, and a repeated
//!   or corrupt one changes nothing. The crate's own PAT/PMT processors are not used: they drop
//!   every later copy of a table version whose first copy failed its CRC, and replace every
//!   stream's filter (losing the PES in progress) on each new version.
//!
//! Memory per demuxer: an input buffer of [`PUSH_PIECE`] bytes plus the carried 2 × 188 at
//! most, one PES buffer per stream (up to the bounds above), a PSI section buffer each for the
//! PAT and PMT (1024 bytes at most), and the crate's PID table (16 bytes for each PID up to
//! the highest one seen, so 128 KiB at most).
//!
//! mpeg2ts-reader reports damaged input through the `log` crate at warn level (target
//! `mpeg2ts_reader`): a line for each bad section, PES header or adaptation field.

use mpeg2ts_reader::demultiplex::{
    Demultiplex, DemuxContext, FilterChangeset, FilterRequest, PacketFilter,
};
use mpeg2ts_reader::packet::{Packet, Pid};
use mpeg2ts_reader::pes::{PesContents, PesHeader, PtsDts};
use mpeg2ts_reader::psi::pat::{PatSection, ProgramDescriptor};
use mpeg2ts_reader::psi::pmt::PmtSection;
use mpeg2ts_reader::psi::{
    BufferSectionSyntaxParser, CrcCheckWholeSectionSyntaxPayloadParser, CurrentNext,
    SectionCommonHeader, SectionPacketConsumer, SectionSyntaxSectionProcessor, TableSyntaxHeader,
    WholeSectionSyntaxPayloadParser,
};
use thiserror::Error;

use crate::codec::VideoCodec;

/// Bytes in a TS packet.
pub const PACKET_SIZE: usize = 188;
const SYNC_BYTE: u8 = 0x47;
/// A video PES (one access unit) larger than this is dropped: 8 MiB holds an intra frame of
/// 4K video at a high bitrate many times over.
pub const MAX_VIDEO_PES: usize = 8 << 20;
/// An audio PES larger than this is dropped: ffmpeg puts about 3 KB of ADTS frames in one.
pub const MAX_AUDIO_PES: usize = 256 << 10;
/// A push is copied into the input buffer this many bytes at a time, which bounds that buffer
/// whatever the size of a push.
pub const PUSH_PIECE: usize = 16 << 10;

const PAT_PID: u16 = 0;
const NULL_PID: u16 = 0x1fff;
/// PIDs 0x0000..=0x000f are reserved for tables (PAT, CAT, ...): no PMT or stream is taken from
/// them, so a PMT can never replace the PAT's filter.
const FIRST_USER_PID: u16 = 0x0010;
const PAT_TABLE_ID: u8 = 0x00;
const PMT_TABLE_ID: u8 = 0x02;
const STREAM_TYPE_AAC_ADTS: u8 = 0x0f;
const STREAM_TYPE_H264: u8 = 0x1b;
const STREAM_TYPE_HEVC: u8 = 0x24;
/// Section bytes before a PAT or PMT body (common header + table syntax header), and the CRC
/// after it.
const SECTION_HEADERS: usize = SectionCommonHeader::SIZE + TableSyntaxHeader::SIZE;
const SECTION_CRC: usize = 4;

/// The elementary stream types demuxed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TsStreamType {
    /// stream_type 0x1b: Annex B access units.
    H264,
    /// stream_type 0x24: Annex B access units.
    Hevc,
    /// stream_type 0x0f: ADTS frames (see [`crate::codec::aac::split_adts`]).
    Aac,
}

impl TsStreamType {
    /// From a PMT's stream_type; `None` for the types not demuxed.
    pub fn from_stream_type(stream_type: u8) -> Option<Self> {
        match stream_type {
            STREAM_TYPE_H264 => Some(Self::H264),
            STREAM_TYPE_HEVC => Some(Self::Hevc),
            STREAM_TYPE_AAC_ADTS => Some(Self::Aac),
            _ => None,
        }
    }

    /// The video codec, or `None` for audio.
    pub fn video_codec(self) -> Option<VideoCodec> {
        match self {
            Self::H264 => Some(VideoCodec::Avc),
            Self::Hevc => Some(VideoCodec::Hevc),
            Self::Aac => None,
        }
    }

    fn max_pes(self) -> usize {
        match self {
            Self::H264 | Self::Hevc => MAX_VIDEO_PES,
            Self::Aac => MAX_AUDIO_PES,
        }
    }
}

/// One PES payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsFrame {
    pub stream: TsStreamType,
    pub pid: u16,
    /// 33 bits at 90 kHz, as in the PES header: it wraps about every 26.5 hours.
    pub pts: u64,
    /// The PES header's DTS, or its PTS when it has none.
    pub dts: u64,
    /// The PES payload: for video one Annex B access unit, for AAC one or more ADTS frames.
    pub data: Vec<u8>,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TsError {
    /// A selected stream's packets are encrypted (transport_scrambling_control is not 0).
    #[error("PID {pid} is scrambled: the stream is encrypted")]
    Scrambled { pid: u16 },
}

/// Counters since [`TsDemuxer::new`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TsStats {
    /// Whole packets demuxed.
    pub packets: u64,
    /// Times bytes were skipped to find a packet start: where a packet should have started,
    /// or at the start of input.
    pub resyncs: u64,
    /// Bytes skipped to find the sync again, and the partial packet left at
    /// [`TsDemuxer::finish`].
    pub skipped_bytes: u64,
    /// Continuity counter gaps on the selected streams.
    pub continuity_errors: u64,
    /// PES dropped: over their bound, missing data (a continuity gap, a lost sync), without a
    /// valid PES header or PTS, or empty.
    pub dropped_pes: u64,
    /// Elementary streams in the PMTs taken (once per PMT version) that are not demuxed: other
    /// stream types, or a second video or audio stream.
    pub unsupported_streams: u64,
}

/// A sans-IO MPEG-TS demuxer: see the module doc.
pub struct TsDemuxer {
    demux: Demultiplex<Ctx>,
    ctx: Ctx,
    /// Input not yet demuxed: under 188 bytes while in sync, at most 2 × 188 while searching.
    pending: Vec<u8>,
    /// Looking for a packet start: at the start of input, and after a lost sync.
    searching: bool,
    /// Whether this search has been counted in `resyncs`.
    search_counted: bool,
    /// The PID of the packet demuxed last, which a lost sync damages.
    last_pid: Option<u16>,
}

impl Default for TsDemuxer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for TsDemuxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TsDemuxer")
            .field("stats", &self.ctx.stats)
            .field("searching", &self.searching)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl TsDemuxer {
    pub fn new() -> Self {
        let mut ctx = Ctx::default();
        let demux = Demultiplex::new(&mut ctx);
        Self {
            demux,
            ctx,
            pending: Vec::new(),
            searching: true,
            search_counted: false,
            last_pid: None,
        }
    }

    /// Demuxes `bytes`, in any chunking (SRT delivers 1316-byte messages, 7 packets, but a
    /// packet may be split anywhere), and appends the PES completed to `out`. The whole input
    /// is demuxed even when an error is returned; the error is the first one met.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<TsFrame>) -> Result<(), TsError> {
        let mut result = Ok(());
        for piece in bytes.chunks(PUSH_PIECE) {
            self.pending.extend_from_slice(piece);
            let r = self.demux_pending(false);
            if result.is_ok() {
                result = r;
            }
        }
        out.append(&mut self.ctx.out);
        result
    }

    /// End of input: demuxes what can still be demuxed (a resync now takes a packet followed
    /// by no more input), then emits the PES still open, video first. Later pushes start clean
    /// (the PAT and PMT are kept).
    pub fn finish(&mut self, out: &mut Vec<TsFrame>) {
        // A scrambled stream was already reported by `push`.
        let _ = self.demux_pending(true);
        self.ctx.stats.skipped_bytes += self.pending.len() as u64;
        self.pending.clear();
        self.searching = true;
        self.search_counted = false;
        self.last_pid = None;
        let Ctx {
            video,
            audio,
            stats,
            out: ready,
            ..
        } = &mut self.ctx;
        for track in [video, audio].into_iter().flatten() {
            track.complete(stats, ready);
            track.last_cc = None;
        }
        out.append(ready);
    }

    pub fn stats(&self) -> TsStats {
        self.ctx.stats
    }

    /// Demuxes the whole packets in `pending` and keeps what is left for later. At the end of
    /// input (`end`), a resync candidate needs no more sync bytes after it than there is input.
    fn demux_pending(&mut self, end: bool) -> Result<(), TsError> {
        let Self {
            demux,
            ctx,
            pending,
            searching,
            search_counted,
            last_pid,
        } = self;
        let mut error = None;
        let mut pos = 0;
        loop {
            if !*searching {
                match pending.get(pos) {
                    None => break,
                    Some(&SYNC_BYTE) => {
                        let Some(bytes) = pending.get(pos..pos + PACKET_SIZE) else {
                            break;
                        };
                        if let Err(e) = ctx.packet(demux, bytes) {
                            error.get_or_insert(e);
                        }
                        *last_pid = Some(packet_pid(bytes));
                        pos += PACKET_SIZE;
                    }
                    Some(_) => {
                        *searching = true;
                        *search_counted = false;
                        if let Some(pid) = last_pid.take() {
                            ctx.damaged(pid);
                        }
                    }
                }
            } else {
                let (at, found) = find_sync(pending, pos, end);
                if at > pos {
                    ctx.stats.skipped_bytes += (at - pos) as u64;
                    if !std::mem::replace(search_counted, true) {
                        ctx.stats.resyncs += 1;
                    }
                }
                pos = at;
                if !found {
                    break;
                }
                *searching = false;
            }
        }
        pending.drain(..pos);
        error.map_or(Ok(()), Err)
    }
}

fn packet_pid(packet: &[u8]) -> u16 {
    match packet {
        [_, hi, lo, ..] => (u16::from(hi & 0x1f) << 8) | u16::from(*lo),
        _ => NULL_PID,
    }
}

/// The first offset from `from` where a packet starts: 0x47 there, at +188 and at +376.
/// Returns it and true, or, if there is none yet, the offset to search again from once more
/// bytes are in and false. With `end`, sync bytes past the end of `buf` are not needed.
fn find_sync(buf: &[u8], from: usize, end: bool) -> (usize, bool) {
    // Offsets below `decidable` have all the bytes their test needs.
    let decidable = if end {
        (buf.len() + 1).saturating_sub(PACKET_SIZE)
    } else {
        buf.len().saturating_sub(2 * PACKET_SIZE)
    };
    let window = buf.get(from..decidable).unwrap_or_default();
    for i in memchr::memchr_iter(SYNC_BYTE, window).map(|i| from + i) {
        let at = |k: usize| buf.get(i + k * PACKET_SIZE).is_none_or(|&b| b == SYNC_BYTE);
        if at(1) && at(2) {
            return (i, true);
        }
    }
    (decidable.max(from), false)
}

/// Which selected stream a filter feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Video,
    Audio,
}

/// The role of a PID in the selection, for working out filter changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Pmt,
    Es(Slot),
}

type SectionFilter<P> = SectionPacketConsumer<
    SectionSyntaxSectionProcessor<
        BufferSectionSyntaxParser<CrcCheckWholeSectionSyntaxPayloadParser<P>>,
    >,
>;

fn section_filter<P: WholeSectionSyntaxPayloadParser<Context = Ctx>>(p: P) -> SectionFilter<P> {
    SectionPacketConsumer::new(SectionSyntaxSectionProcessor::new(
        BufferSectionSyntaxParser::new(CrcCheckWholeSectionSyntaxPayloadParser::new(p)),
    ))
}

/// What `Demultiplex` runs for each PID.
enum Filter {
    Pat(Box<SectionFilter<PatTable>>),
    Pmt(Box<SectionFilter<PmtTable>>),
    Es(Slot),
    Null,
}

impl PacketFilter for Filter {
    type Ctx = Ctx;

    fn consume(&mut self, ctx: &mut Ctx, pk: &Packet<'_>) {
        match self {
            Filter::Pat(f) => f.consume(ctx, pk),
            Filter::Pmt(f) => f.consume(ctx, pk),
            Filter::Es(slot) => ctx.es_packet(*slot, pk),
            Filter::Null => {}
        }
    }
}

/// The PAT: takes its first program.
struct PatTable;

impl WholeSectionSyntaxPayloadParser for PatTable {
    type Context = Ctx;

    fn section(
        &mut self,
        ctx: &mut Ctx,
        header: &SectionCommonHeader,
        table_syntax_header: &TableSyntaxHeader<'_>,
        data: &[u8],
    ) {
        if header.table_id != PAT_TABLE_ID
            || table_syntax_header.current_next_indicator() != CurrentNext::Current
            || table_syntax_header.section_number() != 0
        {
            return;
        }
        let Some(body) = data.get(SECTION_HEADERS..data.len().saturating_sub(SECTION_CRC)) else {
            return;
        };
        let first = PatSection::new(body).programs().find_map(|p| match p {
            ProgramDescriptor::Program {
                program_number,
                pid,
            } => Some((program_number, u16::from(pid))),
            ProgramDescriptor::Network { .. } => None,
        });
        if let Some((program_number, pid)) = first
            && is_user_pid(pid)
        {
            ctx.set_program(program_number, pid);
        }
    }
}

/// The selected program's PMT: takes its first video and first audio stream.
struct PmtTable {
    pid: u16,
}

impl WholeSectionSyntaxPayloadParser for PmtTable {
    type Context = Ctx;

    fn section(
        &mut self,
        ctx: &mut Ctx,
        header: &SectionCommonHeader,
        table_syntax_header: &TableSyntaxHeader<'_>,
        data: &[u8],
    ) {
        let Some(program) = ctx.program else {
            return;
        };
        if header.table_id != PMT_TABLE_ID
            || table_syntax_header.current_next_indicator() != CurrentNext::Current
            || table_syntax_header.id() != program.number
            || program.pmt_pid != self.pid
        {
            return;
        }
        let Some(body) = data.get(SECTION_HEADERS..data.len().saturating_sub(SECTION_CRC)) else {
            return;
        };
        let Ok(pmt) = PmtSection::from_bytes(body) else {
            return;
        };
        let (mut video, mut audio) = (None, None);
        let mut unsupported = 0;
        for stream in pmt.streams() {
            let pid = u16::from(stream.elementary_pid());
            let usable = is_user_pid(pid)
                && pid != self.pid
                && video.is_none_or(|(p, _)| p != pid)
                && audio.is_none_or(|(p, _)| p != pid);
            match TsStreamType::from_stream_type(stream.stream_type().into()) {
                Some(t @ (TsStreamType::H264 | TsStreamType::Hevc))
                    if usable && video.is_none() =>
                {
                    video = Some((pid, t));
                }
                Some(t @ TsStreamType::Aac) if usable && audio.is_none() => audio = Some((pid, t)),
                _ => unsupported += 1,
            }
        }
        let version = (self.pid, table_syntax_header.version());
        if ctx.pmt_counted != Some(version) {
            ctx.pmt_counted = Some(version);
            ctx.stats.unsupported_streams += unsupported;
        }
        ctx.select(video, audio);
    }
}

fn is_user_pid(pid: u16) -> bool {
    (FIRST_USER_PID..NULL_PID).contains(&pid)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Program {
    number: u16,
    pmt_pid: u16,
}

/// Everything the filters share: the selection, the PES being collected, the frames done.
#[derive(Default)]
struct Ctx {
    changeset: FilterChangeset<Filter>,
    program: Option<Program>,
    /// The PMT PID and version whose unsupported streams were counted last.
    pmt_counted: Option<(u16, u8)>,
    video: Option<Track>,
    audio: Option<Track>,
    out: Vec<TsFrame>,
    stats: TsStats,
}

impl DemuxContext for Ctx {
    type F = Filter;

    fn filter_changeset(&mut self) -> &mut FilterChangeset<Filter> {
        &mut self.changeset
    }

    /// `Demultiplex` asks for the PAT's filter when it starts and for one for each PID it meets
    /// without a filter; the PMT and stream filters are put in by [`Ctx::set_roles`].
    fn construct(&mut self, req: FilterRequest<'_, '_>) -> Filter {
        match req {
            FilterRequest::ByPid(pid) if u16::from(pid) == PAT_PID => {
                Filter::Pat(Box::new(section_filter(PatTable)))
            }
            _ => Filter::Null,
        }
    }
}

impl Ctx {
    /// One whole packet, from a sync byte.
    fn packet(&mut self, demux: &mut Demultiplex<Ctx>, bytes: &[u8]) -> Result<(), TsError> {
        let Some(pk) = Packet::try_new(bytes) else {
            return Ok(());
        };
        self.stats.packets += 1;
        let pid = u16::from(pk.pid());
        let selected = [&self.video, &self.audio]
            .into_iter()
            .flatten()
            .any(|t| t.pid == pid);
        // Demultiplex skips scrambled packets itself; a continuity gap then drops their PES.
        let scrambled = selected && pk.transport_scrambling_control().is_scrambled();
        demux.push(self, bytes);
        if scrambled {
            Err(TsError::Scrambled { pid })
        } else {
            Ok(())
        }
    }

    fn track(&mut self, slot: Slot) -> &mut Option<Track> {
        match slot {
            Slot::Video => &mut self.video,
            Slot::Audio => &mut self.audio,
        }
    }

    fn es_packet(&mut self, slot: Slot, pk: &Packet<'_>) {
        let Ctx {
            video,
            audio,
            out,
            stats,
            ..
        } = self;
        let track = match slot {
            Slot::Video => video,
            Slot::Audio => audio,
        };
        if let Some(track) = track
            && track.pid == u16::from(pk.pid())
        {
            track.packet(pk, stats, out);
        }
    }

    /// The packet demuxed last on `pid` may hold garbage: its PES is dropped.
    fn damaged(&mut self, pid: u16) {
        let Ctx {
            video,
            audio,
            stats,
            ..
        } = self;
        for track in [video, audio].into_iter().flatten() {
            if track.pid == pid {
                track.drop_pes(stats);
            }
        }
    }

    fn set_program(&mut self, number: u16, pmt_pid: u16) {
        let program = Program { number, pmt_pid };
        if self.program == Some(program) {
            return;
        }
        let old = self.roles();
        self.program = Some(program);
        // A stream on the new PMT PID gives way to the PMT.
        for slot in [Slot::Video, Slot::Audio] {
            if self.track(slot).as_ref().is_some_and(|t| t.pid == pmt_pid) {
                self.close(slot);
            }
        }
        self.set_roles(&old);
    }

    /// Takes the streams a PMT lists, keeping the tracks (and their PES in progress) that stay.
    fn select(&mut self, video: Option<(u16, TsStreamType)>, audio: Option<(u16, TsStreamType)>) {
        let old = self.roles();
        for (slot, want) in [(Slot::Video, video), (Slot::Audio, audio)] {
            let have = self.track(slot).as_ref().map(|t| (t.pid, t.stream));
            if have != want {
                self.close(slot);
                *self.track(slot) = want.map(|(pid, stream)| Track::new(pid, stream));
            }
        }
        self.set_roles(&old);
    }

    /// Ends a track: emits its open PES, which a PMT change ends as the next PES would.
    fn close(&mut self, slot: Slot) {
        let Ctx {
            video,
            audio,
            out,
            stats,
            ..
        } = self;
        let track = match slot {
            Slot::Video => video,
            Slot::Audio => audio,
        };
        if let Some(mut t) = track.take() {
            t.complete(stats, out);
        }
    }

    fn roles(&self) -> Vec<(u16, Role)> {
        let mut roles = Vec::with_capacity(3);
        roles.extend(self.program.map(|p| (p.pmt_pid, Role::Pmt)));
        roles.extend(self.video.as_ref().map(|t| (t.pid, Role::Es(Slot::Video))));
        roles.extend(self.audio.as_ref().map(|t| (t.pid, Role::Es(Slot::Audio))));
        roles
    }

    /// Changes the filters from the roles `old` to the current ones. `Demultiplex` applies the
    /// changes right after the packet being consumed; a PID whose role is unchanged keeps its
    /// filter, and with it its section buffer.
    fn set_roles(&mut self, old: &[(u16, Role)]) {
        let new = self.roles();
        for &(pid, _) in old {
            if !new.iter().any(|&(p, _)| p == pid) {
                self.changeset.remove(Pid::new(pid));
            }
        }
        for &(pid, role) in &new {
            if !old.contains(&(pid, role)) {
                let filter = match role {
                    Role::Pmt => Filter::Pmt(Box::new(section_filter(PmtTable { pid }))),
                    Role::Es(slot) => Filter::Es(slot),
                };
                self.changeset.insert(Pid::new(pid), filter);
            }
        }
    }
}

/// A selected elementary stream and the PES being collected on it.
struct Track {
    pid: u16,
    stream: TsStreamType,
    last_cc: Option<u8>,
    /// The PES so far, header included; kept allocated from one PES to the next.
    pes: Vec<u8>,
    /// Whether `pes` is a PES in progress (else packets wait for the next PES start).
    open: bool,
}

impl Track {
    fn new(pid: u16, stream: TsStreamType) -> Self {
        Self {
            pid,
            stream,
            last_cc: None,
            pes: Vec::new(),
            open: false,
        }
    }

    fn packet(&mut self, pk: &Packet<'_>, stats: &mut TsStats, out: &mut Vec<TsFrame>) {
        let cc = pk.continuity_counter().count();
        let has_payload = pk.adaptation_control().has_payload();
        let discontinuity = pk
            .adaptation_field()
            .is_some_and(|af| af.discontinuity_indicator());
        if let Some(last) = self.last_cc
            && !discontinuity
        {
            // The counter steps with each packet that has a payload (13818-1 2.4.3.3).
            let expected = if has_payload { (last + 1) & 0x0f } else { last };
            if cc != expected {
                if has_payload && cc == last {
                    // A duplicate packet: the same payload again.
                    return;
                }
                stats.continuity_errors += 1;
                self.drop_pes(stats);
            }
        }
        self.last_cc = Some(cc);
        let Some(payload) = pk.payload() else {
            return;
        };
        if pk.payload_unit_start_indicator() {
            self.complete(stats, out);
            self.open = true;
        } else if !self.open {
            return;
        }
        let max = self.stream.max_pes();
        let len = self.pes.len() + payload.len();
        if len > max {
            self.drop_pes(stats);
            return;
        }
        if len > self.pes.capacity() {
            // Doubling, but never past the bound.
            let target = len.max(2 * self.pes.capacity()).min(max);
            self.pes.reserve_exact(target - self.pes.len());
        }
        self.pes.extend_from_slice(payload);
        if let [0, 0, 1, _, hi, lo, ..] = self.pes[..] {
            let declared = usize::from(u16::from_be_bytes([hi, lo]));
            if declared != 0 && self.pes.len() >= 6 + declared {
                self.pes.truncate(6 + declared);
                self.complete(stats, out);
            }
        }
    }

    /// Ends the open PES and emits it, if its header is valid and it has a PTS and a payload.
    fn complete(&mut self, stats: &mut TsStats, out: &mut Vec<TsFrame>) {
        if !std::mem::take(&mut self.open) {
            return;
        }
        match parse_pes(&self.pes) {
            Some((pts, dts, payload)) if !payload.is_empty() => out.push(TsFrame {
                stream: self.stream,
                pid: self.pid,
                pts,
                dts,
                data: payload.to_vec(),
            }),
            _ => stats.dropped_pes += 1,
        }
        self.pes.clear();
    }

    fn drop_pes(&mut self, stats: &mut TsStats) {
        if std::mem::take(&mut self.open) {
            stats.dropped_pes += 1;
        }
        self.pes.clear();
    }
}

/// PTS, DTS (the PTS if absent) and payload of a whole PES.
fn parse_pes(pes: &[u8]) -> Option<(u64, u64, &[u8])> {
    let header = PesHeader::from_bytes(pes)?;
    let PesContents::Parsed(Some(contents)) = header.contents() else {
        return None;
    };
    let (pts, dts) = match contents.pts_dts().ok()? {
        PtsDts::PtsOnly(Ok(pts)) => (pts, pts),
        PtsDts::Both {
            pts: Ok(pts),
            dts: Ok(dts),
        } => (pts, dts),
        _ => return None,
    };
    Some((pts.value(), dts.value(), contents.payload()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIDEO_PID: u16 = 0x100;
    const AUDIO_PID: u16 = 0x101;
    const PMT_PID: u16 = 0x1000;

    /// CRC-32/MPEG-2, for hand-made sections.
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in data {
            crc ^= u32::from(b) << 24;
            for _ in 0..8 {
                crc = if crc & 0x8000_0000 != 0 {
                    (crc << 1) ^ 0x04c1_1db7
                } else {
                    crc << 1
                };
            }
        }
        crc
    }

    /// A section: table_id, table_id_extension, version, body; with its CRC.
    fn section(table_id: u8, id: u16, version: u8, body: &[u8]) -> Vec<u8> {
        let len = 5 + body.len() + 4;
        let mut s = vec![table_id, 0xb0 | (len >> 8) as u8, len as u8];
        s.extend_from_slice(&id.to_be_bytes());
        s.extend_from_slice(&[0xc1 | (version << 1), 0, 0]);
        s.extend_from_slice(body);
        let crc = crc32(&s);
        s.extend_from_slice(&crc.to_be_bytes());
        s
    }

    fn pat(programs: &[(u16, u16)]) -> Vec<u8> {
        let mut body = Vec::new();
        for &(number, pid) in programs {
            body.extend_from_slice(&number.to_be_bytes());
            body.extend_from_slice(&(0xe000 | pid).to_be_bytes());
        }
        section(0x00, 1, 0, &body)
    }

    fn pmt(program: u16, version: u8, streams: &[(u8, u16)]) -> Vec<u8> {
        let mut body = vec![0xe0 | (VIDEO_PID >> 8) as u8, VIDEO_PID as u8, 0xf0, 0];
        for &(stream_type, pid) in streams {
            body.push(stream_type);
            body.extend_from_slice(&(0xe000 | pid).to_be_bytes());
            body.extend_from_slice(&[0xf0, 0]);
        }
        section(0x02, program, version, &body)
    }

    /// A PES: stream_id, PTS, DTS, payload; `bounded` writes PES_packet_length.
    fn pes(stream_id: u8, pts: u64, dts: Option<u64>, payload: &[u8], bounded: bool) -> Vec<u8> {
        let ts = |prefix: u8, t: u64| {
            [
                (prefix << 4) | (((t >> 30) as u8 & 7) << 1) | 1,
                (t >> 22) as u8,
                (((t >> 15) as u8) << 1) | 1,
                (t >> 7) as u8,
                ((t as u8) << 1) | 1,
            ]
        };
        let mut header = Vec::new();
        match dts {
            Some(d) => {
                header.extend_from_slice(&[0x80, 0xc0, 10]);
                header.extend_from_slice(&ts(3, pts));
                header.extend_from_slice(&ts(1, d));
            }
            None => {
                header.extend_from_slice(&[0x80, 0x80, 5]);
                header.extend_from_slice(&ts(2, pts));
            }
        }
        let len = if bounded {
            header.len() + payload.len()
        } else {
            0
        };
        let mut p = vec![0, 0, 1, stream_id, (len >> 8) as u8, len as u8];
        p.extend_from_slice(&header);
        p.extend_from_slice(payload);
        p
    }

    /// Writes TS packets, with a continuity counter per PID.
    #[derive(Default)]
    struct Mux {
        out: Vec<u8>,
        cc: std::collections::HashMap<u16, u8>,
    }

    impl Mux {
        /// One packet: `payload` (at most 184 bytes) after stuffing in an adaptation field.
        fn packet(&mut self, pid: u16, pusi: bool, payload: &[u8]) {
            let cc = self.cc.entry(pid).or_insert(0);
            let mut p = vec![
                SYNC_BYTE,
                (u8::from(pusi) << 6) | (pid >> 8) as u8,
                pid as u8,
            ];
            let stuffing = 184 - payload.len();
            if stuffing == 0 {
                p.push(0x10 | *cc);
            } else {
                p.push(0x30 | *cc);
                p.push((stuffing - 1) as u8);
                if stuffing > 1 {
                    p.push(0);
                    p.resize(4 + stuffing, 0xff);
                }
            }
            p.extend_from_slice(payload);
            assert_eq!(p.len(), PACKET_SIZE);
            *cc = (*cc + 1) & 0x0f;
            self.out.extend_from_slice(&p);
        }

        fn psi(&mut self, pid: u16, section: &[u8]) {
            let mut payload = vec![0];
            payload.extend_from_slice(section);
            self.packet(pid, true, &payload);
        }

        /// A PES cut into packets, the first carrying `first` bytes at most.
        fn pes_with_first(&mut self, pid: u16, pes: &[u8], first: usize) {
            let (head, mut rest) = pes.split_at(first.min(pes.len()));
            self.packet(pid, true, head);
            while !rest.is_empty() {
                let (chunk, tail) = rest.split_at(rest.len().min(184));
                self.packet(pid, false, chunk);
                rest = tail;
            }
        }

        fn pes(&mut self, pid: u16, pes: &[u8]) {
            self.pes_with_first(pid, pes, 184);
        }

        fn tables(&mut self) {
            self.psi(0, &pat(&[(1, PMT_PID)]));
            self.psi(PMT_PID, &pmt(1, 0, &[(0x1b, VIDEO_PID), (0x0f, AUDIO_PID)]));
        }
    }

    fn frame(stream: TsStreamType, pid: u16, pts: u64, dts: u64, data: &[u8]) -> TsFrame {
        TsFrame {
            stream,
            pid,
            pts,
            dts,
            data: data.to_vec(),
        }
    }

    fn au(n: u8, len: usize) -> Vec<u8> {
        let mut d = vec![0, 0, 0, 1, 0x65];
        d.resize(len, n);
        d
    }

    /// Two video access units (unbounded PES) and two audio PES (bounded).
    fn stream() -> (Vec<u8>, Vec<TsFrame>) {
        let mut m = Mux::default();
        m.tables();
        let (v1, v2) = (au(1, 1000), au(2, 300));
        let (a1, a2) = (vec![0xa1; 200], vec![0xa2; 50]);
        m.pes(VIDEO_PID, &pes(0xe0, 6000, Some(3000), &v1, false));
        m.pes(AUDIO_PID, &pes(0xc0, 3000, None, &a1, true));
        m.pes(VIDEO_PID, &pes(0xe0, 9000, Some(6000), &v2, false));
        m.pes(AUDIO_PID, &pes(0xc0, 4920, None, &a2, true));
        let frames = vec![
            frame(TsStreamType::Aac, AUDIO_PID, 3000, 3000, &a1),
            frame(TsStreamType::H264, VIDEO_PID, 6000, 3000, &v1),
            frame(TsStreamType::Aac, AUDIO_PID, 4920, 4920, &a2),
            frame(TsStreamType::H264, VIDEO_PID, 9000, 6000, &v2),
        ];
        (m.out, frames)
    }

    fn demux_chunked(bytes: &[u8], step: usize) -> (Vec<TsFrame>, TsStats) {
        let mut d = TsDemuxer::new();
        let mut out = Vec::new();
        for chunk in bytes.chunks(step) {
            d.push(chunk, &mut out).unwrap();
            assert!(d.pending.len() <= 2 * PACKET_SIZE);
        }
        d.finish(&mut out);
        (out, d.stats())
    }

    #[test]
    fn frames_come_out_when_they_end() {
        let (bytes, frames) = stream();
        let mut d = TsDemuxer::new();
        let mut out = Vec::new();
        d.push(&bytes, &mut out).unwrap();
        // The last video PES is open until the end of input; bounded audio PES are not.
        assert_eq!(out, frames[..3]);
        d.finish(&mut out);
        assert_eq!(out, frames);
        let stats = d.stats();
        assert_eq!(stats.packets, bytes.len() as u64 / 188);
        assert_eq!(
            stats,
            TsStats {
                packets: stats.packets,
                ..TsStats::default()
            }
        );
    }

    #[test]
    fn every_chunking_gives_the_same_frames() {
        let (bytes, frames) = stream();
        for step in (1..=400).chain([1316, bytes.len()]) {
            let (out, stats) = demux_chunked(&bytes, step);
            assert_eq!(out, frames, "step {step}");
            assert_eq!(stats.resyncs + stats.skipped_bytes, 0);
        }
    }

    #[test]
    fn leading_garbage_is_skipped_and_counted() {
        let (bytes, frames) = stream();
        let mut input = vec![0x47; 1];
        input.extend((0..99).map(|i| i as u8 ^ 0x5a));
        input.extend_from_slice(&bytes);
        for step in [1, 7, 188, 1316] {
            let (out, stats) = demux_chunked(&input, step);
            assert_eq!(out, frames, "step {step}");
            assert_eq!((stats.resyncs, stats.skipped_bytes), (1, 100));
        }
    }

    #[test]
    fn garbage_inside_a_packet_costs_that_packets_pes() {
        let mut m = Mux::default();
        m.tables();
        let v1 = au(1, 1000);
        m.pes(VIDEO_PID, &pes(0xe0, 6000, Some(3000), &v1, false));
        let at = m.out.len() + 188 + 50; // in the 2nd packet of the second access unit
        m.pes(VIDEO_PID, &pes(0xe0, 9000, Some(6000), &au(2, 1000), false));
        m.pes(VIDEO_PID, &pes(0xe0, 12000, Some(9000), &au(3, 10), false));
        let mut input = m.out.clone();
        let garbage: Vec<u8> = (0..500u32).map(|i| (i * 7 + 3) as u8 | 0x80).collect();
        input.splice(at..at, garbage);
        for step in [1, 100, 1316] {
            let (out, stats) = demux_chunked(&input, step);
            let pts: Vec<u64> = out.iter().map(|f| f.pts).collect();
            assert_eq!(pts, [6000, 12000], "step {step}");
            assert_eq!(out[0].data, v1);
            assert_eq!(stats.resyncs, 1);
            // The packet's tail instead of the garbage it took in.
            assert_eq!(stats.skipped_bytes, 500);
            assert_eq!(stats.dropped_pes, 1);
            assert_eq!(stats.continuity_errors, 0);
        }
    }

    #[test]
    fn a_continuity_gap_drops_the_pes_it_is_in() {
        let mut m = Mux::default();
        m.tables();
        m.pes(VIDEO_PID, &pes(0xe0, 6000, Some(3000), &au(1, 1000), false));
        // The third packet of the next access unit is lost.
        let start = m.out.len();
        m.pes(VIDEO_PID, &pes(0xe0, 9000, Some(6000), &au(2, 1000), false));
        m.out.drain(start + 2 * 188..start + 3 * 188);
        m.pes(VIDEO_PID, &pes(0xe0, 12000, Some(9000), &au(3, 10), false));
        let (out, stats) = demux_chunked(&m.out, 1316);
        let pts: Vec<u64> = out.iter().map(|f| f.pts).collect();
        assert_eq!(pts, [6000, 12000]);
        assert_eq!((stats.continuity_errors, stats.dropped_pes), (1, 1));
    }

    #[test]
    fn a_duplicate_packet_is_skipped() {
        let mut m = Mux::default();
        m.tables();
        let start = m.out.len();
        let v1 = au(1, 1000);
        m.pes(VIDEO_PID, &pes(0xe0, 6000, Some(3000), &v1, false));
        let second: Vec<u8> = m.out[start + 188..start + 376].to_vec();
        m.out.splice(start + 376..start + 376, second);
        let (out, stats) = demux_chunked(&m.out, 1316);
        assert_eq!(out, [frame(TsStreamType::H264, VIDEO_PID, 6000, 3000, &v1)]);
        assert_eq!(stats.continuity_errors + stats.dropped_pes, 0);
    }

    #[test]
    fn a_pes_over_its_bound_is_dropped_and_the_next_starts_clean() {
        let mut m = Mux::default();
        m.tables();
        m.pes(
            AUDIO_PID,
            &pes(0xc0, 3000, None, &vec![1; MAX_AUDIO_PES], false),
        );
        m.pes(AUDIO_PID, &pes(0xc0, 4920, None, &[2; 100], true));
        m.pes(
            VIDEO_PID,
            &pes(0xe0, 6000, None, &au(1, MAX_AUDIO_PES), false),
        );
        let (out, stats) = demux_chunked(&m.out, 1316);
        let pts: Vec<u64> = out.iter().map(|f| f.pts).collect();
        assert_eq!(pts, [4920, 6000]);
        assert_eq!(stats.dropped_pes, 1);
    }

    #[test]
    fn the_pes_buffer_never_grows_past_the_bound() {
        let mut t = Track::new(AUDIO_PID, TsStreamType::Aac);
        let mut m = Mux::default();
        m.pes(
            AUDIO_PID,
            &pes(0xc0, 0, None, &vec![1; 2 * MAX_AUDIO_PES], false),
        );
        let (mut stats, mut out) = (TsStats::default(), Vec::new());
        for p in m.out.chunks(188) {
            t.packet(&Packet::new(p), &mut stats, &mut out);
            assert!(t.pes.capacity() <= MAX_AUDIO_PES);
        }
        assert_eq!(stats.dropped_pes, 1);
    }

    #[test]
    fn a_pes_header_split_across_packets_is_read() {
        let mut m = Mux::default();
        m.tables();
        let v1 = au(1, 500);
        m.pes_with_first(VIDEO_PID, &pes(0xe0, 6000, Some(3000), &v1, false), 5);
        let (out, _) = demux_chunked(&m.out, 1316);
        assert_eq!(out, [frame(TsStreamType::H264, VIDEO_PID, 6000, 3000, &v1)]);
    }

    #[test]
    fn a_pes_without_pts_is_dropped() {
        let mut m = Mux::default();
        m.tables();
        let mut p = pes(0xe0, 6000, None, &au(1, 100), false);
        p[7] = 0; // PTS_DTS_flags
        m.pes(VIDEO_PID, &p);
        m.pes(VIDEO_PID, &pes(0xe0, 9000, None, &au(2, 100), false));
        let (out, stats) = demux_chunked(&m.out, 1316);
        assert_eq!(out.len(), 1);
        assert_eq!(stats.dropped_pes, 1);
    }

    #[test]
    fn a_new_pmt_version_is_followed() {
        let mut m = Mux::default();
        m.tables();
        let v1 = au(1, 400);
        m.pes(VIDEO_PID, &pes(0xe0, 6000, None, &v1, false));
        // The same PMT again, then version 1: HEVC on another PID, MPEG-1 audio besides AAC.
        m.psi(PMT_PID, &pmt(1, 0, &[(0x1b, VIDEO_PID), (0x0f, AUDIO_PID)]));
        let streams = [
            (0x03, 0x102),
            (0x24, 0x103),
            (0x0f, AUDIO_PID),
            (0x1b, 0x104),
        ];
        m.psi(PMT_PID, &pmt(1, 1, &streams));
        m.psi(PMT_PID, &pmt(1, 1, &streams));
        let v2 = au(2, 400);
        m.pes(VIDEO_PID, &pes(0xe0, 9000, None, &v2, false));
        m.pes(0x103, &pes(0xe0, 9000, None, &v2, false));
        let (out, stats) = demux_chunked(&m.out, 1316);
        assert_eq!(
            out,
            [
                frame(TsStreamType::H264, VIDEO_PID, 6000, 6000, &v1),
                frame(TsStreamType::Hevc, 0x103, 9000, 9000, &v2),
            ]
        );
        assert_eq!(stats.unsupported_streams, 2);
    }

    #[test]
    fn a_corrupt_pmt_is_ignored_and_its_next_copy_taken() {
        let mut m = Mux::default();
        m.psi(0, &pat(&[(1, PMT_PID)]));
        let mut bad = pmt(1, 0, &[(0x1b, VIDEO_PID)]);
        bad[15] ^= 1;
        m.psi(PMT_PID, &bad);
        m.pes(VIDEO_PID, &pes(0xe0, 3000, None, &au(1, 100), false));
        m.psi(PMT_PID, &pmt(1, 0, &[(0x1b, VIDEO_PID)]));
        m.pes(VIDEO_PID, &pes(0xe0, 6000, None, &au(2, 100), false));
        let (out, _) = demux_chunked(&m.out, 1316);
        assert_eq!(out.iter().map(|f| f.pts).collect::<Vec<_>>(), [6000]);
    }

    #[test]
    fn only_the_first_program_is_demuxed() {
        let mut m = Mux::default();
        m.psi(0, &pat(&[(0, 0x10), (7, PMT_PID), (8, 0x1001)]));
        m.psi(PMT_PID, &pmt(7, 0, &[(0x1b, VIDEO_PID)]));
        m.psi(0x1001, &pmt(8, 0, &[(0x0f, AUDIO_PID)]));
        // A PMT for another program number on the PMT PID is not this program's.
        m.psi(PMT_PID, &pmt(8, 1, &[(0x0f, AUDIO_PID)]));
        m.pes(VIDEO_PID, &pes(0xe0, 3000, None, &au(1, 100), false));
        m.pes(AUDIO_PID, &pes(0xc0, 3000, None, &[1; 10], true));
        let (out, _) = demux_chunked(&m.out, 1316);
        assert_eq!(out.iter().map(|f| f.pid).collect::<Vec<_>>(), [VIDEO_PID]);
    }

    #[test]
    fn a_pmt_cannot_take_the_pat_pid() {
        let mut m = Mux::default();
        m.psi(0, &pat(&[(1, PMT_PID)]));
        m.psi(PMT_PID, &pmt(1, 0, &[(0x1b, 0), (0x0f, PMT_PID)]));
        m.psi(0, &pat(&[(1, PMT_PID)]));
        m.psi(PMT_PID, &pmt(1, 1, &[(0x1b, VIDEO_PID)]));
        m.pes(VIDEO_PID, &pes(0xe0, 3000, None, &au(1, 100), false));
        let (out, stats) = demux_chunked(&m.out, 1316);
        assert_eq!(out.len(), 1);
        assert_eq!(stats.unsupported_streams, 2);
    }

    #[test]
    fn a_scrambled_stream_is_an_error() {
        let mut m = Mux::default();
        m.tables();
        let start = m.out.len();
        m.pes(VIDEO_PID, &pes(0xe0, 3000, None, &au(1, 100), false));
        m.out[start + 3] |= 0x80;
        let mut d = TsDemuxer::new();
        let mut out = Vec::new();
        assert_eq!(
            d.push(&m.out, &mut out),
            Err(TsError::Scrambled { pid: VIDEO_PID })
        );
        d.finish(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn memory_stays_within_the_documented_bounds() {
        assert!(std::mem::size_of::<Option<Filter>>() <= 16);
        let mut d = TsDemuxer::new();
        let (bytes, _) = stream();
        let mut big = Vec::new();
        for _ in 0..100 {
            big.extend_from_slice(&bytes);
        }
        d.push(&big, &mut Vec::new()).unwrap();
        assert!(d.pending.capacity() <= 2 * (PUSH_PIECE + 2 * PACKET_SIZE));
    }

    #[test]
    fn no_sync_at_all_is_counted_not_an_error() {
        let mut d = TsDemuxer::new();
        let mut out = Vec::new();
        for _ in 0..100 {
            d.push(&[0x47; 1000][..1000 - 1], &mut out).unwrap();
            d.push(&[0u8; 1000], &mut out).unwrap();
            assert!(d.pending.len() <= 2 * PACKET_SIZE);
        }
        d.finish(&mut out);
        assert!(out.is_empty());
        let stats = d.stats();
        assert_eq!(stats.skipped_bytes + stats.packets * 188, 100 * 1999);
        assert_eq!(d.pending.len(), 0);
    }
}

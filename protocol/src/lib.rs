//! onair's formats, with no I/O: the server and the Wasm player drive the same code,
//! and tests drive it in memory.
//!
//! - [`wire`]: the WebSocket protocol between server and player (docs/protocol.md).
//! - [`flv`]: FLV audio/video tag headers as RTMP hands them over, including Enhanced RTMP.
//! - [`codec`]: H.264 (avcC, SPS, Annex B <-> AVCC) and AAC (AudioSpecificConfig, ADTS).
//! - [`fmp4`]: fragmented MP4 (CMAF) init segments and fragment headers, for MSE and LL-HLS.
//! - [`ts`]: MPEG-TS demuxing (H.264/HEVC and AAC), for SRT ingest.
//! - [`cmaf`]: pushed CMAF read back (init segments, moof/mdat to samples), for HTTP push.

pub mod cmaf;
pub mod codec;
pub mod flv;
pub mod fmp4;
pub mod ts;
pub mod wire;

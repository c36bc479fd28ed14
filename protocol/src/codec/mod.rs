//! Codec configuration: what a player needs to set up a decoder, and the conversions between
//! the bytestream forms that ingest and tests meet.

pub mod aac;
pub mod annexb;
pub mod av1;
pub mod avc;
pub mod hevc;
pub mod vp9;

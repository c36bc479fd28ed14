//! onair server: ingest (RTMP) → hub (renditions, GOP cache, fan-out) → delivery (WebSocket, API).

pub mod auth;
pub mod config;
pub mod delivery;
pub mod hls;
pub mod hub;
pub mod ingest;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod stats;
pub mod transcode;

//! Delivery: everything that reads from the hub. HTTP server and routes in [`http`], WebSocket
//! viewers in [`ws`].

pub mod abr;
pub mod framing;
pub mod hls;
pub mod http;
pub mod ws;

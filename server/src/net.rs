//! Listener and WebSocket upgrade helpers shared by every way in and out.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::{TcpListener, TcpStream};

use crate::hub::valid_stream_name;

/// The remote address of an HTTP connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Accepts the next connection. Accept errors (out of file descriptors, and the like) are
/// logged and followed by a short back-off instead of a busy loop.
pub async fn accept(listener: &TcpListener, what: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                return (tcp, peer);
            }
            Err(e) => {
                tracing::warn!(error = %e, "{what} accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The refusal for a request that cannot become a WebSocket on `stream`, if any: not an
/// upgrade (426, saying what the endpoint is), or a stream name outside the safe alphabet.
pub fn refuse_upgrade(req: &Request, stream: &str, what: &str) -> Option<Response> {
    if !fastwebsockets::upgrade::is_upgrade_request(req) {
        return Some(
            (
                StatusCode::UPGRADE_REQUIRED,
                [(header::UPGRADE, "websocket")],
                format!("this is a WebSocket endpoint for {what}: connect with ws://\n"),
            )
                .into_response(),
        );
    }
    if !valid_stream_name(stream) {
        return Some(
            (
                StatusCode::BAD_REQUEST,
                format!("invalid stream name {stream:?}\n"),
            )
                .into_response(),
        );
    }
    None
}

/// Upgrades the connection, or answers 400 with what was wrong with the handshake.
pub fn upgrade(
    req: &mut Request,
) -> Result<(Response, fastwebsockets::upgrade::UpgradeFut), Box<Response>> {
    match fastwebsockets::upgrade::upgrade(req) {
        Ok((response, fut)) => Ok((response.into_response(), fut)),
        Err(e) => Err(Box::new(
            (
                StatusCode::BAD_REQUEST,
                format!("bad WebSocket upgrade: {e}\n"),
            )
                .into_response(),
        )),
    }
}

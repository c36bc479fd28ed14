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

/// Whose browser pages may open a WebSocket here: the `Origin` refused, if it is.
///
/// Clients other than browsers send no `Origin` and pass: the check protects browser users
/// from pages that would use their browser. With `allowed_origins` set, only those pass.
/// Without it, play lets any page embed the player (`any_by_default`), and ingest only pages
/// of this server (the `Origin`'s host is the request's `Host`): a page elsewhere must not
/// publish from its visitors' browsers.
pub fn check_origin(
    headers: &axum::http::HeaderMap,
    allowed: &[String],
    any_by_default: bool,
) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("<non-ascii>");
    let pass = if !allowed.is_empty() {
        allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
    } else if any_by_default {
        true
    } else {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
    };
    if pass {
        Ok(())
    } else {
        Err(origin.to_string())
    }
}

/// The answer to a refused credential, before any upgrade: 401 or 403 with the reason. Counted
/// and logged with the address and stream, never with what was sent.
pub fn refuse_credentials(
    refusal: &crate::auth::Refusal,
    action: crate::auth::Action,
    protocol: &'static str,
    peer: SocketAddr,
    stream: &str,
) -> Response {
    crate::metrics::auth_refusal(action.name(), protocol, refusal.label());
    tracing::warn!(%peer, stream, protocol, reason = %refusal, "{} refused", action.name());
    let mut response = (
        refusal.status(),
        format!(
            "{}: {} refused: {refusal}\n",
            refusal.status().as_u16(),
            action.name()
        ),
    )
        .into_response();
    if refusal.status() == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
    }
    response
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

//! Who may publish, play and read: one policy for every way in and out.
//!
//! - **Publish** needs, when a stream has a `publish_key` (its own table's, else the `"*"`
//!   table's) or the server a `jwt_secret`, either that key or an HS256 token signed with the
//!   secret whose claims say `sub` = the stream (or `*`), `act` = `publish`, and an `exp` still
//!   ahead. With neither configured, publishing is open (the default, so `make run` and OBS
//!   work first try; the server says so at start-up when it listens beyond loopback).
//! - **Play** needs a token with `act` = `play` when the stream's table says `play = "token"`.
//! - **The hook** (`auth_hook_url`): where the key and tokens do not admit a publish (or a
//!   play that needs a token), onair POSTs the action, stream, protocol, client address and
//!   the credential it was given, as JSON, and admits on a 2xx answer (MediaMTX's
//!   authHTTPAddress, SRS's on_publish). Answers are kept for [`HOOK_CACHE`]; no answer within
//!   [`HOOK_TIMEOUT`] refuses.
//! - **Read** (`GET /api/*`, `/api/events`, `/dashboard`, `/metrics`) needs `read_token` when
//!   one is set; **admin** (the API's mutations) always needs `admin_token`.
//!
//! Credentials travel as `?token=` on every URL (RTMP: in the stream key, `STREAM?token=...`),
//! or as `Authorization: Bearer` for read and admin. Secrets are compared in constant time, and
//! a refusal names what was wrong without repeating what was sent.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use subtle::ConstantTimeEq;

use crate::config::{PlayPolicy, StreamSettings};

/// What a client asks to do with a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Publish,
    Play,
}

impl Action {
    /// The `act` claim that grants it, and the metric label.
    pub fn name(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Play => "play",
        }
    }
}

/// Why credentials were refused. The text is for the client: it never echoes the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("credentials required: add ?token= with the stream's key or a signed token")]
    Missing,
    #[error("wrong key or token")]
    Wrong,
    #[error("token expired")]
    Expired,
    #[error("token is for another stream")]
    OtherStream,
    #[error("token does not grant {0}")]
    OtherAction(&'static str),
    #[error("address not allowed")]
    Address,
    #[error("refused by the auth hook (HTTP {0})")]
    Hook(u16),
    #[error("the auth hook did not answer")]
    HookFailed,
}

impl Refusal {
    /// The `reason` label of `onair_auth_refusals_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Wrong => "wrong",
            Refusal::Expired => "expired",
            Refusal::OtherStream => "other_stream",
            Refusal::OtherAction(_) => "other_action",
            Refusal::Address => "address",
            Refusal::Hook(_) => "hook",
            Refusal::HookFailed => "hook_failed",
        }
    }

    /// 401 when nothing was sent (the client can retry with credentials), 503 when the hook
    /// did not answer, else 403.
    pub fn status(&self) -> axum::http::StatusCode {
        match self {
            Refusal::Missing => axum::http::StatusCode::UNAUTHORIZED,
            Refusal::HookFailed => axum::http::StatusCode::SERVICE_UNAVAILABLE,
            _ => axum::http::StatusCode::FORBIDDEN,
        }
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    act: String,
}

/// The resolved policy. Built once from the configuration.
#[derive(Clone, Default)]
pub struct Auth {
    jwt: Option<DecodingKey>,
    /// Stream name (or `*`) → its publish key.
    keys: BTreeMap<String, String>,
    /// Streams (or `*`) whose table says `play = "token"` or `"open"`.
    play: BTreeMap<String, PlayPolicy>,
    read_token: Option<String>,
    admin_token: Option<String>,
    hook: Option<Arc<Hook>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets themselves.
        f.debug_struct("Auth")
            .field("jwt", &self.jwt.is_some())
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .field("play", &self.play)
            .field("read_token", &self.read_token.is_some())
            .field("admin_token", &self.admin_token.is_some())
            .field("hook", &self.hook.as_ref().map(|h| h.url.to_string()))
            .finish()
    }
}

/// Seconds of clock difference a token's `exp` is given.
const LEEWAY_SECS: u64 = 5;

impl Auth {
    pub fn new(
        jwt_secret: Option<&str>,
        streams: &BTreeMap<String, StreamSettings>,
        read_token: Option<String>,
        admin_token: Option<String>,
        hook_url: Option<&str>,
    ) -> Result<Self, String> {
        let keys = streams
            .iter()
            .filter_map(|(name, s)| Some((name.clone(), s.publish_key.clone()?)))
            .collect();
        let play = streams
            .iter()
            .filter_map(|(name, s)| Some((name.clone(), s.play?)))
            .collect();
        let jwt = match jwt_secret {
            Some(s) => Some(DecodingKey::from_secret(s.as_bytes()).map_err(|e| e.to_string())?),
            None => None,
        };
        let hook = match hook_url {
            Some(url) => Some(Arc::new(Hook::new(url)?)),
            None => None,
        };
        Ok(Self {
            jwt,
            keys,
            play,
            read_token,
            admin_token,
            hook,
        })
    }

    /// Whether anyone who can reach a port may publish: no key, no token secret, no hook.
    pub fn publish_is_open(&self) -> bool {
        self.jwt.is_none() && self.keys.is_empty() && self.hook.is_none()
    }

    /// May this client do `action` on `stream`? The key and tokens first, then the hook.
    pub async fn admit(
        &self,
        action: Action,
        stream: &str,
        protocol: &'static str,
        peer: SocketAddr,
        token: Option<&str>,
    ) -> Result<(), Refusal> {
        let local = match action {
            Action::Publish => self.publish(stream, token),
            Action::Play => self.play(stream, token),
        };
        match (local, &self.hook) {
            (Err(_), Some(hook)) => {
                let ask = HookRequest {
                    action: action.name(),
                    stream,
                    protocol,
                    addr: peer.ip(),
                    token,
                };
                hook.ask(&ask).await
            }
            (local, _) => local,
        }
    }

    /// Whether some stream's play needs a token (then the secret must be set to sign them).
    pub fn play_needs_tokens(&self) -> bool {
        self.play.values().any(|p| *p == PlayPolicy::Token)
    }

    fn per_stream<'a, T>(map: &'a BTreeMap<String, T>, stream: &str) -> Option<&'a T> {
        map.get(stream).or_else(|| map.get("*"))
    }

    /// May `token` publish `stream`?
    pub fn publish(&self, stream: &str, token: Option<&str>) -> Result<(), Refusal> {
        let key = Self::per_stream(&self.keys, stream);
        if key.is_none() && self.jwt.is_none() {
            // Only a hook can admit it then.
            return if self.hook.is_some() {
                Err(Refusal::Missing)
            } else {
                Ok(())
            };
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(Refusal::Missing)?;
        if key.is_some_and(|k| same(k, token)) {
            return Ok(());
        }
        self.token(stream, Action::Publish, token)
    }

    /// May `token` play `stream`?
    pub fn play(&self, stream: &str, token: Option<&str>) -> Result<(), Refusal> {
        if Self::per_stream(&self.play, stream) != Some(&PlayPolicy::Token) {
            return Ok(());
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(Refusal::Missing)?;
        self.token(stream, Action::Play, token)
    }

    /// Whether the stream's play needs a token (its HLS playlists then carry it on).
    pub fn play_is_protected(&self, stream: &str) -> bool {
        Self::per_stream(&self.play, stream) == Some(&PlayPolicy::Token)
    }

    /// Checks a signed token's signature, expiry and claims.
    fn token(&self, stream: &str, action: Action, token: &str) -> Result<(), Refusal> {
        let Some(key) = &self.jwt else {
            // No secret to check a token with: a hook may still admit it.
            return Err(Refusal::Wrong);
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let claims =
            jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => Refusal::Expired,
                    _ => Refusal::Wrong,
                }
            })?;
        if claims.claims.sub != stream && claims.claims.sub != "*" {
            return Err(Refusal::OtherStream);
        }
        if claims.claims.act != action.name() {
            return Err(Refusal::OtherAction(action.name()));
        }
        Ok(())
    }

    /// May this credential (a Bearer header or `?token=`) read the API, the feed and the
    /// metrics? The admin token may too.
    pub fn read(&self, given: Option<&str>) -> Result<(), Refusal> {
        let Some(t) = &self.read_token else {
            return Ok(());
        };
        match (check_secret(t, given), &self.admin_token) {
            (Err(Refusal::Wrong), Some(admin)) => check_secret(admin, given),
            (r, _) => r,
        }
    }

    /// Whether reading needs a token.
    pub fn read_is_protected(&self) -> bool {
        self.read_token.is_some()
    }

    /// May this credential call the API's mutations? Without an `admin_token`, nobody may.
    pub fn admin(&self, bearer: Option<&str>) -> Result<(), Option<Refusal>> {
        match &self.admin_token {
            None => Err(None),
            Some(t) => check_secret(t, bearer).map_err(Some),
        }
    }
}

/// What the hook is told, as JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HookRequest<'a> {
    pub action: &'static str,
    pub stream: &'a str,
    pub protocol: &'static str,
    pub addr: IpAddr,
    pub token: Option<&'a str>,
}

/// How long the hook has to answer.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an answer is kept: a player's HLS requests, or a publisher's reconnects, ask once.
pub const HOOK_CACHE: Duration = Duration::from_secs(5);
/// Answers kept at most; beyond it the expired ones go, then all.
const HOOK_CACHE_ENTRIES: usize = 4096;

/// The HTTP auth hook and its cache of recent answers.
pub struct Hook {
    url: hyper::Uri,
    client: Client<HttpConnector, Full<Bytes>>,
    /// The request's JSON (action, stream, protocol, address, token) → its answer.
    cache: parking_lot::Mutex<HashMap<String, Answer>>,
}

/// When the hook answered, and what: admitted, or the refusal.
type Answer = (Instant, Result<(), Refusal>);

impl Hook {
    fn new(url: &str) -> Result<Self, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("auth_hook_url: {e}"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            return Err(format!(
                "auth_hook_url {url:?}: use http://HOST[:PORT]/PATH (the hook is a local service)"
            ));
        }
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        Ok(Self {
            url: uri,
            client,
            cache: Default::default(),
        })
    }

    async fn ask(&self, req: &HookRequest<'_>) -> Result<(), Refusal> {
        let body = serde_json::to_string(req).unwrap_or_default();
        let now = Instant::now();
        if let Some((at, answer)) = self.cache.lock().get(&body)
            && now.duration_since(*at) < HOOK_CACHE
        {
            return answer.clone();
        }
        let request = hyper::Request::post(self.url.clone())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.clone())));
        let Ok(request) = request else {
            return Err(Refusal::HookFailed);
        };
        let answer = match tokio::time::timeout(HOOK_TIMEOUT, self.client.request(request)).await {
            Ok(Ok(r)) if r.status().is_success() => Ok(()),
            Ok(Ok(r)) => Err(Refusal::Hook(r.status().as_u16())),
            Ok(Err(e)) => {
                tracing::warn!(url = %self.url, error = %e, "auth hook unreachable: refused");
                Err(Refusal::HookFailed)
            }
            Err(_) => {
                tracing::warn!(url = %self.url, "auth hook did not answer within 2 s: refused");
                Err(Refusal::HookFailed)
            }
        };
        if answer != Err(Refusal::HookFailed) {
            let mut cache = self.cache.lock();
            if cache.len() >= HOOK_CACHE_ENTRIES {
                cache.retain(|_, (at, _)| now.duration_since(*at) < HOOK_CACHE);
                if cache.len() >= HOOK_CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(body, (now, answer.clone()));
        }
        answer
    }
}

fn check_secret(secret: &str, given: Option<&str>) -> Result<(), Refusal> {
    match given.filter(|g| !g.is_empty()) {
        None => Err(Refusal::Missing),
        Some(g) if same(secret, g) => Ok(()),
        Some(_) => Err(Refusal::Wrong),
    }
}

/// Constant time in the contents (a length difference shows, which says nothing useful).
fn same(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// The credential of an `Authorization: Bearer ...` header; the scheme is matched without
/// regard to case (RFC 9110, 11.1).
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start())
}

/// The `token` parameter of a query string (`a=1&token=...`), percent-decoded.
pub fn token_in_query(query: &str) -> Option<String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find_map(|(k, v)| (k == "token").then_some(v))
}

/// Splits an RTMP stream key (`NAME?token=...`, as OBS's Stream Key field takes it) into the
/// stream name and its token.
pub fn split_stream_key(key: &str) -> (&str, Option<String>) {
    match key.split_once('?') {
        Some((name, query)) => (name, token_in_query(query)),
        None => (key, None),
    }
}

/// Whether `addr` is one of `allow` (addresses, or networks as `ADDR/BITS`). Checked by
/// `Config::validate`, so every entry parses.
pub fn address_allowed(allow: &[String], addr: std::net::IpAddr) -> bool {
    allow
        .iter()
        .any(|a| network_contains(a, addr).unwrap_or(false))
}

/// `None` when `entry` is not an address or network.
pub fn network_contains(entry: &str, addr: std::net::IpAddr) -> Option<bool> {
    use std::net::IpAddr;
    let (ip, bits) = match entry.split_once('/') {
        Some((ip, bits)) => (ip.parse::<IpAddr>().ok()?, Some(bits.parse::<u32>().ok()?)),
        None => (entry.parse::<IpAddr>().ok()?, None),
    };
    // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d.
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    Some(match (ip, addr) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let bits = bits.unwrap_or(32);
            if bits > 32 {
                return None;
            }
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let bits = bits.unwrap_or(128);
            if bits > 128 {
                return None;
            }
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    const SECRET: &str = "a-test-secret-of-some-length";

    fn token(sub: &str, act: &str, exp_from_now: i64) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let claims = serde_json::json!({ "sub": sub, "act": act, "exp": now + exp_from_now });
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()).expect("key"),
        )
        .expect("encode")
    }

    fn streams(toml: &str) -> BTreeMap<String, StreamSettings> {
        toml::from_str(toml).expect("streams")
    }

    #[test]
    fn with_nothing_configured_everything_is_open() {
        let auth = Auth::new(None, &BTreeMap::new(), None, None, None).expect("auth");
        assert!(auth.publish_is_open());
        assert_eq!(auth.publish("cam", None), Ok(()));
        assert_eq!(auth.play("cam", None), Ok(()));
        assert_eq!(auth.read(None), Ok(()));
        assert_eq!(auth.admin(Some("x")), Err(None), "admin needs a token");
    }

    #[test]
    fn a_publish_key_admits_its_stream_and_the_star_table_the_others() {
        let s = streams("[cam]\npublish_key = \"k1\"\n[\"*\"]\npublish_key = \"k2\"\n");
        let auth = Auth::new(None, &s, None, None, None).expect("auth");
        assert_eq!(auth.publish("cam", Some("k1")), Ok(()));
        assert_eq!(auth.publish("cam", Some("k2")), Err(Refusal::Wrong));
        assert_eq!(auth.publish("cam", None), Err(Refusal::Missing));
        assert_eq!(auth.publish("cam", Some("")), Err(Refusal::Missing));
        assert_eq!(auth.publish("other", Some("k2")), Ok(()));
        assert_eq!(auth.publish("other", Some("k1")), Err(Refusal::Wrong));
    }

    #[test]
    fn tokens_are_checked_for_signature_expiry_stream_and_action() {
        let s = streams("[cam]\nplay = \"token\"\n");
        let auth = Auth::new(Some(SECRET), &s, None, None, None).expect("auth");
        assert!(!auth.publish_is_open());
        assert_eq!(
            auth.publish("cam", Some(&token("cam", "publish", 60))),
            Ok(())
        );
        assert_eq!(
            auth.publish("any", Some(&token("*", "publish", 60))),
            Ok(())
        );
        assert_eq!(
            auth.publish("cam", Some(&token("cam", "publish", -60))),
            Err(Refusal::Expired)
        );
        assert_eq!(
            auth.publish("cam", Some(&token("dog", "publish", 60))),
            Err(Refusal::OtherStream)
        );
        assert_eq!(
            auth.publish("cam", Some(&token("cam", "play", 60))),
            Err(Refusal::OtherAction("publish"))
        );
        assert_eq!(auth.publish("cam", Some("not.a.jwt")), Err(Refusal::Wrong));
        // One signature character changed (in the middle: each of those carries six bits of
        // the signature, where the last one's low bits are padding).
        let good = token("cam", "publish", 60);
        let at = good.len() - 10;
        let was = good.as_bytes()[at];
        let forged = format!(
            "{}{}{}",
            &good[..at],
            if was == b'A' { 'B' } else { 'A' },
            &good[at + 1..]
        );
        assert_eq!(auth.publish("cam", Some(&forged)), Err(Refusal::Wrong));

        // Play: only where the table asks for it.
        assert_eq!(auth.play("cam", None), Err(Refusal::Missing));
        assert_eq!(auth.play("cam", Some(&token("cam", "play", 60))), Ok(()));
        assert_eq!(
            auth.play("cam", Some(&token("cam", "publish", 60))),
            Err(Refusal::OtherAction("play"))
        );
        assert_eq!(auth.play("open-one", None), Ok(()));
    }

    #[test]
    fn read_and_admin_tokens_take_a_bearer_header_of_any_case() {
        let auth = Auth::new(
            None,
            &BTreeMap::new(),
            Some("r".into()),
            Some("a".into()),
            None,
        )
        .expect("auth");
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(auth.read(bearer(&h)), Err(Refusal::Missing));
        for v in ["Bearer r", "bearer r", "BEARER  r"] {
            h.insert(
                axum::http::header::AUTHORIZATION,
                v.parse().expect("header"),
            );
            assert_eq!(auth.read(bearer(&h)), Ok(()), "{v}");
        }
        h.insert(
            axum::http::header::AUTHORIZATION,
            "Basic r".parse().expect("header"),
        );
        assert_eq!(auth.read(bearer(&h)), Err(Refusal::Missing));
        assert_eq!(auth.admin(Some("r")), Err(Some(Refusal::Wrong)));
        assert_eq!(auth.admin(Some("a")), Ok(()));
        assert_eq!(auth.read(Some("a")), Ok(()), "the admin token reads too");
        assert_eq!(auth.read(Some("x")), Err(Refusal::Wrong));
    }

    #[test]
    fn tokens_come_from_queries_and_rtmp_stream_keys() {
        assert_eq!(token_in_query("a=1&token=x%2By"), Some("x+y".into()));
        assert_eq!(token_in_query("a=1"), None);
        assert_eq!(
            split_stream_key("cam?token=abc"),
            ("cam", Some("abc".into()))
        );
        assert_eq!(split_stream_key("cam"), ("cam", None));
        assert_eq!(split_stream_key("cam?x=1"), ("cam", None));
    }

    #[test]
    fn allow_lists_take_addresses_and_networks() {
        let allow = vec!["10.0.0.0/8".to_string(), "192.168.1.20".to_string()];
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        assert!(address_allowed(&allow, ip("10.1.2.3")));
        assert!(address_allowed(&allow, ip("::ffff:10.1.2.3")));
        assert!(address_allowed(&allow, ip("192.168.1.20")));
        assert!(!address_allowed(&allow, ip("192.168.1.21")));
        assert!(!address_allowed(&allow, ip("11.0.0.1")));
        assert!(address_allowed(&["0.0.0.0/0".into()], ip("1.2.3.4")));
        assert_eq!(network_contains("10.0.0.0/33", ip("10.0.0.1")), None);
        assert_eq!(network_contains("nonsense", ip("10.0.0.1")), None);
    }
}

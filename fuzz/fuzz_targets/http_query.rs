//! What an HTTP client's request line and headers reach before any stream is looked up: the
//! query of every handler (LL-HLS playlists, media files, play, WebSocket ingest, the viewer
//! table), extracted as axum's `Query` extracts it, the LL-HLS query check, HLS file names and
//! `Range` headers, the `token` parameter, RTMP stream keys, the `Authorization` header and
//! `allow` list entries. Nothing may panic, and what each parser returns must hold together.
#![no_main]

use axum::extract::Query;
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use libfuzzer_sys::fuzz_target;
use onair_server::auth::{bearer, network_contains, split_stream_key, token_in_query};
use onair_server::delivery::hls::{File, FileQuery, PlaylistQuery, parse_file, parse_range};

/// One input is text, a field per line, as the seeds in `fuzz/corpus/http_query/` show.
struct Input {
    /// A request target, `/path?query` (also taken as an RTMP stream key).
    target: String,
    /// A `Range` header's value, and the size of the file it is over.
    range: String,
    total: u64,
    /// The last segment of the playlist the query is checked against.
    last_msn: u64,
    authorization: Vec<u8>,
    /// An `allow` list entry, and a client address it is checked against.
    allow: String,
    addr: std::net::IpAddr,
}

impl Input {
    fn parse(data: &[u8]) -> Input {
        let mut lines = data.split(|&b| b == b'\n');
        let mut text = || String::from_utf8_lossy(lines.next().unwrap_or_default()).into_owned();
        let target = text();
        let range = text();
        let authorization = text().into_bytes();
        let total = text().trim().parse().unwrap_or(1000);
        let last_msn = text().trim().parse().unwrap_or(5);
        let allow = text();
        let addr = text().trim().parse().unwrap_or([127, 0, 0, 1].into());
        Input {
            target,
            range,
            total,
            last_msn,
            authorization,
            allow,
            addr,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let input = Input::parse(data);
    if let Ok(uri) = input.target.parse::<Uri>() {
        if let Ok(Query(q)) = Query::<PlaylistQuery>::try_from_uri(&uri)
            && let Ok(ask) = q.check(input.last_msn)
            && let Some((msn, _)) = ask.block
        {
            assert!(
                msn <= input.last_msn.saturating_add(2),
                "held for {msn} past {}",
                input.last_msn
            );
        }
        let file_query = Query::<FileQuery>::try_from_uri(&uri);
        let _ = Query::<onair_server::delivery::ws::PlayQuery>::try_from_uri(&uri);
        let _ = Query::<onair_server::ingest::ws::PushQuery>::try_from_uri(&uri);
        let _ = Query::<onair_server::stats::Page>::try_from_uri(&uri);
        // The read guard and the HLS handlers must agree on a request's token.
        let token = uri.query().and_then(token_in_query);
        if let Ok(Query(q)) = file_query
            && let Some(t) = q.token.as_deref()
        {
            assert_eq!(token.as_deref(), Some(t));
        }
        if let Some(file) = uri.path().rsplit('/').next().and_then(parse_file) {
            let name = match &file {
                File::Init(id) => format!("init{id}.mp4"),
                File::Segment(n) => format!("s{n}.m4s"),
                File::Part(n) => format!("p{n}.m4s"),
            };
            assert_eq!(parse_file(&name), Some(file));
        }
    }
    let (name, _) = split_stream_key(&input.target);
    assert!(!name.contains('?'));
    if let Some(Some((start, end))) = parse_range(&input.range, input.total) {
        assert!(
            start < end && end <= input.total,
            "{start}..{end} of {}",
            input.total
        );
    }
    if let Ok(v) = HeaderValue::from_bytes(&input.authorization) {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, v);
        let _ = bearer(&h);
    }
    let _ = network_contains(&input.allow, input.addr);
});

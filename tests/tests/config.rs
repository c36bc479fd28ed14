//! Configuration: `--help` documents every key; unknown keys and bad values stop start-up with
//! a clear error; TOML and ONAIR_* variables work.

use std::process::Command;

use onair_tests::{Profile, Publisher, Server, onair_bin};

const KEYS: &[&str] = &[
    "rtmp",
    "http",
    "rtmp_app",
    "srt",
    "srt_passphrase",
    "srt_latency_ms",
    "max_backlog_bytes",
    "max_lag_ms",
    "stall_timeout_ms",
    "rtmp_handshake_timeout_ms",
    "rtmp_idle_timeout_ms",
    "allowed_origins",
    "log",
    "config",
];

fn onair(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(onair_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run onair");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[test]
fn help_documents_every_key() {
    let (code, help) = onair(&["--help"], &[]);
    assert_eq!(code, Some(0));
    for key in KEYS {
        let flag = format!("--{}", key.replace('_', "-"));
        let env = format!("ONAIR_{}", key.to_uppercase());
        assert!(help.contains(&flag), "--help lacks {flag}");
        assert!(help.contains(&env), "--help lacks {env}");
    }
    assert!(help.contains("0.0.0.0:1935") && help.contains("0.0.0.0:8080"));
}

#[test]
fn unknown_keys_and_bad_values_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("onair-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "http = \"127.0.0.1:0\"\nstal_timeout_ms = 5\n").expect("write");
    let (code, out) = onair(&["--config", bad.to_str().expect("utf8")], &[]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("unknown field `stal_timeout_ms`"), "{out}");

    let (code, out) = onair(&[], &[("ONAIR_HTTP", "not-an-address")]);
    assert_ne!(code, Some(0));
    assert!(
        out.contains("invalid value 'not-an-address'") && out.contains("--http"),
        "{out}"
    );

    let (code, out) = onair(&[], &[("ONAIR_HTTTP", "127.0.0.1:1")]);
    assert_eq!(code, Some(2));
    assert!(
        out.contains("unknown environment variable ONAIR_HTTTP"),
        "{out}"
    );

    let (code, out) = onair(&["--max-backlog-bytes", "5"], &[]);
    assert_eq!(code, Some(2));
    assert!(
        out.contains("invalid max_backlog_bytes: must be at least 65536"),
        "{out}"
    );

    let (code, out) = onair(&["--config", "/nonexistent/onair.toml"], &[]);
    assert_eq!(code, Some(2));
    assert!(
        out.contains("cannot read config file /nonexistent/onair.toml"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn toml_file_and_env_configure_the_server() {
    let dir = std::env::temp_dir().join(format!("onair-config-ok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let file = dir.join("onair.toml");
    std::fs::write(&file, "rtmp_app = \"studio\"\nmax_lag_ms = 1500\n").expect("write");
    let file = file.to_str().expect("utf8");
    let t = std::time::Duration::from_secs(10);

    // The file sets the RTMP app: publishing to the default "live" is refused.
    let server = Server::start(&["--config", file]).await;
    let publisher = Publisher::start(
        &format!("rtmp://{}/live/x", server.rtmp),
        Profile::default(),
    );
    let (status, _) = publisher.wait_exit(t).await;
    assert!(!status.success());
    server.wait_log("unknown RTMP app \"live\"", t).await;
    drop(server);

    // An ONAIR_* variable beats the file: now "studio" is refused and "tv" is served.
    let server = Server::start_with_env(&["--config", file], &[("ONAIR_RTMP_APP", "tv")]).await;
    let refused = Publisher::start(
        &format!("rtmp://{}/studio/x", server.rtmp),
        Profile::default(),
    );
    let (status, _) = refused.wait_exit(t).await;
    assert!(!status.success());
    server.wait_log("unknown RTMP app \"studio\"", t).await;
    let _ok = Publisher::start(&format!("rtmp://{}/tv/x", server.rtmp), Profile::default());
    server.wait_log("publishing", t).await;
    let _ = std::fs::remove_dir_all(&dir);
}

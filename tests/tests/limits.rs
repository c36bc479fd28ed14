//! Limits on what clients can take from the server.

use onair_tests::{Server, metric, onair_bin};

/// (soft, hard) "Max open files" of a process, from /proc.
fn open_files(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let mut n = line
        .split_whitespace()
        .filter_map(|w| w.parse::<u64>().ok());
    (n.next().expect("soft"), n.next().expect("hard"))
}

#[tokio::test]
async fn the_open_file_limit_is_raised_to_the_hard_limit() {
    // Started as a stock Debian login starts it: a soft limit of 1024.
    let dir = onair_tests::browser::artifacts_dir().join(format!("limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create dir");
    let wrapper = dir.join("onair-1024");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nulimit -S -n 1024\nexec {} \"$@\"\n",
            onair_bin().display()
        ),
    )
    .expect("write wrapper");
    let chmod = std::process::Command::new("chmod")
        .args(["+x", &wrapper.to_string_lossy()])
        .status()
        .expect("chmod");
    assert!(chmod.success());
    let server = Server::start_bin(&wrapper, &[], &[]).await;
    let (soft, hard) = open_files(server.pid());
    assert!(
        hard > 1024,
        "this machine's hard limit is {hard}: nothing to raise"
    );
    assert_eq!(soft, hard, "raised from 1024 to the hard limit");
    let (_, metrics) = onair_tests::http_get(&server.http, "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(
        metric(&metrics, "onair_open_files_limit"),
        Some(hard as f64),
        "{metrics}"
    );
    server
        .wait_log(&format!("limit={hard}"), std::time::Duration::from_secs(5))
        .await;
}

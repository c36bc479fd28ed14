//! node-media-server 4.4.3, the comparison peer: installed from npm into a local folder (once,
//! idempotently) and run with its own CLI on ephemeral loopback ports.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{BoxError, free_port};

pub const VERSION: &str = "4.4.3";

/// Installs node-media-server into `dir` unless that version is already there; returns the
/// path of its `bin/app.js`.
pub async fn install(dir: &Path) -> Result<PathBuf, BoxError> {
    let pkg = dir.join("node_modules/node-media-server");
    let app = pkg.join("bin/app.js");
    let installed = std::fs::read_to_string(pkg.join("package.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .is_some_and(|v| v["version"] == VERSION);
    if installed && app.exists() {
        return Ok(app);
    }
    for tool in ["node", "npm"] {
        let ok = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if !ok {
            return Err(format!("{tool} is not installed: run scripts/setup.sh bench").into());
        }
    }
    std::fs::create_dir_all(dir)?;
    let out = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--loglevel", "error"])
        .args(["--prefix"])
        .arg(dir)
        .arg(format!("node-media-server@{VERSION}"))
        .output()
        .await?;
    if !out.status.success() || !app.exists() {
        return Err(format!(
            "npm install node-media-server@{VERSION} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(app)
}

/// A running node-media-server, killed on drop.
pub struct Nms {
    child: Child,
    pub rtmp: String,
    pub http: String,
    _data: tempdir::Dir,
}

mod tempdir {
    /// A scratch folder removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Nms {
    pub async fn start(app: &Path) -> Result<Nms, BoxError> {
        let (rtmp_port, http_port) = (free_port()?, free_port()?);
        let data = tempdir::Dir(std::env::temp_dir().join(format!(
            "onair-bench-nms-{}-{rtmp_port}",
            std::process::id()
        )));
        std::fs::create_dir_all(&data.0)?;
        let config = serde_json::json!({
            "bind": "127.0.0.1",
            "rtmp": { "port": rtmp_port },
            "http": { "port": http_port },
            "webadmin": { "enable": false },
            "auth": { "play": false, "publish": false, "secret": "bench" },
            "store": { "path": data.0.join("store"), "maxHistory": 100 },
            "record": { "auto": false, "path": data.0.join("record") },
        });
        let config_path = data.0.join("config.json");
        std::fs::write(&config_path, config.to_string())?;
        let mut child = Command::new("node")
            .arg(app)
            .arg("-c")
            .arg(&config_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("stdout")?;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let (mut ws, mut rtmp) = (false, false);
            let mut ready_tx = Some(ready_tx);
            // Keep draining its log (one line per session) so it never blocks on the pipe.
            while let Ok(Some(line)) = lines.next_line().await {
                ws |= line.contains("WebSocket server listening");
                rtmp |= line.contains("Rtmp Server listening");
                if ws
                    && rtmp
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(20), ready_rx)
            .await
            .map_err(|_| "node-media-server did not start within 20 s")?
            .map_err(|_| "node-media-server exited at start")?;
        Ok(Nms {
            child,
            rtmp: format!("127.0.0.1:{rtmp_port}"),
            http: format!("127.0.0.1:{http_port}"),
            _data: data,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

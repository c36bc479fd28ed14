//! Real headless Chromium (Debian's `chromium` + `chromium-driver`) driven over WebDriver, for
//! end-to-end tests of the Wasm player and the web pages.
//!
//! Each [`Browser`] owns one chromedriver on its own port (loopback, or the address of the
//! network namespace it runs in) and one Chromium with a fresh
//! profile, both under a private temporary folder, so several can run at once. Dropping a
//! `Browser` kills chromedriver and Chromium; [`Browser::close`] ends the session in order.
//!
//! * Scripts: [`Browser::eval`] runs a synchronous script (`return …`), [`Browser::eval_async`]
//!   an asynchronous one (its callback is the last entry of `arguments`), and
//!   [`Browser::wait_for`] waits inside the page for an expression to become truthy. The
//!   WebDriver script timeout is set explicitly for every call.
//! * Console: Chromium's browser log (`goog:loggingPrefs`), read through chromedriver's
//!   `/se/log` endpoint, so it also holds what a page printed before any hook could be installed,
//!   uncaught exceptions and failed loads. See [`Browser::console_log`].
//! * Screenshots: [`Browser::screenshot`] and [`Browser::screenshot_element`] save a PNG under
//!   `target/test-artifacts/` and return decoded pixels with statistics ([`Screenshot`]).
//!
//! Missing browsers are failures, never skips: `make test` installs them (scripts/setup.sh).

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use fantoccini::wd::{Capabilities, TimeoutConfiguration, WebDriverCompatibleCommand};
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::{BoxError, free_port};

/// Chromium binary, unless `$E2E_CHROMIUM` names another.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// chromedriver binary, unless `$E2E_CHROMEDRIVER` names another.
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The page's viewport (CSS pixels; device scale factor 1), so viewport screenshots are this size.
pub const VIEWPORT: (u32, u32) = (1280, 800);
/// Script timeout of [`Browser::eval`] and [`Browser::eval_async`].
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Page-load timeout of [`Browser::goto`].
pub const PAGE_LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long chromedriver may take to answer `/status` with `ready: true`.
const DRIVER_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long Chromium may take to start and open the session.
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);
/// Extra time given to chromedriver beyond a script's own deadline before the harness gives up
/// on the command (chromedriver should have answered "script timeout" by then).
const COMMAND_GRACE: Duration = Duration::from_secs(10);
/// How many lines of the driver's log and of the console go into error messages.
const TAIL_LINES: usize = 30;

/// Flags for Chromium. `--user-data-dir` is added per browser.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--autoplay-policy=no-user-gesture-required",
    // This machine's network is closed: without these, Chromium keeps trying Google's hosts.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--mute-audio",
    "--window-size=1280,800",
    // A player must not be throttled.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
];

/// A headless Chromium behind its own chromedriver. Killed on drop.
pub struct Browser {
    client: Client,
    driver: Driver,
    port: u16,
    dir: PathBuf,
    closed: bool,
    /// The session's current script timeout; held while a script runs so that a concurrent call
    /// cannot change it underneath.
    script_timeout: tokio::sync::Mutex<Duration>,
    /// Console entries read from the driver so far (reading drains the driver's buffer).
    console: Mutex<Vec<ConsoleEntry>>,
}

/// One entry of the browser's log: `console.*` calls, uncaught exceptions, failed loads.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsoleEntry {
    /// `DEBUG`, `INFO`, `WARNING` or `SEVERE` (`console.error` and exceptions).
    pub level: String,
    /// `console-api`, `javascript`, `network`, …
    pub source: String,
    /// As Chromium formats it: the script URL, `line:column`, then the logged values (strings
    /// are quoted).
    pub message: String,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

impl fmt::Display for ConsoleEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{} {}] {}", self.level, self.source, self.message)
    }
}

impl Browser {
    /// Starts chromedriver on a free loopback port, waits until it is ready and opens a session
    /// with a new headless Chromium on a fresh profile.
    ///
    /// Fails (never skips) when Chromium or chromedriver is missing.
    pub async fn start() -> Result<Browser, BoxError> {
        Self::start_at(None).await
    }

    /// Like [`Browser::start`], with chromedriver and Chromium inside the network namespace
    /// `ns` (`ip netns exec`): the page reaches only what that namespace routes to, through
    /// its veth. The test drives chromedriver at the namespace's address.
    pub async fn start_in_netns(ns: &crate::netns::Netns) -> Result<Browser, BoxError> {
        Self::start_at(Some(ns)).await
    }

    async fn start_at(ns: Option<&crate::netns::Netns>) -> Result<Browser, BoxError> {
        let chromium = tool_path("E2E_CHROMIUM", CHROMIUM)?;
        let chromedriver = tool_path("E2E_CHROMEDRIVER", CHROMEDRIVER)?;
        let dir = fresh_dir()?;
        let started = Self::start_in(&chromium, &chromedriver, &dir, ns).await;
        if started.is_err() {
            remove_dir(&dir);
        }
        started
    }

    async fn start_in(
        chromium: &Path,
        chromedriver: &Path,
        dir: &Path,
        ns: Option<&crate::netns::Netns>,
    ) -> Result<Browser, BoxError> {
        let host = ns.map_or("127.0.0.1".to_string(), |n| n.inner_addr().to_string());
        let profile = dir.join("profile");
        std::fs::create_dir_all(&profile)?;
        let mut last_err: Option<BoxError> = None;
        // The port is found by binding and releasing it. Should another process take it in
        // between, chromedriver exits at once, and the next attempt takes another port.
        for attempt in 0..3 {
            let port = free_port()?;
            let mut driver = spawn_driver(chromedriver, port, dir, attempt > 0, ns)?;
            match wait_driver_ready(&mut driver.child, &host, port, dir).await {
                Ok(()) => {}
                Err(DriverStart::Exited(e)) => {
                    driver.kill(dir);
                    last_err = Some(e);
                    continue;
                }
                Err(DriverStart::Failed(e)) => {
                    driver.kill(dir);
                    return Err(e);
                }
            }
            let client = match open_session(chromium, &profile, &host, port).await {
                Ok(c) => c,
                Err(e) => {
                    driver.kill(dir);
                    return Err(fail(format!(
                        "could not open a Chromium session through chromedriver on port {port}: \
                         {e}\n{}",
                        driver_log_tail(dir)
                    )));
                }
            };
            let browser = Browser {
                client,
                driver,
                port,
                dir: dir.to_path_buf(),
                closed: false,
                script_timeout: tokio::sync::Mutex::new(SCRIPT_TIMEOUT),
                console: Mutex::new(Vec::new()),
            };
            browser.fit_viewport().await?;
            return Ok(browser);
        }
        Err(last_err.unwrap_or_else(|| fail("chromedriver did not start")))
    }

    /// Ends the session (Chromium quits), stops chromedriver and removes the temporary folder.
    pub async fn close(mut self) -> Result<(), BoxError> {
        let ended =
            tokio::time::timeout(Duration::from_secs(10), self.client.clone().close()).await;
        self.kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.driver.child.wait()).await;
        let result = match ended {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(fail(format!(
                "ending the WebDriver session: {e}\n{}",
                self.driver_log()
            ))),
            Err(_) => Err(fail(format!(
                "chromedriver did not end the session within 10 s\n{}",
                self.driver_log()
            ))),
        };
        if result.is_ok() {
            remove_dir(&self.dir);
        } else {
            // Keep chromedriver's log for the error; the profile is of no use.
            remove_dir(&self.dir.join("profile"));
        }
        result
    }

    /// Grows the window so that the page's viewport is [`VIEWPORT`] (`--window-size` sets the
    /// window, and the new headless mode takes its simulated browser UI off that).
    async fn fit_viewport(&self) -> Result<(), BoxError> {
        let (w, h) = VIEWPORT;
        for _ in 0..3 {
            let v = self
                .eval("return [window.innerWidth, window.innerHeight]")
                .await?;
            let n = |i: usize| v.get(i).and_then(Value::as_u64).unwrap_or(0) as u32;
            let (iw, ih) = (n(0), n(1));
            if (iw, ih) == (w, h) {
                return Ok(());
            }
            let (ow, oh) = self
                .client
                .get_window_size()
                .await
                .map_err(|e| self.cmd_error("get the window size", &e))?;
            let ow = (ow as u32 + w).saturating_sub(iw);
            let oh = (oh as u32 + h).saturating_sub(ih);
            self.client
                .set_window_size(ow, oh)
                .await
                .map_err(|e| self.cmd_error("set the window size", &e))?;
        }
        let v = self
            .eval("return [window.innerWidth, window.innerHeight]")
            .await?;
        Err(fail(format!(
            "could not make the viewport {w}x{h}: it is {v}"
        )))
    }

    /// The fantoccini client, for anything this harness does not wrap.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// chromedriver's loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// This browser's private temporary folder: the profile and chromedriver's log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Navigates and waits for the page's load event (at most [`PAGE_LOAD_TIMEOUT`]).
    pub async fn goto(&self, url: &str) -> Result<(), BoxError> {
        self.client
            .goto(url)
            .await
            .map_err(|e| self.cmd_error(&format!("goto {}", abbreviate(url, 200)), &e))
    }

    /// Runs a synchronous script in the page and returns what it `return`s (`null` for
    /// `undefined`). A returned promise is awaited. Times out after [`SCRIPT_TIMEOUT`].
    pub async fn eval(&self, js: &str) -> Result<Value, BoxError> {
        self.run_script(js, Vec::new(), false, SCRIPT_TIMEOUT).await
    }

    /// Runs an asynchronous script: its last argument (`arguments[arguments.length - 1]`) is a
    /// callback, and the value passed to it is returned. Times out after [`SCRIPT_TIMEOUT`].
    ///
    /// ```text
    /// const done = arguments[arguments.length - 1];
    /// video.addEventListener('playing', () => done(video.currentTime), { once: true });
    /// ```
    pub async fn eval_async(&self, js: &str) -> Result<Value, BoxError> {
        self.run_script(js, Vec::new(), true, SCRIPT_TIMEOUT).await
    }

    /// Like [`Browser::eval_async`], with JSON arguments (`arguments[0]`, …, callback last) and
    /// its own timeout: chromedriver gives up on the script after `timeout`.
    pub async fn eval_async_with(
        &self,
        js: &str,
        args: Vec<Value>,
        timeout: Duration,
    ) -> Result<Value, BoxError> {
        self.run_script(js, args, true, timeout).await
    }

    /// Lets `d` pass on the page's own clock: a playback duration, not a synchronization.
    pub async fn play_for(&self, d: Duration) -> Result<(), BoxError> {
        let js = format!(
            "new Promise((r) => setTimeout(() => r(true), {}))",
            d.as_millis()
        );
        self.wait_for(&js, d + Duration::from_secs(5), "playback")
            .await
            .map(|_| ())
    }

    /// Waits, inside the page, until the JavaScript expression `expr` is truthy, and returns its
    /// value (as JSON). `expr` may evaluate to a promise (it is awaited), and may throw while the
    /// page is not ready (a throw counts as "not yet"). It is checked on every animation frame,
    /// and at least every 50 ms when frames do not run: the loop runs in the page, in one
    /// asynchronous script, so no round trip to the page is made per check.
    ///
    /// On timeout the error names `what` and shows the last value seen and the console's tail.
    pub async fn wait_for(
        &self,
        expr: &str,
        timeout: Duration,
        what: &str,
    ) -> Result<Value, BoxError> {
        let expr = expr.trim().trim_end_matches(';');
        let js = format!(
            r#"const done = arguments[arguments.length - 1];
const timeoutMs = arguments[0];
const cond = async () => ({expr}
);
const show = (v) => {{
  if (v === undefined) return 'undefined';
  try {{ return JSON.parse(JSON.stringify(v)); }} catch (e) {{ return String(v); }}
}};
const deadline = performance.now() + timeoutMs;
let last = 'never evaluated';
(async () => {{
  for (;;) {{
    try {{
      const v = await cond();
      if (v) return done({{ ok: true, value: show(v) }});
      last = show(v);
    }} catch (e) {{
      last = 'threw: ' + (e && e.message ? e.message : String(e));
    }}
    if (performance.now() >= deadline) return done({{ ok: false, last }});
    await new Promise((r) => {{
      const t = setTimeout(r, 50);
      requestAnimationFrame(() => {{ clearTimeout(t); r(); }});
    }});
  }}
}})().catch((e) => done({{ ok: false, last: 'wait_for failed: ' + e }}));"#
        );
        let ms = timeout.as_millis() as u64;
        // chromedriver must not end the script before the page's own deadline.
        let script_timeout = timeout + Duration::from_secs(5);
        let res = self
            .run_script(&js, vec![json!(ms)], true, script_timeout)
            .await
            .map_err(|e| fail(format!("waiting for {what}: {e}")))?;
        if res.get("ok") == Some(&Value::Bool(true)) {
            return Ok(res.get("value").cloned().unwrap_or(Value::Null));
        }
        let last = res.get("last").cloned().unwrap_or(Value::Null);
        Err(fail(format!(
            "timed out after {timeout:?} waiting for {what} (`{}`); last value: {}\n{}",
            abbreviate(expr, 300),
            abbreviate(&last.to_string(), 2000),
            self.console_tail().await
        )))
    }

    /// Everything the browser logged since the session began: `console.*` calls of every level,
    /// uncaught exceptions and failed loads, across navigations.
    pub async fn console_log(&self) -> Result<Vec<ConsoleEntry>, BoxError> {
        let got = tokio::time::timeout(SCRIPT_TIMEOUT, self.client.issue_cmd(GetLog("browser")))
            .await
            .map_err(|_| fail("chromedriver did not answer the log request"))?
            .map_err(|e| self.cmd_error("read the browser log", &e))?;
        let entries = got.as_array().ok_or_else(|| -> BoxError {
            fail(format!(
                "unexpected browser log reply: {}",
                abbreviate(&got.to_string(), 300)
            ))
        })?;
        let mut console = self
            .console
            .lock()
            .map_err(|_| fail("console lock poisoned"))?;
        for e in entries {
            let s = |k: &str| {
                e.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            console.push(ConsoleEntry {
                level: s("level"),
                source: s("source"),
                message: s("message"),
                timestamp_ms: e.get("timestamp").and_then(Value::as_f64).unwrap_or(0.0) as u64,
            });
        }
        Ok(console.clone())
    }

    /// The console as text, one entry per line, for a failing test to print.
    pub async fn console_text(&self) -> String {
        match self.console_log().await {
            Ok(entries) => entries.iter().map(|e| format!("{e}\n")).collect(),
            Err(e) => format!("(console unavailable: {e})\n"),
        }
    }

    /// A PNG screenshot of the viewport, saved as `target/test-artifacts/NAME.png`.
    pub async fn screenshot(&self, name: &str) -> Result<Screenshot, BoxError> {
        let png = tokio::time::timeout(SCRIPT_TIMEOUT, self.client.screenshot())
            .await
            .map_err(|_| fail("chromedriver did not answer the screenshot request"))?
            .map_err(|e| self.cmd_error("take a screenshot", &e))?;
        Screenshot::save(name, &png)
    }

    /// A PNG screenshot of the first element matching the CSS `selector` (scrolled into view),
    /// saved as `target/test-artifacts/NAME.png`.
    pub async fn screenshot_element(
        &self,
        selector: &str,
        name: &str,
    ) -> Result<Screenshot, BoxError> {
        let what = format!("screenshot of {selector}");
        let png = tokio::time::timeout(SCRIPT_TIMEOUT, async {
            let el = self.client.find(Locator::Css(selector)).await?;
            el.screenshot().await
        })
        .await
        .map_err(|_| fail("chromedriver did not answer the screenshot request"))?
        .map_err(|e| self.cmd_error(&what, &e))?;
        Screenshot::save(name, &png)
    }

    /// The viewport rectangle (x, y, width, height, in CSS pixels, rounded) of the first element
    /// matching `selector`: where to [`Screenshot::crop`] a viewport screenshot.
    pub async fn element_rect(&self, selector: &str) -> Result<(u32, u32, u32, u32), BoxError> {
        let v = self
            .run_script(
                "const el = document.querySelector(arguments[0]);
                 if (!el) return null;
                 const r = el.getBoundingClientRect();
                 return [r.left, r.top, r.width, r.height].map(Math.round);",
                vec![json!(selector)],
                false,
                SCRIPT_TIMEOUT,
            )
            .await?;
        let n = |i: usize| v.get(i).and_then(Value::as_f64).map(|f| f.max(0.0) as u32);
        match (n(0), n(1), n(2), n(3)) {
            (Some(x), Some(y), Some(w), Some(h)) => Ok((x, y, w, h)),
            _ => Err(fail(format!("no element matches {selector:?}"))),
        }
    }

    async fn run_script(
        &self,
        js: &str,
        args: Vec<Value>,
        is_async: bool,
        timeout: Duration,
    ) -> Result<Value, BoxError> {
        let mut current = self.script_timeout.lock().await;
        if *current != timeout {
            self.client
                .update_timeouts(TimeoutConfiguration::new(Some(timeout), None, None))
                .await
                .map_err(|e| self.cmd_error("set the script timeout", &e))?;
            *current = timeout;
        }
        let run = async {
            if is_async {
                self.client.execute_async(js, args).await
            } else {
                self.client.execute(js, args).await
            }
        };
        match tokio::time::timeout(timeout + COMMAND_GRACE, run).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.cmd_error(&format!("script `{}`", abbreviate(js, 300)), &e)),
            Err(_) => Err(fail(format!(
                "chromedriver did not answer within {:?} for script `{}`\n{}",
                timeout + COMMAND_GRACE,
                abbreviate(js, 300),
                self.driver_log()
            ))),
        }
    }

    /// A command's error; when the driver itself failed (not the page), with its log's tail.
    fn cmd_error(&self, what: &str, e: &fantoccini::error::CmdError) -> BoxError {
        match e {
            fantoccini::error::CmdError::Standard(wd) => {
                let status = wd.error.to_string();
                let message: Vec<&str> = wd
                    .message
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("(Session info:"))
                    .collect();
                let message = message.join("\n");
                if message.starts_with(&status) {
                    fail(format!("{what}: {message}"))
                } else {
                    fail(format!("{what}: {status}: {message}"))
                }
            }
            other => fail(format!("{what}: {other}\n{}", self.driver_log())),
        }
    }

    fn driver_log(&self) -> String {
        driver_log_tail(&self.dir)
    }

    async fn console_tail(&self) -> String {
        match self.console_log().await {
            Ok(entries) => {
                let skip = entries.len().saturating_sub(TAIL_LINES);
                let mut s = format!(
                    "browser console (last {} of {}):\n",
                    entries.len() - skip,
                    entries.len()
                );
                for e in &entries[skip..] {
                    s.push_str(&format!("  {}\n", abbreviate(&e.to_string(), 500)));
                }
                s
            }
            Err(e) => format!("(console unavailable: {e})"),
        }
    }

    /// Kills chromedriver and every process it started (Chromium).
    fn kill(&mut self) {
        if !self.closed {
            self.closed = true;
            self.driver.kill(&self.dir);
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let was_closed = self.closed;
        self.kill();
        if !was_closed {
            if std::thread::panicking() {
                // Keep chromedriver's log for the failing test; the profile is of no use.
                remove_dir(&self.dir.join("profile"));
                eprintln!("browser: chromedriver's log kept in {}", self.dir.display());
            } else {
                remove_dir(&self.dir);
            }
        }
    }
}

/// chromedriver's `POST /session/{id}/se/log`: the log entries of one type since the last read.
#[derive(Debug)]
struct GetLog(&'static str);

impl WebDriverCompatibleCommand for GetLog {
    fn endpoint(
        &self,
        base_url: &url::Url,
        session_id: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base_url.join(&format!(
            "session/{}/se/log",
            session_id.unwrap_or_default()
        ))
    }

    fn method_and_body(&self, _request_url: &url::Url) -> (http::Method, Option<String>) {
        (
            http::Method::POST,
            Some(json!({ "type": self.0 }).to_string()),
        )
    }
}

enum DriverStart {
    /// chromedriver exited (likely: the port was taken); try another port.
    Exited(BoxError),
    Failed(BoxError),
}

fn tool_path(env: &str, default: &str) -> Result<PathBuf, BoxError> {
    let path = std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from);
    if path.is_file() {
        Ok(path)
    } else {
        Err(fail(format!(
            "{} is not installed (Debian packages chromium and chromium-driver): run \
             scripts/setup.sh (make test does), or set ${env}",
            path.display()
        )))
    }
}

/// A new private folder under the system's temporary folder.
fn fresh_dir() -> Result<PathBuf, BoxError> {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "onair-browser-{}-{n}-{nanos:08x}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| fail(format!("create {}: {e}", dir.display())))?;
    Ok(dir)
}

fn remove_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// chromedriver, and the watchdog that kills it (and Chromium) should this process die without
/// dropping its [`Browser`] (a SIGKILL, a SIGTERM from a timeout, Ctrl-C).
struct Driver {
    child: Child,
    reaper: Option<Child>,
}

impl Driver {
    /// Kills chromedriver's process group (chromedriver and Chromium), then any process still
    /// using this browser's folder, then the watchdog.
    fn kill(&mut self, dir: &Path) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.start_kill();
        for pid in processes_using(dir) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut reaper) = self.reaper.take() {
            let _ = reaper.start_kill();
        }
    }
}

fn spawn_driver(
    chromedriver: &Path,
    port: u16,
    dir: &Path,
    append: bool,
    ns: Option<&crate::netns::Netns>,
) -> Result<Driver, BoxError> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("chromedriver.out"))?;
    let mut cmd = match ns {
        None => Command::new(chromedriver),
        Some(ns) => {
            // `ip netns exec` enters the namespace and execs chromedriver (same process), which
            // must then listen on the namespace's address for the test to reach it; only the
            // host end of the veth can.
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns.name()])
                .arg(chromedriver)
                .arg(format!("--allowed-ips={}", ns.outer_addr()))
                .arg("--allowed-origins=*");
            cmd
        }
    };
    cmd.arg(format!("--port={port}")).arg(format!(
        "--log-path={}",
        dir.join("chromedriver.log").display()
    ));
    if append {
        cmd.arg("--append-log");
    }
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        // Its own process group, so that Chromium's processes go with it on drop.
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| -> BoxError {
        fail(format!("could not start {}: {e}", chromedriver.display()))
    })?;
    // The watchdog holds the read end of a pipe whose write end only this process has (Rust
    // opens pipes close-on-exec). When this process ends, however it ends, the read sees EOF and
    // the watchdog kills chromedriver's process group, where Chromium runs too (Chromium
    // outlives a killed chromedriver), and removes the profile (chromedriver's log stays). It
    // has its own process group, so a Ctrl-C meant for the test does not take it along.
    // (dash's `kill` takes no `--`.)
    let reaper = child.id().and_then(|pgid| {
        Command::new("sh")
            .args([
                "-c",
                "read _ ; kill -KILL \"-$1\" 2>/dev/null; rm -rf \"$2/profile\"",
                "onair-browser-reaper",
            ])
            .arg(pgid.to_string())
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .ok()
    });
    Ok(Driver { child, reaper })
}

/// Polls chromedriver's `/status` until it says `ready` (a process start: there is no event).
async fn wait_driver_ready(
    driver: &mut Child,
    host: &str,
    port: u16,
    dir: &Path,
) -> Result<(), DriverStart> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = driver.try_wait() {
            return Err(DriverStart::Exited(fail(format!(
                "chromedriver exited with {status} before it was ready on port {port}\n{}",
                driver_log_tail(dir)
            ))));
        }
        let last = match driver_status(host, port).await {
            Ok((200, body)) => {
                let ready = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|v| v.pointer("/value/ready").and_then(Value::as_bool));
                if ready == Some(true) {
                    return Ok(());
                }
                abbreviate(&body, 300)
            }
            Ok((code, body)) => format!("HTTP {code}: {}", abbreviate(&body, 300)),
            Err(e) => e.to_string(),
        };
        if start.elapsed() > DRIVER_READY_TIMEOUT {
            return Err(DriverStart::Failed(fail(format!(
                "chromedriver on port {port} not ready within {DRIVER_READY_TIMEOUT:?}; last \
                     /status: {last}\n{}",
                driver_log_tail(dir)
            ))));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /status` of the chromedriver on `port`: (HTTP status, body). chromedriver keeps the
/// connection open, so this reads by Content-Length (hyper), within a short timeout.
async fn driver_status(host: &str, port: u16) -> Result<(u16, String), BoxError> {
    use http_body_util::BodyExt as _;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = format!("http://{host}:{port}/status").parse()?;
    let ask = async {
        let resp = client.get(uri).await?;
        let code = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, BoxError>((code, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(2), ask)
        .await
        .map_err(|_| fail("no answer within 2 s"))?
}

async fn open_session(
    chromium: &Path,
    profile: &Path,
    host: &str,
    port: u16,
) -> Result<Client, BoxError> {
    let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|s| s.to_string()).collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    let caps = json!({
        "browserName": "chrome",
        "pageLoadStrategy": "normal",
        "timeouts": {
            "script": SCRIPT_TIMEOUT.as_millis() as u64,
            "pageLoad": PAGE_LOAD_TIMEOUT.as_millis() as u64,
            "implicit": 0,
        },
        "goog:chromeOptions": {
            "binary": chromium.display().to_string(),
            "args": args,
        },
        "goog:loggingPrefs": { "browser": "ALL" },
    });
    let Value::Object(caps) = caps else {
        return Err(fail("capabilities are not an object"));
    };
    let caps: Capabilities = caps;
    let mut builder = ClientBuilder::new(HttpConnector::new());
    builder.capabilities(caps);
    let url = format!("http://{host}:{port}/");
    match tokio::time::timeout(SESSION_TIMEOUT, builder.connect(&url)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(fail(e)),
        Err(_) => Err(fail(format!("no session within {SESSION_TIMEOUT:?}"))),
    }
}

/// Pids of the processes whose command line mentions `dir` (this browser's unique folder).
pub fn processes_using(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

/// The last lines of chromedriver's log and output.
fn driver_log_tail(dir: &Path) -> String {
    let mut s = String::new();
    for name in ["chromedriver.out", "chromedriver.log"] {
        let path = dir.join(name);
        let text = std::fs::read(&path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let skip = lines.len().saturating_sub(TAIL_LINES);
        s.push_str(&format!(
            "--- {} (last {} lines) ---\n",
            path.display(),
            lines.len() - skip
        ));
        for l in &lines[skip..] {
            s.push_str(&abbreviate(l, 500));
            s.push('\n');
        }
    }
    s
}

/// A harness error: its `Debug` is its text, so `.expect(..)` in a test prints the driver's log
/// and the console as lines, not as one escaped string.
struct Failure(String);

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failure {}

fn fail(msg: impl fmt::Display) -> BoxError {
    Box::new(Failure(msg.to_string()))
}

/// At most `max` characters of `s`, marked when cut.
fn abbreviate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}… ({} more bytes)", &s[..i], s.len() - i),
        None => s.to_string(),
    }
}

/// A decoded screenshot (RGBA, 8 bits per channel) and where its PNG was saved.
#[derive(Clone)]
pub struct Screenshot {
    pub path: PathBuf,
    pub width: u32,
    pub height: u32,
    /// Row-major RGBA.
    pub rgba: Vec<u8>,
}

impl fmt::Debug for Screenshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Screenshot")
            .field("path", &self.path)
            .field("width", &self.width)
            .field("height", &self.height)
            .finish_non_exhaustive()
    }
}

/// Where screenshots go: `target/test-artifacts` (honours `CARGO_TARGET_DIR`).
pub fn artifacts_dir() -> PathBuf {
    crate::load::target_dir().join("test-artifacts")
}

impl Screenshot {
    /// Saves `png` as `target/test-artifacts/NAME.png` and decodes it.
    pub fn save(name: &str, png: &[u8]) -> Result<Screenshot, BoxError> {
        let dir = artifacts_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| fail(format!("create {}: {e}", dir.display())))?;
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("{safe}.png"));
        std::fs::write(&path, png).map_err(|e| fail(format!("write {}: {e}", path.display())))?;
        let mut shot =
            Screenshot::decode(png).map_err(|e| fail(format!("decode {}: {e}", path.display())))?;
        shot.path = path;
        Ok(shot)
    }

    /// Decodes a PNG of any colour type and depth to RGBA8 (`path` left empty).
    pub fn decode(png: &[u8]) -> Result<Screenshot, BoxError> {
        let mut decoder = png::Decoder::new(std::io::Cursor::new(png));
        decoder.set_transformations(png::Transformations::normalize_to_color8());
        let mut reader = decoder.read_info()?;
        let size = reader.output_buffer_size().ok_or("PNG too large")?;
        let mut buf = vec![0u8; size];
        let info = reader.next_frame(&mut buf)?;
        let (w, h) = (info.width as usize, info.height as usize);
        let channels = match info.color_type {
            png::ColorType::Grayscale => 1,
            png::ColorType::GrayscaleAlpha => 2,
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
            png::ColorType::Indexed => return Err(fail("indexed PNG left unexpanded")),
        };
        let mut rgba = Vec::with_capacity(w * h * 4);
        for y in 0..h {
            let row = buf
                .get(y * info.line_size..y * info.line_size + w * channels)
                .ok_or("PNG row out of bounds")?;
            for px in row.chunks_exact(channels) {
                match *px {
                    [g] => rgba.extend_from_slice(&[g, g, g, 255]),
                    [g, a] => rgba.extend_from_slice(&[g, g, g, a]),
                    [r, g, b] => rgba.extend_from_slice(&[r, g, b, 255]),
                    [r, g, b, a] => rgba.extend_from_slice(&[r, g, b, a]),
                    _ => return Err(fail("bad PNG pixel")),
                }
            }
        }
        Ok(Screenshot {
            path: PathBuf::new(),
            width: info.width,
            height: info.height,
            rgba,
        })
    }

    /// The region (x, y, w, h), as its own `Screenshot` (same `path`) for its statistics.
    /// Fails when the region is empty or does not fit.
    pub fn crop(&self, x: u32, y: u32, w: u32, h: u32) -> Result<Screenshot, BoxError> {
        if w == 0 || h == 0 || x.saturating_add(w) > self.width || y.saturating_add(h) > self.height
        {
            return Err(fail(format!(
                "crop ({x}, {y}, {w}x{h}) does not fit in the {}x{} screenshot {}",
                self.width,
                self.height,
                self.path.display()
            )));
        }
        let stride = self.width as usize * 4;
        let mut rgba = Vec::with_capacity(w as usize * h as usize * 4);
        for row in y as usize..(y + h) as usize {
            let start = row * stride + x as usize * 4;
            rgba.extend_from_slice(&self.rgba[start..start + w as usize * 4]);
        }
        Ok(Screenshot {
            path: self.path.clone(),
            width: w,
            height: h,
            rgba,
        })
    }

    fn pixels(&self) -> impl Iterator<Item = [u8; 3]> + '_ {
        self.rgba.chunks_exact(4).map(|p| [p[0], p[1], p[2]])
    }

    fn count(&self) -> usize {
        self.rgba.len() / 4
    }

    /// The RGB of the pixel at (x, y), if inside.
    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 4;
        Some([self.rgba[i], self.rgba[i + 1], self.rgba[i + 2]])
    }

    /// How many different colours, with each channel quantised to 4 bits (at most 4096): a
    /// flat area gives 1 or 2, a picture or a gradient gives hundreds.
    pub fn distinct_colors(&self) -> usize {
        let seen: HashSet<u16> = self
            .pixels()
            .map(|[r, g, b]| {
                (u16::from(r >> 4) << 8) | (u16::from(g >> 4) << 4) | u16::from(b >> 4)
            })
            .collect();
        seen.len()
    }

    fn luma(p: [u8; 3]) -> f64 {
        0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2])
    }

    /// Standard deviation of the luma (BT.601, 0–255): near 0 for a flat area.
    pub fn luma_stddev(&self) -> f64 {
        let n = self.count();
        if n == 0 {
            return 0.0;
        }
        let (sum, sq) = self
            .pixels()
            .map(Self::luma)
            .fold((0.0, 0.0), |(s, q), l| (s + l, q + l * l));
        let mean = sum / n as f64;
        (sq / n as f64 - mean * mean).max(0.0).sqrt()
    }

    /// Mean red, green and blue (0–255).
    pub fn mean_rgb(&self) -> [f64; 3] {
        let n = self.count();
        if n == 0 {
            return [0.0; 3];
        }
        let mut sum = [0u64; 3];
        for p in self.pixels() {
            for c in 0..3 {
                sum[c] += u64::from(p[c]);
            }
        }
        sum.map(|s| s as f64 / n as f64)
    }

    /// Fraction (0–1) of pixels with some channel above `threshold`.
    pub fn fraction_non_black(&self, threshold: u8) -> f64 {
        let n = self.count();
        if n == 0 {
            return 0.0;
        }
        let lit = self
            .pixels()
            .filter(|p| p.iter().any(|&c| c > threshold))
            .count();
        lit as f64 / n as f64
    }

    /// Fraction (0–1) of pixels in colour, not grey: the largest channel exceeds the smallest
    /// by more than `chroma`. A chart's lines against a dark background and grey axes.
    pub fn fraction_colored(&self, chroma: u8) -> f64 {
        let n = self.count();
        if n == 0 {
            return 0.0;
        }
        let colored = self
            .pixels()
            .filter(|p| {
                let (hi, lo) = (p.iter().max(), p.iter().min());
                hi.zip(lo).is_some_and(|(h, l)| h - l > chroma)
            })
            .count();
        colored as f64 / n as f64
    }
}

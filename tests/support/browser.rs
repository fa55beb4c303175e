//! A headless Chromium driven over the Chrome DevTools Protocol, for tests that need a real
//! browser: launch it, open a URL, evaluate JavaScript and get its JSON result, take a PNG
//! screenshot. Every step is bounded, and the browser (with every process it started) is killed
//! when the [`Browser`] is dropped, whether the test passed or failed.
//!
//! The client is a few hundred lines over the workspace's tokio-tungstenite: Chromium prints
//! `DevTools listening on ws://...` on stderr when started with `--remote-debugging-port=0`, and
//! the protocol is JSON over that websocket.
//!
//! Without Chromium, [`Browser::launch`] returns `None` after a notice on stderr, and the test
//! should return early; with `MESHNODE_REQUIRE_BROWSER=1` (as `.ci/run` sets) a missing browser
//! fails the test instead. `MESHNODE_CHROMIUM` names the binary if it is not `chromium` (or
//! `chromium-browser`, `google-chrome`) on the `PATH`.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Longest the browser may take to start and print its DevTools address (a loaded machine
/// starts Chromium slowly; only a broken one takes this long).
pub const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest any one DevTools step may take: a command's answer, a page load, an evaluation.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// Set to `1` to make a missing browser fail the test instead of skipping it.
pub const REQUIRE_ENV: &str = "MESHNODE_REQUIRE_BROWSER";
/// Names the browser binary, if it is not found on the `PATH`.
pub const CHROMIUM_ENV: &str = "MESHNODE_CHROMIUM";
/// How many of the browser's stderr lines are kept, for the error when it fails to start.
const STDERR_KEPT: usize = 40;
/// How many unclaimed DevTools events are kept while waiting for an answer.
const EVENTS_KEPT: usize = 256;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a browser step failed.
#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error(
        "the browser printed no DevTools address within {LAUNCH_TIMEOUT:?}; its stderr:\n{stderr}"
    )]
    NoDevTools { stderr: String },
    #[error("cannot reach the browser's DevTools: {0}")]
    Connect(tokio_tungstenite::tungstenite::Error),
    #[error("the DevTools connection failed: {0}")]
    Socket(tokio_tungstenite::tungstenite::Error),
    #[error("the browser closed the DevTools connection")]
    Closed,
    #[error("{what}: no answer within {STEP_TIMEOUT:?}")]
    Timeout { what: String },
    #[error("{method} failed: {message}")]
    Command { method: String, message: String },
    #[error("cannot open {url}: {reason}")]
    Navigate { url: String, reason: String },
    #[error("the script threw: {0}")]
    Script(String),
    #[error("the browser's answer is not as documented: {0}")]
    Unexpected(String),
}

/// A headless Chromium with one page open, killed on drop.
pub struct Browser {
    cdp: Cdp,
    session: String,
    // Last, so that the connection closes before the processes are killed.
    _process: Process,
}

impl Browser {
    /// Starts a headless Chromium with one blank page, or returns `None` (after a notice on
    /// stderr) when there is no browser on this machine and [`REQUIRE_ENV`] is not `1`.
    /// `extra_args` go to Chromium as they are, e.g.
    /// `--host-resolver-rules=MAP evil.example 127.0.0.1`.
    pub async fn launch(extra_args: &[&str]) -> Option<Result<Browser, BrowserError>> {
        let Some(binary) = find_chromium() else {
            let required = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
            assert!(
                !required,
                "{REQUIRE_ENV}=1 but no Chromium was found: install Debian's `chromium` \
                 (or set {CHROMIUM_ENV})"
            );
            // Straight to stderr, past the test harness's capture, so that a skip is seen.
            let _ = writeln!(
                std::io::stderr(),
                "\n*** SKIPPED a browser test: no Chromium on this machine (install Debian's \
                 `chromium`, or set {CHROMIUM_ENV}; set {REQUIRE_ENV}=1 to fail instead) ***\n"
            );
            return None;
        };
        Some(Self::launch_binary(&binary, extra_args).await)
    }

    async fn launch_binary(binary: &Path, extra_args: &[&str]) -> Result<Browser, BrowserError> {
        let profile = fresh_profile_dir();
        let mut command = Command::new(binary);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--no-proxy-server",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                "--window-size=1280,800",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra_args)
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Its own process group, so that drop kills the renderers and helpers with it.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().map_err(|source| BrowserError::Spawn {
            binary: binary.display().to_string(),
            source,
        })?;
        let lines = read_lines(&mut child);
        // From here on, a failure drops `process`, which kills the browser.
        let process = Process { child, profile };
        let url = devtools_url(lines).await?;
        let connect = tokio_tungstenite::connect_async(url.as_str());
        let (socket, _) = tokio::time::timeout(STEP_TIMEOUT, connect)
            .await
            .map_err(|_| BrowserError::Timeout {
                what: format!("connecting to {url}"),
            })?
            .map_err(BrowserError::Connect)?;
        let mut cdp = Cdp {
            socket,
            next_id: 0,
            events: VecDeque::new(),
        };
        let target = cdp
            .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = string_at(&target, "targetId")?;
        let attached = cdp
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        let session = string_at(&attached, "sessionId")?;
        cdp.call(Some(&session), "Page.enable", json!({})).await?;
        cdp.call(Some(&session), "Runtime.enable", json!({}))
            .await?;
        Ok(Browser {
            cdp,
            session,
            _process: process,
        })
    }

    /// Opens `url` in the page and waits for its load event. A page that cannot be reached
    /// (connection refused, DNS) is an error; an HTTP error status is not (the page shows it).
    pub async fn goto(&mut self, url: &str) -> Result<(), BrowserError> {
        self.cdp.events.clear();
        let answer = self
            .cdp
            .call(Some(&self.session), "Page.navigate", json!({ "url": url }))
            .await?;
        if let Some(reason) = answer.get("errorText").and_then(Value::as_str) {
            return Err(BrowserError::Navigate {
                url: url.to_owned(),
                reason: reason.to_owned(),
            });
        }
        let session = self.session.clone();
        self.cdp
            .event(&format!("the load of {url}"), |event| {
                event["method"] == "Page.loadEventFired" && event["sessionId"] == session.as_str()
            })
            .await
            .map(drop)
    }

    /// Evaluates `expression` in the page (awaiting it if it is a promise) and returns its
    /// value as JSON. A thrown exception or a rejected promise is [`BrowserError::Script`].
    pub async fn eval(&mut self, expression: &str) -> Result<Value, BrowserError> {
        let params = json!({
            "expression": expression,
            "awaitPromise": true,
            "returnByValue": true,
            "userGesture": true,
        });
        let answer = self
            .cdp
            .call(Some(&self.session), "Runtime.evaluate", params)
            .await?;
        if let Some(details) = answer.get("exceptionDetails") {
            let description = details["exception"]["description"]
                .as_str()
                .or_else(|| details["text"].as_str())
                .unwrap_or("an exception without a description");
            return Err(BrowserError::Script(description.to_owned()));
        }
        Ok(answer["result"]
            .get("value")
            .cloned()
            .unwrap_or(Value::Null))
    }

    /// Evaluates `predicate` until it is `true`, failing after [`STEP_TIMEOUT`].
    pub async fn eventually(&mut self, predicate: &str) -> Result<(), BrowserError> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if self.eval(predicate).await? == Value::Bool(true) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(BrowserError::Timeout {
                    what: format!("until {predicate}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A PNG of the page's viewport.
    pub async fn screenshot(&mut self) -> Result<Vec<u8>, BrowserError> {
        let answer = self
            .cdp
            .call(
                Some(&self.session),
                "Page.captureScreenshot",
                json!({ "format": "png" }),
            )
            .await?;
        let data = string_at(&answer, "data")?;
        decode_base64(&data)
            .ok_or_else(|| BrowserError::Unexpected("a screenshot that is not base64".into()))
    }
}

/// The browser's processes and profile: killed and removed on drop.
struct Process {
    child: Child,
    profile: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        // The whole group: the browser and every renderer and helper it started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The browser binary: [`CHROMIUM_ENV`], or the first of the usual names on the `PATH`.
fn find_chromium() -> Option<PathBuf> {
    if let Some(named) = std::env::var_os(CHROMIUM_ENV).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(named));
    }
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
    .find(|candidate| candidate.is_file())
}

/// A new, empty profile directory under the system's temporary directory.
fn fresh_profile_dir() -> PathBuf {
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let name = format!(
        "meshnode-browser-{}-{}-{nanos}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    );
    let dir = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The browser's stderr, line by line. The reading thread drains the pipe until the browser
/// exits, so the browser never blocks on a full pipe, even after the receiver is gone.
fn read_lines(child: &mut Child) -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    if let Some(pipe) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    rx
}

/// Waits for `DevTools listening on ws://...` among the browser's first lines. The receiver
/// is dropped on return; the reading thread then only drains the pipe.
async fn devtools_url(
    mut lines: tokio::sync::mpsc::UnboundedReceiver<String>,
) -> Result<String, BrowserError> {
    const MARK: &str = "DevTools listening on ";
    let mut seen: VecDeque<String> = VecDeque::new();
    let deadline = tokio::time::Instant::now() + LAUNCH_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) => {
                if let Some(at) = line.find(MARK) {
                    return Ok(line[at + MARK.len()..].trim().to_owned());
                }
                if seen.len() == STDERR_KEPT {
                    seen.pop_front();
                }
                seen.push_back(line);
            }
            // The browser exited, or the time is up.
            Ok(None) | Err(_) => {
                let stderr = Vec::from(seen).join("\n");
                return Err(BrowserError::NoDevTools { stderr });
            }
        }
    }
}

/// A DevTools connection: numbered commands, their answers, and the events in between.
struct Cdp {
    socket: Socket,
    next_id: u64,
    /// Events not yet claimed, newest last, at most [`EVENTS_KEPT`].
    events: VecDeque<Value>,
}

impl Cdp {
    /// Sends a command (to the page's session, or to the browser) and waits for its answer.
    async fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, BrowserError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            command["sessionId"] = Value::from(session);
        }
        let send = self.socket.send(Message::text(command.to_string()));
        tokio::time::timeout(STEP_TIMEOUT, send)
            .await
            .map_err(|_| BrowserError::Timeout {
                what: format!("sending {method}"),
            })?
            .map_err(BrowserError::Socket)?;
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let message = self.next_message(deadline, method).await?;
            if message.get("id").and_then(Value::as_u64) != Some(id) {
                self.keep_event(message);
                continue;
            }
            if let Some(error) = message.get("error") {
                let text = error["message"]
                    .as_str()
                    .unwrap_or("an error without a message");
                return Err(BrowserError::Command {
                    method: method.to_owned(),
                    message: text.to_owned(),
                });
            }
            return Ok(message.get("result").cloned().unwrap_or(Value::Null));
        }
    }

    /// Waits for an event that `matches`, among those already received first.
    async fn event(
        &mut self,
        what: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value, BrowserError> {
        if let Some(at) = self.events.iter().position(&matches) {
            return Ok(self.events.remove(at).unwrap_or_default());
        }
        let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
        loop {
            let message = self.next_message(deadline, what).await?;
            if matches(&message) {
                return Ok(message);
            }
            self.keep_event(message);
        }
    }

    fn keep_event(&mut self, message: Value) {
        if message.get("method").is_some() {
            if self.events.len() == EVENTS_KEPT {
                self.events.pop_front();
            }
            self.events.push_back(message);
        }
    }

    /// The next JSON message from the browser, by `deadline`.
    async fn next_message(
        &mut self,
        deadline: tokio::time::Instant,
        what: &str,
    ) -> Result<Value, BrowserError> {
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .map_err(|_| BrowserError::Timeout {
                    what: what.to_owned(),
                })?;
            let text = match next {
                None => return Err(BrowserError::Closed),
                Some(Err(e)) => return Err(BrowserError::Socket(e)),
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Close(_))) => return Err(BrowserError::Closed),
                Some(Ok(_)) => continue,
            };
            return serde_json::from_str(text.as_str())
                .map_err(|e| BrowserError::Unexpected(format!("a message that is not JSON: {e}")));
        }
    }
}

/// The string at `key` of a DevTools answer.
fn string_at(answer: &Value, key: &str) -> Result<String, BrowserError> {
    answer
        .get(key)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| BrowserError::Unexpected(format!("no {key} in {answer}")))
}

/// Decodes standard base64 (with or without padding); `None` if it is not base64.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let digits = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut bits = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            bits |= value(c)? << (18 - 6 * i);
        }
        let bytes = bits.to_be_bytes();
        match chunk.len() {
            4 => out.extend_from_slice(&bytes[1..4]),
            3 => out.extend_from_slice(&bytes[1..3]),
            2 => out.push(bytes[1]),
            _ => return None,
        }
    }
    Some(out)
}

/// A page served over HTTP on loopback by the test itself, at `http://{addr}/` (every path and
/// method gets the same page). The server stops when this is dropped.
pub struct PageServer {
    pub addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl PageServer {
    /// Serves `html` on `127.0.0.1:0`, one request per connection.
    pub async fn start(html: String) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port for the page");
        let addr = listener.local_addr().expect("bound");
        let page = std::sync::Arc::new(format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\n\
             cache-control: no-store\r\nconnection: close\r\n\r\n{html}",
            html.len()
        ));
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let page = page.clone();
                tokio::spawn(async move {
                    // Read the request head (bounded in size and time), then answer.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    let read = async {
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return false,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        true
                    };
                    if let Ok(true) = tokio::time::timeout(STEP_TIMEOUT, read).await {
                        let _ = stream.write_all(page.as_bytes()).await;
                        let _ = stream.shutdown().await;
                    }
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

//! The real `meshnode` binary, run as a process by the process-level tests.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::BOUND;

pub const BIN: &str = env!("CARGO_BIN_EXE_meshnode");
/// The environment variable that carries the UI token. Every command here sets it or removes
/// it, so a token exported by whoever runs the tests changes nothing.
pub const TOKEN_ENV: &str = "MESHNODE_UI_TOKEN";

/// A running `meshnode run` on loopback, killed if the test ends without stopping it.
pub struct Daemon {
    child: Child,
    pub ui: SocketAddr,
    pub listen: SocketAddr,
    stderr: mpsc::Receiver<String>,
    /// Every log line read so far.
    log: Vec<String>,
}

impl Daemon {
    /// Starts a node with no UI token, logging at info, with `args`.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(None, "info", args)
    }

    /// Starts a node with `token` in `MESHNODE_UI_TOKEN` (or none), logging at `level`.
    pub fn start_with(token: Option<&str>, level: &str, args: &[&str]) -> Self {
        Self::spawn(Command::new(BIN), token, level, args, &[])
    }

    /// Starts a node with no UI token, logging at info, with `args` and the environment
    /// variables `env` set.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(Command::new(BIN), None, "info", args, env)
    }

    /// Starts a node whose file-descriptor limit, soft and hard, is `nofile`.
    pub fn start_with_fd_limit(nofile: u32, args: &[&str]) -> Self {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            &format!("ulimit -n {nofile} && exec \"$0\" \"$@\""),
            BIN,
        ]);
        Self::spawn(command, None, "info", args, &[])
    }

    /// How many descriptors the process has open now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .expect("the process's descriptors")
            .count()
    }

    fn spawn(
        mut command: Command,
        token: Option<&str>,
        level: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        command
            .args(["run", "--listen", "127.0.0.1:0", "--ui", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", level)
            .env_remove(TOKEN_ENV)
            .env_remove(meshnode::notify::NOTIFY_SOCKET)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(token) = token {
            command.env(TOKEN_ENV, token);
        }
        command.envs(env.iter().copied());
        let mut child = command.spawn().expect("meshnode starts");
        let (tx, stderr) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr piped");
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Self {
            child,
            ui: addr0(),
            listen: addr0(),
            stderr,
            log: Vec::new(),
        };
        let line = daemon.wait_for_line("node started");
        daemon.ui = field(&line, "ui");
        daemon.listen = field(&line, "listen");
        daemon
    }

    /// Waits for a log line containing `needle`, failing after [`BOUND`].
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!("no log line with {needle:?}: {e}\n{}", self.log.join("\n")),
            }
        }
    }

    /// Sends the signal `name` (`TERM`, `STOP`, …) to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Whether the process is stopped (by SIGSTOP), as the kernel reports it.
    pub fn is_stopped(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("the process's stat");
        // The state follows the command name, which is in parentheses.
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        state == Some(Some('T'))
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "meshnode did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every log line of the process, once it has exited.
    pub fn whole_log(&mut self) -> String {
        while let Ok(line) = self.stderr.recv_timeout(BOUND) {
            self.log.push(line);
        }
        self.log.join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr0() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// The address in the field `key` of a log line, text (`key=ADDR`) or JSON.
pub fn field(line: &str, key: &str) -> SocketAddr {
    if let Ok(event) = serde_json::from_str::<serde_json::Value>(line) {
        let value = event["fields"][key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key} field in {line}"));
        return value
            .parse()
            .unwrap_or_else(|e| panic!("{key}={value}: {e}"));
    }
    let key = format!("{key}=");
    let start = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + key.len();
    let value: String = line[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    value
        .parse()
        .unwrap_or_else(|e| panic!("{key}{value}: {e}"))
}

/// Runs `meshnode ARGS` to its end, with no UI token.
pub fn meshnode(args: &[&str]) -> Output {
    meshnode_with(None, args)
}

/// Runs `meshnode ARGS` to its end, with `token` in `MESHNODE_UI_TOKEN` (or none).
pub fn meshnode_with(token: Option<&str>, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove(TOKEN_ENV)
        .stdin(Stdio::null());
    if let Some(token) = token {
        command.env(TOKEN_ENV, token);
    }
    command.output().expect("meshnode runs")
}

/// A runtime for the async parts of a test that drives a process.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt")
}

/// Polls `check` (blocking the thread) until it holds, failing the test after [`BOUND`].
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + BOUND;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

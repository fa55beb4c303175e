//! What a node is started with, and the key file that gives it a lasting identity.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use meshnode_protocol::Identity;

use crate::neighborhood::DEFAULT_GOSSIP_WINDOW;
use crate::stream_handler_pool::{DEFAULT_NEIGHBOR_TIMEOUT, Verifiers};
use crate::ui_gateway::{DEFAULT_SHUTDOWN_DEADLINE, WebPolicy};

/// Everything [`crate::start`] needs. Build it with [`Config::new`] and adjust the fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to accept neighbors; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Where the UI (websocket and HTTP) listens; port 0 picks a free port.
    pub ui: SocketAddr,
    /// Neighbors to dial and keep dialing, as `HOST:PORT`.
    pub neighbors: Vec<String>,
    pub identity: Identity,
    /// Longest a graceful shutdown may take, from its first trigger to the answer.
    pub shutdown_deadline: Duration,
    /// How long gossip is gathered before it is sent (zero: at the end of every batch).
    pub gossip_window: Duration,
    /// When set, every UI route wants `Authorization: Bearer TOKEN`.
    pub ui_token: Option<UiToken>,
    /// A neighbor silent (no frame, no keepalive) for this long is dropped as crashed.
    pub neighbor_timeout: Duration,
    /// The Host names and web origins the UI answers besides IP literals, `localhost` and its
    /// own origin (a browser's request from any other site is refused).
    pub ui_web: WebPolicy,
    /// The address put in the node's record for neighbors to dial, when it is not the bound
    /// listen address (a wildcard listen, NAT); see [`advertised_addr`].
    pub advertise: Option<Advertise>,
    /// The permits to check large gossip frames off the runtime's workers: one per core by
    /// default. Nodes that share a process should share one (clone it into each config): the
    /// cores are the process's.
    pub verifiers: Verifiers,
}

impl Config {
    /// A node on loopback with free ports, no neighbors and the given identity.
    pub fn new(identity: Identity) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ui: SocketAddr::from(([127, 0, 0, 1], 0)),
            neighbors: Vec::new(),
            identity,
            shutdown_deadline: DEFAULT_SHUTDOWN_DEADLINE,
            gossip_window: DEFAULT_GOSSIP_WINDOW,
            ui_token: None,
            neighbor_timeout: DEFAULT_NEIGHBOR_TIMEOUT,
            ui_web: WebPolicy::strict(),
            advertise: None,
            verifiers: Verifiers::for_cores(),
        }
    }
}

/// An address to advertise in the node's record: `HOST:PORT`, neither a wildcard nor port 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertise(String);

impl Advertise {
    /// Checks `text` as [`parse_neighbor`] does (a host and a port from 1 to 65535, without
    /// resolving the host) and refuses a wildcard IP (`0.0.0.0`, `[::]`): nobody can dial one.
    pub fn new(text: &str) -> Result<Self, AdvertiseError> {
        let bad = |why: String| AdvertiseError::Invalid {
            addr: text.to_owned(),
            why,
        };
        parse_neighbor(text).map_err(bad)?;
        if let Ok(addr) = text.parse::<SocketAddr>() {
            if addr.ip().is_unspecified() {
                return Err(AdvertiseError::Wildcard {
                    addr: text.to_owned(),
                });
            }
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Advertise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Advertise {
    type Err = AdvertiseError;

    fn from_str(text: &str) -> Result<Self, AdvertiseError> {
        Self::new(text)
    }
}

/// Why an address cannot go into the node's record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertiseError {
    #[error("cannot advertise '{addr}': {why}")]
    Invalid { addr: String, why: String },
    #[error(
        "cannot advertise the wildcard address '{addr}': neighbors cannot dial it; give the address they can reach"
    )]
    Wildcard { addr: String },
    #[error(
        "--listen {listen} is a wildcard address, which neighbors cannot dial: pass --advertise HOST:PORT, the address they can reach"
    )]
    WildcardListen { listen: SocketAddr },
}

/// The address the node's record carries: `advertise` when given, else the bound listen
/// address, which must then not be a wildcard (a record naming `0.0.0.0` sends every
/// neighbor that dials it to itself).
pub fn advertised_addr(
    listen: SocketAddr,
    advertise: Option<&Advertise>,
) -> Result<String, AdvertiseError> {
    match advertise {
        Some(advertise) => Ok(advertise.as_str().to_owned()),
        None if listen.ip().is_unspecified() => Err(AdvertiseError::WildcardListen { listen }),
        None => Ok(listen.to_string()),
    }
}

/// How the node writes its logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event, for people.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (with `message`),
    /// and the spans.
    Json,
}

/// The secret a UI client must present as `Authorization: Bearer TOKEN`. Its `Debug` never
/// shows the secret, so a logged `Config` does not leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct UiToken(String);

impl UiToken {
    /// A token of visible ASCII (`!` to `~`, so no spaces), 1 to [`MAX_UI_TOKEN_LEN`] bytes: any
    /// such token fits in an HTTP header as it is.
    pub fn new(text: impl Into<String>) -> Result<Self, String> {
        let text = text.into();
        if text.is_empty() {
            return Err("the UI token is empty".into());
        }
        if text.len() > MAX_UI_TOKEN_LEN {
            return Err(format!(
                "the UI token is longer than {MAX_UI_TOKEN_LEN} bytes"
            ));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the UI token must be visible ASCII characters, without spaces".into());
        }
        Ok(Self(text))
    }

    /// The secret, to send in a request header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, compared in constant time (only the length can show:
    /// a wrong length fails at once).
    pub fn matches(&self, presented: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl std::fmt::Debug for UiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UiToken(<hidden>)")
    }
}

/// Longest UI token accepted, in bytes.
pub const MAX_UI_TOKEN_LEN: usize = 1024;

/// Who can drive a node through its UI, judged from its address and whether it has a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UiExposure {
    /// Loopback: only this host can reach the UI.
    Loopback,
    /// Beyond loopback, but every route wants the token.
    Guarded,
    /// Beyond loopback with no token: anyone who can reach the port can shut the node down.
    Open,
}

impl UiExposure {
    pub fn of(ui: SocketAddr, has_token: bool) -> Self {
        // An IPv4-mapped address (`::ffff:127.0.0.1`) is loopback too.
        if ui.ip().to_canonical().is_loopback() {
            Self::Loopback
        } else if has_token {
            Self::Guarded
        } else {
            Self::Open
        }
    }

    /// The warning to log at start, if any.
    pub fn warning(self) -> Option<&'static str> {
        match self {
            Self::Loopback => None,
            Self::Guarded => Some(
                "the UI listens beyond loopback; its routes want the UI token, but the token \
                 crosses the network in clear text (plain HTTP)",
            ),
            Self::Open => Some(
                "the UI listens beyond loopback without a token: anyone who can reach the port \
                 can shut this node down; pass --ui-token (or set MESHNODE_UI_TOKEN), or listen \
                 on loopback",
            ),
        }
    }
}

/// Checks that `text` is `HOST:PORT` with a numeric port, without resolving the host.
pub fn parse_neighbor(text: &str) -> Result<String, String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("'{text}' is not HOST:PORT"))?;
    if host.is_empty() {
        return Err(format!("'{text}' has no host"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("'{text}' has no valid port"))
        .and_then(|p| {
            if p == 0 {
                Err(format!("'{text}' has port 0"))
            } else {
                Ok(())
            }
        })?;
    Ok(text.to_owned())
}

/// Parses a duration written as seconds (`5`, `1.5`, `5s`) or milliseconds (`500ms`); it must
/// be more than zero and at most an hour.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("'{text}' is not a duration such as 5s, 1.5s or 500ms");
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 0.001)
    } else {
        (text.strip_suffix('s').unwrap_or(text), 1.0)
    };
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    let seconds = value * scale;
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 3600.0 {
        return Err(format!(
            "'{text}' must be more than 0 and at most 3600 seconds"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Why a key file could not serve as the node's identity.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} is corrupt: it must hold one 64-hex-digit secret key")]
    Corrupt { path: PathBuf },
    #[error("cannot create key file {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make a key: {0}")]
    Generate(String),
}

/// Loads the identity in `path`, or makes a new one and saves it there (readable by the owner
/// only, where the platform has permissions).
pub fn load_or_create_identity(path: &Path) -> Result<Identity, KeyFileError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Identity::from_secret_hex(&text).map_err(|_| KeyFileError::Corrupt {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let identity =
                Identity::generate().map_err(|e| KeyFileError::Generate(e.to_string()))?;
            let create = |source| KeyFileError::Create {
                path: path.to_owned(),
                source,
            };
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(path).map_err(create)?;
            writeln!(file, "{}", identity.to_secret_hex()).map_err(create)?;
            file.sync_all().map_err(create)?;
            Ok(identity)
        }
        Err(source) => Err(KeyFileError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbor_addresses_need_a_host_and_a_real_port() {
        assert!(parse_neighbor("127.0.0.1:4000").is_ok());
        assert!(parse_neighbor("localhost:4000").is_ok());
        assert!(parse_neighbor("[::1]:4000").is_ok());
        for bad in ["4000", ":4000", "host:", "host:99999", "host:0", "host:x"] {
            assert!(parse_neighbor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_advertised_address_is_dialable() {
        for good in [
            "203.0.113.7:4000",
            "node.example.org:4000",
            "[2001:db8::1]:4000",
        ] {
            assert_eq!(
                Advertise::new(good).map(|a| a.to_string()),
                Ok(good.to_owned())
            );
        }
        for wildcard in ["0.0.0.0:4000", "[::]:4000"] {
            let err = Advertise::new(wildcard).expect_err(wildcard);
            assert!(matches!(err, AdvertiseError::Wildcard { .. }), "{err}");
            assert!(err.to_string().contains("wildcard"), "{err}");
        }
        for bad in ["203.0.113.7:0", "203.0.113.7", ":4000", "host:x"] {
            let err = Advertise::new(bad).expect_err(bad);
            assert!(matches!(err, AdvertiseError::Invalid { .. }), "{err}");
        }
        assert!(
            Advertise::new("203.0.113.7:0")
                .expect_err("port 0")
                .to_string()
                .contains("port 0")
        );
    }

    #[test]
    fn the_record_carries_the_advertised_address_or_a_dialable_listen_address() {
        let at = |text: &str| text.parse::<SocketAddr>().expect("an address");
        let public = Advertise::new("203.0.113.7:4000").expect("good");
        assert_eq!(
            advertised_addr(at("0.0.0.0:4000"), Some(&public)),
            Ok("203.0.113.7:4000".to_owned())
        );
        assert_eq!(
            advertised_addr(at("127.0.0.1:4000"), None),
            Ok("127.0.0.1:4000".to_owned())
        );
        for wildcard in ["0.0.0.0:4000", "[::]:4000"] {
            let err = advertised_addr(at(wildcard), None).expect_err(wildcard);
            assert!(err.to_string().contains("--advertise"), "{err}");
        }
    }

    #[test]
    fn durations_parse_in_seconds_or_milliseconds() {
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "0", "-1s", "x", "5m", "99999", "NaNs"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ui_tokens_are_visible_ascii_and_never_shown() {
        let token = UiToken::new("s3cr3t-Token_~").expect("a good token");
        assert_eq!(token.expose(), "s3cr3t-Token_~");
        assert!(!format!("{token:?}").contains("s3cr3t"));
        let mut config = Config::new(Identity::from_seed([1; 32]));
        config.ui_token = Some(token.clone());
        assert!(!format!("{config:?}").contains("s3cr3t"));
        for bad in ["", "two words", "tab\there", "caf\u{e9}", "line\n"] {
            assert!(UiToken::new(bad).is_err(), "{bad:?}");
        }
        assert!(UiToken::new("x".repeat(MAX_UI_TOKEN_LEN)).is_ok());
        assert!(UiToken::new("x".repeat(MAX_UI_TOKEN_LEN + 1)).is_err());
        assert_eq!(UiToken::new(""), Err("the UI token is empty".to_owned()));
    }

    #[test]
    fn ui_tokens_match_only_themselves() {
        let token = UiToken::new("abc123").expect("a good token");
        assert!(token.matches(b"abc123"));
        for wrong in [&b""[..], b"abc12", b"abc1234", b"abc124", b"ABC123"] {
            assert!(!token.matches(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn the_ui_warning_depends_on_loopback_and_the_token() {
        let at = |ip: &str| SocketAddr::new(ip.parse().expect("an IP"), 5333);
        for ip in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            for token in [false, true] {
                assert_eq!(UiExposure::of(at(ip), token), UiExposure::Loopback, "{ip}");
                assert_eq!(UiExposure::of(at(ip), token).warning(), None, "{ip}");
            }
        }
        for ip in [
            "0.0.0.0",
            "::",
            "192.168.1.2",
            "10.0.0.1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(UiExposure::of(at(ip), true), UiExposure::Guarded, "{ip}");
            assert_eq!(UiExposure::of(at(ip), false), UiExposure::Open, "{ip}");
            let open = UiExposure::Open.warning().expect("a warning");
            assert!(open.contains("anyone who can reach the port can shut this node down"));
            assert!(open.contains("--ui-token"));
            let guarded = UiExposure::Guarded.warning().expect("a warning");
            assert!(!guarded.contains("anyone"));
        }
    }

    #[test]
    fn a_key_file_is_created_once_then_loaded_and_a_corrupt_one_is_refused() {
        let dir = std::env::temp_dir().join(format!("meshnode-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("node.key");
        let _ = std::fs::remove_file(&path);
        let first = load_or_create_identity(&path).expect("created");
        let again = load_or_create_identity(&path).expect("loaded");
        assert_eq!(first.id(), again.id());

        std::fs::write(&path, "not a key").expect("write");
        let err = load_or_create_identity(&path).expect_err("corrupt");
        assert!(matches!(err, KeyFileError::Corrupt { .. }), "{err}");
        let err = load_or_create_identity(&dir).expect_err("a directory is unreadable");
        assert!(matches!(err, KeyFileError::Read { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

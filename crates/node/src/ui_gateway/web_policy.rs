//! The UI refuses web pages it did not serve. Loopback is no boundary against the operator's own
//! browser: any page it visits may POST a form to `http://127.0.0.1:5333/shutdown` or open a
//! websocket to the UI (cross-site request forgery, cross-site websocket hijacking), and a page
//! on a domain rebound to 127.0.0.1 reaches every route as if it were the UI's own (DNS
//! rebinding). Two checks, on every request before any route (the websocket upgrade included):
//!
//! - **Host**: an IP literal, `localhost`, or a name allowed with `--ui-allow-host`. A rebinding
//!   page can only ever send its own domain name here.
//! - **Origin**, when the request has one (browsers send it; native clients such as `masq`,
//!   curl and `meshnode` do not): the UI's own origin (plain `http`, the host and port that the
//!   request addressed, any loopback spelling of that host), or one allowed with
//!   `--ui-allow-origin`.
//!
//! A refused request gets HTTP 403 with a MASQ error envelope and is logged at warn.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use meshnode_protocol::ui::{UiMessage, codes};
use tokio::time::Instant;
use tracing::warn;

use super::listener::ClientAddr;

/// Longest header value quoted back in a refusal or a log line.
const QUOTED_MAX: usize = 120;
/// Most refusals logged per second: a page that retries in a loop must not flood the log. The
/// others are counted, and the count is logged with the next refusal that is.
pub const REFUSALS_LOGGED_PER_SECOND: u64 = 20;

/// Which `Host` names and which web origins the UI answers, beyond its own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebPolicy {
    hosts: Allowed<HostName>,
    origins: Allowed<WebOrigin>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed<T> {
    Listed(Vec<T>),
    Any,
}

impl<T> Default for Allowed<T> {
    fn default() -> Self {
        Allowed::Listed(Vec::new())
    }
}

impl<T: PartialEq> Allowed<T> {
    fn add(&mut self, item: Option<T>) {
        match (self, item) {
            (this, None) => *this = Allowed::Any,
            (Allowed::Listed(list), Some(item)) if !list.contains(&item) => list.push(item),
            _ => {}
        }
    }

    fn contains(&self, item: &T) -> bool {
        match self {
            Allowed::Listed(list) => list.contains(item),
            Allowed::Any => true,
        }
    }

    fn is_any(&self) -> bool {
        matches!(self, Allowed::Any)
    }
}

/// A name given with `--ui-allow-host`: a DNS name, or `*` for any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHost(Option<HostName>);

/// An origin given with `--ui-allow-origin`: `scheme://host[:port]`, or `*` for any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedOrigin(Option<WebOrigin>);

/// Why a `--ui-allow-host` or `--ui-allow-origin` value is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "'{0}' is not a host name: give a DNS name such as node.example (letters, digits, '-', \
         '.', '_'; non-ASCII names in their xn-- form), without a port, or '*' for any"
    )]
    BadHost(String),
    #[error(
        "'{0}' is not a web origin: give scheme://host[:port], such as http://console.example:8080, \
         or '*' for any"
    )]
    BadOrigin(String),
    #[error(
        "the origin 'null' is that of every sandboxed frame and local file: it cannot be allowed"
    )]
    NullOrigin,
}

impl AllowedHost {
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        if text == "*" {
            return Ok(Self(None));
        }
        let bad = || PolicyError::BadHost(text.to_owned());
        match parse_host(text.as_bytes()).ok_or_else(bad)? {
            (host, None) => Ok(Self(Some(host))),
            (_, Some(_)) => Err(bad()),
        }
    }
}

impl AllowedOrigin {
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        match text {
            "*" => return Ok(Self(None)),
            "null" => return Err(PolicyError::NullOrigin),
            _ => {}
        }
        // People paste URLs: one trailing slash is forgiven.
        let trimmed = text.strip_suffix('/').unwrap_or(text);
        match WebOrigin::parse(trimmed.as_bytes()) {
            Ok(origin) => Ok(Self(Some(origin))),
            Err(_) => Err(PolicyError::BadOrigin(text.to_owned())),
        }
    }
}

impl WebPolicy {
    /// The UI's own origin and IP literals and `localhost` only.
    pub fn strict() -> Self {
        Self::default()
    }

    /// Also answers requests whose `Host` is `host` (or any `Host`, for `*`).
    pub fn allow_host(&mut self, host: AllowedHost) {
        self.hosts.add(host.0);
    }

    /// Also serves requests from pages of `origin` (or of any origin, for `*`).
    pub fn allow_origin(&mut self, origin: AllowedOrigin) {
        self.origins.add(origin.0);
    }

    /// Whether nothing beyond the strict policy is allowed.
    pub fn is_strict(&self) -> bool {
        *self == Self::strict()
    }

    /// The warnings to log at start: a `*` opens a door.
    pub fn warnings(&self) -> Vec<&'static str> {
        let mut warnings = Vec::new();
        if self.hosts.is_any() {
            warnings.push(
                "--ui-allow-host '*': the UI answers any Host name, so a web page on a domain \
                 rebound to this address can drive it (DNS rebinding)",
            );
        }
        if self.origins.is_any() {
            warnings.push(
                "--ui-allow-origin '*': every web page the operator's browser opens can drive \
                 the UI, and shut the node down",
            );
        }
        warnings
    }

    /// The allowed names and origins, for the start-up log.
    pub fn describe(&self) -> String {
        fn list<T: fmt::Display>(allowed: &Allowed<T>) -> String {
            match allowed {
                Allowed::Any => "*".to_owned(),
                Allowed::Listed(list) if list.is_empty() => "none".to_owned(),
                Allowed::Listed(list) => list
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            }
        }
        format!(
            "extra hosts: {}; extra origins: {}",
            list(&self.hosts),
            list(&self.origins)
        )
    }

    /// Judges a request by its `Host` (or its absolute target's authority) and its `Origin`.
    pub fn check(&self, authority: Option<&[u8]>, origins: &[&[u8]]) -> Result<(), Refusal> {
        // No Host at all is HTTP/1.0 from a native client: browsers always send one.
        let addressed = match authority {
            None => None,
            Some(raw) => {
                let (host, port) =
                    parse_host(raw).ok_or_else(|| Refusal::MalformedHost(quote(raw)))?;
                if !self.host_allowed(&host) {
                    return Err(Refusal::Host(quote(raw)));
                }
                Some((host, port))
            }
        };
        let raw = match origins {
            [] => return Ok(()),
            [one] => *one,
            [first, ..] => return Err(Refusal::MalformedOrigin(quote(first))),
        };
        if raw == b"null" {
            return Err(Refusal::NullOrigin);
        }
        let origin = WebOrigin::parse(raw).map_err(|()| Refusal::MalformedOrigin(quote(raw)))?;
        let own = addressed
            .as_ref()
            .is_some_and(|(host, port)| origin.is_own(host, port.unwrap_or(80)));
        if own || self.origins.contains(&origin) {
            Ok(())
        } else {
            Err(Refusal::Origin(quote(raw)))
        }
    }

    fn host_allowed(&self, host: &HostName) -> bool {
        match host {
            HostName::Ip(_) => true,
            HostName::Name(name) if name == "localhost" => true,
            HostName::Name(_) => self.hosts.contains(host),
        }
    }
}

/// Why a request was refused; its text is the error envelope's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "the UI answers only to an IP address, localhost or a name allowed with \
         --ui-allow-host, and this request's Host is {0} (a web page on a rebound domain?)"
    )]
    Host(String),
    #[error("the request's Host {0} is not HOST[:PORT]")]
    MalformedHost(String),
    #[error(
        "the UI serves only its own web pages and origins allowed with --ui-allow-origin; \
         this request comes from a page of {0}"
    )]
    Origin(String),
    #[error("the UI serves no page whose origin is 'null' (a sandboxed frame or a local file)")]
    NullOrigin,
    #[error("the request's Origin {0} is not one origin, scheme://host[:port]")]
    MalformedOrigin(String),
}

impl Refusal {
    /// The MASQ error code: one for the Host check, one for the Origin check.
    pub fn code(&self) -> u64 {
        match self {
            Refusal::Host(_) | Refusal::MalformedHost(_) => codes::HOST_NOT_ALLOWED,
            Refusal::Origin(_) | Refusal::NullOrigin | Refusal::MalformedOrigin(_) => {
                codes::ORIGIN_NOT_ALLOWED
            }
        }
    }
}

/// The middleware's state: the policy, and how many refusals may still be logged.
#[derive(Debug)]
pub(super) struct Guard {
    policy: Arc<WebPolicy>,
    log: LogBudget,
}

impl Guard {
    pub(super) fn new(policy: Arc<WebPolicy>) -> Self {
        Self {
            policy,
            log: LogBudget::new(REFUSALS_LOGGED_PER_SECOND),
        }
    }
}

/// At most `per_second` log lines in each second since start; the rest are counted.
#[derive(Debug)]
struct LogBudget {
    per_second: u64,
    start: Instant,
    second: AtomicU64,
    logged: AtomicU64,
    unlogged: AtomicU64,
}

impl LogBudget {
    fn new(per_second: u64) -> Self {
        Self {
            per_second,
            start: Instant::now(),
            second: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if this refusal may be logged, `n` the refusals left unlogged since the last
    /// one that was; `None` if it may not (it is counted). Concurrent refusals may overshoot
    /// the budget by a few: it bounds a flood, it is no exact meter.
    fn admit(&self) -> Option<u64> {
        let now = self.start.elapsed().as_secs();
        if self.second.swap(now, Ordering::Relaxed) != now {
            self.logged.store(0, Ordering::Relaxed);
        }
        if self.logged.fetch_add(1, Ordering::Relaxed) < self.per_second {
            Some(self.unlogged.swap(0, Ordering::Relaxed))
        } else {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// The middleware: every request passes the policy before the token check and any route.
pub(super) async fn guard(
    State(guard): State<Arc<Guard>>,
    request: Request,
    next: Next,
) -> Response {
    let policy = &guard.policy;
    let headers = request.headers();
    // An absolute target (`POST http://host/shutdown`) names the host the request is for, and
    // then outranks Host (RFC 9112, 3.2.2); both must pass.
    let target = request.uri().authority().map(|a| a.as_str().as_bytes());
    let hosts: Vec<&[u8]> = headers
        .get_all(header::HOST)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    let origins: Vec<&[u8]> = headers
        .get_all(header::ORIGIN)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    let verdict = match (target, hosts.as_slice()) {
        (_, [_, second, ..]) => Err(Refusal::MalformedHost(quote(second))),
        (Some(target), [host]) => policy
            .check(Some(host), &[])
            .and_then(|()| policy.check(Some(target), &origins)),
        (Some(target), []) => policy.check(Some(target), &origins),
        (None, [host]) => policy.check(Some(host), &origins),
        (None, []) => policy.check(None, &origins),
    };
    let Err(refusal) = verdict else {
        // An Origin that passed is the UI's own or an allowed one: the browser may read the
        // answers (a loopback spelling other than the page's is cross-origin to the browser).
        let Some(origin) = headers.get(header::ORIGIN).cloned() else {
            return next.run(request).await;
        };
        if request.method() == Method::OPTIONS
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        {
            return preflight(origin);
        }
        let mut response = next.run(request).await;
        allow_reading(response.headers_mut(), origin);
        return response;
    };
    let Some(unlogged) = guard.log.admit() else {
        return forbidden(request.uri().path(), &refusal);
    };
    if unlogged > 0 {
        warn!(
            unlogged,
            "more UI requests were refused for their Host or Origin than are logged \
             ({REFUSALS_LOGGED_PER_SECOND} a second)"
        );
    }
    let client = ClientAddr::of(&request);
    let path = request.uri().path();
    let host = hosts
        .first()
        .map_or_else(|| "none".to_owned(), |h| quote(h));
    let origin = origins
        .first()
        .map_or_else(|| "none".to_owned(), |o| quote(o));
    match refusal {
        Refusal::Host(_) | Refusal::MalformedHost(_) => {
            warn!(%client, path, %host, %origin, "UI request for an unknown Host refused");
        }
        _ => warn!(%client, path, %host, %origin, "UI request from a foreign web origin refused"),
    }
    forbidden(path, &refusal)
}

/// How long a browser may keep a preflight's answer, in seconds.
const PREFLIGHT_MAX_AGE: &str = "600";

/// The answer to a CORS preflight from a page that passed the checks: it may send `GET` and
/// `POST` with `Authorization` and `Content-Type`. It comes before the token check, since a
/// preflight never carries credentials, and says nothing about the token.
fn preflight(origin: HeaderValue) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    allow_reading(headers, origin);
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static(PREFLIGHT_MAX_AGE),
    );
    response
}

/// Lets the page of `origin` read the answer (no cookies: the UI's own page needs none across
/// origins), and tells caches that the answer depends on the Origin.
fn allow_reading(headers: &mut axum::http::HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(header::VARY, HeaderValue::from_static("origin"));
}

/// HTTP 403 with a MASQ error envelope as its body: opcode `status` or `shutdown` on those
/// routes (as their other errors), `forbidden` on the websocket and any other path.
fn forbidden(path: &str, refusal: &Refusal) -> Response {
    let opcode = match path {
        "/status" => "status",
        "/shutdown" => "shutdown",
        _ => "forbidden",
    };
    let body = UiMessage::error(opcode, None, refusal.code(), refusal.to_string());
    (
        StatusCode::FORBIDDEN,
        [(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        )],
        axum::Json(body),
    )
        .into_response()
}

/// A header value as it may be shown in a log line or a message: in single quotes, anything
/// but printable ASCII (and the quote and backslash) escaped, cut at [`QUOTED_MAX`] bytes.
fn quote(raw: &[u8]) -> String {
    let mut out = String::from("'");
    for &b in &raw[..raw.len().min(QUOTED_MAX)] {
        if (b' '..=b'~').contains(&b) && b != b'\'' && b != b'\\' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out.push('\'');
    if raw.len() > QUOTED_MAX {
        out.push_str("...");
    }
    out
}

/// A host as it is compared: an IP address, or a lowercase DNS name without its trailing dot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostName {
    Ip(IpAddr),
    Name(String),
}

impl HostName {
    /// `localhost`, or an address in 127.0.0.0/8 or `::1`.
    fn is_loopback(&self) -> bool {
        match self {
            HostName::Ip(ip) => ip.to_canonical().is_loopback(),
            HostName::Name(name) => name == "localhost",
        }
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostName::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            HostName::Ip(ip) => write!(f, "{ip}"),
            HostName::Name(name) => f.write_str(name),
        }
    }
}

/// Parses `host[:port]`, where host is a DNS name, a dotted IPv4 address or a bracketed IPv6
/// one. Names are compared without case and without one trailing dot (DNS's absolute form of
/// the same name). `None` for anything else, a bare IPv6 address or an empty port included.
fn parse_host(raw: &[u8]) -> Option<(HostName, Option<u16>)> {
    let text = std::str::from_utf8(raw).ok()?;
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let ip: Ipv6Addr = inside.parse().ok()?;
        let port = match after {
            "" => None,
            _ => Some(parse_port(after.strip_prefix(':')?)?),
        };
        return Some((HostName::Ip(IpAddr::V6(ip)), port));
    } else {
        match text.split_once(':') {
            Some((host, port)) => (host, Some(parse_port(port)?)),
            None => (text, None),
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let valid = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if host.len() > 253 || !host.split('.').all(valid) {
        return None;
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Some((HostName::Ip(IpAddr::V4(ip)), port));
    }
    Some((HostName::Name(host.to_ascii_lowercase()), port))
}

fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A web origin: scheme, host and port (the scheme's default when the origin gives none).
#[derive(Debug, Clone, PartialEq, Eq)]
struct WebOrigin {
    scheme: String,
    host: HostName,
    port: Option<u16>,
}

impl WebOrigin {
    /// Parses an `Origin` header value, `scheme://host[:port]`, as browsers serialize it.
    fn parse(raw: &[u8]) -> Result<Self, ()> {
        let text = std::str::from_utf8(raw).map_err(|_| ())?;
        let (scheme, rest) = text.split_once("://").ok_or(())?;
        let scheme_ok = scheme
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
        if !scheme_ok {
            return Err(());
        }
        let (host, port) = parse_host(rest.as_bytes()).ok_or(())?;
        let scheme = scheme.to_ascii_lowercase();
        let port = port.or(match scheme.as_str() {
            "http" | "ws" => Some(80),
            "https" | "wss" => Some(443),
            _ => None,
        });
        Ok(Self { scheme, host, port })
    }

    /// Whether this is the UI's own origin, as a request addressed to `host:port` shows it:
    /// plain `http`, the same port, and the same host or two loopback spellings.
    fn is_own(&self, host: &HostName, port: u16) -> bool {
        self.scheme == "http"
            && self.port == Some(port)
            && (self.host == *host || (self.host.is_loopback() && host.is_loopback()))
    }
}

impl fmt::Display for WebOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.host)?;
        match (self.scheme.as_str(), self.port) {
            ("http" | "ws", Some(80)) | ("https" | "wss", Some(443)) | (_, None) => Ok(()),
            (_, Some(port)) => write!(f, ":{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict() -> WebPolicy {
        WebPolicy::strict()
    }

    fn host(policy: &WebPolicy, host: &str) -> Result<(), Refusal> {
        policy.check(Some(host.as_bytes()), &[])
    }

    fn from(policy: &WebPolicy, host: &str, origin: &str) -> Result<(), Refusal> {
        policy.check(Some(host.as_bytes()), &[origin.as_bytes()])
    }

    #[test]
    fn ip_literals_and_localhost_are_answered_in_any_spelling() {
        let policy = strict();
        for ok in [
            "127.0.0.1",
            "127.0.0.1:5333",
            "127.8.9.10:1",
            "10.0.0.7:5333",
            "[::1]",
            "[::1]:5333",
            "[0:0:0:0:0:0:0:1]:5333",
            "[2001:db8::1]:80",
            "[::ffff:127.0.0.1]:5333",
            "localhost",
            "localhost:5333",
            "LOCALHOST:5333",
            "LocalHost.:5333",
            "localhost.",
            "127.0.0.1.:5333",
        ] {
            assert_eq!(host(&policy, ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn other_names_are_refused_however_they_are_spelled() {
        let policy = strict();
        for name in [
            "evil.example",
            "evil.example:5333",
            "rebind.evil.example:5333",
            "127.0.0.1.evil.example",
            "127.0.0.1.evil.example:5333",
            "localhost.evil.example",
            "localhost.evil.example.:5333",
            "EVIL.EXAMPLE.",
            "foo.localhost",
            "127.1",
            "2130706433",
            "0x7f.0.0.1",
            "node",
        ] {
            assert!(
                matches!(host(&policy, name), Err(Refusal::Host(_))),
                "{name}: {:?}",
                host(&policy, name)
            );
        }
        for malformed in [
            "",
            ":5333",
            "::1",
            "::1:5333",
            "[::1",
            "[::1]5333",
            "[::1]:",
            "[fe80::1%25eth0]",
            "localhost:",
            "localhost:99999",
            "localhost:-1",
            "localhost:53x",
            "localhost:5333:1",
            "local host",
            "évil.example",
            "a..b",
            ".",
            "user@localhost",
            "localhost/path",
        ] {
            assert!(
                matches!(host(&policy, malformed), Err(Refusal::MalformedHost(_))),
                "{malformed:?}: {:?}",
                host(&policy, malformed)
            );
        }
    }

    #[test]
    fn allowed_names_match_without_case_trailing_dot_or_port_and_star_allows_all() {
        let mut policy = strict();
        policy.allow_host(AllowedHost::parse("Node.Example.").expect("a name"));
        for ok in ["node.example", "NODE.EXAMPLE:5333", "node.example.:1"] {
            assert_eq!(host(&policy, ok), Ok(()), "{ok}");
        }
        for refused in ["evil.example", "node.example.evil.example", "example"] {
            assert!(
                matches!(host(&policy, refused), Err(Refusal::Host(_))),
                "{refused}"
            );
        }
        policy.allow_host(AllowedHost::parse("*").expect("a star"));
        assert_eq!(host(&policy, "evil.example:5333"), Ok(()));
        assert_eq!(policy.warnings().len(), 1);
        assert!(policy.warnings()[0].contains("DNS rebinding"));
    }

    #[test]
    fn bad_allow_host_values_are_refused_with_a_hint() {
        for bad in [
            "",
            "node.example:5333",
            "http://node.example",
            "a b",
            "[::1]:1",
            "é.fr",
        ] {
            let err = AllowedHost::parse(bad).expect_err(bad);
            assert!(err.to_string().contains("DNS name"), "{bad}: {err}");
        }
    }

    #[test]
    fn requests_without_origin_pass_the_origin_check() {
        assert_eq!(strict().check(Some(b"127.0.0.1:5333"), &[]), Ok(()));
        // HTTP/1.0 without Host, from a native client.
        assert_eq!(strict().check(None, &[]), Ok(()));
    }

    #[test]
    fn the_uis_own_origin_passes_in_every_loopback_spelling() {
        let policy = strict();
        for (host, origin) in [
            ("127.0.0.1:5333", "http://127.0.0.1:5333"),
            ("127.0.0.1:5333", "http://localhost:5333"),
            ("127.0.0.1:5333", "http://[::1]:5333"),
            ("localhost:5333", "http://127.0.0.1:5333"),
            ("LOCALHOST:5333", "HTTP://LocalHost:5333"),
            ("[::1]:5333", "http://localhost:5333"),
            ("[::1]:5333", "http://[0:0:0:0:0:0:0:1]:5333"),
            ("127.0.0.1", "http://127.0.0.1"),
            ("127.0.0.1:80", "http://127.0.0.1"),
            ("127.0.0.1", "http://localhost:80"),
            ("10.0.0.7:5333", "http://10.0.0.7:5333"),
        ] {
            assert_eq!(from(&policy, host, origin), Ok(()), "{host} {origin}");
        }
    }

    #[test]
    fn foreign_origins_are_refused() {
        let policy = strict();
        for (host, origin) in [
            ("127.0.0.1:5333", "http://evil.example"),
            ("127.0.0.1:5333", "http://evil.example:5333"),
            // The right host on another port is another origin.
            ("127.0.0.1:5333", "http://127.0.0.1:8080"),
            ("127.0.0.1:5333", "http://localhost:5334"),
            ("127.0.0.1:5333", "http://127.0.0.1"),
            // The UI is plain HTTP: an https page of the same host and port is not its own.
            ("127.0.0.1:5333", "https://127.0.0.1:5333"),
            ("127.0.0.1:5333", "ws://127.0.0.1:5333"),
            ("127.0.0.1:5333", "http://127.0.0.1.evil.example:5333"),
            ("127.0.0.1:5333", "http://localhost.evil.example:5333"),
            // Loopback spellings only stand for each other, not for other addresses.
            ("10.0.0.7:5333", "http://127.0.0.1:5333"),
            ("127.0.0.1:5333", "http://10.0.0.7:5333"),
            ("127.0.0.1:5333", "chrome-extension://abcdefghijklmnop"),
        ] {
            assert!(
                matches!(from(&policy, host, origin), Err(Refusal::Origin(_))),
                "{host} {origin}: {:?}",
                from(&policy, host, origin)
            );
        }
        assert_eq!(
            from(&policy, "127.0.0.1:5333", "null"),
            Err(Refusal::NullOrigin)
        );
        for malformed in [
            "",
            "127.0.0.1:5333",
            "http://",
            "http://127.0.0.1:5333/",
            "http://127.0.0.1:5333/status",
            "http://user@127.0.0.1:5333",
            "http://127.0.0.1:0x50",
            "//127.0.0.1:5333",
            "1http://127.0.0.1",
            "NULL ",
        ] {
            assert!(
                matches!(
                    from(&policy, "127.0.0.1:5333", malformed),
                    Err(Refusal::MalformedOrigin(_))
                ),
                "{malformed:?}: {:?}",
                from(&policy, "127.0.0.1:5333", malformed)
            );
        }
        // Two Origin headers are not one origin, even if the first is the UI's own.
        let two: [&[u8]; 2] = [b"http://127.0.0.1:5333", b"http://evil.example"];
        assert!(matches!(
            policy.check(Some(b"127.0.0.1:5333"), &two),
            Err(Refusal::MalformedOrigin(_))
        ));
        // Without a Host, no origin is the UI's own.
        assert!(matches!(
            policy.check(None, &[b"http://127.0.0.1:5333"]),
            Err(Refusal::Origin(_))
        ));
    }

    #[test]
    fn allowed_origins_pass_as_browsers_spell_them() {
        let mut policy = strict();
        for given in [
            "http://console.example:8080",
            "HTTPS://Secure.Example:443/",
            "chrome-extension://abcdefghijklmnop",
        ] {
            policy.allow_origin(AllowedOrigin::parse(given).expect(given));
        }
        for ok in [
            "http://console.example:8080",
            "http://CONSOLE.example:8080",
            "https://secure.example",
            "https://secure.example:443",
            "chrome-extension://abcdefghijklmnop",
        ] {
            assert_eq!(from(&policy, "127.0.0.1:5333", ok), Ok(()), "{ok}");
        }
        for refused in [
            "http://console.example",
            "https://console.example:8080",
            "http://secure.example",
            "http://evil.example:8080",
        ] {
            assert!(
                matches!(
                    from(&policy, "127.0.0.1:5333", refused),
                    Err(Refusal::Origin(_))
                ),
                "{refused}"
            );
        }
        // An allowed origin does not allow its host as a Host name.
        assert!(matches!(
            host(&policy, "console.example:8080"),
            Err(Refusal::Host(_))
        ));
        assert!(policy.warnings().is_empty());
        assert!(policy.describe().contains("http://console.example:8080"));
        assert!(policy.describe().contains("https://secure.example"));
        policy.allow_origin(AllowedOrigin::parse("*").expect("a star"));
        assert_eq!(
            from(&policy, "127.0.0.1:5333", "http://evil.example"),
            Ok(())
        );
        // Not even a star lets 'null' in.
        assert_eq!(
            from(&policy, "127.0.0.1:5333", "null"),
            Err(Refusal::NullOrigin)
        );
        assert!(policy.warnings()[0].contains("every web page"));
    }

    #[test]
    fn bad_allow_origin_values_are_refused_with_a_hint() {
        assert_eq!(AllowedOrigin::parse("null"), Err(PolicyError::NullOrigin));
        for bad in [
            "",
            "console.example",
            "console.example:8080",
            "http://console.example:8080/path",
            "http://",
            "http://a b",
        ] {
            let err = AllowedOrigin::parse(bad).expect_err(bad);
            assert!(
                err.to_string().contains("scheme://host[:port]"),
                "{bad}: {err}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_logged_at_most_so_many_a_second_and_the_rest_are_counted() {
        let budget = LogBudget::new(3);
        let first: Vec<Option<u64>> = (0..5).map(|_| budget.admit()).collect();
        assert_eq!(first, [Some(0), Some(0), Some(0), None, None]);
        tokio::time::advance(std::time::Duration::from_millis(999)).await;
        assert_eq!(budget.admit(), None);
        // The next second: the first line logged carries the count of those that were not.
        tokio::time::advance(std::time::Duration::from_millis(1)).await;
        assert_eq!(budget.admit(), Some(3));
        assert_eq!(budget.admit(), Some(0));
        assert_eq!(budget.admit(), Some(0));
        assert_eq!(budget.admit(), None);
        tokio::time::advance(std::time::Duration::from_secs(60)).await;
        assert_eq!(budget.admit(), Some(1));
    }

    #[test]
    fn a_refusal_quotes_what_it_refused_escaped_and_cut_short() {
        let long = format!("{}.example", "a".repeat(300));
        let Err(Refusal::MalformedHost(quoted)) = host(&strict(), &long) else {
            panic!("a name over 253 bytes is malformed");
        };
        assert!(
            quoted.len() <= QUOTED_MAX + 5 && quoted.ends_with("..."),
            "{quoted}"
        );
        let Err(refusal) = strict().check(Some(b"127.0.0.1"), &[b"http://e'vil\x01\xff"]) else {
            panic!("refused");
        };
        let text = refusal.to_string();
        assert!(text.contains(r"'http://e\x27vil\x01\xff'"), "{text}");
        assert_eq!(refusal.code(), codes::ORIGIN_NOT_ALLOWED);
        assert_eq!(Refusal::Host(String::new()).code(), codes::HOST_NOT_ALLOWED);
    }
}

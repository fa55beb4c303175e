//! The console: one web page, embedded in the binary, that a browser gets at `GET /`. It speaks
//! to the node over the node's own MASQ websocket, like any other UI.
//!
//! What is served here, and to whom:
//! - `GET /` with `Accept: text/html` and no websocket upgrade (a browser opening the address)
//!   gets the page; any other request to `/` goes to the websocket upgrade exactly as before.
//! - `GET /console/console.js` and `GET /console/console.css`: the page's script and style, as
//!   separate files so that the strict Content-Security-Policy (`default-src 'self'`, no inline
//!   script or style) holds.
//! - `POST /console/login` (a node with `--ui-token`): exchanges the token for a session cookie,
//!   because a browser's WebSocket cannot send an `Authorization` header.
//! - `POST /console/logout`: forgets the cookie.
//!
//! The page, its files, login and logout are public even when the node has a token: they hold
//! nothing secret and change nothing on the node. Everything else keeps wanting the token, which
//! the session cookie then stands for.

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use meshnode_protocol::ui::{UiMessage, codes};
use tracing::{debug, info, warn};

use super::http::AppState;
use super::listener::ClientAddr;
use super::ws;

const INDEX_HTML: &str = include_str!("index.html");
const CONSOLE_JS: &str = include_str!("console.js");
const CONSOLE_CSS: &str = include_str!("console.css");

/// Where the page's script and style are served.
pub const SCRIPT_PATH: &str = "/console/console.js";
pub const STYLE_PATH: &str = "/console/console.css";
/// Where the page exchanges the UI token for the session cookie, and forgets it.
pub const LOGIN_PATH: &str = "/console/login";
pub const LOGOUT_PATH: &str = "/console/logout";

/// The policy every console response carries: everything from the node itself, nothing inline,
/// no framing (the page has a Shut down button: no other page may overlay it), forms only to
/// the node.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// Largest login body read: `token=` and a percent-encoded token of the longest length.
const LOGIN_BODY_LIMIT: usize = 6 + 3 * crate::config::MAX_UI_TOKEN_LEN;

/// The console's routes besides `/`, which [`root`] shares with the websocket.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(SCRIPT_PATH, get(script))
        .route(STYLE_PATH, get(style))
        .route(
            LOGIN_PATH,
            post(login).layer(DefaultBodyLimit::max(LOGIN_BODY_LIMIT)),
        )
        .route(LOGOUT_PATH, post(logout))
}

/// `GET /`: the console for a browser opening the page, the websocket for everyone else.
pub(super) async fn root(
    client: ConnectInfo<ClientAddr>,
    State(app): State<AppState>,
    request: Request,
) -> Response {
    if wants_page(request.headers()) {
        debug!(client = %client.0.0, "console page served");
        return page();
    }
    let (mut parts, _body) = request.into_parts();
    match WebSocketUpgrade::from_request_parts(&mut parts, &app).await {
        Ok(upgrade) => ws::upgrade(upgrade, client, State(app)).await,
        Err(rejection) => rejection.into_response(),
    }
}

/// A browser navigating to the address: no websocket upgrade, and HTML among what it accepts.
/// Clients that ask for the websocket, or that send no `Accept: text/html` (curl, masq,
/// meshnode's own client), are served as they were before the console existed.
pub(super) fn wants_page(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::UPGRADE) {
        return false;
    }
    headers.get_all(header::ACCEPT).iter().any(|value| {
        value.as_bytes().split(|&b| b == b',').any(|item| {
            let media = item.split(|&b| b == b';').next().unwrap_or_default();
            media.trim_ascii().eq_ignore_ascii_case(b"text/html")
        })
    })
}

/// Whether a request goes to a part of the console that needs no token: the page, its files,
/// login and logout.
pub(super) fn is_public(method: &Method, path: &str, headers: &HeaderMap) -> bool {
    match (method, path) {
        (&Method::GET, "/") => wants_page(headers),
        (&Method::GET, SCRIPT_PATH | STYLE_PATH) => true,
        (&Method::POST, LOGIN_PATH | LOGOUT_PATH) => true,
        _ => false,
    }
}

fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", CONSOLE_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", CONSOLE_CSS)
}

/// An embedded file with the headers every console response carries.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    secure(headers);
    response
}

/// The headers that keep a console response from being sniffed, framed, cached or leaking the
/// address it came from.
fn secure(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // The files change with the binary, and a restarted node may have another token.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// `POST /console/login` with the form body `token=TOKEN`: with the node's token, sets the
/// session cookie and answers 204; otherwise 401 with a MASQ error envelope. A node without a
/// token answers 204 and sets nothing: there is nothing to log in to.
async fn login(
    ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>,
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (Some(token), Some(session)) = (app.token.as_ref(), app.session.as_ref()) else {
        return no_content(None);
    };
    if !same_origin(&headers) {
        warn!(%client, "console login from another origin refused");
        return refuse(
            StatusCode::FORBIDDEN,
            "the console logs in only from its own page",
        );
    }
    match form_field(&body, "token") {
        Some(presented) if token.matches(&presented) => {
            info!(%client, "console logged in");
            no_content(Some(session.set_cookie()))
        }
        Some(_) => {
            warn!(%client, "console login with a wrong token refused");
            refuse(StatusCode::UNAUTHORIZED, "the UI token is wrong")
        }
        None => refuse(
            StatusCode::BAD_REQUEST,
            "send the token as the form field 'token' (application/x-www-form-urlencoded)",
        ),
    }
}

/// `POST /console/logout`: clears the session cookie.
async fn logout(State(app): State<AppState>) -> Response {
    let clear = app.session.as_ref().map(Session::clear_cookie);
    no_content(clear)
}

fn no_content(cookie: Option<HeaderValue>) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    if let Some(cookie) = cookie {
        headers.insert(header::SET_COOKIE, cookie);
    }
    secure(headers);
    response
}

fn refuse(status: StatusCode, message: &str) -> Response {
    let body = UiMessage::error("login", None, codes::UNAUTHORIZED, message);
    let mut response = (status, axum::Json(body)).into_response();
    secure(response.headers_mut());
    response
}

/// The value of `name` in an `application/x-www-form-urlencoded` body, decoded.
fn form_field(body: &[u8], name: &str) -> Option<Vec<u8>> {
    body.split(|&b| b == b'&').find_map(|pair| {
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &pair[..0]),
        };
        (percent_decode(key)? == name.as_bytes()).then_some(())?;
        percent_decode(value)
    })
}

/// Form decoding: `+` is a space, `%XX` a byte; a malformed escape is no value at all.
fn percent_decode(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = (*bytes.next()? as char).to_digit(16)?;
                let lo = (*bytes.next()? as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
            }
            _ => out.push(b),
        }
    }
    Some(out)
}

/// True when the request carries no `Origin`, or one naming the host it was sent to: a page of
/// the node itself. Cookies ignore ports, so a page served by another program on the same host
/// shares the node's cookies; its requests carry its own origin, and this refuses them.
pub(super) fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Some(host) = headers.get(header::HOST) else {
        return false;
    };
    let origin = origin.as_bytes();
    let Some(rest) = origin.strip_prefix(b"http://") else {
        return false;
    };
    rest.eq_ignore_ascii_case(host.as_bytes())
}

/// The console's session on a node with a token: a random key made at start, which the login
/// sets as an `HttpOnly; SameSite=Strict` cookie and the token check accepts in place of the
/// token. The cookie is not the token: it dies with the node, and the page's script cannot read
/// it.
#[derive(Clone)]
pub(super) struct Session {
    /// `meshnode_session_PORT`: one cookie per UI port, since cookies ignore ports.
    name: String,
    key: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The session key could not be made.
#[derive(Debug, thiserror::Error)]
#[error("no randomness for the console's session key: {0}")]
pub struct SessionError(getrandom::Error);

impl Session {
    pub(super) fn new(ui_port: u16) -> Result<Self, SessionError> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(SessionError)?;
        Ok(Self {
            name: format!("meshnode_session_{ui_port}"),
            key: key.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }

    fn set_cookie(&self) -> HeaderValue {
        let cookie = format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict",
            self.name, self.key
        );
        HeaderValue::from_str(&cookie).unwrap_or(HeaderValue::from_static(""))
    }

    fn clear_cookie(&self) -> HeaderValue {
        let cookie = format!(
            "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
            self.name
        );
        HeaderValue::from_str(&cookie).unwrap_or(HeaderValue::from_static(""))
    }

    /// Whether the request carries this session's cookie (compared in constant time) from the
    /// node's own page.
    pub(super) fn presented_in(&self, headers: &HeaderMap) -> CookieCheck {
        use subtle::ConstantTimeEq;
        let mut found = CookieCheck::Absent;
        for value in headers.get_all(header::COOKIE) {
            for pair in value.as_bytes().split(|&b| b == b';') {
                let pair = pair.trim_ascii();
                let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                    continue;
                };
                if &pair[..eq] != self.name.as_bytes() {
                    continue;
                }
                if bool::from(self.key.as_bytes().ct_eq(&pair[eq + 1..])) {
                    if !same_origin(headers) {
                        debug!("session cookie on a request from another origin");
                        return CookieCheck::Wrong;
                    }
                    return CookieCheck::Valid;
                }
                found = CookieCheck::Wrong;
            }
        }
        found
    }
}

/// What the session cookie of a request says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CookieCheck {
    Absent,
    /// A cookie of the right name with another value (an earlier run), or from another origin.
    Wrong,
    Valid,
}

#[cfg(test)]
mod tests;

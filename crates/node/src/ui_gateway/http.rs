//! The UI server: the MASQ websocket at `/`, `GET /status`, `GET /metrics` and
//! `POST /shutdown`, all behind the Host and Origin checks (see `web_policy`), then the UI
//! token when the node has one.

use std::future::IntoFuture;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use meshnode_protocol::ui::{UiMessage, codes};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::console::{self, CookieCheck};
use super::listener::{ClientAddr, ClosableListener};
use super::report::Trigger;
use super::state::Ui;
use super::web_policy::{self, WebPolicy};
use super::{GatewayError, GatewayHandle, metrics};
use crate::config::UiToken;
use crate::neighborhood::Connectivity;

/// After the node ends, how long the UI server may still write answers already made. Part of
/// the teardown reserve (`state::TEARDOWN_RESERVE`), so the node still ends by deadline + grace.
const HTTP_DRAIN: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Debug, Clone)]
pub(super) struct AppState {
    pub gateway: GatewayHandle,
    /// Cancelled when the node ends; open websockets end with it.
    pub node: CancellationToken,
    pub ui: Ui,
    /// When set, every request must carry it as `Authorization: Bearer TOKEN` (or the
    /// console's session cookie, which stands for it).
    pub token: Option<UiToken>,
    /// The console's session, when the node has a token.
    pub session: Option<console::Session>,
    /// Which Host names and web origins every request must come with.
    pub web: Arc<WebPolicy>,
    /// The node's connectivity as the neighborhood last published it.
    pub connectivity: tokio::sync::watch::Receiver<Connectivity>,
}

pub(super) fn router(state: AppState) -> Router {
    // `layer` (not `route_layer`) so that the checks guard the fallback, and any route added
    // above them, too: without it a client cannot even learn which paths exist, nor which
    // methods they take. The last layer runs first: a web page from another site (or a rebound
    // domain) is refused before the token is even looked at.
    Router::new()
        .route("/", get(console::root))
        .route("/status", get(status))
        .route("/metrics", get(scrape))
        .route("/shutdown", post(shutdown))
        .merge(console::routes())
        .layer(middleware::from_fn_with_state(
            Guard {
                token: state.token.clone(),
                session: state.session.clone(),
            },
            require_token,
        ))
        .layer(middleware::from_fn_with_state(
            Arc::new(web_policy::Guard::new(state.web.clone())),
            web_policy::guard,
        ))
        .with_state(state)
}

/// What the token check knows.
#[derive(Debug, Clone)]
struct Guard {
    token: Option<UiToken>,
    session: Option<console::Session>,
}

/// Lets a request through only if the node has no token, the request carries it (or the
/// console's session cookie), or it goes to a public part of the console.
async fn require_token(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let Some(token) = guard.token else {
        return next.run(request).await;
    };
    let headers = request.headers();
    if console::is_public(request.method(), request.uri().path(), headers) {
        return next.run(request).await;
    }
    let cookie = guard
        .session
        .as_ref()
        .map_or(CookieCheck::Absent, |session| session.presented_in(headers));
    let refusal = match (presented(headers), cookie) {
        (Some(presented), _) if token.matches(presented) => return next.run(request).await,
        (None, CookieCheck::Valid) => return next.run(request).await,
        (Some(_), _) => Refusal::Wrong,
        (None, CookieCheck::Wrong) => Refusal::StaleSession,
        (None, CookieCheck::Absent) => Refusal::Missing,
    };
    let client = ClientAddr::of(&request);
    let path = request.uri().path();
    match refusal {
        Refusal::Missing => debug!(%client, path, "UI request without the token refused"),
        Refusal::Wrong => warn!(%client, path, "UI request with a wrong token refused"),
        // A browser keeps the cookie of an earlier run of the node (or another origin's page
        // sent it): routine, and the page asks for the token again.
        Refusal::StaleSession => debug!(
            %client,
            path,
            "UI request with a console session cookie not of this run refused"
        ),
    }
    unauthorized(path, refusal)
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A bearer token that is not the node's.
    Wrong,
    /// No bearer token, and a console session cookie that is not this run's.
    StaleSession,
}

/// The credentials of an `Authorization: Bearer TOKEN` header (the scheme in any case), if any.
fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let start = rest.iter().position(|&b| b != b' ')?;
    Some(rest[start..].trim_ascii_end())
}

/// HTTP 401 with `WWW-Authenticate: Bearer` and a MASQ error envelope as its body. The
/// envelope's opcode is the route's (`status`, `shutdown`), or `unauthorized` for the websocket
/// and any other path.
fn unauthorized(path: &str, refusal: Refusal) -> Response {
    let opcode = match path {
        "/status" => "status",
        "/shutdown" => "shutdown",
        "/metrics" => "metrics",
        _ => "unauthorized",
    };
    let message = match refusal {
        Refusal::Missing => "this node's UI wants a token: send Authorization: Bearer TOKEN",
        Refusal::Wrong => "the UI token is wrong",
        Refusal::StaleSession => {
            "the console session is not this node's (it may have restarted): log in again"
        }
    };
    let challenge = match refusal {
        Refusal::Missing => HeaderValue::from_static(r#"Bearer realm="meshnode""#),
        Refusal::Wrong | Refusal::StaleSession => {
            HeaderValue::from_static(r#"Bearer realm="meshnode", error="invalid_token""#)
        }
    };
    let body = UiMessage::error(opcode, None, codes::UNAUTHORIZED, message);
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, challenge)],
        axum::Json(body),
    )
        .into_response()
}

/// Serves the UI until the node ends. The gateway closes the listening socket earlier, when it
/// answers a shutdown. When the node ends, answers already made (the report of a
/// `POST /shutdown`, say) are still written, for at most [`HTTP_DRAIN`]; then every connection
/// is dropped without waiting more (a client that never finishes its request cannot hold the
/// node up).
pub(super) async fn serve(listener: ClosableListener, app: AppState) {
    let end = app.node.clone();
    let service = router(app).into_make_service_with_connect_info::<ClientAddr>();
    let server = axum::serve(listener, service)
        .with_graceful_shutdown(end.clone().cancelled_owned())
        .into_future();
    tokio::pin!(server);
    let served = tokio::select! {
        served = &mut server => Some(served),
        () = end.cancelled() => tokio::time::timeout(HTTP_DRAIN, &mut server).await.ok(),
    };
    match served {
        Some(Err(e)) => error!(error = %e, "UI server failed"),
        Some(Ok(())) => {}
        None => debug!("UI connections still open when the node ended; dropped"),
    }
    debug!("UI server stopped");
}

async fn status(State(app): State<AppState>) -> Response {
    match app.gateway.status().await {
        Ok(status) => axum::Json(status).into_response(),
        Err(e) => error_response("status", &e),
    }
}

/// The node's figures in the Prometheus text format; see [`metrics`].
async fn scrape(State(app): State<AppState>) -> Response {
    let snapshot = match app.gateway.metrics().await {
        Ok(snapshot) => snapshot,
        Err(e) => return error_response("metrics", &e),
    };
    match metrics::render(&snapshot) {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => {
            error!(error = %e, "cannot encode the metrics");
            let body = UiMessage::error(
                "metrics",
                None,
                codes::INTERNAL,
                "cannot encode the metrics",
            );
            (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body)).into_response()
        }
    }
}

/// Asks for the shutdown (or joins it) and answers with the report once it has ended.
async fn shutdown(
    ConnectInfo(ClientAddr(client)): ConnectInfo<ClientAddr>,
    State(app): State<AppState>,
) -> Response {
    // The requester is an answered UI client, as an answered websocket is: the gateway, once
    // it has answered, waits (within the grace) until this answer is written out, so a node
    // with no other client left cannot end before its report reaches the requester.
    let answering = app.ui.clients.token();
    let response = match app.gateway.shutdown(Trigger::Http { client }).await {
        Ok(report) => axum::Json(report).into_response(),
        Err(e) => error_response("shutdown", &e),
    };
    let (parts, body) = response.into_parts();
    Response::from_parts(
        parts,
        axum::body::Body::new(HeldBody {
            body,
            _answering: answering,
        }),
    )
}

/// A response body that keeps the gateway waiting until the server has sent all of it and
/// dropped it. Size and frames are the inner body's, so `Content-Length` stays.
struct HeldBody {
    body: axum::body::Body,
    _answering: tokio_util::task::task_tracker::TaskTrackerToken,
}

impl http_body::Body for HeldBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// An HTTP error carrying the MASQ error envelope as its body.
fn error_response(opcode: &str, e: &GatewayError) -> Response {
    let (http, code) = match e {
        GatewayError::Stopped => (StatusCode::SERVICE_UNAVAILABLE, codes::NODE_NOT_RUNNING),
        GatewayError::NoAnswer(_) => (StatusCode::GATEWAY_TIMEOUT, codes::TIMEOUT),
    };
    (
        http,
        axum::Json(UiMessage::error(opcode, None, code, e.to_string())),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::net::TcpListener;
    use tokio::time::Instant;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::test_support::{identity, test_link, within};
    use crate::ui_gateway::{
        DEFAULT_SHUTDOWN_DEADLINE, GatewayConfig, NodeInfo, ShutdownOutcome, ShutdownReport,
        UI_GRACE, spawn_unserved,
    };

    async fn loopback() -> TcpListener {
        within("bind", TcpListener::bind(("127.0.0.1", 0)))
            .await
            .expect("a free port")
    }

    /// The requester of `POST /shutdown` is an answered UI client until its answer's body has
    /// been sent: while the server holds the answer's head but has not sent its body, the node
    /// does not end; once the body is sent, it ends at once, not when the grace runs out.
    #[tokio::test(start_paused = true)]
    async fn the_node_does_not_end_before_the_body_of_an_http_shutdown_answer_is_sent() {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let me = identity(1);
        let listen = loopback().await;
        let info = NodeInfo {
            node_id: me.id(),
            listen: listen.local_addr().expect("bound"),
            ui: SocketAddr::from(([127, 0, 0, 1], 1)),
        };
        let neighborhood = crate::neighborhood::spawn(
            me.clone(),
            info.listen.to_string(),
            cancel.clone(),
            &tracker,
        )
        .expect("the neighborhood starts");
        let pool = crate::stream_handler_pool::spawn(
            test_link(me),
            crate::stream_handler_pool::Verifiers::new(2),
            listen,
            Vec::new(),
            neighborhood.clone(),
            cancel.clone(),
            &tracker,
        );
        let config = GatewayConfig {
            listener: loopback().await,
            info,
            deadline: DEFAULT_SHUTDOWN_DEADLINE,
        };
        let (_gateway, mut exit, app) =
            spawn_unserved(config, neighborhood, pool, cancel.clone(), &tracker)
                .expect("the gateway starts");

        let requester = ClientAddr(SocketAddr::from(([127, 0, 0, 1], 40_000)));
        let response = within("the answer", shutdown(ConnectInfo(requester), State(app))).await;
        assert_eq!(response.status(), StatusCode::OK);
        let answered = Instant::now();
        // The head is made, the body not sent: the node has nothing else to wait for, yet it
        // does not end (paused time: the half grace passes only once every task is idle).
        assert!(
            tokio::time::timeout(UI_GRACE / 2, &mut exit).await.is_err(),
            "the node ended before the answer's body was sent"
        );
        assert!(!cancel.is_cancelled(), "the node ended");

        let body = within(
            "the body",
            axum::body::to_bytes(response.into_body(), 1 << 20),
        )
        .await
        .expect("the whole body");
        let report: ShutdownReport = serde_json::from_slice(&body).expect("a JSON report");
        assert_eq!(report.outcome, ShutdownOutcome::Graceful);
        let ended = within("the node ends", exit)
            .await
            .expect("the final report");
        assert_eq!(ended, report);
        assert!(
            answered.elapsed() < UI_GRACE,
            "the node ended when the body was sent, not at the end of the grace: {:?}",
            answered.elapsed()
        );
        tracker.close();
        within("every task ends", tracker.wait()).await;
    }
}

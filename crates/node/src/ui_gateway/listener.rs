//! The UI's listening socket, wrapped so the gateway can close it at a moment of its choosing
//! and know that it is closed (a new connection is then refused) before it answers anyone.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

#[derive(Debug)]
pub(super) struct ClosableListener {
    inner: Option<TcpListener>,
    addr: SocketAddr,
    close: CancellationToken,
    closed: Option<oneshot::Sender<()>>,
}

impl ClosableListener {
    /// Wraps `listener`; cancelling `close` closes it, and then `closed` resolves.
    pub(super) fn new(
        listener: TcpListener,
        close: CancellationToken,
    ) -> std::io::Result<(Self, oneshot::Receiver<()>)> {
        let addr = listener.local_addr()?;
        let (tx, rx) = oneshot::channel();
        Ok((
            Self {
                inner: Some(listener),
                addr,
                close,
                closed: Some(tx),
            },
            rx,
        ))
    }

    fn shut(&mut self) {
        if self.inner.take().is_some() {
            debug!(ui = %self.addr, "UI listener closed");
        }
        if let Some(tx) = self.closed.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for ClosableListener {
    fn drop(&mut self) {
        self.shut();
    }
}

impl axum::serve::Listener for ClosableListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let Some(listener) = self.inner.as_ref() else {
                return std::future::pending().await;
            };
            tokio::select! {
                biased;
                () = self.close.cancelled() => self.shut(),
                accepted = listener.accept() => match accepted {
                    Ok(conn) => return conn,
                    Err(e) => {
                        warn!(error = %e, "UI accept failed; pausing");
                        tokio::time::sleep(crate::ACCEPT_ERROR_PAUSE).await;
                    }
                },
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// The address of a UI client, as the UI server's connect info.
#[derive(Debug, Clone, Copy)]
pub(super) struct ClientAddr(pub SocketAddr);

impl ClientAddr {
    /// The client of a request, for a log line; empty where the server recorded none.
    pub(super) fn of(request: &axum::extract::Request) -> String {
        request
            .extensions()
            .get::<axum::extract::ConnectInfo<ClientAddr>>()
            .map(|axum::extract::ConnectInfo(ClientAddr(client))| client.to_string())
            .unwrap_or_default()
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, ClosableListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, ClosableListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

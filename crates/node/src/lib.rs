//! meshnode: a peer node daemon that leaves the network gracefully.
//!
//! The node is a library first: [`start`] a [`Config`] and get a [`Node`] handle; many nodes can
//! run in one process. Three subsystems, each a tokio task owning the inbox of its own message
//! enum: [`neighborhood`] (identity, records, gossip), [`stream_handler_pool`] (the TCP streams
//! to neighbors) and [`ui_gateway`] (the MASQ UI websocket and HTTP). [`client`] speaks to a
//! running node's UI.
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod demo;
pub mod link;
pub mod neighborhood;
mod node;
pub mod notify;
pub mod stream_handler_pool;
pub mod ui_gateway;

#[cfg(test)]
mod shutdown_tests;
#[cfg(test)]
mod test_support;

/// Pause after a failed accept (say, out of file descriptors) before accepting again.
const ACCEPT_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

pub use config::Config;
pub use node::{Node, NodeController, StartError, start};
pub use ui_gateway::{ShutdownOutcome, ShutdownReport, Trigger};

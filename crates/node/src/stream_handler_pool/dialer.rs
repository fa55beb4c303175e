//! Keeps one configured neighbor connected: dial, run the stream, and dial again with bounded,
//! jittered backoff when it fails or drops.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::connection::{self, Ended};
use super::{CONNECT_TIMEOUT, Counters, DEPARTED_COOLDOWN, PoolMsg, Shared};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

pub(super) async fn run(shared: Shared, target: String) {
    // Dialing stops with intake (at the start of a shutdown, or when the node stops); a stream
    // this dialer already runs stays up until the pool closes it.
    let cancel = shared.intake.clone();
    let mut delay = BACKOFF_MIN;
    let mut failures = 0u32;
    loop {
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target.as_str()));
        let Some(connected) = cancel.run_until_cancelled(connect).await else {
            return;
        };
        let outcome = match connected {
            Ok(Ok(stream)) => {
                Counters::bump(&shared.counters.streams_dialed);
                let _ = stream.set_nodelay(true);
                connection::run(shared.clone(), stream, true, None).await
            }
            Ok(Err(e)) => Ended::NotAdmitted(format!("connect failed: {e}")),
            Err(_) => Ended::NotAdmitted("connect timed out".to_owned()),
        };
        if cancel.is_cancelled() {
            return;
        }
        match outcome {
            Ended::Cancelled => return,
            Ended::Departed(peer) => {
                info!(peer = %peer.short(), cooldown = ?DEPARTED_COOLDOWN, "neighbor withdrew from the network; not dialing it for a while");
                if cancel
                    .run_until_cancelled(tokio::time::sleep(DEPARTED_COOLDOWN))
                    .await
                    .is_none()
                {
                    return;
                }
                // Then try again, at the slowest pace, in case it has come back.
                failures = 1;
                delay = BACKOFF_MAX;
                continue;
            }
            Ended::Closed(peer) => {
                info!(peer = %peer.short(), "neighbor dropped; dialing again");
                failures = 0;
                delay = BACKOFF_MIN;
            }
            Ended::Duplicate(peer) => {
                // Already connected through a stream the neighbor dialed: dial again only
                // once that stream is gone.
                debug!(peer = %peer.short(), "connected the other way; waiting for that stream to end");
                let (reply, gone) = oneshot::channel();
                if shared
                    .pool
                    .send(PoolMsg::WaitPeerGone { peer, reply })
                    .await
                    .is_err()
                {
                    return;
                }
                if cancel.run_until_cancelled(gone).await.is_none() {
                    return;
                }
                failures = 0;
                delay = BACKOFF_MIN;
            }
            Ended::NotAdmitted(reason) => {
                failures += 1;
                if failures == 1 {
                    warn!(%reason, "cannot reach neighbor; will keep trying");
                } else {
                    debug!(%reason, failures, "still cannot reach neighbor");
                }
            }
        }
        let pause = jitter(delay);
        delay = (delay * 2).min(BACKOFF_MAX);
        if cancel
            .run_until_cancelled(tokio::time::sleep(pause))
            .await
            .is_none()
        {
            return;
        }
    }
}

/// Between 75% and 125% of `delay`, so that neighbors that lost each other do not redial in step.
fn jitter(delay: Duration) -> Duration {
    let r = getrandom::u32().unwrap_or(u32::MAX / 2);
    let fraction = 0.75 + 0.5 * (f64::from(r) / f64::from(u32::MAX));
    delay.mul_f64(fraction)
}

//! The `+switch-master` watcher: a task subscribed to the sentinels'
//! announcement that they replaced a master, so that the connections
//! (`super::Connection`) move when they do, not after a command failed.
//! One watcher serves every connection made from one [`super::Endpoint`]
//! and its clones (the daemon's, a client and its event readers — the
//! bridge opens one per browser stream): a subscription per process, not
//! per connection. A master cut off from the sentinels but not from
//! us (a partition) answers every command: without this the gateway goes on
//! writing into it until it is demoted, and what it wrote there is dropped
//! when it resyncs from the new master.
//!
//! It listens to one sentinel at a time and moves on to the next when that
//! one fails (closed, silent past a ping, refusing), waiting longer after
//! each failure. It owns no master connection: it asks each follower to
//! search (`SentinelFollower::follow_switch`), which checks `ROLE` as
//! every search does. Followers hold the [`SwitchWatch`]; it holds them by
//! `Weak`, and its task ends when the last follower is dropped (the
//! watch's `DropGuard` cancels it).

use super::{CONNECTION_TIMEOUT, SentinelFollower};
use futures::StreamExt as _;
use redis::RedisError;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio_util::sync::{CancellationToken, DropGuard};

/// Most followers asked to search at once after a switch: many event
/// readers must not all ask the sentinels in the same instant.
const CONCURRENT_SEARCHES: usize = 16;

/// The watcher shared by the connections of one endpoint.
pub(super) struct SwitchWatch {
    /// The followers to move; dead ones are pruned as new ones come.
    followers: Mutex<Vec<Weak<SentinelFollower>>>,
    /// Stops the watcher's task when the last follower drops this.
    _stop: DropGuard,
}

impl SwitchWatch {
    /// The watch of `slot` (an endpoint's, shared by its clones), started
    /// on `sentinels` for `master_name` when none runs.
    pub(super) fn get_or_start(
        slot: &Mutex<Weak<SwitchWatch>>,
        master_name: &str,
        sentinels: impl FnOnce() -> Result<Vec<redis::Client>, RedisError>,
    ) -> Result<Arc<SwitchWatch>, RedisError> {
        let mut slot = slot.lock().expect("switch watch lock is never poisoned");
        if let Some(watch) = slot.upgrade() {
            return Ok(watch);
        }
        let sentinels = sentinels()?;
        let stop = CancellationToken::new();
        let watch = Arc::new(SwitchWatch {
            followers: Mutex::new(Vec::new()),
            _stop: stop.clone().drop_guard(),
        });
        *slot = Arc::downgrade(&watch);
        let master_name = master_name.to_owned();
        let weak = Arc::downgrade(&watch);
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = run(&weak, &master_name, &sentinels) => {}
            }
        });
        Ok(watch)
    }

    /// Moves `follower` too when the sentinels switch masters.
    pub(super) fn add(&self, follower: &Arc<SentinelFollower>) {
        let mut followers = self
            .followers
            .lock()
            .expect("switch watch lock is never poisoned");
        followers.retain(|follower| follower.strong_count() > 0);
        followers.push(Arc::downgrade(follower));
    }

    /// Asks every live follower to check where the master is (see
    /// `SentinelFollower::follow_switch`), a few at a time.
    async fn follow_switch(&self, replaced: Option<&str>) {
        let followers: Vec<Arc<SentinelFollower>> = self
            .followers
            .lock()
            .expect("switch watch lock is never poisoned")
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        futures::stream::iter(followers)
            .for_each_concurrent(CONCURRENT_SEARCHES, |follower| async move {
                follower.follow_switch(replaced).await;
            })
            .await;
    }
}

/// The sentinels' channel announcing a new master:
/// `<name> <old-ip> <old-port> <new-ip> <new-port>`.
const SWITCH_MASTER_CHANNEL: &str = "+switch-master";

/// How often the sentinel listened to is pinged: a sentinel cut off from
/// us without its connection closing would otherwise leave the watcher
/// deaf for good.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Wait before subscribing again after the first failure; doubled after
/// each failure in a row, up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// Longest wait between two subscription attempts (every sentinel down).
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why listening to one sentinel stopped.
#[derive(Debug, thiserror::Error)]
enum WatchError {
    /// Connecting or subscribing failed.
    #[error("cannot subscribe to {SWITCH_MASTER_CHANNEL}: {0}")]
    Subscribe(RedisError),
    /// Connecting or subscribing took longer than [`CONNECTION_TIMEOUT`].
    #[error("subscribing to {SWITCH_MASTER_CHANNEL} timed out")]
    SubscribeTimedOut,
    /// The sentinel closed the connection.
    #[error("the connection closed")]
    Closed,
    /// The sentinel did not answer a ping (in time).
    #[error("no answer to a ping: {0}")]
    Ping(String),
}

impl WatchError {
    /// True when the sentinel was listened to before this: it was lost,
    /// rather than never reached.
    fn after_subscribing(&self) -> bool {
        matches!(self, WatchError::Closed | WatchError::Ping(_))
    }
}

/// One `+switch-master` announcement.
#[derive(Debug, PartialEq, Eq)]
struct Switch {
    /// The name the sentinels monitor the master under.
    master_name: String,
    /// `ip:port` of the master replaced, as a search names it.
    from: String,
    /// `ip:port` of the master promoted.
    to: String,
}

impl Switch {
    /// Reads `<name> <old-ip> <old-port> <new-ip> <new-port>`; `None` for
    /// anything else.
    fn parse(message: &str) -> Option<Switch> {
        let mut fields = message.rsplitn(5, ' ');
        let (to_port, to_ip, from_port, from_ip) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        let master_name = fields.next()?;
        let port = |port: &str| port.parse::<u16>().ok();
        let (from_port, to_port) = (port(from_port)?, port(to_port)?);
        Some(Switch {
            master_name: master_name.to_owned(),
            from: format!("{from_ip}:{from_port}"),
            to: format!("{to_ip}:{to_port}"),
        })
    }
}

/// Listens to each sentinel in turn, for as long as the watch lives.
async fn run(watch: &Weak<SwitchWatch>, master_name: &str, sentinels: &[redis::Client]) {
    let mut backoff = MIN_BACKOFF;
    let mut failed_in_a_row = 0;
    for sentinel in sentinels.iter().cycle() {
        let listened_since = Instant::now();
        let Some(error) = listen(watch, master_name, sentinel).await else {
            return; // Every follower is gone.
        };
        let address = sentinel.get_connection_info().addr().to_string();
        if error.after_subscribing() {
            // Listened, then lost: the next sentinel, soon; after a long
            // subscription, from the shortest wait again.
            if listened_since.elapsed() > PING_INTERVAL {
                backoff = MIN_BACKOFF;
            }
            failed_in_a_row = 0;
            tracing::warn!(
                master_name = %master_name,
                sentinel = %address,
                error = %error,
                "redis: stopped hearing a sentinel's master switches; listening to the next"
            );
        } else {
            failed_in_a_row += 1;
            if failed_in_a_row % sentinels.len() == 0 {
                tracing::warn!(
                    master_name = %master_name,
                    sentinel = %address,
                    error = %error,
                    retry_in = ?backoff,
                    "redis: no sentinel to hear master switches from; a failover is followed once a command fails"
                );
            } else {
                tracing::debug!(
                    master_name = %master_name,
                    sentinel = %address,
                    error = %error,
                    "redis: cannot hear this sentinel's master switches; trying the next"
                );
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Subscribes to one sentinel and follows each switch of our master it
/// announces; returns why it stopped, or `None` once every follower is gone.
async fn listen(
    watch: &Weak<SwitchWatch>,
    master_name: &str,
    sentinel: &redis::Client,
) -> Option<WatchError> {
    let subscribed = tokio::time::timeout(CONNECTION_TIMEOUT, async {
        let mut pubsub = sentinel.get_async_pubsub().await?;
        pubsub.subscribe(SWITCH_MASTER_CHANNEL).await?;
        Ok::<_, RedisError>(pubsub)
    })
    .await;
    let (mut sink, mut messages) = match subscribed {
        Ok(Ok(pubsub)) => pubsub.split(),
        Ok(Err(error)) => return Some(WatchError::Subscribe(error)),
        Err(_) => return Some(WatchError::SubscribeTimedOut),
    };
    // A switch announced while nobody listened (before this connection
    // was made, or while the previous sentinel was failing) went unheard:
    // ask where the master is now.
    watch.upgrade()?.follow_switch(None).await;
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return Some(WatchError::Closed);
                };
                let Ok(text) = message.get_payload::<String>() else {
                    continue;
                };
                let Some(switch) = Switch::parse(&text) else {
                    tracing::debug!(message = %text, "redis: an unreadable +switch-master message; ignored");
                    continue;
                };
                if switch.master_name != master_name {
                    continue;
                }
                tracing::info!(
                    master_name = %master_name,
                    from = %switch.from,
                    to = %switch.to,
                    "redis: the sentinels switched masters"
                );
                watch.upgrade()?.follow_switch(Some(&switch.from)).await;
            }
            _ = ping.tick() => {
                let answered = tokio::time::timeout(CONNECTION_TIMEOUT, sink.ping::<redis::Value>()).await;
                match answered {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) => return Some(WatchError::Ping(error.to_string())),
                    Err(_) => return Some(WatchError::Ping("timed out".to_owned())),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Switch;

    #[test]
    fn switch_master_messages_name_the_master_and_both_addresses() {
        assert_eq!(
            Switch::parse("gateway 10.0.0.1 6379 10.0.0.2 6380"),
            Some(Switch {
                master_name: "gateway".into(),
                from: "10.0.0.1:6379".into(),
                to: "10.0.0.2:6380".into(),
            })
        );
        // IPv6 addresses are written as the search writes them, unbracketed.
        assert_eq!(
            Switch::parse("gw ::1 7000 ::1 7001").map(|s| (s.from, s.to)),
            Some(("::1:7000".into(), "::1:7001".into()))
        );
        for unreadable in [
            "",
            "gateway",
            "gateway 10.0.0.1 6379 10.0.0.2",
            "gw a b c d",
        ] {
            assert_eq!(Switch::parse(unreadable), None, "{unreadable:?}");
        }
    }
}

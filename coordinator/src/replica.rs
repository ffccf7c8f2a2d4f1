//! A coordinator as one replica of several on one PostgreSQL database (or the only one, on
//! SQLite): its heartbeat, fencing, the change feed that keeps it current, and the
//! singleton lock.
//!
//! - Every second the replica writes its heartbeat (what it serves, how many sessions it
//!   holds) and reads everyone's; a replica silent for [`crate::health::REPLICA_DEAD_AFTER_MS`]
//!   holds no session (its nodes are someone else's to take).
//! - A replica whose heartbeat has not reached the database for [`FENCE_AFTER_MS`] fences
//!   itself: it ends its sessions (nodes move to another replica), refuses new control
//!   connections, and changes and issues nothing until the database answers again.
//! - The change feed (PostgreSQL `LISTEN`, notifications carry only versions) wakes
//!   [`Mesh::refresh`], which reads what changed from the tables; a reconnect of the feed
//!   and a periodic tick do the same, so a lost notification costs nothing.
//! - The connection that listens also holds the advisory lock of the singleton jobs (the
//!   offline sweep): the replica holding it is the leader until that connection ends.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use quicmesh_protocol::wire::ControlDown;

use crate::mesh::{now_ms, Mesh};
use crate::store::{FeedEvent, ReplicaRecord};

/// A replica whose heartbeat has not been written for this long fences itself.
pub const FENCE_AFTER_MS: i64 = 3_000;
/// How often the replica beats.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// How often the replica reads the store's version even without a notification.
const REFRESH_TICK: Duration = Duration::from_secs(2);
/// The least time between two refreshes: the notifications of a burst of changes (a join
/// storm on three replicas announces hundreds a second) cost one read of the store.
const REFRESH_GAP: Duration = Duration::from_millis(20);

/// Refuses to start a replica whose id a live replica elsewhere already uses (a data dir
/// copied whole, `replica.id` included): the two would end each other's sessions.
pub fn check_unique(mesh: &Mesh, control: &str) -> anyhow::Result<()> {
    let now = now_ms();
    for r in mesh.replicas()? {
        if r.id == mesh.replica
            && r.control != control
            && now - r.heartbeat_ms < crate::health::REPLICA_DEAD_AFTER_MS
        {
            anyhow::bail!(
                "replica id {} is in use by a live replica at {} (a copied data dir?): delete replica.id in this data dir to make a new one",
                r.id,
                r.control
            );
        }
    }
    Ok(())
}

/// Starts the heartbeat, the change feed (PostgreSQL) and the refresh loop.
pub fn start(mesh: &Arc<Mesh>, control: String, http: String) {
    // Set on a (re)connect of the feed and periodically: read everything again.
    let force = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn(heartbeat(mesh.clone(), control, http));
    tokio::spawn(refresher(mesh.clone(), force.clone()));
    if let Some(url) = mesh.feed_url() {
        let m = mesh.clone();
        let on = move |e: FeedEvent| match e {
            FeedEvent::Changed(v) => m.note_change(v),
            FeedEvent::Connected => {
                force.store(true, Ordering::Relaxed);
                m.catch_up.notify_one()
            }
            FeedEvent::Punch(payload) => m.deliver_punch(&payload),
            FeedEvent::Leader(l) => {
                let l = l && !m.fenced.load(Ordering::Relaxed);
                if m.leader.swap(l, Ordering::Relaxed) != l {
                    tracing::info!(replica = %m.replica, leader = l, "singleton jobs");
                }
            }
        };
        let m = mesh.clone();
        let fenced = move || m.fenced.load(Ordering::Relaxed);
        tokio::spawn(crate::store::feed(Arc::from(url), on, fenced));
    }
}

async fn refresher(mesh: Arc<Mesh>, force: Arc<std::sync::atomic::AtomicBool>) {
    let mut tick = tokio::time::interval(REFRESH_TICK);
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = mesh.catch_up.notified() => {}
            _ = tick.tick() => {
                // Every third tick reads everything again: whatever a lost notification
                // or a bug left out is read within 6 s even in a quiet mesh.
                ticks += 1;
                if ticks.is_multiple_of(3) {
                    force.store(true, Ordering::Relaxed);
                }
            }
        }
        if mesh.fenced.load(Ordering::Relaxed) {
            continue;
        }
        let m = mesh.clone();
        let forced = force.swap(false, Ordering::Relaxed);
        let ok = match tokio::task::spawn_blocking(move || m.refresh_with(forced)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not catch up with the store");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "refresh task failed");
                false
            }
        };
        if !ok && forced {
            // Still owed: everything is read again on the next try.
            force.store(true, Ordering::Relaxed);
        }
        // Notifications meanwhile leave one wake-up: the next refresh reads them all.
        tokio::time::sleep(REFRESH_GAP).await;
    }
}

async fn heartbeat(mesh: Arc<Mesh>, control: String, http: String) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    let mut last_ok = now_ms();
    loop {
        tick.tick().await;
        let rec = ReplicaRecord {
            id: mesh.replica.clone(),
            control: control.clone(),
            http: http.clone(),
            sessions: mesh.session_count() as u64,
            started_at: mesh.started_ms / 1000,
            heartbeat_ms: now_ms(),
        };
        let m = mesh.clone();
        let beat = tokio::task::spawn_blocking(move || m.heartbeat(&rec)).await;
        match beat {
            Ok(Ok(list)) => {
                last_ok = now_ms();
                mesh.set_beats(list.into_iter().map(|r| (r.id, r.heartbeat_ms)));
                if mesh.fenced.swap(false, Ordering::Relaxed) {
                    tracing::warn!(replica = %mesh.replica, "database reachable again: serving");
                    let m = mesh.clone();
                    let _ = tokio::task::spawn_blocking(move || m.refresh()).await;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "heartbeat not written");
                if now_ms() - last_ok >= FENCE_AFTER_MS
                    && !mesh.fenced.swap(true, Ordering::Relaxed)
                {
                    fence(&mesh);
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat task failed"),
        }
    }
}

/// Ends every session of a replica that lost its database: its nodes go to another.
fn fence(mesh: &Mesh) {
    mesh.leader.store(false, Ordering::Relaxed);
    let ended = mesh.end_all_sessions(ControlDown::Goodbye {
        revoked: false,
        detail: "this coordinator replica lost its database; use another".into(),
    });
    tracing::error!(replica = %mesh.replica, sessions = ended, "database unreachable: fenced (no sessions, no changes, no certificates)");
}

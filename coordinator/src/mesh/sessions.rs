//! Live control sessions and what they report: sessions by node (one per node; a newer one
//! ends the older), punch requests passed between nodes (and between replicas), reach and
//! health reports, and the offline sweep that marks nodes without a session.

use super::*;

impl Mesh {
    /// Registers a live session (ending an older one for the same node).
    pub fn register_session(
        &self,
        node: &str,
        conn: quinn::Connection,
        kick: tokio::sync::mpsc::Sender<ControlDown>,
        relay_token: Option<u64>,
    ) -> u64 {
        let id = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut m) = self.sessions.lock() {
            if let Some(old) = m.insert(
                node.to_string(),
                SessionHandle {
                    id,
                    conn,
                    kick,
                    relay_token,
                },
            ) {
                old.conn
                    .close(quinn::VarInt::from_u32(0), b"replaced by a newer session");
            }
        }
        let (row, back) = self.book().session_started(node, now_ms());
        if let Err(e) = self.store.put_live(&row) {
            tracing::warn!(error = %e, node, "could not record a session start");
        }
        if back {
            tracing::info!(node, "node online again");
        }
        // A change of liveness: the caller records it (once, with what the node's hello
        // changed), so every replica reads it.
        id
    }

    /// Removes a session if it is still the registered one.
    pub fn end_session(&self, node: &str, id: u64) {
        let ended = match self.sessions.lock() {
            Ok(mut m) if m.get(node).is_some_and(|s| s.id == id) => {
                // Under the sessions lock (as `report_tunnels` inserts): a report that
                // arrives late cannot outlive the session.
                self.tunnels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(node);
                m.remove(node).is_some()
            }
            _ => false,
        };
        // Store calls (and `changed`, which may read every session) without the lock.
        if ended {
            let t = now_ms();
            self.book().session_ended(node, t);
            if let Err(e) = self.store.live_ended(node, &self.replica, t) {
                tracing::warn!(error = %e, node, "could not record a session end");
            } else if let Err(e) = self.changed() {
                tracing::warn!(error = %e, node, "could not record a session end");
            }
        }
    }

    /// Records where a node's new session says it can be reached; true when that changed
    /// (the caller records the change).
    pub fn set_candidates(&self, node: &str, reach: Reach) -> bool {
        let Some(row) = self.book().set_reach(node, reach) else {
            return false;
        };
        if let Err(e) = self.store.put_live(&row) {
            tracing::warn!(error = %e, node, "could not record where a node is");
        }
        true
    }

    /// `from` is dialling `to`: tells `to` (if in session) to dial `from` back now,
    /// unless the request is a duplicate or over a rate ([`PunchLimiter`]); a request not
    /// passed on is counted with its reason.
    pub fn punch(&self, from: &NodeName, to: &str) -> Result<(), PunchDrop> {
        let r = self.try_punch(from, to, std::time::Instant::now());
        if let Err(reason) = r {
            self.drops.punch.count(reason);
        }
        r
    }

    fn try_punch(
        &self,
        from: &NodeName,
        to: &str,
        now: std::time::Instant,
    ) -> Result<(), PunchDrop> {
        let kick = self
            .sessions
            .lock()
            .ok()
            .and_then(|m| m.get(to).map(|s| s.kick.clone()));
        // The target's session on another live replica: passed on through the database.
        let elsewhere = kick.is_none()
            && self.store.shared()
            && self
                .book()
                .replica_of(to, now_ms())
                .is_some_and(|r| r != self.replica);
        if kick.is_none() && !elsewhere {
            return Err(PunchDrop::TargetOffline);
        }
        let candidates = self
            .book()
            .reach(from.as_str())
            .map(|r| r.candidates.clone())
            .unwrap_or_default();
        if candidates.is_empty() {
            return Err(PunchDrop::NoCandidates);
        }
        self.punches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(now, from.as_str(), to)?;
        match kick {
            Some(kick) => kick
                .try_send(ControlDown::Punch {
                    peer: from.clone(),
                    candidates,
                })
                .map_err(|_| PunchDrop::QueueFull),
            None => {
                let relay = RelayedPunch {
                    from: from.to_string(),
                    to: to.to_string(),
                    candidates,
                };
                let payload = serde_json::to_string(&relay).map_err(|_| PunchDrop::QueueFull)?;
                self.store
                    .publish_punch(&payload)
                    .map_err(|_| PunchDrop::QueueFull)
            }
        }
    }

    /// A punch request another replica passed on: delivered when the target's session is
    /// here (every replica hears it; the others ignore it).
    pub fn deliver_punch(&self, payload: &str) {
        let Ok(p) = serde_json::from_str::<RelayedPunch>(payload) else {
            return;
        };
        let (Ok(from), Some(kick)) = (
            NodeName::new(p.from.as_str()),
            self.sessions
                .lock()
                .ok()
                .and_then(|m| m.get(&p.to).map(|s| s.kick.clone())),
        ) else {
            return;
        };
        let candidates: Vec<SocketAddr> = p.candidates.into_iter().take(16).collect();
        if kick
            .try_send(ControlDown::Punch {
                peer: from,
                candidates,
            })
            .is_err()
        {
            self.drops.punch.count(PunchDrop::QueueFull);
        }
    }

    pub(super) fn book(&self) -> std::sync::MutexGuard<'_, HealthBook> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a node may be without a session before its instances are not routed to.
    pub fn set_offline_after(&self, grace: std::time::Duration) {
        self.book().set_grace(grace);
    }

    /// Marks nodes offline whose session has been gone past the grace period, and online
    /// again those back in session on any replica (called every second; only the replica
    /// holding the singleton lock sweeps, from the store's rows); follows this replica's
    /// migrated control connections. Pushes the change.
    pub fn sweep_offline(&self) -> Result<(), MeshError> {
        let mut changed = self.follow_moves()?;
        if self.leader.load(std::sync::atomic::Ordering::Relaxed)
            && !self.fenced.load(std::sync::atomic::Ordering::Relaxed)
        {
            // Any recent catalog knows the nodes (a newer one is built when published).
            let catalog = self.catalog_at_least(0)?;
            let known: Vec<(String, i64)> = catalog
                .peers
                .iter()
                .map(|p| (p.node.to_string(), 0))
                .collect();
            // The book is kept current by the refresher (within milliseconds, and read
            // whole every few seconds). Only when it says a mark must change are the rows
            // read again from the store, so a mark is never written from a stale row (a
            // node that just connected to another replica), and a quiet sweep reads
            // nothing: at 10,000 nodes a whole read every second was most of a
            // replica's store traffic.
            let t = now_ms();
            let rows = if self.store.shared() && !self.book().sweep(&known, t).is_empty() {
                Some(self.store.live()?)
            } else {
                None
            };
            let (marks, new_rows, grace_ms) = {
                // Loaded, swept and marked under one guard: a refresh merging an older read
                // in between would have a node that just connected elsewhere marked.
                let mut book = self.book();
                if let Some(rows) = rows {
                    book.load(rows);
                }
                let marks = book.sweep(&known, t);
                let new_rows = book.mark(&marks, t);
                (marks, new_rows, book.grace_ms())
            };
            for (node, _) in marks.iter().filter(|(_, offline)| *offline) {
                tracing::info!(node, grace_ms, "node offline: no control session");
            }
            for r in &new_rows {
                self.store.put_live(r)?;
            }
            let (off, on): (Vec<_>, Vec<_>) = marks.iter().partition(|(_, o)| *o);
            let names =
                |v: Vec<&(String, bool)>| v.into_iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
            self.store.set_offline(&names(off), true)?;
            self.store.set_offline(&names(on), false)?;
            changed |= !marks.is_empty();
            self.store.prune_changes(CHANGES_KEPT)?;
        }
        if changed {
            self.changed()?;
        }
        Ok(())
    }

    /// A control connection that migrated (the node's address or its NAT mapping
    /// changed) moves that node's observed candidate with it; true when any did.
    fn follow_moves(&self) -> Result<bool, MeshError> {
        let now: Vec<(String, SocketAddr)> = self
            .sessions
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(n, s)| {
                        let a = s.conn.remote_address();
                        (n.clone(), SocketAddr::new(a.ip().to_canonical(), a.port()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let rows: Vec<_> = {
            let mut book = self.book();
            now.into_iter()
                .filter_map(|(node, addr)| book.follow(&node, addr))
                .collect()
        };
        for r in &rows {
            self.store.put_live(r)?;
        }
        Ok(!rows.is_empty())
    }

    /// A node's health report: pushed to every node when a service changed state.
    pub fn report_health(
        &self,
        node: &str,
        services: &[String],
        checks: &[quicmesh_protocol::health::ServiceCheck],
    ) -> Result<(), MeshError> {
        let (row, changed) = self.book().report(node, services, checks, now());
        self.store.put_live(&row)?;
        if changed {
            self.changed()?;
        }
        Ok(())
    }

    /// Live control sessions on this replica.
    /// Rebuilds the relay's tables from the sessions, every second (their addresses move
    /// with their nodes; rebuilding per session start would cost a join storm N²).
    pub fn refresh_relay(&self) {
        let members: Vec<_> = match self.sessions.lock() {
            Ok(m) => m
                .iter()
                // A closed session's address is no one's any more.
                .filter(|(_, s)| s.conn.close_reason().is_none())
                .filter_map(|(n, s)| {
                    let name = NodeName::new(n.as_str()).ok()?;
                    Some(crate::relay::Member {
                        name,
                        addr: s.conn.remote_address(),
                        local: s.conn.local_ip(),
                        token: s.relay_token?,
                    })
                })
                .collect(),
            Err(_) => return,
        };
        self.relay.set_members(members);
    }

    pub fn session_count(&self) -> usize {
        self.sessions.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// The replicas' last heartbeats (Unix ms), as the store has them.
    pub fn set_beats(&self, beats: impl IntoIterator<Item = (String, i64)>) {
        self.book().set_beats(beats);
    }

    /// Sends `bye` to every session of this replica and forgets them; how many.
    pub fn end_all_sessions(&self, bye: ControlDown) -> usize {
        let all: Vec<SessionHandle> = match self.sessions.lock() {
            Ok(mut m) => m.drain().map(|(_, s)| s).collect(),
            Err(_) => Vec::new(),
        };
        for s in &all {
            if s.kick.try_send(bye.clone()).is_err() {
                s.conn.close(quinn::VarInt::from_u32(0), b"replica fenced");
            }
        }
        all.len()
    }

    /// True when `node` has a live control session (on any live replica).
    pub fn online(&self, node: &str) -> bool {
        self.book().connected(node, now_ms())
    }

    /// Keeps what `node` reported of its tunnels while it has a session here (at most
    /// [`quicmesh_protocol::wire::MAX_TUNNEL_REPORTS`], in a new allocation whatever the
    /// frame held; a group name outside the known ones is kept as "unknown").
    pub fn report_tunnels(&self, node: &str, report: Vec<quicmesh_protocol::wire::TunnelReport>) {
        let views: Vec<crate::mesh::TunnelView> = report
            .iter()
            .take(quicmesh_protocol::wire::MAX_TUNNEL_REPORTS)
            .map(|t| crate::mesh::TunnelView {
                peer: t.peer.to_string(),
                key_exchange: quicmesh_node::tls::GROUP_NAMES
                    .into_iter()
                    .find(|k| *k == t.key_exchange)
                    .unwrap_or("unknown"),
            })
            .collect();
        // A replaced session's late frame, after the node's last session here ended, would
        // otherwise stay: kept only while a session is registered (see `end_session`).
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.contains_key(node) {
            self.tunnels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(node.to_string(), views);
        }
    }

    /// What `node` last reported of its tunnels to this replica, while its session is here.
    pub fn tunnels_of(&self, node: &str) -> Vec<crate::mesh::TunnelView> {
        self.tunnels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .cloned()
            .unwrap_or_default()
    }

    /// The key exchange group `node`'s control session with this replica negotiated,
    /// read from its handshake (None: no session here).
    pub fn session_key_exchange(&self, node: &str) -> Option<&'static str> {
        let m = self.sessions.lock().ok()?;
        quicmesh_node::tls::negotiated(&m.get(node)?.conn)
    }
}

/// How long a revoked node's session has to take its goodbye before its connection is
/// closed all the same.
const REVOKED_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl SessionHandle {
    /// Ends a revoked node's session: a goodbye saying so, and the connection closed
    /// [`REVOKED_GRACE`] later whatever the session does (a node that stops reading its
    /// stream, or whose kick queue is full, is not left holding it); at once when the
    /// goodbye cannot be queued.
    pub fn end_revoked(self) {
        let bye = ControlDown::Goodbye {
            revoked: true,
            detail: "node revoked by an administrator".into(),
        };
        let close = |c: &quinn::Connection| c.close(quinn::VarInt::from_u32(0), b"node revoked");
        match (
            self.kick.try_send(bye),
            tokio::runtime::Handle::try_current(),
        ) {
            (Ok(()), Ok(rt)) => {
                rt.spawn(async move {
                    tokio::time::sleep(REVOKED_GRACE).await;
                    close(&self.conn);
                });
            }
            _ => close(&self.conn),
        }
    }
}

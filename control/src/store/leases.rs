//! Which node serves each gateway: a lease in the store (`leases`), held
//! while its node is live (heartbeat within `NODE_TTL_MILLIS`, on the
//! database's clock). A live node of the gateway's region claims what no
//! live node holds: a new gateway, or every gateway of a node that stopped
//! (fail-over). The holder records which version of the gateway its data
//! plane runs (`applied_at`: that version's `updated_at`), so that the node
//! that took a change through its API can tell when it took effect. The
//! holder also publishes its tunnels' live state (`tunnel_status`), which
//! the other nodes answer from.

use super::nodes::{ThisNode, EVERY_REGION, NODE_TTL_MILLIS};
use super::sql::{self, args, Row, Sql, SqlValue};
use super::{record, GatewayRecord, Store, StoreError, COLUMNS};
use crate::plane::TunnelStatus;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `applied_at` of a lease just claimed: its holder has run no version yet.
const NOT_APPLIED: i64 = -1;
/// `applied_at` of a gateway created through its holder's own API: the
/// create ran it, and acknowledged nothing (nobody waited elsewhere).
const RUN_HERE: i64 = 0;

/// Ids at most in one `IN (...)` list.
const IDS_PER_QUERY: usize = 500;

/// Who serves a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub node_id: String,
    /// The `updated_at` of the version the holder's data plane runs (-1: none yet).
    pub applied_at: i64,
    /// The holder heartbeats: the lease holds.
    pub holder_live: bool,
}

/// What a holder has to bring into its data plane (`Store::served_changes`).
#[derive(Debug, Default)]
pub struct ServedChanges {
    /// Held gateways written since the revision asked for, or claimed and not
    /// yet applied, in revision order (deleted ones included), each with the
    /// revision its last write moved the gateways to and the version its
    /// lease says runs (`Lease::applied_at`).
    pub records: Vec<(i64, i64, GatewayRecord)>,
    /// The highest revision read: ask from there next time.
    pub revision: i64,
}

/// A tunnel's live state as its serving node last published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedStatus {
    pub node_id: String,
    /// When (Unix milliseconds, the database's clock).
    pub published_at: i64,
    pub status: TunnelStatus,
    /// Its publisher heartbeats (the state is current, not a stopped node's last).
    pub publisher_live: bool,
}

/// `SELECT ... node_id IN (live nodes)`: a node is live while it heartbeats.
fn live_nodes(sql: &dyn Sql) -> String {
    format!("SELECT id FROM nodes WHERE heartbeat_at >= {} - {NODE_TTL_MILLIS}", sql.dialect().now_millis())
}

/// Moves the leases' revision: a lease left its holder (taken or released),
/// which every node then looks at.
fn bump_lease_revision(sql: &dyn Sql) -> Result<(), StoreError> {
    sql.execute("UPDATE store_meta SET lease_revision = lease_revision + 1 WHERE id = 1", &[])?;
    Ok(())
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn published(row: &Row) -> Result<(String, PublishedStatus), String> {
    let count = |i: usize| row.int(i).map(|n| u64::try_from(n).unwrap_or(0));
    let endpoint = row.opt_text(10)?.map(|e| e.parse().map_err(|e| format!("endpoint: {e}"))).transpose()?;
    let rule_hits = serde_json::from_str(&row.text(11)?).map_err(|e| format!("rule_hits: {e}"))?;
    let last_handshake = row.opt_int(9)?.map(|ms| UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
    let status = TunnelStatus {
        bytes_sent: count(3)?,
        bytes_received: count(4)?,
        packets_sent: count(5)?,
        packets_received: count(6)?,
        handshakes: count(7)?,
        handshake_failures: count(8)?,
        last_handshake,
        endpoint,
        rule_hits,
    };
    let publisher_live = row.int(12)? == 1;
    Ok((row.text(0)?, PublishedStatus { node_id: row.text(1)?, published_at: row.int(2)?, status, publisher_live }))
}

/// Inside a new gateway's insert: `me` holds it, and the change that made
/// it runs it (nobody waits for an acknowledgement of it).
pub(super) fn hold_new(sql: &dyn Sql, me: &ThisNode, id: &str) -> Result<(), StoreError> {
    let now = sql.dialect().now_millis();
    sql.execute(
        &format!(
            "INSERT INTO leases (gateway_id, node_id, since, applied_at) VALUES (?, ?, {now}, {RUN_HERE})
             ON CONFLICT (gateway_id) DO UPDATE SET node_id = excluded.node_id, since = excluded.since,
                 applied_at = excluded.applied_at"
        ),
        args![id, &me.id],
    )?;
    Ok(())
}

impl Store {
    /// Claims for `me` every gateway of its region that no live node holds
    /// (new, or its holder stopped); how many. A node of every region takes
    /// only the gateways of regions with no live node of their own, and a
    /// node of a region takes its region's back from one. Two nodes claiming
    /// at once: each gateway goes to one.
    pub fn claim_leases(&self, me: &ThisNode) -> Result<u64, StoreError> {
        Ok(self.take_over_leases(me)? + self.claim_new_leases(me, -1)?)
    }

    /// The region's gateways of `me` (`mine`'s parameters: region twice).
    fn mine(now: &str) -> String {
        format!(
            "status != 'deleted' AND (region = ? OR (? = '{EVERY_REGION}' AND region NOT IN
                 (SELECT region FROM nodes WHERE heartbeat_at >= {now} - {NODE_TTL_MILLIS})))"
        )
    }

    /// `claim_leases`' first half: the leases of `me`'s region held by
    /// stopped nodes (and, for a node of a region, by nodes of every
    /// region). Moves the leases' revision: their holders must stop.
    pub fn take_over_leases(&self, me: &ThisNode) -> Result<u64, StoreError> {
        let taken = self.transaction(|sql| {
            let (now, live) = (sql.dialect().now_millis(), live_nodes(sql));
            let mine = Self::mine(now);
            let taken = sql.execute(
                &format!(
                    "UPDATE leases SET node_id = ?, since = {now}, applied_at = {NOT_APPLIED}
                     WHERE node_id != ?
                       AND (node_id NOT IN ({live})
                            OR (? != '{EVERY_REGION}' AND node_id IN (SELECT id FROM nodes WHERE region = '{EVERY_REGION}')))
                       AND gateway_id IN (SELECT id FROM gateways WHERE {mine})"
                ),
                args![&me.id, &me.id, &me.region, &me.region, &me.region],
            )?;
            if taken > 0 {
                bump_lease_revision(sql)?;
            }
            Ok(taken)
        })?;
        if taken > 0 {
            self.changes.signal();
        }
        Ok(taken)
    }

    /// `claim_leases`' second half: the gateways of `me`'s region that no
    /// node holds, among those written after revision `since` (-1: all).
    /// In one order on every node, so that two claiming at once wait for
    /// each other rather than deadlock.
    pub fn claim_new_leases(&self, me: &ThisNode, since: i64) -> Result<u64, StoreError> {
        let claimed = self.run(|sql| {
            let now = sql.dialect().now_millis();
            let mine = Self::mine(now);
            sql.execute(
                &format!(
                    "INSERT INTO leases (gateway_id, node_id, since, applied_at)
                     SELECT id, ?, {now}, {NOT_APPLIED} FROM gateways
                     WHERE revision > ? AND {mine}
                       AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.gateway_id = gateways.id)
                     ORDER BY id
                     ON CONFLICT (gateway_id) DO NOTHING"
                ),
                args![&me.id, since, &me.region, &me.region],
            )
        })?;
        if claimed > 0 {
            self.changes.signal();
        }
        Ok(claimed)
    }

    /// The ids of the live nodes, in order (what a change of liveness moves).
    pub fn live_node_ids(&self) -> Result<Vec<String>, StoreError> {
        let rows = self.run(|sql| sql.query(&format!("{} ORDER BY id", live_nodes(sql)), &[]))?;
        rows.iter().map(|r| r.text(0)).collect::<Result<_, _>>().map_err(|e| sql::unreadable("nodes", e))
    }

    /// Holds gateway `id` for `me` unless a live node (other than `me`)
    /// does; true if `me` holds it now (for a change made here).
    pub fn claim_lease(&self, me: &ThisNode, id: &str) -> Result<bool, StoreError> {
        self.transaction(|sql| {
            let (now, live) = (sql.dialect().now_millis(), live_nodes(sql));
            let live_gateway = "SELECT id FROM gateways WHERE id = ? AND status != 'deleted'";
            let taken = sql.execute(
                &format!(
                    "UPDATE leases SET node_id = ?, since = {now}, applied_at = {NOT_APPLIED}
                     WHERE gateway_id IN ({live_gateway}) AND node_id != ? AND node_id NOT IN ({live})"
                ),
                args![&me.id, id, &me.id],
            )?;
            if taken > 0 {
                bump_lease_revision(sql)?;
                return Ok(true);
            }
            sql.execute(
                &format!(
                    "INSERT INTO leases (gateway_id, node_id, since, applied_at)
                     SELECT id, ?, {now}, {NOT_APPLIED} FROM gateways WHERE id = ? AND status != 'deleted'
                     ON CONFLICT (gateway_id) DO NOTHING"
                ),
                args![&me.id, id],
            )?;
            let holder = sql.query_opt("SELECT node_id FROM leases WHERE gateway_id = ?", args![id])?;
            Ok(holder.and_then(|r| r.text(0).ok()).is_some_and(|h| h == me.id))
        })
    }

    /// Moved each time a node takes a lease another node held.
    pub fn lease_revision(&self) -> Result<i64, StoreError> {
        let row = self.run(|sql| sql.query_one("SELECT COALESCE(MAX(lease_revision), 0) FROM store_meta", &[]))?;
        row.int(0).map_err(|e| sql::unreadable("store_meta", e))
    }

    /// Who serves gateway `id`, if anyone claimed it.
    pub fn lease_of(&self, id: &str) -> Result<Option<Lease>, StoreError> {
        let row = self.run(|sql| {
            let live = live_nodes(sql);
            sql.query_opt(
                &format!(
                    "SELECT node_id, applied_at, CASE WHEN node_id IN ({live}) THEN 1 ELSE 0 END
                     FROM leases WHERE gateway_id = ?"
                ),
                args![id],
            )
        })?;
        row.map(|r| -> Result<Lease, String> {
            Ok(Lease { node_id: r.text(0)?, applied_at: r.int(1)?, holder_live: r.int(2)? == 1 })
        })
        .transpose()
        .map_err(|e| sql::unreadable("leases", e))
    }

    /// Records that `me`'s data plane runs these versions (gateway id and
    /// the `updated_at` it runs), in one transaction; a lease `me` no
    /// longer holds is left alone.
    pub fn acknowledge(&self, me: &ThisNode, applied: &[(String, i64)]) -> Result<(), StoreError> {
        if applied.is_empty() {
            return Ok(());
        }
        self.transaction(|sql| {
            for (id, at) in applied {
                sql.execute(
                    "UPDATE leases SET applied_at = ? WHERE gateway_id = ? AND node_id = ?",
                    args![*at, id, &me.id],
                )?;
            }
            if let Some(notify) = sql.dialect().notify_change() {
                sql.execute(notify, &[])?;
            }
            Ok(())
        })?;
        self.changes.signal();
        Ok(())
    }

    /// Gives up every lease `me` holds (it may no longer serve them: its
    /// floating address went elsewhere); how many.
    pub fn release_leases(&self, me: &ThisNode) -> Result<u64, StoreError> {
        let n = self.transaction(|sql| {
            sql.execute("DELETE FROM tunnel_status WHERE node_id = ?", args![&me.id])?;
            let n = sql.execute("DELETE FROM leases WHERE node_id = ?", args![&me.id])?;
            // The others look at every unheld gateway again.
            bump_lease_revision(sql)?;
            // The node that has the address now claims them at once.
            if let Some(notify) = sql.dialect().notify_change() {
                sql.execute(notify, &[])?;
            }
            Ok(n)
        })?;
        Ok(n)
    }

    /// Forgets whoever's lease of gateway `id` (deleted while no live node
    /// held it) and its published state.
    pub fn forget_lease(&self, id: &str) -> Result<(), StoreError> {
        self.run(|sql| {
            sql.execute("DELETE FROM tunnel_status WHERE gateway_id = ?", args![id])?;
            sql.execute("DELETE FROM leases WHERE gateway_id = ?", args![id])
        })?;
        Ok(())
    }

    /// Forgets `me`'s lease of gateway `id` (deleted) and its published state.
    pub fn drop_lease(&self, me: &ThisNode, id: &str) -> Result<(), StoreError> {
        self.run(|sql| {
            sql.execute("DELETE FROM tunnel_status WHERE gateway_id = ? AND node_id = ?", args![id, &me.id])?;
            sql.execute("DELETE FROM leases WHERE gateway_id = ? AND node_id = ?", args![id, &me.id])
        })?;
        Ok(())
    }

    /// The ids of the gateways `me` holds.
    pub fn held_ids(&self, me: &ThisNode) -> Result<Vec<String>, StoreError> {
        let rows = self.run(|sql| sql.query("SELECT gateway_id FROM leases WHERE node_id = ?", args![&me.id]))?;
        rows.iter().map(|r| r.text(0)).collect::<Result<_, _>>().map_err(|e| sql::unreadable("leases", e))
    }

    /// The gateways `me` holds that were written after `revision`, or
    /// claimed and not yet applied. A row that does not decode is logged
    /// and left out (its version is never acknowledged).
    pub fn served_changes(&self, me: &ThisNode, revision: i64) -> Result<ServedChanges, StoreError> {
        let rows = self.run(|sql| {
            sql.query(
                &format!(
                    // CROSS JOIN: SQLite then drives from the gateways
                    // written since (their revision's index), never from
                    // every lease of the node.
                    "SELECT {COLUMNS}, gateways.revision, leases.applied_at
                     FROM gateways CROSS JOIN leases
                     WHERE gateways.revision > ? AND leases.gateway_id = gateways.id AND leases.node_id = ?
                     UNION ALL
                     SELECT {COLUMNS}, gateways.revision, leases.applied_at
                     FROM leases JOIN gateways ON gateways.id = leases.gateway_id
                     WHERE leases.node_id = ? AND leases.applied_at < 0 AND gateways.revision <= ?
                     ORDER BY {}",
                    COLUMNS.split(',').count() + 1
                ),
                args![revision, &me.id, &me.id, revision],
            )
        })?;
        let mut out = ServedChanges { records: Vec::with_capacity(rows.len()), revision };
        let revision_column = COLUMNS.split(',').count();
        for row in &rows {
            let at = row.int(revision_column).map_err(|e| sql::unreadable("gateways", e))?;
            let applied = row.int(revision_column + 1).map_err(|e| sql::unreadable("leases", e))?;
            out.revision = out.revision.max(at);
            match record(row) {
                Ok(g) => out.records.push((at, applied, g)),
                Err(e @ StoreError::Corrupt(_)) => {
                    tracing::error!(error = %e, "a served gateway cannot be read; left out")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Publishes the live state of tunnels `me` runs (gateway id, state),
    /// in one transaction; those whose lease `me` no longer holds are left out.
    pub fn publish_statuses(&self, me: &ThisNode, statuses: &[(String, TunnelStatus)]) -> Result<(), StoreError> {
        if statuses.is_empty() {
            return Ok(());
        }
        let encoded: Vec<(String, Option<String>)> = statuses
            .iter()
            .map(|(_, s)| Ok((serde_json::to_string(&s.rule_hits)?, s.endpoint.map(|e| e.to_string()))))
            .collect::<Result<_, serde_json::Error>>()?;
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.transaction(|sql| {
            let now = sql.dialect().now_millis();
            let text = format!(
                "INSERT INTO tunnel_status (gateway_id, node_id, published_at, bytes_sent, bytes_received,
                     packets_sent, packets_received, handshakes, handshake_failures, last_handshake, endpoint, rule_hits)
                 SELECT gateway_id, node_id, {now}, ?, ?, ?, ?, ?, ?, ?, ?, ? FROM leases
                 WHERE gateway_id = ? AND node_id = ?
                 ON CONFLICT (gateway_id) DO UPDATE SET node_id = excluded.node_id,
                     published_at = excluded.published_at, bytes_sent = excluded.bytes_sent,
                     bytes_received = excluded.bytes_received, packets_sent = excluded.packets_sent,
                     packets_received = excluded.packets_received, handshakes = excluded.handshakes,
                     handshake_failures = excluded.handshake_failures, last_handshake = excluded.last_handshake,
                     endpoint = excluded.endpoint, rule_hits = excluded.rule_hits"
            );
            for ((id, s), (hits, endpoint)) in statuses.iter().zip(&encoded) {
                sql.execute(
                    &text,
                    args![
                        count(s.bytes_sent),
                        count(s.bytes_received),
                        count(s.packets_sent),
                        count(s.packets_received),
                        count(s.handshakes),
                        count(s.handshake_failures),
                        s.last_handshake.map(millis),
                        endpoint.as_deref(),
                        hits.as_str(),
                        id,
                        &me.id
                    ],
                )?;
            }
            Ok(())
        })
    }

    /// The published live state of each gateway in `ids` (in order; `None`:
    /// nothing published).
    pub fn published_statuses(&self, ids: &[&str]) -> Result<Vec<Option<PublishedStatus>>, StoreError> {
        let mut found = std::collections::HashMap::new();
        for chunk in ids.chunks(IDS_PER_QUERY) {
            let params: Vec<SqlValue> = chunk.iter().map(|id| SqlValue::from(*id)).collect();
            let rows = self.run(|sql| {
                sql.query(
                    &format!(
                        "SELECT gateway_id, node_id, published_at, bytes_sent, bytes_received, packets_sent,
                             packets_received, handshakes, handshake_failures, last_handshake, endpoint, rule_hits,
                             CASE WHEN node_id IN ({}) THEN 1 ELSE 0 END
                         FROM tunnel_status WHERE gateway_id IN ({})",
                        live_nodes(sql),
                        placeholders(chunk.len())
                    ),
                    &params,
                )
            })?;
            for row in &rows {
                match published(row) {
                    Ok((id, status)) => {
                        found.insert(id, status);
                    }
                    // One unreadable row (edited by hand) hides its own state only.
                    Err(e) => tracing::warn!(error = %e, "a published tunnel state cannot be read; left out"),
                }
            }
        }
        Ok(ids.iter().map(|id| found.remove(*id)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::each_backend;
    use super::super::{sample, sample_in, Status};
    use super::*;

    fn node(id: &str, region: &str) -> ThisNode {
        ThisNode { id: id.into(), region: region.into(), ..ThisNode::default() }
    }

    fn holder(store: &Store, id: &str) -> Option<String> {
        store.lease_of(id).unwrap().map(|l| l.node_id)
    }

    /// A live node claims its region's gateways no live node holds, once;
    /// another region's stay unclaimed; a second node of the region gets
    /// none while the first lives, and all of them when it stops.
    #[test]
    fn leases_go_to_one_live_node_of_the_region_and_fail_over_when_it_stops() {
        each_backend(|db| {
            let store = db.open();
            let (a1, a2, b1) = (node("a1", "eu"), node("a2", "eu"), node("b1", "us"));
            for n in [&a1, &a2, &b1] {
                store.heartbeat(n).unwrap();
            }
            let eu = store.insert(sample_in("eu-1", "k1", "eu")).unwrap();
            let eu2 = store.insert(sample_in("eu-2", "k2", "eu")).unwrap();
            let us = store.insert(sample_in("us-1", "k3", "us")).unwrap();
            assert_eq!(store.claim_leases(&a1).unwrap(), 2);
            assert_eq!(store.claim_leases(&a1).unwrap(), 0, "held already");
            assert_eq!(store.claim_leases(&a2).unwrap(), 0, "a live node holds them");
            assert_eq!((holder(&store, &eu.id), holder(&store, &us.id)), (Some("a1".into()), None));
            let lease = store.lease_of(&eu.id).unwrap().unwrap();
            assert!(lease.holder_live && lease.applied_at < 0, "{lease:?}");
            assert!(!store.claim_lease(&a2, &eu.id).unwrap(), "a2 may not take a live node's lease");
            // What a1 must bring into its data plane: both, until applied.
            let changes = store.served_changes(&a1, -1).unwrap();
            assert_eq!(changes.records.iter().map(|(_, _, g)| g.name.as_str()).collect::<Vec<_>>(), ["eu-1", "eu-2"]);
            store.acknowledge(&a1, &[(eu.id.clone(), eu.updated_at), (eu2.id.clone(), eu2.updated_at)]).unwrap();
            assert!(store.served_changes(&a1, changes.revision).unwrap().records.is_empty(), "nothing new");
            assert_eq!(store.lease_of(&eu.id).unwrap().unwrap().applied_at, eu.updated_at);
            // A write moves it into the changes again.
            store.set_status(&eu2.id, Status::Deleting).unwrap();
            let again = store.served_changes(&a1, changes.revision).unwrap();
            assert_eq!(again.records.len(), 1);
            assert_eq!(again.records[0].2.status, Status::Deleting);
            assert!(again.revision > changes.revision);
            // a1 stops: a2 takes everything of the region at once, which
            // moves the leases' revision (a1 must learn it lost them).
            store.leave(&a1).unwrap();
            assert!(!store.lease_of(&eu.id).unwrap().unwrap().holder_live);
            let before = store.lease_revision().unwrap();
            assert_eq!(store.claim_leases(&a2).unwrap(), 2);
            assert_eq!(store.lease_revision().unwrap(), before + 1);
            assert_eq!(holder(&store, &eu.id), Some("a2".into()));
            assert_eq!(store.served_changes(&a2, i64::MAX).unwrap().records.len(), 2, "claimed: not yet applied");
            assert_eq!(store.held_ids(&a2).unwrap().len(), 2);
            assert_eq!(store.held_ids(&a1).unwrap(), Vec::<String>::new());
            // a1 comes back: its acknowledgement of a lease it lost changes nothing.
            store.heartbeat(&a1).unwrap();
            store.acknowledge(&a1, &[(eu.id.clone(), 99)]).unwrap();
            assert_eq!(store.lease_of(&eu.id).unwrap().unwrap().applied_at, -1);
            // us's node claims its own; a node of every region takes what nobody serves.
            assert_eq!(store.claim_leases(&b1).unwrap(), 1);
            assert_eq!(holder(&store, &us.id), Some("b1".into()));
            assert_eq!(store.release_leases(&a2).unwrap(), 2);
            store.leave(&a1).unwrap();
            store.leave(&a2).unwrap();
            let everywhere = node("any", EVERY_REGION);
            store.heartbeat(&everywhere).unwrap();
            assert_eq!(store.claim_leases(&everywhere).unwrap(), 2, "the released eu gateways");
            store.drop_lease(&everywhere, &eu.id).unwrap();
            assert_eq!(holder(&store, &eu.id), None);
        });
    }

    /// A node of every region takes a region's gateways only while that
    /// region has no live node of its own; one gateway's lease is taken for
    /// a change only from a stopped holder.
    #[test]
    fn a_node_of_every_region_leaves_a_region_to_its_own_nodes() {
        each_backend(|db| {
            let store = db.open();
            let (eu, any) = (node("eu-1", "eu"), node("any", EVERY_REGION));
            store.heartbeat(&eu).unwrap();
            store.heartbeat(&any).unwrap();
            let g = store.insert(sample_in("eu-site", "k1", "eu")).unwrap();
            let other = store.insert(sample_in("ap-site", "k2", "ap")).unwrap();
            assert_eq!(store.claim_leases(&any).unwrap(), 1, "only the region nobody else serves");
            assert_eq!(holder(&store, &other.id), Some("any".into()));
            assert_eq!(holder(&store, &g.id), None);
            assert_eq!(store.claim_leases(&eu).unwrap(), 1);
            assert!(!store.claim_lease(&any, &g.id).unwrap());
            store.leave(&eu).unwrap();
            assert!(store.claim_lease(&any, &g.id).unwrap(), "its holder stopped");
            assert_eq!(holder(&store, &g.id), Some("any".into()));
            // The region's node comes back: it takes its region back, which
            // the node of every region learns from the leases' revision.
            store.heartbeat(&eu).unwrap();
            let before = store.lease_revision().unwrap();
            assert_eq!(store.claim_leases(&eu).unwrap(), 1);
            assert_eq!(holder(&store, &g.id), Some("eu-1".into()));
            assert_eq!(holder(&store, &other.id), Some("any".into()), "a region without a node of its own");
            assert!(store.lease_revision().unwrap() > before);
            store.leave(&eu).unwrap();
            assert!(store.claim_lease(&any, &g.id).unwrap());
            // A purge (a create the data plane refused) takes its lease along.
            store.purge(&g.id).unwrap();
            assert_eq!(holder(&store, &g.id), None);
        });
    }

    /// A settling write (`settle_from`) is refused, and records no event,
    /// once the gateway changed since it was read.
    #[test]
    fn a_settle_never_overwrites_a_change_made_since() {
        each_backend(|db| {
            let store = db.open();
            let mut g = sample("site", "k1");
            g.status = Status::Creating;
            let g = store.insert(g).unwrap();
            let active = GatewayRecord { status: Status::Active, updated_at: g.updated_at + 1, ..g.clone() };
            let data = serde_json::json!({});
            // Another node deletes it meanwhile.
            store.set_status_at(&g.id, Status::Deleting, g.updated_at + 5).unwrap();
            let events = store.events_after(0, 10).unwrap().len();
            let kind = super::super::EventKind::GatewayCreated;
            assert!(!store
                .settle_from(&active, (Status::Creating, g.updated_at), (kind, data.clone()), |_| {})
                .unwrap());
            assert_eq!(store.get(&g.id).unwrap().unwrap().status, Status::Deleting);
            assert_eq!(store.events_after(0, 10).unwrap().len(), events, "no event");
            let deleting = store.get(&g.id).unwrap().unwrap();
            let deleted =
                GatewayRecord { status: Status::Deleted, updated_at: deleting.updated_at + 1, ..deleting.clone() };
            let kind = super::super::EventKind::GatewayDeleted;
            assert!(store
                .settle_from(&deleted, (Status::Deleting, deleting.updated_at), (kind, data), |_| {})
                .unwrap());
            assert_eq!(store.get(&g.id).unwrap().unwrap().status, Status::Deleted);
            assert_eq!(store.events_after(0, 10).unwrap().len(), events + 1);
        });
    }

    /// Two nodes of a region claiming at once (each on its own handle): every
    /// gateway goes to exactly one.
    #[test]
    fn concurrent_claims_give_each_gateway_to_one_node() {
        each_backend(|db| {
            let (one, two) = (std::sync::Arc::new(db.open()), std::sync::Arc::new(db.open()));
            let (a1, a2) = (node("a1", "eu"), node("a2", "eu"));
            one.heartbeat(&a1).unwrap();
            one.heartbeat(&a2).unwrap();
            for i in 0..40 {
                one.insert(sample_in(&format!("g{i}"), &format!("key{i}"), "eu")).unwrap();
            }
            let claim = |store: std::sync::Arc<Store>, me: ThisNode| {
                std::thread::spawn(move || (0..5).map(|_| store.claim_leases(&me).unwrap()).sum::<u64>())
            };
            let (x, y) = (claim(one.clone(), a1.clone()), claim(two.clone(), a2.clone()));
            let (x, y) = (x.join().unwrap(), y.join().unwrap());
            assert_eq!(x + y, 40, "{x} + {y}");
            assert_eq!(one.held_ids(&a1).unwrap().len() + one.held_ids(&a2).unwrap().len(), 40);
        });
    }

    /// Published tunnel states round-trip, each replacing the last.
    #[test]
    fn published_statuses_round_trip() {
        each_backend(|db| {
            let store = db.open();
            let me = node("a1", "eu");
            let status = TunnelStatus {
                bytes_sent: 1,
                bytes_received: 2,
                packets_sent: 3,
                packets_received: 4,
                handshakes: 5,
                handshake_failures: 6,
                last_handshake: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
                endpoint: Some("192.0.2.1:51820".parse().unwrap()),
                rule_hits: vec![7, 8],
            };
            // Only what `me` holds is published.
            let g1 = store.insert(sample("g1", "k1")).unwrap().id;
            store.publish_statuses(&me, &[(g1.clone(), TunnelStatus::default())]).unwrap();
            assert!(store.published_statuses(&[&g1]).unwrap()[0].is_none(), "not held");
            assert!(store.claim_lease(&me, &g1).unwrap());
            store.publish_statuses(&me, &[(g1.clone(), TunnelStatus::default())]).unwrap();
            store.publish_statuses(&me, &[(g1.clone(), status.clone())]).unwrap();
            let found = store.published_statuses(&[&g1, "g2"]).unwrap();
            let first = found[0].as_ref().unwrap();
            assert_eq!((&first.node_id, &first.status), (&me.id, &status));
            assert!(!first.publisher_live, "a1 never heartbeated");
            store.heartbeat(&me).unwrap();
            assert!(store.published_statuses(&[&g1]).unwrap()[0].as_ref().unwrap().publisher_live);
            assert!(first.published_at > 1_700_000_000_000);
            assert!(found[1].is_none());
        });
    }
}

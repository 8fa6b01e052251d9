//! The nodes of a fleet: every `serve` on one store registers itself and
//! heartbeats every `HEARTBEAT_MILLIS`; one whose last heartbeat is older
//! than `NODE_TTL_MILLIS` is lost. Ages are measured on the database's
//! clock (each heartbeat stamps the store's "now"), so nodes whose clocks
//! disagree still agree on who is live. A node id held by a live process
//! (another incarnation) cannot be taken by a second one.

use super::sql::{self, args, Row};
use super::{Store, StoreError};

/// How often a node says it is alive.
pub const HEARTBEAT_MILLIS: i64 = 1_000;
/// A node silent this long is lost: five missed heartbeats.
pub const NODE_TTL_MILLIS: i64 = 5_000;
/// The region of a node that serves every region (one with no `[node] region`).
pub const EVERY_REGION: &str = "*";

/// What a region or a node id may be: 1-64 of a-z, 0-9 and '-'.
pub fn is_region_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// What `is_region_name` says, for error messages.
pub const REGION_NAME_RULE: &str = "must be 1-64 characters of a-z, 0-9 and '-'";

/// What tells one `serve` process from another: the host's boot, the
/// process id, and a random part (`boot/pid/random`). A restarted process
/// may take its node id at once from an incarnation of the same boot whose
/// process is gone (`holder_is_dead`), instead of waiting out the TTL.
pub fn incarnation() -> String {
    format!("{}/{}/{}", boot_id(), std::process::id(), super::random_id(""))
}

/// This boot of this host, and the PID namespace (a process id means one
/// process only within its namespace: containers have their own).
fn boot_id() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|b| b.trim().to_owned());
    let pid_ns = std::fs::read_link("/proc/self/ns/pid").map(|l| l.display().to_string());
    match (boot, pid_ns) {
        (Ok(boot), Ok(ns)) if !boot.is_empty() => format!("{boot}:{}", ns.replace(['/', ':'], "")),
        // Unknown: never taken as "this host" (no takeover at once).
        _ => String::new(),
    }
}

/// True when `holder` (an `incarnation()`) was a process of this boot of
/// this host that no longer runs.
pub fn holder_is_dead(holder: &str) -> bool {
    let mut parts = holder.split('/');
    let (Some(boot), Some(pid), Some(_)) = (parts.next(), parts.next(), parts.next()) else { return false };
    let Ok(pid) = pid.parse::<libc::pid_t>() else { return false };
    if boot.is_empty() || boot != boot_id() || pid <= 0 || pid as u32 == std::process::id() {
        return false;
    }
    // SAFETY: kill with signal 0 sends nothing; it only checks the pid.
    let alive =
        unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    !alive
}

/// This process as a node: what it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThisNode {
    pub id: String,
    /// `EVERY_REGION`, or the one region it serves.
    pub region: String,
    /// Where its API listens, for operators (`host:port`).
    pub api: String,
    /// Random per process: tells this process from another with the same id.
    pub incarnation: String,
    /// Unix milliseconds, this node's clock.
    pub started_at: i64,
    /// What the remote sites of its region configure: the gateway's public
    /// key (base64), address and UDP port ("", "", 0: not said).
    pub public_key: String,
    pub public_address: String,
    pub listen_port: u16,
    /// `[api] site_cidr` ("": none), the default local network of its region's gateways.
    pub site_cidr: String,
}

/// A node of every region, this process, started now, saying nothing of its side.
impl Default for ThisNode {
    fn default() -> Self {
        Self {
            id: "local".into(),
            region: EVERY_REGION.into(),
            api: String::new(),
            incarnation: incarnation(),
            started_at: super::now_millis(),
            public_key: String::new(),
            public_address: String::new(),
            listen_port: 0,
            site_cidr: String::new(),
        }
    }
}

/// A node as the store holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    pub region: String,
    pub api: String,
    pub started_at: i64,
    /// The database's clock at its last heartbeat (Unix milliseconds).
    pub heartbeat_at: i64,
    /// How long ago that was, on the same clock.
    pub silent_for_millis: i64,
    /// As `ThisNode` says them.
    pub public_key: String,
    pub public_address: String,
    pub listen_port: u16,
    pub site_cidr: String,
}

impl NodeRecord {
    pub fn is_live(&self) -> bool {
        self.silent_for_millis <= NODE_TTL_MILLIS
    }

    /// Whether it serves gateways of `region`.
    pub fn serves(&self, region: &str) -> bool {
        serves(&self.region, region)
    }
}

impl ThisNode {
    /// Whether this node serves (runs the tunnels of) gateways of `region`.
    pub fn serves(&self, region: &str) -> bool {
        serves(&self.region, region)
    }
}

/// A node of `node_region` serves gateways of `region`.
fn serves(node_region: &str, region: &str) -> bool {
    node_region == EVERY_REGION || node_region == region
}

/// A second live process configured with this node's id.
#[derive(Debug, thiserror::Error)]
#[error(
    "node id `{id}` is held by another live process (it heartbeated {silent_for_millis} ms ago); give each node \
     its own [node] id, or wait {NODE_TTL_MILLIS} ms after the other stopped"
)]
pub struct NodeIdTaken {
    pub id: String,
    pub silent_for_millis: i64,
    /// The holder's incarnation (`Incarnation` text).
    pub holder: String,
}

fn node(r: &Row) -> Result<NodeRecord, String> {
    Ok(NodeRecord {
        id: r.text(0)?,
        region: r.text(1)?,
        api: r.text(2)?,
        started_at: r.int(3)?,
        heartbeat_at: r.int(4)?,
        silent_for_millis: r.int(5)?,
        public_key: r.text(6)?,
        public_address: r.text(7)?,
        listen_port: u16::try_from(r.int(8)?).unwrap_or(0),
        site_cidr: r.text(9)?,
    })
}

impl Store {
    /// Registers `me`, or renews its heartbeat. Refused (`NodeIdTaken`) while
    /// another incarnation with the same id is live.
    pub fn heartbeat(&self, me: &ThisNode) -> Result<(), StoreError> {
        self.transaction(|sql| {
            let now = sql.dialect().now_millis();
            let changed = sql.execute(
                &format!(
                    "INSERT INTO nodes (id, region, api, incarnation, started_at, heartbeat_at, public_key,
                         public_address, listen_port, site_cidr)
                     VALUES (?, ?, ?, ?, ?, {now}, ?, ?, ?, ?)
                     ON CONFLICT (id) DO UPDATE SET region = excluded.region, api = excluded.api,
                         incarnation = excluded.incarnation, started_at = excluded.started_at,
                         heartbeat_at = excluded.heartbeat_at, public_key = excluded.public_key,
                         public_address = excluded.public_address, listen_port = excluded.listen_port,
                         site_cidr = excluded.site_cidr
                     WHERE nodes.incarnation = excluded.incarnation OR nodes.heartbeat_at < {now} - ?"
                ),
                args![
                    &me.id,
                    &me.region,
                    &me.api,
                    &me.incarnation,
                    me.started_at,
                    &me.public_key,
                    &me.public_address,
                    i64::from(me.listen_port),
                    &me.site_cidr,
                    NODE_TTL_MILLIS
                ],
            )?;
            if changed == 0 {
                let row = sql.query_one(
                    &format!("SELECT {now} - heartbeat_at, incarnation FROM nodes WHERE id = ?"),
                    args![&me.id],
                )?;
                let silent_for_millis = row.int(0).map_err(|e| sql::unreadable("nodes", e))?;
                let holder = row.text(1).map_err(|e| sql::unreadable("nodes", e))?;
                return Err(StoreError::NodeIdTaken(NodeIdTaken { id: me.id.clone(), silent_for_millis, holder }));
            }
            Ok(())
        })
    }

    /// Takes node id `me.id` from `holder`, an incarnation known to be dead
    /// (a crashed process of this host): false if another took it meanwhile.
    pub fn take_over(&self, me: &ThisNode, holder: &str) -> Result<bool, StoreError> {
        let n = self.run(|sql| {
            let now = sql.dialect().now_millis();
            sql.execute(
                &format!(
                    "UPDATE nodes SET region = ?, api = ?, incarnation = ?, started_at = ?, heartbeat_at = {now}
                     WHERE id = ? AND incarnation = ?"
                ),
                args![&me.region, &me.api, &me.incarnation, me.started_at, &me.id, holder],
            )
        })?;
        Ok(n == 1)
    }

    /// Marks `me` stopped (a clean exit): the others see it lost at once.
    pub fn leave(&self, me: &ThisNode) -> Result<(), StoreError> {
        self.transaction(|sql| {
            sql.execute(
                "UPDATE nodes SET heartbeat_at = 0 WHERE id = ? AND incarnation = ?",
                args![&me.id, &me.incarnation],
            )?;
            // Its region's other nodes claim its gateways at once.
            if let Some(notify) = sql.dialect().notify_change() {
                sql.execute(notify, &[])?;
            }
            Ok(())
        })
    }

    /// Every node that ever registered, by id.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        Ok(self.node_rows(false)?.into_iter().map(|(n, _)| n).collect())
    }

    /// `nodes`, each with how many gateways it holds the lease of: counted,
    /// so for `GET /nodes`, not for the checks of every change.
    pub fn nodes_serving(&self) -> Result<Vec<(NodeRecord, u64)>, StoreError> {
        self.node_rows(true)
    }

    fn node_rows(&self, count: bool) -> Result<Vec<(NodeRecord, u64)>, StoreError> {
        let serving = if count { "(SELECT COUNT(*) FROM leases WHERE node_id = nodes.id)" } else { "0" };
        let rows = self.run(|sql| {
            let now = sql.dialect().now_millis();
            sql.query(
                &format!(
                    "SELECT id, region, api, started_at, heartbeat_at, {now} - heartbeat_at, public_key,
                         public_address, listen_port, site_cidr, {serving}
                     FROM nodes ORDER BY id"
                ),
                &[],
            )
        })?;
        let decoded = |r: &Row| Ok((node(r)?, u64::try_from(r.int(10)?).unwrap_or(0)));
        rows.iter().map(decoded).collect::<Result<_, String>>().map_err(|e| sql::unreadable("nodes", e))
    }

    /// The live nodes that serve `region` (its own and those of every region).
    pub fn live_nodes_of(&self, region: &str) -> Result<Vec<NodeRecord>, StoreError> {
        Ok(self.nodes()?.into_iter().filter(|n| n.is_live() && n.serves(region)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::each_backend;
    use super::*;

    fn me(id: &str, region: &str) -> ThisNode {
        ThisNode {
            id: id.into(),
            region: region.into(),
            api: "127.0.0.1:8080".into(),
            incarnation: incarnation(),
            started_at: super::super::now_millis(),
            ..ThisNode::default()
        }
    }

    #[test]
    fn a_holder_is_dead_only_if_it_ran_on_this_boot_and_is_gone() {
        assert!(!holder_is_dead(&incarnation()), "this process");
        let boot = boot_id();
        assert!(!boot.is_empty() && !boot.contains('/'), "{boot}");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(holder_is_dead(&format!("{boot}/{pid}/x")), "a process of this boot that exited");
        assert!(!holder_is_dead(&format!("another-boot/{pid}/x")), "another host or boot: unknown");
        assert!(!holder_is_dead(&format!("{boot}/1/x")), "init runs");
        for garbage in ["", "a/b", "inc_abc", "/5/x", &format!("{boot}/-1/x"), &format!("{boot}/0/x")] {
            assert!(!holder_is_dead(garbage), "{garbage}");
        }
    }

    #[test]
    fn nodes_register_heartbeat_and_are_lost_when_silent() {
        each_backend(|db| {
            let store = db.open();
            let (a, b) = (me("gw-a1", "eu"), me("gw-b1", EVERY_REGION));
            store.heartbeat(&a).unwrap();
            store.heartbeat(&b).unwrap();
            store.heartbeat(&a).unwrap();
            let nodes = store.nodes().unwrap();
            assert_eq!(nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["gw-a1", "gw-b1"]);
            assert!(nodes.iter().all(NodeRecord::is_live), "{nodes:?}");
            assert!(nodes[0].silent_for_millis >= 0 && nodes[0].silent_for_millis < 2_000, "{nodes:?}");
            assert_eq!(store.live_nodes_of("eu").unwrap().len(), 2, "gw-b1 serves every region");
            assert_eq!(store.live_nodes_of("us").unwrap().iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["gw-b1"]);
            // A clean exit: lost at once.
            store.leave(&b).unwrap();
            assert!(store.live_nodes_of("us").unwrap().is_empty());
            // A node silent past the TTL (its heartbeat set back by hand).
            store.execute_raw(
                "UPDATE nodes SET heartbeat_at = heartbeat_at - ? WHERE id = 'gw-a1'",
                args![NODE_TTL_MILLIS + 1_000],
            );
            assert!(store.live_nodes_of("eu").unwrap().is_empty());
            assert!(store.nodes().unwrap()[0].silent_for_millis > NODE_TTL_MILLIS);
        });
    }

    /// Two processes with one node id: the second is refused while the
    /// first is live, and takes the id once the first is silent or gone.
    #[test]
    fn a_live_node_id_cannot_be_taken_by_a_second_process() {
        each_backend(|db| {
            let store = db.open();
            let first = me("gw-a1", "eu");
            store.heartbeat(&first).unwrap();
            let second = ThisNode { incarnation: incarnation(), ..first.clone() };
            let e = store.heartbeat(&second).unwrap_err();
            assert!(matches!(&e, StoreError::NodeIdTaken(t) if t.id == "gw-a1"), "{e}");
            assert!(e.to_string().contains("[node] id"), "{e}");
            store.heartbeat(&first).unwrap();
            store.leave(&first).unwrap();
            store.heartbeat(&second).expect("the first left: the id is free");
            let Err(StoreError::NodeIdTaken(taken)) = store.heartbeat(&first) else { panic!("the first is refused") };
            assert_eq!(taken.holder, second.incarnation);
            // A takeover from a holder known dead: only from that holder.
            assert!(!store.take_over(&first, "someone-else").unwrap());
            assert!(store.take_over(&first, &second.incarnation).unwrap());
            store.heartbeat(&first).expect("the first holds it again");
            assert!(store.heartbeat(&second).is_err());
            assert_eq!(store.nodes().unwrap().len(), 1);
        });
    }
}

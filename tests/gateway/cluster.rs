//! The fleet tier's scripts on a real 3-master Redis Cluster started here: every script
//! touches one group's keys only (one hash slot, `{app:group}` tags), so the cluster
//! routes it whole, and claims, waits and stores behave as on one Redis.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use receipt_gateway::fleet::{Scripts, group_key};
use receipt_gateway::tencent::domain::{AppId, GroupId};
use redis::Value;
use redis::cluster::ClusterClient;

use crate::support::{heavy, within};

/// Three cluster-enabled redis-servers joined into one cluster; killed on drop.
struct Cluster {
    nodes: Vec<Child>,
    ports: Vec<u16>,
    _dir: PathBuf,
}

/// A free port whose cluster bus port (+10000) is free too.
fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl Cluster {
    async fn start(dir: &Path) -> Cluster {
        std::fs::create_dir_all(dir).unwrap();
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let nodes = ports
            .iter()
            .map(|port| {
                Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--cluster-enabled", "yes"])
                    .args(["--cluster-config-file", &format!("nodes-{port}.conf"), "--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server is installed (.ci/run installs it with apt)")
            })
            .collect();
        let cluster = Cluster { nodes, ports, _dir: dir.to_owned() };
        for port in &cluster.ports {
            cluster.until_cli(*port, &["ping"], "PONG").await;
        }
        let addrs: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(created.success(), "redis-cli --cluster create");
        for port in &cluster.ports {
            cluster.until_cli(*port, &["cluster", "info"], "cluster_state:ok").await;
        }
        cluster
    }

    /// Waits until `redis-cli -p port args…` prints `expected`.
    async fn until_cli(&self, port: u16, args: &[&str], expected: &str) {
        within(async {
            loop {
                let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output();
                if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(expected)) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    fn urls(&self) -> Vec<String> {
        self.ports.iter().map(|p| format!("redis://127.0.0.1:{p}/")).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.kill();
            let _ = node.wait();
        }
    }
}

fn keys(group: &str) -> Vec<String> {
    let base = group_key("cluster-test", AppId(1_400_000_000), &GroupId::parse(group).unwrap());
    ["items", "inflight", "lease", "wanted", "group"].iter().map(|k| format!("{base}:{k}")).collect()
}

fn roles(reply: &[Value], n: usize) -> String {
    redis::from_redis_value(reply[2 + n].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_scripts_run_on_a_three_master_cluster() {
    let _heavy = heavy().await;
    let dir = std::env::temp_dir().join(format!("receipt-gateway-cluster-{}", std::process::id()));
    let cluster = Cluster::start(&dir).await;
    let client = ClusterClient::new(cluster.urls()).unwrap();
    let mut conn = within(client.get_async_connection()).await.unwrap();
    let scripts = Scripts::new();
    let groups: Vec<String> = (0..12).map(|i| format!("@TGS#cluster-{i}")).collect();
    let mut slots = std::collections::BTreeSet::new();

    for group in &groups {
        let keys = keys(group);
        let claim = |me: &str| {
            let mut call = scripts.claim.prepare_invoke();
            call.key(&keys[..]).arg(me).arg(1000).arg(1000).arg(3000).arg(2).arg(vec![5u64, 6]);
            call
        };
        let first: Vec<Value> = within(claim("replica-a").invoke_async(&mut conn)).await.unwrap();
        let second: Vec<Value> = within(claim("replica-b").invoke_async(&mut conn)).await.unwrap();
        let mut store = scripts.store.prepare_invoke();
        store.key(&keys[..]).arg("replica-a").arg(0).arg(61_000).arg("cluster-test:fleet:stored").arg("msg");
        store.arg("").arg(1000).arg(2).arg(5).arg("0,1,2").arg(6).arg("0,3,4");
        let stored: i64 = within(store.invoke_async(&mut conn)).await.unwrap();
        let third: Vec<Value> = within(claim("replica-b").invoke_async(&mut conn)).await.unwrap();

        assert_eq!(roles(&first, 2), "mm", "{group}: the first replica claims both");
        assert_eq!(roles(&second, 2), "ww", "{group}: the second waits for them");
        assert_eq!(stored, 2);
        assert_eq!(roles(&third, 2), "ff", "{group}: then finds them fresh");
        let item: String = redis::from_redis_value(third[3].clone()).unwrap();
        assert!(item.ends_with(",0,3,4"), "{item}");
        let slot: Vec<i64> = {
            let mut per_key = Vec::new();
            for key in &keys {
                per_key
                    .push(within(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(&mut conn)).await.unwrap());
            }
            per_key
        };
        assert!(slot.iter().all(|s| *s == slot[0]), "{group}: one slot for all its keys");
        slots.insert(slot[0]);
    }
    assert!(slots.len() > 1, "the groups spread over several slots");
}

/// The gateway's own client on the cluster, end to end: two replicas (processes) share
/// items, fetches and the budget through it, and the groups spread over the masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_through_the_cluster_with_their_own_client() {
    use crate::fleet::{Fixture, Replica, metric};
    use crate::support::body;
    let _heavy = heavy().await;
    let f = Fixture::new("cluster-e2e", 1000).await;
    let dir = std::env::temp_dir().join(format!("receipt-gateway-cluster-e2e-{}", std::process::id()));
    let cluster = Cluster::start(&dir).await;
    let nodes: Vec<String> = cluster.ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let sections = format!(
        "[budget]\nbackend = \"redis\"\n[fleet]\nbackend = \"redis\"\n[redis]\ncluster_nodes = [{}]\n",
        nodes.join(", ")
    );
    let a = Replica::start(&f.dir, "a", &f.sim_url, &sections);
    let b = Replica::start(&f.dir, "b", &f.sim_url, &sections);

    // One item asked of both replicas costs one upstream call.
    assert_eq!(f.post(&a, &body("@TGS#shared", &[7]), &[]).await.status, http::StatusCode::OK);
    let reply = f.post(&b, &body("@TGS#shared", &[7]), &[]).await;
    assert_eq!(reply.status, http::StatusCode::OK);
    assert_eq!(f.sim.calls().len(), 1, "the second replica found the item in the cluster");
    let shared_hit = "receipt_gateway_fleet_items_total{app=\"1400000000\",source=\"shared_hit\"}";
    assert_eq!(metric(&f.client, &b, shared_hit).await, 1.0);
    for r in [&a, &b] {
        assert_eq!(metric(&f.client, r, "receipt_gateway_fleet_backend_up").await, 1.0);
    }
    // Only the replica that called took a token, from the cluster.
    assert_eq!(metric(&f.client, &a, "receipt_gateway_budget_backend_up").await, 1.0);

    // Groups spread over the masters.
    for i in 0..24 {
        assert_eq!(f.post(&a, &body(&format!("@TGS#spread-{i}"), &[1]), &[]).await.status, http::StatusCode::OK);
    }
    for port in &cluster.ports {
        let out = Command::new("redis-cli").args(["-p", &port.to_string(), "dbsize"]).output().unwrap();
        let keys: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
        assert!(keys > 0, "master on port {port} holds some groups' keys");
    }
}

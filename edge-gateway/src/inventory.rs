//! What the gateway knows of its nodes: polled state (`/node`, `/health`), requests in flight
//! (counted here, exact), measured speeds, and ejection after repeated failures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde_json::Value;

use crate::config::{GatewayConfig, NodeSource};

/// One model as a node reports it.
#[derive(Debug, Clone)]
pub struct NodeModel {
    pub id: String,
    pub aliases: Vec<String>,
    /// `cold`, `loading`, `warm` or `failed`.
    pub state: String,
    pub load_ms: Option<f64>,
    pub context_length: Option<u64>,
    pub slots: u64,
    pub kind: Option<String>,
}

/// Speeds measured from the `timings` of real answers (exponential moving averages).
#[derive(Debug, Clone, Copy, Default)]
pub struct Speed {
    pub decode_tps: Option<f64>,
    pub prefill_tps: Option<f64>,
    /// Seconds from request to last token.
    pub service_s: Option<f64>,
}

/// The mutable part of a node's state.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// The node's own id (`/node`), or its URL before the first poll.
    pub id: String,
    /// `gpu=` label, else `device=` label, else the device the node detected.
    pub device: String,
    pub labels: HashMap<String, String>,
    pub models: Vec<NodeModel>,
    /// Routable: polled successfully and not ejected.
    pub up: bool,
    /// `/health` answered 200 on the last poll.
    pub ready: bool,
    /// Consecutive failures (polls and requests).
    pub failures: u32,
    /// Requests of others (other gateway replicas, direct clients) the node had being served
    /// or queued at the last poll: its own count minus this gateway's at that moment.
    pub others_load: u32,
    pub speeds: HashMap<String, Speed>,
}

/// A node: its address, its edge-counted load and its polled view.
#[derive(Debug)]
pub struct NodeState {
    pub url: String,
    /// The DNS name it came from, if any (it leaves when the name stops yielding it).
    pub from_dns: Option<String>,
    pub in_flight: AtomicU32,
    /// Requests ever sent there (with `in_flight`, bounds what a poll's answer counted of ours).
    entered: AtomicU64,
    pub view: Mutex<NodeView>,
}

/// The edge count at the start of a poll (`NodeState::load_mark`).
#[derive(Debug, Clone, Copy)]
pub struct LoadMark {
    in_flight: u32,
    entered: u64,
}

impl NodeState {
    fn new(url: String, from_dns: Option<String>) -> Self {
        NodeState {
            view: Mutex::new(NodeView {
                id: url.trim_start_matches("http://").to_string(),
                device: "unknown".into(),
                ..NodeView::default()
            }),
            url,
            from_dns,
            in_flight: AtomicU32::new(0),
            entered: AtomicU64::new(0),
        }
    }

    /// Marks the edge count before asking the node for its own.
    pub fn load_mark(&self) -> LoadMark {
        LoadMark {
            entered: self.entered.load(Ordering::SeqCst),
            in_flight: self.in_flight.load(Ordering::SeqCst),
        }
    }

    /// The most of our requests the node can have been serving at any moment since `mark`:
    /// those in flight then plus those sent since. The count now would be too low when one of
    /// ours ended between the node's answer and now, leaving a phantom load on exactly the node
    /// a conversation returns to.
    pub fn ours_since(&self, mark: LoadMark) -> u64 {
        let sent = self
            .entered
            .load(Ordering::SeqCst)
            .saturating_sub(mark.entered);
        u64::from(mark.in_flight).saturating_add(sent)
    }

    /// A copy of the polled view.
    pub fn view(&self) -> NodeView {
        self.view.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Takes one request into the edge count; the guard gives it back.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        // In this order, and read in the other by `load_mark`: a request is then in the mark's
        // `in_flight` or in the `entered` after it.
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.entered.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// Learns from one answer's `timings`.
    pub fn learn(&self, model: &str, seen: Speed) {
        let ewma = |old: Option<f64>, new: Option<f64>| match (old, new) {
            (Some(o), Some(n)) => Some(0.7 * o + 0.3 * n),
            (o, n) => n.or(o),
        };
        if let Ok(mut v) = self.view.lock() {
            let s = v.speeds.entry(model.to_string()).or_default();
            let ok = |x: Option<f64>| x.filter(|x| x.is_finite() && *x > 0.0);
            s.decode_tps = ewma(s.decode_tps, ok(seen.decode_tps));
            s.prefill_tps = ewma(s.prefill_tps, ok(seen.prefill_tps));
            s.service_s = ewma(s.service_s, ok(seen.service_s));
        }
    }
}

/// One request in flight on a node; dropping it ends the count.
#[derive(Debug)]
pub struct InFlight(Arc<NodeState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What happened to a node's state after a success or failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Ejected,
    Readmitted,
}

/// All nodes.
#[derive(Debug, Default)]
pub struct Inventory {
    nodes: RwLock<Vec<Arc<NodeState>>>,
}

impl Inventory {
    /// An inventory holding the config's static nodes (DNS ones arrive with `resolve`).
    pub fn new(config: &GatewayConfig) -> Self {
        let nodes = config
            .nodes
            .iter()
            .filter_map(|s| match s {
                NodeSource::Static(u) => Some(Arc::new(NodeState::new(u.clone(), None))),
                NodeSource::Dns { .. } => None,
            })
            .collect();
        Inventory {
            nodes: RwLock::new(nodes),
        }
    }

    /// Every node.
    pub fn all(&self) -> Vec<Arc<NodeState>> {
        self.nodes.read().map(|n| n.clone()).unwrap_or_default()
    }

    /// Sets the nodes a DNS name yields now: adds new addresses, drops vanished ones.
    /// Returns the URLs that left.
    pub fn set_dns_nodes(&self, name: &str, urls: &[String]) -> Vec<String> {
        let Ok(mut nodes) = self.nodes.write() else {
            return Vec::new();
        };
        let mut gone = Vec::new();
        nodes.retain(|n| {
            let keep = n.from_dns.as_deref() != Some(name) || urls.contains(&n.url);
            if !keep {
                gone.push(n.url.clone());
            }
            keep
        });
        for u in urls {
            if !nodes.iter().any(|n| &n.url == u) {
                nodes.push(Arc::new(NodeState::new(u.clone(), Some(name.to_string()))));
            }
        }
        gone
    }
}

/// Records a failure; ejects the node at `eject_after` consecutive ones.
pub fn fail(node: &NodeState, eject_after: u32) -> Transition {
    let Ok(mut v) = node.view.lock() else {
        return Transition::None;
    };
    v.failures = v.failures.saturating_add(1);
    if v.up && v.failures >= eject_after {
        v.up = false;
        v.ready = false;
        return Transition::Ejected;
    }
    Transition::None
}

/// Applies a successful poll of `/node` (and the `/health` status); `mark` was taken before
/// `/node` was asked.
pub fn apply_poll(node: &NodeState, info: &Value, ready: bool, mark: LoadMark) -> Transition {
    let labels: HashMap<String, String> = info
        .get("labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default();
    // A node lists the GPUs its models run on first, each with the driver's model name
    // shortened the way catalogs spell it (`gpu`: "H100"); a CPU-only node lists its CPU.
    let devices = info.get("devices").and_then(Value::as_array);
    let detected = devices
        .and_then(|ds| ds.iter().find_map(|d| d.get("gpu").and_then(Value::as_str)))
        .or_else(|| {
            devices
                .and_then(|ds| ds.first())
                .and_then(|d| d.get("kind"))
                .and_then(Value::as_str)
        })
        .unwrap_or("cpu");
    let device = labels
        .get("gpu")
        .or_else(|| labels.get("device"))
        .cloned()
        .unwrap_or_else(|| detected.to_string());
    let str_of = |m: &Value, k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
    let models = info
        .get("models")
        .and_then(Value::as_array)
        .map(|ms| {
            ms.iter()
                .filter_map(|m| {
                    Some(NodeModel {
                        id: str_of(m, "id")?,
                        aliases: m
                            .get("aliases")
                            .and_then(Value::as_array)
                            .map(|a| {
                                a.iter()
                                    .filter_map(Value::as_str)
                                    .map(str::to_string)
                                    .collect()
                            })
                            .unwrap_or_default(),
                        state: str_of(m, "state").unwrap_or_else(|| "cold".into()),
                        load_ms: m.get("load_time_ms").and_then(Value::as_f64),
                        context_length: m.get("context_length").and_then(Value::as_u64),
                        slots: m
                            .get("slots")
                            .and_then(|s| s.get("total"))
                            .and_then(Value::as_u64)
                            .unwrap_or(1),
                        kind: str_of(m, "kind"),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let Ok(mut v) = node.view.lock() else {
        return Transition::None;
    };
    if let Some(id) = str_of(info, "id").filter(|s| !s.is_empty()) {
        v.id = id;
    }
    // The node's `in_flight` counts requests being served or waiting in its queue, ours too.
    let theirs = info.get("in_flight").and_then(Value::as_u64).unwrap_or(0);
    let ours = node.ours_since(mark);
    v.others_load = u32::try_from(theirs.saturating_sub(ours)).unwrap_or(u32::MAX);
    v.labels = labels;
    v.device = device;
    v.models = models;
    v.ready = ready;
    v.failures = 0;
    if v.up {
        Transition::None
    } else {
        v.up = true;
        Transition::Readmitted
    }
}

/// Marks `model` warm on `node` after a warm-up it answered.
pub fn mark_warm(node: &NodeState, model: &str, load_ms: Option<f64>) {
    if let Ok(mut v) = node.view.lock() {
        for m in v.models.iter_mut().filter(|m| m.id == model) {
            m.state = "warm".into();
            if load_ms.is_some() {
                m.load_ms = load_ms;
            }
        }
    }
}

/// The model a node serves under `name` (its id or one of its aliases).
pub fn served<'a>(view: &'a NodeView, name: &str) -> Option<&'a NodeModel> {
    view.models.iter().find(|m| {
        m.id.eq_ignore_ascii_case(name) || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    })
}

/// Resolves `host:port` to node URLs (one per address).
pub async fn resolve(host: &str, port: u16) -> std::io::Result<Vec<String>> {
    let mut urls: Vec<String> = tokio::net::lookup_host((host, port))
        .await?
        .map(|a| match a {
            std::net::SocketAddr::V4(a) => format!("http://{a}"),
            std::net::SocketAddr::V6(a) => format!("http://[{}]:{}", a.ip(), a.port()),
        })
        .collect();
    urls.sort();
    urls.dedup();
    Ok(urls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn device_kind_comes_from_gpu_then_device_label_then_detection() {
        let n = NodeState::new("http://a:1".into(), None);
        let info = |labels: Value| {
            json!({"id": "n1", "labels": labels, "devices": [{"kind": "cpu"}],
                   "models": [{"id": "m", "aliases": ["x"], "state": "warm", "slots": {"total": 2}}]})
        };
        assert_eq!(
            apply_poll(
                &n,
                &info(json!({"gpu": "L40S", "device": "cpu"})),
                true,
                n.load_mark()
            ),
            Transition::Readmitted
        );
        assert_eq!(n.view().device, "L40S");
        apply_poll(
            &n,
            &info(json!({"device": "cpu-avx512"})),
            true,
            n.load_mark(),
        );
        assert_eq!(n.view().device, "cpu-avx512");
        let n = Arc::new(n);
        let first = n.enter();
        let mut busy = info(json!({}));
        busy["in_flight"] = json!(3);
        apply_poll(&n, &busy, true, n.load_mark());
        assert_eq!(n.view().others_load, 2, "3 at the node, 1 of them ours");
        // Ours end and start while the poll is out: the node's count may hold any of them.
        let mark = n.load_mark();
        drop(first);
        let second = n.enter();
        apply_poll(&n, &busy, true, mark);
        assert_eq!(
            n.view().others_load,
            1,
            "3 at the node, up to 2 of them ours"
        );
        let mut one = info(json!({}));
        one["in_flight"] = json!(1);
        let mark = n.load_mark();
        drop(second);
        apply_poll(&n, &one, true, mark);
        assert_eq!(
            n.view().others_load,
            0,
            "the one the node counted had just ended here"
        );
        let v = n.view();
        assert_eq!((v.device.as_str(), v.id.as_str()), ("cpu", "n1"));
        let mut gpu = info(json!({}));
        gpu["devices"] = json!([{"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "gpu": "H100"},
                                {"kind": "cpu"}]);
        apply_poll(&n, &gpu, true, n.load_mark());
        assert_eq!(
            n.view().device,
            "H100",
            "the driver's GPU model, unlabelled"
        );
        assert_eq!(served(&v, "X").map(|m| m.slots), Some(2));
    }

    #[test]
    fn ejection_after_consecutive_failures_and_readmission() {
        let n = NodeState::new("http://a:1".into(), None);
        apply_poll(&n, &json!({"models": []}), true, n.load_mark());
        assert_eq!(fail(&n, 2), Transition::None);
        assert!(n.view().up);
        assert_eq!(fail(&n, 2), Transition::Ejected);
        assert_eq!(fail(&n, 2), Transition::None);
        assert!(!n.view().up);
        assert_eq!(
            apply_poll(&n, &json!({"models": []}), true, n.load_mark()),
            Transition::Readmitted
        );
        assert_eq!(n.view().failures, 0);
    }

    #[test]
    fn dns_nodes_come_and_go() {
        let inv = Inventory::default();
        inv.set_dns_nodes(
            "svc",
            &["http://10.0.0.1:80".into(), "http://10.0.0.2:80".into()],
        );
        assert_eq!(inv.all().len(), 2);
        let gone = inv.set_dns_nodes("svc", &["http://10.0.0.2:80".into()]);
        assert_eq!(gone, vec!["http://10.0.0.1:80".to_string()]);
        assert_eq!(inv.all().len(), 1);
    }

    #[test]
    fn speeds_are_smoothed() {
        let n = NodeState::new("http://a:1".into(), None);
        let seen = |d, p| Speed {
            decode_tps: d,
            prefill_tps: p,
            service_s: None,
        };
        n.learn("m", seen(Some(100.0), None));
        n.learn("m", seen(Some(200.0), Some(1000.0)));
        let s = n.view().speeds["m"];
        assert_eq!(s.decode_tps, Some(130.0));
        assert_eq!(s.prefill_tps, Some(1000.0));
    }
}

//! The gateway's shared state and the hard placement filters (model, device, preference,
//! health) that run before the policy ranks what is left.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::affinity::{AffinityIndex, PrefixHashes};
use crate::config::GatewayConfig;
use crate::inventory::{self, Inventory, NodeState, NodeView};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::policy::{Candidate, Demand, Policy, Reason, Rng};

/// Bytes of prompt text per token, for estimates at the edge (English BPE averages ~4).
pub const BYTES_PER_TOKEN: f64 = 4.0;

/// The pooled HTTP/1.1 client toward nodes.
pub type NodeClient = Client<HttpConnector, Full<Bytes>>;

/// Everything the handlers share.
pub struct Gateway {
    pub config: GatewayConfig,
    pub inventory: Inventory,
    pub limits: Limits,
    pub metrics: Metrics,
    pub affinity: Mutex<AffinityIndex>,
    pub client: NodeClient,
    rng: Mutex<Rng>,
    turn: std::sync::atomic::AtomicUsize,
    pub started: Instant,
}

/// A node that may serve a request, with the view the decision used.
#[derive(Clone)]
pub struct Eligible {
    pub node: Arc<NodeState>,
    pub view: NodeView,
    /// The model's id on that node.
    pub model_id: String,
}

/// Why no node may serve a request.
#[derive(Debug, Clone, PartialEq)]
pub enum PlaceError {
    /// Nothing in the catalog or on any node has this name.
    UnknownModel { model: String, served: Vec<String> },
    /// The preference names no device the model is compatible with.
    Incompatible {
        model: String,
        preference: String,
        compatible: Vec<String>,
    },
    /// A compatible device exists in principle but no healthy node has it right now.
    Unavailable { model: String, devices: Vec<String> },
}

/// Whether `preference` asks for nothing in particular.
fn no_preference(p: Option<&str>) -> bool {
    p.is_none_or(|p| {
        let p = p.trim();
        p.is_empty() || p.eq_ignore_ascii_case("auto") || p.eq_ignore_ascii_case("any")
    })
}

/// Whether device kind `device` satisfies `preference` (`gpu` means any non-CPU kind).
fn satisfies(device: &str, preference: &str) -> bool {
    let p = preference.trim();
    device.eq_ignore_ascii_case(p)
        || (p.eq_ignore_ascii_case("gpu") && !device.to_ascii_lowercase().starts_with("cpu"))
}

impl Gateway {
    /// A gateway over `config`'s nodes (not yet polled).
    pub fn new(config: GatewayConfig) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(http);
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Gateway {
            inventory: Inventory::new(&config),
            limits: Limits::new(&config.keys, config.admin_key.as_deref()),
            metrics: Metrics::default(),
            affinity: Mutex::new(AffinityIndex::new(200_000)),
            client,
            rng: Mutex::new(Rng::new(seed)),
            turn: std::sync::atomic::AtomicUsize::new(0),
            started: Instant::now(),
            config,
        }
    }

    /// The catalog's name for `model` (aliases resolved), or `model` itself.
    pub fn canonical(&self, model: &str) -> String {
        self.config
            .catalog(model)
            .map_or_else(|| model.to_string(), |m| m.name.clone())
    }

    /// The nodes that may serve `model` with `preference`, healthy ones only.
    pub fn eligible(
        &self,
        model: &str,
        preference: Option<&str>,
    ) -> Result<Vec<Eligible>, PlaceError> {
        let catalog = self.config.catalog(model);
        let name = catalog.map_or(model, |m| m.name.as_str());
        let views: Vec<(Arc<NodeState>, NodeView)> = self
            .inventory
            .all()
            .into_iter()
            .map(|n| {
                let v = n.view();
                (n, v)
            })
            .collect();
        let serving: Vec<&(Arc<NodeState>, NodeView)> = views
            .iter()
            .filter(|(_, v)| inventory::served(v, name).is_some())
            .collect();
        if catalog.is_none() && serving.is_empty() {
            let mut served: Vec<String> = views
                .iter()
                .filter(|(_, v)| v.up)
                .flat_map(|(_, v)| v.models.iter().map(|m| m.id.clone()))
                .chain(self.config.models.iter().map(|m| m.name.clone()))
                .collect();
            served.sort();
            served.dedup();
            return Err(PlaceError::UnknownModel {
                model: model.into(),
                served,
            });
        }
        // Compatible kinds: the catalog's, else whatever kinds serve the model.
        let compatible: Vec<String> = match catalog {
            Some(c) => c.devices.clone(),
            None => {
                let mut k: Vec<String> = serving.iter().map(|(_, v)| v.device.clone()).collect();
                k.sort();
                k.dedup();
                k
            }
        };
        let allowed = |d: &str| compatible.iter().any(|c| c.eq_ignore_ascii_case(d));
        let wanted: Vec<String> = if no_preference(preference) {
            compatible.clone()
        } else {
            let p = preference.unwrap_or_default();
            let w: Vec<String> = compatible
                .iter()
                .filter(|c| satisfies(c, p))
                .cloned()
                .collect();
            if w.is_empty() {
                return Err(PlaceError::Incompatible {
                    model: name.into(),
                    preference: p.trim().into(),
                    compatible,
                });
            }
            w
        };
        let out: Vec<Eligible> = serving
            .iter()
            .filter(|(_, v)| v.up && allowed(&v.device))
            .filter(|(_, v)| wanted.iter().any(|w| w.eq_ignore_ascii_case(&v.device)))
            .filter_map(|(n, v)| {
                let m = inventory::served(v, name)?;
                (m.state != "failed").then(|| Eligible {
                    node: n.clone(),
                    view: v.clone(),
                    model_id: m.id.clone(),
                })
            })
            .collect();
        if out.is_empty() {
            return Err(PlaceError::Unavailable {
                model: name.into(),
                devices: wanted,
            });
        }
        Ok(out)
    }

    /// Every healthy node (for requests that name no model).
    pub fn any_node(&self) -> Vec<Eligible> {
        self.inventory
            .all()
            .into_iter()
            .filter_map(|n| {
                let v = n.view();
                v.up.then(|| Eligible {
                    node: n.clone(),
                    view: v,
                    model_id: String::new(),
                })
            })
            .collect()
    }

    /// Ranks `nodes` with the policy and returns the chosen one's index.
    pub fn choose(
        &self,
        nodes: &[Eligible],
        model: &str,
        hashes: Option<&PrefixHashes>,
        demand: Demand,
    ) -> Option<(usize, Reason)> {
        if nodes.is_empty() {
            return None;
        }
        if self.config.placement.round_robin {
            let mut order: Vec<usize> = (0..nodes.len()).collect();
            order.sort_by(|&a, &b| nodes[a].node.url.cmp(&nodes[b].node.url));
            let t = self.turn.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Some((order[t % order.len()], Reason::RoundRobin));
        }
        let affine = hashes.and_then(|h| {
            let idx = self.affinity.lock().ok()?;
            idx.lookup(h).map(|(url, len)| (url.to_string(), len))
        });
        let cands: Vec<Candidate> = nodes
            .iter()
            .map(|e| {
                let speed = e.view.speeds.get(model).copied().unwrap_or_default();
                // The edge count is exact and fresh for this gateway's requests; the last poll
                // adds those of other gateway replicas and direct clients.
                let edge = e.node.in_flight.load(std::sync::atomic::Ordering::Relaxed);
                Candidate {
                    in_flight: edge.saturating_add(e.view.others_load),
                    warm: inventory::served(&e.view, &e.model_id).is_none_or(|m| m.state == "warm"),
                    affinity_tokens: match &affine {
                        Some((url, len)) if *url == e.node.url => *len as f64 / BYTES_PER_TOKEN,
                        _ => 0.0,
                    },
                    decode_tps: speed.decode_tps,
                    prefill_tps: speed.prefill_tps,
                    service_s: speed.service_s,
                }
            })
            .collect();
        let policy = Policy {
            explore: self.config.placement.explore,
            affinity_slack: self.config.placement.affinity_slack,
        };
        let mut rng = self.rng.lock().ok()?;
        policy.choose(&cands, demand, &mut rng)
    }

    /// Remembers that `node_url` served the prompt of `hashes`.
    pub fn remember(&self, hashes: &PrefixHashes, node_url: &str) {
        if let Ok(mut idx) = self.affinity.lock() {
            idx.record(hashes, node_url);
        }
    }

    /// Records a failed attempt on `node`, ejecting it at the threshold.
    pub fn node_failed(&self, node: &NodeState) {
        if inventory::fail(node, self.config.eject_after) == inventory::Transition::Ejected {
            let id = node.view().id;
            eprintln!("edge-gateway: node {id} ({}) ejected", node.url);
            self.metrics.ejection(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gateway() -> Gateway {
        let cfg = GatewayConfig::parse(
            r#"
[[nodes]]
url = "http://n1:1"
[[nodes]]
url = "http://n2:1"
[[nodes]]
url = "http://n3:1"
[[models]]
name = "qwen3"
devices = ["L40S", "A10G"]
aliases = ["gpt-4o-mini"]
"#,
        )
        .unwrap();
        let gw = Gateway::new(cfg);
        for (n, gpu) in gw.inventory.all().iter().zip(["L40S", "A100", "A10G"]) {
            let info = json!({"id": gpu, "labels": {"gpu": gpu},
                "models": [{"id": "qwen3", "state": "warm"}, {"id": "other", "state": "cold"}]});
            inventory::apply_poll(n, &info, true, n.load_mark());
        }
        gw
    }

    fn devices(r: Result<Vec<Eligible>, PlaceError>) -> Vec<String> {
        r.unwrap().into_iter().map(|e| e.view.device).collect()
    }

    #[tokio::test]
    async fn filters_by_catalog_preference_and_health() {
        let gw = gateway();
        assert_eq!(devices(gw.eligible("gpt-4o-mini", None)), ["L40S", "A10G"]);
        assert_eq!(devices(gw.eligible("qwen3", Some("a10g"))), ["A10G"]);
        assert_eq!(devices(gw.eligible("qwen3", Some("gpu"))), ["L40S", "A10G"]);
        match gw.eligible("qwen3", Some("A100")) {
            Err(PlaceError::Incompatible { compatible, .. }) => {
                assert_eq!(compatible, ["L40S", "A10G"])
            }
            other => panic!("{:?}", other.err()),
        }
        // Not in the catalog: any device that serves it.
        assert_eq!(devices(gw.eligible("other", Some("A100"))), ["A100"]);
        assert!(matches!(
            gw.eligible("nope", None),
            Err(PlaceError::UnknownModel { .. })
        ));
        // An ejected L40S node leaves a compatible device absent: 503, not 400.
        let l40s = gw.inventory.all()[0].clone();
        for _ in 0..3 {
            gw.node_failed(&l40s);
        }
        assert!(matches!(
            gw.eligible("qwen3", Some("L40S")),
            Err(PlaceError::Unavailable { .. })
        ));
        assert_eq!(devices(gw.eligible("qwen3", None)), ["A10G"]);
    }
}

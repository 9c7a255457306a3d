//! The gateway's Prometheus metrics, per node, model and device.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Bucket bounds in seconds of the latency histograms.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A Prometheus label set: node, model, device.
pub type Target = (String, String, String);

#[derive(Default, Clone)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (c, &b) in self.counts.iter_mut().zip(BUCKETS) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

#[derive(Default)]
struct Counters {
    requests: BTreeMap<(Target, u16), u64>,
    errors: BTreeMap<Target, u64>,
    retries: BTreeMap<Target, u64>,
    ejections: BTreeMap<String, u64>,
    ttft: BTreeMap<Target, Histogram>,
    queue: BTreeMap<String, Histogram>,
}

/// A node's gauges at scrape time.
pub struct NodeGauges {
    pub node: String,
    pub device: String,
    pub up: bool,
    pub in_flight: u32,
}

/// Counters and histograms of the gateway.
#[derive(Default)]
pub struct Metrics {
    c: Mutex<Counters>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Counters)) {
        let mut c = self.c.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c);
    }

    /// A request a node answered with `status`.
    pub fn request(&self, t: &Target, status: u16) {
        self.with(|c| *c.requests.entry((t.clone(), status)).or_default() += 1);
    }

    /// A failure on a node: connect error, 5xx, or a stream cut mid-way.
    pub fn error(&self, t: &Target) {
        self.with(|c| *c.errors.entry(t.clone()).or_default() += 1);
    }

    /// An attempt on a node that was retried elsewhere.
    pub fn retry(&self, t: &Target) {
        self.with(|c| *c.retries.entry(t.clone()).or_default() += 1);
    }

    /// A node ejected after repeated failures.
    pub fn ejection(&self, node: &str) {
        self.with(|c| *c.ejections.entry(node.into()).or_default() += 1);
    }

    /// Time from forwarding to the node's answer head (the node answers once the first token
    /// exists, so for generation this is its time to first token).
    pub fn upstream_ttft(&self, t: &Target, secs: f64) {
        self.with(|c| c.ttft.entry(t.clone()).or_default().observe(secs));
    }

    /// Time a request spent in the gateway before the attempt that served it.
    pub fn queue_time(&self, model: &str, secs: f64) {
        self.with(|c| c.queue.entry(model.into()).or_default().observe(secs));
    }

    /// The exposition text, with the nodes' gauges.
    pub fn render(&self, nodes: &[NodeGauges]) -> String {
        let c = self.c.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = String::new();
        let t = |(n, m, d): &Target| {
            format!(
                "node=\"{}\",model=\"{}\",device=\"{}\"",
                esc(n),
                esc(m),
                esc(d)
            )
        };
        let _ = writeln!(s, "# TYPE wasmlm_gateway_requests_total counter");
        for ((target, status), v) in &c.requests {
            let _ = writeln!(
                s,
                "wasmlm_gateway_requests_total{{{},status=\"{status}\"}} {v}",
                t(target)
            );
        }
        for (name, map) in [
            ("wasmlm_gateway_errors_total", &c.errors),
            ("wasmlm_gateway_retries_total", &c.retries),
        ] {
            let _ = writeln!(s, "# TYPE {name} counter");
            for (target, v) in map {
                let _ = writeln!(s, "{name}{{{}}} {v}", t(target));
            }
        }
        let _ = writeln!(s, "# TYPE wasmlm_gateway_ejections_total counter");
        for (node, v) in &c.ejections {
            let _ = writeln!(
                s,
                "wasmlm_gateway_ejections_total{{node=\"{}\"}} {v}",
                esc(node)
            );
        }
        let _ = writeln!(s, "# TYPE wasmlm_gateway_upstream_ttft_seconds histogram");
        for (target, h) in &c.ttft {
            histogram(
                &mut s,
                "wasmlm_gateway_upstream_ttft_seconds",
                &t(target),
                h,
            );
        }
        let _ = writeln!(s, "# TYPE wasmlm_gateway_queue_seconds histogram");
        for (model, h) in &c.queue {
            histogram(
                &mut s,
                "wasmlm_gateway_queue_seconds",
                &format!("model=\"{}\"", esc(model)),
                h,
            );
        }
        let _ = writeln!(s, "# TYPE wasmlm_gateway_node_up gauge");
        for n in nodes {
            let _ = writeln!(
                s,
                "wasmlm_gateway_node_up{{node=\"{}\",device=\"{}\"}} {}",
                esc(&n.node),
                esc(&n.device),
                u8::from(n.up)
            );
        }
        let _ = writeln!(s, "# TYPE wasmlm_gateway_in_flight gauge");
        for n in nodes {
            let _ = writeln!(
                s,
                "wasmlm_gateway_in_flight{{node=\"{}\",device=\"{}\"}} {}",
                esc(&n.node),
                esc(&n.device),
                n.in_flight
            );
        }
        s
    }
}

fn histogram(s: &mut String, name: &str, labels: &str, h: &Histogram) {
    for (count, bound) in h.counts.iter().zip(BUCKETS) {
        let _ = writeln!(s, "{name}_bucket{{{labels},le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(s, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(s, "{name}_sum{{{labels}}} {}", h.sum);
    let _ = writeln!(s, "{name}_count{{{labels}}} {}", h.count);
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

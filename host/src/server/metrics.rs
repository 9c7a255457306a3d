//! Prometheus metrics of a node, rendered in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Bucket bounds in seconds of the latency histograms.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

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
    requests: BTreeMap<(String, u16), u64>,
    prompt_tokens: BTreeMap<String, u64>,
    cached_tokens: BTreeMap<String, u64>,
    generated_tokens: BTreeMap<String, u64>,
    ttft: BTreeMap<String, Histogram>,
    itl: BTreeMap<String, Histogram>,
}

/// A model's gauges at the moment of a scrape.
pub struct ModelGauges {
    pub model: String,
    pub slots_total: usize,
    pub slots_busy: usize,
    pub queue_depth: usize,
    pub warm: bool,
}

/// The node's counters and histograms.
#[derive(Default)]
pub struct Metrics {
    c: Mutex<Counters>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Counters)) {
        let mut c = self.c.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c);
    }

    /// One answered request on `endpoint` (its route pattern) with `status`.
    pub fn request(&self, endpoint: &str, status: u16) {
        self.with(|c| *c.requests.entry((endpoint.into(), status)).or_default() += 1);
    }

    /// Token counts of one finished generation.
    pub fn tokens(&self, model: &str, prompt: u32, cached: u32, generated: u32) {
        self.with(|c| {
            *c.prompt_tokens.entry(model.into()).or_default() += u64::from(prompt);
            *c.cached_tokens.entry(model.into()).or_default() += u64::from(cached);
            *c.generated_tokens.entry(model.into()).or_default() += u64::from(generated);
        });
    }

    /// Time from request start to the first generated token.
    pub fn time_to_first_token(&self, model: &str, secs: f64) {
        self.with(|c| c.ttft.entry(model.into()).or_default().observe(secs));
    }

    /// Time between two generated tokens.
    pub fn inter_token(&self, model: &str, secs: f64) {
        self.with(|c| c.itl.entry(model.into()).or_default().observe(secs));
    }

    /// The exposition text, with `gauges` sampled by the caller.
    pub fn render(&self, gauges: &[ModelGauges], in_flight: usize) -> String {
        let c = self.c.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let o = &mut out;
        header(
            o,
            "wasmlm_requests_total",
            "counter",
            "HTTP requests by endpoint and status.",
        );
        for ((e, s), n) in &c.requests {
            let _ = writeln!(
                o,
                "wasmlm_requests_total{{endpoint=\"{}\",status=\"{s}\"}} {n}",
                escape(e)
            );
        }
        for (name, help, map) in [
            (
                "wasmlm_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                &c.prompt_tokens,
            ),
            (
                "wasmlm_prompt_tokens_cached_total",
                "Prompt tokens served from a slot's KV cache.",
                &c.cached_tokens,
            ),
            (
                "wasmlm_generated_tokens_total",
                "Generated tokens.",
                &c.generated_tokens,
            ),
        ] {
            header(o, name, "counter", help);
            for (m, n) in map {
                let _ = writeln!(o, "{name}{{model=\"{}\"}} {n}", escape(m));
            }
        }
        for (name, help, map) in [
            (
                "wasmlm_time_to_first_token_seconds",
                "Time from request to first generated token.",
                &c.ttft,
            ),
            (
                "wasmlm_inter_token_latency_seconds",
                "Time between generated tokens.",
                &c.itl,
            ),
        ] {
            header(o, name, "histogram", help);
            for (m, h) in map {
                let m = escape(m);
                for (b, n) in BUCKETS.iter().zip(&h.counts) {
                    let _ = writeln!(o, "{name}_bucket{{model=\"{m}\",le=\"{b}\"}} {n}");
                }
                let _ = writeln!(o, "{name}_bucket{{model=\"{m}\",le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(o, "{name}_sum{{model=\"{m}\"}} {}", h.sum);
                let _ = writeln!(o, "{name}_count{{model=\"{m}\"}} {}", h.count);
            }
        }
        for (name, help, get) in [
            (
                "wasmlm_slots_total",
                "Slots per model.",
                (|g| g.slots_total) as fn(&ModelGauges) -> usize,
            ),
            ("wasmlm_slots_busy", "Slots serving a request.", |g| {
                g.slots_busy
            }),
            ("wasmlm_queue_depth", "Requests waiting for a slot.", |g| {
                g.queue_depth
            }),
            (
                "wasmlm_model_warm",
                "1 when the model is loaded and warm.",
                |g| usize::from(g.warm),
            ),
        ] {
            header(o, name, "gauge", help);
            for g in gauges {
                let _ = writeln!(o, "{name}{{model=\"{}\"}} {}", escape(&g.model), get(g));
            }
        }
        header(
            o,
            "wasmlm_requests_in_flight",
            "gauge",
            "Requests being served or queued.",
        );
        let _ = writeln!(o, "wasmlm_requests_in_flight {in_flight}");
        out
    }
}

fn header(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value with Prometheus' escapes.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let m = Metrics::default();
        m.time_to_first_token("a", 0.02);
        m.time_to_first_token("a", 3.0);
        m.request("/v1/models", 200);
        let text = m.render(&[], 0);
        assert!(
            text.contains("wasmlm_time_to_first_token_seconds_bucket{model=\"a\",le=\"0.025\"} 1")
        );
        assert!(text.contains("wasmlm_time_to_first_token_seconds_bucket{model=\"a\",le=\"5\"} 2"));
        assert!(text.contains("wasmlm_time_to_first_token_seconds_count{model=\"a\"} 2"));
        assert!(text.contains("wasmlm_requests_total{endpoint=\"/v1/models\",status=\"200\"} 1"));
    }
}

//! Placement: which of the nodes that may serve a request gets it.
//!
//! The hard filters (model served, device compatible, preference, node healthy) run before this
//! module; it only ranks what is left, by the time the request is expected to take there:
//!
//! ```text
//! cost = (in_flight + cold) × service  +  uncached_prompt / prefill_tps  +  output / decode_tps
//! ```
//!
//! - `in_flight`: requests the gateway has on that node (counted at the edge: exact, fresh);
//!   `cold` adds [`COLD_PENALTY`] requests' worth where the model still has to load.
//! - `service`: the node's measured seconds per request for this model, so waiting behind
//!   short (cached) requests is cheap and behind long ones is not.
//! - `uncached_prompt`: the prompt's estimated tokens minus the prefix that node last served
//!   (prefix affinity, `affinity.rs`): the KV cache it likely still holds saves that prefill.
//! - `prefill_tps`, `decode_tps`: the node's speeds for this model, learned from the `timings`
//!   of real answers. A GPU that decodes 10× faster than a CPU box thus wins with requests in
//!   flight, and a conversation returns to its cache unless waiting there costs more than
//!   recomputing it elsewhere.
//!
//! A node not measured yet gets the median of the measured ones (so it is tried, not starved).
//! Before anything is measured the cost is `in_flight + 1 + cold`, and the affinity node wins
//! while that is at most `1 + affinity_slack` times the best. With probability `explore` the
//! pick is uniform (speeds stay measured everywhere); equal costs are broken at random, which
//! spreads idle traffic like round-robin.

/// A node that passed the hard filters, as the policy sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Candidate {
    /// Requests the gateway has in flight on this node.
    pub in_flight: u32,
    /// Whether the model is warm there.
    pub warm: bool,
    /// Estimated prompt tokens of this request that node last served as a prefix.
    pub affinity_tokens: f64,
    /// Measured decode speed of the model there (tokens/s).
    pub decode_tps: Option<f64>,
    /// Measured prefill speed of the model there (tokens/s).
    pub prefill_tps: Option<f64>,
    /// Measured seconds per request of the model there.
    pub service_s: Option<f64>,
}

/// What the request asks for, estimated at the edge (no tokenizer here).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Demand {
    pub prompt_tokens: f64,
    pub output_tokens: f64,
}

/// Requests' worth of load added to a node where the model still has to load.
pub const COLD_PENALTY: f64 = 4.0;

/// The placement knobs.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub explore: f64,
    pub affinity_slack: f64,
}

/// Why a candidate was picked (reported in metrics and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Only,
    Explore,
    Affinity,
    LeastLoaded,
    /// The least expected time, from measured speeds.
    Fastest,
    /// The `round-robin` baseline strategy.
    RoundRobin,
}

/// A small xorshift generator: placement needs cheap, seedable randomness, not crypto.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced, xorshift needs a non-zero state).
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    /// A uniform u64.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// A uniform f64 in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// A uniform index below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

impl Policy {
    /// The index of the chosen candidate, or `None` when there is none.
    pub fn choose(
        &self,
        cands: &[Candidate],
        demand: Demand,
        rng: &mut Rng,
    ) -> Option<(usize, Reason)> {
        match cands.len() {
            0 => return None,
            1 => return Some((0, Reason::Only)),
            _ => {}
        }
        if self.explore > 0.0 && rng.unit() < self.explore {
            return Some((rng.below(cands.len()), Reason::Explore));
        }
        if let Some(costs) = expected_seconds(cands, demand) {
            return Some((pick_min(&costs, rng), Reason::Fastest));
        }
        let loads = normalised_loads(cands);
        let best = loads.iter().copied().fold(f64::INFINITY, f64::min);
        let affine = (0..cands.len())
            .filter(|&i| cands[i].affinity_tokens > 0.0)
            .max_by(|&a, &b| {
                cands[a]
                    .affinity_tokens
                    .total_cmp(&cands[b].affinity_tokens)
                    .then(loads[b].total_cmp(&loads[a]))
            });
        if let Some(a) = affine {
            if loads[a] <= best * (1.0 + self.affinity_slack) + 1e-9 {
                return Some((a, Reason::Affinity));
            }
        }
        Some((pick_min(&loads, rng), Reason::LeastLoaded))
    }
}

/// A random index among the minima of `v`.
fn pick_min(v: &[f64], rng: &mut Rng) -> usize {
    let best = v.iter().copied().fold(f64::INFINITY, f64::min);
    let ties: Vec<usize> = (0..v.len())
        .filter(|&i| v[i] <= best * (1.0 + 1e-9))
        .collect();
    // Costs are finite by construction; should none compare (NaN), take the first.
    if ties.is_empty() {
        return 0;
    }
    ties[rng.below(ties.len())]
}

/// The median of the usable values, if any.
fn median(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let mut known: Vec<f64> = values
        .flatten()
        .filter(|s| s.is_finite() && *s > 0.0)
        .collect();
    known.sort_by(f64::total_cmp);
    known.get(known.len() / 2).copied()
}

fn usable(v: Option<f64>) -> Option<f64> {
    v.filter(|s| s.is_finite() && *s > 0.0)
}

/// Expected seconds per candidate, or `None` while no speed is measured.
pub fn expected_seconds(cands: &[Candidate], demand: Demand) -> Option<Vec<f64>> {
    let decode_prior = median(cands.iter().map(|c| c.decode_tps))?;
    let prefill_prior = median(cands.iter().map(|c| c.prefill_tps))?;
    let service_prior = median(cands.iter().map(|c| c.service_s));
    Some(
        cands
            .iter()
            .map(|c| {
                let decode = usable(c.decode_tps).unwrap_or(decode_prior);
                let prefill = usable(c.prefill_tps).unwrap_or(prefill_prior);
                let output = demand.output_tokens / decode;
                let own = (demand.prompt_tokens - c.affinity_tokens).max(0.0) / prefill + output;
                let service = usable(c.service_s)
                    .or(service_prior)
                    .unwrap_or(demand.prompt_tokens / prefill + output);
                let cold = if c.warm { 0.0 } else { COLD_PENALTY };
                (f64::from(c.in_flight) + cold) * service + own
            })
            .collect(),
    )
}

/// `(in_flight + 1 + cold) / decode speed` per candidate: the load before prefill speeds are
/// known (unmeasured decode speeds get the median; none at all count as equal).
pub fn normalised_loads(cands: &[Candidate]) -> Vec<f64> {
    let prior = median(cands.iter().map(|c| c.decode_tps)).unwrap_or(1.0);
    cands
        .iter()
        .map(|c| {
            let speed = usable(c.decode_tps).unwrap_or(prior);
            let cold = if c.warm { 0.0 } else { COLD_PENALTY };
            (f64::from(c.in_flight) + 1.0 + cold) / speed
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A warm node with decode/prefill speeds and seconds per request.
    fn c(in_flight: u32, speeds: Option<(f64, f64, f64)>, affinity_tokens: f64) -> Candidate {
        Candidate {
            in_flight,
            warm: true,
            affinity_tokens,
            decode_tps: speeds.map(|s| s.0),
            prefill_tps: speeds.map(|s| s.1),
            service_s: speeds.map(|s| s.2),
        }
    }

    const NO_EXPLORE: Policy = Policy {
        explore: 0.0,
        affinity_slack: 1.0,
    };
    const CHAT: Demand = Demand {
        prompt_tokens: 300.0,
        output_tokens: 64.0,
    };

    #[test]
    fn a_fast_busy_gpu_beats_an_idle_cpu() {
        let gpu = Some((200.0, 5000.0, 0.5));
        let cpu = Some((20.0, 100.0, 6.0));
        let mut rng = Rng::new(1);
        let cands = [c(0, cpu, 0.0), c(2, gpu, 0.0)];
        assert_eq!(
            NO_EXPLORE.choose(&cands, CHAT, &mut rng),
            Some((1, Reason::Fastest))
        );
        // ... until it is loaded enough that the CPU is quicker.
        let cands = [c(0, cpu, 0.0), c(20, gpu, 0.0)];
        assert_eq!(
            NO_EXPLORE.choose(&cands, CHAT, &mut rng).map(|p| p.0),
            Some(0)
        );
    }

    #[test]
    fn a_cached_prefix_is_worth_waiting_for_but_not_forever() {
        let same = Some((50.0, 100.0, 1.0));
        let mut rng = Rng::new(7);
        // 280 of 300 prompt tokens cached: 2.8 s of prefill saved against 2 × 1 s of waiting.
        let cands = [c(0, same, 0.0), c(2, same, 280.0), c(0, same, 64.0)];
        assert_eq!(
            NO_EXPLORE.choose(&cands, CHAT, &mut rng).map(|p| p.0),
            Some(1)
        );
        let cands = [c(0, same, 0.0), c(4, same, 280.0)];
        assert_eq!(
            NO_EXPLORE.choose(&cands, CHAT, &mut rng).map(|p| p.0),
            Some(0)
        );
    }

    #[test]
    fn before_any_measurement_load_and_affinity_slack_decide() {
        let mut rng = Rng::new(7);
        let cands = [c(0, None, 0.0), c(1, None, 100.0)];
        assert_eq!(
            NO_EXPLORE.choose(&cands, CHAT, &mut rng),
            Some((1, Reason::Affinity)),
            "load 2 vs best 1 is within a slack of 1"
        );
        let cands = [c(0, None, 0.0), c(3, None, 100.0)];
        assert_eq!(
            NO_EXPLORE.choose(&cands, CHAT, &mut rng),
            Some((0, Reason::LeastLoaded))
        );
    }

    #[test]
    fn unmeasured_nodes_get_the_median_and_cold_ones_a_penalty() {
        let costs = expected_seconds(
            &[
                c(0, Some((10.0, 100.0, 1.0)), 0.0),
                c(0, None, 0.0),
                c(0, Some((30.0, 100.0, 1.0)), 0.0),
            ],
            CHAT,
        )
        .unwrap();
        assert_eq!(
            costs[1], costs[2],
            "the median of 10 and 30 is 30 (upper median)"
        );
        let mut cold = c(0, Some((50.0, 100.0, 1.0)), 0.0);
        cold.warm = false;
        let costs = expected_seconds(&[cold, c(3, Some((50.0, 100.0, 1.0)), 0.0)], CHAT).unwrap();
        assert!(costs[0] > costs[1], "{costs:?}");
    }

    #[test]
    fn idle_ties_spread_and_exploration_reaches_everyone() {
        let cands = vec![c(0, None, 0.0); 3];
        let mut rng = Rng::new(3);
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[NO_EXPLORE.choose(&cands, CHAT, &mut rng).unwrap().0] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
        let explore = Policy {
            explore: 0.5,
            affinity_slack: 1.0,
        };
        let cands = [
            c(0, Some((100.0, 1000.0, 1.0)), 0.0),
            c(5, Some((1.0, 10.0, 9.0)), 0.0),
        ];
        let picks: Vec<_> = (0..200)
            .map(|_| explore.choose(&cands, CHAT, &mut rng).unwrap())
            .collect();
        assert!(picks.contains(&(1, Reason::Explore)));
        assert!(!picks.contains(&(1, Reason::Fastest)));
        assert_eq!(NO_EXPLORE.choose(&[], CHAT, &mut rng), None);
    }
}

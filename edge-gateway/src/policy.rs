//! Placement: which of the nodes that may serve a request gets it.
//!
//! The hard filters (model served, device compatible, preference, node healthy) run before this
//! module; it only ranks what is left:
//!
//! 1. **Load normalised by speed.** A candidate's load is `(in_flight + 1 + cold) / speed`:
//!    the requests the gateway has in flight on it (counted at the edge, so exact and fresh)
//!    plus this one, plus a penalty of [`COLD_PENALTY`] requests when the model is not warm
//!    there, divided by the decode speed the gateway measured on that node for this model
//!    (tokens/s from the `timings` of real answers). A node with no measurement yet gets the
//!    median of the measured ones, so a new node is tried rather than starved. A GPU that
//!    decodes 10× faster than a CPU box thus still wins with several requests in flight.
//! 2. **Prefix affinity.** The node that last served the longest prefix of this prompt (see
//!    `affinity.rs`) likely still holds its KV cache; it wins while its load is at most
//!    `1 + affinity_slack` times the best load. Beyond that, recomputing the prefix elsewhere
//!    is cheaper than queueing behind it.
//! 3. **Exploration.** With probability `explore` the pick is uniform among the candidates, so
//!    speeds stay measured on every node. Among equal loads the pick is random too, which
//!    spreads idle traffic like round-robin.

/// A node that passed the hard filters, as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Requests the gateway has in flight on this node.
    pub in_flight: u32,
    /// Measured decode speed of this model there (tokens/s), if any.
    pub decode_tps: Option<f64>,
    /// Whether the model is warm there.
    pub warm: bool,
    /// Bytes of this prompt's prefix last served there (0: none).
    pub affinity_bytes: usize,
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
    pub fn choose(&self, cands: &[Candidate], rng: &mut Rng) -> Option<(usize, Reason)> {
        match cands.len() {
            0 => return None,
            1 => return Some((0, Reason::Only)),
            _ => {}
        }
        if self.explore > 0.0 && rng.unit() < self.explore {
            return Some((rng.below(cands.len()), Reason::Explore));
        }
        let loads = normalised_loads(cands);
        let best = loads.iter().copied().fold(f64::INFINITY, f64::min);
        let affine = (0..cands.len())
            .filter(|&i| cands[i].affinity_bytes > 0)
            .max_by(|&a, &b| {
                cands[a]
                    .affinity_bytes
                    .cmp(&cands[b].affinity_bytes)
                    .then(loads[b].total_cmp(&loads[a]))
            });
        if let Some(a) = affine {
            if loads[a] <= best * (1.0 + self.affinity_slack) + 1e-9 {
                return Some((a, Reason::Affinity));
            }
        }
        let ties: Vec<usize> = (0..cands.len())
            .filter(|&i| loads[i] <= best * (1.0 + 1e-9))
            .collect();
        Some((ties[rng.below(ties.len())], Reason::LeastLoaded))
    }
}

/// `(in_flight + 1 + cold) / speed` per candidate; unmeasured speeds get the median.
pub fn normalised_loads(cands: &[Candidate]) -> Vec<f64> {
    let mut known: Vec<f64> = cands
        .iter()
        .filter_map(|c| c.decode_tps)
        .filter(|s| s.is_finite() && *s > 0.0)
        .collect();
    known.sort_by(f64::total_cmp);
    let prior = if known.is_empty() {
        1.0
    } else {
        known[known.len() / 2]
    };
    cands
        .iter()
        .map(|c| {
            let speed = c
                .decode_tps
                .filter(|s| s.is_finite() && *s > 0.0)
                .unwrap_or(prior);
            let cold = if c.warm { 0.0 } else { COLD_PENALTY };
            (f64::from(c.in_flight) + 1.0 + cold) / speed
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(in_flight: u32, tps: Option<f64>, affinity_bytes: usize) -> Candidate {
        Candidate {
            in_flight,
            decode_tps: tps,
            warm: true,
            affinity_bytes,
        }
    }

    const NO_EXPLORE: Policy = Policy {
        explore: 0.0,
        affinity_slack: 1.0,
    };

    #[test]
    fn a_fast_busy_gpu_beats_an_idle_cpu() {
        let cands = [c(0, Some(20.0), 0), c(2, Some(200.0), 0)];
        let mut rng = Rng::new(1);
        assert_eq!(
            NO_EXPLORE.choose(&cands, &mut rng),
            Some((1, Reason::LeastLoaded))
        );
        // ... until it is loaded enough that the CPU is quicker.
        let cands = [c(0, Some(20.0), 0), c(12, Some(200.0), 0)];
        assert_eq!(NO_EXPLORE.choose(&cands, &mut rng).map(|p| p.0), Some(0));
    }

    #[test]
    fn affinity_wins_within_the_slack_only() {
        let mut rng = Rng::new(7);
        let cands = [
            c(0, Some(50.0), 0),
            c(1, Some(50.0), 640),
            c(0, Some(50.0), 64),
        ];
        assert_eq!(
            NO_EXPLORE.choose(&cands, &mut rng),
            Some((1, Reason::Affinity)),
            "load 2 vs best 1 is within a slack of 1"
        );
        let cands = [c(0, Some(50.0), 0), c(3, Some(50.0), 640)];
        assert_eq!(
            NO_EXPLORE.choose(&cands, &mut rng),
            Some((0, Reason::LeastLoaded)),
            "load 4 vs 1: recomputing the prefix elsewhere is cheaper"
        );
        // The longest match wins among several.
        let cands = [c(0, Some(50.0), 128), c(0, Some(50.0), 256)];
        assert_eq!(NO_EXPLORE.choose(&cands, &mut rng).map(|p| p.0), Some(1));
    }

    #[test]
    fn unmeasured_nodes_get_the_median_and_cold_ones_a_penalty() {
        let loads = normalised_loads(&[c(0, Some(10.0), 0), c(0, None, 0), c(0, Some(30.0), 0)]);
        assert_eq!(loads[1], 1.0 / 30.0);
        let mut cold = c(0, Some(10.0), 0);
        cold.warm = false;
        let loads = normalised_loads(&[cold, c(3, Some(10.0), 0)]);
        assert!(loads[0] > loads[1], "{loads:?}");
    }

    #[test]
    fn idle_ties_spread_and_exploration_reaches_everyone() {
        let cands = vec![c(0, None, 0); 3];
        let mut rng = Rng::new(3);
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[NO_EXPLORE.choose(&cands, &mut rng).unwrap().0] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
        let explore = Policy {
            explore: 0.5,
            affinity_slack: 1.0,
        };
        let cands = [c(0, Some(100.0), 0), c(5, Some(1.0), 0)];
        let picks: Vec<_> = (0..200)
            .map(|_| explore.choose(&cands, &mut rng).unwrap())
            .collect();
        assert!(picks.contains(&(1, Reason::Explore)));
        assert!(!picks.contains(&(1, Reason::LeastLoaded)));
        assert_eq!(NO_EXPLORE.choose(&[], &mut rng), None);
    }
}

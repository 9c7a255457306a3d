//! What the kernel benches share.

use std::time::Instant;

/// The median time of `f` in µs, over at least five runs and then as many as fit in
/// `budget_s` (at most 2,000), after one warm-up run.
pub fn median_us(mut f: impl FnMut(), budget_s: f64) -> f64 {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed().as_secs_f64() < budget_s && times.len() < 2000) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

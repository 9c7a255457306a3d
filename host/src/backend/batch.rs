//! Every forward pass of one model goes through here. Single-token `compute` calls (decode
//! steps) that arrive from different execution contexts at about the same time run as one
//! batched pass, without changing guests (each stays a simple sequential loop); a prompt
//! chunk runs alone. One pass at a time per model: concurrent passes would only fight over
//! the same cores (candle's thread pool spins), which measured 4x slower than taking turns.
//!
//! No scheduler thread: the first caller to find no pass running becomes the leader, takes
//! the next batch from the queue (its own request or not), runs it and hands out the results;
//! the others wait on a condition variable. While a pass runs, the next batch queues up.
//!
//! A leader waits (briefly) for every sequence that decoded in the last [`LIVE_PASSES`]
//! passes, not for the size of the last batch: the size of the last batch is self-confirming,
//! so two sequences that once fell out of step (one sampling while the other's pass ran) kept
//! taking turns in passes of one forever, and two streams decoded slower than one.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::kv_cache::KvCache;
use super::{plain_message, CausalLm};

/// Most sequences in one pass.
const MAX_BATCH: usize = 16;
/// How long a leader waits for the live sequences to come back before it runs a smaller
/// batch (a guest samples and calls again within about a millisecond).
const GATHER_WAIT: Duration = Duration::from_millis(2);
/// A sequence counts as live (worth waiting for) this many passes after its last decode
/// step: two, so that two sequences taking turns see each other. A finished sequence costs
/// one wait at most (for the pass after its last).
const LIVE_PASSES: u64 = 2;

struct Request {
    id: u64,
    seq: u64,
    tokens: Vec<u32>,
    cache: KvCache,
}

type Outcome = (KvCache, Result<Vec<f32>, String>);

#[derive(Default)]
struct State {
    queue: Vec<Request>,
    done: HashMap<u64, Outcome>,
    running: bool,
    next_id: u64,
    /// Passes run so far.
    passes: u64,
    /// The pass of each recent sequence's last decode step.
    live: HashMap<u64, u64>,
}

impl State {
    /// Sequences that decoded in the last [`LIVE_PASSES`] passes: the batch to wait for.
    fn live(&self) -> usize {
        self.live.len().min(MAX_BATCH)
    }

    /// Records a decode pass of `seqs`, forgetting sequences that stopped decoding.
    fn decoded(&mut self, seqs: impl Iterator<Item = u64>) {
        self.passes += 1;
        let pass = self.passes;
        for seq in seqs {
            self.live.insert(seq, pass);
        }
        self.live.retain(|_, last| pass - *last < LIVE_PASSES);
    }
}

/// The meeting point of one model's decode steps.
#[derive(Default)]
pub struct Batcher {
    state: Mutex<State>,
    ready: Condvar,
}

impl Batcher {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `tokens` to sequence `seq` (a caller's id for it), whose `cache` is moved in
    /// and handed back, and returns the logits after the last; one token is batched with
    /// whatever other sequences decode at the same time.
    pub fn forward(
        &self,
        model: &dyn CausalLm,
        seq: u64,
        tokens: &[u32],
        cache: KvCache,
    ) -> Outcome {
        let mut s = self.lock();
        let id = s.next_id;
        s.next_id += 1;
        s.queue.push(Request {
            id,
            seq,
            tokens: tokens.to_vec(),
            cache,
        });
        // A leader gathering a batch waits for this.
        self.ready.notify_all();
        loop {
            if let Some(out) = s.done.remove(&id) {
                return out;
            }
            if s.running {
                s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Lead the next pass. `running` is set before gathering so no second leader
            // starts while this one waits for the last batch's sequences to come back.
            s.running = true;
            let deadline = Instant::now() + GATHER_WAIT;
            while decodes(&s.queue) < s.live() && decodes(&s.queue) > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                s = self
                    .ready
                    .wait_timeout(s, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            let batch = next_batch(&mut s.queue);
            if batch.is_empty() {
                // Unreachable while this caller's own request is queued; never spin on it.
                s.running = false;
                self.ready.notify_all();
                s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            if batch[0].tokens.len() == 1 {
                s.decoded(batch.iter().map(|r| r.seq));
            }
            drop(s);
            let results = run(model, batch);
            s = self.lock();
            s.done.extend(results);
            s.running = false;
            self.ready.notify_all();
        }
    }
}

/// Queued decode steps.
fn decodes(queue: &[Request]) -> usize {
    queue.iter().filter(|r| r.tokens.len() == 1).count()
}

/// The next pass: the oldest request if it is a prompt chunk, else up to [`MAX_BATCH`]
/// decode steps in arrival order.
fn next_batch(queue: &mut Vec<Request>) -> Vec<Request> {
    match queue.first() {
        None => Vec::new(),
        Some(r) if r.tokens.len() != 1 => vec![queue.remove(0)],
        Some(_) => {
            let mut batch = Vec::new();
            let mut i = 0;
            while i < queue.len() && batch.len() < MAX_BATCH {
                if queue[i].tokens.len() == 1 {
                    batch.push(queue.remove(i));
                } else {
                    i += 1;
                }
            }
            batch
        }
    }
}

/// Runs one pass; a failed pass fails each of its requests with the same message.
fn run(model: &dyn CausalLm, mut batch: Vec<Request>) -> Vec<(u64, Outcome)> {
    let tokens: Vec<u32> = batch
        .iter()
        .flat_map(|r| r.tokens.iter().copied())
        .collect();
    let result = {
        let mut caches: Vec<&mut KvCache> = batch.iter_mut().map(|r| &mut r.cache).collect();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if caches.len() == 1 {
                model.forward(&tokens, caches[0]).map(|l| vec![l])
            } else {
                model.forward_batch(&tokens, &mut caches)
            }
        }))
    };
    let result = match result {
        Ok(Ok(logits)) if logits.len() == batch.len() => Ok(logits),
        Ok(Ok(_)) => Err("batched forward pass returned the wrong number of rows".to_string()),
        Ok(Err(e)) => Err(format!("forward pass: {}", plain_message(&e))),
        Err(_) => Err("forward pass panicked".to_string()),
    };
    match result {
        Ok(logits) => batch
            .into_iter()
            .zip(logits)
            .map(|(r, l)| (r.id, (r.cache, Ok(l))))
            .collect(),
        Err(e) => batch
            .into_iter()
            .map(|r| (r.id, (r.cache, Err(e.clone()))))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose passes take `PASS` and record how many sequences they held.
    #[derive(Default)]
    struct Recorder {
        sizes: Mutex<Vec<usize>>,
    }

    const PASS: Duration = Duration::from_millis(3);

    impl CausalLm for Recorder {
        fn forward(&self, _: &[u32], _: &mut KvCache) -> candle_core::Result<Vec<f32>> {
            let mut rows = self.forward_batch(&[0], &mut [])?;
            Ok(rows.remove(0))
        }
        fn forward_batch(
            &self,
            tokens: &[u32],
            _: &mut [&mut KvCache],
        ) -> candle_core::Result<Vec<Vec<f32>>> {
            std::thread::sleep(PASS);
            self.sizes.lock().unwrap().push(tokens.len());
            Ok(vec![vec![0.0]; tokens.len()])
        }
        fn new_cache(&self, _: usize) -> KvCache {
            KvCache::new(0, 0)
        }
        fn vocab_size(&self) -> usize {
            1
        }
    }

    /// Two sequences that start out of step (the second arrives while the first one's pass
    /// runs) and then decode in lockstep, each "sampling" for a while between steps, must end
    /// up sharing passes instead of taking turns.
    #[test]
    fn sequences_out_of_step_fall_into_one_batch() {
        let model = Recorder::default();
        let batcher = Batcher::default();
        const STEPS: usize = 40;
        std::thread::scope(|s| {
            for seq in 0..2u64 {
                let (model, batcher) = (&model, &batcher);
                s.spawn(move || {
                    if seq == 1 {
                        std::thread::sleep(PASS / 2);
                    }
                    for _ in 0..STEPS {
                        let (_, out) = batcher.forward(model, seq, &[1], KvCache::new(0, 0));
                        assert!(out.is_ok());
                        // The guest samples and streams its token.
                        std::thread::sleep(Duration::from_micros(300));
                    }
                });
            }
        });
        let sizes = model.sizes.lock().unwrap();
        let paired = sizes.iter().filter(|&&n| n == 2).count();
        assert_eq!(sizes.iter().sum::<usize>(), 2 * STEPS);
        // Taking turns would run ~2 · STEPS passes of one; a few passes may still run alone
        // on a loaded machine (a sleep past the gather wait).
        assert!(
            paired >= STEPS / 2,
            "{paired} of {} passes held both sequences: {sizes:?}",
            sizes.len()
        );
    }
}

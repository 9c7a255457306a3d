//! Every forward pass of one model goes through here. Single-token `compute` calls (decode
//! steps) that arrive from different execution contexts at about the same time run as one
//! batched pass, without changing guests (each stays a simple sequential loop); a prompt
//! chunk runs alone. One pass at a time per model: concurrent passes would only fight over
//! the same cores (candle's thread pool spins), which measured 4x slower than taking turns.
//!
//! No scheduler thread: the first caller to find no pass running becomes the leader, takes
//! the next batch from the queue (its own request or not), runs it and hands out the results;
//! the others wait on a condition variable. While a pass runs, the next batch queues up.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::kv_cache::KvCache;
use super::{plain_message, CausalLm};

/// Most sequences in one pass.
const MAX_BATCH: usize = 16;
/// How long a leader waits for the sequences of the previous batch to come back before it
/// runs a smaller batch (a guest samples and calls again within about a millisecond).
const GATHER_WAIT: Duration = Duration::from_millis(2);

struct Request {
    id: u64,
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
    /// Size of the last batch: how many sequences are decoding together.
    last_batch: usize,
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

    /// Appends `tokens` to the sequence in `cache` (moved in and handed back) and returns the
    /// logits after the last; one token is batched with whatever other sequences decode at the
    /// same time.
    pub fn forward(&self, model: &dyn CausalLm, tokens: &[u32], cache: KvCache) -> Outcome {
        let mut s = self.lock();
        let id = s.next_id;
        s.next_id += 1;
        s.queue.push(Request {
            id,
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
            while decodes(&s.queue) < s.last_batch.min(MAX_BATCH) && decodes(&s.queue) > 0 {
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
                s.last_batch = batch.len();
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

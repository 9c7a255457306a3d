//! Stop strings: text is held back while it could still be the start of a stop string.

/// Watches generated text for stop strings.
pub struct StopMatcher {
    stops: Vec<String>,
    /// Whether the stop string itself is emitted (vLLM's `include_stop_str_in_output`).
    include: bool,
    held: String,
}

/// What one piece of text produced.
pub struct StopOutcome {
    /// Text that is safe to emit.
    pub emit: String,
    /// The stop string that was found; `emit` ends right before it, or right after it when
    /// the matcher includes stop strings.
    pub stopped: Option<String>,
}

impl StopMatcher {
    /// A matcher for these stop strings (empty ones are ignored); `include` keeps the stop
    /// string that ends the text.
    pub fn new(stops: &[String], include: bool) -> Self {
        let stops = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        Self {
            stops,
            include,
            held: String::new(),
        }
    }

    /// Adds generated text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.held.push_str(text);
        // The earliest occurrence wins; at one position, the first stop string listed.
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| Some((self.held.find(s.as_str())?, s)))
            .min_by_key(|&(at, _)| at);
        if let Some((at, stop)) = first_stop {
            let end = if self.include { at + stop.len() } else { at };
            let emit = self.held[..end].to_string();
            let stopped = Some(stop.clone());
            self.held.clear();
            return StopOutcome { emit, stopped };
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let emit = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopOutcome {
            emit,
            stopped: None,
        }
    }

    /// The held-back text, once generation ended for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let (out, stop) = run_with(stops, false, pieces);
        (out, stop.is_some())
    }

    fn run_with(stops: &[&str], include: bool, pieces: &[&str]) -> (String, Option<String>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops, include);
        let mut out = String::new();
        for p in pieces {
            let o = m.push(p);
            out.push_str(&o.emit);
            if o.stopped.is_some() {
                return (out, o.stopped);
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    #[test]
    fn stops_across_pieces() {
        assert_eq!(
            run(&["\n\n"], &["Hello", "\n", "\nWorld"]),
            ("Hello".into(), true)
        );
        assert_eq!(
            run(&["END"], &["abc E", "N", "D more"]),
            ("abc ".into(), true)
        );
    }

    #[test]
    fn releases_false_starts() {
        assert_eq!(run(&["END"], &["E", "N", "x", "!"]), ("ENx!".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn earliest_stop_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
    }

    #[test]
    fn names_the_stop_that_matched_and_may_keep_it() {
        assert_eq!(
            run_with(&["b", "a"], false, &["xx", "ab"]),
            ("xx".into(), Some("a".into()))
        );
        // At one position the first listed wins.
        assert_eq!(
            run_with(&["ab", "a"], true, &["xxab tail"]),
            ("xxab".into(), Some("ab".into()))
        );
        assert_eq!(
            run_with(&["a", "ab"], true, &["x", "a", "b"]),
            ("xa".into(), Some("a".into()))
        );
    }
}

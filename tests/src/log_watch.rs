//! A child process's stderr copied to its log file line by line, so a test can wait for a line
//! to appear (an event: the copier wakes the waiter) instead of polling the process.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::ChildStderr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Lines {
    seen: Vec<String>,
    /// The process closed its stderr (it ended).
    closed: bool,
}

/// The lines a process has written to stderr so far.
#[derive(Clone, Default)]
pub struct LogWatch {
    lines: Arc<(Mutex<Lines>, Condvar)>,
}

impl LogWatch {
    /// Copies `stderr` to `log` (appending) on a thread of its own, line by line.
    pub fn start(stderr: ChildStderr, log: &Path) -> Self {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let watch = LogWatch::default();
        let lines = watch.lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                let (seen, changed) = &*lines;
                seen.lock().unwrap().seen.push(line);
                changed.notify_all();
            }
            let (seen, changed) = &*lines;
            seen.lock().unwrap().closed = true;
            changed.notify_all();
        });
        watch
    }

    /// How many lines there are so far: pass it to [`Self::wait_for`] to wait for a line
    /// written after now.
    pub fn count(&self) -> usize {
        self.lines.0.lock().unwrap().seen.len()
    }

    /// Waits until a line after the first `after` contains `text`; false if the process ended
    /// or `timeout` passed first.
    pub fn wait_for(&self, text: &str, after: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (lines, changed) = &*self.lines;
        let mut state = lines.lock().unwrap();
        loop {
            if state
                .seen
                .iter()
                .skip(after)
                .any(|line| line.contains(text))
            {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            if state.closed {
                return false;
            }
            state = changed.wait_timeout(state, left).unwrap().0;
        }
    }
}

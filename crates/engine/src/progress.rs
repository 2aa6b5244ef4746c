//! Progress of long work (convert, synthetic models, perplexity, loading): the engine reports
//! through this trait and never draws anything itself, so it does not depend on a terminal
//! library; the CLI implements it with progress bars on stderr.

/// Receives the progress of one piece of work. All methods default to doing nothing, so `()`
/// is the silent implementation.
pub trait Progress: Sync {
    /// A phase of `total` units begins (bytes for convert and synth, tokens for perplexity,
    /// layers for loading); `label` names it.
    fn start(&self, _total: u64, _label: &str) {}
    /// `n` more units are done. Returning false asks the work to stop (where it can be
    /// cancelled: convert and synth leave their `.partial` output behind and return an error).
    fn inc(&self, _n: u64) -> bool {
        true
    }
    /// What is being worked on now, e.g. `layer 3/40`.
    fn message(&self, _msg: &str) {}
    /// The phase ended (successfully or not).
    fn finish(&self) {}
}

impl Progress for () {}

//! flashmoe tools that are not part of the inference runtime: benchmarks (`bench`), random-weight
//! packed models at real geometries (`synth`) and routing-trace statistics with cache-policy
//! simulation (`routing_stats`). The `flashmoe` CLI drives them.

pub mod bench;
pub mod routing_stats;
pub mod synth;

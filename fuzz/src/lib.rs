//! Shared by the fuzz targets: their bodies (see `bodies`).
pub mod bodies;

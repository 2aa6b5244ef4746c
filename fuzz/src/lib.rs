//! Shared by the fuzz targets: their bodies (see `bodies`).
pub mod api_bodies;
pub mod bodies;

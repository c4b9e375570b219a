//! Test helpers for virtio-rng: the shared ones (`crate::virtio::testing`).

pub use crate::virtio::testing::*;

#![allow(clippy::unwrap_used)]
//! End-to-end: the real stages, in process, on the smoke pipeline (600 real Fashion-MNIST
//! training images, 200 test images). Needs the dataset (`just data`).

mod between;
mod compact;
mod experiments;
mod export;
mod fixture;
mod hostile;
mod labels;
mod photos;
mod pipeline;
mod predict;
mod refusals;
mod reproducible;
mod shards;
mod standalone;
mod views;

//! kd-precompute

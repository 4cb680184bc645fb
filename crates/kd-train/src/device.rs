//! Where a stage computes: `device = "cpu" | "cuda" | "cuda:N" | "auto"` in the pipeline file
//! (one key for every stage) or `--device` on any stage binary.
//!
//! `auto` takes the GPU when the binary was built with `--features cuda` and one answers, else
//! the CPU. A stage asked for a device its binary was not built for refuses with a message that
//! says how to build one that is.

use crate::TrainError;
use candle_core::Device;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    Cpu,
    /// `cuda` is `cuda:0`.
    Cuda(usize),
    #[default]
    Auto,
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!("device {other:?}: expected \"cpu\", \"cuda\", \"cuda:N\" or \"auto\"")
                }),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for DeviceChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The device this process computes on, by name, once a stage opened it (manifests record it).
static OPENED: OnceLock<String> = OnceLock::new();

/// What manifests written before devices were recorded computed on.
pub fn cpu() -> String {
    "cpu".to_string()
}

/// [`DeviceChoice::open`]'s device by name (`cpu` until a stage opened another).
pub fn opened() -> String {
    OPENED.get().cloned().unwrap_or_else(|| "cpu".to_string())
}

impl DeviceChoice {
    /// The device, opened: a CUDA device is created once per process and ordinal.
    pub fn open(self) -> Result<Device, TrainError> {
        let device = match self {
            Self::Cpu => Device::Cpu,
            Self::Cuda(n) if !kd_models::device::CUDA_BUILT => {
                return Err(TrainError::Other(format!(
                    "device cuda:{n}: this binary was built without CUDA; build with `just build-cuda` (cargo build --release --features cuda), or set device = \"cpu\""
                )))
            }
            Self::Cuda(n) => kd_models::device::open_cuda(n).map_err(|e| {
                TrainError::Other(format!("device cuda:{n}: no usable GPU ({e})"))
            })?,
            Self::Auto if kd_models::device::cuda_driver_present() => {
                kd_models::device::open_cuda(0).unwrap_or(Device::Cpu)
            }
            Self::Auto => Device::Cpu,
        };
        let name = kd_models::device::describe(&device);
        if OPENED.set(name.clone()).is_ok() {
            tracing::info!("device: {name} (device = {self})");
        }
        Ok(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print_back() {
        for s in ["cpu", "auto", "cuda:0", "cuda:3"] {
            assert_eq!(s.parse::<DeviceChoice>().unwrap().to_string(), s);
        }
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(0)));
        let err = "tpu".parse::<DeviceChoice>().unwrap_err();
        assert!(err.contains("\"tpu\"") && err.contains("cuda:N"), "{err}");
    }

    #[test]
    fn a_cpu_build_refuses_cuda_and_runs_auto_on_the_cpu() {
        if kd_models::device::CUDA_BUILT {
            return;
        }
        let err = DeviceChoice::Cuda(0).open().unwrap_err().to_string();
        assert!(
            err.contains("built without CUDA") && err.contains("just build-cuda"),
            "{err}"
        );
        assert!(DeviceChoice::Auto.open().unwrap().is_cpu());
    }
}

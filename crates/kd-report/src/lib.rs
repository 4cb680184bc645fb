//! kd-report

//! kd-teacher

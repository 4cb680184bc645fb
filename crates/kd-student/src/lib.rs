//! kd-student

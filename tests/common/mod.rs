//! Test harness shared by the integration tests: real components started on
//! 127.0.0.1 ephemeral ports and stopped by PID when dropped.
#![allow(dead_code)]

pub mod berth;
pub mod containerd;
pub mod content;
pub mod hub;
pub mod origin;
pub mod proxy;
pub mod skopeo;
pub mod token;
pub mod tools;

//! Integration tests of the control plane: in-process clusters over an in-memory
//! transport that can cut nodes off, restarts from the same directories, and openraft's
//! storage test suite. One binary, so the build stays fast.

mod cluster_basic;
mod cluster_failover;
mod cluster_restart;
mod cluster_witness;
mod golden;
mod storage_files;
mod storage_suite;
mod support;

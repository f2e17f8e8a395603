//! Real `hivemind` processes on loopback: the launcher lives in `hivemind-testkit`
//! ([`hivemind_testkit::cluster`]) so that the server's tests can share it; re-exported here
//! under its old path.

pub use hivemind_testkit::cluster::*;

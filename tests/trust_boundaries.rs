//! What a guest, a socket user and a TCP client cannot do: each abuse is sent to the real daemon
//! (its real handlers; the fake backend where no VM is needed, its guests played by the test) and
//! must be refused with the other jobs and the host's files untouched.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

#[path = "trust/control.rs"]
mod control;
#[path = "trust/guest_abuse.rs"]
mod guest_abuse;
#[path = "trust/guest_basics.rs"]
mod guest_basics;
#[path = "trust/repos.rs"]
mod repos;

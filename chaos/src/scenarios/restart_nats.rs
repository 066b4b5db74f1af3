//! restart-nats: kill-nats with a clean restart: nats-server gets SIGTERM
//! (as `systemctl restart` sends) while a backup runs or at its commit, and
//! is started again on the same port and store after a random pause. The
//! pass criteria are kill-nats's.

use anyhow::Result;

use super::kill_nats::{trial, Stop};
use crate::trial::{Outcome, Trial};

pub(super) fn run(t: &mut Trial) -> Result<Outcome> {
    trial(t, Stop::Clean)
}

//! SandboxActor: owns one job's VM for its whole life by running the job's lifecycle. If it dies
//! without finishing (a panic anywhere in the lifecycle), its drop guard tells the Supervisor,
//! which restarts it under the restart policy.

use std::sync::Arc;

use actix::prelude::*;

use super::lifecycle::{self, Outcome, Signals};
use super::Services;

/// How a SandboxActor ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Finished,
    Suspended,
    /// It panicked or its lifecycle hit an error it could not record.
    Crashed(String),
}

#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct SandboxExited {
    pub job_id: String,
    pub exit: Exit,
}

#[derive(Debug)]
pub struct SandboxActor {
    svc: Arc<Services>,
    job_id: String,
    signals: Arc<Signals>,
    supervisor: Recipient<SandboxExited>,
    reported: bool,
}

impl SandboxActor {
    pub fn new(
        svc: Arc<Services>,
        job_id: String,
        signals: Arc<Signals>,
        supervisor: Recipient<SandboxExited>,
    ) -> Self {
        SandboxActor {
            svc,
            job_id,
            signals,
            supervisor,
            reported: false,
        }
    }

    fn report(&mut self, exit: Exit) {
        if !self.reported {
            self.reported = true;
            self.supervisor.do_send(SandboxExited {
                job_id: self.job_id.clone(),
                exit,
            });
        }
    }
}

impl Actor for SandboxActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let run = lifecycle::drive(
            Arc::clone(&self.svc),
            self.job_id.clone(),
            Arc::clone(&self.signals),
        );
        ctx.spawn(run.into_actor(self).map(|result, actor, ctx| {
            let exit = match result {
                Ok(Outcome::Finished) => Exit::Finished,
                Ok(Outcome::Suspended) => Exit::Suspended,
                Err(err) => {
                    tracing::error!(job = %actor.job_id, %err, "lifecycle failed on the store");
                    Exit::Crashed(err.to_string())
                }
            };
            actor.report(exit);
            ctx.stop();
        }));
    }
}

impl Drop for SandboxActor {
    fn drop(&mut self) {
        // Reached without a report only when the lifecycle future was torn down mid-way: a panic.
        self.report(Exit::Crashed("the sandbox actor panicked".into()));
    }
}

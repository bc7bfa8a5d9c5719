//! The lease collector: every `intervals.lease_gc` it ends sandboxes whose lease ran out. A job
//! still running is stopped through the Supervisor (TIMEOUT, "lease expired"), which destroys its
//! VM; a kept sandbox of a finished job is destroyed directly.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use super::lifecycle::destroy_sandbox;
use super::supervisor::{CancelJob, Supervisor};
use super::Services;
use crate::model::JobStatus;

#[derive(Debug)]
pub struct LeaseCollector {
    svc: Arc<Services>,
    supervisor: Addr<Supervisor>,
}

#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CollectNow;

impl LeaseCollector {
    pub fn new(svc: Arc<Services>, supervisor: Addr<Supervisor>) -> Self {
        LeaseCollector { svc, supervisor }
    }

    fn schedule(&self, ctx: &mut Context<Self>) {
        let every = self.svc.tuning.get().intervals.lease_gc;
        ctx.run_later(every, |collector, ctx| {
            ctx.notify(CollectNow);
            collector.schedule(ctx);
        });
    }
}

impl Actor for LeaseCollector {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Self::Context) {
        self.schedule(ctx);
    }
}

impl Handler<CollectNow> for LeaseCollector {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: CollectNow, _: &mut Self::Context) -> Self::Result {
        let svc = Arc::clone(&self.svc);
        let supervisor = self.supervisor.clone();
        Box::pin(async move {
            let started = Instant::now();
            if let Err(err) = collect(&svc, &supervisor).await {
                tracing::error!(%err, "lease collection failed");
            }
            svc.metrics
                .lease_gc_duration
                .observe(started.elapsed().as_secs_f64());
        })
    }
}

async fn collect(
    svc: &Services,
    supervisor: &Addr<Supervisor>,
) -> Result<(), crate::store::StoreError> {
    let now = svc.clock.now_ms();
    let expired = svc
        .store
        .call(move |s| {
            let sandboxes = s.expired_sandboxes(now)?;
            sandboxes
                .into_iter()
                .map(|sb| Ok((s.get_job(&sb.job_id)?.map(|j| j.status), sb)))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    for (status, sandbox) in expired {
        match status {
            Some(status) if !status.is_terminal() => {
                tracing::info!(job = %sandbox.job_id, "lease expired; stopping the job");
                let cancel = CancelJob {
                    job_id: sandbox.job_id.clone(),
                    status: JobStatus::Timeout,
                    reason: "lease expired".into(),
                };
                if let Ok(Err(err)) = supervisor.send(cancel).await {
                    tracing::warn!(job = %sandbox.job_id, %err, "stopping an expired job failed");
                }
            }
            _ => {
                tracing::info!(sandbox = %sandbox.id, "lease expired; destroying");
                if let Err(err) = destroy_sandbox(svc, &sandbox).await {
                    tracing::warn!(sandbox = %sandbox.id, %err, "destroying an expired sandbox failed");
                }
            }
        }
    }
    Ok(())
}

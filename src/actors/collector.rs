//! The lease collector: every `intervals.lease_gc` it destroys KEPT sandboxes whose lease ran
//! out. A lease counts only once a sandbox is kept after its job; a running job is limited by its
//! run timeout, never by its lease, so the collector never stops a job.

use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;

use super::lifecycle::destroy_sandbox;
use super::Services;

#[derive(Debug)]
pub struct LeaseCollector {
    svc: Arc<Services>,
}

#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct CollectNow;

impl LeaseCollector {
    pub fn new(svc: Arc<Services>) -> Self {
        LeaseCollector { svc }
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
        Box::pin(async move {
            let started = Instant::now();
            if let Err(err) = collect(&svc).await {
                tracing::error!(%err, "lease collection failed");
            }
            svc.metrics
                .lease_gc_duration
                .observe(started.elapsed().as_secs_f64());
        })
    }
}

async fn collect(svc: &Services) -> Result<(), crate::store::StoreError> {
    let now = svc.clock.now_ms();
    let expired = svc
        .store
        .call(move |s| s.expired_kept_sandboxes(now))
        .await?;
    for sandbox in expired {
        let id = sandbox.id.clone();
        // Claimed in the store first: a renew that came in since the listing wins.
        if !svc
            .store
            .call(move |s| s.begin_lease_expiry(&id, now))
            .await?
        {
            continue;
        }
        tracing::info!(sandbox = %sandbox.id, "lease expired; destroying the kept sandbox");
        if let Err(err) = destroy_sandbox(svc, &sandbox).await {
            tracing::warn!(sandbox = %sandbox.id, %err, "destroying an expired sandbox failed; the reconciler retries");
        }
    }
    Ok(())
}

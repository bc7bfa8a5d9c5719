//! In-process fan-out of what the store records: a broadcast of every event (for followers of a
//! job's event stream) and a wake-up per job (for the actor waiting on its guest).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, Notify};

use crate::model::Event;

#[derive(Debug)]
pub struct Hub {
    events: broadcast::Sender<Event>,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Default for Hub {
    fn default() -> Self {
        let (events, _) = broadcast::channel(4096);
        Hub {
            events,
            wakers: Mutex::new(HashMap::new()),
        }
    }
}

impl Hub {
    pub fn publish(&self, event: Event) {
        // No receivers is normal: nobody follows this job.
        let _ = self.events.send(event);
    }

    pub fn publish_all(&self, events: impl IntoIterator<Item = Event>) {
        for event in events {
            self.publish(event);
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The wake-up a job's lifecycle waits on. `notify_one` keeps a permit, so a report that
    /// arrives between the actor's check and its wait is not lost.
    pub fn waker(&self, job_id: &str) -> Arc<Notify> {
        let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(wakers.entry(job_id.to_owned()).or_default())
    }

    pub fn wake(&self, job_id: &str) {
        self.waker(job_id).notify_one();
    }

    pub fn forget(&self, job_id: &str) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|p| p.into_inner());
        wakers.remove(job_id);
    }
}

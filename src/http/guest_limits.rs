//! How many guest API requests one job may have in flight at once. A handler takes a permit once
//! the token says which job is calling; past the limit the request is refused at once (429), never
//! queued, so a guest that floods the API or holds bodies open only slows itself down. A job's
//! count exists only while it has requests in flight.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

#[derive(Debug)]
pub struct GuestLimits {
    per_job: usize,
    in_flight: Mutex<HashMap<String, usize>>,
}

impl GuestLimits {
    pub fn new(per_job: usize) -> GuestLimits {
        GuestLimits {
            per_job,
            in_flight: Mutex::default(),
        }
    }

    pub fn per_job(&self) -> usize {
        self.per_job
    }

    /// A permit for one more request of the job, or None when it has as many as allowed.
    pub fn admit(&self, job_id: &str) -> Option<RequestPermit<'_>> {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let count = in_flight.entry(job_id.to_owned()).or_default();
        if *count >= self.per_job {
            return None;
        }
        *count += 1;
        Some(RequestPermit {
            limits: self,
            job_id: job_id.to_owned(),
        })
    }

    #[cfg(test)]
    fn jobs(&self) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// One request's place in its job's count, given back when dropped.
#[derive(Debug)]
pub struct RequestPermit<'a> {
    limits: &'a GuestLimits,
    job_id: String,
}

impl Drop for RequestPermit<'_> {
    fn drop(&mut self) {
        let mut in_flight = self
            .limits
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = in_flight.get_mut(&self.job_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                in_flight.remove(&self.job_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_past_its_limit_is_refused_and_others_are_not() {
        let limits = GuestLimits::new(2);
        let first = limits.admit("a").unwrap();
        let second = limits.admit("a").unwrap();
        assert!(limits.admit("a").is_none());
        let other = limits.admit("b");
        assert!(other.is_some());
        drop(first);
        let third = limits.admit("a");
        assert!(third.is_some());
        drop((second, third, other));
        assert_eq!(
            limits.jobs(),
            0,
            "no count is kept for jobs with nothing in flight"
        );
    }
}

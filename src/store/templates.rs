//! Cloud-init's verdict on the last cold boot of each template (per backend), so `agentlab
//! status` can say which template's cloud-init reports errors.

use rusqlite::params;

use super::{Store, StoreError};
use crate::model::TemplateCheck;

impl Store {
    /// Records the verdict of a boot of `check.template`, replacing the one before.
    pub fn record_template_check(&self, check: &TemplateCheck) -> Result<(), StoreError> {
        let errors = serde_json::to_string(&check.errors).map_err(|e| StoreError::Corrupt {
            table: "template_checks",
            message: e.to_string(),
        })?;
        self.conn().execute(
            "INSERT OR REPLACE INTO template_checks (backend, template, job_id, checked_ms, errors_json)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![check.backend, check.template, check.job_id, check.checked_at_ms, errors],
        )?;
        Ok(())
    }

    pub fn list_template_checks(&self) -> Result<Vec<TemplateCheck>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT backend, template, job_id, checked_ms, errors_json FROM template_checks
             ORDER BY backend, template",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get::<_, String>(4)?,
            ))
        })?;
        let mut checks = Vec::new();
        for row in rows {
            let (backend, template, job_id, checked_at_ms, errors) = row?;
            let errors = serde_json::from_str(&errors).map_err(|e| StoreError::Corrupt {
                table: "template_checks",
                message: e.to_string(),
            })?;
            checks.push(TemplateCheck {
                backend,
                template,
                job_id,
                checked_at_ms,
                errors,
            });
        }
        Ok(checks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_boot_of_a_template_is_its_verdict() {
        let store = Store::open_in_memory().unwrap();
        let check = |job: &str, errors: &[&str]| TemplateCheck {
            backend: "qemu".into(),
            template: "debian-12".into(),
            job_id: job.into(),
            checked_at_ms: 1,
            errors: errors.iter().map(|e| (*e).to_owned()).collect(),
        };
        store
            .record_template_check(&check("j1", &["locale failed"]))
            .unwrap();
        assert_eq!(
            store.list_template_checks().unwrap(),
            vec![check("j1", &["locale failed"])]
        );
        store.record_template_check(&check("j2", &[])).unwrap();
        assert_eq!(
            store.list_template_checks().unwrap(),
            vec![check("j2", &[])]
        );
    }
}

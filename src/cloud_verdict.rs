//! Cloud-init's verdict on a boot, as its `/run/cloud-init/result.json` gives it:
//! `{"v1": {"datasource": "...", "errors": ["..."], "recoverable_errors": {"LEVEL": ["..."]}}}`
//! (`recoverable_errors` from cloud-init 23.4 on). The file is the guest's, so it is read with
//! care: a size cap where it is fetched, and here at most `MAX_ERRORS` errors of at most
//! `MAX_ERROR_CHARS` characters each, with control characters replaced.

use serde_json::Value;

/// Where cloud-init records that it has finished.
pub const RESULT_PATH: &str = "/run/cloud-init/result.json";
/// Cap on the file as read from the guest.
pub const RESULT_MAX_BYTES: usize = 256 * 1024;
const MAX_ERRORS: usize = 10;
const MAX_ERROR_CHARS: usize = 300;

/// What the result says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub datasource: Option<String>,
    /// Its errors, then its recoverable errors as `LEVEL: message`; at most `MAX_ERRORS`.
    pub errors: Vec<String>,
    /// How many there were in all (more than `errors` holds when some were left out).
    pub total: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("cloud-init's result.json is not what cloud-init writes: {0}")]
pub struct VerdictError(String);

pub fn parse(bytes: &[u8]) -> Result<Verdict, VerdictError> {
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| VerdictError(format!("not JSON ({e})")))?;
    let v1 = value
        .get("v1")
        .and_then(Value::as_object)
        .ok_or_else(|| VerdictError("no `v1` object".into()))?;
    let mut all = Vec::new();
    match v1.get("errors") {
        Some(Value::Array(errors)) => all.extend(errors.iter().map(describe)),
        None | Some(Value::Null) => {}
        Some(_) => return Err(VerdictError("`errors` is not a list".into())),
    }
    if let Some(Value::Object(levels)) = v1.get("recoverable_errors") {
        for (level, errors) in levels {
            if let Value::Array(errors) = errors {
                all.extend(errors.iter().map(|e| format!("{level}: {}", describe(e))));
            }
        }
    }
    let total = all.len();
    all.truncate(MAX_ERRORS);
    Ok(Verdict {
        datasource: v1.get("datasource").and_then(Value::as_str).map(clean),
        errors: all,
        total,
    })
}

impl Verdict {
    /// The job event's words.
    pub fn summary(&self) -> String {
        let source = self
            .datasource
            .as_deref()
            .map_or_else(String::new, |d| format!(" ({d})"));
        if self.total == 0 {
            return format!("cloud-init finished without errors{source}");
        }
        let more = if self.total > self.errors.len() {
            format!("; and {} more", self.total - self.errors.len())
        } else {
            String::new()
        };
        format!(
            "cloud-init reported {} error{}{source}: {}{more}",
            self.total,
            if self.total == 1 { "" } else { "s" },
            self.errors.join("; ")
        )
    }
}

fn describe(error: &Value) -> String {
    match error {
        Value::String(text) => clean(text),
        other => clean(&other.to_string()),
    }
}

/// At most `MAX_ERROR_CHARS` characters, control characters as spaces.
fn clean(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(MAX_ERROR_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > MAX_ERROR_CHARS {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_clean_result_and_one_with_errors() {
        let clean =
            parse(br#"{"v1": {"datasource": "DataSourceNoCloud [seed=/dev/vdb]", "errors": []}}"#)
                .unwrap();
        assert_eq!(clean.total, 0);
        assert_eq!(
            clean.summary(),
            "cloud-init finished without errors (DataSourceNoCloud [seed=/dev/vdb])"
        );

        let failed = parse(
            br#"{"v1": {"datasource": null, "errors": ["('locale', ProcessExecutionError('bad\nlocale'))"],
                 "recoverable_errors": {"WARNING": ["Failed at merging in cloud config"]}}}"#,
        )
        .unwrap();
        assert_eq!(failed.total, 2);
        assert_eq!(
            failed.summary(),
            "cloud-init reported 2 errors: ('locale', ProcessExecutionError('bad locale')); \
             WARNING: Failed at merging in cloud config"
        );
    }

    #[test]
    fn keeps_a_guests_errors_short_and_few() {
        let many: Vec<String> = (0..25)
            .map(|n| format!("{n}{}", "x".repeat(1000)))
            .collect();
        let text = serde_json::json!({"v1": {"errors": many}}).to_string();
        let verdict = parse(text.as_bytes()).unwrap();
        assert_eq!(verdict.total, 25);
        assert_eq!(verdict.errors.len(), MAX_ERRORS);
        assert!(verdict
            .errors
            .iter()
            .all(|e| e.chars().count() <= MAX_ERROR_CHARS + 1));
        assert!(verdict.summary().ends_with("; and 15 more"));
    }

    #[test]
    fn refuses_what_cloud_init_never_writes() {
        assert!(parse(b"not json").is_err());
        assert!(parse(br#"{"v2": {}}"#).is_err());
        assert!(parse(br#"{"v1": {"errors": "all of them"}}"#).is_err());
    }
}

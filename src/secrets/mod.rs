//! A job's secrets and how they are kept out of what the daemon and the runner show: the masking
//! of output (`mask`, used on both sides of the guest API) and the credentials of repository URLs
//! (`url`: redacted wherever a job is shown, masked in output).

pub mod mask;
pub mod url;

use crate::model::JobRequest;

/// What must never appear in a job's stored output: its env values and the credentials of its
/// repository URL. Values shorter than `mask::MIN_SECRET_LEN` are among them but are not masked.
pub fn of_request(request: &JobRequest) -> Vec<String> {
    let mut secrets: Vec<String> = request.env.values().cloned().collect();
    if let Some(repo) = &request.repo {
        secrets.extend(url::url_secrets(repo));
    }
    secrets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_s_secrets_are_its_env_values_and_its_url_credentials() {
        let request = JobRequest {
            repo: Some("https://someone:hunter2-token@example.invalid/x.git".into()),
            env: [("API_KEY".to_owned(), "s3cr3t-value".to_owned())].into(),
            ..JobRequest::default()
        };
        let mut secrets = of_request(&request);
        secrets.sort();
        assert_eq!(secrets, ["hunter2-token", "s3cr3t-value", "someone"]);
        assert!(of_request(&JobRequest::default()).is_empty());
    }
}

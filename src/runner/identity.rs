//! `agentlab-runner identity`: gives a sandbox restored from a snapshot of a booted template its
//! own identity before its job runner starts. Such a guest resumes with the template's hostname,
//! a wall clock stopped at the moment of the snapshot and the very same kernel random state as
//! every other clone of it. The daemon runs this subcommand through the guest agent with an
//! `Identity` document on stdin; this module owns that document (the daemon builds it with the
//! same type), its validation, and applying it: the bootstrap file, the hostname, the clock and
//! the kernel CRNG, in that order.
//!
//! The system effects go through `GuestSystem`, so that tests record them instead of changing the
//! host's hostname, clock or entropy. The CRNG reseed ioctl is the crate's only `unsafe`.

use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The runner's subcommand that applies an identity document read from stdin.
pub const SUBCOMMAND: &str = "identity";

/// The most stdin the subcommand reads; a real document is well under 1 KiB.
pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;

/// The entropy a document must carry, in bytes: at least one full CRNG key's worth.
pub const ENTROPY_BYTES: std::ops::RangeInclusive<usize> = 32..=512;

/// The subcommand's exit code for a document it refused: nothing was changed.
pub const INVALID_DOCUMENT_EXIT_CODE: i32 = 2;

/// The subcommand's exit code when applying a valid document failed part-way.
pub const APPLY_FAILED_EXIT_CODE: i32 = 1;

/// What the daemon tells a restored guest about itself.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The sandbox's VM name, an RFC 1123 label.
    pub hostname: String,
    /// The host's wall clock when the document was made, in milliseconds since the epoch.
    pub unix_time_ms: i64,
    /// Random bytes from the host, mixed into the guest kernel's pool before it reseeds.
    pub entropy: Entropy,
    /// Where the runner's bootstrap file goes (`spec::DEFAULT_BOOTSTRAP_PATH`).
    pub bootstrap_path: PathBuf,
    /// The bootstrap file's contents.
    pub bootstrap: BootstrapFile,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("hostname", &self.hostname)
            .field("unix_time_ms", &self.unix_time_ms)
            .field("entropy", &self.entropy)
            .field("bootstrap_path", &self.bootstrap_path)
            .field("bootstrap", &self.bootstrap)
            .finish()
    }
}

/// Random bytes, base64 in the document. Debug shows only how many there are.
#[derive(Clone, PartialEq, Eq)]
pub struct Entropy(Vec<u8>);

impl Entropy {
    pub fn new(bytes: Vec<u8>) -> Self {
        Entropy(bytes)
    }

    /// `len` bytes from the thread's CSPRNG (ChaCha, seeded and reseeded from the OS).
    pub fn random(len: usize) -> Self {
        use rand::RngCore;
        let mut bytes = vec![0u8; len];
        rand::rng().fill_bytes(&mut bytes);
        Entropy(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Entropy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl Serialize for Entropy {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&BASE64.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Entropy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        BASE64
            .decode(text.as_bytes())
            .map(Entropy)
            // Says nothing of the value: it is meant to be secret.
            .map_err(|_| serde::de::Error::custom("entropy is not valid base64"))
    }
}

/// The runner's bootstrap file, `{"url": …, "token": …}`, as `spec::Bootstrap::load` reads it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootstrapFile {
    pub url: String,
    pub token: String,
}

impl fmt::Debug for BootstrapFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapFile")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Why the identity was not applied. No message carries the token or the entropy.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read the identity document: {0}")]
    Read(#[source] io::Error),
    #[error("the identity document is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// serde's message with every quoted value taken out.
    #[error("the identity document is not valid: {0}")]
    Parse(String),
    #[error("the identity document is not valid: {0}")]
    Invalid(String),
    #[error("cannot write the bootstrap file {path}: {what}: {source}")]
    Bootstrap {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the hostname to {hostname}: {source}")]
    Hostname {
        hostname: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot set the clock: {0}")]
    Clock(#[source] io::Error),
    #[error("cannot mix the entropy into the kernel pool: {0}")]
    Entropy(#[source] io::Error),
    #[error(
        "cannot reseed the kernel CRNG (RNDRESEEDCRNG needs Linux 4.17 and CAP_SYS_ADMIN): {0}"
    )]
    Reseed(#[source] io::Error),
}

impl IdentityError {
    /// The subcommand's exit code: a refused document changed nothing, a failed step may have.
    pub fn exit_code(&self) -> i32 {
        match self {
            IdentityError::Read(_)
            | IdentityError::TooLarge { .. }
            | IdentityError::Parse(_)
            | IdentityError::Invalid(_) => INVALID_DOCUMENT_EXIT_CODE,
            _ => APPLY_FAILED_EXIT_CODE,
        }
    }
}

/// Reads the whole document, refusing more than `MAX_DOCUMENT_BYTES`.
pub fn read_document(reader: impl Read) -> Result<Vec<u8>, IdentityError> {
    let mut bytes = Vec::new();
    let limit = MAX_DOCUMENT_BYTES;
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(IdentityError::Read)?;
    if bytes.len() > limit {
        return Err(IdentityError::TooLarge { limit });
    }
    Ok(bytes)
}

impl Identity {
    /// Parses and validates a document.
    pub fn parse(bytes: &[u8]) -> Result<Identity, IdentityError> {
        let identity: Identity = serde_json::from_slice(bytes)
            .map_err(|e| IdentityError::Parse(without_quoted_values(&e.to_string())))?;
        identity.validate()?;
        Ok(identity)
    }

    pub fn validate(&self) -> Result<(), IdentityError> {
        let invalid = |message: String| Err(IdentityError::Invalid(message));
        if !is_rfc1123_label(&self.hostname) {
            return invalid(format!(
                "hostname {:?} is not an RFC 1123 label (a-z, 0-9 and '-', 1 to 63 characters, \
                 no '-' at either end)",
                self.hostname
            ));
        }
        if self.unix_time_ms < 0 {
            return invalid(format!(
                "unix_time_ms {} is before the epoch",
                self.unix_time_ms
            ));
        }
        let entropy = self.entropy.as_bytes().len();
        if !ENTROPY_BYTES.contains(&entropy) {
            return invalid(format!(
                "entropy holds {entropy} bytes, not {} to {}",
                ENTROPY_BYTES.start(),
                ENTROPY_BYTES.end()
            ));
        }
        if !self.bootstrap_path.is_absolute() || self.bootstrap_path.file_name().is_none() {
            return invalid(format!(
                "bootstrap_path {} is not an absolute file path",
                self.bootstrap_path.display()
            ));
        }
        if self.bootstrap.url.is_empty() {
            return invalid("bootstrap.url is empty".to_owned());
        }
        if self.bootstrap.token.is_empty() {
            return invalid("bootstrap.token is empty".to_owned());
        }
        Ok(())
    }
}

/// a-z, 0-9 and '-', 1 to 63 characters, neither starting nor ending with '-'.
fn is_rfc1123_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// serde quotes offending values in double quotes (`invalid type: string "…"`) and names fields
/// in backticks: keep the names, drop the values, which could be the token.
fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    let mut escaped = false;
    for c in message.chars() {
        if quoted {
            match (escaped, c) {
                (false, '\\') => escaped = true,
                (false, '"') => {
                    quoted = false;
                    out.push_str("…\"");
                }
                _ => escaped = false,
            }
        } else {
            out.push(c);
            quoted = c == '"';
        }
    }
    if quoted {
        out.push('…');
    }
    out
}

/// The system calls applying an identity makes, behind a seam so tests can record them.
pub trait GuestSystem {
    /// The wall clock now, in milliseconds since the epoch.
    fn now_ms(&self) -> i64;
    fn set_hostname(&self, hostname: &str) -> io::Result<()>;
    /// Sets CLOCK_REALTIME.
    fn set_clock(&self, unix_time_ms: i64) -> io::Result<()>;
    /// Mixes bytes into the kernel's input pool (without crediting entropy).
    fn mix_entropy(&self, bytes: &[u8]) -> io::Result<()>;
    /// Makes the kernel CRNG reseed from its input pool now rather than at its next periodic
    /// reseed: until then `/dev/urandom` and `getrandom` go on returning the template's stream.
    fn reseed_crng(&self) -> io::Result<()>;
}

/// The guest's real kernel.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSystem;

const URANDOM: &str = "/dev/urandom";

impl GuestSystem for LinuxSystem {
    fn now_ms(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
        }
    }

    fn set_hostname(&self, hostname: &str) -> io::Result<()> {
        rustix::system::sethostname(hostname.as_bytes()).map_err(io::Error::from)
    }

    fn set_clock(&self, unix_time_ms: i64) -> io::Result<()> {
        // Below 10^9, so it fits every platform's Nsecs (an i32 c_long on 32-bit libc).
        let nanos = unix_time_ms.rem_euclid(1000) * 1_000_000;
        let time = rustix::time::Timespec {
            tv_sec: unix_time_ms.div_euclid(1000),
            tv_nsec: nanos as rustix::time::Nsecs,
        };
        rustix::time::clock_settime(rustix::time::ClockId::Realtime, time).map_err(io::Error::from)
    }

    fn mix_entropy(&self, bytes: &[u8]) -> io::Result<()> {
        let mut urandom = OpenOptions::new().write(true).open(URANDOM)?;
        urandom.write_all(bytes)?;
        urandom.flush()
    }

    fn reseed_crng(&self) -> io::Result<()> {
        reseed_crng(&File::open(URANDOM)?)
    }
}

/// `ioctl(fd, RNDRESEEDCRNG)` on an open `/dev/urandom`.
#[allow(unsafe_code)]
fn reseed_crng(urandom: &File) -> io::Result<()> {
    use rustix::ioctl::{ioctl, opcode, NoArg, Opcode};
    /// `_IO('R', 0x07)` in linux/random.h.
    const RNDRESEEDCRNG: Opcode = opcode::none(b'R', 0x07);
    // SAFETY: RNDRESEEDCRNG is a no-argument ioctl: the kernel reads and writes no user memory
    // for it (random_ioctl ignores `arg`), which is what `NoArg` passes (a null pointer). The
    // opcode is the one linux/random.h defines, and `urandom` is an open file borrowed for the
    // call.
    unsafe { ioctl(urandom, NoArg::<RNDRESEEDCRNG>::new()) }.map_err(io::Error::from)
}

/// What applying an identity did, as the one line the subcommand prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub hostname: String,
    /// How far the clock moved: the document's time minus the guest's before the change.
    pub clock_offset_ms: i64,
    pub entropy_bytes: usize,
}

impl fmt::Display for Applied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "identity applied: hostname {}, clock corrected by {:+} ms, {} bytes of entropy \
             mixed in and the CRNG reseeded",
            self.hostname, self.clock_offset_ms, self.entropy_bytes
        )
    }
}

/// Applies a validated identity, step by step, stopping at the first failure: the bootstrap
/// file, the hostname, the clock, then the entropy and the CRNG reseed.
pub fn apply(identity: &Identity, system: &dyn GuestSystem) -> Result<Applied, IdentityError> {
    identity.validate()?;
    write_bootstrap(&identity.bootstrap_path, &identity.bootstrap)?;
    system
        .set_hostname(&identity.hostname)
        .map_err(|source| IdentityError::Hostname {
            hostname: identity.hostname.clone(),
            source,
        })?;
    let clock_offset_ms = identity.unix_time_ms.saturating_sub(system.now_ms());
    system
        .set_clock(identity.unix_time_ms)
        .map_err(IdentityError::Clock)?;
    system
        .mix_entropy(identity.entropy.as_bytes())
        .map_err(IdentityError::Entropy)?;
    system.reseed_crng().map_err(IdentityError::Reseed)?;
    Ok(Applied {
        hostname: identity.hostname.clone(),
        clock_offset_ms,
        entropy_bytes: identity.entropy.as_bytes().len(),
    })
}

/// Replaces `path` atomically with the bootstrap file: a mode-0600 temporary file in the same
/// folder (never readable by others, not even before a chmod), synced, then renamed over it. A
/// reader sees the old file or the new one, never a part of either.
pub fn write_bootstrap(path: &Path, bootstrap: &BootstrapFile) -> Result<(), IdentityError> {
    let fail = |what: &'static str| {
        move |source: io::Error| IdentityError::Bootstrap {
            path: path.to_owned(),
            what,
            source,
        }
    };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(IdentityError::Invalid(format!(
            "bootstrap_path {} is not a file path",
            path.display()
        )));
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(fail("create its folder"))?;
    let contents = serde_json::to_vec(bootstrap)
        .map_err(|e| fail("encode it")(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".tmp-{}", std::process::id()));
    let temp = dir.join(temp_name);
    // Left behind by an earlier run that died with this pid.
    match std::fs::remove_file(&temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(fail("remove a stale temporary file")(e))
        }
        _ => {}
    }
    let written = write_new_private(&temp, &contents)
        .map_err(fail("write a temporary file"))
        .and_then(|()| std::fs::rename(&temp, path).map_err(fail("rename it into place")));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    // The rename lasts through a crash only once the folder is synced too.
    File::open(dir)
        .and_then(|folder| folder.sync_all())
        .map_err(fail("sync its folder"))
}

fn write_new_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const TOKEN: &str = "boot-SECRET-token-1234";

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Hostname(String),
        Clock(i64),
        Entropy(Vec<u8>),
        Reseed,
    }

    /// Records the calls; fails the one named in `fail_at`. Notes whether the bootstrap file
    /// existed when the first call came.
    #[derive(Debug)]
    struct Recorder {
        now_ms: i64,
        calls: RefCell<Vec<Call>>,
        fail_at: Option<&'static str>,
        watch: PathBuf,
        file_there_at_first_call: RefCell<Option<bool>>,
    }

    impl Recorder {
        fn new(watch: &Path) -> Recorder {
            Recorder {
                now_ms: 1_764_650_000_000,
                calls: RefCell::default(),
                fail_at: None,
                watch: watch.to_owned(),
                file_there_at_first_call: RefCell::default(),
            }
        }

        fn record(&self, name: &'static str, call: Call) -> io::Result<()> {
            self.file_there_at_first_call
                .borrow_mut()
                .get_or_insert_with(|| self.watch.exists());
            self.calls.borrow_mut().push(call);
            if self.fail_at == Some(name) {
                return Err(io::Error::from_raw_os_error(1));
            }
            Ok(())
        }

        fn calls(&self) -> Vec<Call> {
            self.calls.borrow().clone()
        }
    }

    impl GuestSystem for Recorder {
        fn now_ms(&self) -> i64 {
            self.now_ms
        }
        fn set_hostname(&self, hostname: &str) -> io::Result<()> {
            self.record("hostname", Call::Hostname(hostname.to_owned()))
        }
        fn set_clock(&self, unix_time_ms: i64) -> io::Result<()> {
            self.record("clock", Call::Clock(unix_time_ms))
        }
        fn mix_entropy(&self, bytes: &[u8]) -> io::Result<()> {
            self.record("entropy", Call::Entropy(bytes.to_vec()))
        }
        fn reseed_crng(&self) -> io::Result<()> {
            self.record("reseed", Call::Reseed)
        }
    }

    fn identity(bootstrap_path: &Path) -> Identity {
        Identity {
            hostname: "sandbox-0123456789ab".into(),
            unix_time_ms: 1_764_653_600_123,
            entropy: Entropy::new((0..48).collect()),
            bootstrap_path: bootstrap_path.to_owned(),
            bootstrap: BootstrapFile {
                url: "http://10.0.2.100".into(),
                token: TOKEN.into(),
            },
        }
    }

    fn document(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut value =
            serde_json::to_value(identity(Path::new("/etc/agentlab/bootstrap.json"))).unwrap();
        edit(&mut value);
        serde_json::to_vec(&value).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_document_round_trips_with_base64_entropy() {
        let original = identity(Path::new("/etc/agentlab/bootstrap.json"));
        let text = serde_json::to_string(&original).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            value["entropy"],
            serde_json::json!(BASE64.encode((0..48).collect::<Vec<u8>>()))
        );
        assert_eq!(value["bootstrap"]["token"], TOKEN);
        assert_eq!(value["unix_time_ms"], 1_764_653_600_123_i64);
        assert_eq!(Identity::parse(text.as_bytes()).unwrap(), original);
    }

    #[test]
    fn random_entropy_is_random_and_sized() {
        let a = Entropy::random(32);
        assert_eq!(a.as_bytes().len(), 32);
        assert_ne!(a, Entropy::random(32));
    }

    #[test]
    fn invalid_documents_are_refused_with_a_reason() {
        type Edit = fn(&mut serde_json::Value);
        let cases: &[(Edit, &str)] = &[
            (|v| v["hostname"] = "Sandbox-A".into(), "hostname"),
            (|v| v["hostname"] = "".into(), "hostname"),
            (|v| v["hostname"] = "-sandbox".into(), "hostname"),
            (|v| v["hostname"] = "sandbox-".into(), "hostname"),
            (|v| v["hostname"] = "a.b".into(), "hostname"),
            (|v| v["hostname"] = "a".repeat(64).into(), "hostname"),
            (|v| v["unix_time_ms"] = (-1).into(), "unix_time_ms"),
            (
                |v| v["entropy"] = BASE64.encode([7u8; 31]).into(),
                "31 bytes",
            ),
            (
                |v| v["entropy"] = BASE64.encode([7u8; 513]).into(),
                "513 bytes",
            ),
            (|v| v["entropy"] = "not base64!".into(), "base64"),
            (
                |v| v["bootstrap_path"] = "etc/bootstrap.json".into(),
                "absolute",
            ),
            (|v| v["bootstrap_path"] = "/".into(), "absolute"),
            (|v| v["bootstrap"]["url"] = "".into(), "url"),
            (|v| v["bootstrap"]["token"] = "".into(), "token"),
            (
                |v| {
                    v.as_object_mut().unwrap().remove("bootstrap");
                },
                "bootstrap",
            ),
        ];
        for (edit, reason) in cases {
            let bytes = document(*edit);
            let err = Identity::parse(&bytes).unwrap_err();
            assert_eq!(
                err.exit_code(),
                INVALID_DOCUMENT_EXIT_CODE,
                "{err}: {}",
                String::from_utf8_lossy(&bytes)
            );
            assert!(err.to_string().contains(reason), "{reason}: {err}");
        }
        // The limits themselves are fine.
        for (hostname, entropy) in [("a", 32), ("0-z", 512), (&*"a".repeat(63), 100)] {
            let bytes = document(|v| {
                v["hostname"] = hostname.into();
                v["entropy"] = BASE64.encode(vec![1u8; entropy]).into();
            });
            Identity::parse(&bytes).unwrap();
        }
    }

    #[test]
    fn errors_never_quote_the_token() {
        let token_as_bootstrap = document(|v| v["bootstrap"] = TOKEN.into());
        let token_as_time = document(|v| v["unix_time_ms"] = TOKEN.into());
        let token_in_entropy = document(|v| v["entropy"] = format!("{TOKEN}!").into());
        let token_as_url = document(|v| v["bootstrap"]["url"] = serde_json::json!([TOKEN]));
        for bytes in [
            token_as_bootstrap,
            token_as_time,
            token_in_entropy,
            token_as_url,
            b"{\"bootstrap\": {\"token\": \"boot-SECRET-token-1234".to_vec(),
        ] {
            let err = Identity::parse(&bytes).unwrap_err();
            let text = format!("{err} {err:?}");
            assert!(!text.contains("SECRET"), "{text}");
            assert!(text.contains("not valid"), "{text}");
        }
    }

    #[test]
    fn quoted_values_are_dropped_but_field_names_kept() {
        assert_eq!(
            without_quoted_values(r#"invalid type: string "a\"b", expected i64 at `unix_time_ms`"#),
            r#"invalid type: string "…", expected i64 at `unix_time_ms`"#
        );
        assert_eq!(without_quoted_values(r#"cut "off"#), r#"cut "…"#);
    }

    #[test]
    fn debug_redacts_the_token_and_the_entropy() {
        let identity = identity(Path::new("/etc/agentlab/bootstrap.json"));
        let text = format!("{identity:?} {:#?}", identity.bootstrap);
        assert!(!text.contains("SECRET"), "{text}");
        assert!(!text.contains(&BASE64.encode(identity.entropy.as_bytes())));
        assert!(!text.contains("[0, 1, 2"), "{text}");
        assert!(text.contains("<48 bytes>"), "{text}");
        assert!(text.contains("sandbox-0123456789ab"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }

    #[test]
    fn documents_over_64_kib_are_refused() {
        let exactly = vec![b' '; MAX_DOCUMENT_BYTES];
        assert_eq!(
            read_document(&exactly[..]).unwrap().len(),
            MAX_DOCUMENT_BYTES
        );
        let over = vec![b' '; MAX_DOCUMENT_BYTES + 1];
        let err = read_document(&over[..]).unwrap_err();
        assert!(matches!(err, IdentityError::TooLarge { .. }), "{err}");
        assert_eq!(err.exit_code(), INVALID_DOCUMENT_EXIT_CODE);
    }

    #[test]
    fn applying_writes_the_file_then_hostname_clock_entropy_and_reseed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agentlab/bootstrap.json");
        let identity = identity(&path);
        let system = Recorder::new(&path);

        let applied = apply(&identity, &system).unwrap();

        assert_eq!(
            system.calls(),
            [
                Call::Hostname("sandbox-0123456789ab".into()),
                Call::Clock(1_764_653_600_123),
                Call::Entropy((0..48).collect()),
                Call::Reseed,
            ]
        );
        assert_eq!(*system.file_there_at_first_call.borrow(), Some(true));
        assert_eq!(
            applied,
            Applied {
                hostname: "sandbox-0123456789ab".into(),
                clock_offset_ms: 3_600_123,
                entropy_bytes: 48,
            }
        );
        let line = applied.to_string();
        assert!(line.contains("sandbox-0123456789ab"), "{line}");
        assert!(line.contains("+3600123 ms"), "{line}");
        assert!(line.contains("48 bytes"), "{line}");
        assert!(!line.contains("SECRET"), "{line}");
    }

    #[test]
    fn the_bootstrap_file_is_private_and_what_the_runner_loads() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("etc/agentlab");
        let path = folder.join("bootstrap.json");
        apply(&identity(&path), &Recorder::new(&path)).unwrap();

        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&folder), 0o700, "a missing folder is made private");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!(r#"{{"url":"http://10.0.2.100","token":"{TOKEN}"}}"#)
        );
        let loaded = crate::runner::Bootstrap::load(&path).unwrap();
        assert_eq!(loaded.url, "http://10.0.2.100");
        assert_eq!(loaded.token, TOKEN);
        let entries: Vec<_> = std::fs::read_dir(&folder).unwrap().collect();
        assert_eq!(entries.len(), 1, "no temporary file is left behind");
    }

    #[test]
    fn an_older_file_is_replaced_by_a_rename_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("agentlab");
        std::fs::create_dir(&folder).unwrap();
        std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = folder.join("bootstrap.json");
        std::fs::write(
            &path,
            r#"{"url":"http://10.0.2.100","token":"template-token"}"#,
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let old_inode = std::fs::metadata(&path).unwrap().ino();
        let mut held = File::open(&path).unwrap();
        // A stale temporary file of an earlier run with this pid does not get in the way.
        let stale = folder.join(format!(".bootstrap.json.tmp-{}", std::process::id()));
        std::fs::write(&stale, "junk").unwrap();

        apply(&identity(&path), &Recorder::new(&path)).unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(TOKEN), "{text}");
        assert!(!text.contains("template-token"), "{text}");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&folder), 0o755, "an existing folder keeps its mode");
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), old_inode);
        // A reader of the old file still sees all of the old file.
        let mut old = String::new();
        held.read_to_string(&mut old).unwrap();
        assert!(old.contains("template-token"), "{old}");
        assert!(!stale.exists());
        assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 1);
    }

    #[test]
    fn a_bootstrap_file_that_cannot_be_written_stops_everything() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("agentlab");
        std::fs::write(&blocker, "a file where the folder should be").unwrap();
        let path = blocker.join("bootstrap.json");
        let system = Recorder::new(&path);

        let err = apply(&identity(&path), &system).unwrap_err();

        assert!(matches!(err, IdentityError::Bootstrap { .. }), "{err}");
        assert_eq!(err.exit_code(), APPLY_FAILED_EXIT_CODE);
        assert!(system.calls().is_empty(), "{:?}", system.calls());
        assert!(!format!("{err} {err:?}").contains("SECRET"));
    }

    #[test]
    fn a_failed_step_stops_the_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bootstrap.json");
        let mut system = Recorder::new(&path);
        system.fail_at = Some("clock");

        let err = apply(&identity(&path), &system).unwrap_err();

        assert!(matches!(err, IdentityError::Clock(_)), "{err}");
        assert_eq!(err.exit_code(), APPLY_FAILED_EXIT_CODE);
        assert_eq!(
            system.calls(),
            [
                Call::Hostname("sandbox-0123456789ab".into()),
                Call::Clock(1_764_653_600_123),
            ]
        );

        let mut system = Recorder::new(&path);
        system.fail_at = Some("reseed");
        let err = apply(&identity(&path), &system).unwrap_err();
        assert!(matches!(err, IdentityError::Reseed(_)), "{err}");
        assert_eq!(system.calls().len(), 4);
    }

    #[test]
    fn an_invalid_identity_is_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bootstrap.json");
        let mut bad = identity(&path);
        bad.hostname = "Not_A_Label".into();
        let system = Recorder::new(&path);
        let err = apply(&bad, &system).unwrap_err();
        assert!(matches!(err, IdentityError::Invalid(_)), "{err}");
        assert!(system.calls().is_empty());
        assert!(!path.exists());
    }

    #[test]
    fn the_clock_offset_is_signed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bootstrap.json");
        let mut system = Recorder::new(&path);
        system.now_ms = 1_764_653_700_123;
        let applied = apply(&identity(&path), &system).unwrap();
        assert_eq!(applied.clock_offset_ms, -100_000);
        assert!(applied.to_string().contains("-100000 ms"));
    }

    #[test]
    fn the_reseed_opcode_is_linux_s() {
        // linux/random.h: #define RNDRESEEDCRNG _IO('R', 0x07) == 0x5207.
        assert_eq!(rustix::ioctl::opcode::none(b'R', 0x07), 0x5207);
    }
}

//! Proxmox-style command lines: positional arguments, `--key value` options checked against what
//! the subcommand accepts, and everything after `--` as extra arguments. An unknown option fails
//! the way `qm` fails: "400 Parameter verification failed." naming the property.

use std::collections::BTreeMap;

use crate::{Fail, Result};

#[derive(Debug, Default)]
pub struct Parsed {
    pub positional: Vec<String>,
    pub options: BTreeMap<String, String>,
    pub extra: Vec<String>,
}

impl Parsed {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.options.get(key).map(String::as_str)
    }

    /// A boolean option as Proxmox reads it: 1/0, true/false, yes/no, on/off.
    pub fn flag(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some("1" | "true" | "yes" | "on") => Ok(Some(true)),
            Some("0" | "false" | "no" | "off") => Ok(Some(false)),
            Some(other) => Err(param_error(
                key,
                &format!("type check ('boolean') failed - got '{other}'"),
            )),
        }
    }

    pub fn positional(&self, index: usize, name: &str, usage: &str) -> Result<&str> {
        self.positional.get(index).map(String::as_str).ok_or_else(|| {
            Fail::new(format!("400 not enough arguments\n{name}: property is missing and it is not optional\n{usage}"))
        })
    }
}

pub fn param_error(key: &str, message: &str) -> Fail {
    Fail::new(format!(
        "400 Parameter verification failed.\n{key}: {message}\n"
    ))
}

/// Whether `key` is one of `allowed`, where an entry ending in `[n]` stands for `key0`, `key1`, …
fn accepted(key: &str, allowed: &[&str]) -> bool {
    allowed.iter().any(|a| match a.strip_suffix("[n]") {
        Some(stem) => key
            .strip_prefix(stem)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())),
        None => *a == key,
    })
}

/// Splits `args` into positionals, options (each checked against `allowed`) and extra arguments.
pub fn parse(args: &[String], allowed: &[&str], usage: &str) -> Result<Parsed> {
    let mut parsed = Parsed::default();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == "--" {
            parsed.extra = iter.cloned().collect();
            break;
        }
        let Some(key) = arg.strip_prefix("--") else {
            parsed.positional.push(arg.clone());
            continue;
        };
        let (key, value) = match key.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => {
                let value = iter.next().cloned().ok_or_else(|| {
                    Fail::new(format!(
                        "400 Parameter verification failed.\n{key}: missing value\n{usage}"
                    ))
                })?;
                (key.to_owned(), value)
            }
        };
        if !accepted(&key, allowed) {
            return Err(Fail::new(format!(
                "400 Parameter verification failed.\n{key}: property is not defined in schema and the schema does not allow additional properties\n{usage}"
            )));
        }
        if parsed.options.insert(key.clone(), value).is_some() {
            return Err(param_error(&key, "duplicate parameter"));
        }
    }
    Ok(parsed)
}

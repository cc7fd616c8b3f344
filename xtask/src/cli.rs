//! A tiny hand-written argument reader: xtask stays dependency-light, and its flags are few.

use std::collections::VecDeque;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};

/// The arguments of one task, consumed flag by flag; whatever is left over is an error.
#[derive(Debug)]
pub struct Args {
    rest: VecDeque<String>,
}

impl Args {
    pub fn new(args: &[String]) -> Self {
        Args {
            rest: args.iter().cloned().collect(),
        }
    }

    /// True when `--name` was given (every occurrence is consumed).
    pub fn flag(&mut self, name: &str) -> bool {
        let before = self.rest.len();
        self.rest.retain(|a| a != name);
        self.rest.len() != before
    }

    /// The value of `--name <v>` or `--name=<v>`, if given.
    pub fn value(&mut self, name: &str) -> Result<Option<String>> {
        let prefix = format!("{name}=");
        let Some(i) = self
            .rest
            .iter()
            .position(|a| a == name || a.starts_with(&prefix))
        else {
            return Ok(None);
        };
        let arg = self.rest.remove(i).expect("index found by position()");
        if let Some(v) = arg.strip_prefix(&prefix) {
            return Ok(Some(v.to_owned()));
        }
        self.rest
            .remove(i)
            .map(Some)
            .ok_or_else(|| anyhow!("{name} needs a value"))
    }

    /// The value of `--name`, parsed.
    pub fn parsed<T>(&mut self, name: &str) -> Result<Option<T>>
    where
        T: FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        self.value(name)?
            .map(|v| v.parse::<T>().with_context(|| format!("{name} {v}")))
            .transpose()
    }

    /// Fails on anything not consumed, so a typo is not silently ignored.
    pub fn finish(self) -> Result<()> {
        if let Some(first) = self.rest.front() {
            bail!("unexpected argument `{first}` (try --help)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Args {
        Args::new(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags_and_values() -> Result<()> {
        let mut a = args(&["--quick", "--reps", "2", "--only=loss,cpu"]);
        assert!(a.flag("--quick"));
        assert!(!a.flag("--quick"));
        assert_eq!(a.parsed::<u32>("--reps")?, Some(2));
        assert_eq!(a.value("--only")?.as_deref(), Some("loss,cpu"));
        assert_eq!(a.value("--absent")?, None);
        a.finish()
    }

    #[test]
    fn leftovers_and_missing_values_fail() {
        assert!(args(&["--bogus"]).finish().is_err());
        assert!(args(&["--reps"]).value("--reps").is_err());
        assert!(args(&["--reps", "x"]).parsed::<u32>("--reps").is_err());
    }
}

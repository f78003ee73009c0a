//! Clean-ups that go on past a failed step, so that one thing that could not be removed does
//! not leave everything after it behind.

use anyhow::{Result, bail};

/// The failed steps of one clean-up: each is printed when it happens, and the clean-up fails at
/// the end if any did.
#[derive(Default)]
pub struct Failures(Vec<String>);

impl Failures {
    pub fn note(&mut self, result: Result<()>) {
        if let Err(e) = result {
            println!("cleanup: {e:#}");
            self.0.push(format!("{e:#}"));
        }
    }

    pub fn into_result(self) -> Result<()> {
        if self.0.is_empty() {
            return Ok(());
        }
        bail!(
            "{} cleanup step(s) failed:\n  - {}",
            self.0.len(),
            self.0.join("\n  - ")
        )
    }
}

#[cfg(test)]
mod tests {
    use anyhow::anyhow;

    use super::*;

    #[test]
    fn fails_at_the_end_naming_every_failed_step() {
        let mut failures = Failures::default();
        failures.note(Ok(()));
        assert!(Failures::default().into_result().is_ok());
        failures.note(Err(anyhow!("first")));
        failures.note(Ok(()));
        failures.note(Err(anyhow!("second")));
        let message = failures.into_result().unwrap_err().to_string();
        assert_eq!(message, "2 cleanup step(s) failed:\n  - first\n  - second");
    }
}

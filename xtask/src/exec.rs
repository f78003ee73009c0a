//! Running other programs. Every command xtask runs goes through [`cmd`] (so it finds what setup
//! installed) and one of [`exec`], [`exec_output`] or [`probe`], so that a failure names the exact
//! command line that failed, ready to be copied and rerun by hand.

use std::{
    env,
    ffi::{OsStr, OsString},
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::OnceLock,
};

use anyhow::{Context as _, Result, bail};

/// `$CARGO_HOME/bin`, where rustup's proxies and `cargo install` (bpf-linker) put programs.
pub fn cargo_bin_dir() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home).join("bin"));
    }
    Ok(home_dir()?.join(".cargo").join("bin"))
}

pub fn home_dir() -> Result<PathBuf> {
    env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set: xtask keeps the eBPF toolchain under ~/.cache and ~/.cargo")
}

/// PATH for every child: `~/.cargo/bin` first. The agent's build script runs aya-build, which
/// needs `bpf-linker` on PATH, and `sudo` usually resets PATH to one without `~/.cargo/bin`.
fn child_path() -> &'static OsStr {
    static PATH: OnceLock<OsString> = OnceLock::new();
    PATH.get_or_init(|| {
        let current = env::var_os("PATH").unwrap_or_default();
        let first: Vec<PathBuf> = cargo_bin_dir().into_iter().collect();
        let rest = env::split_paths(&current).filter(|d| !first.contains(d));
        let dirs: Vec<PathBuf> = first.iter().cloned().chain(rest).collect();
        // Only fails on a directory containing ':', which split_paths cannot have produced.
        env::join_paths(dirs).unwrap_or(current)
    })
}

/// A command for `program`, with the PATH described at [`child_path`].
pub fn cmd(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("PATH", child_path());
    cmd
}

/// The command as a shell line: explicitly set variables (except PATH, set on all of them) and
/// the arguments, quoted where a shell would need it.
pub fn display(cmd: &Command) -> String {
    let mut words = Vec::new();
    for (key, value) in cmd.get_envs() {
        if key == "PATH" {
            continue;
        }
        if let Some(value) = value {
            words.push(format!(
                "{}={}",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            ));
        }
    }
    words.push(quote(&cmd.get_program().to_string_lossy()));
    words.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    words.join(" ")
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn start_error(cmd: &Command, line: &str) -> String {
    format!(
        "could not start `{line}`: is `{}` installed and on PATH? (`cargo xtask setup` installs \
         what the project needs)",
        cmd.get_program().to_string_lossy()
    )
}

/// Prints the command, runs it with the terminal as its stdio, and fails naming it unless it
/// exits 0.
pub fn exec(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    println!("$ {line}");
    let status = cmd.status().with_context(|| start_error(cmd, &line))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Prints the command, runs it capturing stdout (stderr goes to the terminal), and fails naming
/// it unless it exits 0.
pub fn exec_output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    println!("$ {line}");
    let output = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| start_error(cmd, &line))?;
    if !output.status.success() {
        bail!("`{line}` failed ({})", output.status);
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{line}` printed non-UTF-8 output"))
}

/// Runs a check quietly: its stdout when it exits 0, `None` when it fails or cannot start. For
/// questions ("is this installed?") where failure is an answer, not an error.
pub fn probe(cmd: &mut Command) -> Option<String> {
    let Output { status, stdout, .. } = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    status
        .success()
        .then(|| String::from_utf8_lossy(&stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_what_a_shell_would_split() {
        let mut c = Command::new("dpkg-query");
        c.args(["-W", "-f=${Status} x", "it's"]).env("A", "b c");
        assert_eq!(
            display(&c),
            r"A='b c' dpkg-query -W '-f=${Status} x' 'it'\''s'"
        );
    }
}

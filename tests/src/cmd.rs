//! Running external commands (`ip`, `ping`, `netctl`) with a deadline and with everything needed
//! to understand a failure in the panic message.

use std::{
    ffi::OsStr,
    fmt,
    io::Read,
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

/// No command the harness runs should take this long; a hung one is killed and reported.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What a command did.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub cmdline: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "command: {}", self.cmdline)?;
        writeln!(f, "status: {}", self.status)?;
        writeln!(f, "stdout:\n{}", indent(&self.stdout))?;
        write!(f, "stderr:\n{}", indent(&self.stderr))
    }
}

fn indent(text: &str) -> String {
    if text.trim().is_empty() {
        return "    (empty)".to_owned();
    }
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Quotes a command line for messages (good enough for reading, not for a shell).
pub fn cmdline<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> String {
    std::iter::once(program.as_ref())
        .chain(args.iter().map(AsRef::as_ref))
        .map(|a| {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `program args...`, capturing its output. Panics only if it cannot be started or exceeds
/// [`COMMAND_TIMEOUT`]; a non-zero exit is returned to the caller.
pub fn run<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> CmdOutput {
    run_command(
        Command::new(program.as_ref()).args(args),
        cmdline(program, args),
    )
}

/// Like [`run`], and panics with the full output unless the command succeeded; returns stdout.
pub fn run_ok<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> String {
    let out = run(program, args);
    assert!(out.success(), "command failed\n{out}");
    out.stdout
}

/// Runs a prepared command with piped output and the harness deadline.
pub fn run_command(command: &mut Command, cmdline: String) -> CmdOutput {
    run_command_timeout(command, cmdline, COMMAND_TIMEOUT)
}

/// Runs a prepared command with piped output; kills it and panics after `timeout`.
pub fn run_command_timeout(command: &mut Command, cmdline: String, timeout: Duration) -> CmdOutput {
    run_command_input(command, cmdline, timeout, None)
}

/// Runs a prepared command with piped output and `input` (if any) written to its stdin, which
/// is then closed (no input: stdin is /dev/null); kills it and panics after `timeout`.
pub fn run_command_input(
    command: &mut Command,
    cmdline: String,
    timeout: Duration,
    input: Option<&[u8]>,
) -> CmdOutput {
    let stdin = if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    let mut child = command
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting `{cmdline}`: {e}"));
    // Fed from its own thread: a command that writes before it reads must not deadlock us.
    let feeder = input.map(|data| {
        let data = data.to_vec();
        let mut pipe = child.stdin.take().expect("stdin was piped");
        thread::spawn(move || {
            use std::io::Write as _;
            // A command that exits without reading everything closes the pipe: not our error.
            let _ = pipe.write_all(&data);
        })
    });
    // Read both pipes while waiting so that a chatty command cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`{cmdline}` did not finish within {timeout:?}; killed it");
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for `{cmdline}`: {e}"),
        }
    };
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    CmdOutput {
        cmdline,
        status,
        stdout: stdout.join().expect("stdout reader thread"),
        stderr: stderr.join().expect("stderr reader thread"),
    }
}

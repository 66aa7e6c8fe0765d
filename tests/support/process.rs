//! The real server binary as a child process, for crash and restart tests.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running server binary.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every line it has written to standard output, as it writes them.
    pub logged: mpsc::Receiver<String>,
}

/// The server binary with no environment but `PATH`, `env`, a free port and plain logs.
pub fn command(env: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ai-chat-server"));
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PORT", "0")
        .env("NO_COLOR", "1");
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

impl ServerProcess {
    /// Starts the binary with `env` (and no rate limit) and waits until it listens.
    pub fn spawn(env: &[(&str, String)]) -> ServerProcess {
        let mut command = command(&[("RATE_LIMIT_MAX_REQUESTS", "0".into())]);
        for (name, value) in env {
            command.env(name, value);
        }
        command.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = command.spawn().expect("server binary starts");
        let stdout = child.stdout.take().unwrap();
        let (found, address) = mpsc::channel();
        let (lines, logged) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                    let _ = found.send(addr);
                    sent = true;
                }
                let _ = lines.send(line);
            }
        });
        let addr = address
            .recv_timeout(Duration::from_secs(30))
            .expect("server logs its address")
            .parse()
            .expect("a socket address");
        ServerProcess {
            child,
            addr,
            logged,
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

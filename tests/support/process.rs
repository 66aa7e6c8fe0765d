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
}

impl ServerProcess {
    /// Starts the binary with `env` on a free port and waits until it listens.
    pub fn spawn(env: &[(&str, String)]) -> ServerProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ai-chat-server"));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PORT", "0")
            .env("NO_COLOR", "1")
            .env("RATE_LIMIT_MAX_REQUESTS", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("server binary starts");
        let stdout = child.stdout.take().unwrap();
        let (found, address) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if !sent && let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                    let _ = found.send(addr);
                    sent = true;
                }
            }
        });
        let addr = address
            .recv_timeout(Duration::from_secs(30))
            .expect("server logs its address")
            .parse()
            .expect("a socket address");
        ServerProcess { child, addr }
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

//! Node packages the tests run: `socket.io-client` 4.x in `tests/support/node` (the Socket.IO
//! tests and the load benchmark) and `playwright-core` in `tests/support/browser` (the page
//! tests). The first use installs a package (`npm ci`) when it is missing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The longest `npm ci` may take.
const INSTALL_WAIT: Duration = Duration::from_secs(300);

/// The folder holding the Node scripts and their `package.json`.
pub fn node_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/node")
}

/// Runs `npm ci` once when `node_modules` lacks the client.
pub fn ensure_installed() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| install(&node_dir(), "socket.io-client"));
}

/// Runs `npm ci` in `dir` when its `node_modules` lacks `package`. A file lock keeps processes
/// running at the same time from installing over each other.
pub fn install(dir: &Path, package: &str) {
    let marker = dir.join("node_modules").join(package).join("package.json");
    let lock_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{package}-npm.lock"));
    let lock = std::fs::File::create(&lock_path).expect("npm lock file");
    lock.lock().expect("npm lock taken");
    if !marker.exists() {
        let mut npm = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("npm runs (install Node.js and npm)");
        let deadline = Instant::now() + INSTALL_WAIT;
        let status = loop {
            if let Some(status) = npm.try_wait().expect("npm status") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = npm.kill();
                panic!("npm ci took longer than {INSTALL_WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "npm ci failed in {}", dir.display());
    }
    assert!(marker.exists(), "{package} missing after npm ci");
}

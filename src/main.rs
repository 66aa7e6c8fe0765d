//! Start-up: configuration, logging, the server, and a clean stop on SIGINT or SIGTERM.

use std::io::IsTerminal;
use std::process::ExitCode;

use ai_chat_server::App;
use ai_chat_server::config::Config;
use tracing_subscriber::EnvFilter;

/// jemalloc instead of glibc's allocator: under load glibc's malloc and free were a seventh of
/// the server's CPU (`perf`, `POST /api/chat`); see BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let filter = EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| EnvFilter::new("info"))
        // The PostgreSQL driver logs statements with their parameters (message text, password
        // hashes) below info: never, whatever the level.
        .add_directive("tokio_postgres=info".parse().expect("a valid directive"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    if config.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    let model = match &config.model.api_key {
        Some(_) => config.model.model.clone(),
        None => "the built-in demo model".to_owned(),
    };
    let grace = config.shutdown_grace;
    let app = match App::start(config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "could not start");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(address = %app.addr(), %model, "AI chat server listening on http://{}", app.addr());
    wait_for_signal().await;
    tracing::info!("shutting down");
    app.shutdown(grace).await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

//! `chat [all|logic|gateway|task]`: one role of the chat platform (all of
//! them by default), until SIGTERM or Ctrl-C. Its configuration comes from
//! the file `IMINFRA_CONFIG` names and `IMINFRA_*` variables; none runs
//! everything in process. A line `chat ready: …` on stdout says where it
//! listens.

use std::process::ExitCode;

use im_infra_examples_chat::{builder, Platform, Role};

#[tokio::main]
async fn main() -> ExitCode {
    let name = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let Some(role) = Role::parse(&name) else {
        eprintln!("unknown role {name:?}: all, logic, gateway or task");
        return ExitCode::from(2);
    };
    let platform = match Platform::start(role, builder(role)).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("chat {name}: start-up failed: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", platform.ready_line());
    match platform.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat {name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

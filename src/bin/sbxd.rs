//! `sbxd`: the sandbox daemon (the same as `sbx daemon`).

fn main() -> std::process::ExitCode {
    sbx::daemon::main_from_args(std::env::args_os().skip(1).collect())
}

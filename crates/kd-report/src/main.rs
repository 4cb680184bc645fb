use clap::Parser;

fn main() -> std::process::ExitCode {
    kd_train::cli::main_with(|| kd_report::run(&kd_report::Args::parse()).map(drop))
}

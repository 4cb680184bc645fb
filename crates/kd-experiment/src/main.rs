use clap::Parser;

fn main() -> std::process::ExitCode {
    kd_train::cli::main_with(|| kd_experiment::run(&kd_experiment::Args::parse()))
}

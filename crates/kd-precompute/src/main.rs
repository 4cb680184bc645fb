use clap::Parser;

fn main() -> std::process::ExitCode {
    kd_train::cli::main_with(|| kd_precompute::run(&kd_precompute::Args::parse()).map(drop))
}

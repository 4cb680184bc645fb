use clap::Parser;

fn main() -> std::process::ExitCode {
    kd_train::cli::main_with(|| kd_export::run(&kd_export::Args::parse()).map(drop))
}

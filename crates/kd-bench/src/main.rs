use clap::Parser;

fn main() -> std::process::ExitCode {
    kd_train::cli::main_with(|| kd_bench::run(&kd_bench::Args::parse()))
}

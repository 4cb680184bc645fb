use clap::Parser;

fn main() -> std::process::ExitCode {
    kd_train::cli::main_with(|| kd_teacher::run(&kd_teacher::Args::parse()).map(drop))
}

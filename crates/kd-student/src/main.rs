use clap::Parser;

fn main() -> std::process::ExitCode {
    kd_train::cli::main_with(|| kd_student::run(&kd_student::Args::parse()).map(drop))
}

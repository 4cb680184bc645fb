use clap::Parser;

fn main() -> std::process::ExitCode {
    kd_train::cli::main_with(|| {
        let args = kd_predict::Args::parse();
        let predictions = kd_predict::run(&args)?;
        kd_predict::print(&predictions, args.json)
    })
}

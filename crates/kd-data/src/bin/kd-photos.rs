//! `kd-photos STAMPS OUT SEED`: builds the photos dataset (`just data-photos`).

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, stamps, out, seed] = &args[..] else {
        eprintln!("usage: kd-photos STAMPS_DIR OUT_DIR SEED");
        return std::process::ExitCode::from(2);
    };
    let Ok(seed) = seed.parse::<u64>() else {
        eprintln!("error: seed {seed:?} is not a whole number");
        return std::process::ExitCode::from(2);
    };
    match kd_data::photos::build(stamps.as_ref(), out.as_ref(), seed) {
        Ok((train, val)) => {
            println!("{out}: {} photos, {train} train / {val} val", train + val);
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

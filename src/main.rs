fn main() -> std::process::ExitCode {
    minimind::cli::main()
}

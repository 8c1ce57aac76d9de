#[global_allocator]
static ALLOC: minimind::alloc::Aligned = minimind::alloc::Aligned;

fn main() -> std::process::ExitCode {
    minimind::cli::main()
}

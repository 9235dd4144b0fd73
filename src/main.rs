//! The `preforkd` binary: the CLI, nothing more. See the library for the engine.

fn main() {
    preforkd::cli::main()
}

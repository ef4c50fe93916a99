fn main() {
    eprintln!("rustfuse: not yet implemented");
    std::process::exit(1);
}

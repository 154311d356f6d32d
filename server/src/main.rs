//! The `fhirkeep` command-line tool.
fn main() {}

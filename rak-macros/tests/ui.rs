//! UI tests: every error the front end reports, as the compiler shows it to a user of
//! `rak::cell!` (messages and spans, snapshotted in `ui/*.stderr`).

#[test]
fn cell_errors() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/*.rs");
}

//! Turns every `cells/*.rak` file into a `rak::cell!` invocation (the built-in cells of
//! `rak::cells`), plus a table of them for the command line, so the files stay the single
//! source of the reference cells.

use std::fmt::Write;

fn main() {
    println!("cargo::rerun-if-changed=../cells");
    let mut paths: Vec<_> = std::fs::read_dir("../cells")
        .expect("the cells/ folder")
        .map(|entry| entry.expect("a readable cells/ entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "rak"))
        .collect();
    paths.sort();
    let mut generated = String::new();
    let mut table = String::new();
    let mut arms = String::new();
    for path in paths {
        println!("cargo::rerun-if-changed={}", path.display());
        let source = std::fs::read_to_string(&path).expect("a readable .rak file");
        writeln!(
            generated,
            "// From {}\nrak_macros::cell! {{\n{source}\n}}\n",
            path.display()
        )
        .unwrap();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a UTF-8 file name");
        // The declaration line: `cell Name {`, after an optional visibility.
        let name = source
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .find_map(|line| {
                let mut words = line.split_whitespace().skip_while(|w| w.starts_with("pub"));
                (words.next() == Some("cell"))
                    .then(|| words.next())
                    .flatten()
            })
            .map(|name| name.trim_end_matches('{'))
            .expect("a `cell Name` declaration in the .rak file");
        writeln!(table, "        Builtin::new::<{name}>({stem:?}),").unwrap();
        writeln!(arms, "        {stem:?} => Some(visitor.visit::<{name}>()),").unwrap();
    }
    writeln!(
        generated,
        "/// Every built-in cell.\npub fn all() -> Vec<Builtin> {{\n    vec![\n{table}    ]\n}}"
    )
    .unwrap();
    writeln!(
        generated,
        "/// Calls `visitor` with the built-in cell of this file name.\n\
         fn visit_file<V: CellVisitor>(file: &str, visitor: V) -> Option<V::Output> {{\n    \
         match file {{\n{arms}        _ => None,\n    }}\n}}"
    )
    .unwrap();
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("builtin_cells.rs"), generated).expect("write builtin_cells.rs");
}

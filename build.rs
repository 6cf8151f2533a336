//! Turns every `cells/*.rak` file into a `rak::cell!` invocation (the built-in cells of
//! `rak::cells`), so the files stay the single source of the reference cells.

use std::fmt::Write;

fn main() {
    println!("cargo::rerun-if-changed=cells");
    let mut paths: Vec<_> = std::fs::read_dir("cells")
        .expect("the cells/ folder")
        .map(|entry| entry.expect("a readable cells/ entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "rak"))
        .collect();
    paths.sort();
    let mut generated = String::new();
    for path in paths {
        println!("cargo::rerun-if-changed={}", path.display());
        let source = std::fs::read_to_string(&path).expect("a readable .rak file");
        writeln!(
            generated,
            "// From {}\nrak::cell! {{\n{source}\n}}\n",
            path.display()
        )
        .unwrap();
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    std::fs::write(out.join("builtin_cells.rs"), generated).expect("write builtin_cells.rs");
}

//! Fuzzing of the front end: mutated cell sources (tokens deleted, swapped, replaced, inserted)
//! and random token soups must produce errors (or, rarely, a valid cell), never a panic. A
//! mutant that compiles is also differentiated and interpreted, which must not panic either.

use crate::common::*;
use rak_codegen::compile_str;
use rak_codegen::interpret::{ScanShape, forward};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Tokens the mutations insert: the DSL's vocabulary and some that do not belong.
const VOCABULARY: &[&str] = &[
    "cell", "dims", "input", "param", "state", "let", "update", "output", "sum", "max", "min",
    "exp", "sigmoid", "normal", "uniform", "K", "V", "i", "j", "S", "q", "x", "(", ")", "[", "]",
    "{", "}", ",", ";", "=", "+", "-", "*", "/", "0", "1.5", "1e400", "2u8", "\"text\"", "'c'",
    "#", "!", "::", "<", ">", "pub", "fn", "///", "..",
];

/// Splits a source into its tokens (delimiters are tokens too), as text.
fn tokens(source: &str) -> Vec<String> {
    fn flatten(stream: proc_macro2::TokenStream, out: &mut Vec<String>) {
        for tree in stream {
            match tree {
                proc_macro2::TokenTree::Group(group) => {
                    let (open, close) = match group.delimiter() {
                        proc_macro2::Delimiter::Parenthesis => ("(", ")"),
                        proc_macro2::Delimiter::Bracket => ("[", "]"),
                        proc_macro2::Delimiter::Brace => ("{", "}"),
                        proc_macro2::Delimiter::None => ("", ""),
                    };
                    out.push(open.to_string());
                    flatten(group.stream(), out);
                    out.push(close.to_string());
                }
                other => out.push(other.to_string()),
            }
        }
    }
    let mut out = Vec::new();
    flatten(source.parse().expect("reference cells tokenize"), &mut out);
    out
}

/// Compiles `source`; if it compiles, differentiates and runs it on a tiny shape.
/// Returns whether it compiled. Panics (with the source) if anything panicked.
fn front_end_survives(source: &str) -> bool {
    let outcome = catch_unwind(AssertUnwindSafe(|| match compile_str(source) {
        Err(errors) => {
            assert!(!errors.is_empty());
            let _ = errors.render(source, "mutant.rak");
            let _ = errors.to_syn_error();
            false
        }
        Ok(compiled) => {
            let dims: Vec<(String, usize)> = compiled
                .cell
                .dims
                .iter()
                .map(|d| (d.name.clone(), 2))
                .collect();
            let named: Vec<(&str, usize)> = dims.iter().map(|(n, s)| (n.as_str(), *s)).collect();
            let shape = ScanShape::new(&compiled.cell, 1, 2, 1, &named).unwrap();
            let inputs = random_inputs(&compiled.cell, &shape, &mut Rng::new(0));
            forward(&compiled.cell, &shape, &inputs).unwrap();
            true
        }
    }));
    match outcome {
        Ok(compiled) => compiled,
        Err(_) => panic!("the front end panicked on:\n{source}"),
    }
}

#[test]
fn mutated_cells_never_panic() {
    let mut rng = Rng::new(2024);
    let (mut mutants, mut valid) = (0, 0);
    for name in CELL_NAMES {
        let original = tokens(&cell_source(name));
        for _ in 0..400 {
            let mut mutant = original.clone();
            for _ in 0..1 + rng.below(3) {
                let position = rng.below(mutant.len());
                match rng.below(4) {
                    0 => {
                        mutant.remove(position);
                    }
                    1 => {
                        let other = rng.below(mutant.len());
                        mutant.swap(position, other);
                    }
                    2 => mutant[position] = rng.pick(VOCABULARY).to_string(),
                    _ => mutant.insert(position, rng.pick(VOCABULARY).to_string()),
                }
                if mutant.is_empty() {
                    break;
                }
            }
            mutants += 1;
            valid += usize::from(front_end_survives(&mutant.join(" ")));
        }
    }
    // Most mutants are broken; the few that are valid cells (a swapped pair of inputs, say)
    // went through autodiff and the interpreter above.
    assert!(
        valid * 5 < mutants,
        "{valid} of {mutants} mutants compiled: the mutations are too weak"
    );
}

#[test]
fn random_token_soups_never_panic() {
    let mut rng = Rng::new(99);
    for _ in 0..2000 {
        let length = rng.below(40);
        let body: Vec<&str> = (0..length).map(|_| rng.pick(VOCABULARY)).collect();
        let source = format!("cell Soup {{ {} }}", body.join(" "));
        front_end_survives(&source);
        front_end_survives(&body.join(" "));
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let depth = 5000;
    let source = format!(
        "cell Deep {{ dims K; input x[K]; state h[K]; update h[i] = {}x[i]{}; output y[i] = h[i]; }}",
        "(".repeat(depth),
        ")".repeat(depth)
    );
    let errors = compile_str(&source).unwrap_err();
    assert!(errors.to_string().contains("nested more than"), "{errors}");
    let negations = format!(
        "cell Deep {{ dims K; input x[K]; state h[K]; update h[i] = {}x[i]; output y[i] = h[i]; }}",
        "-".repeat(depth)
    );
    assert!(compile_str(&negations).is_err());
}

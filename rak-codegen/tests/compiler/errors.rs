//! Error reports for `.rak` files: every error found, each with its file, line, column and a
//! caret under the offending tokens. (The same errors inside `rak::cell!` are covered by the
//! UI tests of `rak-macros`.)

use rak_codegen::compile_str;

fn report(source: &str) -> String {
    match compile_str(source) {
        Ok(_) => panic!("expected errors for:\n{source}"),
        Err(errors) => errors.render(source, "bad.rak"),
    }
}

#[test]
fn errors_point_at_the_offending_tokens() {
    let source = "\
cell Bad {
    dims K, V;
    input q[K], k[K] = sigmoid, v[V];
    state S[K, W];
    update S[i, j] = S[i, j] + k[i] * v[j];
    output o[j] = sum(i) q[i] * S[i, x];
}
";
    insta::assert_snapshot!("points_at_tokens", report(source));
}

#[test]
fn semantic_errors_are_all_reported() {
    let source = "\
cell Bad {
    dims K, V;
    input q[K], v[V];
    state S[K, V], n[K];
    update S[i, j] = S[i, j] + q[j] * v[j];
    update S[i, j] = S[i, j];
    output o = 2.0;
}
";
    insta::assert_snapshot!("semantic_errors", report(source));
}

#[test]
fn syntax_errors_name_what_was_expected() {
    insta::assert_snapshot!(
        "missing_semicolon",
        report("cell Bad { dims K; input q[K] state S[K]; }")
    );
    insta::assert_snapshot!("unknown_item", report("cell Bad { dims K; inptu q[K]; }"));
    insta::assert_snapshot!(
        "unclosed_bracket",
        report("cell Bad { dims K; input q[K; }")
    );
}

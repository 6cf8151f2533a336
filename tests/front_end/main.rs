//! The front end as users meet it: cells declared with `rak::cell!` (the expansion compiles,
//! carries the cell's source, and compiles to the same IR as the `.rak` file it mirrors), and the
//! `rak` command line on `.rak` files; in its modules, what needs no device: parsing the command
//! line, layered job configurations, sampling and prompts.

mod command_line;
mod configs;
mod sampling;

use rak::CellDefinition;
use rak::codegen::display::{backward_to_string, cell_to_string};

rak::cell! {
    /// The SimpleRNN of the seed, as in `cells/simple_rnn.rak`.
    /// Source: the seed homework's SimpleRNN (shared/reference/simple-rnn.md), q of width K.
    pub cell SimpleRnn {
        dims K, V;
        input q[K], k[K] = sigmoid, v[V], g[K] = sigmoid;
        state S[K, V];
        update S[i, j] = g[i] * S[i, j] + k[i] * v[j];
        output o[j] = sum(i) q[i] * S[i, j];
    }
}

mod nested {
    rak::cell! {
        pub(crate) cell Mlstm {
            dims K, V;
            input q[K], k[K], v[V], i_gate, f_gate = logsigmoid, o_gate[V] = sigmoid;
            state C[K, V], n[K], m;
            let m_new = max(f_gate + m, i_gate);
            let decay = exp(f_gate + m - m_new);
            let write = exp(i_gate - m_new);
            update C[i, j] = decay * C[i, j] + write * k[i] * v[j];
            update n[i] = decay * n[i] + write * k[i];
            update m = m_new;
            output h[j] = o_gate[j] * (sum(i) q[i] * C[i, j]) / max(abs(sum(l) q[l] * n[l]), exp(-m));
        }
    }
}

fn file_cell(name: &str) -> rak::CompiledCell {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("cells")
        .join(format!("{name}.rak"));
    rak::codegen::compile_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn macro_cells_compile_to_the_same_ir_as_their_files() {
    for (declared, file) in [
        (SimpleRnn::compile(), "simple_rnn"),
        (nested::Mlstm::compile(), "mlstm"),
    ] {
        let from_file = file_cell(file);
        // Doc comments aside (the macro's copy says where it comes from), the IR is the same.
        let strip = |text: String| {
            text.lines()
                .filter(|l| !l.starts_with("///"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            strip(cell_to_string(&declared.cell)),
            strip(cell_to_string(&from_file.cell))
        );
        assert_eq!(
            backward_to_string(&declared.backward),
            backward_to_string(&from_file.backward)
        );
    }
}

#[test]
fn the_expansion_is_a_unit_struct_with_metadata() {
    assert_eq!(SimpleRnn::NAME, "SimpleRnn");
    let source: String = SimpleRnn::SOURCE.split_whitespace().collect();
    assert!(
        source.contains("updateS[i,j]=g[i]*S[i,j]+k[i]*v[j];"),
        "{}",
        SimpleRnn::SOURCE
    );
    assert_eq!(nested::Mlstm::NAME, "Mlstm");
    let _copy: SimpleRnn = SimpleRnn;
    assert_eq!(SimpleRnn::compile().cell.docs.len(), 2);
}

/// Runs the `rak` binary; returns (success, stdout, stderr).
fn rak(args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rak"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run rak");
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).unwrap();
    (
        output.status.success(),
        text(output.stdout),
        text(output.stderr),
    )
}

#[test]
fn cli_checks_every_reference_cell() {
    let cells: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/cells"))
        .unwrap()
        .map(|entry| entry.unwrap().path().display().to_string())
        .collect();
    let mut args = vec!["check"];
    args.extend(cells.iter().map(String::as_str));
    let (ok, stdout, stderr) = rak(&args);
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok: ")).count(),
        7,
        "{stdout}"
    );
}

#[test]
fn cli_shows_the_backward_step() {
    let (ok, stdout, _) = rak(&["show", "cells/simple_rnn.rak", "--backward"]);
    assert!(ok);
    assert!(
        stdout.contains("dg[i] = sum(j) dS[i, j] * S_prev[i, j];"),
        "{stdout}"
    );
}

#[test]
fn cli_shows_the_chunked_form_or_why_there_is_none() {
    let (ok, stdout, _) = rak(&["show", "cells/gla.rak", "--chunked"]);
    assert!(ok);
    assert!(
        stdout.contains("chunked form of Gla: state S, key axis 0, decay per key")
            && stdout.contains("log_decay[i] = a[i] / 16;"),
        "{stdout}"
    );
    let (ok, stdout, _) = rak(&["show", "cells/elman.rak", "--chunked"]);
    assert!(ok);
    assert!(
        stdout.contains("cell Elman has no chunked form: its state h has rank 1"),
        "{stdout}"
    );
}

#[test]
fn cli_reports_errors_with_file_line_and_column() {
    let dir = std::env::temp_dir().join(format!("rak-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.rak");
    std::fs::write(&bad, "cell Bad {\n    dims K;\n    input x[K];\n    state h[K];\n    update h[i] = h[i] + y[i];\n    output o[i] = h[i];\n}\n").unwrap();
    let (ok, _, stderr) = rak(&["check", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("error: unknown name `y`: not an input, parameter, state or let"),
        "{stderr}"
    );
    assert!(stderr.contains("bad.rak:5:26"), "{stderr}");
    let (ok, _, stderr) = rak(&["check", dir.join("missing.rak").to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("cannot read"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cli_emits_cuda_at_the_requested_dtype_and_schedule() {
    let first_line = |args: &[&str]| {
        let mut all = vec!["emit", "simple_rnn", "--target", "cuda"];
        all.extend(args);
        let (ok, stdout, stderr) = rak(&all);
        assert!(ok, "{stderr}");
        let (header, source) = stdout.split_once('\n').unwrap();
        (header.to_string(), source.to_string())
    };
    let (header, source) = first_line(&["--dim", "128"]);
    assert_eq!(
        header,
        "// rak emit: simple_rnn forward kernel, f32, K=128 V=128; cube_dim 128, tile 64, \
         shared workspace, sum_parts 8, states in registers"
    );
    assert!(source.contains("extern \"C\" __global__"), "{source}");
    let (header, _) = first_line(&[
        "--dim",
        "128",
        "--cube-dim",
        "64",
        "--registers",
        "false",
        "--tile",
        "8",
    ]);
    assert!(
        header.ends_with("; cube_dim 64, tile 8, shared workspace, sum_parts 8"),
        "{header}"
    );
    // The backward scan at its own units and sum parts, unless they are given.
    // What it holds in registers: the recomputation's states, the walk's gradients, both or
    // neither.
    let backward = ["--pass", "backward", "--dim", "128", "--tile", "16"];
    for (recompute, walk, held) in [
        (
            "true",
            "true",
            ", recomputed states and carried gradients in registers",
        ),
        ("true", "false", ", recomputed states in registers"),
        ("false", "true", ", carried gradients in registers"),
        ("false", "false", ""),
    ] {
        let registers = ["--recompute-registers", recompute, "--walk-registers", walk];
        let (header, _) = first_line(&[&backward[..], &registers].concat());
        assert!(
            header.ends_with(&format!(
                "; cube_dim 64, tile 16, shared workspace, sum_parts 1{held}"
            )),
            "{header}"
        );
    }
    let (header, _) = first_line(&backward);
    assert!(
        header.ends_with("sum_parts 1, recomputed states and carried gradients in registers"),
        "{header}"
    );
    let (header, _) = first_line(&["--pass", "backward", "--dim", "128", "--cube-dim", "128"]);
    assert!(header.contains("; cube_dim 128, "), "{header}");
    // The step kernel keeps the split axis whole; bf16 inputs and outputs.
    let (header, source) = first_line(&["--pass", "step", "--dim", "16", "--dtype", "bf16"]);
    assert!(
        header.starts_with(
            "// rak emit: simple_rnn step kernel, bf16, K=16 V=16; cube_dim 128, tile 16,"
        ),
        "{header}"
    );
    assert!(source.contains("__nv_bfloat16"), "{source}");
    let (ok, _, stderr) = rak(&["emit", "simple_rnn", "--target", "cuda", "--dtype", "f64"]);
    assert!(!ok);
    assert!(
        stderr.contains("invalid value 'f64' for '--dtype"),
        "{stderr}"
    );
    // The chunked path's kernels: sub-chunks that do not divide the chunk, or larger than the
    // path takes (one unit per pair: 32² units per cube), are refused before any compile.
    for (sub_chunk, message) in [
        ("24", "--sub-chunk 24 must divide --chunk 64"),
        ("32", "sub-chunks of at most 16 steps"),
    ] {
        let target = ["--target", "cuda", "--sub-chunk", sub_chunk];
        let (ok, _, stderr) = rak(&[&["emit", "decayed_scores"][..], &target].concat());
        assert!(!ok);
        assert!(stderr.contains(message), "{stderr}");
    }
}

#[test]
fn cli_output_into_a_closed_pipe_ends_quietly() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rak"))
        .args(["emit", "simple_rnn", "--target", "cuda"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run rak");
    // Closed before rak writes (it builds the kernel first), as `rak emit … | head -0` would.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

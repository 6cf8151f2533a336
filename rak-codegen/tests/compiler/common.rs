//! Shared helpers: the cells of `cells/`, a seeded random generator, random scan inputs.

use rak_codegen::interpret::{ScanInputs, ScanShape, Tensor};
use rak_codegen::ir::{Cell, InputId, ParamId, StateId};
use rak_codegen::{CompiledCell, compile_str};
use std::path::PathBuf;

/// The seven reference cells of the DSL issue, by file stem.
pub const CELL_NAMES: [&str; 7] = [
    "simple_rnn",
    "gla",
    "retnet",
    "mamba2",
    "deltanet",
    "mlstm",
    "elman",
];

pub fn cell_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../cells")
        .join(format!("{name}.rak"))
}

pub fn cell_source(name: &str) -> String {
    let path = cell_path(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

pub fn compile_cell(name: &str) -> CompiledCell {
    let source = cell_source(name);
    compile_str(&source).unwrap_or_else(|errors| panic!("{}", errors.render(&source, name)))
}

/// Compiles a cell written in a test, panicking with its source and the rendered errors.
pub fn compile_source(source: &str) -> CompiledCell {
    compile_str(source).unwrap_or_else(|errors| {
        panic!(
            "a test cell was refused:\n{source}\n{}",
            errors.render(source, "test.rak")
        )
    })
}

/// SplitMix64: small, seeded, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

pub fn random_tensor(rng: &mut Rng, shape: Vec<usize>, low: f64, high: f64) -> Tensor {
    let mut tensor = Tensor::zeros(shape);
    for x in &mut tensor.data {
        *x = rng.uniform(low, high);
    }
    tensor
}

/// Random inputs, parameters and initial states, all in [−1, 1).
pub fn random_inputs(cell: &Cell, shape: &ScanShape, rng: &mut Rng) -> ScanInputs {
    ScanInputs {
        inputs: (0..cell.inputs.len())
            .map(|i| random_tensor(rng, shape.input(cell, InputId(i)), -1.0, 1.0))
            .collect(),
        params: (0..cell.params.len())
            .map(|p| random_tensor(rng, shape.param(cell, ParamId(p)), -1.0, 1.0))
            .collect(),
        initial_states: Some(
            (0..cell.states.len())
                .map(|s| random_tensor(rng, shape.state(cell, StateId(s)), -1.0, 1.0))
                .collect(),
        ),
    }
}

/// A random scan shape with the given bounds; each dim gets a size from `dim_sizes`.
pub fn random_shape(
    cell: &Cell,
    rng: &mut Rng,
    max_batch: usize,
    max_time: usize,
    max_heads: usize,
    dim_sizes: &[usize],
) -> ScanShape {
    let sizes: Vec<(String, usize)> = cell
        .dims
        .iter()
        .map(|d| (d.name.clone(), rng.pick(dim_sizes)))
        .collect();
    let named: Vec<(&str, usize)> = sizes.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let batch = 1 + rng.below(max_batch);
    let time = 1 + rng.below(max_time);
    let heads = 1 + rng.below(max_heads);
    ScanShape::new(cell, batch, time, heads, &named).expect("valid shape")
}

//! The language model of the seed, around any cell: embedding → L layers (the input
//! projections, the cell, an output projection `Linear(H · Σ output widths, D)`) → LM head. The
//! input projections are one fused `Linear(D, H · Σ input widths)` split into the cell's inputs,
//! or, as in the seed's original backbone, one `Linear(D, H · width)` per input. The seed-compatible configuration
//! has no normalisation and no residual connection; `residual = true` makes each layer a
//! pre-norm residual block with RMSNorm (and adds a final RMSNorm before the head).
//!
//! The cell runs fused (the generated kernels, [`crate::fused`]), chunked (its chunked form
//! with matrix products, [`crate::chunked`], for cells linear in their state), either one as
//! the schedule pass picks per sequence (`auto`), or unfused (its step as plain burn operations
//! in a loop over time, [`crate::unfused`]).

use crate::chunked::{ChunkedScan, SUB_CHUNK};
use crate::codegen::ir::ParamInit;
use crate::codegen::schedule::{ScanKind, Schedule, pick_scan};
use crate::fused::{FusedCellBackend, FusedSettings, fused_cell};
use crate::kernels::CellRef;
use crate::packing::Packing;
use crate::unfused::UnfusedScan;
use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// How a layer runs its cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Per sequence, chunked or fused as the compiler's schedule pass picks
    /// ([`crate::codegen::schedule::pick_scan`]): chunked for long sequences of cells linear in
    /// their state, fused otherwise.
    Auto,
    /// The generated scan kernels (fused recurrent).
    Fused,
    /// The cell's chunked form with matrix products ([`crate::chunked`]); only for cells that
    /// have one ([`crate::codegen::chunkwise`]).
    Chunked,
    /// The cell's step as burn operations, one step after the other.
    Unfused,
}

/// How a layer projects its input to the cell's inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Projection {
    /// One linear layer for all inputs, split afterwards.
    #[default]
    Fused,
    /// One linear layer per input (the seed's original backbone).
    Separate,
}

/// The shape of a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The cell: a built-in cell's file name (`simple_rnn`, `gla`, …) on the command line; the
    /// model itself is built for the cell given to [`ModelConfig::init`].
    pub cell: String,
    pub vocab: usize,
    /// Model width D.
    pub d_model: usize,
    pub layers: usize,
    pub heads: usize,
    /// The size of each dim of the cell (per head), in declaration order.
    pub dims: Vec<usize>,
    /// Pre-norm residual blocks with RMSNorm; `false` is the seed's model.
    pub residual: bool,
    pub strategy: Strategy,
    /// One fused input projection, or one per input.
    #[serde(default)]
    pub projection: Projection,
    /// Steps between the fused scan's checkpoints.
    pub chunk: usize,
}

/// What a layer needs to run its cell, besides its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CellScan {
    pub strategy: Strategy,
    /// The cell, its sizes and its fused scan's schedule.
    pub settings: FusedSettings,
    pub heads: usize,
}

/// One scan of the cell of `settings`: packed inputs, parameters, optional initial states →
/// outputs, final states (see [`crate::packing`]).
fn run_scan<B: FusedCellBackend>(
    strategy: Strategy,
    inputs: Tensor<B, 4>,
    params: Tensor<B, 2>,
    initial: Option<Tensor<B, 3>>,
    settings: &FusedSettings,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    match strategy {
        Strategy::Fused => fused_cell::<B>(inputs, params, initial, settings),
        Strategy::Chunked | Strategy::Auto => {
            let compiled = settings.cell.compiled();
            let form = &compiled.chunk_form;
            let chunk = settings.schedule.chunk;
            let kind = match (form, strategy) {
                (Ok(_), Strategy::Chunked) => ScanKind::Chunked,
                (Err(error), Strategy::Chunked) => panic!("{error}"),
                (form, _) => pick_scan(form.is_ok(), inputs.dims()[1], chunk),
            };
            match (kind, form) {
                (ScanKind::Chunked, Ok(form)) => {
                    let scan = ChunkedScan {
                        form,
                        dims: &settings.dims,
                        chunk,
                        sub_chunk: SUB_CHUNK,
                    };
                    let result = scan.run(inputs, params, initial).unwrap_or_else(|error| {
                        panic!("chunked {}: {error}", settings.cell.name())
                    });
                    (result.outputs, result.final_states)
                }
                _ => fused_cell::<B>(inputs, params, initial, settings),
            }
        }
        Strategy::Unfused => {
            let compiled = settings.cell.compiled();
            let scan = UnfusedScan {
                cell: &compiled.cell,
                dims: &settings.dims,
            };
            let result = scan
                .run(inputs, params, initial)
                .unwrap_or_else(|error| panic!("unfused {}: {error}", settings.cell.name()));
            (result.outputs, result.final_states)
        }
    }
}

/// One layer: input projection, cell, output projection (and, in residual mode, its norm).
#[derive(Module, Debug)]
pub struct CellLayer<B: Backend> {
    /// The input projections: one for all inputs (fused), or one per input in declaration order.
    pub projections: Vec<Linear<B>>,
    /// The cell's parameters, `[H, Σ parameter sizes]`.
    pub params: Param<Tensor<B, 2>>,
    pub output: Linear<B>,
    pub norm: Option<RmsNorm<B>>,
    #[module(skip)]
    pub scan: CellScan,
}

impl<B: FusedCellBackend> CellLayer<B> {
    /// `[B, T, D]` (and optional initial states `[B, H, Σ state sizes]`) → `[B, T, D]` and the
    /// final states (detached when fused).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        initial: Option<Tensor<B, 3>>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>) {
        let [batch, time, _] = x.dims();
        let scan = &self.scan;
        let input = match &self.norm {
            Some(norm) => norm.forward(x.clone()),
            None => x.clone(),
        };
        let heads = scan.heads;
        let per_head = |projection: &Linear<B>| {
            let projected = projection.forward(input.clone());
            let width = projected.dims()[2] / heads;
            projected.reshape([batch, time, heads, width])
        };
        let packed = match self.projections.as_slice() {
            [fused] => per_head(fused),
            separate => Tensor::cat(separate.iter().map(per_head).collect(), 3),
        };
        let (outputs, states) = run_scan::<B>(
            scan.strategy,
            packed,
            self.params.val(),
            initial,
            &scan.settings,
        );
        let output_width = outputs.dims()[3];
        let y = self
            .output
            .forward(outputs.reshape([batch, time, scan.heads * output_width]));
        let y = if self.norm.is_some() { x + y } else { y };
        (y, states)
    }
}

/// The language model.
#[derive(Module, Debug)]
pub struct LanguageModel<B: Backend> {
    pub embedding: Embedding<B>,
    pub layers: Vec<CellLayer<B>>,
    pub final_norm: Option<RmsNorm<B>>,
    pub head: Linear<B>,
}

/// A model's logits and each layer's final states.
pub struct ModelOutput<B: Backend> {
    /// `[B, T, vocab]`.
    pub logits: Tensor<B, 3>,
    pub states: Vec<Tensor<B, 3>>,
}

impl ModelConfig {
    /// Checks the configuration against `cell`; the error names the offending key.
    pub fn validate(&self, cell: CellRef) -> Result<std::rc::Rc<crate::CompiledCell>, String> {
        let compiled = cell.compiled();
        let cell = &compiled.cell;
        if self.dims.len() != cell.dims.len() {
            let names: Vec<&str> = cell.dims.iter().map(|d| d.name.as_str()).collect();
            return Err(format!(
                "model.dims: cell `{}` has {} dims ({}), got {}",
                self.cell,
                names.len(),
                names.join(", "),
                self.dims.len()
            ));
        }
        for (key, value) in [
            ("model.vocab", self.vocab),
            ("model.d_model", self.d_model),
            ("model.layers", self.layers),
            ("model.heads", self.heads),
            ("model.chunk", self.chunk),
        ]
        .into_iter()
        .chain(self.dims.iter().map(|&d| ("model.dims", d)))
        {
            if value == 0 {
                return Err(format!("{key}: must be at least 1"));
            }
        }
        if self.strategy == Strategy::Chunked
            && let Err(error) = &compiled.chunk_form
        {
            return Err(format!(
                "model.strategy: \"chunked\" does not fit: {error} (use \"fused\", or \"auto\" \
                 to pick per sequence)"
            ));
        }
        Ok(compiled)
    }

    /// A new model with freshly initialised weights (seeded by the backend's seed).
    pub fn init<B: FusedCellBackend>(
        &self,
        cell: CellRef,
        schedule: Schedule,
        device: &B::Device,
    ) -> Result<LanguageModel<B>, String> {
        let compiled = self.validate(cell)?;
        let settings = FusedSettings {
            cell,
            dims: self.dims.clone(),
            schedule: Schedule {
                chunk: self.chunk,
                ..schedule
            },
        };
        let cell = &compiled.cell;
        let heads = self.heads;
        let input_packing = Packing::inputs(cell, &self.dims);
        let output_width = Packing::outputs(cell, &self.dims).width;
        let param_packing = Packing::params(cell, &self.dims);
        let norm = || {
            self.residual
                .then(|| RmsNormConfig::new(self.d_model).init(device))
        };
        let layers = (0..self.layers)
            .map(|_| {
                // Each parameter drawn as the cell declares, the same for every head.
                let mut values = vec![0f32; heads * param_packing.width];
                let mut offset = 0;
                for (p, param) in cell.params.iter().enumerate() {
                    let width = param_packing.slots[p].1;
                    let drawn: Vec<f32> = match param.init {
                        ParamInit::Constant(c) => vec![c as f32; width],
                        ParamInit::Normal { mean, std } => {
                            Tensor::<B, 1>::random([width], Distribution::Normal(mean, std), device)
                                .into_data()
                                .to_vec::<f32>()
                                .unwrap_or_default()
                        }
                        ParamInit::Uniform { low, high } => Tensor::<B, 1>::random(
                            [width],
                            Distribution::Uniform(low, high),
                            device,
                        )
                        .into_data()
                        .to_vec::<f32>()
                        .unwrap_or_default(),
                    };
                    for h in 0..heads {
                        let row = h * param_packing.width + offset;
                        values[row..row + width].copy_from_slice(&drawn);
                    }
                    offset += width;
                }
                let params = Tensor::<B, 2>::from_data(
                    TensorData::new(values, [heads, param_packing.width]),
                    device,
                );
                let linear =
                    |width: usize| LinearConfig::new(self.d_model, heads * width).init(device);
                let projections = match self.projection {
                    Projection::Fused => vec![linear(input_packing.width)],
                    Projection::Separate => input_packing
                        .slots
                        .iter()
                        .map(|&(_, width)| linear(width))
                        .collect(),
                };
                CellLayer {
                    projections,
                    params: Param::from_tensor(params),
                    output: LinearConfig::new(heads * output_width, self.d_model).init(device),
                    norm: norm(),
                    scan: CellScan {
                        strategy: self.strategy,
                        settings: settings.clone(),
                        heads,
                    },
                }
            })
            .collect();
        let model = LanguageModel {
            embedding: EmbeddingConfig::new(self.vocab, self.d_model).init(device),
            layers,
            final_norm: norm(),
            head: LinearConfig::new(self.d_model, self.vocab).init(device),
        };
        // burn initialises parameters lazily, at first use; a clone taken before that would
        // draw its own values. Draw them all now, once.
        let drawn = model.clone().into_record();
        Ok(model.load_record(drawn))
    }
}

impl<B: FusedCellBackend> LanguageModel<B> {
    /// Tokens `[B, T]` (and optionally each layer's initial states) → logits and final states.
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        initial: Option<Vec<Tensor<B, 3>>>,
    ) -> ModelOutput<B> {
        let mut x = self.embedding.forward(tokens);
        let mut initial = initial.map(|states| states.into_iter());
        let mut states = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let start = initial.as_mut().and_then(|states| states.next());
            let (y, state) = layer.forward(x, start);
            x = y;
            states.push(state);
        }
        if let Some(norm) = &self.final_norm {
            x = norm.forward(x);
        }
        ModelOutput {
            logits: self.head.forward(x),
            states,
        }
    }
}

//! The unfused path: a cell's scan as plain burn tensor operations, one time step after the
//! other (the seed's "original backbone"), differentiated by burn's own autodiff. It is the
//! independent reference the fused kernels are checked against inside a model, and it runs on
//! any burn backend.
//!
//! Each step evaluates the cell's IR ([`crate::codegen::ir`]) on tensors: a value over index
//! variables `{i, j}` is a tensor `[B, H, |i|, |j|, 1, …]` whose axes follow the variables in
//! id order (padded with unit axes to a fixed rank); a load permutes the loaded value's axes
//! into that order, a binary operation aligns both sides on the union of their variables and
//! broadcasts, a `sum` adds along its variable's axis.

use crate::codegen::ir::{
    BinaryOp, Cell, Expr, ExprId, IndexId, InputId, LetId, ParamId, StateId, StateTime, UnaryOp,
    Value,
};
use crate::packing::Packing;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, activation};
use std::collections::HashMap;

/// Rank of every step tensor: batch, head and up to six index variables.
const RANK: usize = 8;

/// A value of the step: a constant, or a tensor over the index variables `free` (in id order).
#[derive(Clone, Debug)]
enum Term<B: Backend> {
    Constant(f64),
    Tensor {
        tensor: Tensor<B, RANK>,
        free: Vec<IndexId>,
    },
}

/// What one scan needs besides the tensors: the cell, its dim sizes, batch and heads.
pub struct UnfusedScan<'a> {
    pub cell: &'a Cell,
    pub dims: &'a [usize],
}

/// The outputs `[B, T, H, Σ output widths]` and final states `[B, H, Σ state sizes]` of a scan.
pub struct ScanResult<B: Backend> {
    pub outputs: Tensor<B, 4>,
    pub final_states: Tensor<B, 3>,
}

impl UnfusedScan<'_> {
    /// Runs the scan over packed inputs `[B, T, H, Σ input widths]` (before activation),
    /// parameters `[H, Σ parameter sizes]` and optional initial states `[B, H, Σ state sizes]`
    /// (else each state starts from its declared value).
    pub fn run<B: Backend>(
        &self,
        inputs: Tensor<B, 4>,
        params: Tensor<B, 2>,
        initial: Option<Tensor<B, 3>>,
    ) -> Result<ScanResult<B>, String> {
        let cell = self.cell;
        let [batch, time, heads, _] = inputs.dims();
        let device = inputs.device();
        let params = self.params(params, heads);
        let state_packing = Packing::states(cell, self.dims);
        let mut states: Vec<Tensor<B, RANK>> = (0..cell.states.len())
            .map(|s| {
                let (offset, width) = state_packing.slots[s];
                let state = match &initial {
                    Some(initial) => reshapable(initial.clone().slice([
                        0..batch,
                        0..heads,
                        offset..offset + width,
                    ])),
                    None => Tensor::full([batch, heads, width], cell.states[s].init, &device),
                };
                self.declared(state, &cell.states[s].shape)
            })
            .collect();
        let input_packing = Packing::inputs(cell, self.dims);
        let mut outputs = Vec::with_capacity(time);
        for t in 0..time {
            let step_inputs = reshapable(inputs.clone().slice([
                0..batch,
                t..t + 1,
                0..heads,
                0..input_packing.width,
            ]))
            .reshape([batch, heads, input_packing.width]);
            let mut step = Step::new(self, step_inputs, &params, &states);
            for (l, definition) in cell.lets.iter().enumerate() {
                let value = step.eval(definition.expr)?;
                step.lets[l] = Some(step.store(value, &definition.indices));
            }
            for update in &cell.updates {
                let value = step.eval(update.expr)?;
                step.current[update.state.0] = Some(step.store(value, &update.indices));
            }
            let mut step_outputs = Vec::with_capacity(cell.outputs.len());
            for output in &cell.outputs {
                let value = step.eval(output.expr)?;
                let numel = Cell::numel(&output.shape, self.dims);
                step_outputs.push(
                    step.store(value, &output.indices)
                        .reshape([batch, heads, numel]),
                );
            }
            outputs.push(Tensor::cat(step_outputs, 2));
            states = step
                .current
                .into_iter()
                .map(|s| s.expect("every state is updated"))
                .collect();
        }
        let final_states = states
            .into_iter()
            .enumerate()
            .map(|(s, state)| {
                let numel = Cell::numel(&cell.states[s].shape, self.dims);
                state.reshape([batch, heads, numel])
            })
            .collect();
        Ok(ScanResult {
            outputs: Tensor::stack(outputs, 1),
            final_states: Tensor::cat(final_states, 2),
        })
    }

    /// Evaluates per-step values that read no state at every step at once: each
    /// `(expr, indices)` of `values`, over packed inputs `[B, T, H, Σ input widths]` (before
    /// activation) and parameters `[H, Σ parameter sizes]`, becomes a tensor `[B, T, H, numel]`
    /// (elements in the order of `indices`). The lets that read no state are available to them.
    pub fn evaluate_every_step<B: Backend>(
        &self,
        inputs: Tensor<B, 4>,
        params: Tensor<B, 2>,
        values: &[(ExprId, &[IndexId])],
    ) -> Result<Vec<Tensor<B, 4>>, String> {
        let [batch, time, heads, width] = inputs.dims();
        let params = self.params(params, heads);
        let mut step = Step::new(
            self,
            inputs.reshape([batch * time, heads, width]),
            &params,
            &[],
        );
        for (l, definition) in self.cell.lets.iter().enumerate() {
            // A let that reads a state is not needed by state-free values; it stays unset.
            if let Ok(value) = step.eval(definition.expr) {
                step.lets[l] = Some(step.store(value, &definition.indices));
            }
        }
        values
            .iter()
            .map(|&(expr, indices)| {
                let value = step.eval(expr)?;
                let numel: usize = indices.iter().map(|&i| self.size(i)).product();
                // A reshape to a lower rank, which burn gets right for any view (see
                // `reshapable`): it copies what strides cannot express, such as a value that
                // varies with neither batch nor time (a parameter's), a broadcast view.
                Ok(step
                    .store(value, indices)
                    .reshape([batch, time, heads, numel]))
            })
            .collect()
    }

    /// The packed parameters `[H, Σ parameter sizes]`, one tensor each, axes declared.
    fn params<B: Backend>(&self, params: Tensor<B, 2>, heads: usize) -> Vec<Tensor<B, RANK>> {
        let param_packing = Packing::params(self.cell, self.dims);
        (0..self.cell.params.len())
            .map(|p| {
                let (offset, width) = param_packing.slots[p];
                let param = reshapable(params.clone().slice([0..heads, offset..offset + width]));
                self.declared(param.reshape([1, heads, width]), &self.cell.params[p].shape)
            })
            .collect()
    }

    /// `[B, H, numel]` → `[B, H, dims of shape…, 1, …]` (axes in declaration order).
    fn declared<B: Backend>(
        &self,
        tensor: Tensor<B, 3>,
        shape: &[crate::codegen::ir::DimId],
    ) -> Tensor<B, RANK> {
        let [batch, heads, _] = tensor.dims();
        let mut target = [1usize; RANK];
        target[0] = batch;
        target[1] = heads;
        for (axis, dim) in shape.iter().enumerate() {
            target[2 + axis] = self.dims[dim.0];
        }
        tensor.reshape(target)
    }

    fn size(&self, index: IndexId) -> usize {
        self.dims[self.cell.index_dim(index).0]
    }
}

/// One time step being evaluated (or every step at once, the steps along the batch axis).
struct Step<'s, 'a, B: Backend> {
    scan: &'s UnfusedScan<'a>,
    batch: usize,
    heads: usize,
    /// Inputs before and after activation, parameters, S_{t−1}, S_t and lets, axes in
    /// declaration order.
    pre_activation: Vec<Tensor<B, RANK>>,
    inputs: Vec<Tensor<B, RANK>>,
    params: &'s [Tensor<B, RANK>],
    previous: &'s [Tensor<B, RANK>],
    current: Vec<Option<Tensor<B, RANK>>>,
    lets: Vec<Option<Tensor<B, RANK>>>,
    memo: HashMap<ExprId, Term<B>>,
}

impl<'s, 'a, B: Backend> Step<'s, 'a, B> {
    /// A step over packed inputs `[batch, H, Σ input widths]`, activated here.
    fn new(
        scan: &'s UnfusedScan<'a>,
        packed: Tensor<B, 3>,
        params: &'s [Tensor<B, RANK>],
        previous: &'s [Tensor<B, RANK>],
    ) -> Self {
        let cell = scan.cell;
        let [batch, heads, _] = packed.dims();
        let packing = Packing::inputs(cell, scan.dims);
        let pre_activation: Vec<Tensor<B, RANK>> = (0..cell.inputs.len())
            .map(|i| {
                let (offset, width) = packing.slots[i];
                let input = packed
                    .clone()
                    .slice([0..batch, 0..heads, offset..offset + width]);
                scan.declared(reshapable(input), &cell.inputs[i].shape)
            })
            .collect();
        let inputs = pre_activation
            .iter()
            .zip(&cell.inputs)
            .map(|(input, declared)| match declared.activation {
                Some(op) => unary(op, input.clone()),
                None => input.clone(),
            })
            .collect();
        Step {
            scan,
            batch,
            heads,
            pre_activation,
            inputs,
            params,
            previous,
            current: vec![None; cell.states.len()],
            lets: vec![None; cell.lets.len()],
            memo: HashMap::new(),
        }
    }

    fn eval(&mut self, expr: ExprId) -> Result<Term<B>, String> {
        if let Some(term) = self.memo.get(&expr) {
            return Ok(term.clone());
        }
        let cell = self.scan.cell;
        let term = match cell.exprs.get(expr).clone() {
            Expr::Const(c) => Term::Constant(c.0),
            Expr::Load { value, indices } => self.load(value, &indices)?,
            Expr::Unary(op, a) => match self.eval(a)? {
                Term::Constant(c) => Term::Constant(op.apply(c)),
                Term::Tensor { tensor, free } => Term::Tensor {
                    tensor: unary(op, tensor),
                    free,
                },
            },
            Expr::Binary(op, a, b) => {
                let (a, b) = (self.eval(a)?, self.eval(b)?);
                self.binary(op, a, b)?
            }
            Expr::Sum { index, body } => {
                let size = self.scan.size(index);
                match self.eval(body)? {
                    Term::Constant(c) => Term::Constant(c * size as f64),
                    Term::Tensor { tensor, free } => match free.iter().position(|&i| i == index) {
                        None => Term::Tensor {
                            tensor: tensor.mul_scalar(size as f64),
                            free,
                        },
                        Some(position) => {
                            let summed = tensor.sum_dim(2 + position);
                            // Drop the summed (now unit) axis, keeping the others in order.
                            let mut shape = summed.dims();
                            shape[2 + position..].rotate_left(1);
                            let mut free = free;
                            free.remove(position);
                            Term::Tensor {
                                tensor: summed.reshape(shape),
                                free,
                            }
                        }
                    },
                }
            }
        };
        self.memo.insert(expr, term.clone());
        Ok(term)
    }

    /// `value[indices]`: the value's declared axes permuted into id order of `indices`.
    fn load(&self, value: Value, indices: &[IndexId]) -> Result<Term<B>, String> {
        let missing = |what: &str| format!("the unfused path cannot read {what} in a forward step");
        let tensor = match value {
            Value::Input(InputId(i)) => self.inputs[i].clone(),
            Value::Param(ParamId(p)) => self.params[p].clone(),
            Value::InputPreActivation(InputId(i)) => self.pre_activation[i].clone(),
            Value::State(StateId(s), StateTime::Previous) => self
                .previous
                .get(s)
                .cloned()
                .ok_or_else(|| missing("a state in a value computed for every step at once"))?,
            Value::State(StateId(s), StateTime::Current) => self.current[s]
                .clone()
                .ok_or_else(|| missing("a state before its update"))?,
            Value::Let(LetId(l)) => self.lets[l]
                .clone()
                .ok_or_else(|| missing("a let before its definition"))?,
            Value::Grad(_) => {
                return Err(missing("a backward value"));
            }
        };
        if indices.len() > RANK - 2 {
            return Err(format!(
                "the unfused path supports values of at most {} dims",
                RANK - 2
            ));
        }
        let mut free = indices.to_vec();
        free.sort();
        let mut axes = [0usize; RANK];
        for (axis, slot) in axes.iter_mut().enumerate() {
            *slot = axis;
        }
        for (position, index) in free.iter().enumerate() {
            let declared = indices.iter().position(|i| i == index).unwrap_or(position);
            axes[2 + position] = 2 + declared;
        }
        Ok(Term::Tensor {
            tensor: tensor.permute(axes),
            free,
        })
    }

    /// A tensor over `free` reshaped and broadcast to the variables `union` (a superset, id
    /// order) with batch `batch`.
    fn align(
        &self,
        tensor: Tensor<B, RANK>,
        free: &[IndexId],
        union: &[IndexId],
        batch: usize,
    ) -> Tensor<B, RANK> {
        let mut reshaped = [1usize; RANK];
        let mut expanded = [1usize; RANK];
        let dims = tensor.dims();
        reshaped[0] = dims[0];
        reshaped[1] = dims[1];
        expanded[0] = batch;
        expanded[1] = self.heads;
        for (position, &index) in union.iter().enumerate() {
            let size = self.scan.size(index);
            if free.contains(&index) {
                reshaped[2 + position] = size;
            }
            expanded[2 + position] = size;
        }
        tensor.reshape(reshaped).expand(expanded)
    }

    fn binary(&self, op: BinaryOp, a: Term<B>, b: Term<B>) -> Result<Term<B>, String> {
        Ok(match (a, b) {
            (Term::Constant(a), Term::Constant(b)) => Term::Constant(op.apply(a, b)),
            (Term::Tensor { tensor, free }, Term::Constant(c)) => Term::Tensor {
                tensor: match op {
                    BinaryOp::Add => tensor.add_scalar(c),
                    BinaryOp::Sub => tensor.sub_scalar(c),
                    BinaryOp::Mul => tensor.mul_scalar(c),
                    BinaryOp::Div => tensor.div_scalar(c),
                    BinaryOp::Max => tensor.clamp_min(c),
                    BinaryOp::Min => tensor.clamp_max(c),
                    BinaryOp::GreaterEq => tensor.greater_equal_elem(c).float(),
                },
                free,
            },
            (Term::Constant(c), Term::Tensor { tensor, free }) => Term::Tensor {
                tensor: match op {
                    BinaryOp::Add => tensor.add_scalar(c),
                    BinaryOp::Sub => tensor.neg().add_scalar(c),
                    BinaryOp::Mul => tensor.mul_scalar(c),
                    BinaryOp::Div => tensor.recip().mul_scalar(c),
                    BinaryOp::Max => tensor.clamp_min(c),
                    BinaryOp::Min => tensor.clamp_max(c),
                    BinaryOp::GreaterEq => tensor.lower_equal_elem(c).float(),
                },
                free,
            },
            (
                Term::Tensor {
                    tensor: a,
                    free: fa,
                },
                Term::Tensor {
                    tensor: b,
                    free: fb,
                },
            ) => {
                let mut union: Vec<IndexId> = fa.iter().chain(&fb).copied().collect();
                union.sort();
                union.dedup();
                if union.len() > RANK - 2 {
                    return Err(format!(
                        "the unfused path supports expressions over at most {} indices",
                        RANK - 2
                    ));
                }
                let batch = a.dims()[0].max(b.dims()[0]);
                let a = self.align(a, &fa, &union, batch);
                let b = self.align(b, &fb, &union, batch);
                let tensor = match op {
                    BinaryOp::Add => a + b,
                    BinaryOp::Sub => a - b,
                    BinaryOp::Mul => a * b,
                    BinaryOp::Div => a / b,
                    BinaryOp::Max => a.max_pair(b),
                    BinaryOp::Min => a.min_pair(b),
                    BinaryOp::GreaterEq => a.greater_equal(b).float(),
                };
                Term::Tensor {
                    tensor,
                    free: union,
                }
            }
        })
    }

    /// A statement's value as a full tensor over its indices, axes in declaration order.
    fn store(&self, term: Term<B>, indices: &[IndexId]) -> Tensor<B, RANK> {
        let mut sorted = indices.to_vec();
        sorted.sort();
        let device = self
            .params
            .first()
            .or(self.previous.first())
            .map(|t| t.device());
        let full = match term {
            Term::Constant(c) => {
                let mut shape = [1usize; RANK];
                shape[0] = self.batch;
                shape[1] = self.heads;
                for (position, &index) in sorted.iter().enumerate() {
                    shape[2 + position] = self.scan.size(index);
                }
                let device = device.unwrap_or_else(|| self.inputs[0].device());
                Tensor::full(shape, c, &device)
            }
            Term::Tensor { tensor, free } => self.align(tensor, &free, &sorted, self.batch),
        };
        // From id order to declaration order.
        let mut axes = [0usize; RANK];
        for (axis, slot) in axes.iter_mut().enumerate() {
            *slot = axis;
        }
        for (position, index) in indices.iter().enumerate() {
            let sorted_position = sorted.iter().position(|i| i == index).unwrap_or(position);
            axes[2 + position] = 2 + sorted_position;
        }
        full.permute(axes)
    }
}

/// `view` in a form burn 0.21 reshapes correctly: the view itself, or a copy of it when one of
/// its axes has size 1.
///
/// burn 0.21 reshapes a strided view (a slice, a narrow) to a higher rank by working out new
/// strides (burn-std's `split_strides`), and that walk never steps past an axis of size 1 of the
/// view: every axis left of it takes the strides of the axes right of it. A `[2, 3, 1]` slice of
/// a `[2, 3, 9]` tensor reshaped to `[2, 3, 1, 1, 1, 1]` reads element (b, h) at `3·b + h`
/// instead of `27·b + 9·h` (`views_with_a_unit_axis_are_copied_before_burn_reshapes_them`,
/// tests/model.rs, shows it; inside burn's fusion wrapper it happens where the reshape is not
/// fused into a kernel that reads the view through its own strides). Reshapes to a lower or
/// equal rank, and views without an axis of size 1, burn gets right (it copies where strides
/// cannot express the new shape), so only views with a unit axis are copied here: the scalar
/// slots of the packed inputs and parameters, one chunk or one step taken out of a sequence,
/// copied by [`dense_copy`].
pub fn reshapable<B: Backend, const D: usize>(view: Tensor<B, D>) -> Tensor<B, D> {
    if view.dims().contains(&1) {
        dense_copy(&view)
    } else {
        view
    }
}

/// A copy of `x` in a buffer of its own (dense in `x`'s axis order on burn's cubecl backend; the
/// fusion wrapper picks its output's layout itself). An element-wise operation
/// whose input no other tensor shares writes into that input's buffer and keeps its strides
/// (burn's cubecl backend and its fusion wrapper both do), so the copy is made while the
/// caller's `x` still holds the buffer.
pub fn dense_copy<B: Backend, const D: usize>(x: &Tensor<B, D>) -> Tensor<B, D> {
    x.clone().mul_scalar(1.0)
}

fn unary<B: Backend>(op: UnaryOp, x: Tensor<B, RANK>) -> Tensor<B, RANK> {
    match op {
        UnaryOp::Neg => x.neg(),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.log(),
        UnaryOp::Sigmoid => activation::sigmoid(x),
        UnaryOp::LogSigmoid => activation::log_sigmoid(x),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Softplus => activation::softplus(x, 1.0),
        UnaryOp::Silu => activation::silu(x),
        UnaryOp::Relu => activation::relu(x),
        UnaryOp::Abs => x.abs(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Step => x.greater_elem(0.0).float(),
        UnaryOp::Sign => x.sign(),
    }
}

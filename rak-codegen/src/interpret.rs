//! Reference interpreter: runs a cell over whole sequences in f64, forward and backward.
//!
//! This is the oracle every kernel is tested against. It evaluates the IR directly, element
//! by element, with no scheduling: the forward scan runs the step of [`crate::ir`] for every
//! batch element, head and time step; the backward scan runs the [`BackwardStep`] derived by
//! [`crate::autodiff`] in reverse time, recomputing each step's primal values from stored
//! states.
//!
//! Layouts (row-major, a value's dims flattened into its last axis):
//! input `[B, T, H, numel]` (before activation), parameter `[H, numel]`,
//! state `[B, H, numel]`, output `[B, T, H, numel]`.

use crate::ir::*;
use std::collections::HashMap;
use std::fmt;

/// A dense row-major f64 array.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor {
    pub fn zeros(shape: Vec<usize>) -> Self {
        let len = shape.iter().product();
        Tensor {
            shape,
            data: vec![0.0; len],
        }
    }

    pub fn filled(shape: Vec<usize>, value: f64) -> Self {
        let len = shape.iter().product();
        Tensor {
            shape,
            data: vec![value; len],
        }
    }

    /// The contiguous run of the last axis at the given leading coordinates.
    fn row(&self, leading: &[usize]) -> std::ops::Range<usize> {
        let width = *self.shape.last().unwrap_or(&1);
        let mut offset = 0;
        for (axis, &coordinate) in leading.iter().enumerate() {
            offset = offset * self.shape[axis] + coordinate;
        }
        offset * width..(offset + 1) * width
    }
}

/// A shape error in the interpreter's arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterpretError(pub String);

impl fmt::Display for InterpretError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InterpretError {}

/// The sizes of a scan: batch, time, heads, and every dim of the cell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanShape {
    pub batch: usize,
    pub time: usize,
    pub heads: usize,
    /// The size of each dim, by [`DimId`].
    pub dims: Vec<usize>,
}

impl ScanShape {
    /// Sizes for `cell`; `dims` names every dim of the cell once, e.g. `&[("K", 5), ("V", 7)]`.
    pub fn new(
        cell: &Cell,
        batch: usize,
        time: usize,
        heads: usize,
        dims: &[(&str, usize)],
    ) -> Result<Self, InterpretError> {
        let mut sizes = Vec::new();
        for dim in &cell.dims {
            let size = dims
                .iter()
                .find(|(name, _)| *name == dim.name)
                .map(|(_, s)| *s);
            match size {
                Some(size) if size > 0 => sizes.push(size),
                Some(_) => {
                    return Err(InterpretError(format!(
                        "dim `{}` must be at least 1",
                        dim.name
                    )));
                }
                None => {
                    return Err(InterpretError(format!(
                        "no size given for dim `{}`",
                        dim.name
                    )));
                }
            }
        }
        if let Some((name, _)) = dims
            .iter()
            .find(|(n, _)| !cell.dims.iter().any(|d| d.name == *n))
        {
            return Err(InterpretError(format!(
                "cell `{}` has no dim `{name}`",
                cell.name
            )));
        }
        if batch == 0 || heads == 0 {
            return Err(InterpretError(
                "batch and heads must be at least 1".to_string(),
            ));
        }
        Ok(ScanShape {
            batch,
            time,
            heads,
            dims: sizes,
        })
    }

    pub fn input(&self, cell: &Cell, input: InputId) -> Vec<usize> {
        let width = Cell::numel(&cell.inputs[input.0].shape, &self.dims);
        vec![self.batch, self.time, self.heads, width]
    }

    pub fn param(&self, cell: &Cell, param: ParamId) -> Vec<usize> {
        vec![
            self.heads,
            Cell::numel(&cell.params[param.0].shape, &self.dims),
        ]
    }

    pub fn state(&self, cell: &Cell, state: StateId) -> Vec<usize> {
        vec![
            self.batch,
            self.heads,
            Cell::numel(&cell.states[state.0].shape, &self.dims),
        ]
    }

    pub fn output(&self, cell: &Cell, output: OutputId) -> Vec<usize> {
        let width = Cell::numel(&cell.outputs[output.0].shape, &self.dims);
        vec![self.batch, self.time, self.heads, width]
    }
}

/// What a scan reads. `initial_states: None` starts every state from its declared value.
#[derive(Clone, Debug)]
pub struct ScanInputs {
    pub inputs: Vec<Tensor>,
    pub params: Vec<Tensor>,
    pub initial_states: Option<Vec<Tensor>>,
}

#[derive(Clone, Debug)]
pub struct ScanOutputs {
    pub outputs: Vec<Tensor>,
    pub final_states: Vec<Tensor>,
}

/// Gradients of a loss with respect to everything a scan reads.
#[derive(Clone, Debug)]
pub struct ScanGradients {
    /// Before activation, `[B, T, H, numel]`.
    pub inputs: Vec<Tensor>,
    /// Summed over batch and time, `[H, numel]`.
    pub params: Vec<Tensor>,
    pub initial_states: Vec<Tensor>,
}

fn expect_shapes(
    what: &str,
    names: &[String],
    tensors: &[Tensor],
    shapes: &[Vec<usize>],
) -> Result<(), InterpretError> {
    if tensors.len() != shapes.len() {
        return Err(InterpretError(format!(
            "expected {} {what} tensors, got {}",
            shapes.len(),
            tensors.len()
        )));
    }
    for ((tensor, shape), name) in tensors.iter().zip(shapes).zip(names) {
        if tensor.shape != *shape || tensor.data.len() != shape.iter().product::<usize>() {
            return Err(InterpretError(format!(
                "{what} `{name}` has shape {:?} (with {} values); expected {shape:?}",
                tensor.shape,
                tensor.data.len()
            )));
        }
    }
    Ok(())
}

fn validate(cell: &Cell, shape: &ScanShape, inputs: &ScanInputs) -> Result<(), InterpretError> {
    let names = |list: Vec<&String>| list.into_iter().cloned().collect::<Vec<_>>();
    let input_shapes: Vec<_> = (0..cell.inputs.len())
        .map(|i| shape.input(cell, InputId(i)))
        .collect();
    expect_shapes(
        "input",
        &names(cell.inputs.iter().map(|i| &i.name).collect()),
        &inputs.inputs,
        &input_shapes,
    )?;
    let param_shapes: Vec<_> = (0..cell.params.len())
        .map(|p| shape.param(cell, ParamId(p)))
        .collect();
    expect_shapes(
        "parameter",
        &names(cell.params.iter().map(|p| &p.name).collect()),
        &inputs.params,
        &param_shapes,
    )?;
    if let Some(initial) = &inputs.initial_states {
        let state_shapes: Vec<_> = (0..cell.states.len())
            .map(|s| shape.state(cell, StateId(s)))
            .collect();
        expect_shapes(
            "initial state",
            &names(cell.states.iter().map(|s| &s.name).collect()),
            initial,
            &state_shapes,
        )?;
    }
    Ok(())
}

/// The values one step reads and writes, for one batch element and head.
struct StepValues {
    input_pre: Vec<Vec<f64>>,
    input: Vec<Vec<f64>>,
    params: Vec<Vec<f64>>,
    previous: Vec<Vec<f64>>,
    current: Vec<Vec<f64>>,
    lets: Vec<Vec<f64>>,
    outputs: Vec<Vec<f64>>,
    grads: HashMap<Grad, Vec<f64>>,
}

impl StepValues {
    fn new(cell: &Cell) -> Self {
        StepValues {
            input_pre: vec![Vec::new(); cell.inputs.len()],
            input: vec![Vec::new(); cell.inputs.len()],
            params: vec![Vec::new(); cell.params.len()],
            previous: vec![Vec::new(); cell.states.len()],
            current: vec![Vec::new(); cell.states.len()],
            lets: vec![Vec::new(); cell.lets.len()],
            outputs: vec![Vec::new(); cell.outputs.len()],
            grads: HashMap::new(),
        }
    }

    fn get(&self, value: Value) -> &[f64] {
        match value {
            Value::Input(i) => &self.input[i.0],
            Value::InputPreActivation(i) => &self.input_pre[i.0],
            Value::Param(p) => &self.params[p.0],
            Value::State(s, StateTime::Previous) => &self.previous[s.0],
            Value::State(s, StateTime::Current) => &self.current[s.0],
            Value::Let(l) => &self.lets[l.0],
            Value::Grad(g) => self.grads.get(&g).map_or(&[], Vec::as_slice),
        }
    }
}

/// Evaluates expressions of one cell, element by element.
struct Evaluator<'a> {
    cell: &'a Cell,
    dims: &'a [usize],
    /// The current value of every index variable.
    env: Vec<usize>,
}

impl<'a> Evaluator<'a> {
    fn new(cell: &'a Cell, dims: &'a [usize]) -> Self {
        Evaluator {
            cell,
            dims,
            env: vec![0; cell.indices.len()],
        }
    }

    fn size(&self, index: IndexId) -> usize {
        self.dims[self.cell.index_dim(index).0]
    }

    fn eval(&mut self, values: &StepValues, expr: ExprId) -> f64 {
        match self.cell.exprs.get(expr) {
            Expr::Const(Constant(c)) => *c,
            Expr::Load { value, indices } => {
                let shape = self.cell.value_shape(*value);
                let mut offset = 0;
                for (dim, index) in shape.iter().zip(indices) {
                    offset = offset * self.dims[dim.0] + self.env[index.0];
                }
                values.get(*value)[offset]
            }
            Expr::Unary(op, a) => op.apply(self.eval(values, *a)),
            Expr::Binary(op, a, b) => {
                let a = self.eval(values, *a);
                op.apply(a, self.eval(values, *b))
            }
            Expr::Sum { index, body } => {
                let saved = self.env[index.0];
                let mut total = 0.0;
                for position in 0..self.size(*index) {
                    self.env[index.0] = position;
                    total += self.eval(values, *body);
                }
                self.env[index.0] = saved;
                total
            }
        }
    }

    /// `target[indices] = expr` for every index combination, in row-major order.
    fn assign(&mut self, values: &StepValues, indices: &[IndexId], expr: ExprId) -> Vec<f64> {
        let sizes: Vec<usize> = indices.iter().map(|&i| self.size(i)).collect();
        let total: usize = sizes.iter().product();
        let mut result = Vec::with_capacity(total);
        for flat in 0..total {
            let mut rest = flat;
            for (&index, &size) in indices.iter().zip(&sizes).rev() {
                self.env[index.0] = rest % size;
                rest /= size;
            }
            result.push(self.eval(values, expr));
        }
        result
    }

    /// Runs one forward step: activations, lets, updates, outputs.
    fn step(&mut self, values: &mut StepValues) {
        let cell = self.cell;
        for (id, input) in cell.inputs.iter().enumerate() {
            let pre = &values.input_pre[id];
            values.input[id] = match input.activation {
                Some(op) => pre.iter().map(|&x| op.apply(x)).collect(),
                None => pre.clone(),
            };
        }
        for (id, definition) in cell.lets.iter().enumerate() {
            values.lets[id] = self.assign(values, &definition.indices, definition.expr);
        }
        for update in &cell.updates {
            values.current[update.state.0] = self.assign(values, &update.indices, update.expr);
        }
        for (id, definition) in cell.outputs.iter().enumerate() {
            values.outputs[id] = self.assign(values, &definition.indices, definition.expr);
        }
    }
}

/// Loads the step's inputs at `(b, t, h)`.
fn load_inputs(values: &mut StepValues, inputs: &ScanInputs, b: usize, t: usize, h: usize) {
    for (id, tensor) in inputs.inputs.iter().enumerate() {
        values.input_pre[id] = tensor.data[tensor.row(&[b, t, h])].to_vec();
    }
}

fn initial_state(
    cell: &Cell,
    shape: &ScanShape,
    inputs: &ScanInputs,
    state: usize,
    b: usize,
    h: usize,
) -> Vec<f64> {
    match &inputs.initial_states {
        Some(initial) => initial[state].data[initial[state].row(&[b, h])].to_vec(),
        None => vec![cell.states[state].init; Cell::numel(&cell.states[state].shape, &shape.dims)],
    }
}

/// Runs the forward scan: every output at every step, and the final states.
pub fn forward(
    cell: &Cell,
    shape: &ScanShape,
    inputs: &ScanInputs,
) -> Result<ScanOutputs, InterpretError> {
    validate(cell, shape, inputs)?;
    let mut outputs: Vec<Tensor> = (0..cell.outputs.len())
        .map(|o| Tensor::zeros(shape.output(cell, OutputId(o))))
        .collect();
    let mut final_states: Vec<Tensor> = (0..cell.states.len())
        .map(|s| Tensor::zeros(shape.state(cell, StateId(s))))
        .collect();
    let mut evaluator = Evaluator::new(cell, &shape.dims);
    let mut values = StepValues::new(cell);
    for b in 0..shape.batch {
        for h in 0..shape.heads {
            for (p, tensor) in inputs.params.iter().enumerate() {
                values.params[p] = tensor.data[tensor.row(&[h])].to_vec();
            }
            for s in 0..cell.states.len() {
                values.previous[s] = initial_state(cell, shape, inputs, s, b, h);
            }
            for t in 0..shape.time {
                load_inputs(&mut values, inputs, b, t, h);
                evaluator.step(&mut values);
                for (o, tensor) in outputs.iter_mut().enumerate() {
                    let row = tensor.row(&[b, t, h]);
                    tensor.data[row].copy_from_slice(&values.outputs[o]);
                }
                std::mem::swap(&mut values.previous, &mut values.current);
            }
            for (s, tensor) in final_states.iter_mut().enumerate() {
                let row = tensor.row(&[b, h]);
                tensor.data[row].copy_from_slice(&values.previous[s]);
            }
        }
    }
    Ok(ScanOutputs {
        outputs,
        final_states,
    })
}

/// Runs the backward scan of `step` given ∂L/∂outputs and ∂L/∂final states.
pub fn backward(
    step: &BackwardStep,
    shape: &ScanShape,
    inputs: &ScanInputs,
    d_outputs: &[Tensor],
    d_final_states: &[Tensor],
) -> Result<ScanGradients, InterpretError> {
    let cell = &step.cell;
    validate(cell, shape, inputs)?;
    let output_names: Vec<String> = cell.outputs.iter().map(|o| o.name.clone()).collect();
    let output_shapes: Vec<_> = (0..cell.outputs.len())
        .map(|o| shape.output(cell, OutputId(o)))
        .collect();
    expect_shapes("output gradient", &output_names, d_outputs, &output_shapes)?;
    let state_names: Vec<String> = cell.states.iter().map(|s| s.name.clone()).collect();
    let state_shapes: Vec<_> = (0..cell.states.len())
        .map(|s| shape.state(cell, StateId(s)))
        .collect();
    expect_shapes(
        "final state gradient",
        &state_names,
        d_final_states,
        &state_shapes,
    )?;

    let mut gradients = ScanGradients {
        inputs: (0..cell.inputs.len())
            .map(|i| Tensor::zeros(shape.input(cell, InputId(i))))
            .collect(),
        params: (0..cell.params.len())
            .map(|p| Tensor::zeros(shape.param(cell, ParamId(p))))
            .collect(),
        initial_states: state_shapes
            .iter()
            .map(|s| Tensor::zeros(s.clone()))
            .collect(),
    };
    let mut evaluator = Evaluator::new(cell, &shape.dims);
    let mut values = StepValues::new(cell);
    for b in 0..shape.batch {
        for h in 0..shape.heads {
            for (p, tensor) in inputs.params.iter().enumerate() {
                values.params[p] = tensor.data[tensor.row(&[h])].to_vec();
            }
            // Forward, keeping S_{t−1} of every step.
            let mut previous_states = Vec::with_capacity(shape.time);
            for s in 0..cell.states.len() {
                values.previous[s] = initial_state(cell, shape, inputs, s, b, h);
            }
            for t in 0..shape.time {
                previous_states.push(values.previous.clone());
                load_inputs(&mut values, inputs, b, t, h);
                evaluator.step(&mut values);
                std::mem::swap(&mut values.previous, &mut values.current);
            }
            let mut carry: Vec<Vec<f64>> = d_final_states
                .iter()
                .map(|g| g.data[g.row(&[b, h])].to_vec())
                .collect();
            for t in (0..shape.time).rev() {
                // Recompute the step's primal values from S_{t−1}.
                values.previous = previous_states[t].clone();
                load_inputs(&mut values, inputs, b, t, h);
                evaluator.step(&mut values);
                values.grads.clear();
                for (o, tensor) in d_outputs.iter().enumerate() {
                    values.grads.insert(
                        Grad::Output(OutputId(o)),
                        tensor.data[tensor.row(&[b, t, h])].to_vec(),
                    );
                }
                for (s, gradient) in carry.iter().enumerate() {
                    values
                        .grads
                        .insert(Grad::StateFromNext(StateId(s)), gradient.clone());
                }
                for definition in &step.definitions {
                    let result = evaluator.assign(&values, &definition.indices, definition.expr);
                    values.grads.insert(definition.grad, result);
                }
                for (i, tensor) in gradients.inputs.iter_mut().enumerate() {
                    let row = tensor.row(&[b, t, h]);
                    tensor.data[row].copy_from_slice(&values.grads[&Grad::Input(InputId(i))]);
                }
                for (p, tensor) in gradients.params.iter_mut().enumerate() {
                    let row = tensor.row(&[h]);
                    for (total, step_grad) in tensor.data[row]
                        .iter_mut()
                        .zip(&values.grads[&Grad::Param(ParamId(p))])
                    {
                        *total += step_grad;
                    }
                }
                for (s, gradient) in carry.iter_mut().enumerate() {
                    *gradient = values.grads[&Grad::StatePrevious(StateId(s))].clone();
                }
            }
            for (s, tensor) in gradients.initial_states.iter_mut().enumerate() {
                let row = tensor.row(&[b, h]);
                tensor.data[row].copy_from_slice(&carry[s]);
            }
        }
    }
    Ok(gradients)
}

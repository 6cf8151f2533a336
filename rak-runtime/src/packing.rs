//! How a cell's values travel as single tensors between the model and the cell: every input of
//! a step side by side in one `[B, T, H, Σ input widths]` tensor (what one fused projection
//! produces), every parameter in one `[H, Σ parameter sizes]`, every state in one
//! `[B, H, Σ state sizes]`, every output in one `[B, T, H, Σ output widths]`. Values are packed
//! in declaration order, each flattened row-major over its dims.

use crate::codegen::ir::{Cell, Shape};

/// Where each value of one kind sits in its packed tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packing {
    /// `(offset, width)` of each value along the packed axis.
    pub slots: Vec<(usize, usize)>,
    /// The packed axis' length.
    pub width: usize,
}

impl Packing {
    fn of<'a>(shapes: impl Iterator<Item = &'a Shape>, dims: &[usize]) -> Self {
        let mut slots = Vec::new();
        let mut width = 0;
        for shape in shapes {
            let numel = Cell::numel(shape, dims);
            slots.push((width, numel));
            width += numel;
        }
        Packing { slots, width }
    }

    pub fn inputs(cell: &Cell, dims: &[usize]) -> Self {
        Self::of(cell.inputs.iter().map(|i| &i.shape), dims)
    }

    pub fn params(cell: &Cell, dims: &[usize]) -> Self {
        Self::of(cell.params.iter().map(|p| &p.shape), dims)
    }

    pub fn states(cell: &Cell, dims: &[usize]) -> Self {
        Self::of(cell.states.iter().map(|s| &s.shape), dims)
    }

    pub fn outputs(cell: &Cell, dims: &[usize]) -> Self {
        Self::of(cell.outputs.iter().map(|o| &o.shape), dims)
    }
}

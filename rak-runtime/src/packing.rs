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

    /// At least one column wide: a cell without parameters (SimpleRNN) gets one unused column,
    /// so that no tensor of a model is empty. CUDA refuses to copy an empty tensor to or from
    /// the device (its strides are not row-major: a zero-length axis gives a zero stride) and to
    /// launch a kernel over none of it (`CUDA_ERROR_INVALID_VALUE`), which broke training on
    /// the H200 of 2026-12-04; the unused column is never read and its gradient is zero.
    pub fn params(cell: &Cell, dims: &[usize]) -> Self {
        let mut packing = Self::of(cell.params.iter().map(|p| &p.shape), dims);
        packing.width = packing.width.max(1);
        packing
    }

    /// The columns no slot covers (the unused column of [`Self::params`]): `(offset, width)`.
    pub fn uncovered(&self) -> Option<(usize, usize)> {
        let covered: usize = self.slots.iter().map(|&(_, width)| width).sum();
        (covered < self.width).then_some((covered, self.width - covered))
    }

    pub fn states(cell: &Cell, dims: &[usize]) -> Self {
        Self::of(cell.states.iter().map(|s| &s.shape), dims)
    }

    pub fn outputs(cell: &Cell, dims: &[usize]) -> Self {
        Self::of(cell.outputs.iter().map(|o| &o.shape), dims)
    }
}

//! Index arithmetic: where a statement's element lies in the workspace and in global memory,
//! the decoding of a flat element into index variables, and the guard that skips values past
//! the end of the split axis.

use super::*;

impl Emitter<'_> {
    /// Where element `e` of the cube's part of a value of `shape` lies in the value's global
    /// row: statements that define `global` from `e`, and, when the shape has the split axis,
    /// the condition that the element is inside the axis (the last tile may pass its end).
    pub(super) fn tile_position(&self, shape: &Shape) -> (TokenStream, Option<TokenStream>) {
        let Some(split_position) = shape.iter().position(|&d| self.is_split(d)) else {
            return (quote!(let global = e;), None);
        };
        let coords: Vec<Ident> = (0..shape.len()).map(|n| format_ident!("c_{n}")).collect();
        let mut decode = quote!(let mut rest = e;);
        for (n, &dim) in shape.iter().enumerate().rev() {
            let (coord, extent) = (&coords[n], self.extent(dim));
            decode.extend(if n == 0 {
                quote!(let #coord = rest;)
            } else {
                quote!(let #coord = rest % #extent; rest /= #extent;)
            });
        }
        let mut global = quote!(0usize);
        for (n, &dim) in shape.iter().enumerate() {
            let coord = &coords[n];
            let coord = if n == split_position {
                quote!((tile_start + #coord))
            } else {
                quote!(#coord)
            };
            global = if n == 0 {
                coord
            } else {
                let dim = self.dim(dim);
                quote!((#global) * #dim + #coord)
            };
        }
        let (last, dim) = (&coords[split_position], self.dim(shape[split_position]));
        decode.extend(quote!(let global = #global;));
        (decode, Some(quote!(tile_start + #last < #dim)))
    }

    /// A loop over the cube's elements of a value of `shape`: `body` sees the element in the
    /// workspace as `e` and its position in the value's global row as `global`. Along the
    /// split axis only the cube's tile is visited, and values past the axis' end are skipped.
    pub(super) fn shape_loop(&self, shape: &Shape, body: TokenStream) -> TokenStream {
        let numel = self.local_numel(shape);
        let body = match self.tile_position(shape) {
            (decode, None) => quote!(#decode #body),
            (decode, Some(inside)) => quote! {
                #decode
                if #inside {
                    #body
                }
            },
        };
        self.for_each_element(numel, body)
    }

    /// Decodes the element `e` into the statement's index variables (row-major).
    pub(super) fn decode_indices(&self, indices: &[IndexId]) -> TokenStream {
        self.decode_indices_from(indices, quote!(e))
    }

    /// Decodes the element at row-major position `flat` into the index variables of `indices`.
    pub(super) fn decode_indices_from(
        &self,
        indices: &[IndexId],
        flat: TokenStream,
    ) -> TokenStream {
        let mut tokens = quote!(let mut rest = #flat;);
        for (position, &index) in indices.iter().enumerate().rev() {
            let var = self.index_var(index);
            let dim = self.extent(self.cell.index_dim(index));
            if position == 0 {
                tokens.extend(quote!(let #var = rest;));
            } else {
                tokens.extend(quote!(let #var = rest % #dim; rest /= #dim;));
            }
        }
        tokens
    }

    /// The representative of a sum's class: the buffer it is materialised in.
    pub(super) fn sum_class(&self, sum: ExprId) -> ExprId {
        self.sum_classes.get(&sum).copied().unwrap_or(sum)
    }

    /// The row-major position of `indices` in a workspace buffer of their dims.
    pub(super) fn flat_index(&self, indices: &[IndexId]) -> TokenStream {
        let mut flat = quote!(0usize);
        for (position, &index) in indices.iter().enumerate() {
            let var = self.index_var(index);
            if position == 0 {
                flat = quote!(#var);
            } else {
                let dim = self.extent(self.cell.index_dim(index));
                flat = quote!((#flat) * #dim + #var);
            }
        }
        flat
    }

    /// The row-major position of `indices` in a value in global memory (an index over the
    /// split axis counts from the cube's `tile_start`).
    pub(super) fn global_index(&self, indices: &[IndexId]) -> TokenStream {
        let mut flat = quote!(0usize);
        for (position, &index) in indices.iter().enumerate() {
            let var = self.index_var(index);
            let dim = self.cell.index_dim(index);
            let coord = if self.is_split(dim) {
                quote!((tile_start + #var))
            } else {
                quote!(#var)
            };
            if position == 0 {
                flat = coord;
            } else {
                let dim = self.dim(dim);
                flat = quote!((#flat) * #dim + #coord);
            }
        }
        flat
    }

    /// `tile_start + j < dim_V` if `indices` include an index over the split axis.
    pub(super) fn split_guard(&self, indices: &[IndexId]) -> Option<TokenStream> {
        let &index = indices
            .iter()
            .find(|&&i| self.is_split(self.cell.index_dim(i)))?;
        let var = self.index_var(index);
        let dim = self.dim(self.cell.index_dim(index));
        Some(quote!(tile_start + #var < #dim))
    }

    /// `tokens`, run only where [`Self::split_guard`] of `indices` holds (always without one).
    pub(super) fn guarded(&self, indices: &[IndexId], tokens: TokenStream) -> TokenStream {
        match self.split_guard(indices) {
            Some(guard) => quote!(if #guard { #tokens }),
            None => tokens,
        }
    }

    /// The dims of a statement's indices.
    pub(super) fn shape_of(&self, indices: &[IndexId]) -> Shape {
        indices.iter().map(|&i| self.cell.index_dim(i)).collect()
    }

    pub(super) fn index_var(&self, index: IndexId) -> Ident {
        format_ident!("{}_{}", self.cell.indices[index.0].name, index.0)
    }
}

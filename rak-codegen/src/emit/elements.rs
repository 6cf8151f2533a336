//! Loops over a statement's elements shared among a cube's units: element `e` goes to unit
//! `e mod units`; unrolled where each unit has few elements, and computed into registers
//! before any is stored where the values read could alias the values written.

use super::*;

/// A unit's share of a loop over elements ([`Emitter::strided_elements`]): the `m`-th of its
/// `count` elements is `unit + (first + m) · units` (`unit + m · units` without `first`),
/// bound to `element` in `body`; `unroll` is the loop's attribute.
pub(super) struct StridedElements<'n> {
    pub(super) element: &'n Ident,
    pub(super) first: Option<TokenStream>,
    pub(super) count: TokenStream,
    pub(super) unroll: TokenStream,
    pub(super) all_exist: TokenStream,
    pub(super) numel: &'n TokenStream,
    pub(super) body: TokenStream,
}

/// One element of a statement ([`Emitter::computed_then_stored`]): `statements` compute its
/// `value`, which `write` stores.
pub(super) struct ElementValue {
    pub(super) statements: TokenStream,
    pub(super) value: Ident,
    pub(super) write: TokenStream,
}

/// Loops over a statement's elements ([`Emitter::for_each_element`]) are
/// unrolled where each unit has at most this many elements.
const UNROLLED_ELEMENTS: usize = 32;

impl Emitter<'_> {
    /// A loop sharing `numel` elements (a comptime expression) among the cube's units; `body`
    /// sees the element as `e`. Each unit's `m`-th element is `unit + m · units` for a
    /// constant number of `m`, the loop unrolled up to [`UNROLLED_ELEMENTS`] per unit, and the
    /// bounds test drops out (a comptime `true ||`) where `units` divides `numel`. Unrolled, a
    /// unit's reads are independent of each other and issue together. (As a `while e < numel`
    /// loop its trip count depended on the unit: NVVM emitted it unrolled by four with a
    /// remainder loop, each element's test and address of its own.)
    pub(super) fn for_each_element(&self, numel: TokenStream, body: TokenStream) -> TokenStream {
        let element = ident("e");
        let elements = self.strided_elements(StridedElements {
            element: &element,
            first: None,
            count: quote!(elements_per_unit),
            unroll: quote!(#[unroll(elements_per_unit <= #UNROLLED_ELEMENTS)]),
            all_exist: quote!(#numel % units == 0),
            numel: &numel,
            body,
        });
        quote! {
            {
                let elements_per_unit = comptime![(#numel + units - 1) / units];
                #elements
            }
        }
    }

    /// [`Self::for_each_element`] for a statement: `locate` (statements) decodes the element
    /// `e`, `guard` wraps what runs only for elements that exist (the split axis' tile may pass
    /// its end). Where the loop is unrolled, every element's value is computed into a register
    /// first and stored after, in a second loop: a statement's operands and its target share
    /// the workspace, so a store between two reads of the same operand (a value per key read
    /// by every element of its row) makes the compilers read it again, where all reads before
    /// any store read it once and issue together.
    pub(super) fn computed_then_stored(
        &self,
        numel: TokenStream,
        locate: TokenStream,
        guard: impl Fn(TokenStream) -> TokenStream,
        element: ElementValue,
    ) -> TokenStream {
        let ElementValue {
            statements,
            value,
            write,
        } = element;
        let results = ident("results");
        let element = ident("e");
        let compute = guard(quote!(#statements #results[m] = #value;));
        let store = guard(quote!(let #value = #results[m]; #write));
        let one_pass = guard(quote!(#statements #write));
        let strided = |unroll: TokenStream, body: TokenStream| {
            self.strided_elements(StridedElements {
                element: &element,
                first: None,
                count: quote!(elements_per_unit),
                unroll,
                all_exist: quote!(#numel % units == 0),
                numel: &numel,
                body: quote!(#locate #body),
            })
        };
        let computes = strided(quote!(#[unroll]), compute);
        let stores = strided(quote!(#[unroll]), store);
        let serial = strided(quote!(), one_pass);
        quote! {
            {
                let elements_per_unit = comptime![(#numel + units - 1) / units];
                if comptime![elements_per_unit <= #UNROLLED_ELEMENTS] {
                    let mut #results = Array::<f32>::new(comptime![elements_per_unit.max(1)]);
                    #computes
                    #stores
                } else {
                    #serial
                }
            }
        }
    }

    /// The loop over a unit's elements `unit + (first + m) · units` for `m` in `0..count`
    /// (comptime), named `element` in `body`, which runs for those below `numel`. `all_exist`
    /// (comptime) says that every element visited is below `numel`: then the test is a constant
    /// `true ||` that the compilers fold away. One helper for the per-unit loops of
    /// [`Self::for_each_element`] and [`Self::unit_elements`].
    pub(super) fn strided_elements(&self, elements: StridedElements) -> TokenStream {
        let StridedElements {
            element,
            first,
            count,
            unroll,
            all_exist,
            numel,
            body,
        } = elements;
        let position = match first {
            Some(first) => quote!(unit + (#first + m) * units),
            None => quote!(unit + m * units),
        };
        quote! {
            #unroll
            for m in 0..#count {
                let #element = #position;
                if comptime![#all_exist] || #element < #numel {
                    #body
                }
            }
        }
    }
}

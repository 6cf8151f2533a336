//! The syntax tree of a cell, as written: names are still identifiers, nothing is resolved.
//!
//! Produced by [`crate::parse`], consumed by [`crate::lower`]. Every node keeps the spans of
//! its tokens so later passes can point at them.

use crate::diagnostic::SourceRange;
use proc_macro2::{Ident, TokenStream};

/// `/// docs  pub cell Name { items }`
#[derive(Clone, Debug)]
pub struct CellSyntax {
    /// The text of the doc comments, one entry per line.
    pub docs: Vec<String>,
    /// The visibility tokens (`pub`, `pub(crate)`, or nothing), re-emitted by the macro.
    pub visibility: TokenStream,
    pub name: Ident,
    pub items: Vec<Item>,
}

#[derive(Clone, Debug)]
pub enum Item {
    /// `dims K, V;`
    Dims(Vec<Ident>),
    /// `input q[K], k[K] = sigmoid;`
    Inputs(Vec<InputSyntax>),
    /// `param A_log = uniform(0.0, 2.7);`
    Params(Vec<ParamSyntax>),
    /// `state S[K, V] = 0;`
    States(Vec<StateSyntax>),
    /// `let u[j] = ...;`
    Let(AssignSyntax),
    /// `update S[i, j] = ...;`
    Update(AssignSyntax),
    /// `output o[j] = ...;`
    Output(AssignSyntax),
}

/// The dims in brackets after a declared name; empty for a scalar (per head).
pub type ShapeSyntax = Vec<Ident>;

#[derive(Clone, Debug)]
pub struct InputSyntax {
    pub name: Ident,
    pub shape: ShapeSyntax,
    /// `= sigmoid`
    pub activation: Option<Ident>,
}

#[derive(Clone, Debug)]
pub struct ParamSyntax {
    pub name: Ident,
    pub shape: ShapeSyntax,
    pub init: Option<InitSyntax>,
}

/// How a parameter is initialised: `= 0.5`, `= normal(0.0, 0.02)`, `= uniform(3.0, 6.0)`.
#[derive(Clone, Debug)]
pub enum InitSyntax {
    Constant(NumberSyntax),
    Call {
        function: Ident,
        args: Vec<NumberSyntax>,
        range: SourceRange,
    },
}

#[derive(Clone, Debug)]
pub struct StateSyntax {
    pub name: Ident,
    pub shape: ShapeSyntax,
    /// `= 0`: the value every element starts from when no initial state is given.
    pub init: Option<NumberSyntax>,
}

#[derive(Clone, Copy, Debug)]
pub struct NumberSyntax {
    pub value: f64,
    pub range: SourceRange,
}

/// `keyword target[indices] = value;`
#[derive(Clone, Debug)]
pub struct AssignSyntax {
    pub target: Ident,
    pub indices: Vec<Ident>,
    pub value: ExprSyntax,
    /// From the keyword to the semicolon.
    pub range: SourceRange,
    /// `target[indices]`
    pub target_range: SourceRange,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinarySyntaxOp {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Clone, Debug)]
pub enum ExprSyntax {
    Number(NumberSyntax),
    /// `x`, `x[]` or `x[i, j]`
    Access {
        name: Ident,
        indices: Vec<Ident>,
        range: SourceRange,
    },
    /// `f(a, b)`
    Call {
        function: Ident,
        args: Vec<ExprSyntax>,
        range: SourceRange,
    },
    /// `-a`
    Neg {
        operand: Box<ExprSyntax>,
        range: SourceRange,
    },
    Binary {
        op: BinarySyntaxOp,
        lhs: Box<ExprSyntax>,
        rhs: Box<ExprSyntax>,
        range: SourceRange,
    },
    /// `sum(i, j) term`: the body is the multiplicative term that follows.
    Sum {
        indices: Vec<Ident>,
        body: Box<ExprSyntax>,
        range: SourceRange,
    },
    /// `( e )`, kept for precise ranges.
    Paren {
        inner: Box<ExprSyntax>,
        range: SourceRange,
    },
}

impl ExprSyntax {
    pub fn range(&self) -> SourceRange {
        match self {
            ExprSyntax::Number(number) => number.range,
            ExprSyntax::Access { range, .. }
            | ExprSyntax::Call { range, .. }
            | ExprSyntax::Neg { range, .. }
            | ExprSyntax::Binary { range, .. }
            | ExprSyntax::Sum { range, .. }
            | ExprSyntax::Paren { range, .. } => *range,
        }
    }
}

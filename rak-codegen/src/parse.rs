//! Parse pass: tokens → [`CellSyntax`].
//!
//! The grammar (the same in `rak::cell! { ... }` and in `.rak` files):
//!
//! ```text
//! cell    := doc-comment* visibility? "cell" Name "{" item* "}"
//! item    := "dims" Name,+ ";"
//!          | "input" Name shape? ("=" activation)? ,+ ";"
//!          | "param" Name shape? ("=" init)? ,+ ";"
//!          | "state" Name shape? ("=" number)? ,+ ";"
//!          | ("let" | "update" | "output") Name indices? "=" expr ";"
//! shape   := "[" Dim,* "]"          indices := "[" index,* "]"
//! init    := number | Name "(" number,* ")"
//! expr    := term (("+" | "-") term)*
//! term    := unary (("*" | "/") unary)*
//! unary   := "-" unary | "sum" "(" index,+ ")" term | primary
//! primary := number | Name indices? | Name "(" expr,* ")" | "(" expr ")"
//! ```
//!
//! `sum(i)` takes the multiplicative term after it, as in math notation:
//! `sum(l) k[l] * S[l, j] - v[j]` is `(Σ_l k[l]·S[l, j]) − v[j]`.
//!
//! Syntax errors come from syn and point at the unexpected token. Nesting is bounded so that
//! no input can overflow the stack.

use crate::diagnostic::{Diagnostics, SourceRange};
use crate::syntax::*;
use proc_macro2::TokenStream;
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{Ident, Token, braced, bracketed, parenthesized, token};

/// Deepest expression nesting accepted (parentheses, calls, unary minus, sums).
const MAX_NESTING: usize = 64;

/// Parses the tokens of one cell (the body of `rak::cell!`, or a `.rak` file).
pub fn parse_cell(tokens: TokenStream) -> Result<CellSyntax, Diagnostics> {
    syn::parse2::<CellSyntax>(tokens).map_err(Diagnostics::from)
}

/// Parses cell source text: the contents of a `.rak` file.
pub fn parse_cell_str(source: &str) -> Result<CellSyntax, Diagnostics> {
    let tokens: TokenStream = source.parse().map_err(|error: proc_macro2::LexError| {
        Diagnostics::from(syn::Error::new(
            error.span(),
            "cannot split the cell into tokens: is a `(`, `[` or `{` left open, or a quote unclosed?"))
    })?;
    parse_cell(tokens)
}

const ITEM_KEYWORDS: &str = "`dims`, `input`, `param`, `state`, `let`, `update` or `output`";

impl Parse for CellSyntax {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut docs = Vec::new();
        for attribute in input.call(syn::Attribute::parse_outer)? {
            match &attribute.meta {
                syn::Meta::NameValue(syn::MetaNameValue {
                    path,
                    value:
                        syn::Expr::Lit(syn::ExprLit {
                            lit: syn::Lit::Str(text),
                            ..
                        }),
                    ..
                }) if path.is_ident("doc") => docs.push(text.value()),
                _ => {
                    return Err(syn::Error::new_spanned(
                        attribute,
                        "only doc comments (`///`) are allowed on a cell",
                    ));
                }
            }
        }
        let visibility: syn::Visibility = input.parse()?;
        let keyword = input
            .call(Ident::parse_any)
            .map_err(|error| syn::Error::new(error.span(), "expected `cell Name { ... }`"))?;
        if keyword != "cell" {
            return Err(syn::Error::new(
                keyword.span(),
                "expected `cell Name { ... }`",
            ));
        }
        let name: Ident = input.parse()?;
        let body;
        braced!(body in input);
        let mut items = Vec::new();
        while !body.is_empty() {
            items.push(parse_item(&body)?);
        }
        if !input.is_empty() {
            return Err(input.error("unexpected tokens after the cell's closing brace"));
        }
        Ok(CellSyntax {
            docs,
            visibility: visibility.into_token_stream(),
            name,
            items,
        })
    }
}

fn parse_item(input: ParseStream) -> syn::Result<Item> {
    let keyword = input
        .call(Ident::parse_any)
        .map_err(|error| syn::Error::new(error.span(), format!("expected {ITEM_KEYWORDS}")))?;
    let item = match keyword.to_string().as_str() {
        "dims" => Item::Dims(comma_list(input, |input| input.parse::<Ident>())?),
        "input" => Item::Inputs(comma_list(input, parse_input)?),
        "param" => Item::Params(comma_list(input, parse_param)?),
        "state" => Item::States(comma_list(input, parse_state)?),
        "let" => return parse_assign(input, &keyword).map(Item::Let),
        "update" => return parse_assign(input, &keyword).map(Item::Update),
        "output" => return parse_assign(input, &keyword).map(Item::Output),
        other => {
            return Err(syn::Error::new(
                keyword.span(),
                format!("unknown item `{other}`: expected {ITEM_KEYWORDS}"),
            ));
        }
    };
    input.parse::<Token![;]>()?;
    Ok(item)
}

/// `a, b, c` (at least one), stopping before the `;`.
fn comma_list<T>(
    input: ParseStream,
    parser: fn(ParseStream) -> syn::Result<T>,
) -> syn::Result<Vec<T>> {
    let list = Punctuated::<T, Token![,]>::parse_separated_nonempty_with(input, parser)?;
    Ok(list.into_iter().collect())
}

/// `[A, B]`, or nothing for a scalar.
fn parse_shape(input: ParseStream) -> syn::Result<ShapeSyntax> {
    if !input.peek(token::Bracket) {
        return Ok(Vec::new());
    }
    let content;
    bracketed!(content in input);
    let dims = Punctuated::<Ident, Token![,]>::parse_terminated(&content)?;
    Ok(dims.into_iter().collect())
}

fn parse_input(input: ParseStream) -> syn::Result<InputSyntax> {
    let name: Ident = input.parse()?;
    let shape = parse_shape(input)?;
    let activation = if input.peek(Token![=]) {
        input.parse::<Token![=]>()?;
        Some(input.parse::<Ident>()?)
    } else {
        None
    };
    Ok(InputSyntax {
        name,
        shape,
        activation,
    })
}

fn parse_param(input: ParseStream) -> syn::Result<ParamSyntax> {
    let name: Ident = input.parse()?;
    let shape = parse_shape(input)?;
    let mut init = None;
    if input.peek(Token![=]) {
        input.parse::<Token![=]>()?;
        init = Some(if input.peek(Ident) {
            let function: Ident = input.parse()?;
            let content;
            let parens = parenthesized!(content in input);
            let args = Punctuated::<NumberSyntax, Token![,]>::parse_terminated_with(
                &content,
                parse_number,
            )?;
            let range = SourceRange::new(function.span(), parens.span.close());
            InitSyntax::Call {
                function,
                args: args.into_iter().collect(),
                range,
            }
        } else {
            InitSyntax::Constant(parse_number(input)?)
        });
    }
    Ok(ParamSyntax { name, shape, init })
}

fn parse_state(input: ParseStream) -> syn::Result<StateSyntax> {
    let name: Ident = input.parse()?;
    let shape = parse_shape(input)?;
    let init = if input.peek(Token![=]) {
        input.parse::<Token![=]>()?;
        Some(parse_number(input)?)
    } else {
        None
    };
    Ok(StateSyntax { name, shape, init })
}

/// A literal number, optionally negated: `2`, `0.5`, `-1e-6`.
fn parse_number(input: ParseStream) -> syn::Result<NumberSyntax> {
    let minus = input.parse::<Option<Token![-]>>()?;
    let literal: syn::Lit = input
        .parse()
        .map_err(|error| syn::Error::new(error.span(), "expected a number"))?;
    let (value, suffix) = match &literal {
        syn::Lit::Float(float) => (float.base10_parse::<f64>(), float.suffix()),
        syn::Lit::Int(int) => (int.base10_parse::<f64>(), int.suffix()),
        _ => return Err(syn::Error::new_spanned(&literal, "expected a number")),
    };
    if !suffix.is_empty() {
        return Err(syn::Error::new_spanned(
            &literal,
            format!("remove the suffix `{suffix}`: numbers in a cell carry no type"),
        ));
    }
    let value = value?;
    if !value.is_finite() {
        return Err(syn::Error::new_spanned(&literal, "number out of range"));
    }
    let end = literal.span();
    let start = minus.map_or(end, |minus| minus.span);
    let value = if minus.is_some() { -value } else { value };
    Ok(NumberSyntax {
        value,
        range: SourceRange::new(start, end),
    })
}

fn parse_assign(input: ParseStream, keyword: &Ident) -> syn::Result<AssignSyntax> {
    let target: Ident = input.parse()?;
    let (indices, target_end) = parse_indices(input)?;
    let target_range = SourceRange::new(target.span(), target_end.unwrap_or(target.span()));
    input.parse::<Token![=]>()?;
    let value = parse_expr(input, 0)?;
    let semicolon = input.parse::<Token![;]>()?;
    Ok(AssignSyntax {
        target,
        indices,
        value,
        range: SourceRange::new(keyword.span(), semicolon.span),
        target_range,
    })
}

/// `[i, j]` after a name; returns the indices and the closing bracket's span.
fn parse_indices(input: ParseStream) -> syn::Result<(Vec<Ident>, Option<proc_macro2::Span>)> {
    if !input.peek(token::Bracket) {
        return Ok((Vec::new(), None));
    }
    let content;
    let brackets = bracketed!(content in input);
    let indices = Punctuated::<Ident, Token![,]>::parse_terminated(&content)?;
    Ok((indices.into_iter().collect(), Some(brackets.span.close())))
}

fn nested(input: ParseStream, depth: usize) -> syn::Result<usize> {
    if depth >= MAX_NESTING {
        return Err(input.error(format!(
            "expression nested more than {MAX_NESTING} levels deep"
        )));
    }
    Ok(depth + 1)
}

fn parse_expr(input: ParseStream, depth: usize) -> syn::Result<ExprSyntax> {
    let mut lhs = parse_term(input, depth)?;
    loop {
        let op = if input.peek(Token![+]) {
            input.parse::<Token![+]>()?;
            BinarySyntaxOp::Add
        } else if input.peek(Token![-]) {
            input.parse::<Token![-]>()?;
            BinarySyntaxOp::Sub
        } else {
            return Ok(lhs);
        };
        let rhs = parse_term(input, depth)?;
        lhs = binary(op, lhs, rhs);
    }
}

fn parse_term(input: ParseStream, depth: usize) -> syn::Result<ExprSyntax> {
    let mut lhs = parse_unary(input, depth)?;
    loop {
        let op = if input.peek(Token![*]) {
            input.parse::<Token![*]>()?;
            BinarySyntaxOp::Mul
        } else if input.peek(Token![/]) {
            input.parse::<Token![/]>()?;
            BinarySyntaxOp::Div
        } else {
            return Ok(lhs);
        };
        let rhs = parse_unary(input, depth)?;
        lhs = binary(op, lhs, rhs);
    }
}

fn binary(op: BinarySyntaxOp, lhs: ExprSyntax, rhs: ExprSyntax) -> ExprSyntax {
    let range = lhs.range().to(rhs.range());
    ExprSyntax::Binary {
        op,
        lhs: Box::new(lhs),
        rhs: Box::new(rhs),
        range,
    }
}

fn parse_unary(input: ParseStream, depth: usize) -> syn::Result<ExprSyntax> {
    let depth = nested(input, depth)?;
    if input.peek(Token![-]) {
        let minus = input.parse::<Token![-]>()?;
        let operand = parse_unary(input, depth)?;
        let range = SourceRange::token(minus.span).to(operand.range());
        return Ok(ExprSyntax::Neg {
            operand: Box::new(operand),
            range,
        });
    }
    if input.peek(Ident) && input.peek2(token::Paren) {
        let fork = input.fork();
        if fork.parse::<Ident>()? == "sum" {
            let keyword: Ident = input.parse()?;
            let content;
            let parens = parenthesized!(content in input);
            let indices = Punctuated::<Ident, Token![,]>::parse_terminated(&content)?;
            if indices.is_empty() {
                return Err(syn::Error::new(
                    parens.span.join(),
                    "`sum` needs the index to sum over: `sum(i) ...`",
                ));
            }
            let body = parse_term(input, depth)?;
            let range = SourceRange::token(keyword.span()).to(body.range());
            let indices = indices.into_iter().collect();
            return Ok(ExprSyntax::Sum {
                indices,
                body: Box::new(body),
                range,
            });
        }
    }
    parse_primary(input, depth)
}

fn parse_primary(input: ParseStream, depth: usize) -> syn::Result<ExprSyntax> {
    if input.peek(syn::Lit) {
        return parse_number(input).map(ExprSyntax::Number);
    }
    if input.peek(token::Paren) {
        let content;
        let parens = parenthesized!(content in input);
        let inner = parse_expr(&content, depth)?;
        if !content.is_empty() {
            return Err(content.error("expected an operator or `)`"));
        }
        let range = SourceRange::new(parens.span.open(), parens.span.close());
        return Ok(ExprSyntax::Paren {
            inner: Box::new(inner),
            range,
        });
    }
    if input.peek(Ident) {
        let name: Ident = input.parse()?;
        if input.peek(token::Paren) {
            let content;
            let parens = parenthesized!(content in input);
            let mut args = Vec::new();
            while !content.is_empty() {
                args.push(parse_expr(&content, depth)?);
                if content.is_empty() {
                    break;
                }
                content.parse::<Token![,]>()?;
            }
            let range = SourceRange::new(name.span(), parens.span.close());
            return Ok(ExprSyntax::Call {
                function: name,
                args,
                range,
            });
        }
        let (indices, end) = parse_indices(input)?;
        let range = SourceRange::new(name.span(), end.unwrap_or(name.span()));
        return Ok(ExprSyntax::Access {
            name,
            indices,
            range,
        });
    }
    Err(input.error("expected a number, a name, a function call or `(`"))
}

//! Diagnostics: errors tied to a range of the user's tokens.
//!
//! Every pass reports problems as [`Diagnostic`]s. Inside the `cell!` macro they become
//! `compile_error!`s spanned to the offending tokens; for `.rak` files the CLI renders them
//! with the file name, line, column and a caret under the source.

use proc_macro2::{Ident, Span, TokenStream};
use quote::{ToTokens, TokenStreamExt};
use std::fmt;

/// A range of source tokens, from the first token's span to the last one's.
///
/// Stable proc macros cannot join spans, so the range keeps both ends (as `syn::Error` does).
#[derive(Clone, Copy, Debug)]
pub struct SourceRange {
    pub start: Span,
    pub end: Span,
}

impl SourceRange {
    pub fn new(start: Span, end: Span) -> Self {
        SourceRange { start, end }
    }

    /// A range covering one token.
    pub fn token(span: Span) -> Self {
        SourceRange {
            start: span,
            end: span,
        }
    }

    /// The range from the start of `self` to the end of `other`.
    pub fn to(self, other: SourceRange) -> Self {
        SourceRange {
            start: self.start,
            end: other.end,
        }
    }
}

impl From<Span> for SourceRange {
    fn from(span: Span) -> Self {
        SourceRange::token(span)
    }
}

/// Two placeholder tokens carrying the ends of a range, so that `syn::Error::new_spanned`
/// spans the whole range.
struct RangeTokens(SourceRange);

impl ToTokens for RangeTokens {
    fn to_tokens(&self, tokens: &mut TokenStream) {
        tokens.append(Ident::new("start", self.0.start));
        tokens.append(Ident::new("end", self.0.end));
    }
}

/// One error: what is wrong and where.
#[derive(Clone, Debug)]
pub struct Diagnostic {
    pub range: SourceRange,
    pub message: String,
}

impl Diagnostic {
    pub fn new(range: impl Into<SourceRange>, message: impl Into<String>) -> Self {
        Diagnostic {
            range: range.into(),
            message: message.into(),
        }
    }

    pub fn to_syn_error(&self) -> syn::Error {
        syn::Error::new_spanned(RangeTokens(self.range), &self.message)
    }
}

impl From<syn::Error> for Diagnostic {
    fn from(error: syn::Error) -> Self {
        Diagnostic::new(error.span(), error.to_string())
    }
}

/// All errors a pass found, in source order of discovery. Never empty.
#[derive(Clone, Debug)]
pub struct Diagnostics(Vec<Diagnostic>);

impl Diagnostics {
    /// Wraps a non-empty list; `None` when there is nothing to report.
    pub fn from_vec(list: Vec<Diagnostic>) -> Option<Self> {
        (!list.is_empty()).then_some(Diagnostics(list))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// One `syn::Error` holding every diagnostic; `to_compile_error()` emits them all.
    pub fn to_syn_error(&self) -> syn::Error {
        let mut errors = self.0.iter().map(Diagnostic::to_syn_error);
        let mut first = errors.next().expect("Diagnostics is never empty");
        for error in errors {
            first.combine(error);
        }
        first
    }

    /// Renders the diagnostics against the text they were parsed from (a `.rak` file), in the
    /// style of rustc: `error: ...`, ` --> file:line:col`, the source line and carets.
    pub fn render(&self, source: &str, file_name: &str) -> String {
        let lines: Vec<&str> = source.lines().collect();
        let mut out = String::new();
        for diagnostic in &self.0 {
            let start = diagnostic.range.start.start();
            let end = diagnostic.range.end.end();
            out.push_str(&format!("error: {}\n", diagnostic.message));
            out.push_str(&format!(
                " --> {}:{}:{}\n",
                file_name,
                start.line,
                start.column + 1
            ));
            let Some(line) = start.line.checked_sub(1).and_then(|i| lines.get(i)) else {
                continue;
            };
            let gutter = start.line.to_string();
            let pad = " ".repeat(gutter.len());
            let width = if end.line == start.line && end.column > start.column {
                end.column - start.column
            } else {
                line.chars().count().saturating_sub(start.column).max(1)
            };
            out.push_str(&format!("{pad} |\n{gutter} | {line}\n{pad} | "));
            out.push_str(&" ".repeat(start.column));
            out.push_str(&"^".repeat(width));
            out.push('\n');
        }
        out
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, diagnostic) in self.0.iter().enumerate() {
            if n > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {}", diagnostic.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl From<Diagnostic> for Diagnostics {
    fn from(diagnostic: Diagnostic) -> Self {
        Diagnostics(vec![diagnostic])
    }
}

impl From<syn::Error> for Diagnostics {
    fn from(error: syn::Error) -> Self {
        Diagnostics(error.into_iter().map(Diagnostic::from).collect())
    }
}

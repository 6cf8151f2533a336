//! The `rak::cell!` macro: declares an RNN cell in rak's DSL.
//!
//! The macro runs rak's compiler front end ([`rak_codegen`]) on its input at compile time.
//! Every mistake becomes a compile error spanned to the offending tokens; a correct cell
//! expands to a unit struct implementing `rak::CellDefinition`. Use it through the `rak`
//! crate (`rak::cell! { ... }`): the expansion names `::rak` paths. See `docs/dsl.md`.

use proc_macro::TokenStream;
use quote::quote;
use rak_codegen::Diagnostics;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Declares an RNN cell. See `docs/dsl.md` for the syntax.
///
/// ```ignore
/// rak::cell! {
///     /// The SimpleRNN of the seed.
///     pub cell SimpleRnn {
///         dims K, V;
///         input q[K], k[K] = sigmoid, v[V], g[K] = sigmoid;
///         state S[K, V];
///         update S[i, j] = g[i] * S[i, j] + k[i] * v[j];
///         output o[j] = sum(i) q[i] * S[i, j];
///     }
/// }
/// ```
#[proc_macro]
pub fn cell(input: TokenStream) -> TokenStream {
    let input = proc_macro2::TokenStream::from(input);
    // The front end must never panic; should it, report the panic as an error, not a crash.
    let expanded = catch_unwind(AssertUnwindSafe(|| expand(input)));
    match expanded {
        Ok(Ok(tokens)) => tokens.into(),
        Ok(Err(errors)) => errors.to_syn_error().to_compile_error().into(),
        Err(panic) => {
            let detail = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            let message = format!("internal error in rak::cell! (please report it): {detail}");
            quote!(::core::compile_error!(#message);).into()
        }
    }
}

fn expand(input: proc_macro2::TokenStream) -> Result<proc_macro2::TokenStream, Diagnostics> {
    let source = input.to_string();
    let syntax = rak_codegen::parse::parse_cell(input)?;
    rak_codegen::compile_syntax(&syntax)?;
    let name = &syntax.name;
    let name_text = name.to_string();
    let visibility = &syntax.visibility;
    let docs = &syntax.docs;
    Ok(quote! {
        #(#[doc = #docs])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        #visibility struct #name;

        impl ::rak::CellDefinition for #name {
            const NAME: &'static str = #name_text;
            const SOURCE: &'static str = #source;
        }
    })
}

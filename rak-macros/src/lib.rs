//! The `rak::cell!` macro: declares an RNN cell in rak's DSL.
//!
//! The macro runs rak's compiler ([`rak_codegen`]) on its input at compile time. Every mistake
//! becomes a compile error spanned to the offending tokens; a correct cell expands to a unit
//! struct implementing `rak::CellDefinition` and `rak::kernels::CellKernels`, and a module
//! `<snake_name>_kernels` with its generated cubecl kernels. Use it through the `rak`
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
    let compiled = rak_codegen::compile_syntax(&syntax)?;
    let name = &syntax.name;
    let name_text = name.to_string();
    let visibility = &syntax.visibility;
    let docs = &syntax.docs;
    let module = quote::format_ident!("{}_kernels", snake_case(&name_text));
    let module_doc = format!("The kernels `rak::cell!` generated for [`{name_text}`].");
    let kernels = rak_codegen::emit::emit_kernels(&compiled);
    let cubecl = quote!(::rak::cubecl::prelude);
    let array = quote!(::rak::kernels::DeviceArray);
    Ok(quote! {
        #(#[doc = #docs])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        #visibility struct #name;

        impl ::rak::CellDefinition for #name {
            const NAME: &'static str = #name_text;
            const SOURCE: &'static str = #source;
        }

        #[doc = #module_doc]
        #[allow(non_snake_case, unused, clippy::all)]
        #visibility mod #module {
            use ::rak::cubecl;
            use cubecl::prelude::*;
            #kernels
        }

        impl ::rak::kernels::CellKernels for #name {
            fn launch_forward<F: #cubecl::Float + #cubecl::CubeElement, R: #cubecl::Runtime>(
                client: &#cubecl::ComputeClient<R>,
                shape: &::rak::codegen::ScanShape,
                schedule: ::rak::codegen::schedule::Schedule,
                steps: ::core::ops::Range<usize>,
                buffers: &::rak::kernels::ForwardBuffers,
                workspace: &#array,
                placeholder: &#array,
            ) {
                #module::launch_forward::<F, R>(client, shape, schedule, steps, buffers, workspace, placeholder)
            }

            fn forward_definition<F: #cubecl::Float + #cubecl::CubeElement, R: #cubecl::Runtime>(
                client: &#cubecl::ComputeClient<R>,
                dims: &[usize],
                heads: usize,
                schedule: ::rak::codegen::schedule::Schedule,
            ) -> #cubecl::KernelDefinition {
                #module::forward_definition::<F, R>(client, dims, heads, schedule)
            }

            fn backward_definition<F: #cubecl::Float + #cubecl::CubeElement, R: #cubecl::Runtime>(
                client: &#cubecl::ComputeClient<R>,
                dims: &[usize],
                heads: usize,
                schedule: ::rak::codegen::schedule::Schedule,
            ) -> #cubecl::KernelDefinition {
                #module::backward_definition::<F, R>(client, dims, heads, schedule)
            }

            fn step_definition<F: #cubecl::Float + #cubecl::CubeElement, R: #cubecl::Runtime>(
                client: &#cubecl::ComputeClient<R>,
                dims: &[usize],
                heads: usize,
                schedule: ::rak::codegen::schedule::Schedule,
            ) -> #cubecl::KernelDefinition {
                #module::step_definition::<F, R>(client, dims, heads, schedule)
            }

            fn launch_step<F: #cubecl::Float + #cubecl::CubeElement, R: #cubecl::Runtime>(
                client: &#cubecl::ComputeClient<R>,
                shape: &::rak::codegen::ScanShape,
                schedule: ::rak::codegen::schedule::Schedule,
                buffers: &::rak::kernels::StepBuffers,
                workspace: &#array,
            ) {
                #module::launch_step::<F, R>(client, shape, schedule, buffers, workspace)
            }

            fn launch_backward<F: #cubecl::Float + #cubecl::CubeElement, R: #cubecl::Runtime>(
                client: &#cubecl::ComputeClient<R>,
                shape: &::rak::codegen::ScanShape,
                schedule: ::rak::codegen::schedule::Schedule,
                chunks_from_end: ::core::ops::Range<usize>,
                buffers: &::rak::kernels::BackwardBuffers,
                param_partials: &[#array],
                workspace: &#array,
            ) {
                #module::launch_backward::<F, R>(client, shape, schedule, chunks_from_end, buffers, param_partials, workspace)
            }
        }
    })
}

/// `SimpleRnn` → `simple_rnn`.
fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (position, c) in name.chars().enumerate() {
        if c.is_uppercase() {
            if position > 0 && !out.ends_with('_') {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

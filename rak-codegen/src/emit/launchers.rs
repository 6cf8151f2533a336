//! Host functions that launch the three kernels from tensor handles: cube counts, tiles,
//! workspace sizes and the comptime parameters the schedule picked.

use super::*;

impl Emitter<'_> {
    /// Host functions that launch the kernels from handles (shapes already validated).
    pub(super) fn launchers(&self) -> TokenStream {
        let cell = self.cell;
        let dims = cell.dims.iter().enumerate().map(|(n, d)| {
            let name = format_ident!("dim_{}", d.name);
            quote!(let #name = dims[#n];)
        });
        let mut dims: Vec<TokenStream> = dims.collect();
        let mut dim_args: Vec<TokenStream> = cell
            .dims
            .iter()
            .map(|d| {
                let name = format_ident!("dim_{}", d.name);
                quote!(#name)
            })
            .collect();
        dim_args.push(quote!(schedule.chunk));
        // The split axis' tile (resolved by the host; the whole axis if unset) and the number
        // of cubes per sequence.
        match &self.plan.split {
            Some(plan) => {
                let dim = self.dim(plan.dim);
                dims.push(quote! {
                    let tile = schedule.tile.unwrap_or(#dim).clamp(1, #dim);
                    let tiles = #dim.div_ceil(tile);
                });
                dim_args.push(quote!(tile));
            }
            None => dims.push(quote!(let tiles = 1usize;)),
        }
        dims.push(quote! {
            let shared_workspace =
                schedule.placement == ::rak::codegen::schedule::Placement::Shared;
            let series_near_zero = schedule.series_near_zero.unwrap_or(true);
        });
        dim_args.push(quote!(shared_workspace));
        dim_args.push(quote!(series_near_zero));
        dim_args.push(quote!(schedule.cube_dim as usize));
        dim_args.push(quote!(schedule.sum_parts));
        // `element` views a buffer as an array of F, `single` as an array of f32.
        let arrays = |kind: &str, list: TokenStream, count: usize| {
            let view = ident(kind);
            let items = (0..count).map(|n| quote!(#view(&#list[#n])));
            quote!(#(#items,)*)
        };
        let inputs = arrays("element", quote!(buffers.inputs), cell.inputs.len());
        let params = arrays("element", quote!(buffers.params), cell.params.len());
        let states = cell.states.len();
        let initial = arrays("element", quote!(initial), states);
        let outputs = arrays("element", quote!(buffers.outputs), cell.outputs.len());
        let finals = arrays("element", quote!(buffers.final_states), states);
        let checkpoints = arrays("single", quote!(checkpoints), states);
        let grad_outputs = arrays("element", quote!(buffers.grad_outputs), cell.outputs.len());
        let grad_finals = arrays("element", quote!(buffers.grad_final_states), states);
        let grad_inputs = arrays("element", quote!(buffers.grad_inputs), cell.inputs.len());
        let grad_params = arrays("single", quote!(param_partials), cell.params.len());
        let grad_initial = arrays("element", quote!(buffers.grad_initial_states), states);
        let backward_checkpoints = arrays("single", quote!(buffers.checkpoints), states);
        // One compilation argument per runtime parameter of each kernel: its arrays and the
        // workspace, then the scans' three scalars (time and the launch's range).
        let (inputs_n, params_n, outputs_n) =
            (cell.inputs.len(), cell.params.len(), cell.outputs.len());
        let forward_arrays = inputs_n + params_n + 3 * states + outputs_n + 1;
        let backward_arrays = 2 * inputs_n + 2 * params_n + 3 * states + outputs_n + 1;
        let compilation_args = |arrays: usize, scalars: usize| {
            let mut args = vec![quote!(ArrayCompilationArg { inplace: None }); arrays];
            args.extend(vec![quote!(Default::default()); scalars]);
            args
        };
        // `name(client, dims, heads, schedule)`: the kernel's definition at these sizes.
        let definition = |kernel: &str, arrays: usize, scalars: usize, flags: TokenStream| {
            let name = format_ident!("{kernel}_definition");
            let doc = format!(
                " The definition of [`{kernel}`] at these sizes (to print its CUDA or WGSL source)."
            );
            let module = ident(kernel);
            let kernel_type = format_ident!("{}", kernel[..1].to_uppercase() + &kernel[1..]);
            let compilation = compilation_args(arrays, scalars);
            quote! {
                #[doc = #doc]
                pub fn #name<F: Float + CubeElement, R: Runtime>(
                    client: &ComputeClient<R>,
                    dims: &[usize],
                    heads: usize,
                    schedule: ::rak::codegen::schedule::Schedule,
                ) -> cubecl::prelude::KernelDefinition {
                    #(#dims)*
                    let _ = tiles;
                    let settings = KernelSettings::default().cube_dim(CubeDim::new_1d(schedule.cube_dim));
                    #module::#kernel_type::<F, R>::new(
                        settings,
                        client.clone(),
                        #(#compilation,)*
                        heads,
                        #(#dim_args,)*
                        #flags
                    )
                    .define()
                }
            }
        };
        // The forward scan's `registers` flag, if it has states to hold in registers.
        let registers = (!crate::schedule::register_states(cell).is_empty())
            .then(|| quote!(schedule.registers,));
        let forward_definition = definition(
            "forward",
            forward_arrays,
            3,
            quote!(schedule.stage, true, true, #registers),
        );
        // The backward scan's (`recompute_registers`), if its recomputation has states to
        // hold in registers.
        let recompute_registers = (!crate::schedule::recomputed_register_states(cell).is_empty())
            .then(|| quote!(schedule.recompute_registers,));
        // And its `walk_registers`, if its walk has state gradients to carry in registers.
        let walk_registers = (!crate::schedule::carried_register_grads(self.step).is_empty())
            .then(|| quote!(schedule.walk_registers,));
        let backward_registers = quote!(#recompute_registers #walk_registers);
        let backward_definition =
            definition("backward", backward_arrays, 3, quote!(#backward_registers));
        let step_arrays = inputs_n + params_n + states + outputs_n + 1;
        let step_definition = definition("step", step_arrays, 0, TokenStream::new());
        let step_states = arrays("element", quote!(buffers.states), states);
        let views = quote! {
            let element = |array: &::rak::kernels::DeviceArray| unsafe {
                ArrayArg::from_raw_parts(array.handle.clone(), array.len)
            };
            let single = element;
        };
        quote! {
            /// Launches [`forward`] for the steps `steps`; `buffers` must have been validated
            /// against `shape`.
            pub fn launch_forward<F: Float + CubeElement, R: Runtime>(
                client: &ComputeClient<R>,
                shape: &::rak::codegen::ScanShape,
                schedule: ::rak::codegen::schedule::Schedule,
                steps: ::core::ops::Range<usize>,
                buffers: &::rak::kernels::ForwardBuffers,
                workspace: &::rak::kernels::DeviceArray,
                placeholder: &::rak::kernels::DeviceArray,
            ) {
                let dims = &shape.dims;
                #(#dims)*
                #views
                // Absent initial states and checkpoints: the kernel never reads these.
                let placeholders = vec![placeholder.clone(); #states];
                let initial = buffers.initial_states.as_deref().unwrap_or(&placeholders);
                let checkpoints = buffers.checkpoints.as_deref().unwrap_or(&placeholders);
                // Safety: every buffer was checked against the shape, and the kernel reads and
                // writes only inside the shape (tested on the software adapter).
                unsafe { forward::launch_unchecked::<F, R>(
                    client,
                    CubeCount::Static((shape.batch * shape.heads * tiles) as u32, 1, 1),
                    CubeDim::new_1d(schedule.cube_dim),
                    #inputs #params #initial #outputs #finals #checkpoints
                    single(workspace),
                    shape.time as u32,
                    steps.start as u32,
                    steps.end as u32,
                    shape.heads,
                    #(#dim_args,)*
                    schedule.stage,
                    buffers.initial_states.is_some(),
                    buffers.checkpoints.is_some(),
                    #registers
                ) };
            }

            #forward_definition

            #backward_definition

            #step_definition

            /// Launches [`step`] (the split axis whole, whatever `schedule.tile` says);
            /// `buffers` must have been validated against `shape` (one step).
            pub fn launch_step<F: Float + CubeElement, R: Runtime>(
                client: &ComputeClient<R>,
                shape: &::rak::codegen::ScanShape,
                schedule: ::rak::codegen::schedule::Schedule,
                buffers: &::rak::kernels::StepBuffers,
                workspace: &::rak::kernels::DeviceArray,
            ) {
                let schedule = ::rak::codegen::schedule::Schedule { tile: None, ..schedule };
                let dims = &shape.dims;
                #(#dims)*
                #views
                // Safety: as for the forward scan.
                unsafe { step::launch_unchecked::<F, R>(
                    client,
                    CubeCount::Static((shape.batch * shape.heads * tiles) as u32, 1, 1),
                    CubeDim::new_1d(schedule.cube_dim),
                    #inputs #params #step_states #outputs
                    single(workspace),
                    shape.heads,
                    #(#dim_args,)*
                ) };
            }

            /// Launches [`backward`] for the chunks `chunks_from_end` (counted from the last);
            /// `buffers` must have been validated against `shape`.
            pub fn launch_backward<F: Float + CubeElement, R: Runtime>(
                client: &ComputeClient<R>,
                shape: &::rak::codegen::ScanShape,
                schedule: ::rak::codegen::schedule::Schedule,
                chunks_from_end: ::core::ops::Range<usize>,
                buffers: &::rak::kernels::BackwardBuffers,
                param_partials: &[::rak::kernels::DeviceArray],
                workspace: &::rak::kernels::DeviceArray,
            ) {
                let dims = &shape.dims;
                #(#dims)*
                #views
                // Safety: as for the forward scan.
                unsafe { backward::launch_unchecked::<F, R>(
                    client,
                    CubeCount::Static((shape.batch * shape.heads * tiles) as u32, 1, 1),
                    CubeDim::new_1d(schedule.cube_dim),
                    #inputs #params #backward_checkpoints #grad_outputs #grad_finals
                    #grad_inputs #grad_params #grad_initial
                    single(workspace),
                    shape.time as u32,
                    chunks_from_end.start as u32,
                    chunks_from_end.end as u32,
                    shape.heads,
                    #(#dim_args,)*
                    #backward_registers
                ) };
            }
        }
    }
}

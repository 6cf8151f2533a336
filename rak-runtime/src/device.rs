//! Choosing where to run: CUDA when rak is built with the `cuda` feature and a GPU answers,
//! else wgpu's default adapter (a GPU if one exists, else the CPU through the software
//! adapter; `CUBECL_WGPU_DEFAULT_DEVICE=Cpu` forces it). Code generic over the backend runs
//! through a [`BackendVisitor`].

use crate::codegen::schedule::Schedule;
use crate::fused::FusedCellBackend;
use burn::tensor::backend::AutodiffBackend;

/// Code generic over the training backend.
pub trait BackendVisitor {
    type Output;
    fn visit<B>(self, device: B::Device, schedule: Schedule) -> Self::Output
    where
        B: AutodiffBackend + FusedCellBackend,
        B::InnerBackend: FusedCellBackend;
}

/// The backend in use, for printing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selected {
    pub name: String,
}

/// Runs `visitor` on the best backend available; returns what it chose, and the result.
pub fn run_on_best<V: BackendVisitor>(visitor: V) -> (Selected, V::Output) {
    #[cfg(feature = "cuda")]
    {
        let found = std::panic::catch_unwind(|| {
            use cubecl::Runtime;
            cubecl::cuda::CudaRuntime::client(&Default::default());
        });
        if found.is_ok() {
            let selected = Selected {
                name: "CUDA (device 0)".into(),
            };
            let device = burn::backend::cuda::CudaDevice::default();
            // GPUs run a whole scan in one launch.
            let schedule = Schedule::default();
            return (
                selected,
                visitor.visit::<burn::backend::Autodiff<burn::backend::Cuda>>(device, schedule),
            );
        }
    }
    #[cfg(feature = "wgpu")]
    {
        let device = burn::backend::wgpu::WgpuDevice::default();
        let adapter = match std::env::var("CUBECL_WGPU_DEFAULT_DEVICE") {
            Ok(choice) => format!("adapter {choice} (CUBECL_WGPU_DEFAULT_DEVICE)"),
            Err(_) => "default adapter: a GPU if one exists, else the CPU".into(),
        };
        let selected = Selected {
            name: format!("wgpu, {adapter}"),
        };
        // Mesa's software adapter caps every loop at 65,535 iterations per invocation: one
        // launch per chunk keeps every scan under it (a small cost on real GPUs).
        let schedule = Schedule {
            chunks_per_launch: Some(1),
            ..Schedule::default()
        };
        (
            selected,
            visitor.visit::<burn::backend::Autodiff<burn::backend::Wgpu>>(device, schedule),
        )
    }
    #[cfg(not(feature = "wgpu"))]
    {
        let _ = visitor;
        panic!("rak was built without a backend: enable the `wgpu` or `cuda` feature");
    }
}

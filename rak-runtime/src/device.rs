//! Choosing where to run: CUDA when rak is built with the `cuda` feature and a GPU answers,
//! else wgpu's default adapter (a GPU if one exists, else the CPU through the software
//! adapter; `CUBECL_WGPU_DEFAULT_DEVICE=Cpu` forces it). Code generic over the backend runs
//! through a [`BackendVisitor`] (training: autodiff over the fusion wrapper) or an
//! [`InferenceVisitor`] (inference: the cubecl backend itself).

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

/// Code generic over an inference backend (no autodiff, no fusion wrapper: the cubecl
/// backend itself, whose fused cell runs the single-step kernel).
pub trait InferenceVisitor {
    type Output;
    fn visit<B: FusedCellBackend>(self, device: B::Device, schedule: Schedule) -> Self::Output;
}

/// The device rak runs on, and the scan schedule that suits it.
enum Choice {
    #[cfg(feature = "cuda")]
    Cuda,
    #[cfg(feature = "wgpu")]
    Wgpu,
}

fn choose() -> (Selected, Choice, Schedule) {
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
            // GPUs run a whole scan in one launch.
            return (selected, Choice::Cuda, Schedule::default());
        }
    }
    #[cfg(feature = "wgpu")]
    {
        let adapter = match std::env::var("CUBECL_WGPU_DEFAULT_DEVICE") {
            Ok(choice) => format!("adapter {choice} (CUBECL_WGPU_DEFAULT_DEVICE)"),
            Err(_) => "default adapter: a GPU if one exists, else the CPU".into(),
        };
        let selected = Selected {
            name: format!("wgpu, {adapter}"),
        };
        // Mesa's software adapter allows one invocation 65,535 loop iterations in total, over
        // all its loops, and past that ends every loop silently: one launch per chunk bounds
        // what one launch runs by the chunk (a small cost on real GPUs). The configs' chunk of
        // 16 keeps every built-in cell under it at K = V = 128; chunks of 64 do not for DeltaNet
        // or Elman there (`docs/compiler.md`, "Time loop inside the kernel").
        let schedule = Schedule {
            chunks_per_launch: Some(1),
            ..Schedule::default()
        };
        (selected, Choice::Wgpu, schedule)
    }
    #[cfg(not(feature = "wgpu"))]
    panic!("rak was built without a backend: enable the `wgpu` or `cuda` feature");
}

/// Runs `visitor` on the best training backend available; returns what it chose, and the
/// result.
pub fn run_on_best<V: BackendVisitor>(visitor: V) -> (Selected, V::Output) {
    let (selected, choice, schedule) = choose();
    let output = match choice {
        #[cfg(feature = "cuda")]
        Choice::Cuda => visitor
            .visit::<burn::backend::Autodiff<burn::backend::Cuda>>(Default::default(), schedule),
        #[cfg(feature = "wgpu")]
        Choice::Wgpu => visitor
            .visit::<burn::backend::Autodiff<burn::backend::Wgpu>>(Default::default(), schedule),
    };
    (selected, output)
}

/// Runs `visitor` on the best inference backend available; returns what it chose, and the
/// result.
pub fn infer_on_best<V: InferenceVisitor>(visitor: V) -> (Selected, V::Output) {
    let (selected, choice, schedule) = choose();
    let output = match choice {
        #[cfg(feature = "cuda")]
        Choice::Cuda => visitor
            .visit::<burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>>(
                Default::default(),
                schedule,
            ),
        #[cfg(feature = "wgpu")]
        Choice::Wgpu => visitor
            .visit::<burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>>(
                Default::default(),
                schedule,
            ),
    };
    (selected, output)
}

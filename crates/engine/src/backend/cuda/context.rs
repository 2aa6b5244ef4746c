//! A small wrapper over the cudarc driver API: one context and one stream per device, NVRTC
//! compilation of our `.cu` sources to a cubin for the device's architecture (cached on disk under
//! `<cache root>/cuda/`, keyed by a hash of the source, the architecture, the NVRTC version and
//! the options), raw kernel launches, device buffers and event timing.
//!
//! Every failure is a [`CudaError`]; nothing here panics on a machine without a GPU, a driver or
//! NVRTC (the libraries are probed before cudarc's loaders, which would panic, are touched).

use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, result};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::ffi::{CString, c_void};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CudaError(pub String);

impl CudaError {
    pub fn new(msg: impl Into<String>) -> Self {
        CudaError(msg.into())
    }
}

pub type Result<T> = std::result::Result<T, CudaError>;

/// Adds context to cudarc's driver errors.
pub(crate) trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T, E: std::fmt::Debug> Ctx<T> for std::result::Result<T, E> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| CudaError(format!("{what}: {e:?}")))
    }
}

/// One GPU: context, a (non-default, capturable) stream, device facts, loaded modules.
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub ordinal: usize,
    pub name: String,
    /// Compute capability (major, minor).
    pub cc: (i32, i32),
    pub sm_count: usize,
    pub l2_bytes: usize,
    pub total_memory: usize,
    /// Kernels are launched with programmatic stream serialization (Hopper and later): a kernel
    /// may be launched while the one before it still runs, and waits for it inside
    /// (`griddepcontrol.wait` at the top of every kernel; see `pdl_prologue` in the sources).
    /// Opt-in (`FLASHMOE_CUDA_PDL=1`): on the H200 it shortened a decode step's GPU span by 2–3%
    /// but not the step (docs/performance.md, "Resident decode: host time per step").
    pub pdl: bool,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Kernel launches asked of this device (made, captured or skipped), so a replayed stretch
    /// of a step can be checked against the one recorded (see `skip_launches`).
    launches: AtomicU64,
    /// While set, `launch_3d` counts a launch and does nothing else: the caller replays a graph
    /// recorded from the same launches instead (a decode step's stretches between host waits).
    skipping: AtomicBool,
}

impl CudaDevice {
    /// Opens GPU `ordinal`. Errors (never panics) when there is no driver, no NVRTC or no such GPU.
    pub fn open(ordinal: usize) -> Result<Self> {
        // SAFETY: these only try to dlopen the libraries.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::new("no CUDA device: the driver library (libcuda.so) was not found"));
        }
        let n = CudaContext::device_count().ctx("no CUDA device: cuDeviceGetCount failed")?;
        if n <= 0 {
            return Err(CudaError::new("no CUDA device: the driver reports no GPU"));
        }
        if ordinal >= n as usize {
            return Err(CudaError(format!("no CUDA device {ordinal}: the driver reports {n} GPU(s)")));
        }
        let ctx = CudaContext::new(ordinal).ctx(&format!("cannot open GPU {ordinal}"))?;
        // One stream, ordered by construction: cudarc's per-buffer event tracking only adds
        // driver calls to every launch.
        // SAFETY: called before any buffer or stream exists on this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().ctx("cuStreamCreate")?;
        let cc = ctx.compute_capability().ctx("compute capability")?;
        let sm_count = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).ctx("SM count")?;
        let l2 = ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE).ctx("L2 size")?;
        Ok(CudaDevice {
            name: ctx.name().unwrap_or_else(|_| "unknown".into()),
            total_memory: ctx.total_mem().unwrap_or(0),
            ctx,
            stream,
            ordinal,
            cc,
            sm_count: sm_count.max(1) as usize,
            l2_bytes: l2.max(0) as usize,
            pdl: cc.0 >= 9 && std::env::var("FLASHMOE_CUDA_PDL").is_ok_and(|v| v == "1"),
            modules: Mutex::new(HashMap::new()),
            launches: AtomicU64::new(0),
            skipping: AtomicBool::new(false),
        })
    }

    /// `sm_90` etc.
    /// One line naming the device: ordinal, name, arch, SMs, L2 and memory.
    pub fn describe(&self) -> String {
        format!(
            "cuda:{} {} ({}, {} SMs, {} MiB L2, {} GiB)",
            self.ordinal,
            self.name,
            self.arch(),
            self.sm_count,
            self.l2_bytes >> 20,
            self.total_memory >> 30
        )
    }

    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.cc.0, self.cc.1)
    }

    /// The module built from `src` (one of [`super::kernels`]), compiled or read from the disk
    /// cache on first use.
    pub fn module(&self, (name, src): (&'static str, &'static str)) -> Result<Arc<CudaModule>> {
        let mut mods = self.modules.lock().map_err(|_| CudaError::new("module cache poisoned"))?;
        if let Some(m) = mods.get(name) {
            return Ok(m.clone());
        }
        let own = kernel_source_override(name)?;
        let cubin = self.cubin(name, own.as_deref().unwrap_or(src))?;
        let m = self.ctx.load_module(Ptx::from_binary(cubin)).ctx(&format!("loading module {name}"))?;
        mods.insert(name, m.clone());
        Ok(m)
    }

    pub fn function(&self, module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction> {
        module.load_function(name).ctx(&format!("kernel {name}"))
    }

    fn cubin(&self, name: &str, src: &str) -> Result<Vec<u8>> {
        // SAFETY: only tries to dlopen libnvrtc.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::new("NVRTC (libnvrtc.so) not found: it compiles the CUDA kernels at start"));
        }
        let (maj, min) = nvrtc_version()?;
        let opts = vec![
            format!("--gpu-architecture={}", self.arch()),
            "-std=c++17".to_string(),
            "-lineinfo".to_string(),
            "--fmad=true".to_string(),
        ];
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(src.as_bytes());
        h.update(format!("{maj}.{min}").as_bytes());
        for o in &opts {
            h.update(o.as_bytes());
        }
        let dir = cache_dir();
        let path = dir.join(format!("{name}-{}-nvrtc{maj}.{min}-{:016x}.cubin", self.arch(), h.digest()));
        if let Ok(bytes) = std::fs::read(&path)
            && !bytes.is_empty()
        {
            return Ok(bytes);
        }
        let cubin = compile_cubin(name, src, &opts)?;
        // Best effort: a read-only cache folder only costs a recompile next time.
        if std::fs::create_dir_all(&dir).is_ok() {
            let tmp = dir.join(format!(".{name}-{}.tmp", std::process::id()));
            if std::fs::write(&tmp, &cubin).is_ok() && std::fs::rename(&tmp, &path).is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
        Ok(cubin)
    }

    /// Makes this GPU's context current on the calling thread. One thread may drive several
    /// GPUs (a model split over them): every entry point of the backend calls this first, as
    /// the raw driver calls (launches, async copies) act on the current context.
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().ctx("cuCtxSetCurrent")
    }

    /// Device memory of `bytes` bytes (contents undefined).
    pub fn alloc(&self, bytes: usize) -> Result<DevBuf> {
        // SAFETY: uninitialized device memory of a plain byte type.
        let slice = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }
            .ctx(&format!("cuMemAlloc of {} MiB", bytes.div_ceil(1 << 20)))?;
        Ok(DevBuf { slice, len: bytes, stream: self.stream.clone() })
    }

    /// Device copy of `data`.
    pub fn upload(&self, data: &[u8]) -> Result<DevBuf> {
        let mut b = self.alloc(data.len())?;
        b.write(data)?;
        Ok(b)
    }

    pub fn upload_f32(&self, data: &[f32]) -> Result<DevBuf> {
        self.upload(f32_bytes(data))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().ctx("stream synchronize (a kernel failed?)")
    }

    /// An event that records timing.
    pub fn timing_event(&self) -> Result<CudaEvent> {
        self.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).ctx("cuEventCreate")
    }

    /// Launches `f` on the device's stream. `args` are pointers to the argument values, in order.
    ///
    /// # Safety
    /// `args` must match the kernel's parameter list in number, types and order, and every device
    /// pointer among them must be valid for what the kernel reads and writes.
    pub unsafe fn launch(
        &self,
        f: &CudaFunction,
        grid: u32,
        block: u32,
        shared: u32,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        // SAFETY: the caller upholds the argument contract.
        unsafe { self.launch_3d(f, (grid, 1, 1), block, shared, args) }.ctx("cuLaunchKernel")
    }

    /// [`CudaDevice::launch`] with a 3-D grid; every kernel launch of the engine goes through
    /// here (with programmatic stream serialization when [`CudaDevice::pdl`]).
    ///
    /// # Safety
    /// As for [`CudaDevice::launch`].
    pub unsafe fn launch_3d(
        &self,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: &mut [*mut c_void],
    ) -> std::result::Result<(), cudarc::driver::DriverError> {
        use cudarc::driver::sys;
        self.launches.fetch_add(1, Relaxed);
        if self.skipping.load(Relaxed) {
            return Ok(());
        }
        if !self.pdl {
            // SAFETY: the caller upholds the argument contract.
            return unsafe {
                result::launch_kernel(f.cu_function(), grid, (block, 1, 1), shared, self.stream.cu_stream(), args)
            };
        }
        // SAFETY: zero is a valid bit pattern of the attribute (an id and a plain-data union).
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let cfg = sys::CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: shared,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: 1,
        };
        // SAFETY: the config and attribute outlive the call; the caller upholds the argument
        // contract; every kernel waits for its predecessor before touching memory.
        unsafe { sys::cuLaunchKernelEx(&cfg, f.cu_function(), args.as_mut_ptr(), std::ptr::null_mut()).result() }
    }

    /// Records the work `f` enqueues on the device's stream into a CUDA graph (nothing runs
    /// until [`Graph::launch`]).
    /// The body's own error type is kept (a failure inside it is returned as it was).
    pub fn capture<E: From<CudaError>>(
        &self,
        f: impl FnOnce() -> std::result::Result<(), E>,
    ) -> std::result::Result<Graph, E> {
        self.begin_capture()?;
        let body = f();
        let g = self.end_capture();
        body?;
        Ok(g?.ok_or_else(|| CudaError::new("stream capture produced no graph"))?)
    }

    /// Kernel launches asked of this device so far (including captured and skipped ones).
    pub fn launch_count(&self) -> u64 {
        self.launches.load(Relaxed)
    }

    /// From now on, launches are counted and not made (the caller launches a graph recorded
    /// from the same launches instead), until `skip_launches(false)`.
    pub fn skip_launches(&self, skip: bool) {
        self.skipping.store(skip, Relaxed);
    }

    /// Starts recording the stream's work into a graph (for [`CudaDevice::end_capture`]); what
    /// [`CudaDevice::capture`] does around its closure, for callers whose recorded stretch does
    /// not fit one closure.
    pub fn begin_capture(&self) -> Result<()> {
        use cudarc::driver::sys::CUstreamCaptureMode;
        self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).ctx("cuStreamBeginCapture")
    }

    /// Ends a capture begun by [`CudaDevice::begin_capture`]: the instantiated graph, or None
    /// when nothing was recorded.
    pub fn end_capture(&self) -> Result<Option<Graph>> {
        use cudarc::driver::sys::CUgraphInstantiate_flags;
        Ok(self.stream.end_capture(CUgraphInstantiate_flags(0)).ctx("cuStreamEndCapture")?.map(Graph))
    }

    /// A pair of timing events on the device's stream.
    pub fn timer(&self) -> Result<Timer> {
        Ok(Timer { start: self.timing_event()?, end: self.timing_event()?, stream: self.stream.clone() })
    }

    /// Device-to-device copy of `bytes` bytes (stream-ordered).
    pub fn copy_dtod(&self, src: &DevBuf, dst: &DevBuf, bytes: usize) -> Result<()> {
        if bytes > src.len || bytes > dst.len {
            return Err(CudaError(format!("copy of {bytes} bytes between buffers of {} and {}", src.len, dst.len)));
        }
        // SAFETY: both ranges are inside live allocations of this context.
        unsafe { result::memcpy_dtod_async(dst.ptr(), src.ptr(), bytes, self.stream.cu_stream()) }.ctx("cuMemcpyDtoD")
    }
}

/// An instantiated CUDA graph.
pub struct Graph(cudarc::driver::CudaGraph);

// SAFETY: the graph handles may be used from any thread of the owning context; the GPU model
// keeps its graph behind a mutex, so it is never launched from two threads at once.
unsafe impl Send for Graph {}

impl Graph {
    /// Enqueues one replay on the stream it was captured from.
    pub fn launch(&self) -> Result<()> {
        self.0.launch().ctx("cuGraphLaunch")
    }
}

/// Device-side timing: `start()`, enqueue work, `stop()`, then `ms()` (waits for the work).
pub struct Timer {
    start: CudaEvent,
    end: CudaEvent,
    stream: Arc<CudaStream>,
}

impl Timer {
    pub fn start(&self) -> Result<()> {
        self.start.record(&self.stream).ctx("cuEventRecord")
    }

    pub fn stop(&self) -> Result<()> {
        self.end.record(&self.stream).ctx("cuEventRecord")
    }

    /// Milliseconds between `start` and `stop`.
    pub fn ms(&self) -> Result<f64> {
        self.stream.synchronize().ctx("stream synchronize (a kernel failed?)")?;
        Ok(self.start.elapsed_ms(&self.end).ctx("cuEventElapsedTime")? as f64)
    }
}

/// `FLASHMOE_KERNEL_DIR=DIR`: compile `DIR/<name>.cu` instead of the source built into the binary,
/// where that file exists (a kernel A/B on the GPU machine, which has no cargo, without a rebuild:
/// the same binary with and without the variable). Said on stderr, since results may differ.
fn kernel_source_override(name: &str) -> Result<Option<String>> {
    let Some(dir) = std::env::var_os("FLASHMOE_KERNEL_DIR") else { return Ok(None) };
    let path = PathBuf::from(dir).join(format!("{name}.cu"));
    if !path.exists() {
        return Ok(None);
    }
    let src = std::fs::read_to_string(&path)
        .map_err(|e| CudaError(format!("FLASHMOE_KERNEL_DIR: reading {}: {e}", path.display())))?;
    eprintln!("[flashmoe] kernel source {} (FLASHMOE_KERNEL_DIR), not the built-in one", path.display());
    Ok(Some(src))
}

/// Where compiled kernels are cached.
pub fn cache_dir() -> PathBuf {
    crate::paths::cache_root().join("cuda")
}

fn nvrtc_version() -> Result<(i32, i32)> {
    let (mut maj, mut min) = (0, 0);
    // SAFETY: two out-pointers to live ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut maj, &mut min) }.result().ctx("nvrtcVersion")?;
    Ok((maj, min))
}

/// Compiles `src` to a cubin with NVRTC; the error carries the compiler's log.
fn compile_cubin(name: &str, src: &str, opts: &[String]) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result as nr, sys as ns};
    let csrc = CString::new(src).map_err(|_| CudaError::new("kernel source holds a NUL byte"))?;
    let cname = CString::new(format!("{name}.cu")).map_err(|_| CudaError::new("bad kernel name"))?;
    let prog = nr::create_program(&csrc, Some(&cname)).ctx("nvrtcCreateProgram")?;
    let out = (|| {
        // SAFETY: `prog` is live until destroyed below.
        if let Err(e) = unsafe { nr::compile_program(prog, opts) } {
            let log = unsafe { nr::get_program_log(prog) }.map(|l| c_chars_to_string(&l)).unwrap_or_default();
            return Err(CudaError(format!("NVRTC failed to compile {name}.cu ({e:?}):\n{log}")));
        }
        let mut size = 0usize;
        // SAFETY: live program; out-pointer to a live usize, then a buffer of that size.
        unsafe { ns::nvrtcGetCUBINSize(prog, &mut size) }.result().ctx("nvrtcGetCUBINSize")?;
        let mut buf = vec![0u8; size];
        unsafe { ns::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()) }.result().ctx("nvrtcGetCUBIN")?;
        Ok(buf)
    })();
    // SAFETY: created above, destroyed once.
    let _ = unsafe { nr::destroy_program(prog) };
    out
}

fn c_chars_to_string(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Little-endian f32s of a byte buffer read from the device.
pub(crate) fn f32s_from_bytes(b: &[u8]) -> Vec<f32> {
    let mut v = Vec::with_capacity(b.len() / 4);
    extend_f32s_from_bytes(&mut v, b);
    v
}

/// Appends the little-endian f32s of `b` to `out` (a caller's vector, reused across steps).
pub(crate) fn extend_f32s_from_bytes(out: &mut Vec<f32>, b: &[u8]) {
    out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
}

/// Little-endian i32s of a byte buffer read from the device.
pub(crate) fn i32s_from_bytes(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

pub(crate) fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern of it is a valid u8 sequence.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

/// A device allocation of `len` bytes, freed on drop.
pub struct DevBuf {
    slice: CudaSlice<u8>,
    len: usize,
    stream: Arc<CudaStream>,
}

impl DevBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The raw device address (for kernel arguments).
    pub fn ptr(&self) -> u64 {
        let (p, _sync) = self.slice.device_ptr(&self.stream);
        p
    }

    /// Copies `data` into the start of the buffer (synchronous with the host).
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        if data.len() > self.len {
            return Err(CudaError(format!("write of {} bytes into a buffer of {}", data.len(), self.len)));
        }
        if data.is_empty() {
            return Ok(());
        }
        let mut view = self.slice.slice_mut(0..data.len());
        self.stream.memcpy_htod(data, &mut view).ctx("cuMemcpyHtoD")?;
        self.stream.synchronize().ctx("stream synchronize")
    }

    /// Reads the whole buffer as f32s (waits for the stream).
    pub fn read_f32(&self) -> Result<Vec<f32>> {
        let n = self.len / 4;
        let mut bytes = vec![0u8; n * 4];
        if n > 0 {
            let view = self.slice.slice(0..n * 4);
            self.stream.memcpy_dtoh(&view, &mut bytes).ctx("cuMemcpyDtoH")?;
        }
        self.stream.synchronize().ctx("stream synchronize (a kernel failed?)")?;
        Ok(f32s_from_bytes(&bytes))
    }

    /// Copies `data` into the start of the buffer and waits for the copy (no `&mut`: the
    /// buffer's address is what kernels see, and the copy is ordered on the stream).
    /// Copies `data` to byte offset `at` (stream-ordered after earlier work; synchronizes).
    pub fn copy_from_host_at(&self, at: usize, data: &[u8]) -> Result<()> {
        if at.checked_add(data.len()).is_none_or(|end| end > self.len) {
            return Err(CudaError(format!("write of {} bytes at {at} into a buffer of {}", data.len(), self.len)));
        }
        if data.is_empty() {
            return Ok(());
        }
        // SAFETY: the destination range is inside this live allocation; `data` outlives the copy
        // because the stream is synchronized before returning.
        unsafe { result::memcpy_htod_async(self.ptr() + at as u64, data, self.stream.cu_stream()) }
            .ctx("cuMemcpyHtoDAsync")?;
        self.stream.synchronize().ctx("stream synchronize")
    }

    pub fn copy_from_host(&self, data: &[u8]) -> Result<()> {
        if data.len() > self.len {
            return Err(CudaError(format!("write of {} bytes into a buffer of {}", data.len(), self.len)));
        }
        if data.is_empty() {
            return Ok(());
        }
        // SAFETY: the destination range is inside this live allocation; `data` outlives the copy
        // because the stream is synchronized before returning.
        unsafe { result::memcpy_htod_async(self.ptr(), data, self.stream.cu_stream()) }.ctx("cuMemcpyHtoDAsync")?;
        self.stream.synchronize().ctx("stream synchronize")
    }

    /// The first `n` bytes (waits for the stream).
    pub fn read_bytes(&self, n: usize) -> Result<Vec<u8>> {
        if n > self.len {
            return Err(CudaError(format!("read of {n} bytes from a buffer of {}", self.len)));
        }
        let mut bytes = vec![0u8; n];
        if n > 0 {
            let view = self.slice.slice(0..n);
            self.stream.memcpy_dtoh(&view, &mut bytes).ctx("cuMemcpyDtoH")?;
        }
        self.stream.synchronize().ctx("stream synchronize (a kernel failed?)")?;
        Ok(bytes)
    }

    /// The first `n` f32 values.
    pub fn read_f32_n(&self, n: usize) -> Result<Vec<f32>> {
        Ok(f32s_from_bytes(&self.read_bytes(n * 4)?))
    }

    /// The first `n` i32 values.
    pub fn read_i32_n(&self, n: usize) -> Result<Vec<i32>> {
        Ok(i32s_from_bytes(&self.read_bytes(n * 4)?))
    }

    /// Fills every byte with `b` (stream-ordered). 0xFF makes every f32 a NaN.
    pub fn fill_bytes(&self, b: u8) -> Result<()> {
        // SAFETY: the range is this live allocation.
        unsafe { result::memset_d8_async(self.ptr(), b, self.len, self.stream.cu_stream()) }.ctx("cuMemsetD8")
    }
}

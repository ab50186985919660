//! kiln-js: kiln for JavaScript, shaped like onnxruntime-web.
//!
//! ```js
//! import init, { InferenceSession, Tensor, version } from "./kiln_js.js";
//! await init();
//! const session = await InferenceSession.create(new Uint8Array(await (await fetch("model.onnx")).arrayBuffer()));
//! const feeds = { input_ids: new Tensor("int64", new BigInt64Array([1n, 2n, 3n]), [1, 3]) };
//! const results = await session.run(feeds);
//! console.log(results.logits.dims, results.logits.data);
//! ```
//!
//! The pure-Rust half ([`load_check`], [`tensor_from_bytes`], ...) is what the wasm-bindgen exports call; it is
//! tested natively. The exports themselves only exist on wasm32.

use kiln_provider::{ElementType, SessionOptions, Tensor as KilnTensor};

/// kiln's version (the crate version).
pub fn kiln_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Loads a model from ONNX bytes and describes it: `inputs: name type shape; ...` or the load error.
pub fn load_check(bytes: &[u8]) -> Result<String, String> {
    let session = pollster::block_on(kiln_provider::Session::from_bytes(bytes, &SessionOptions::default()))
        .map_err(|e| e.to_string())?;
    let describe = |vs: &[kiln_provider::ValueInfo]| {
        vs.iter()
            .map(|v| format!("{} {} {}", v.name, v.element_type.map(|t| t.name()).unwrap_or("?"), v.shape_string()))
            .collect::<Vec<_>>()
            .join("; ")
    };
    Ok(format!("inputs: {}\noutputs: {}", describe(session.inputs()), describe(session.outputs())))
}

/// A tensor from onnxruntime-web's type name, dims and the little-endian bytes of its data.
pub fn tensor_from_bytes(type_name: &str, dims: &[usize], bytes: &[u8]) -> Result<KilnTensor, String> {
    let et = element_type(type_name)?;
    KilnTensor::from_bytes(et, dims, bytes).map_err(|e| e.to_string())
}

fn element_type(type_name: &str) -> Result<ElementType, String> {
    ElementType::from_name(type_name).ok_or_else(|| {
        format!(
            "unsupported tensor type `{type_name}` (supported: {})",
            ElementType::ALL.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
        )
    })
}

/// An incremental SHA-2 digest of one of SRI's algorithms (`integrity` over a streamed model: its bytes go through a
/// chunk at a time, never whole; WebCrypto's `digest` takes whole buffers only).
pub enum Digest {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Digest {
    /// SRI's algorithm names: `sha256`, `sha384`, `sha512`.
    pub fn new(algorithm: &str) -> Result<Digest, String> {
        use sha2::Digest as _;
        match algorithm {
            "sha256" => Ok(Digest::Sha256(sha2::Sha256::new())),
            "sha384" => Ok(Digest::Sha384(sha2::Sha384::new())),
            "sha512" => Ok(Digest::Sha512(sha2::Sha512::new())),
            other => Err(format!("unsupported integrity algorithm `{other}` (expected sha256, sha384 or sha512)")),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        use sha2::Digest as _;
        match self {
            Digest::Sha256(d) => d.update(bytes),
            Digest::Sha384(d) => d.update(bytes),
            Digest::Sha512(d) => d.update(bytes),
        }
    }

    /// The digest of every byte given so far.
    pub fn finish(self) -> Vec<u8> {
        use sha2::Digest as _;
        match self {
            Digest::Sha256(d) => d.finalize().to_vec(),
            Digest::Sha384(d) => d.finalize().to_vec(),
            Digest::Sha512(d) => d.finalize().to_vec(),
        }
    }
}

/// onnxruntime's `OrtErrorCode` for a kiln error kind (the number in onnxruntime-web's `ERROR_CODE: n` messages).
pub fn ort_error_code(kind: kiln_provider::ErrorKind) -> u32 {
    use kiln_provider::ErrorKind as K;
    match kind {
        K::InvalidArgument => 2,
        K::Io => 3,
        K::Runtime => 6,
        K::NotImplemented => 9,
        K::InvalidModel => 10,
        K::ProviderUnavailable => 11,
    }
}

/// A kiln error in onnxruntime-web's words: `"<what> ERROR_CODE: n, ERROR_MESSAGE: <message>"`.
pub fn ort_message(what: &str, e: &kiln_provider::Error) -> String {
    use kiln_provider::ErrorKind as K;
    let code = match e.kind {
        // onnxruntime's INVALID_PROTOBUF for bytes that are not a model at all
        K::InvalidModel if e.message.contains("protobuf decode failed") => 7,
        // onnxruntime reports an external data file it was not given as FAIL
        K::InvalidArgument | K::Io if e.message.contains("external") && e.message.contains("provided") => 1,
        kind => ort_error_code(kind),
    };
    format!("{what} ERROR_CODE: {code}, ERROR_MESSAGE: {}", e.message)
}

/// The session options the npm package passes down (already validated by its JS half).
#[derive(Debug, Default, Clone)]
pub struct JsSessionOptions {
    pub execution_providers: Vec<String>,
    pub graph_optimization_level: Option<String>,
    pub free_dimension_overrides: Vec<(String, f64)>,
    pub external_data: Vec<(String, Vec<u8>)>,
}

/// Builds kiln's [`SessionOptions`] from the npm package's options, with onnxruntime-web's messages.
pub fn session_options(o: JsSessionOptions) -> Result<SessionOptions, String> {
    let mut opts = SessionOptions::default();
    for name in &o.execution_providers {
        // 'webgpu' is kiln's GPU backend (the browser's WebGPU on wasm32); the JS half has already dropped it, with
        // onnxruntime-web's warning, where there is no WebGPU adapter.
        if let Ok(ep) = kiln_provider::ExecutionProvider::from_name(name) {
            opts.execution_providers.push(ep);
        }
    }
    if let Some(level) = &o.graph_optimization_level {
        opts.optimization = kiln_provider::OptimizationLevel::from_name(level)
            .map_err(|_| format!("unsupported graph optimization level: {level}"))?;
    }
    for (name, value) in o.free_dimension_overrides {
        if !(value.is_finite() && value >= 0.0 && value.fract() == 0.0 && value <= i64::MAX as f64) {
            return Err(format!("free dimension override value must be a non-negative integer: {value}"));
        }
        opts.free_dimension_overrides.insert(name, value as i64);
    }
    if !o.external_data.is_empty() {
        let mut r = kiln_provider::InMemoryResolver::new();
        for (path, bytes) in o.external_data {
            let bytes = std::sync::Arc::new(bytes);
            let trimmed = path.trim_start_matches("./").to_string();
            if trimmed != path {
                r.files.insert(trimmed, bytes.clone());
            }
            r.files.insert(path, bytes);
        }
        opts.external_data = Some(std::sync::Arc::new(r));
    }
    Ok(opts)
}

/// The ONNX model of a tokenizer (`ai.onnx.contrib` HfJsonTokenizer: `input_text` string [N] → `input_ids`,
/// `attention_mask` int64 [N, L]) for tokenizer.json (and tokenizer_config.json, may be empty).
pub fn tokenizer_model(tokenizer_json: &str, tokenizer_config_json: &str) -> Result<Vec<u8>, String> {
    kiln_ops::tokenizer::model_from_tokenizer_json(tokenizer_json, tokenizer_config_json).map_err(|e| format!("{e:#}"))
}

/// The decoder counterpart: `ids` int64 [N, L] → `text` string [N].
pub fn decoder_model(
    tokenizer_json: &str,
    tokenizer_config_json: &str,
    skip_special_tokens: bool,
) -> Result<Vec<u8>, String> {
    kiln_ops::tokenizer::decoder_model_from_tokenizer_json(tokenizer_json, tokenizer_config_json, skip_special_tokens)
        .map_err(|e| format!("{e:#}"))
}

/// A custom operator's output declaration from the npm package: a type name (or none) and dims (numbers fixed,
/// `None` known at run time; no dims at all: undeclared).
pub fn custom_op_output(
    type_name: Option<&str>,
    dims: Option<Vec<Option<f64>>>,
) -> Result<kiln_provider::CustomOpOutput, String> {
    let element_type = match type_name {
        None | Some("") => None,
        Some(t) => Some(element_type(t)?),
    };
    let dims = match dims {
        None => None,
        Some(ds) => Some(
            ds.into_iter()
                .map(|d| match d {
                    Some(n) if n >= 0.0 => dims_of(&[n]).map(|v| Some(v[0])),
                    _ => Ok(None),
                })
                .collect::<Result<Vec<_>, String>>()?,
        ),
    };
    Ok(kiln_provider::CustomOpOutput { element_type, dims })
}

/// One dimension of onnxruntime-web's `ValueMetadata.shape`.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaDim {
    Fixed(f64),
    Symbolic(String),
}

/// onnxruntime-web's `ValueMetadata`: a name, the type (`None`: not a tensor kiln can represent) and the shape
/// (empty when undeclared; a dim with neither a value nor a name is 4294967295, onnxruntime-web 1.30's -1 read as
/// an unsigned 32-bit number, kept for parity).
pub fn metadata(v: &kiln_provider::ValueInfo) -> (String, Option<&'static str>, Vec<MetaDim>) {
    let shape = v
        .shape
        .iter()
        .flatten()
        .map(|d| match d {
            kiln_provider::Dim::Fixed(n) => MetaDim::Fixed(*n as f64),
            kiln_provider::Dim::Symbolic(s) => MetaDim::Symbolic(s.clone()),
            kiln_provider::Dim::Unknown => MetaDim::Fixed(u32::MAX as f64),
        })
        .collect();
    (v.name.clone(), v.element_type.map(|t| t.name()), shape)
}

/// Tensor dims from JavaScript numbers: non-negative integers.
pub fn dims_of(dims: &[f64]) -> Result<Vec<usize>, String> {
    dims.iter()
        .map(|d| {
            if d.is_finite() && *d >= 0.0 && d.fract() == 0.0 && *d <= u32::MAX as f64 {
                Ok(*d as usize)
            } else {
                Err(format!("invalid tensor dimension: {d}"))
            }
        })
        .collect()
}

/// A feed from the npm package: numeric data as little-endian bytes (bool: one byte each, non-zero is true).
pub fn feed_from_bytes(type_name: &str, dims: &[f64], bytes: &[u8]) -> Result<KilnTensor, String> {
    let dims = dims_of(dims)?;
    let et = element_type(type_name)?;
    if et == ElementType::Bool {
        return KilnTensor::from_vec(&dims, bytes.iter().map(|b| *b != 0).collect()).map_err(|e| e.message);
    }
    KilnTensor::from_bytes(et, &dims, bytes).map_err(|e| e.message)
}

/// A string feed.
pub fn feed_from_strings(dims: &[f64], strings: Vec<String>) -> Result<KilnTensor, String> {
    let dims = dims_of(dims)?;
    KilnTensor::from_vec(&dims, strings).map_err(|e| e.message)
}

#[cfg(target_arch = "wasm32")]
mod web {
    use std::cell::RefCell;
    use std::future::Future;
    use std::pin::Pin;
    use std::rc::Rc;
    use std::task::{Context, Poll};

    use js_sys::{Array, Object, Reflect, Uint8Array};
    use kiln_provider::{ElementType, ExecutionProvider, Session, SessionOptions, Tensor as KilnTensor};
    use wasm_bindgen::prelude::*;
    use wasm_bindgen::JsCast;

    fn err(e: impl std::fmt::Display) -> JsError {
        JsError::new(&e.to_string())
    }

    /// kiln's version.
    #[wasm_bindgen]
    pub fn version() -> String {
        super::kiln_version().to_string()
    }

    /// Loads a model and returns its inputs and outputs as text, or throws the load error.
    #[wasm_bindgen(js_name = loadCheck)]
    pub fn load_check(bytes: &[u8]) -> Result<String, JsError> {
        super::load_check(bytes).map_err(err)
    }

    /// onnxruntime-web's `Tensor`: `new Tensor(type, data, dims)`.
    #[wasm_bindgen]
    pub struct Tensor {
        inner: KilnTensor,
    }

    fn bytes_of(data: &JsValue) -> Result<Vec<u8>, JsError> {
        // any TypedArray / DataView: view its bytes
        if let Some(view) = data.dyn_ref::<js_sys::Object>() {
            let buffer = Reflect::get(view, &"buffer".into()).map_err(|_| err("data has no buffer"))?;
            if let Some(buffer) = buffer.dyn_ref::<js_sys::ArrayBuffer>() {
                let offset = Reflect::get(view, &"byteOffset".into()).ok().and_then(|v| v.as_f64()).unwrap_or(0.0);
                let length = Reflect::get(view, &"byteLength".into()).ok().and_then(|v| v.as_f64()).unwrap_or(0.0);
                return Ok(Uint8Array::new_with_byte_offset_and_length(buffer, offset as u32, length as u32).to_vec());
            }
        }
        Err(err("tensor data must be a typed array (Float32Array, BigInt64Array, Int32Array, Uint8Array, ...)"))
    }

    #[wasm_bindgen]
    impl Tensor {
        #[wasm_bindgen(constructor)]
        pub fn new(type_name: &str, data: JsValue, dims: Vec<u32>) -> Result<Tensor, JsError> {
            let dims: Vec<usize> = dims.into_iter().map(|d| d as usize).collect();
            let bytes = bytes_of(&data)?;
            Ok(Tensor { inner: super::tensor_from_bytes(type_name, &dims, &bytes).map_err(err)? })
        }

        #[wasm_bindgen(getter, js_name = type)]
        pub fn type_name(&self) -> String {
            self.inner.element_type().name().to_string()
        }

        #[wasm_bindgen(getter)]
        pub fn dims(&self) -> Vec<u32> {
            self.inner.dims().iter().map(|d| *d as u32).collect()
        }

        #[wasm_bindgen(getter)]
        pub fn size(&self) -> u32 {
            self.inner.len() as u32
        }

        /// The data as the typed array onnxruntime-web uses for the type (float16: Uint16Array).
        #[wasm_bindgen(getter)]
        pub fn data(&self) -> Result<JsValue, JsError> {
            let bytes = self.inner.as_bytes().map_err(err)?;
            let u8s = Uint8Array::from(bytes);
            let buf = u8s.buffer();
            Ok(match self.inner.element_type() {
                ElementType::F32 => js_sys::Float32Array::new(&buf).into(),
                ElementType::F64 => js_sys::Float64Array::new(&buf).into(),
                ElementType::F16 | ElementType::U16 => js_sys::Uint16Array::new(&buf).into(),
                ElementType::I64 => js_sys::BigInt64Array::new(&buf).into(),
                ElementType::U64 => js_sys::BigUint64Array::new(&buf).into(),
                ElementType::I32 => js_sys::Int32Array::new(&buf).into(),
                ElementType::U32 => js_sys::Uint32Array::new(&buf).into(),
                ElementType::I16 => js_sys::Int16Array::new(&buf).into(),
                ElementType::I8 => js_sys::Int8Array::new(&buf).into(),
                ElementType::U8 | ElementType::Bool => u8s.into(),
                ElementType::String => return Err(err("string tensors are not supported in kiln-js yet")),
            })
        }
    }

    /// onnxruntime-web's `InferenceSession`.
    #[wasm_bindgen]
    pub struct InferenceSession {
        inner: Rc<Session>,
    }

    #[wasm_bindgen]
    impl InferenceSession {
        /// `InferenceSession.create(bytes, { executionProviders: ['webgpu', 'wasm'] })`.
        pub async fn create(bytes: Uint8Array, options: JsValue) -> Result<InferenceSession, JsError> {
            let mut opts = SessionOptions::default();
            if options.is_object() {
                if let Ok(eps) = Reflect::get(&options, &"executionProviders".into()) {
                    if let Some(eps) = eps.dyn_ref::<Array>() {
                        for ep in eps.iter() {
                            let name = ep
                                .as_string()
                                .or_else(|| Reflect::get(&ep, &"name".into()).ok().and_then(|n| n.as_string()))
                                .ok_or_else(|| err("executionProviders holds strings or { name }"))?;
                            opts.execution_providers.push(ExecutionProvider::from_name(&name).map_err(err)?);
                        }
                    }
                }
            }
            let session = Session::from_bytes(&bytes.to_vec(), &opts).await.map_err(err)?;
            Ok(InferenceSession { inner: Rc::new(session) })
        }

        #[wasm_bindgen(getter, js_name = inputNames)]
        pub fn input_names(&self) -> Vec<String> {
            self.inner.input_names().into_iter().map(String::from).collect()
        }

        #[wasm_bindgen(getter, js_name = outputNames)]
        pub fn output_names(&self) -> Vec<String> {
            self.inner.output_names().into_iter().map(String::from).collect()
        }

        /// `session.run({ name: Tensor, ... })` → a Promise of `{ name: Tensor, ... }`.
        pub fn run(&self, feeds: Object) -> js_sys::Promise {
            let session = self.inner.clone();
            wasm_bindgen_futures::future_to_promise(async move {
                let mut inputs = vec![];
                for entry in Object::entries(&feeds).iter() {
                    let pair: Array = entry.unchecked_into();
                    let name = pair.get(0).as_string().unwrap_or_default();
                    let value = pair.get(1);
                    let t = tensor_of(&value).map_err(JsValue::from)?;
                    inputs.push((name, t));
                }
                let outputs = session.run(inputs).await.map_err(|e| JsValue::from(err(e)))?;
                let result = Object::new();
                for (name, t) in outputs.into_vec() {
                    Reflect::set(&result, &name.into(), &Tensor { inner: t }.into())?;
                }
                Ok(result.into())
            })
        }
    }

    fn get(o: &JsValue, k: &str) -> JsValue {
        Reflect::get(o, &k.into()).unwrap_or(JsValue::UNDEFINED)
    }

    fn strings_of(v: &JsValue) -> Vec<String> {
        v.dyn_ref::<Array>().map(|a| a.iter().filter_map(|x| x.as_string()).collect()).unwrap_or_default()
    }

    fn numbers_of(v: &JsValue) -> Vec<f64> {
        v.dyn_ref::<Array>().map(|a| a.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect()).unwrap_or_default()
    }

    fn metadata_js(vs: &[kiln_provider::ValueInfo]) -> Result<Array, JsValue> {
        let out = Array::new();
        for v in vs {
            let (name, ty, shape) = super::metadata(v);
            let m = Object::new();
            Reflect::set(&m, &"name".into(), &name.into())?;
            match ty {
                Some(ty) => {
                    Reflect::set(&m, &"isTensor".into(), &true.into())?;
                    Reflect::set(&m, &"type".into(), &ty.into())?;
                    let dims = Array::new();
                    for d in shape {
                        dims.push(&match d {
                            super::MetaDim::Fixed(n) => JsValue::from_f64(n),
                            super::MetaDim::Symbolic(s) => JsValue::from_str(&s),
                        });
                    }
                    Reflect::set(&m, &"shape".into(), &dims)?;
                }
                None => Reflect::set(&m, &"isTensor".into(), &false.into()).map(|_| ())?,
            }
            out.push(&m);
        }
        Ok(out)
    }

    /// `modelFromTokenizerJson(tokenizerJson, tokenizerConfigJson)`: the tokenizer model's bytes.
    #[wasm_bindgen(js_name = modelFromTokenizerJson)]
    pub fn model_from_tokenizer_json(tokenizer_json: &str, tokenizer_config_json: &str) -> Result<Vec<u8>, JsError> {
        super::tokenizer_model(tokenizer_json, tokenizer_config_json).map_err(err)
    }

    /// `decoderModelFromTokenizerJson(tokenizerJson, tokenizerConfigJson, skipSpecialTokens)`: the decoder's bytes.
    #[wasm_bindgen(js_name = decoderModelFromTokenizerJson)]
    pub fn decoder_model_from_tokenizer_json(
        tokenizer_json: &str,
        tokenizer_config_json: &str,
        skip_special_tokens: bool,
    ) -> Result<Vec<u8>, JsError> {
        super::decoder_model(tokenizer_json, tokenizer_config_json, skip_special_tokens).map_err(err)
    }

    // ---- custom operators computed in JavaScript ------------------------------------------------------------------
    //
    // Every call into this module stays synchronous, so that a trap inside kiln is an exception of that call (which
    // the JS half catches) rather than an uncaught one in a microtask: a run with custom operators is a `KilnRun`
    // that JS steps. `step()` polls the session's run future; at a custom node the future awaits a `HostReply`,
    // `step()` returns the node's request to JS, JS awaits the operator's `compute` and hands the outputs back with
    // `resume()` (or the error with `fail()`), then steps again.

    /// A waker that resolves a JS promise: a future polled from a synchronous call (`step()`) that is pending on the
    /// browser (requestAdapter, requestDevice, mapAsync) hands JS this promise to await before it steps again.
    struct JsWake {
        resolve: RefCell<Option<js_sys::Function>>,
    }

    // SAFETY: wasm32-unknown-unknown as built here has no threads: the waker never leaves this thread.
    unsafe impl Send for JsWake {}
    unsafe impl Sync for JsWake {}

    impl std::task::Wake for JsWake {
        fn wake(self: std::sync::Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &std::sync::Arc<Self>) {
            let resolve = self.resolve.borrow_mut().take();
            if let Some(f) = resolve {
                let _ = f.call0(&JsValue::UNDEFINED);
            }
        }
    }

    /// A waker and the promise it resolves when woken.
    fn js_waker() -> (std::task::Waker, js_sys::Promise) {
        let mut resolve = None;
        let promise = js_sys::Promise::new(&mut |res, _| resolve = Some(res));
        #[allow(clippy::arc_with_non_send_sync)]
        let wake = std::sync::Arc::new(JsWake { resolve: RefCell::new(resolve) });
        (std::task::Waker::from(wake), promise)
    }

    /// A boxed future that JS steps (a run, a load, a GPU download).
    type Stepping<T> = Option<Pin<Box<dyn Future<Output = T>>>>;

    /// What one poll of a stepped future gave: its output (the future is dropped), or the promise that resolves once
    /// its waker is woken (JS awaits it, then steps again).
    enum Polled<T> {
        Ready(T),
        Pending(js_sys::Promise),
    }

    /// Polls `future` once from a synchronous `step()`; `over` is the error once it has finished.
    fn poll_once<T>(future: &mut Stepping<T>, over: &str) -> Result<Polled<T>, JsError> {
        let Some(f) = future.as_mut() else {
            return Err(err(over));
        };
        let (waker, wait) = js_waker();
        let mut cx = Context::from_waker(&waker);
        Ok(match f.as_mut().poll(&mut cx) {
            Poll::Ready(r) => {
                *future = None;
                Polled::Ready(r)
            }
            Poll::Pending => Polled::Pending(wait),
        })
    }

    /// A `step()` result: `{ done, ... }`.
    struct StepResult(Object);

    impl StepResult {
        fn new(done: bool) -> Result<Self, JsError> {
            let o = StepResult(Object::new());
            o.set("done", &done.into())?;
            Ok(o)
        }

        fn set(&self, k: &str, v: &JsValue) -> Result<(), JsError> {
            Reflect::set(&self.0, &k.into(), v).map(|_| ()).map_err(|_| err("step"))
        }

        /// `{ done, k: v }`
        fn with(done: bool, k: &str, v: &JsValue) -> Result<JsValue, JsError> {
            let o = Self::new(done)?;
            o.set(k, v)?;
            Ok(o.0.into())
        }
    }

    /// A custom node's request, and the reply JS gives it.
    #[derive(Default)]
    struct Channel {
        request: Option<(kiln_provider::HostOpInfo, Vec<KilnTensor>)>,
        reply: Option<Result<Vec<KilnTensor>, String>>,
    }

    /// The session's side of a JS custom operator: posts the request, waits for the reply.
    struct JsHostOp {
        channel: Rc<RefCell<Channel>>,
    }

    // SAFETY: wasm32-unknown-unknown as built here has no threads (no atomics target feature): nothing is shared
    // across threads. `CustomOp` is `Send + Sync` for native callers.
    unsafe impl Send for JsHostOp {}
    unsafe impl Sync for JsHostOp {}

    impl kiln_provider::CustomOp for JsHostOp {
        fn compute(&self, node: &kiln_provider::HostOpInfo, inputs: Vec<KilnTensor>) -> kiln_provider::CustomOpFuture {
            {
                let mut c = self.channel.borrow_mut();
                c.request = Some((node.clone(), inputs));
                c.reply = None;
            }
            Box::pin(HostReply { channel: self.channel.clone() })
        }
    }

    struct HostReply {
        channel: Rc<RefCell<Channel>>,
    }

    impl Future for HostReply {
        type Output = kiln_provider::Result<Vec<KilnTensor>>;
        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
            match self.channel.borrow_mut().reply.take() {
                Some(Ok(v)) => Poll::Ready(Ok(v)),
                Some(Err(m)) => Poll::Ready(Err(kiln_provider::Error::runtime(m))),
                None => Poll::Pending,
            }
        }
    }

    fn tensor_entry(t: &KilnTensor) -> Result<Array, JsError> {
        let dims: Array = t.dims().iter().map(|d| JsValue::from_f64(*d as f64)).collect();
        let data: JsValue = if t.element_type() == ElementType::String {
            t.as_slice::<String>().map_err(err)?.iter().map(|s| JsValue::from_str(s)).collect::<Array>().into()
        } else {
            Uint8Array::from(t.as_bytes().map_err(err)?).into()
        };
        let entry = Array::new();
        entry.push(&t.element_type().name().into());
        entry.push(&dims);
        entry.push(&data);
        Ok(entry)
    }

    /// `[type, dims, Uint8Array | string[]]` → a tensor.
    fn tensor_of_entry(f: &Array) -> Result<KilnTensor, String> {
        let type_name = f.get(0).as_string().unwrap_or_default();
        let dims = numbers_of(&f.get(1));
        let data = f.get(2);
        if type_name == "string" {
            super::feed_from_strings(&dims, strings_of(&data))
        } else {
            let bytes = data.dyn_into::<Uint8Array>().map_err(|_| "tensor data must be bytes".to_string())?;
            super::feed_from_bytes(&type_name, &dims, &bytes.to_vec())
        }
    }

    fn attribute_js(v: &kiln_provider::AttributeValue) -> Result<JsValue, JsError> {
        use kiln_provider::AttributeValue as A;
        Ok(match v {
            A::Float(f) => JsValue::from_f64(*f as f64),
            A::Int(i) => JsValue::from_f64(*i as f64),
            A::String(s) => JsValue::from_str(s),
            A::Floats(fs) => fs.iter().map(|f| JsValue::from_f64(*f as f64)).collect::<Array>().into(),
            A::Ints(is) => is.iter().map(|i| JsValue::from_f64(*i as f64)).collect::<Array>().into(),
            A::Strings(ss) => ss.iter().map(|s| JsValue::from_str(s)).collect::<Array>().into(),
            A::Tensor(t) => {
                let t = KilnTensor::from_tract(t.clone()).map_err(err)?;
                let e = tensor_entry(&t)?;
                let o = Object::new();
                Reflect::set(&o, &"tensor".into(), &e).map_err(|_| err("attribute"))?;
                o.into()
            }
        })
    }

    /// One run of a session with custom operators, stepped by JS.
    #[wasm_bindgen]
    pub struct KilnRun {
        future: Stepping<kiln_provider::Result<kiln_provider::Outputs>>,
        channel: Rc<RefCell<Channel>>,
    }

    #[wasm_bindgen]
    impl KilnRun {
        /// Runs until the next custom node, a wait on the browser, or the end. Returns `{ done: true, results }`
        /// (`[name, type, dims, Uint8Array | string[]][]`), `{ done: false, wait }` (a promise to await before stepping
        /// again: the GPU is busy) or `{ done: false, domain, opType, node, outputs, inputs, attributes }` (inputs as
        /// `[type, dims, data][]`, attributes as `[name, value][]`); throws the run's error.
        pub fn step(&mut self) -> Result<JsValue, JsError> {
            let over = "failed to call OrtRun(). ERROR_CODE: 1, ERROR_MESSAGE: this run is over";
            match poll_once(&mut self.future, over)? {
                Polled::Ready(r) => {
                    self.channel.borrow_mut().request = None;
                    let outputs = r.map_err(|e| err(super::ort_message("failed to call OrtRun().", &e)))?;
                    StepResult::with(true, "results", &encode_outputs(outputs)?.into())
                }
                Polled::Pending(wait) => {
                    let request = self.channel.borrow_mut().request.take();
                    let Some((info, inputs)) = request else {
                        // waiting on the browser (the GPU): step again once `wait` resolves
                        return StepResult::with(false, "wait", &wait.into());
                    };
                    let o = StepResult::new(false)?;
                    o.set("domain", &info.domain.clone().into())?;
                    o.set("opType", &info.op_type.clone().into())?;
                    o.set("node", &info.node.clone().into())?;
                    o.set("outputs", &info.outputs.iter().map(|s| JsValue::from_str(s)).collect::<Array>().into())?;
                    let ins = Array::new();
                    for t in &inputs {
                        let e = tensor_entry(t)?;
                        ins.push(&e);
                    }
                    o.set("inputs", &ins.into())?;
                    let attrs = Array::new();
                    for (name, v) in &info.attributes {
                        let pair = Array::new();
                        pair.push(&name.into());
                        pair.push(&attribute_js(v)?);
                        attrs.push(&pair);
                    }
                    o.set("attributes", &attrs.into())?;
                    Ok(o.0.into())
                }
            }
        }

        /// The custom node's outputs: `[type, dims, Uint8Array | string[]][]` in the node's output order.
        pub fn resume(&mut self, outputs: Array) {
            let mut ts = vec![];
            for (ix, f) in outputs.iter().enumerate() {
                let f: Array = f.unchecked_into();
                match tensor_of_entry(&f) {
                    Ok(t) => ts.push(t),
                    Err(m) => {
                        self.channel.borrow_mut().reply = Some(Err(format!("output {ix}: {m}")));
                        return;
                    }
                }
            }
            self.channel.borrow_mut().reply = Some(Ok(ts));
        }

        /// The custom node failed: the run fails with `message`.
        pub fn fail(&mut self, message: String) {
            self.channel.borrow_mut().reply = Some(Err(message));
        }
    }

    /// Outputs as `[name, type, dims, Uint8Array | string[]]`, or for one left on the GPU `[name, type, dims, id,
    /// GPUBuffer, contiguous]` (`id`: its handle in the registry of GPU values, `GPUBuffer`: the buffer behind it,
    /// `contiguous`: whether that buffer holds exactly the tensor; a KV store has spare rows, see `gpuValueBuffer`).
    fn encode_outputs(outputs: kiln_provider::Outputs) -> Result<Array, JsError> {
        let out = Array::new();
        for (name, v) in outputs.into_values() {
            let entry = match v {
                kiln_provider::Value::Cpu(t) => tensor_entry(&t)?,
                kiln_provider::Value::Gpu(g) => {
                    let entry = Array::new();
                    entry.push(&g.element_type().name().into());
                    entry.push(&g.dims().iter().map(|d| JsValue::from_f64(*d as f64)).collect::<Array>());
                    let buffer = g.buffer().as_webgpu().map(|b| JsValue::from(b.clone())).unwrap_or(JsValue::UNDEFINED);
                    let contiguous = g.is_contiguous();
                    entry.push(&JsValue::from_f64(gpu_put(g) as f64));
                    entry.push(&buffer);
                    entry.push(&contiguous.into());
                    entry
                }
            };
            entry.unshift(&name.into());
            out.push(&entry);
        }
        Ok(out)
    }

    // ---- GPU values (onnxruntime-web's 'gpu-buffer' tensors) ------------------------------------------------------
    //
    // Outputs left on the GPU are kept here under a number the JS half holds (its gpu-buffer Tensor maps to it), so
    // that feeding the tensor back binds kiln's own value (a KV store is then appended in place) without a copy.

    struct GpuEntry {
        value: kiln_provider::GpuTensor,
        /// The value in a buffer holding exactly its elements, made when JS first asks for the buffer of a KV store.
        contiguous: Option<kiln_provider::GpuTensor>,
    }

    thread_local! {
        static GPU_VALUES: RefCell<(u32, std::collections::HashMap<u32, GpuEntry>)> =
            RefCell::new((0, std::collections::HashMap::new()));
    }

    fn gpu_put(value: kiln_provider::GpuTensor) -> u32 {
        GPU_VALUES.with(|g| {
            let mut g = g.borrow_mut();
            g.0 = g.0.wrapping_add(1).max(1);
            let id = g.0;
            g.1.insert(id, GpuEntry { value, contiguous: None });
            id
        })
    }

    fn gpu_get(id: u32) -> Option<kiln_provider::GpuTensor> {
        GPU_VALUES.with(|g| g.borrow().1.get(&id).map(|e| e.value.clone()))
    }

    /// The `GPUBuffer` holding exactly GPU value `id`'s elements, row-major from offset 0 (onnxruntime-web's
    /// `tensor.gpuBuffer`): the value's own buffer, or for a KV store (spare rows) a copy made once.
    #[wasm_bindgen(js_name = gpuValueBuffer)]
    pub fn gpu_value_buffer(id: u32) -> Result<JsValue, JsError> {
        GPU_VALUES.with(|g| {
            let mut g = g.borrow_mut();
            let e = g.1.get_mut(&id).ok_or_else(|| err("The tensor is disposed."))?;
            if e.contiguous.is_none() {
                e.contiguous = Some(e.value.contiguous().map_err(err)?);
            }
            let buffer = e.contiguous.as_ref().map(|c| c.buffer()).and_then(|b| b.as_webgpu());
            Ok(buffer.map(|b| JsValue::from(b.clone())).unwrap_or(JsValue::UNDEFINED))
        })
    }

    /// Lets go of GPU value `id`; `destroy`: also free its buffer now where nothing else holds it (`dispose()`),
    /// else it goes when the garbage collector collects the `GPUBuffer` (a tensor collected without `dispose()`).
    #[wasm_bindgen(js_name = releaseGpuValue)]
    pub fn release_gpu_value(id: u32, destroy: bool) {
        if let Some(e) = GPU_VALUES.with(|g| g.borrow_mut().1.remove(&id)) {
            if destroy {
                e.value.release();
                if let Some(c) = e.contiguous {
                    c.release();
                }
            }
        }
    }

    /// How many GPU values the registry holds (tests: disposed and collected tensors leave it).
    #[wasm_bindgen(js_name = gpuValueCount)]
    pub fn gpu_value_count() -> u32 {
        GPU_VALUES.with(|g| g.borrow().1.len() as u32)
    }

    /// Starts downloading GPU value `id` (onnxruntime-web's `getData()`); JS steps the returned [`KilnDownload`].
    #[wasm_bindgen(js_name = startGpuDownload)]
    pub fn start_gpu_download(id: u32) -> Result<KilnDownload, JsError> {
        let value = gpu_get(id).ok_or_else(|| err("The tensor is disposed."))?;
        // the copy is queued now (an app may start getData() and then run the next step before awaiting it)
        Ok(KilnDownload { future: Some(Box::pin(value.download())) })
    }

    /// A download of a GPU value, stepped by JS like [`KilnRun`].
    #[wasm_bindgen]
    pub struct KilnDownload {
        future: Stepping<kiln_provider::Result<KilnTensor>>,
    }

    #[wasm_bindgen]
    impl KilnDownload {
        /// `{ done: true, result: [type, dims, Uint8Array] }` or `{ done: false, wait }`; throws the error.
        pub fn step(&mut self) -> Result<JsValue, JsError> {
            match poll_once(&mut self.future, "this download is over")? {
                Polled::Ready(r) => {
                    let t = r.map_err(|e| err(format!("downloading a gpu-buffer tensor: {}", e.message)))?;
                    StepResult::with(true, "result", &tensor_entry(&t)?.into())
                }
                Polled::Pending(wait) => StepResult::with(false, "wait", &wait.into()),
            }
        }
    }

    /// External data the JS half keeps outside wasm memory (a fetched Blob, the app's buffers): `location` →
    /// `read(offset, length) => Promise<Uint8Array>`. A WebGPU session reads its streamed weights through it one
    /// bounded range at a time (kiln_graph::stream), so a weight is never whole in wasm memory.
    struct JsExternalData {
        files: std::collections::HashMap<String, js_sys::Function>,
    }

    // wasm32 runs on one thread: the functions never cross threads. `ExternalDataResolver` is `Send + Sync` for
    // native callers.
    unsafe impl Send for JsExternalData {}
    unsafe impl Sync for JsExternalData {}

    impl JsExternalData {
        fn file(&self, location: &str) -> kiln_provider::Result<&js_sys::Function> {
            self.files.get(location).or_else(|| self.files.get(location.trim_start_matches("./"))).ok_or_else(|| {
                kiln_provider::Error::new(
                    kiln_provider::ErrorKind::Io,
                    format!(
                        "external data file `{location}` was not provided (provided: {:?})",
                        self.files.keys().filter(|k| *k != kiln_provider::MODEL_ITSELF).collect::<Vec<_>>()
                    ),
                )
            })
        }
    }

    impl kiln_provider::ExternalDataResolver for JsExternalData {
        fn read(&self, location: &str, _offset: u64, _length: Option<u64>) -> kiln_provider::Result<Vec<u8>> {
            self.file(location)?;
            Err(kiln_provider::Error::new(
                kiln_provider::ErrorKind::NotImplemented,
                format!("external data `{location}` can only be read asynchronously here"),
            ))
        }

        fn read_range<'a>(&'a self, location: &'a str, offset: u64, length: u64) -> kiln_provider::ReadFuture<'a> {
            Box::pin(async move {
                let io = |m: String| kiln_provider::Error::new(kiln_provider::ErrorKind::Io, m);
                let read = self.file(location)?;
                let promise = read
                    .call2(&JsValue::NULL, &JsValue::from_f64(offset as f64), &JsValue::from_f64(length as f64))
                    .map_err(|e| io(format!("reading external data `{location}`: {}", js_message(&e))))?;
                let value = wasm_bindgen_futures::JsFuture::from(js_sys::Promise::resolve(&promise))
                    .await
                    .map_err(|e| io(format!("reading external data `{location}`: {}", js_message(&e))))?;
                let bytes = value
                    .dyn_into::<Uint8Array>()
                    .map_err(|_| io(format!("reading external data `{location}`: the source did not return bytes")))?;
                Ok(bytes.to_vec())
            })
        }
    }

    fn js_message(e: &JsValue) -> String {
        e.dyn_ref::<js_sys::Error>()
            .map(|e| String::from(e.message()))
            .or_else(|| e.as_string())
            .unwrap_or_else(|| format!("{e:?}"))
    }

    /// An incremental SHA-2 digest (`new Digest('sha256' | 'sha384' | 'sha512')`, `update(bytes)`, `finish()`):
    /// kiln-web checks `integrity` over a streamed model a chunk at a time.
    #[wasm_bindgen(js_name = Digest)]
    pub struct JsDigest {
        inner: Option<super::Digest>,
    }

    #[wasm_bindgen(js_class = Digest)]
    impl JsDigest {
        #[wasm_bindgen(constructor)]
        pub fn new(algorithm: &str) -> Result<JsDigest, JsError> {
            Ok(JsDigest { inner: Some(super::Digest::new(algorithm).map_err(err)?) })
        }

        pub fn update(&mut self, bytes: &[u8]) -> Result<(), JsError> {
            self.inner.as_mut().ok_or_else(|| err("the digest was finished"))?.update(bytes);
            Ok(())
        }

        pub fn finish(&mut self) -> Result<Vec<u8>, JsError> {
            Ok(self.inner.take().ok_or_else(|| err("the digest was finished"))?.finish())
        }
    }

    /// Bytes of this module's wasm memory (kiln-web's tests: streamed weights stay out of it).
    #[wasm_bindgen(js_name = wasmMemoryBytes)]
    pub fn wasm_memory_bytes() -> f64 {
        wasm_bindgen::memory()
            .unchecked_into::<js_sys::WebAssembly::Memory>()
            .buffer()
            .unchecked_into::<js_sys::ArrayBuffer>()
            .byte_length() as f64
    }

    /// The npm package's session: the JS half (js/lib) validates arguments like onnxruntime-common and calls this.
    /// Errors are JS `Error`s with onnxruntime-web's wording; none leaves the module unusable.
    #[wasm_bindgen]
    pub struct KilnSession {
        inner: Rc<Session>,
        channel: Rc<RefCell<Channel>>,
    }

    #[wasm_bindgen]
    impl KilnSession {
        /// Starts loading a model; JS steps the returned [`KilnLoad`] (the WebGPU provider waits on the browser for
        /// its adapter, device and weight uploads). `options`: `{ executionProviders: string[],
        /// graphOptimizationLevel?: string, freeDimensionOverrides?: [name, value][], externalData?:
        /// [path, Uint8Array][], customOps?: [domain, opType, [type | null, (number | null)[] | null][]][] }`.
        #[wasm_bindgen(js_name = startLoad)]
        pub fn start_load(bytes: Vec<u8>, options: JsValue) -> Result<KilnLoad, JsError> {
            let mut o = super::JsSessionOptions::default();
            if options.is_object() {
                o.execution_providers = strings_of(&get(&options, "executionProviders"));
                o.graph_optimization_level = get(&options, "graphOptimizationLevel").as_string();
                if let Some(a) = get(&options, "freeDimensionOverrides").dyn_ref::<Array>() {
                    for pair in a.iter() {
                        let pair: Array = pair.unchecked_into();
                        o.free_dimension_overrides.push((
                            pair.get(0).as_string().unwrap_or_default(),
                            pair.get(1).as_f64().unwrap_or(f64::NAN),
                        ));
                    }
                }
                if let Some(a) = get(&options, "externalData").dyn_ref::<Array>() {
                    for pair in a.iter() {
                        let pair: Array = pair.unchecked_into();
                        let data =
                            pair.get(1).dyn_into::<Uint8Array>().map_err(|_| err("external data must be bytes"))?;
                        o.external_data.push((pair.get(0).as_string().unwrap_or_default(), data.to_vec()));
                    }
                }
            }
            let mut opts = super::session_options(o).map_err(err)?;
            // 'webgpu': external data the JS half keeps (Blobs, buffers), read a range at a time; the model itself
            // too when it gives `modelSource` (read under kiln's MODEL_ITSELF) and `modelSize`
            let mut files = std::collections::HashMap::new();
            let model_size = get(&options, "modelSize").as_f64();
            if let (Some(read), Some(size)) = (get(&options, "modelSource").dyn_ref::<js_sys::Function>(), model_size) {
                if !(size.is_finite() && size >= 0.0) {
                    return Err(err(format!("the model's size must be a byte count, not {size}")));
                }
                files.insert(kiln_provider::MODEL_ITSELF.to_string(), read.clone());
            }
            let model_size = model_size.filter(|_| !files.is_empty());
            if let Some(a) = get(&options, "externalSources").dyn_ref::<Array>() {
                for pair in a.iter() {
                    let pair: Array = pair.unchecked_into();
                    let read = pair
                        .get(1)
                        .dyn_into::<js_sys::Function>()
                        .map_err(|_| err("an external data source must be a function"))?;
                    let path = pair.get(0).as_string().unwrap_or_default();
                    files.insert(path.trim_start_matches("./").to_string(), read.clone());
                    files.insert(path, read);
                }
            }
            if !files.is_empty() {
                opts.external_data = Some(std::sync::Arc::new(JsExternalData { files }));
            }
            // onnxruntime-web's one GPUDevice per page: every 'webgpu' session shares kiln's device (env.webgpu.device),
            // requested with env.webgpu.powerPreference / forceFallbackAdapter (validated by the JS half)
            opts.share_gpu_device = true;
            if options.is_object() {
                opts.webgpu_adapter.power_preference = match get(&options, "powerPreference").as_string().as_deref() {
                    Some("low-power") => kiln_provider::wgpu::PowerPreference::LowPower,
                    Some("high-performance") => kiln_provider::wgpu::PowerPreference::HighPerformance,
                    _ => kiln_provider::wgpu::PowerPreference::None,
                };
                opts.webgpu_adapter.force_fallback_adapter =
                    get(&options, "forceFallbackAdapter").as_bool() == Some(true);
                // kiln-web's `extra: { kiln: { f16FusedAttention: false } }` turns it off (the JS half passes it on)
                opts.gpu_f16_fused_attention = get(&options, "f16FusedAttention").as_bool();
                // `extra: { kiln: { f16Math: false } }`: float16 models' matmuls and attention in f32 arithmetic
                // where the adapter has shader-f16 (the default: float16 products there)
                opts.gpu_f16_math = get(&options, "f16Math").as_bool();
                // `extra: { kiln: { gpuTuning } }` forces the kernels' tuning (by default kiln_wgsl decides from the
                // adapter: a fallback adapter, SwiftShader, is a CPU one)
                opts.gpu_tuning = match get(&options, "gpuTuning").as_string().as_deref() {
                    Some("cpu") => Some(kiln_provider::Tuning::Cpu),
                    Some("gpu") => Some(kiln_provider::Tuning::Gpu),
                    _ => None,
                };
            }
            let channel = Rc::new(RefCell::new(Channel::default()));
            if options.is_object() {
                if let Some(a) = get(&options, "customOps").dyn_ref::<Array>() {
                    for op in a.iter() {
                        let op: Array = op.unchecked_into();
                        let domain = op.get(0).as_string().unwrap_or_default();
                        let op_type = op.get(1).as_string().unwrap_or_default();
                        let mut outputs = vec![];
                        if let Some(outs) = op.get(2).dyn_ref::<Array>() {
                            for o in outs.iter() {
                                let o: Array = o.unchecked_into();
                                let dims = o.get(1).dyn_ref::<Array>().map(|a| a.iter().map(|d| d.as_f64()).collect());
                                outputs.push(
                                    super::custom_op_output(o.get(0).as_string().as_deref(), dims)
                                        .map_err(|m| err(format!("custom operator {domain}/{op_type}: {m}")))?,
                                );
                            }
                        }
                        let host = std::sync::Arc::new(JsHostOp { channel: channel.clone() });
                        opts.custom_ops.push(
                            kiln_provider::CustomOpRegistration::new(domain, op_type, host).with_outputs(outputs),
                        );
                    }
                }
            }
            let future = Box::pin(async move {
                match (model_size, opts.external_data.clone()) {
                    (Some(size), Some(source)) => Session::from_source(source, size as u64, &opts).await,
                    _ => Session::from_bytes(&bytes, &opts).await,
                }
            });
            Ok(KilnLoad { future: Some(future), channel })
        }

        /// True when the model has nodes computed by the application's custom operators (run with `startRun`).
        #[wasm_bindgen(js_name = hasCustomOps)]
        pub fn has_custom_ops(&self) -> bool {
            self.inner.has_custom_ops()
        }

        /// A run to step (see [`KilnRun`]). `feeds`: `[name, type, dims, Uint8Array | string[]]` or, for a GPU
        /// value, `[name, id]`; `fetches`: output names; `locations`: undefined, or one `'cpu'` / `'gpu-buffer'`
        /// per fetch (onnxruntime-web's `preferredOutputLocation`, resolved per output by the JS half).
        #[wasm_bindgen(js_name = startRun)]
        pub fn start_run(&self, feeds: Array, fetches: Vec<String>, locations: JsValue) -> Result<KilnRun, JsError> {
            let inputs = feeds_of(&feeds)?;
            let mut prefs = std::collections::HashMap::new();
            for (name, l) in fetches.iter().zip(strings_of(&locations)) {
                prefs.insert(name.clone(), kiln_provider::Location::from_name(&l).map_err(err)?);
            }
            let options = kiln_provider::RunOptions {
                preferred_output_location: Some(kiln_provider::PreferredOutputLocation::PerOutput(prefs)),
            };
            let session = self.inner.clone();
            let future = Box::pin(async move {
                let names: Vec<&str> = fetches.iter().map(|s| s.as_str()).collect();
                session.run_with(inputs, Some(&names), &options).await
            });
            Ok(KilnRun { future: Some(future), channel: self.channel.clone() })
        }

        #[wasm_bindgen(js_name = inputMetadata)]
        pub fn input_metadata(&self) -> Result<Array, JsValue> {
            metadata_js(self.inner.inputs())
        }

        #[wasm_bindgen(js_name = outputMetadata)]
        pub fn output_metadata(&self) -> Result<Array, JsValue> {
            metadata_js(self.inner.outputs())
        }

        /// The provider the session runs on (`'cpu'` or `'webgpu'`).
        #[wasm_bindgen(js_name = executionProvider)]
        pub fn execution_provider(&self) -> String {
            self.inner.execution_provider().name().to_string()
        }

        /// Why the session is not on the first provider asked for (e.g. no WebGPU adapter), if it is not.
        #[wasm_bindgen(js_name = providerNote)]
        pub fn provider_note(&self) -> Option<String> {
            self.inner.provider_note().map(String::from)
        }

        /// A GPU value of `type` and `dims` in a fresh buffer of the session's device (STORAGE | COPY_SRC |
        /// COPY_DST) for JS to copy an application's `GPUBuffer` into: `[id, GPUBuffer]`. Types whose layout on
        /// kiln's GPU is WebGPU's: float32, float16, int32, uint32.
        #[wasm_bindgen(js_name = allocGpuInput)]
        pub fn alloc_gpu_input(&self, type_name: &str, dims: Vec<f64>) -> Result<Array, JsError> {
            let dims = super::dims_of(&dims).map_err(err)?;
            let et = super::element_type(type_name).map_err(err)?;
            let device = self.inner.gpu_device().ok_or_else(|| err("the session is not on WebGPU"))?;
            let bytes = dims.iter().product::<usize>() * et.size_of();
            let buffer = device.create_buffer(&kiln_provider::wgpu::BufferDescriptor {
                label: Some("kiln-web input"),
                size: (bytes.max(4) as u64).div_ceil(4) * 4,
                usage: kiln_provider::wgpu::BufferUsages::STORAGE
                    | kiln_provider::wgpu::BufferUsages::COPY_SRC
                    | kiln_provider::wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let g = self.inner.gpu_tensor_from_buffer(buffer, et, &dims).map_err(err)?;
            let js = g.buffer().as_webgpu().map(|b| JsValue::from(b.clone())).unwrap_or(JsValue::UNDEFINED);
            let out = Array::new();
            out.push(&JsValue::from_f64(gpu_put(g) as f64));
            out.push(&js);
            Ok(out)
        }

        /// The WebGPU provider's transfer counters, totals over the session's runs (`undefined` on the CPU):
        /// `{ runs, submits, earlySubmits, dispatches, uploads, uploadBytes, readbacks, readbackBytes, gpuFeeds, gpuOutputs, kvAppendsInPlace,
        /// kvStoresCreated, tuning, shaderF16, f16Kernels }` (kiln-web's tests: a KV cache fed back as gpu-buffer tensors is bound without a copy).
        #[wasm_bindgen(js_name = gpuCounters)]
        pub fn gpu_counters(&self) -> Result<JsValue, JsError> {
            let Some(r) = self.inner.gpu_placement() else { return Ok(JsValue::UNDEFINED) };
            let c = &r.counters;
            let o = Object::new();
            for (k, v) in [
                ("runs", r.runs as f64),
                ("submits", c.submits as f64),
                ("earlySubmits", c.early_submits as f64),
                ("dispatches", c.dispatches as f64),
                ("uploads", c.uploads as f64),
                ("uploadBytes", c.upload_bytes as f64),
                ("readbacks", c.readbacks as f64),
                ("readbackBytes", c.readback_bytes as f64),
                ("gpuFeeds", c.gpu_feeds as f64),
                ("gpuOutputs", c.gpu_outputs as f64),
                ("kvAppendsInPlace", c.kv_appends_in_place as f64),
                ("kvAppendsFused", c.kv_appends_fused as f64),
                ("rotationsInMatmul", c.rotations_in_matmul as f64),
                ("kvStoresCreated", c.kv_stores_created as f64),
            ] {
                Reflect::set(&o, &k.into(), &JsValue::from_f64(v)).map_err(|_| err("counters"))?;
            }
            let tuning = if r.tuning == kiln_provider::Tuning::Cpu { "cpu" } else { "gpu" };
            Reflect::set(&o, &"tuning".into(), &tuning.into()).map_err(|_| err("counters"))?;
            // the adapter's shader-f16 in use, and the kernels that multiply in f16 (a float16 model's matmuls and
            // attention there, unless extra.kiln.f16Math is false)
            Reflect::set(&o, &"shaderF16".into(), &r.shader_f16.into()).map_err(|_| err("counters"))?;
            Reflect::set(&o, &"f16Kernels".into(), &JsValue::from_f64(r.f16_kernels as f64))
                .map_err(|_| err("counters"))?;
            Ok(o.into())
        }

        /// The `GPUDevice` the session's WebGPU provider runs on (`undefined` on the CPU).
        #[wasm_bindgen(js_name = webgpuDevice)]
        pub fn webgpu_device(&self) -> JsValue {
            let device = self.inner.gpu_device().and_then(|d| d.as_webgpu());
            device.map(|d| JsValue::from(d.clone())).unwrap_or(JsValue::UNDEFINED)
        }
    }

    /// A session being created, stepped by JS like [`KilnRun`] (every poll happens inside a synchronous call, so a
    /// trap is an exception of that call, never an uncaught one in a microtask).
    #[wasm_bindgen]
    pub struct KilnLoad {
        future: Stepping<kiln_provider::Result<Session>>,
        channel: Rc<RefCell<Channel>>,
    }

    #[wasm_bindgen]
    impl KilnLoad {
        /// Returns `{ done: true, session }` or `{ done: false, wait }` (a promise to await before stepping again);
        /// throws the load error in onnxruntime-web's words.
        pub fn step(&mut self) -> Result<JsValue, JsError> {
            let over = "Can't create a session. ERROR_CODE: 1, ERROR_MESSAGE: this load is over";
            match poll_once(&mut self.future, over)? {
                Polled::Ready(r) => {
                    let session = r.map_err(|e| err(super::ort_message("Can't create a session.", &e)))?;
                    let session = KilnSession { inner: Rc::new(session), channel: self.channel.clone() };
                    StepResult::with(true, "session", &session.into())
                }
                Polled::Pending(wait) => StepResult::with(false, "wait", &wait.into()),
            }
        }
    }

    /// `[name, type, dims, Uint8Array | string[]][]` (or `[name, id]` for a GPU value) → named values.
    fn feeds_of(feeds: &Array) -> Result<Vec<(String, kiln_provider::Value)>, JsError> {
        let mut inputs = vec![];
        for f in feeds.iter() {
            let f: Array = f.unchecked_into();
            let name = f.get(0).as_string().unwrap_or_default();
            if f.length() == 2 {
                let id = f.get(1).as_f64().unwrap_or(0.0) as u32;
                let g = gpu_get(id).ok_or_else(|| err(format!("input '{name}': the gpu-buffer tensor is disposed")))?;
                inputs.push((name, g.into()));
                continue;
            }
            let t = tensor_of_entry(&f.slice(1, 4)).map_err(|m| err(format!("input '{name}': {m}")))?;
            inputs.push((name, t.into()));
        }
        Ok(inputs)
    }

    /// A feed: a kiln `Tensor`, or anything shaped like onnxruntime-web's (`{ type, data, dims }`).
    fn tensor_of(value: &JsValue) -> Result<KilnTensor, JsError> {
        let get = |k: &str| Reflect::get(value, &k.into()).map_err(|_| err(format!("feed has no `{k}`")));
        let type_name = get("type")?.as_string().ok_or_else(|| err("feed `type` must be a string"))?;
        let dims: Vec<usize> = Array::from(&get("dims")?).iter().map(|d| d.as_f64().unwrap_or(0.0) as usize).collect();
        let bytes = bytes_of(&get("data")?)?;
        super::tensor_from_bytes(&type_name, &dims, &bytes).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FIPS 180-2's "abc" and two-block vectors, whole and fed a byte / 7 bytes / 64 bytes at a time.
    #[test]
    fn digests_match_the_fips_vectors_in_any_chunking() -> Result<(), String> {
        let two = b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
        let cases: [(&str, &[u8], &str); 4] = [
            ("sha256", b"abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            ("sha256", two, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"),
            (
                "sha384",
                b"abc",
                "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed8086072ba1e7cc2358baeca134c825a7",
            ),
            (
                "sha512",
                b"abc",
                "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd\
                 454d4423643ce80e2a9ac94fa54ca49f",
            ),
        ];
        for (alg, data, want) in cases {
            for chunk in [data.len().max(1), 1, 7, 64] {
                let mut d = Digest::new(alg)?;
                for c in data.chunks(chunk) {
                    d.update(c);
                }
                let hex: String = d.finish().iter().map(|b| format!("{b:02x}")).collect();
                assert_eq!(hex, want, "{alg} of {} bytes in chunks of {chunk}", data.len());
            }
        }
        assert!(Digest::new("md5").is_err());
        Ok(())
    }

    #[test]
    fn version_is_the_crate_version() {
        assert_eq!(kiln_version(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn load_check_describes_a_model() {
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/../conformance/fixtures/tiny/tiny-llama/onnx_optimum/model.onnx");
        let bytes = std::fs::read(path).unwrap();
        let text = load_check(&bytes).unwrap();
        assert!(text.contains("input_ids int64 [batch_size, sequence_length]"), "{text}");
        assert!(text.contains("logits float32"), "{text}");
        assert!(load_check(b"garbage").is_err());
    }

    #[test]
    fn tensors_from_bytes() {
        let t = tensor_from_bytes("float32", &[2], &[0, 0, 128, 63, 0, 0, 0, 64]).unwrap();
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.0, 2.0]);
        assert!(tensor_from_bytes("complex64", &[1], &[0; 8]).is_err());
        assert!(tensor_from_bytes("float32", &[3], &[0; 8]).is_err());
    }

    #[test]
    fn options_in_onnxruntime_web_words() {
        let o = |level: &str, dims: Vec<(String, f64)>| JsSessionOptions {
            execution_providers: vec!["webgpu".into(), "wasm".into()],
            graph_optimization_level: Some(level.into()),
            free_dimension_overrides: dims,
            external_data: vec![("./w.bin".into(), vec![1, 2])],
        };
        let opts = session_options(o("basic", vec![("batch".into(), 1.0)])).unwrap();
        assert_eq!(opts.free_dimension_overrides.get("batch"), Some(&1));
        assert_eq!(opts.execution_providers.len(), 2);
        assert_eq!(opts.external_data.unwrap().read("w.bin", 1, None).unwrap(), vec![2]);
        assert_eq!(session_options(o("fast", vec![])).unwrap_err(), "unsupported graph optimization level: fast");
        assert_eq!(
            session_options(o("all", vec![("b".into(), -1.0)])).unwrap_err(),
            "free dimension override value must be a non-negative integer: -1"
        );
    }

    #[test]
    fn feeds_and_metadata() {
        let t = feed_from_bytes("bool", &[3.0], &[0, 7, 1]).unwrap();
        assert_eq!(t.to_vec::<bool>().unwrap(), vec![false, true, true]);
        assert!(feed_from_bytes("float32", &[1.5], &[0; 4]).is_err());
        assert!(feed_from_bytes("float32", &[f64::NAN], &[0; 4]).is_err());
        assert!(feed_from_bytes("int64", &[1.0], &[0; 4]).is_err());
        let s = feed_from_strings(&[2.0], vec!["a".into(), "b".into()]).unwrap();
        assert_eq!(s.to_vec::<String>().unwrap(), vec!["a".to_string(), "b".to_string()]);
        let v = kiln_provider::ValueInfo {
            name: "x".into(),
            element_type: Some(ElementType::F32),
            onnx_type: 1,
            shape: Some(vec![
                kiln_provider::Dim::Symbolic("batch".into()),
                kiln_provider::Dim::Fixed(3),
                kiln_provider::Dim::Unknown,
            ]),
        };
        let (name, ty, shape) = metadata(&v);
        assert_eq!((name.as_str(), ty), ("x", Some("float32")));
        assert_eq!(shape, vec![MetaDim::Symbolic("batch".into()), MetaDim::Fixed(3.0), MetaDim::Fixed(4294967295.0)]);
        let e = kiln_provider::Error::invalid_argument("bad");
        assert_eq!(
            ort_message("failed to call OrtRun().", &e),
            "failed to call OrtRun(). ERROR_CODE: 2, ERROR_MESSAGE: bad"
        );
    }
}

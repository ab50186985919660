//! Custom operators computed by the application (`SessionOptions::custom_ops`): asynchronous Rust callbacks awaited
//! between nodes, output shapes bound at run time, errors as run errors with the session still usable, declarations
//! from value_info or the registration, overriding a built-in op (the tokenizer), and the GPU falling back to the CPU.
//! References are computed here independently (plain Rust arithmetic on the same inputs).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use kiln_graph::tract_onnx::pb;
use kiln_provider::blocking::Session;
use kiln_provider::*;
use prost::Message;

// ---- model building ----------------------------------------------------------------------------------------------

fn dims_of(dims: &[&str]) -> pb::TensorShapeProto {
    use pb::tensor_shape_proto::{dimension::Value, Dimension};
    pb::TensorShapeProto {
        dim: dims
            .iter()
            .map(|d| Dimension {
                value: Some(match d.parse::<i64>() {
                    Ok(n) => Value::DimValue(n),
                    Err(_) => Value::DimParam(d.to_string()),
                }),
                ..Default::default()
            })
            .collect(),
    }
}

fn vi(name: &str, elem: i32, dims: Option<&[&str]>) -> pb::ValueInfoProto {
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: elem,
                shape: dims.map(dims_of),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, domain: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        domain: domain.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn float_attr(name: &str, f: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

fn int_attr(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn model(
    nodes: Vec<pb::NodeProto>,
    inputs: Vec<pb::ValueInfoProto>,
    outputs: Vec<pb::ValueInfoProto>,
    value_info: Vec<pb::ValueInfoProto>,
) -> Vec<u8> {
    let bias = pb::TensorProto {
        name: "bias".into(),
        dims: vec![3],
        data_type: 1,
        float_data: vec![1.0, -1.0, 0.5],
        ..Default::default()
    };
    pb::ModelProto {
        ir_version: 8,
        opset_import: vec![
            pb::OperatorSetIdProto { domain: "".into(), version: 17 },
            pb::OperatorSetIdProto { domain: "test.kiln".into(), version: 1 },
        ],
        graph: Some(pb::GraphProto {
            name: "g".into(),
            node: nodes,
            input: inputs,
            output: outputs,
            value_info,
            initializer: vec![bias],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// x [N, 3] → test.kiln/Scale(factor) → y → Add(bias) → z; `y_info`: whether value_info declares y.
fn scale_model(y_info: bool) -> Vec<u8> {
    let mut scale = node("Scale", "test.kiln", "scale_node", &["x"], &["y"]);
    scale.attribute.push(float_attr("factor", 2.5));
    let add = node("Add", "", "add", &["y", "bias"], &["z"]);
    let vis = if y_info { vec![vi("y", 1, Some(&["N", "3"]))] } else { vec![] };
    model(vec![scale, add], vec![vi("x", 1, Some(&["N", "3"]))], vec![vi("z", 1, Some(&["N", "3"]))], vis)
}

// ---- callbacks ---------------------------------------------------------------------------------------------------

/// A future that is pending once (waking itself), like an operation that completes later.
struct YieldOnce(bool);
impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// A future completed by another thread.
fn on_a_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> impl Future<Output = T> + Send {
    struct Shared<T> {
        value: Option<T>,
        waker: Option<Waker>,
    }
    struct Wait<T>(Arc<Mutex<Shared<T>>>);
    impl<T> Future for Wait<T> {
        type Output = T;
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
            let mut s = self.0.lock().unwrap();
            match s.value.take() {
                Some(v) => Poll::Ready(v),
                None => {
                    s.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        }
    }
    let shared = Arc::new(Mutex::new(Shared { value: None, waker: None }));
    let s2 = shared.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(20));
        let v = f();
        let mut s = s2.lock().unwrap();
        s.value = Some(v);
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    });
    Wait(shared)
}

/// Scale: y = x * factor, computed after an await; fails when x[0] is negative (to test errors); counts its calls.
struct Scale {
    calls: AtomicUsize,
    threaded: bool,
}

impl CustomOp for Scale {
    fn compute(&self, node: &HostOpInfo, inputs: Vec<Tensor>) -> CustomOpFuture {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let factor = node.float_attribute("factor").unwrap_or(1.0);
        let threaded = self.threaded;
        Box::pin(async move {
            let x = inputs[0].to_vec::<f32>()?;
            if x.first().is_some_and(|v| *v < 0.0) {
                YieldOnce(false).await;
                return Err(Error::runtime("negative input, refused by the test op"));
            }
            let dims = inputs[0].dims().to_vec();
            let y: Vec<f32> = if threaded {
                on_a_thread(move || x.iter().map(|v| v * factor).collect()).await
            } else {
                YieldOnce(false).await;
                x.iter().map(|v| v * factor).collect()
            };
            Ok(vec![Tensor::from_vec(&dims, y)?])
        })
    }
}

fn scale_options(threaded: bool) -> (SessionOptions, Arc<Scale>) {
    let op = Arc::new(Scale { calls: AtomicUsize::new(0), threaded });
    let mut o = SessionOptions::default();
    o.custom_ops.push(CustomOpRegistration::new("test.kiln", "Scale", op.clone()));
    (o, op)
}

fn reference(x: &[f32]) -> Vec<f32> {
    let bias = [1.0, -1.0, 0.5];
    x.iter().enumerate().map(|(i, v)| v * 2.5 + bias[i % 3]).collect()
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-6 * y.abs().max(1.0), "{a:?} vs {b:?}");
    }
}

// ---- tests -------------------------------------------------------------------------------------------------------

#[test]
fn an_async_scale_op_runs_inside_a_model() {
    for threaded in [false, true] {
        let (o, op) = scale_options(threaded);
        let s = Session::from_bytes(&scale_model(true), &o).unwrap();
        assert!(s.has_custom_ops());
        for n in [1usize, 4, 2] {
            let x: Vec<f32> = (0..n * 3).map(|i| i as f32 * 0.25 + 0.5).collect();
            let out = s.run([("x", Tensor::from_vec(&[n, 3], x.clone()).unwrap())]).unwrap();
            let z = out.get("z").unwrap();
            assert_eq!(z.dims(), &[n, 3]);
            close(&z.to_vec::<f32>().unwrap(), &reference(&x));
        }
        assert_eq!(op.calls.load(Ordering::SeqCst), 3);
    }
}

#[test]
fn the_async_run_future_is_send_on_native() {
    fn assert_send<T: Send>(_: &T) {}
    let (o, _) = scale_options(false);
    let s = pollster::block_on(kiln_provider::Session::from_bytes(&scale_model(true), &o)).unwrap();
    let fut = s.run([("x", Tensor::from_vec(&[1, 3], vec![1f32, 2.0, 3.0]).unwrap())]);
    assert_send(&fut);
    let out = pollster::block_on(fut).unwrap();
    close(&out.get("z").unwrap().to_vec::<f32>().unwrap(), &reference(&[1.0, 2.0, 3.0]));
}

#[test]
fn an_erroring_op_is_a_run_error_and_the_session_keeps_working() {
    let (o, _) = scale_options(false);
    let s = Session::from_bytes(&scale_model(true), &o).unwrap();
    let e = s.run([("x", Tensor::from_vec(&[1, 3], vec![-1f32, 0.0, 1.0]).unwrap())]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Runtime);
    assert!(e.message.contains("test.kiln/Scale"), "{e}");
    assert!(e.message.contains("scale_node"), "{e}");
    assert!(e.message.contains("negative input, refused by the test op"), "{e}");
    let out = s.run([("x", Tensor::from_vec(&[1, 3], vec![1f32, 0.0, 1.0]).unwrap())]).unwrap();
    close(&out.get("z").unwrap().to_vec::<f32>().unwrap(), &reference(&[1.0, 0.0, 1.0]));
}

/// An op whose output does not fit the node: wrong type, wrong rank, wrong fixed dim.
struct Wrong(u8);
impl CustomOp for Wrong {
    fn compute(&self, _node: &HostOpInfo, inputs: Vec<Tensor>) -> CustomOpFuture {
        let kind = self.0;
        Box::pin(async move {
            let n = inputs[0].dims()[0];
            Ok(vec![match kind {
                0 => Tensor::from_vec(&[n, 3], vec![1i64; n * 3])?,
                1 => Tensor::from_vec(&[n * 3], vec![1f32; n * 3])?,
                // y is declared [N, 3] and N is bound by x
                3 => Tensor::from_vec(&[n + 1, 3], vec![1f32; (n + 1) * 3])?,
                _ => Tensor::from_vec(&[n, 4], vec![1f32; n * 4])?,
            }])
        })
    }
}

#[test]
fn outputs_that_do_not_fit_the_node_are_run_errors() {
    for (kind, want) in [
        (0u8, "the model expects F32"),
        (1, "the model expects rank 2"),
        (2, "expects 3 at axis 1"),
        (3, "dim `N` is 3 here but 2 elsewhere"),
    ] {
        let mut o = SessionOptions::default();
        o.custom_ops.push(CustomOpRegistration::new("test.kiln", "Scale", Arc::new(Wrong(kind))));
        let s = Session::from_bytes(&scale_model(true), &o).unwrap();
        let e = s.run([("x", Tensor::from_vec(&[2, 3], vec![1f32; 6]).unwrap())]).unwrap_err();
        assert!(e.message.contains(want), "{kind}: {e}");
        assert!(e.message.contains("scale_node"), "{e}");
    }
}

#[test]
fn output_types_come_from_value_info_or_the_registration() {
    // no value_info for y: loading says what to declare
    let (o, _) = scale_options(false);
    let e = Session::from_bytes(&scale_model(false), &o).err().expect("a load error");
    assert!(e.message.contains("scale_node") && e.message.contains("declare"), "{e}");
    // declared in the registration
    let (mut o, _) = scale_options(false);
    o.custom_ops[0].outputs =
        vec![CustomOpOutput { element_type: Some(ElementType::F32), dims: Some(vec![None, Some(3)]) }];
    let s = Session::from_bytes(&scale_model(false), &o).unwrap();
    let x = vec![3f32, 2.0, 1.0];
    close(
        &s.run([("x", Tensor::from_vec(&[1, 3], x.clone()).unwrap())])
            .unwrap()
            .get("z")
            .unwrap()
            .to_vec::<f32>()
            .unwrap(),
        &reference(&x),
    );
    // an unregistered custom node is still unsupported
    let e = Session::from_bytes(&scale_model(true), &SessionOptions::default()).err().expect("unsupported");
    assert_eq!(e.kind, ErrorKind::NotImplemented, "{e}");
}

/// Repeat: x [N] → x repeated `times` times [N * times]: an output size only known at run time.
struct Repeat;
impl CustomOp for Repeat {
    fn compute(&self, node: &HostOpInfo, inputs: Vec<Tensor>) -> CustomOpFuture {
        let times = node.int_attribute("times").unwrap_or(1) as usize;
        Box::pin(async move {
            let x = inputs[0].to_vec::<f32>()?;
            let y: Vec<f32> = (0..times).flat_map(|_| x.iter().copied()).collect();
            Ok(vec![Tensor::from_vec(&[y.len()], y)?])
        })
    }
}

#[test]
fn runtime_sized_outputs_bind_fresh_symbols_downstream() {
    // x [N] → Repeat(times=3) → r [?] → Shape → s; r → ReduceSum → total
    let mut rep = node("Repeat", "test.kiln", "rep", &["x"], &["r"]);
    rep.attribute.push(int_attr("times", 3));
    let shape = node("Shape", "", "shape", &["r"], &["s"]);
    let mut sum = node("ReduceSum", "", "sum", &["r"], &["total"]);
    sum.attribute.push(int_attr("keepdims", 0));
    let bytes = model(
        vec![rep, shape, sum],
        vec![vi("x", 1, Some(&["N"]))],
        vec![vi("s", 7, Some(&["1"])), vi("total", 1, Some(&[]))],
        vec![vi("r", 1, Some(&["?"]))],
    );
    let mut o = SessionOptions::default();
    o.custom_ops.push(CustomOpRegistration::new("test.kiln", "Repeat", Arc::new(Repeat)));
    let s = Session::from_bytes(&bytes, &o).unwrap();
    for n in [2usize, 5] {
        let x: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
        let out = s.run([("x", Tensor::from_vec(&[n], x.clone()).unwrap())]).unwrap();
        assert_eq!(out.get("s").unwrap().to_vec::<i64>().unwrap(), vec![(n * 3) as i64]);
        let want: f32 = x.iter().sum::<f32>() * 3.0;
        close(&out.get("total").unwrap().to_vec::<f32>().unwrap(), &[want]);
    }
}

/// A tokenizer stand-in: ids = the UTF-8 bytes of each string, padded with 0; mask 1 on the bytes.
struct Bytes;
impl CustomOp for Bytes {
    fn compute(&self, _node: &HostOpInfo, inputs: Vec<Tensor>) -> CustomOpFuture {
        Box::pin(async move {
            let texts = inputs[0].to_vec::<String>()?;
            let len = texts.iter().map(|t| t.len()).max().unwrap_or(0);
            let (mut ids, mut mask) = (vec![], vec![]);
            for t in &texts {
                for i in 0..len {
                    ids.push(t.as_bytes().get(i).map(|b| *b as i64).unwrap_or(0));
                    mask.push((i < t.len()) as i64);
                }
            }
            Ok(vec![Tensor::from_vec(&[texts.len(), len], ids)?, Tensor::from_vec(&[texts.len(), len], mask)?])
        })
    }
}

#[test]
fn a_custom_op_overrides_the_built_in_tokenizer() {
    let json = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conformance/fixtures/tiny/tiny-gpt2/onnx_optimum/tokenizer.json"
    ))
    .unwrap();
    let bytes = kiln_ops::tokenizer::model_from_tokenizer_json(&json, "").unwrap();
    let texts = Tensor::from_vec(&[2], vec!["hi".to_string(), "abc".to_string()]).unwrap();
    // built in: the real tokenizer
    let builtin = Session::from_bytes(&bytes, &SessionOptions::default()).unwrap();
    assert!(!builtin.has_custom_ops());
    let real = builtin.run([("input_text", texts.clone())]).unwrap();
    // overridden
    let mut o = SessionOptions::default();
    o.custom_ops.push(CustomOpRegistration::new("ai.onnx.contrib", "HfJsonTokenizer", Arc::new(Bytes)));
    let s = Session::from_bytes(&bytes, &o).unwrap();
    let out = s.run([("input_text", texts)]).unwrap();
    assert_eq!(out.get("input_ids").unwrap().dims(), &[2, 3]);
    assert_eq!(out.get("input_ids").unwrap().to_vec::<i64>().unwrap(), vec![104, 105, 0, 97, 98, 99]);
    assert_eq!(out.get("attention_mask").unwrap().to_vec::<i64>().unwrap(), vec![1, 1, 0, 1, 1, 1]);
    assert_ne!(
        real.get("input_ids").unwrap().to_vec::<i64>().unwrap(),
        out.get("input_ids").unwrap().to_vec::<i64>().unwrap()
    );
}

#[test]
fn webgpu_falls_back_to_the_cpu_for_models_with_custom_ops() {
    let (mut o, _) = scale_options(false);
    o.execution_providers = vec![ExecutionProvider::WebGpu, ExecutionProvider::Cpu];
    let s = Session::from_bytes(&scale_model(true), &o).unwrap();
    assert_eq!(s.execution_provider(), ExecutionProvider::Cpu);
    assert!(s.provider_note().unwrap_or("").contains("custom operators"), "{:?}", s.provider_note());
    let x = vec![1f32, 2.0, 3.0];
    close(
        &s.run([("x", Tensor::from_vec(&[1, 3], x.clone()).unwrap())])
            .unwrap()
            .get("z")
            .unwrap()
            .to_vec::<f32>()
            .unwrap(),
        &reference(&x),
    );
}

#[test]
fn attributes_reach_the_callback() {
    struct Record(Mutex<Vec<(String, AttributeValue)>>);
    impl CustomOp for Record {
        fn compute(&self, node: &HostOpInfo, inputs: Vec<Tensor>) -> CustomOpFuture {
            *self.0.lock().unwrap() = node.attributes.clone();
            Box::pin(async move { Ok(inputs) })
        }
    }
    let mut n = node("Scale", "test.kiln", "scale_node", &["x"], &["y"]);
    n.attribute.push(float_attr("factor", 2.5));
    n.attribute.push(int_attr("k", -7));
    n.attribute.push(pb::AttributeProto {
        name: "names".into(),
        r#type: pb::attribute_proto::AttributeType::Strings as i32,
        strings: vec![b"a".to_vec(), "é".as_bytes().to_vec()],
        ..Default::default()
    });
    let bytes = model(vec![n], vec![vi("x", 1, Some(&["N", "3"]))], vec![vi("y", 1, Some(&["N", "3"]))], vec![]);
    let rec = Arc::new(Record(Mutex::new(vec![])));
    let mut o = SessionOptions::default();
    o.custom_ops.push(CustomOpRegistration::new("test.kiln", "Scale", rec.clone()));
    let s = Session::from_bytes(&bytes, &o).unwrap();
    let out = s.run([("x", Tensor::from_vec(&[1, 3], vec![1f32, 2.0, 3.0]).unwrap())]).unwrap();
    assert_eq!(out.get("y").unwrap().to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
    assert_eq!(
        *rec.0.lock().unwrap(),
        vec![
            ("factor".to_string(), AttributeValue::Float(2.5)),
            ("k".to_string(), AttributeValue::Int(-7)),
            ("names".to_string(), AttributeValue::Strings(vec!["a".into(), "é".into()])),
        ]
    );
}

#[test]
fn a_custom_node_inside_a_subgraph_is_a_load_error() {
    // If(cond) { then: Scale(x) } else { x }: the branch would run inside tract, where no callback can be awaited
    let mut scale = node("Scale", "test.kiln", "inner_scale", &["x"], &["t"]);
    scale.attribute.push(float_attr("factor", 2.0));
    let branch = |nodes: Vec<pb::NodeProto>, out: &str| pb::GraphProto {
        name: "b".into(),
        node: nodes,
        output: vec![vi(out, 1, Some(&["N", "3"]))],
        ..Default::default()
    };
    let identity = node("Identity", "", "id", &["x"], &["e"]);
    let mut iff = node("If", "", "if", &["cond"], &["y"]);
    for (name, g) in [("then_branch", branch(vec![scale], "t")), ("else_branch", branch(vec![identity], "e"))] {
        iff.attribute.push(pb::AttributeProto {
            name: name.into(),
            r#type: pb::attribute_proto::AttributeType::Graph as i32,
            g: Some(g),
            ..Default::default()
        });
    }
    let bytes = model(
        vec![iff],
        vec![vi("cond", 9, Some(&[])), vi("x", 1, Some(&["N", "3"]))],
        vec![vi("y", 1, Some(&["N", "3"]))],
        vec![],
    );
    let (o, _) = scale_options(false);
    let e = Session::from_bytes(&bytes, &o).err().expect("a load error");
    assert!(e.message.contains("inner_scale") && e.message.contains("subgraph"), "{e}");
}

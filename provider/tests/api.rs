//! The session API against small models and onnxruntime's outputs (see tests/data/make_api_models.py).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use half::f16;
use kiln_provider::blocking::Session;
use kiln_provider::*;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}
fn read(name: &str) -> Vec<u8> {
    std::fs::read(data(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"))
}
fn proto(name: &str) -> Tensor {
    Tensor::from_onnx_proto(&read(name)).unwrap().1
}
fn load(name: &str) -> Session {
    Session::from_path(data(name), &SessionOptions::default()).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}
fn err_of<T>(r: Result<T>) -> Error {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn metadata_names_types_and_symbolic_dims() {
    let s = load("two_outputs.onnx");
    assert_eq!(s.input_names(), vec!["a"]);
    assert_eq!(s.output_names(), vec!["sum", "prod"]);
    let a = &s.inputs()[0];
    assert_eq!(a.element_type, Some(ElementType::F32));
    assert_eq!(a.shape, Some(vec![Dim::Symbolic("batch_size".into()), Dim::Fixed(3)]));
    assert_eq!(s.execution_provider(), ExecutionProvider::Cpu);
}

#[test]
fn run_matches_onnxruntime_and_subsets_outputs() {
    let s = load("two_outputs.onnx");
    let a = proto("two_outputs_input_0.pb");
    let out = s.run([("a", a.clone())]).unwrap();
    assert_eq!(out.names().collect::<Vec<_>>(), vec!["sum", "prod"]);
    assert_eq!(
        out.output("sum").unwrap().to_vec::<f32>().unwrap(),
        proto("two_outputs_output_0.pb").to_vec::<f32>().unwrap()
    );
    assert_eq!(
        out.output("prod").unwrap().to_vec::<f32>().unwrap(),
        proto("two_outputs_output_1.pb").to_vec::<f32>().unwrap()
    );
    let only = s.run_with_outputs([("a", a.clone())], &["prod"]).unwrap();
    assert_eq!(only.names().collect::<Vec<_>>(), vec!["prod"]);
    assert_eq!(only.output("prod").unwrap(), out.output("prod").unwrap());
    // a different batch size on the same session (symbolic dim resolved per run)
    let a3 = Tensor::from_vec(&[3, 3], (0..9).map(|v| v as f32).collect()).unwrap();
    let out3 = s.run([("a", a3)]).unwrap();
    assert_eq!(out3.output("sum").unwrap().dims(), &[3, 3]);
    assert_eq!(out3.output("sum").unwrap().to_vec::<f32>().unwrap()[..3], [1.5, -1.0, 2.25]);
    let e = err_of(s.run_with_outputs([("a", a)], &["nope"]));
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("nope") && e.message.contains("sum"), "{e}");
}

#[test]
fn async_api_runs_with_any_executor() {
    let s =
        pollster::block_on(kiln_provider::Session::from_bytes(&read("two_outputs.onnx"), &Default::default())).unwrap();
    let out = pollster::block_on(s.run([("a", proto("two_outputs_input_0.pb"))])).unwrap();
    assert_eq!(out.len(), 2);
}

#[test]
fn every_element_type_round_trips() {
    for et in ElementType::ALL {
        let s = load(&format!("identity_{}.onnx", et.name()));
        assert_eq!(s.inputs()[0].element_type, Some(et));
        let t = match et {
            ElementType::F32 => Tensor::from_vec(&[3, 2], vec![1.5f32, -2.0, 0.0, 3.25, f32::MAX, -0.5]),
            ElementType::F16 => {
                Tensor::from_vec(&[3, 2], [1.5f32, -2.0, 0.0, 3.25, 65504.0, -0.5].map(f16::from_f32).to_vec())
            }
            ElementType::F64 => Tensor::from_vec(&[3, 2], vec![1.5f64, -2.0, 0.0, 3.25, 1e300, -0.5]),
            ElementType::I64 => Tensor::from_vec(&[3, 2], vec![1i64, -2, 0, i64::MAX, i64::MIN, 7]),
            ElementType::I32 => Tensor::from_vec(&[3, 2], vec![1i32, -2, 0, i32::MAX, i32::MIN, 7]),
            ElementType::I16 => Tensor::from_vec(&[3, 2], vec![1i16, -2, 0, i16::MAX, i16::MIN, 7]),
            ElementType::I8 => Tensor::from_vec(&[3, 2], vec![1i8, -2, 0, i8::MAX, i8::MIN, 7]),
            ElementType::U8 => Tensor::from_vec(&[3, 2], vec![1u8, 2, 0, u8::MAX, 128, 7]),
            ElementType::U16 => Tensor::from_vec(&[3, 2], vec![1u16, 2, 0, u16::MAX, 128, 7]),
            ElementType::U32 => Tensor::from_vec(&[3, 2], vec![1u32, 2, 0, u32::MAX, 128, 7]),
            ElementType::U64 => Tensor::from_vec(&[3, 2], vec![1u64, 2, 0, u64::MAX, 128, 7]),
            ElementType::Bool => Tensor::from_vec(&[3, 2], vec![true, false, false, true, true, false]),
            ElementType::String => {
                Tensor::from_vec(&[3, 2], ["a", "", "héllo", "x y", "0", "ß"].map(String::from).to_vec())
            }
        }
        .unwrap();
        let out = s.run([("x", t.clone())]).unwrap_or_else(|e| panic!("{et}: {e}"));
        assert_eq!(out.output("y").unwrap(), &t, "{et}");
        assert_eq!(out.output("y").unwrap().element_type(), et);
        // and through the TensorProto encoding
        let back = Tensor::from_onnx_proto(&t.to_onnx_proto("x").unwrap()).unwrap();
        assert_eq!(back, ("x".to_string(), t));
    }
}

#[test]
fn bad_feeds_get_onnxruntime_like_errors() {
    let s = load("fixed_shape.onnx");
    let good = Tensor::from_vec(&[2, 3], vec![1i64, 2, 3, 4, 5, 6]).unwrap();
    assert_eq!(
        s.run([("x", good.clone())]).unwrap().output("y").unwrap().to_vec::<i64>().unwrap(),
        vec![2, 4, 6, 8, 10, 12]
    );

    let e = err_of(s.run(Vec::<(&str, Tensor)>::new()));
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("missing input") && e.message.contains("x"), "{e}");

    let e = err_of(s.run([("x", good.clone()), ("extra", good.clone())]));
    assert!(e.message.contains("invalid input name") && e.message.contains("extra"), "{e}");

    let e = err_of(s.run([("x", Tensor::from_vec(&[2, 3], vec![0f32; 6]).unwrap())]));
    assert!(e.message.contains("`x`") && e.message.contains("float32") && e.message.contains("int64"), "{e}");

    let e = err_of(s.run([("x", Tensor::from_vec(&[6], vec![0i64; 6]).unwrap())]));
    assert!(
        e.message.contains("invalid rank") && e.message.contains("Got: 1") && e.message.contains("expected: 2"),
        "{e}"
    );

    let e = err_of(s.run([("x", Tensor::from_vec(&[2, 4], vec![0i64; 8]).unwrap())]));
    assert!(e.message.contains("invalid dimensions") && e.message.contains("index 1: got 4, expected 3"), "{e}");

    let e = err_of(s.run([("x", good.clone()), ("x", good)]));
    assert!(e.message.contains("fed twice"), "{e}");

    let e = err_of(Tensor::from_vec(&[2, 2], vec![1i64, 2, 3]));
    assert!(e.message.contains("3 elements") && e.message.contains("need 4"), "{e}");
}

#[test]
fn malformed_models_are_errors_not_panics() {
    let e = err_of(Session::from_bytes(&[], &Default::default()));
    assert_eq!(e.kind, ErrorKind::InvalidModel);
    let e = err_of(Session::from_bytes(b"definitely not protobuf \xff\xff\xff", &Default::default()));
    assert_eq!(e.kind, ErrorKind::InvalidModel, "{e}");
    let e = err_of(Session::from_path(data("no_such_model.onnx"), &Default::default()));
    assert_eq!(e.kind, ErrorKind::Io, "{e}");
    // every truncation and a sprinkling of corrupted bytes of a real model: errors or sessions, never panics
    let bytes = read("two_outputs.onnx");
    for cut in 0..bytes.len() {
        let _ = Session::from_bytes(&bytes[..cut], &Default::default());
    }
    let mut state = 0x2545F4914F6CDD1Du64;
    for _ in 0..300 {
        let mut b = bytes.clone();
        for _ in 0..3 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let i = (state as usize) % b.len();
            b[i] = (state >> 32) as u8;
        }
        if let Ok(s) = Session::from_bytes(&b, &Default::default()) {
            let feeds: Vec<(String, Tensor)> = s
                .inputs()
                .iter()
                .map(|i| (i.name.clone(), Tensor::from_vec(&[2, 3], vec![1f32; 6]).unwrap()))
                .collect();
            let _ = s.run(feeds);
        }
    }
}

#[test]
fn unsupported_operator_names_node_and_op() {
    let e = err_of(Session::from_path(data("unsupported_op.onnx"), &Default::default()));
    assert_eq!(e.kind, ErrorKind::NotImplemented);
    assert!(
        e.message.contains("frob_1") && e.message.contains("FrobnicateTensor") && e.message.contains("com.example"),
        "{e}"
    );
}

#[test]
fn external_data_from_folder_and_from_a_resolver() {
    let x = proto("external_data_input_0.pb");
    let want = proto("external_data_output_0.pb").to_vec::<f32>().unwrap();
    let s = load("external_data.onnx");
    let got = s.run([("x", x.clone())]).unwrap().output("y").unwrap().to_vec::<f32>().unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5), "{got:?} vs {want:?}");

    // the browser way: bytes only, external files supplied by the caller
    let bytes = read("external_data.onnx");
    let e = err_of(Session::from_bytes(&bytes, &Default::default()));
    assert!(e.message.contains("weights.bin"), "{e}");
    let resolver = InMemoryResolver::new().with_file("weights.bin", read("weights.bin"));
    let opts = SessionOptions { external_data: Some(Arc::new(resolver)), ..Default::default() };
    let s = Session::from_bytes(&bytes, &opts).unwrap();
    assert_eq!(s.run([("x", x.clone())]).unwrap().output("y").unwrap().to_vec::<f32>().unwrap(), got);

    let short = InMemoryResolver::new().with_file("weights.bin", read("weights.bin")[..20].to_vec());
    let opts = SessionOptions { external_data: Some(Arc::new(short)), ..Default::default() };
    let e = err_of(Session::from_bytes(&bytes, &opts));
    assert!(e.message.contains("weights.bin") && e.message.contains("past its end"), "{e}");
}

#[test]
fn free_dimension_overrides_fix_named_dims() {
    let opts = SessionOptions {
        free_dimension_overrides: HashMap::from([("batch".to_string(), 1), ("seq".to_string(), 4)]),
        ..Default::default()
    };
    let s = Session::from_path(data("free_dims.onnx"), &opts).unwrap();
    assert_eq!(s.inputs()[0].shape, Some(vec![Dim::Fixed(1), Dim::Fixed(4)]));
    let x = Tensor::from_vec(&[1, 4], vec![1f32, 2., 3., 4.]).unwrap();
    let out = s.run([("x", x.clone()), ("y", x.clone())]).unwrap();
    assert_eq!(out.output("z").unwrap().to_vec::<f32>().unwrap(), vec![2., 4., 6., 8.]);
    let wrong = Tensor::from_vec(&[1, 3], vec![1f32, 2., 3.]).unwrap();
    let e = err_of(s.run([("x", wrong.clone()), ("y", wrong)]));
    assert!(e.message.contains("index 1: got 3, expected 4"), "{e}");
    let bad =
        SessionOptions { free_dimension_overrides: HashMap::from([("seq".to_string(), -2)]), ..Default::default() };
    assert_eq!(err_of(Session::from_path(data("free_dims.onnx"), &bad)).kind, ErrorKind::InvalidArgument);
}

#[test]
fn optimisation_levels_agree() {
    let a = proto("two_outputs_input_0.pb");
    let want = proto("two_outputs_output_0.pb").to_vec::<f32>().unwrap();
    for level in ["disabled", "basic", "extended", "all"] {
        let opts = SessionOptions { optimization: OptimizationLevel::from_name(level).unwrap(), ..Default::default() };
        let s = Session::from_path(data("two_outputs.onnx"), &opts).unwrap();
        assert_eq!(s.run([("a", a.clone())]).unwrap().output("sum").unwrap().to_vec::<f32>().unwrap(), want, "{level}");
    }
    assert_eq!(err_of(OptimizationLevel::from_name("max")).kind, ErrorKind::InvalidArgument);
}

#[test]
fn constant_inputs_leave_the_input_list() {
    let x = Tensor::from_vec(&[1, 2], vec![5f32, 6.]).unwrap();
    let opts = SessionOptions { constant_inputs: vec![("y".into(), x.clone())], ..Default::default() };
    let s = Session::from_path(data("free_dims.onnx"), &opts).unwrap();
    assert_eq!(s.input_names(), vec!["x"]);
    let out = s.run([("x", Tensor::from_vec(&[1, 2], vec![1f32, 2.]).unwrap())]).unwrap();
    assert_eq!(out.output("z").unwrap().to_vec::<f32>().unwrap(), vec![6., 8.]);
    let bad = SessionOptions { constant_inputs: vec![("nope".into(), x)], ..Default::default() };
    assert!(err_of(Session::from_path(data("free_dims.onnx"), &bad)).message.contains("nope"));
}

#[test]
fn gpu_request_falls_back_to_cpu_with_a_note() {
    let opts = SessionOptions { execution_providers: vec![ExecutionProvider::WebGpu], ..Default::default() };
    let s = Session::from_path(data("two_outputs.onnx"), &opts).unwrap();
    // with a GPU adapter (lavapipe in CI) the session runs on it; without one it falls back with a note
    if s.execution_provider() == ExecutionProvider::WebGpu {
        assert!(s.gpu_placement().is_some());
        let a = proto("two_outputs_input_0.pb");
        let out = s.run([("a", a)]).unwrap();
        assert_eq!(
            out.output("sum").unwrap().to_vec::<f32>().unwrap(),
            proto("two_outputs_output_0.pb").to_vec::<f32>().unwrap()
        );
    } else {
        assert_eq!(s.execution_provider(), ExecutionProvider::Cpu);
        assert!(s.provider_note().unwrap().contains("webgpu"));
    }
    assert_eq!(ExecutionProvider::from_name("wasm").unwrap(), ExecutionProvider::Cpu);
    assert!(ExecutionProvider::from_name("cuda").is_err());
}

#[test]
fn out_of_range_gather_indices_are_errors() {
    // tiny-llama's embedding Gather with a token id past its vocabulary (1000): an error naming the range, and the
    // session keeps working
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../conformance/fixtures/tiny/tiny-llama/onnx_dynamo_eager_op20/model.onnx");
    for level in ["disabled", "basic", "all"] {
        let opts = SessionOptions { optimization: OptimizationLevel::from_name(level).unwrap(), ..Default::default() };
        let s = Session::from_path(&model, &opts).unwrap_or_else(|e| panic!("{level}: {e}"));
        let feeds = |id: i64| -> Vec<(String, Tensor)> {
            s.inputs()
                .iter()
                .map(|i| {
                    let t = match i.name.as_str() {
                        "input_ids" => Tensor::from_vec(&[1, 2], vec![5i64, id]).unwrap(),
                        "attention_mask" => Tensor::from_vec(&[1, 2], vec![1i64, 1]).unwrap(),
                        "position_ids" => Tensor::from_vec(&[1, 2], vec![0i64, 1]).unwrap(),
                        _ => Tensor::from_vec(&[1, 2, 0, 16], Vec::<f32>::new()).unwrap(),
                    };
                    (i.name.clone(), t)
                })
                .collect()
        };
        for bad in [1000i64, 99999, -1001, i64::MIN] {
            let e = err_of(s.run(feeds(bad)));
            assert!(e.message.contains("out of range") && e.message.contains(&bad.to_string()), "{level}: {e}");
        }
        s.run(feeds(999)).unwrap_or_else(|e| panic!("{level}: {e}"));
        s.run(feeds(-1)).unwrap_or_else(|e| panic!("{level}: {e}"));
    }
}

#[test]
fn unnamed_dims_vary_freely_and_shapeless_inputs_are_refused_by_name() {
    let s = load("unnamed_dim.onnx");
    assert_eq!(s.inputs()[0].shape, Some(vec![Dim::Unknown, Dim::Fixed(3)]));
    for rows in [1usize, 4] {
        let x = Tensor::from_vec(&[rows, 3], (0..rows * 3).map(|v| v as f32).collect()).unwrap();
        let y = s.run([("x", x)]).unwrap().output("y").unwrap().to_vec::<f32>().unwrap();
        assert_eq!(y, (0..rows * 3).map(|v| v as f32 + 1.0).collect::<Vec<_>>());
    }
    let e = err_of(Session::from_path(data("no_shape.onnx"), &Default::default()));
    assert_eq!(e.kind, ErrorKind::NotImplemented);
    assert!(e.message.contains("`x`") && e.message.contains("no shape"), "{e}");
}

/// A model read through a data source (`Session::from_source`, as kiln-web passes a Blob): on the CPU the model is
/// read whole and gives onnxruntime's outputs; a source shorter than the size given is an error naming the model.
#[test]
fn a_model_read_through_a_source_runs_as_from_bytes() {
    let bytes = read("two_outputs.onnx");
    let source = |b: &[u8]| -> Arc<dyn ExternalDataResolver> {
        Arc::new(InMemoryResolver::new().with_file(MODEL_ITSELF, b.to_vec()))
    };
    let s = Session::from_source(source(&bytes), bytes.len() as u64, &SessionOptions::default()).unwrap();
    // against onnxruntime's outputs (tests/data/make_api_models.py)
    let got = s.run([("a", proto("two_outputs_input_0.pb"))]).unwrap();
    for (name, file) in [("sum", "two_outputs_output_0.pb"), ("prod", "two_outputs_output_1.pb")] {
        assert_eq!(got.output(name).unwrap().to_vec::<f32>().unwrap(), proto(file).to_vec::<f32>().unwrap());
    }
    let e = err_of(Session::from_source(source(&bytes[..10]), bytes.len() as u64, &SessionOptions::default()));
    assert!(e.message.contains(MODEL_ITSELF), "{e}");
}

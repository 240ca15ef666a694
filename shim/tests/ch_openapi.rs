//! Contract test: every request body the Cloud Hypervisor backend builds validates
//! against Cloud Hypervisor's own OpenAPI spec (`../shared/reference/`, or
//! `GPUVM_CH_OPENAPI`). Prints `SKIPPED` through `gpuvm-testkit` when the spec is
//! absent, and fails instead under `GPUVM_REQUIRE=ch-openapi`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use gpuvm_shim::config::GuestSize;
use gpuvm_shim::hypervisor::cloud_hypervisor::{API_CALLS, VmConfig};
use gpuvm_shim::hypervisor::{MemoryOptions, Nic, VmSpec};
use gpuvm_testkit::{Requirement, skip};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Deserialize)]
struct OpenApi {
    paths: BTreeMap<String, BTreeMap<String, Operation>>,
    components: Components,
}

#[derive(Deserialize)]
struct Operation {
    #[serde(rename = "requestBody")]
    request_body: Option<Value>,
}

#[derive(Deserialize)]
struct Components {
    schemas: serde_json::Map<String, Value>,
}

fn spec_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("GPUVM_CH_OPENAPI") {
        let p = PathBuf::from(p);
        return p.exists().then_some(p);
    }
    // shim/ → repo root → ../shared/reference
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/reference/cloud-hypervisor-openapi.yaml");
    p.exists().then_some(p)
}

fn load() -> Option<OpenApi> {
    let Some(path) = spec_path() else {
        skip(
            Requirement::ChOpenapi,
            "cloud-hypervisor-openapi.yaml not found at ../shared/reference/ or $GPUVM_CH_OPENAPI",
        );
        return None;
    };
    let text = std::fs::read_to_string(&path).expect("read OpenAPI spec");
    Some(serde_saphyr::from_str(&text).expect("parse OpenAPI spec"))
}

/// Turns an OpenAPI 3.0 schema into JSON Schema: `#/components/schemas/X` becomes
/// `#/definitions/X`, and objects with declared properties reject unknown ones
/// (Cloud Hypervisor's config structs deny unknown fields), so a misspelled field fails.
fn convert(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (key, value) in map {
                if key == "$ref" {
                    let target = value
                        .as_str()
                        .expect("$ref is a string")
                        .replace("#/components/schemas/", "#/definitions/");
                    out.insert(key.clone(), Value::String(target));
                } else {
                    out.insert(key.clone(), convert(value));
                }
            }
            if out.contains_key("properties") && !out.contains_key("additionalProperties") {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(convert).collect()),
        other => other.clone(),
    }
}

fn validator(api: &OpenApi, schema_name: &str) -> jsonschema::Validator {
    let definitions: serde_json::Map<String, Value> = api
        .components
        .schemas
        .iter()
        .map(|(k, v)| (k.clone(), convert(v)))
        .collect();
    let root = json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$ref": format!("#/definitions/{schema_name}"),
        "definitions": definitions,
    });
    jsonschema::validator_for(&root).expect("valid JSON Schema")
}

fn errors(validator: &jsonschema::Validator, body: &Value) -> Vec<String> {
    validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

fn spec(devices: Vec<String>, taps: Vec<String>) -> VmSpec {
    let nics = taps
        .into_iter()
        .map(|tap| Nic {
            tap,
            mac: "02:42:0a:58:00:05".into(),
        })
        .collect();
    VmSpec {
        id: "3f1c".into(),
        work_dir: PathBuf::from("/run/gpuvm/3f1c"),
        kernel: PathBuf::from("/usr/share/gpuvm/vmlinux"),
        initramfs: PathBuf::from("/usr/share/gpuvm/initramfs.img"),
        cmdline: "console=ttyS0 reboot=k panic=1".into(),
        size: GuestSize {
            cpus: 4,
            memory_mib: 8192,
        },
        shared_dir: Some(PathBuf::from("/run/gpuvm/3f1c/shared")),
        devices,
        nics,
        netns: None,
        mmio64_size: None,
        memory: Default::default(),
        cgroups: vec![],
        numa: None,
    }
}

/// The request body schema of `PUT <endpoint>`.
fn body_schema_name(api: &OpenApi, endpoint: &str) -> String {
    let op = &api.paths[&format!("/{endpoint}")]["put"];
    let body = op.request_body.as_ref().expect("endpoint takes a body");
    body["content"]["application/json"]["schema"]["$ref"]
        .as_str()
        .expect("body schema is a $ref")
        .trim_start_matches("#/components/schemas/")
        .to_owned()
}

#[test]
fn every_api_call_exists_with_the_right_method_and_body() {
    let Some(api) = load() else { return };
    for (endpoint, method, has_body) in API_CALLS {
        let path = format!("/{endpoint}");
        let ops = api
            .paths
            .get(&path)
            .unwrap_or_else(|| panic!("{path} is not in the spec"));
        let op = ops
            .get(*method)
            .unwrap_or_else(|| panic!("{path} has no {method}"));
        let spec_has_body = op
            .request_body
            .as_ref()
            .is_some_and(|b| b.get("required").and_then(Value::as_bool).unwrap_or(true));
        assert_eq!(spec_has_body, *has_body, "{method} {path} body");
    }
}

#[test]
fn vm_create_bodies_validate() {
    let Some(api) = load() else { return };
    let schema_name = body_schema_name(&api, "vm.create");
    assert_eq!(schema_name, "VmConfig");
    let validator = validator(&api, &schema_name);
    let cases = [
        spec(vec![], vec![]),
        spec(vec!["0000:3b:00.0".into(), "0000:3c:00.0".into()], vec![]),
        spec(vec!["0000:3b:00.0".into()], vec!["tap0".into()]),
    ];
    for spec in cases.into_iter().chain(gpu_specs()) {
        let body = serde_json::to_value(VmConfig::try_from(&spec).expect("config")).expect("json");
        let errs = errors(&validator, &body);
        assert!(errs.is_empty(), "{body}\n{errs:#?}");
    }
}

/// GPU sandboxes: 8 x H100 with their 64-bit MMIO window, prefault, hugepages.
fn gpu_specs() -> Vec<VmSpec> {
    let gpus: Vec<String> = [
        "0000:18:00.0",
        "0000:19:00.0",
        "0000:3d:00.0",
        "0000:3e:00.0",
        "0000:9d:00.0",
        "0000:9e:00.0",
        "0000:c3:00.0",
        "0000:c4:00.0",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let bars: Vec<u64> = [128u64 << 30, 32 << 20].repeat(8);
    let mut all = spec(gpus, vec![]);
    all.mmio64_size = gpuvm_shim::devices::mmio64_window(&bars);
    all.memory = MemoryOptions {
        prefault: true,
        hugepages: true,
        hugepage_size: Some(1 << 30),
    };
    let mut default_hugepages = spec(vec!["0000:18:00.0".into()], vec![]);
    default_hugepages.mmio64_size = gpuvm_shim::devices::mmio64_window(&bars[..2]);
    default_hugepages.memory = MemoryOptions {
        prefault: false,
        hugepages: true,
        hugepage_size: None,
    };
    let mut prefault_only = spec(vec!["0000:18:00.0".into()], vec![]);
    prefault_only.memory.prefault = true;
    vec![all, default_hugepages, prefault_only]
}

#[test]
fn gpu_bodies_carry_devices_window_and_memory_options() {
    let Some(api) = load() else { return };
    let validator = validator(&api, "VmConfig");
    let [all, ..] = &gpu_specs()[..] else {
        panic!("no GPU specs");
    };
    let body = serde_json::to_value(VmConfig::try_from(all).expect("config")).expect("json");
    assert!(errors(&validator, &body).is_empty());
    assert_eq!(body["devices"].as_array().map(Vec::len), Some(8));
    assert_eq!(
        body["devices"][0]["path"],
        json!("/sys/bus/pci/devices/0000:18:00.0/")
    );
    assert_eq!(body["cpus"]["max_phys_bits"], json!(46));
    assert_eq!(body["memory"]["prefault"], json!(true));
    assert_eq!(body["memory"]["hugepages"], json!(true));
    assert_eq!(body["memory"]["hugepage_size"], json!(1u64 << 30));
    // A misspelled knob fails the spec: the fields used are the spec's own.
    let breakages: Vec<(&str, Breakage)> = vec![
        (
            "hugepage_size as text",
            Box::new(|v| v["memory"]["hugepage_size"] = json!("1G")),
        ),
        (
            "prefault misspelled",
            Box::new(|v| {
                let memory = v["memory"].as_object_mut().expect("object");
                let prefault = memory.remove("prefault").expect("prefault");
                memory.insert("pre_fault".into(), prefault);
            }),
        ),
        (
            "device without a path, with an unknown field",
            Box::new(|v| v["devices"][0] = json!({"bdf": "0000:18:00.0"})),
        ),
        (
            "max_phys_bits as text",
            Box::new(|v| v["cpus"]["max_phys_bits"] = json!("46")),
        ),
    ];
    for (name, breakage) in breakages {
        let mut broken = body.clone();
        breakage(&mut broken);
        assert!(
            !errors(&validator, &broken).is_empty(),
            "{name}: broken body passed validation: {broken}"
        );
    }
}

/// A change that makes a valid body invalid.
type Breakage = Box<dyn Fn(&mut Value)>;

#[test]
fn broken_bodies_fail_validation() {
    let Some(api) = load() else { return };
    let validator = validator(&api, "VmConfig");
    let good = serde_json::to_value(
        VmConfig::try_from(&spec(vec!["0000:3b:00.0".into()], vec!["tap0".into()]))
            .expect("config"),
    )
    .expect("json");
    assert!(errors(&validator, &good).is_empty());
    // The pvpanic device is always asked for: a guest's panic must reach the shim.
    assert_eq!(good["pvpanic"], json!(true));

    let breakages: Vec<(&str, Breakage)> = vec![
        (
            "missing payload",
            Box::new(|v| {
                v.as_object_mut().expect("object").remove("payload");
            }),
        ),
        (
            "zero vCPUs",
            Box::new(|v| v["cpus"]["boot_vcpus"] = json!(0)),
        ),
        (
            "memory size as text",
            Box::new(|v| v["memory"]["size"] = json!("8G")),
        ),
        (
            "reserved vsock cid",
            Box::new(|v| v["vsock"]["cid"] = json!(2)),
        ),
        (
            "vsock without socket",
            Box::new(|v| {
                v["vsock"].as_object_mut().expect("object").remove("socket");
            }),
        ),
        (
            "misspelled field",
            Box::new(|v| {
                let memory = v["memory"].as_object_mut().expect("object");
                let shared = memory.remove("shared").expect("shared");
                memory.insert("shared_memory".into(), shared);
            }),
        ),
        (
            "bad console mode",
            Box::new(|v| v["console"]["mode"] = json!("Nowhere")),
        ),
        ("pvpanic as text", Box::new(|v| v["pvpanic"] = json!("on"))),
        (
            "fs without tag",
            Box::new(|v| {
                v["fs"][0].as_object_mut().expect("object").remove("tag");
            }),
        ),
    ];
    for (name, breakage) in breakages {
        let mut body = good.clone();
        breakage(&mut body);
        assert!(
            !errors(&validator, &body).is_empty(),
            "{name}: broken body passed validation: {body}"
        );
    }
}

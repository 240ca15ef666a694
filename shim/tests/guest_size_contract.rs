//! One contract for the guest's size, from the GpuMachine to the VM.
//!
//! For every guest size the GpuMachine CRD accepts (`spec.guest.cpus` an integer 1 to
//! 256; `spec.guest.memory` a Kubernetes quantity of at least 128Mi in at most 32
//! characters, `api/src/machine.rs`), the Pod the operator builds (`build_pod`) and the
//! size the shim boots (`guest_size` on that Pod's annotations) agree, and both agree
//! with exact arithmetic on the text the user wrote. Memory texts are generated in
//! Kubernetes' whole quantity grammar: signs, leading zeros, `.5` and `5.` fractions,
//! every suffix (n u m k M G T P E, Ki to Ei) and exponents (`e3`, `E-2`, `e+9`).
//! Values beyond Kubernetes' largest quantity (2^63-1), which the CRD still accepts
//! because the API server caps them, are refused by both sides.
//!
//! The shim also bounds the VM by the Pod's resources as the kubelet computes them and
//! containerd passes them (`io.kubernetes.cri.sandbox-cpu-*` / `-memory`): every Pod
//! the operator builds passes that check, with a VM no larger than its limits, and the
//! same Pod with one CPU or one byte more in its annotations is refused.

use std::collections::{BTreeMap, HashMap};

use gpuvm_api::{GpuMachine, keys};
use gpuvm_operator::pod::{PodError, build_pod};
use gpuvm_shim::config::{
    ANNOTATION_SANDBOX_CPU_PERIOD, ANNOTATION_SANDBOX_CPU_QUOTA, ANNOTATION_SANDBOX_CPU_SHARES,
    ANNOTATION_SANDBOX_MEMORY, GuestConfig, guest_size,
};
use proptest::prelude::*;

/// A placed machine of this size, as the API server would hand it to the operator.
fn placed_machine(cpus: i32, memory: &str) -> GpuMachine {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "gpuvm.dev/v1alpha1",
        "kind": "GpuMachine",
        "metadata": {"name": "train", "namespace": "ml", "uid": "uid-1"},
        "spec": {
            "image": "nvcr.io/nvidia/pytorch:24.05-py3",
            "gpu": {"model": "l40s", "count": 1},
            "guest": {"cpus": cpus, "memory": memory},
        },
        "status": {
            "nodeName": "ws-1",
            "gpus": [{"pciAddress": "0000:01:00.0", "model": "l40s"}],
        },
    }))
    .expect("a valid GpuMachine")
}

/// A shim whose limits are the largest sizes the CRD allows, so that only a
/// disagreement between the two sides can refuse a machine.
/// It trusts the annotations without Pod resources (the parsing contract below);
/// [`roomy_kubernetes_shim`] does not (the production default).
fn roomy_shim() -> GuestConfig {
    GuestConfig {
        max_cpus: 256,
        max_memory: i64::MAX.to_string(),
        allow_size_without_pod_resources: true,
        ..GuestConfig::default()
    }
}

/// [`roomy_shim`] with the default that a size needs the Pod's resources.
fn roomy_kubernetes_shim() -> GuestConfig {
    GuestConfig {
        allow_size_without_pod_resources: false,
        ..roomy_shim()
    }
}

/// A quantity in millis rounded up (Kubernetes' `MilliValue()`).
fn milli_value(text: &str) -> i128 {
    let nanos = gpuvm_api::quantity::Quantity::parse(text)
        .expect("a quantity")
        .nanos();
    nanos.div_euclid(1_000_000) + i128::from(nanos.rem_euclid(1_000_000) != 0)
}

/// The CRI sandbox annotations containerd puts on the sandbox's spec for `pod` (JSON):
/// the kubelet's `calculateSandboxResources` (requests and limits summed over the
/// containers, at least each init container's, without the overhead) turned into
/// `LinuxContainerResources` (`MilliCPUToShares`, `milliCPUToQuota` with the 100 ms
/// period, the memory limit's `Value()`), which containerd copies as decimal strings.
fn cri_sandbox_annotations(pod: &serde_json::Value) -> Vec<(String, String)> {
    let spec = &pod["spec"];
    let sum = |list: &str, kind: &str, resource: &str, value: &dyn Fn(&str) -> i128| -> i128 {
        let of = |c: &serde_json::Value| c["resources"][kind][resource].as_str().map_or(0, value);
        let containers: i128 = spec[list]
            .as_array()
            .map_or(0, |cs| cs.iter().map(of).sum());
        let init = spec["initContainers"]
            .as_array()
            .map_or(0, |cs| cs.iter().map(of).max().unwrap_or(0));
        containers.max(init)
    };
    let units = |text: &str| {
        gpuvm_api::quantity::Quantity::parse(text)
            .expect("a quantity")
            .ceil_units()
    };
    let cpu_request = sum("containers", "requests", "cpu", &milli_value);
    let cpu_limit = sum("containers", "limits", "cpu", &milli_value);
    let memory_limit = sum("containers", "limits", "memory", &units);
    let period: i128 = 100_000;
    let shares = (cpu_request * 1024 / 1000).clamp(2, 262_144);
    let quota = match cpu_limit {
        0 => 0,
        millis => (millis * period / 1000).max(1000),
    };
    vec![
        (ANNOTATION_SANDBOX_CPU_PERIOD.to_owned(), period.to_string()),
        (ANNOTATION_SANDBOX_CPU_QUOTA.to_owned(), quota.to_string()),
        (ANNOTATION_SANDBOX_CPU_SHARES.to_owned(), shares.to_string()),
        (
            ANNOTATION_SANDBOX_MEMORY.to_owned(),
            memory_limit.to_string(),
        ),
    ]
}

/// One way to spell a quantity's scale: its text and the value of one unit, as
/// 10^decimal × 2^binary.
#[derive(Debug, Clone)]
struct Suffix {
    text: String,
    decimal: i32,
    binary: u32,
}

fn suffixes() -> impl Strategy<Value = Suffix> {
    let fixed: Vec<(&str, i32, u32)> = vec![
        ("", 0, 0),
        ("n", -9, 0),
        ("u", -6, 0),
        ("m", -3, 0),
        ("k", 3, 0),
        ("M", 6, 0),
        ("G", 9, 0),
        ("T", 12, 0),
        ("P", 15, 0),
        ("E", 18, 0),
        ("Ki", 0, 10),
        ("Mi", 0, 20),
        ("Gi", 0, 30),
        ("Ti", 0, 40),
        ("Pi", 0, 50),
        ("Ei", 0, 60),
    ];
    let fixed = proptest::sample::select(fixed).prop_map(|(text, decimal, binary)| Suffix {
        text: text.to_owned(),
        decimal,
        binary,
    });
    let exponent = (
        prop_oneof![Just("e"), Just("E")],
        -12i32..=18,
        any::<bool>(),
    )
        .prop_map(|(e, decimal, plus)| Suffix {
            text: match (decimal >= 0, plus) {
                (true, true) => format!("{e}+{decimal}"),
                _ => format!("{e}{decimal}"),
            },
            decimal,
            binary: 0,
        });
    prop_oneof![3 => fixed, 1 => exponent]
}

/// A memory text the CRD's grammar accepts, with its exact value in bytes rounded up
/// (`None` when that does not fit the arithmetic here, which never happens for
/// texts of at most 32 characters).
#[derive(Debug, Clone)]
struct Memory {
    text: String,
    bytes: u128,
}

prop_compose! {
    fn memory()(
        suffix in suffixes(),
        // The intended size, log-uniform from 128Mi to past Kubernetes' cap.
        log2 in 27u32..66,
        fraction in any::<u32>(),
        fraction_digits in 0u32..=6,
        leading_zeros in 0usize..=2,
        plus in any::<bool>(),
        bare_point in any::<bool>(),
    ) -> Option<Memory> {
        let target: u128 = (1u128 << log2) + ((u128::from(fraction) << log2) >> 32);
        // mantissa = target × 10^digits / unit, so that mantissa / 10^digits units is
        // close to the target; the oracle below then gives the exact value.
        let up = 10u128.pow(fraction_digits + suffix.decimal.min(0).unsigned_abs());
        let down = 10u128.pow(suffix.decimal.max(0).unsigned_abs()) << suffix.binary;
        let mantissa = target.checked_mul(up)? / down;
        // Exact bytes: mantissa × unit / 10^digits, rounded up.
        let numerator = (mantissa << suffix.binary)
            .checked_mul(10u128.pow(suffix.decimal.max(0).unsigned_abs()))?;
        let bytes = numerator.div_ceil(up);
        let width = fraction_digits as usize + 1;
        let digits = format!("{mantissa:0width$}");
        let (int_part, frac_part) = digits.split_at(digits.len() - fraction_digits as usize);
        let number = match (frac_part.is_empty(), int_part) {
            (true, _) if bare_point => format!("{int_part}."),
            (true, _) => int_part.to_owned(),
            (false, "0") if bare_point => format!(".{frac_part}"),
            (false, _) => format!("{int_part}.{frac_part}"),
        };
        let text = format!(
            "{}{}{number}{}",
            if plus { "+" } else { "" },
            "0".repeat(leading_zeros),
            suffix.text
        );
        Some(Memory { text, bytes })
    }
}

/// What the CRD accepts: at least 128Mi (`quantity(self).compareTo(quantity('128Mi'))`)
/// and at most 32 characters (`maxLength`). Values past 2^63-1 are capped there, so
/// they pass too.
fn crd_accepts(memory: &Memory) -> bool {
    memory.bytes >= 128 << 20 && memory.text.len() <= 32
}

/// The Pod's annotations as containerd hands them to the shim.
fn annotations_of(annotations: &Option<BTreeMap<String, String>>) -> HashMap<String, String> {
    annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_operator_and_the_shim_agree_on_every_size_the_crd_accepts(
        cpus in 1i32..=256,
        memory in memory().prop_filter_map("not a size the CRD accepts", |m| m.filter(crd_accepts)),
    ) {
        let machine = placed_machine(cpus, &memory.text);
        let built = build_pod(&machine);
        if memory.bytes > i64::MAX as u128 {
            // Past Kubernetes' largest quantity: the operator refuses with a sentence,
            // and the shim would refuse the same annotation.
            prop_assert!(matches!(built, Err(PodError::BadMemory { .. })), "{}: {:?}", memory.text, built);
            let annotations = HashMap::from([
                (keys::ANNOTATION_CPUS.to_owned(), cpus.to_string()),
                (keys::ANNOTATION_MEMORY.to_owned(), memory.text.clone()),
            ]);
            prop_assert!(guest_size(&roomy_shim(), &annotations).is_err(), "{}", memory.text);
            return Ok(());
        }
        let pod = built.map_err(|e| TestCaseError::fail(format!("{}: {e}", memory.text)))?;
        let annotations = annotations_of(&pod.metadata.annotations);
        prop_assert_eq!(&annotations[keys::ANNOTATION_MEMORY], &memory.text);
        prop_assert_eq!(&annotations[keys::ANNOTATION_CPUS], &cpus.to_string());

        let size = guest_size(&roomy_shim(), &annotations)
            .map_err(|e| TestCaseError::fail(format!("{}: {}", memory.text, e.full_message())))?;
        prop_assert_eq!(size.cpus, u32::try_from(cpus).expect("positive"));
        prop_assert_eq!(u128::from(size.memory_mib), memory.bytes.div_ceil(1 << 20), "{}", memory.text);

        // As a Kubernetes Pod, with the resources containerd passes: admitted, and the
        // VM fits the limits (whole MiB, so a limit that is not one rounds down).
        let pod_json = serde_json::to_value(&pod).expect("json");
        let mut sandbox = annotations.clone();
        sandbox.extend(cri_sandbox_annotations(&pod_json));
        let bounded = guest_size(&roomy_kubernetes_shim(), &sandbox)
            .map_err(|e| TestCaseError::fail(format!("{}: {}", memory.text, e.full_message())))?;
        prop_assert_eq!(bounded.cpus, size.cpus);
        prop_assert!(u128::from(bounded.memory_mib) << 20 <= memory.bytes, "{}", memory.text);
        prop_assert_eq!(u128::from(bounded.memory_mib), memory.bytes >> 20, "{}", memory.text);
        // One CPU or one byte more than the Pod accounts for is refused.
        let mut greedy = sandbox.clone();
        greedy.insert(keys::ANNOTATION_CPUS.to_owned(), (cpus + 1).to_string());
        prop_assert!(guest_size(&roomy_kubernetes_shim(), &greedy).is_err());
        let mut greedy = sandbox.clone();
        greedy.insert(keys::ANNOTATION_MEMORY.to_owned(), (memory.bytes + 1).to_string());
        let err = guest_size(&roomy_kubernetes_shim(), &greedy).expect_err("a byte too many");
        // (Past 2^63-1 bytes the annotation itself no longer parses, also a refusal.)
        prop_assert!(
            err.to_string().contains("more than the Pod's memory limit")
                || memory.bytes + 1 > i64::MAX as u128,
            "{}",
            err
        );

        // kube-scheduler accounts the same size: requests = limits = the guest's.
        let resources = pod.spec.as_ref().and_then(|s| s.containers[0].resources.clone());
        let requests = resources.as_ref().and_then(|r| r.requests.clone()).unwrap_or_default();
        let limits = resources.and_then(|r| r.limits).unwrap_or_default();
        for list in [&requests, &limits] {
            let bytes = gpuvm_api::quantity::parse_bytes(&list["memory"].0)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(u128::from(bytes), memory.bytes, "{}", memory.text);
            prop_assert_eq!(gpuvm_api::quantity::parse_cpus(&list["cpu"].0), Ok(size.cpus));
        }
    }
}

#[test]
fn spellings_the_shim_used_to_refuse_now_boot_the_size_the_operator_asked_for() {
    let cases = [
        ("1.5Gi", 1536),
        ("0.5Ti", 512 << 10),
        ("200000000000m", 191),
        ("1e9", 954),
        ("2E9", 1908),
        ("+128Mi", 128),
        ("134217728000000000n", 128),
        (".25Ti", 256 << 10),
        ("1.Gi", 1024),
    ];
    for (memory, mib) in cases {
        let pod = build_pod(&placed_machine(4, memory)).expect(memory);
        let size =
            guest_size(&roomy_shim(), &annotations_of(&pod.metadata.annotations)).expect(memory);
        assert_eq!((size.cpus, size.memory_mib), (4, mib), "{memory}");
    }
}

//! GPU placement: a pure function of (machine, node inventories, current allocations).
//!
//! The unit of allocation is a whole IOMMU group: a GPU goes to a VM together with its
//! companion functions (HDMI audio and the like), and a group that also holds a device
//! the host uses (a NIC, an NVMe drive) is never handed out. Among nodes that fit, the
//! scheduler prefers GPUs under one PCIe switch, then on one NUMA node, then bin-packs
//! (or spreads) and finally breaks ties by node name, so the same inputs always give the
//! same answer.
//!
//! A node whose inventory lists NVSwitches takes no machine: CUDA on an NVSwitch
//! baseboard (HGX) needs NVIDIA Fabric Manager to set up the NVLink fabric first, and
//! gpuvm cannot provide it (`docs/nvswitch.md`). Its GPUs count as blocked, and a
//! machine that only such a node could take is refused with `FabricManagerUnavailable`.
//!
//! [`Inventory::build`] indexes the cluster once (interned models, per-node summaries);
//! [`Inventory::place`] then answers in time proportional to the node count with a small
//! constant, and [`Inventory::commit`] records a placement so a batch of machines can be
//! placed in a row. [`place_machine`] is the one-shot form.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use gpuvm_api::keys::MODEL_ANY;
use gpuvm_api::{AllocatedGpu, GpuDevice, GpuMachineSpec, MemberRole, NvSwitch, PlacementStrategy};

/// One node as the scheduler sees it: the Kubernetes Node's state joined with its
/// `GpuNode` inventory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeView {
    /// Node name.
    pub name: String,
    /// The Node's labels, matched against `spec.nodeSelector`.
    pub labels: BTreeMap<String, String>,
    /// The Node is Ready and its GPU inventory heartbeat is fresh.
    pub ready: bool,
    /// Neither the Node is cordoned nor the GpuNode marked unschedulable.
    pub schedulable: bool,
    /// The node's GPUs.
    pub devices: Vec<GpuDevice>,
    /// The node's NVSwitches. Any at all keeps every machine off the node.
    pub nvswitches: Vec<NvSwitch>,
}

/// What a machine asks of the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacementRequest {
    /// GPU model, or [`MODEL_ANY`].
    pub model: String,
    /// Number of GPUs.
    pub count: u32,
    /// Labels the node must carry.
    pub node_selector: BTreeMap<String, String>,
    /// How to rank nodes that fit.
    pub strategy: PlacementStrategy,
}

impl From<&GpuMachineSpec> for PlacementRequest {
    fn from(spec: &GpuMachineSpec) -> Self {
        PlacementRequest {
            model: spec.gpu.model.clone(),
            count: u32::try_from(spec.gpu.count).unwrap_or(0),
            node_selector: spec.node_selector.clone(),
            strategy: spec.placement,
        }
    }
}

/// The scheduler's answer: a node and the exact GPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The chosen node.
    pub node: String,
    /// The GPUs, sorted by PCI address, each with its companion functions.
    pub gpus: Vec<AllocatedGpu>,
}

impl Placement {
    /// Every PCI address the VM gets: GPUs and companions.
    pub fn devices(&self) -> Vec<String> {
        AllocatedGpu::devices(&self.gpus)
    }
}

/// Why a node could not take a machine, for the summary in [`Unschedulable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeRejection {
    /// The Node is NotReady or its GpuNode heartbeat is stale.
    NotReady,
    /// The Node is cordoned or the GpuNode is marked unschedulable.
    Cordoned,
    /// The Node lacks a label of `nodeSelector`.
    SelectorMismatch,
    /// The node has no GPU of the requested model.
    WrongModel,
    /// The host's IOMMU is off, so nothing can be passed through.
    NoIommu,
    /// The GPUs share IOMMU groups with host devices.
    UnsafeIommuGroup,
    /// The GPUs are unhealthy.
    Unhealthy,
    /// The GPUs exist but too many are already allocated.
    Full,
    /// The GPUs hang off an NVSwitch fabric, which needs a Fabric Manager gpuvm lacks.
    FabricManagerUnavailable,
}

impl NodeRejection {
    fn describe(self) -> &'static str {
        match self {
            NodeRejection::NotReady => "not ready",
            NodeRejection::Cordoned => "cordoned",
            NodeRejection::SelectorMismatch => "not matching nodeSelector",
            NodeRejection::WrongModel => "wrong model",
            NodeRejection::NoIommu => "IOMMU off",
            NodeRejection::UnsafeIommuGroup => "GPUs share an IOMMU group with a host device",
            NodeRejection::Unhealthy => "unhealthy GPUs",
            NodeRejection::Full => "full",
            NodeRejection::FabricManagerUnavailable => "NVSwitch fabric without Fabric Manager",
        }
    }
}

/// No node can take the machine now. The message says what was missing, e.g.
/// "no node has 2 free healthy h100-80gb GPUs (5 nodes checked: 3 full, 2 wrong model)".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unschedulable {
    /// How many nodes were considered.
    pub nodes_checked: usize,
    /// How many nodes were turned down for each reason.
    pub rejections: BTreeMap<NodeRejection, usize>,
    request: String,
    /// The first few nodes turned down for their NVSwitches, described for the message.
    fabric_nodes: Vec<String>,
}

/// How many nodes turned down for their NVSwitches the message names.
const FABRIC_NODES_NAMED: usize = 3;

impl Unschedulable {
    /// A CamelCase reason for the `Scheduled=False` condition and the Event:
    /// `FabricManagerUnavailable` when a node was turned down for its NVSwitches, since
    /// that node would take the machine given a Fabric Manager.
    pub fn reason(&self) -> &'static str {
        if self.nodes_checked == 0 {
            "NoGpuNodes"
        } else if self
            .rejections
            .contains_key(&NodeRejection::FabricManagerUnavailable)
        {
            "FabricManagerUnavailable"
        } else {
            "Unschedulable"
        }
    }

    fn write_fabric_nodes(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self
            .rejections
            .get(&NodeRejection::FabricManagerUnavailable)
            .copied()
            .unwrap_or(0);
        if total == 0 {
            return Ok(());
        }
        write!(f, "; {}", self.fabric_nodes.join(", "))?;
        if total > self.fabric_nodes.len() {
            write!(f, " and {} more", total - self.fabric_nodes.len())?;
        }
        write!(
            f,
            ": CUDA on an NVSwitch baseboard needs NVIDIA Fabric Manager, which gpuvm \
             cannot run (no Debian package; see docs/nvswitch.md), so no machine is placed there"
        )
    }
}

impl fmt::Display for Unschedulable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nodes_checked == 0 {
            return write!(
                f,
                "no node has {}: no GPU node is registered (no GpuNode objects)",
                self.request
            );
        }
        let plural = if self.nodes_checked == 1 { "" } else { "s" };
        write!(
            f,
            "no node has {} ({} node{plural} checked: ",
            self.request, self.nodes_checked
        )?;
        // Largest group first, so the main obstacle leads.
        let mut parts: Vec<_> = self.rejections.iter().collect();
        parts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let parts: Vec<String> = parts
            .into_iter()
            .map(|(r, n)| format!("{n} {}", r.describe()))
            .collect();
        write!(f, "{})", parts.join(", "))?;
        self.write_fabric_nodes(f)
    }
}

impl std::error::Error for Unschedulable {}

type ModelId = u32;
type DomainId = u32;

/// Why a unit (an IOMMU group's worth of GPUs) can never be allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Blocked {
    NoIommu,
    HostDevice,
    Unhealthy,
    NoFabricManager,
}

/// An allocatable unit: one IOMMU group's GPUs (usually one) and companions.
#[derive(Clone, Debug)]
struct Unit {
    model: ModelId,
    /// GPU device indexes into the node's device list.
    gpus: Vec<usize>,
    companions: Vec<String>,
    numa: Option<i32>,
    switch: Option<DomainId>,
    blocked: Option<Blocked>,
    taken: bool,
}

impl Unit {
    fn size(&self) -> u32 {
        u32::try_from(self.gpus.len()).unwrap_or(u32::MAX)
    }
    fn free(&self) -> bool {
        self.blocked.is_none() && !self.taken
    }
}

/// Per node, per model: what placement needs to rank the node in O(1).
#[derive(Clone, Copy, Debug, Default)]
struct ModelSummary {
    model: ModelId,
    total: u32,
    free: u32,
    max_free_in_switch: u32,
    max_free_in_numa: u32,
    /// All free units hold exactly one GPU, so `free >= count` means it fits.
    unit_sized: bool,
    blocked_no_iommu: u32,
    blocked_host: u32,
    blocked_unhealthy: u32,
    blocked_fabric: u32,
}

#[derive(Clone, Debug)]
struct IndexedNode {
    view: NodeView,
    units: Vec<Unit>,
    summaries: Vec<ModelSummary>,
    free_total: u32,
}

/// An index of the cluster's GPUs and allocations, built once and queried many times.
#[derive(Clone, Debug)]
pub struct Inventory {
    nodes: Vec<IndexedNode>,
    models: Vec<String>,
    node_by_name: HashMap<String, usize>,
}

impl Inventory {
    /// Indexes `nodes`, marking as taken every device listed in `allocations`
    /// (node name → PCI addresses held by existing machines).
    pub fn build(nodes: &[NodeView], allocations: &BTreeMap<String, HashSet<String>>) -> Self {
        let mut models: Vec<String> = Vec::new();
        let mut model_ids: HashMap<String, ModelId> = HashMap::new();
        let mut domain_ids: HashMap<String, DomainId> = HashMap::new();
        let mut indexed: Vec<IndexedNode> = Vec::with_capacity(nodes.len());
        let empty = HashSet::new();

        let mut sorted: Vec<&NodeView> = nodes.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        sorted.dedup_by(|a, b| a.name == b.name);

        for view in sorted {
            let taken = allocations.get(&view.name).unwrap_or(&empty);
            let units = build_units(
                view,
                taken,
                &mut |model: &str| {
                    *model_ids.entry(model.to_owned()).or_insert_with(|| {
                        models.push(model.to_owned());
                        ModelId::try_from(models.len() - 1).unwrap_or(ModelId::MAX)
                    })
                },
                &mut |domain: &str| {
                    let next = DomainId::try_from(domain_ids.len()).unwrap_or(DomainId::MAX);
                    *domain_ids.entry(domain.to_owned()).or_insert(next)
                },
            );
            let mut node = IndexedNode {
                view: view.clone(),
                units,
                summaries: Vec::new(),
                free_total: 0,
            };
            summarize(&mut node);
            indexed.push(node);
        }
        let node_by_name = indexed
            .iter()
            .enumerate()
            .map(|(i, n)| (n.view.name.clone(), i))
            .collect();
        Inventory {
            nodes: indexed,
            models,
            node_by_name,
        }
    }

    /// Chooses a node and GPUs for `request`, or says why none fits.
    pub fn place(&self, request: &PlacementRequest) -> Result<Placement, Unschedulable> {
        let wanted_model: Option<ModelId> = if request.model == MODEL_ANY {
            None
        } else {
            match self.models.iter().position(|m| *m == request.model) {
                Some(i) => ModelId::try_from(i).ok(),
                // Nobody has this model: every node is the wrong model (or worse).
                None => return Err(self.explain(request, None)),
            }
        };

        // (locality, strategy key, node index, model). Lower is better.
        let mut best: Option<((u8, i64), usize, ModelId)> = None;
        for (index, node) in self.nodes.iter().enumerate() {
            if !node_admits(&node.view, request) {
                continue;
            }
            for summary in &node.summaries {
                if wanted_model.is_some_and(|m| m != summary.model) || summary.free < request.count
                {
                    continue;
                }
                if !summary.unit_sized && choose_units(node, summary.model, request.count).is_none()
                {
                    continue;
                }
                let locality = if request.count <= 1 || summary.max_free_in_switch >= request.count
                {
                    0
                } else if summary.max_free_in_numa >= request.count {
                    1
                } else {
                    2
                };
                let fill = i64::from(node.free_total);
                let key = match request.strategy {
                    PlacementStrategy::BinPack => (locality, fill),
                    PlacementStrategy::Spread => (locality, -fill),
                };
                // Nodes are sorted by name, so strict `<` keeps the first name on ties.
                if best.is_none_or(|(k, _, _)| key < k) {
                    best = Some((key, index, summary.model));
                }
            }
        }

        let Some((_, index, model)) = best else {
            return Err(self.explain(request, wanted_model));
        };
        let node = &self.nodes[index];
        let chosen = choose_units(node, model, request.count)
            .ok_or_else(|| self.explain(request, wanted_model))?;
        let mut gpus: Vec<AllocatedGpu> = chosen
            .iter()
            .flat_map(|&u| {
                let unit = &node.units[u];
                unit.gpus.iter().enumerate().map(move |(k, &d)| {
                    let dev = &node.view.devices[d];
                    AllocatedGpu {
                        pci_address: dev.pci_address.clone(),
                        model: dev.model.clone(),
                        iommu_group: dev.iommu_group,
                        numa_node: dev.numa_node,
                        // Companions travel with the group's first GPU.
                        companions: if k == 0 {
                            unit.companions.clone()
                        } else {
                            Vec::new()
                        },
                    }
                })
            })
            .collect();
        gpus.sort_by(|a, b| a.pci_address.cmp(&b.pci_address));
        Ok(Placement {
            node: node.view.name.clone(),
            gpus,
        })
    }

    /// Marks a placement's devices as taken, so the next `place` sees them allocated.
    pub fn commit(&mut self, placement: &Placement) {
        self.set_taken(&placement.node, &placement.devices(), true);
    }

    /// Returns a placement's devices to the free pool.
    pub fn release(&mut self, placement: &Placement) {
        self.set_taken(&placement.node, &placement.devices(), false);
    }

    fn set_taken(&mut self, node: &str, devices: &[String], taken: bool) {
        let Some(&index) = self.node_by_name.get(node) else {
            return;
        };
        let node = &mut self.nodes[index];
        for unit in &mut node.units {
            let hit = unit
                .gpus
                .iter()
                .any(|&d| devices.contains(&node.view.devices[d].pci_address));
            if hit {
                unit.taken = taken;
            }
        }
        summarize(node);
    }

    /// Free and allocated GPU counts per model across ready nodes, for metrics.
    /// Blocked GPUs (unhealthy, unsafe group, no IOMMU) count as neither.
    pub fn usage_by_model(&self) -> BTreeMap<String, (u32, u32)> {
        let mut out: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        for node in &self.nodes {
            for unit in &node.units {
                if unit.blocked.is_some() {
                    continue;
                }
                let Some(model) = self.models.get(unit.model as usize) else {
                    continue;
                };
                let entry = out.entry(model.clone()).or_default();
                if unit.taken {
                    entry.1 += unit.size();
                } else if node.view.ready {
                    entry.0 += unit.size();
                }
            }
        }
        out
    }

    /// Number of indexed nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    fn explain(&self, request: &PlacementRequest, wanted: Option<ModelId>) -> Unschedulable {
        let mut rejections: BTreeMap<NodeRejection, usize> = BTreeMap::new();
        let mut fabric_nodes = Vec::new();
        for node in &self.nodes {
            let why = reject_reason(node, request, wanted);
            *rejections.entry(why).or_default() += 1;
            if why == NodeRejection::FabricManagerUnavailable
                && fabric_nodes.len() < FABRIC_NODES_NAMED
            {
                fabric_nodes.push(describe_fabric(&node.view));
            }
        }
        let model = if request.model == MODEL_ANY {
            String::new()
        } else {
            format!("{} ", request.model)
        };
        let plural = if request.count == 1 { "" } else { "s" };
        Unschedulable {
            nodes_checked: self.nodes.len(),
            rejections,
            request: format!("{} free healthy {model}GPU{plural}", request.count),
            fabric_nodes,
        }
    }
}

/// "hgx-0 has 4 NVSwitches (h100-nvswitch)": a node turned down for its fabric.
fn describe_fabric(view: &NodeView) -> String {
    let count = view.nvswitches.len();
    let plural = if count == 1 { "" } else { "es" };
    let models: BTreeSet<&str> = view
        .nvswitches
        .iter()
        .map(|s| s.model.as_str())
        .filter(|m| !m.is_empty())
        .collect();
    let models: Vec<&str> = models.into_iter().collect();
    if models.is_empty() {
        format!("{} has {count} NVSwitch{plural}", view.name)
    } else {
        format!(
            "{} has {count} NVSwitch{plural} ({})",
            view.name,
            models.join(", ")
        )
    }
}

/// One-shot placement: index the cluster and place one machine.
pub fn place_machine(
    request: &PlacementRequest,
    nodes: &[NodeView],
    allocations: &BTreeMap<String, HashSet<String>>,
) -> Result<Placement, Unschedulable> {
    Inventory::build(nodes, allocations).place(request)
}

fn node_admits(view: &NodeView, request: &PlacementRequest) -> bool {
    view.ready
        && view.schedulable
        && request
            .node_selector
            .iter()
            .all(|(k, v)| view.labels.get(k) == Some(v))
}

fn reject_reason(
    node: &IndexedNode,
    request: &PlacementRequest,
    wanted: Option<ModelId>,
) -> NodeRejection {
    if !node.view.ready {
        return NodeRejection::NotReady;
    }
    if !node.view.schedulable {
        return NodeRejection::Cordoned;
    }
    if !node_admits(&node.view, request) {
        return NodeRejection::SelectorMismatch;
    }
    let relevant: Vec<&ModelSummary> = match (wanted, request.model == MODEL_ANY) {
        (_, true) => node.summaries.iter().collect(),
        (Some(m), false) => node.summaries.iter().filter(|s| s.model == m).collect(),
        (None, false) => Vec::new(),
    };
    if relevant.is_empty() {
        return NodeRejection::WrongModel;
    }
    if !node.view.nvswitches.is_empty() {
        return NodeRejection::FabricManagerUnavailable;
    }
    let sum = |f: fn(&ModelSummary) -> u32| relevant.iter().map(|s| f(s)).sum::<u32>();
    let total = sum(|s| s.total);
    let free = sum(|s| s.free);
    let no_iommu = sum(|s| s.blocked_no_iommu);
    let host = sum(|s| s.blocked_host);
    let unhealthy = sum(|s| s.blocked_unhealthy);
    let fabric = sum(|s| s.blocked_fabric);
    let taken = total.saturating_sub(free + no_iommu + host + unhealthy + fabric);
    // The largest obstacle names the node; ties go to the more fundamental one.
    [
        (no_iommu, NodeRejection::NoIommu),
        (host, NodeRejection::UnsafeIommuGroup),
        (unhealthy, NodeRejection::Unhealthy),
        (taken.max(free), NodeRejection::Full),
    ]
    .into_iter()
    .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
    .map_or(NodeRejection::Full, |(_, r)| r)
}

fn build_units(
    view: &NodeView,
    taken: &HashSet<String>,
    intern_model: &mut dyn FnMut(&str) -> ModelId,
    intern_domain: &mut dyn FnMut(&str) -> DomainId,
) -> Vec<Unit> {
    // Group the node's GPUs by IOMMU group; without a group each GPU stands alone.
    let mut by_group: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    let mut units = Vec::new();
    for (i, dev) in view.devices.iter().enumerate() {
        match dev.iommu_group {
            Some(g) => by_group.entry(g).or_default().push(i),
            None => units.push(Unit {
                model: intern_model(&dev.model),
                gpus: vec![i],
                companions: Vec::new(),
                numa: dev.numa_node,
                switch: dev.pcie_parent.as_deref().map(&mut *intern_domain),
                blocked: Some(Blocked::NoIommu),
                taken: taken.contains(&dev.pci_address),
            }),
        }
    }
    for gpus in by_group.into_values() {
        let first = &view.devices[gpus[0]];
        let gpu_addresses: HashSet<&str> = gpus
            .iter()
            .map(|&i| view.devices[i].pci_address.as_str())
            .collect();
        let mut companions = Vec::new();
        let mut blocked = None;
        for member in &first.iommu_group_members {
            match member.role {
                MemberRole::Companion => companions.push(member.pci_address.clone()),
                MemberRole::Host => blocked = Some(Blocked::HostDevice),
                MemberRole::Bridge => {}
                // A GPU of the group that the inventory does not list cannot be
                // accounted for: refuse the group rather than share it.
                MemberRole::Gpu if !gpu_addresses.contains(member.pci_address.as_str()) => {
                    blocked = Some(Blocked::HostDevice);
                }
                MemberRole::Gpu => {}
            }
        }
        companions.sort();
        let models: HashSet<&str> = gpus
            .iter()
            .map(|&i| view.devices[i].model.as_str())
            .collect();
        if blocked.is_none() && gpus.iter().any(|&i| !view.devices[i].healthy) {
            blocked = Some(Blocked::Unhealthy);
        }
        if blocked.is_none() && models.len() > 1 {
            // Mixed models in one group can't satisfy a single-model request.
            blocked = Some(Blocked::HostDevice);
        }
        let is_taken = gpus
            .iter()
            .any(|&i| taken.contains(&view.devices[i].pci_address))
            || companions.iter().any(|c| taken.contains(c));
        units.push(Unit {
            model: intern_model(&first.model),
            switch: first.pcie_parent.as_deref().map(&mut *intern_domain),
            numa: first.numa_node,
            gpus,
            companions,
            blocked,
            taken: is_taken,
        });
    }
    // Without a Fabric Manager no GPU of an NVSwitch baseboard initialises, whatever
    // else holds for it.
    if !view.nvswitches.is_empty() {
        for unit in &mut units {
            unit.blocked = Some(Blocked::NoFabricManager);
        }
    }
    // An address claimed by two units (a duplicate device, or a companion listed in two
    // groups) means the inventory is inconsistent: handing out either unit could give
    // one physical function to two VMs, so neither is used.
    let mut claims: HashMap<&str, usize> = HashMap::new();
    for unit in &units {
        for &d in &unit.gpus {
            *claims
                .entry(view.devices[d].pci_address.as_str())
                .or_default() += 1;
        }
        for c in &unit.companions {
            *claims.entry(c.as_str()).or_default() += 1;
        }
    }
    let ambiguous: Vec<bool> = units
        .iter()
        .map(|unit| {
            unit.gpus
                .iter()
                .map(|&d| view.devices[d].pci_address.as_str())
                .chain(unit.companions.iter().map(String::as_str))
                .any(|a| claims.get(a).copied().unwrap_or(0) > 1)
        })
        .collect();
    for (unit, ambiguous) in units.iter_mut().zip(ambiguous) {
        if ambiguous && unit.blocked.is_none() {
            unit.blocked = Some(Blocked::Unhealthy);
        }
    }
    units
}

fn summarize(node: &mut IndexedNode) {
    let mut summaries: Vec<ModelSummary> = Vec::new();
    let mut switch_free: HashMap<(ModelId, DomainId), u32> = HashMap::new();
    let mut numa_free: HashMap<(ModelId, i32), u32> = HashMap::new();
    node.free_total = 0;
    for unit in &node.units {
        let index = match summaries.iter().position(|s| s.model == unit.model) {
            Some(i) => i,
            None => {
                summaries.push(ModelSummary {
                    model: unit.model,
                    unit_sized: true,
                    ..ModelSummary::default()
                });
                summaries.len() - 1
            }
        };
        let s = &mut summaries[index];
        let size = unit.size();
        s.total += size;
        match unit.blocked {
            Some(Blocked::NoIommu) => s.blocked_no_iommu += size,
            Some(Blocked::HostDevice) => s.blocked_host += size,
            Some(Blocked::Unhealthy) => s.blocked_unhealthy += size,
            Some(Blocked::NoFabricManager) => s.blocked_fabric += size,
            None => {}
        }
        if unit.free() {
            s.free += size;
            node.free_total += size;
            if size != 1 {
                s.unit_sized = false;
            }
            if let Some(sw) = unit.switch {
                *switch_free.entry((unit.model, sw)).or_default() += size;
            }
            if let Some(n) = unit.numa {
                *numa_free.entry((unit.model, n)).or_default() += size;
            }
        }
    }
    for s in &mut summaries {
        s.max_free_in_switch = switch_free
            .iter()
            .filter(|((m, _), _)| *m == s.model)
            .map(|(_, &n)| n)
            .max()
            .unwrap_or(0);
        s.max_free_in_numa = numa_free
            .iter()
            .filter(|((m, _), _)| *m == s.model)
            .map(|(_, &n)| n)
            .max()
            .unwrap_or(0);
    }
    node.summaries = summaries;
}

/// Picks free units of `model` on `node` holding exactly `count` GPUs, preferring one
/// PCIe switch, then one NUMA node, then the fewest NUMA nodes. Within a domain the
/// fullest one that still fits is used, so larger free domains stay whole.
fn choose_units(node: &IndexedNode, model: ModelId, count: u32) -> Option<Vec<usize>> {
    let free: Vec<usize> = (0..node.units.len())
        .filter(|&u| node.units[u].model == model && node.units[u].free())
        .collect();

    // Candidate domains: each switch, then each NUMA node, as lists of unit indexes.
    let mut switches: BTreeMap<DomainId, Vec<usize>> = BTreeMap::new();
    let mut numas: BTreeMap<i32, Vec<usize>> = BTreeMap::new();
    for &u in &free {
        if let Some(sw) = node.units[u].switch {
            switches.entry(sw).or_default().push(u);
        }
        if let Some(n) = node.units[u].numa {
            numas.entry(n).or_default().push(u);
        }
    }
    let size_of = |units: &[usize]| units.iter().map(|&u| node.units[u].size()).sum::<u32>();
    for domains in [
        switches.into_values().collect::<Vec<_>>(),
        numas.values().cloned().collect::<Vec<_>>(),
    ] {
        let mut fitting: Vec<&Vec<usize>> =
            domains.iter().filter(|d| size_of(d) >= count).collect();
        // Fullest domain that fits first; the stable sort keeps address order on ties.
        fitting.sort_by_key(|d| size_of(d));
        for domain in fitting {
            if let Some(pick) = exact_subset(node, domain, count) {
                return Some(pick);
            }
        }
    }
    // Across domains: take from the NUMA nodes with the most free GPUs first.
    let mut ordered: Vec<usize> = Vec::with_capacity(free.len());
    let mut numa_order: Vec<&Vec<usize>> = numas.values().collect();
    numa_order.sort_by_key(|d| std::cmp::Reverse(size_of(d)));
    for d in numa_order {
        ordered.extend(d.iter().copied());
    }
    ordered.extend(
        free.iter()
            .copied()
            .filter(|&u| node.units[u].numa.is_none()),
    );
    exact_subset(node, &ordered, count)
}

/// Chooses units from `candidates` (in preference order) whose GPU counts add up to
/// exactly `count`, preferring earlier candidates. Small dynamic programme: count ≤ 8.
fn exact_subset(node: &IndexedNode, candidates: &[usize], count: u32) -> Option<Vec<usize>> {
    let target = usize::try_from(count).ok()?;
    // Fast path: single-GPU units, take the first `count`.
    if candidates.iter().all(|&u| node.units[u].size() == 1) {
        return (candidates.len() >= target).then(|| candidates[..target].to_vec());
    }
    // reach[i][s]: the first i candidates can sum to s.
    let n = candidates.len();
    let mut reach = vec![vec![false; target + 1]; n + 1];
    reach[n][0] = true;
    // Fill from the back so reconstruction walks forward, preferring early items.
    for i in (0..n).rev() {
        let size = usize::try_from(node.units[candidates[i]].size()).ok()?;
        for s in 0..=target {
            reach[i][s] = reach[i + 1][s] || (s >= size && reach[i + 1][s - size]);
        }
    }
    if !reach[0][target] {
        return None;
    }
    let mut pick = Vec::new();
    let mut remaining = target;
    for (i, &u) in candidates.iter().enumerate() {
        if remaining == 0 {
            break;
        }
        let size = usize::try_from(node.units[u].size()).ok()?;
        if size <= remaining && reach[i + 1][remaining - size] {
            pick.push(u);
            remaining -= size;
        }
    }
    Some(pick)
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;

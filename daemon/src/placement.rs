//! Where ferryd's data-plane thread runs: `daemon.data_plane_cpus`.
//!
//! `"auto"` (the default) pins it to one core on the NUMA node of the RDMA
//! NIC the fabric chose (the last core of that node: the first ones take
//! most interrupts and housekeeping), so that the loop that polls the
//! rings and posts to the NIC stays near the NIC's memory and never
//! migrates; with the soft fabric there is no NIC to be near and the
//! thread is left to the scheduler. `"none"` never pins; a CPU list
//! (`"3"`, `"2-3,6"`) pins to exactly those. The topology comes from hwloc
//! (hwlocality). GPU copies need no thread of their own: the data-plane
//! thread issues them asynchronously and the GPU's copy engines move the
//! bytes.

use hwlocality::cpu::binding::CpuBindingFlags;
use hwlocality::cpu::cpuset::CpuSet;
use hwlocality::object::types::ObjectType;
use hwlocality::topology::Topology;

/// What `daemon.data_plane_cpus` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    Auto,
    Unpinned,
    Cpus(Vec<u32>),
}

/// Parses `"auto"`, `"none"` or a CPU list such as `"0,2-3"`.
pub fn parse(s: &str) -> Result<Want, String> {
    let t = s.trim();
    match t {
        "auto" => return Ok(Want::Auto),
        "none" => return Ok(Want::Unpinned),
        _ => {}
    }
    let bad = || {
        format!("data_plane_cpus {s:?}: expected \"auto\", \"none\" or a CPU list such as \"3\" or \"2-3,6\" (ranges low to high)")
    };
    let mut cpus = Vec::new();
    for part in t.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
        if a > b || b - a > 4096 {
            return Err(bad());
        }
        cpus.extend(a..=b);
    }
    cpus.sort_unstable();
    cpus.dedup();
    if cpus.is_empty() {
        return Err(bad());
    }
    Ok(Want::Cpus(cpus))
}

pub use ferry_admin::{cpu_list as list, Placement};

/// The NIC to be near: its name and NUMA node as the fabric reported them.
pub struct Nic<'a> {
    pub name: &'a str,
    pub numa_node: Option<u32>,
}

fn cpus_of(set: &CpuSet) -> Vec<u32> {
    set.iter_set().map(|c| usize::from(c) as u32).collect()
}

/// Decides the placement; an error when explicit CPUs do not exist here
/// (or are not ours to use).
pub fn choose(want: &Want, nic: Option<Nic<'_>>) -> Result<Placement, String> {
    if *want == Want::Unpinned {
        return Ok(Placement {
            reason: "not pinned (daemon.data_plane_cpus = \"none\")".into(),
            ..Placement::default()
        });
    }
    if *want == Want::Auto && nic.is_none() {
        return Ok(Placement {
            reason: "not pinned: the soft fabric has no NIC to be near (set daemon.data_plane_cpus to pin)".into(),
            ..Placement::default()
        });
    }
    let topo = match Topology::new() {
        Ok(t) => t,
        // "auto" is a preference: without a topology the thread runs
        // unpinned; an explicit list cannot be honoured.
        Err(e) if *want == Want::Auto => {
            return Ok(Placement {
                reason: format!("not pinned: reading the CPU topology (hwloc) failed: {e}"),
                ..Placement::default()
            })
        }
        Err(e) => return Err(format!("reading the CPU topology (hwloc): {e}")),
    };
    let allowed = topo.allowed_cpuset();
    let node_of = |cpus: &[u32]| -> Option<u32> {
        topo.objects_with_type(ObjectType::NUMANode)
            .find(|n| {
                n.cpuset()
                    .is_some_and(|s| cpus.iter().all(|&c| s.is_set(c as usize)))
            })
            .and_then(|n| n.os_index())
            .map(|i| i as u32)
    };
    match want {
        Want::Cpus(cpus) => {
            if let Some(c) = cpus.iter().find(|&&c| !allowed.is_set(c as usize)) {
                return Err(format!(
                    "daemon.data_plane_cpus names CPU {c}, which this host does not have or does not let ferryd use (usable: {})",
                    list(&cpus_of(&allowed))
                ));
            }
            Ok(Placement {
                cpus: cpus.clone(),
                numa_node: node_of(cpus),
                reason: "daemon.data_plane_cpus".into(),
            })
        }
        Want::Auto => {
            let Some(nic) = nic else {
                unreachable!("handled above")
            };
            let Some(node) = nic.numa_node else {
                return Ok(Placement {
                    reason: format!(
                        "not pinned: {} reports no NUMA node (set daemon.data_plane_cpus to pin)",
                        nic.name
                    ),
                    ..Placement::default()
                });
            };
            let cores = topo
                .objects_with_type(ObjectType::NUMANode)
                .find(|n| n.os_index() == Some(node as usize))
                .and_then(|n| n.cpuset())
                .map(|s| {
                    let mut s = s.clone_target();
                    s &= &*allowed;
                    cpus_of(&s)
                })
                .unwrap_or_default();
            let Some(&last) = cores.last() else {
                return Ok(Placement {
                    reason: format!(
                        "not pinned: no usable CPU on NUMA node {node} of {}",
                        nic.name
                    ),
                    ..Placement::default()
                });
            };
            Ok(Placement {
                cpus: vec![last],
                numa_node: Some(node),
                reason: format!(
                    "auto: the last core of NUMA node {node}, where {} is",
                    nic.name
                ),
            })
        }
        Want::Unpinned => unreachable!("handled above"),
    }
}

/// The placement for the fabric `sel` chose: near its NIC when it is one.
pub fn for_fabric(want: &Want, sel: &ferry_verbs::select::Selection) -> Result<Placement, String> {
    let nic = match &sel.choice {
        ferry_verbs::select::Choice::Ibv { device } => {
            use ferry_verbs::Provider;
            let numa_node = ferry_verbs::ibv::IbvProvider
                .devices()
                .ok()
                .and_then(|ds| ds.into_iter().find(|d| &d.name == device))
                .and_then(|d| d.numa_node)
                .and_then(|n| u32::try_from(n).ok());
            Some((device.as_str(), numa_node))
        }
        ferry_verbs::select::Choice::Soft => None,
    };
    choose(want, nic.map(|(name, numa_node)| Nic { name, numa_node }))
}

/// Pins the calling thread as `p` says. `want` is what was asked: with
/// "auto" a failure leaves the thread unpinned (and `p` says why), an
/// explicit list that cannot be honoured is an error.
pub fn pin_thread(p: &mut Placement, want: &Want) -> Result<(), String> {
    match apply(p) {
        Err(e) if *want == Want::Auto => {
            *p = Placement {
                reason: format!("not pinned: {e}"),
                ..Placement::default()
            };
            Ok(())
        }
        r => r,
    }
}

/// Pins the calling thread as `p` says (nothing when not pinned).
fn apply(p: &Placement) -> Result<(), String> {
    if p.cpus.is_empty() {
        return Ok(());
    }
    let topo = Topology::new().map_err(|e| format!("reading the CPU topology (hwloc): {e}"))?;
    let mut set = CpuSet::new();
    for &c in &p.cpus {
        set.set(c as usize);
    }
    topo.bind_cpu(&set, CpuBindingFlags::THREAD).map_err(|e| {
        format!(
            "pinning the data-plane thread to CPUs {}: {e}",
            list(&p.cpus)
        )
    })
}

/// The CPUs this process may use (for tests and messages).
pub fn cpus_here() -> Vec<u32> {
    Topology::new()
        .map(|t| cpus_of(&t.allowed_cpuset()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_print() {
        assert_eq!(parse("auto"), Ok(Want::Auto));
        assert_eq!(parse(" none "), Ok(Want::Unpinned));
        assert_eq!(parse("3"), Ok(Want::Cpus(vec![3])));
        assert_eq!(parse("2-3, 6,2"), Ok(Want::Cpus(vec![2, 3, 6])));
        for bad in ["", "x", "3-1", "1-", "-1", "0-99999", "1,,2"] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
    }

    #[test]
    fn auto_without_a_nic_is_unpinned_and_says_why() {
        let p = choose(&Want::Auto, None).unwrap();
        assert!(p.cpus.is_empty());
        assert!(p.reason.contains("soft fabric"), "{}", p.reason);
    }

    #[test]
    fn auto_pins_to_the_nics_numa_node_and_cpus_must_exist() {
        let p = choose(
            &Want::Auto,
            Some(Nic {
                name: "mlx5_0",
                numa_node: Some(0),
            }),
        )
        .unwrap();
        let usable = crate::placement::cpus_here();
        assert_eq!(p.cpus, vec![*usable.last().unwrap()], "{p:?}");
        assert_eq!(p.numa_node, Some(0));
        let e = choose(&Want::Cpus(vec![100_000]), None).unwrap_err();
        assert!(e.contains("CPU 100000"), "{e}");
    }
}

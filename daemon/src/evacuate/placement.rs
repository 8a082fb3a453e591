//! Where an evacuated instance goes: the online, non-evacuated member with the
//! most free memory that can take it (memory and disk checked first). Pure:
//! the caller reads the inputs on a linearizable read and then reserves the
//! choice with a replicated `ReservePlacement`, which refuses it if another
//! evacuation reserved the same memory in between.

use std::collections::BTreeMap;

use ferry_db::{InstanceRecord, MemberRecord, Reservation, MEMBER_EVACUATED};

/// Default guest RAM of a VM without `limits.memory` (the driver's default).
pub const VM_DEFAULT_MEMORY: u64 = 256 << 20;

/// What a member told in its last heartbeat, if it is online.
#[derive(Debug, Clone, Default)]
pub struct MemberView {
    pub online: bool,
    /// Host memory available (MemAvailable).
    pub mem_free: u64,
    /// Memory the member offers to instances (`--instance-memory`); 0 = no cap.
    pub instance_memory: u64,
    /// Free bytes on the member's storage.
    pub disk_free: u64,
}

/// What the instance to place needs.
#[derive(Debug, Clone, Default)]
pub struct Need {
    pub memory: u64,
    /// 0 when its storage is not copied (shared pool).
    pub disk: u64,
}

/// The instance's memory as placement counts it: `limits.memory`, else the
/// VM default, else (a container without a limit) what it uses now.
pub fn memory_of(rec: &InstanceRecord, usage: Option<u64>) -> u64 {
    let limit = rec
        .config
        .get("limits.memory")
        .and_then(|v| ferry_drivers::parse_size(v));
    match (limit, rec.kind.as_str()) {
        (Some(n), _) => n,
        (None, "virtual-machine") => VM_DEFAULT_MEMORY,
        (None, _) => usage.unwrap_or(0),
    }
}

/// A member's free memory for placement, reservations not counted: the host's
/// available memory, capped by what the member offers to instances minus the
/// memory of the running instances the database puts there.
pub fn free_memory(member: &str, view: &MemberView, instances: &[InstanceRecord]) -> u64 {
    if view.instance_memory == 0 {
        return view.mem_free;
    }
    let allocated: u64 = instances
        .iter()
        .filter(|i| i.member == member && i.status == "Running")
        .map(|i| memory_of(i, None))
        .sum();
    view.mem_free
        .min(view.instance_memory.saturating_sub(allocated))
}

/// The chosen member and the capacity to reserve against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub member: String,
    /// Free memory without reservations (the `capacity` of the reservation).
    pub capacity: u64,
}

/// Pick the member for `instance` (now on `from`), or say why none fits.
pub fn choose(
    instance: &str,
    from: &str,
    need: &Need,
    members: &[MemberRecord],
    views: &BTreeMap<String, MemberView>,
    instances: &[InstanceRecord],
    reservations: &[Reservation],
) -> Result<Choice, String> {
    let mut why = vec![];
    let mut best: Option<(u64, Choice)> = None;
    for m in members.iter().filter(|m| m.name != from) {
        let view = views.get(&m.name).cloned().unwrap_or_default();
        if m.state == MEMBER_EVACUATED {
            why.push(format!("{} is evacuated", m.name));
            continue;
        }
        if !view.online {
            why.push(format!("{} is offline", m.name));
            continue;
        }
        let capacity = free_memory(&m.name, &view, instances);
        let reserved: u64 = reservations
            .iter()
            .filter(|r| r.member == m.name && r.instance != instance)
            .map(|r| r.memory)
            .sum();
        let free = capacity.saturating_sub(reserved);
        if free < need.memory {
            why.push(format!("{} has {} MiB of memory free", m.name, free >> 20));
            continue;
        }
        if view.disk_free < need.disk {
            why.push(format!(
                "{} has {} MiB of disk free",
                m.name,
                view.disk_free >> 20
            ));
            continue;
        }
        let better = match &best {
            None => true,
            Some((f, c)) => free > *f || (free == *f && m.name < c.member),
        };
        if better {
            best = Some((
                free,
                Choice {
                    member: m.name.clone(),
                    capacity,
                },
            ));
        }
    }
    best.map(|(_, c)| c).ok_or_else(|| {
        if why.is_empty() {
            why.push("the cluster has no other member".into());
        }
        format!(
            "no member can take {instance} (it needs {} MiB of memory and {} MiB of disk): {}; \
             add a member or free memory, or evacuate with --action stop",
            need.memory >> 20,
            need.disk >> 20,
            why.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn member(name: &str, state: &str) -> MemberRecord {
        MemberRecord {
            name: name.into(),
            node_id: 1,
            address: String::new(),
            version: String::new(),
            state: state.into(),
            joined_at: String::new(),
        }
    }

    fn inst(name: &str, member: &str, kind: &str, mem: Option<&str>) -> InstanceRecord {
        InstanceRecord {
            name: name.into(),
            kind: kind.into(),
            member: member.into(),
            status: "Running".into(),
            storage_pool: "default".into(),
            image: String::new(),
            description: String::new(),
            config: mem
                .map(|m| [("limits.memory".to_string(), m.to_string())].into())
                .unwrap_or_default(),
            volatile: Default::default(),
            created_at: String::new(),
            last_used_at: String::new(),
        }
    }

    fn view(cap_mib: u64, disk_mib: u64) -> MemberView {
        MemberView {
            online: true,
            mem_free: 100_000 * MIB,
            instance_memory: cap_mib * MIB,
            disk_free: disk_mib * MIB,
        }
    }

    #[test]
    fn memory_of_uses_the_limit_the_vm_default_or_the_usage() {
        assert_eq!(
            memory_of(&inst("a", "m1", "container", Some("64MiB")), Some(1)),
            64 * MIB
        );
        assert_eq!(
            memory_of(&inst("v", "m1", "virtual-machine", None), None),
            VM_DEFAULT_MEMORY
        );
        assert_eq!(memory_of(&inst("c", "m1", "container", None), Some(5)), 5);
    }

    #[test]
    fn most_free_memory_wins_and_running_instances_and_reservations_count() {
        let members = [
            member("m1", "evacuated"),
            member("m2", "online"),
            member("m3", "online"),
        ];
        let views: BTreeMap<_, _> = [
            ("m1".to_string(), view(4096, 1000)),
            ("m2".to_string(), view(600, 1000)),
            ("m3".to_string(), view(1000, 1000)),
        ]
        .into();
        let need = Need {
            memory: 256 * MIB,
            disk: 10 * MIB,
        };
        let mut instances = vec![inst("x", "m1", "container", Some("64MiB"))];
        let c = choose("x", "m1", &need, &members, &views, &instances, &[]).unwrap();
        assert_eq!(
            c,
            Choice {
                member: "m3".into(),
                capacity: 1000 * MIB
            }
        );
        // 500 MiB running on m3: m2 (600 free) is now the roomier one.
        instances.push(inst("big", "m3", "container", Some("500MiB")));
        let c = choose("x", "m1", &need, &members, &views, &instances, &[]).unwrap();
        assert_eq!(c.member, "m2");
        // A reservation on m2 by another instance tips it back to m3.
        let r = Reservation {
            instance: "other".into(),
            member: "m2".into(),
            memory: 200 * MIB,
            expires_at: 0,
        };
        let c = choose("x", "m1", &need, &members, &views, &instances, &[r]).unwrap();
        assert_eq!(
            c,
            Choice {
                member: "m3".into(),
                capacity: 500 * MIB
            }
        );
    }

    #[test]
    fn no_room_names_every_member_and_the_fix() {
        let members = [
            member("m1", "online"),
            member("m2", "online"),
            member("m3", "online"),
        ];
        let mut views: BTreeMap<_, _> = [
            ("m2".to_string(), view(100, 1000)),
            ("m3".to_string(), view(1000, 1)),
        ]
        .into();
        let need = Need {
            memory: 256 * MIB,
            disk: 10 * MIB,
        };
        let e = choose("v1", "m1", &need, &members, &views, &[], &[]).unwrap_err();
        assert!(e.contains("m2 has 100 MiB of memory free"), "{e}");
        assert!(e.contains("m3 has 1 MiB of disk free"), "{e}");
        assert!(e.contains("--action stop"), "{e}");
        views.get_mut("m2").unwrap().online = false;
        let e = choose("v1", "m1", &need, &members, &views, &[], &[]).unwrap_err();
        assert!(e.contains("m2 is offline"), "{e}");
        // Shared storage needs no disk on the target.
        let c = choose(
            "v1",
            "m1",
            &Need {
                memory: 256 * MIB,
                disk: 0,
            },
            &members,
            &views,
            &[],
            &[],
        );
        assert_eq!(c.unwrap().member, "m3");
    }
}

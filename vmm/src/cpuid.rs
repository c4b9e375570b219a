//! The CPUID table each vCPU gets: KVM's supported set, with topology
//! leaves describing one socket of `cpus` single-threaded cores, the
//! vCPU's APIC ID, and the hypervisor bit and KVM paravirt leaves.
//!
//! Built by a pure function so it is tested without KVM (on hosts without
//! CPUID faulting the guest sees the host's CPUID anyway).

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_AMD_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_AMD_CMP_LEGACY: u32 = 1 << 1;
const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";
const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

/// Topology level types in leaves 0xB/0x1F ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Builds vCPU `vcpu_id`'s CPUID table out of KVM's supported entries.
pub fn build_cpuid(supported: &[kvm_cpuid_entry2], vcpu_id: u8, cpus: u8) -> Vec<kvm_cpuid_entry2> {
    let apic_id = u32::from(vcpu_id);
    let cpus = u32::from(cpus.max(1));
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| e.function != LEAF_EXT_TOPOLOGY && e.function != LEAF_V2_EXT_TOPOLOGY)
        .copied()
        .collect();
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => set_features_leaf(entry, apic_id, cpus),
            LEAF_CACHE_PARAMS => set_cache_sharing(entry, cpus),
            LEAF_AMD_FEATURES => set_bit(&mut entry.ecx, ECX_AMD_CMP_LEGACY, cpus > 1),
            LEAF_AMD_SIZES => set_amd_core_count(entry, cpus),
            LEAF_AMD_EXT_APIC_ID => set_amd_apic_id(entry, apic_id),
            _ => {}
        }
    }
    for leaf in [LEAF_EXT_TOPOLOGY, LEAF_V2_EXT_TOPOLOGY] {
        if supported.iter().any(|e| e.function == leaf) {
            entries.extend(topology_leaf(leaf, apic_id, cpus));
        }
    }
    add_kvm_leaves(&mut entries);
    entries
}

fn set_bit(register: &mut u32, bit: u32, on: bool) {
    if on {
        *register |= bit;
    } else {
        *register &= !bit;
    }
}

fn set_features_leaf(entry: &mut kvm_cpuid_entry2, apic_id: u32, cpus: u32) {
    let logical_count = cpus.min(0xff);
    entry.ebx = (entry.ebx & 0xffff) | (logical_count << 16) | (apic_id << 24);
    set_bit(&mut entry.ecx, ECX_HYPERVISOR, true);
    set_bit(&mut entry.edx, EDX_HTT, cpus > 1);
}

/// Leaf 4: cores per package in EAX[31:26]; caches up to L2 are per core,
/// the last level is shared by the whole package.
fn set_cache_sharing(entry: &mut kvm_cpuid_entry2, cpus: u32) {
    let level = (entry.eax >> 5) & 0x7;
    let sharing = if level >= 3 { cpus - 1 } else { 0 };
    entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((cpus - 1) << 26);
}

fn set_amd_core_count(entry: &mut kvm_cpuid_entry2, cpus: u32) {
    let id_bits = bits_for(cpus);
    entry.ecx = (entry.ecx & !0xf0ff) | (id_bits << 12) | (cpus - 1);
}

fn set_amd_apic_id(entry: &mut kvm_cpuid_entry2, apic_id: u32) {
    entry.eax = apic_id;
    entry.ebx = apic_id & 0xff; // core id; one thread per core
    entry.ecx = 0; // node 0
}

/// Bits needed to number `count` things.
fn bits_for(count: u32) -> u32 {
    u32::BITS - count.saturating_sub(1).leading_zeros()
}

/// Leaves 0xB / 0x1F: an SMT level of one thread, a core level of `cpus`.
fn topology_leaf(leaf: u32, apic_id: u32, cpus: u32) -> Vec<kvm_cpuid_entry2> {
    let level = |index: u32, shift: u32, count: u32, kind: u32| kvm_cpuid_entry2 {
        function: leaf,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax: shift,
        ebx: count,
        ecx: (kind << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    vec![
        level(0, 0, 1, LEVEL_SMT),
        level(1, bits_for(cpus), cpus, LEVEL_CORE),
        level(2, 0, 0, 0),
    ]
}

/// Makes sure the hypervisor signature leaf and KVM feature leaf exist.
fn add_kvm_leaves(entries: &mut Vec<kvm_cpuid_entry2>) {
    if !entries.iter().any(|e| e.function == LEAF_HYPERVISOR) {
        let word = |i: usize| {
            u32::from_le_bytes([
                KVM_SIGNATURE[i],
                KVM_SIGNATURE[i + 1],
                KVM_SIGNATURE[i + 2],
                KVM_SIGNATURE[i + 3],
            ])
        };
        entries.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            eax: LEAF_KVM_FEATURES,
            ebx: word(0),
            ecx: word(4),
            edx: word(8),
            ..Default::default()
        });
    }
    if !entries.iter().any(|e| e.function == LEAF_KVM_FEATURES) {
        entries.push(kvm_cpuid_entry2 {
            function: LEAF_KVM_FEATURES,
            ..Default::default()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn host_like() -> Vec<kvm_cpuid_entry2> {
        let mut l3 = entry(LEAF_CACHE_PARAMS, 3);
        l3.eax = (3 << 5) | 0x3; // level 3, unified
        let mut l1 = entry(LEAF_CACHE_PARAMS, 0);
        l1.eax = (1 << 5) | 0x1;
        let mut features = entry(LEAF_FEATURES, 0);
        features.ebx = 0xff08_0800; // host APIC id 0xff, 8 logical, clflush 8
        vec![
            entry(0, 0),
            features,
            l1,
            l3,
            entry(LEAF_EXT_TOPOLOGY, 0),
            entry(LEAF_EXT_TOPOLOGY, 1),
            entry(LEAF_AMD_SIZES, 0),
            entry(LEAF_AMD_EXT_APIC_ID, 0),
        ]
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    #[test]
    fn features_leaf_carries_apic_id_and_count() {
        let table = build_cpuid(&host_like(), 3, 4);
        let features = find(&table, LEAF_FEATURES, 0);
        assert_eq!(features.ebx >> 24, 3);
        assert_eq!((features.ebx >> 16) & 0xff, 4);
        assert_eq!(features.ebx & 0xffff, 0x0800, "clflush size kept");
        assert_ne!(features.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(features.edx & EDX_HTT, 0);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let table = build_cpuid(&host_like(), 0, 1);
        assert_eq!(find(&table, LEAF_FEATURES, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_describe_one_socket() {
        let table = build_cpuid(&host_like(), 2, 3);
        let smt = find(&table, LEAF_EXT_TOPOLOGY, 0);
        let core = find(&table, LEAF_EXT_TOPOLOGY, 1);
        let end = find(&table, LEAF_EXT_TOPOLOGY, 2);
        assert_eq!(
            (smt.eax, smt.ebx, smt.ecx >> 8, smt.edx),
            (0, 1, LEVEL_SMT, 2)
        );
        assert_eq!(
            (core.eax, core.ebx, core.ecx >> 8, core.edx),
            (2, 3, LEVEL_CORE, 2)
        );
        assert_eq!(end.ecx >> 8, 0, "terminating level");
        assert_eq!(
            table
                .iter()
                .filter(|e| e.function == LEAF_EXT_TOPOLOGY)
                .count(),
            3
        );
        assert!(!table.iter().any(|e| e.function == LEAF_V2_EXT_TOPOLOGY));
    }

    #[test]
    fn cache_and_amd_leaves_follow_cpu_count() {
        let table = build_cpuid(&host_like(), 1, 4);
        let l1 = find(&table, LEAF_CACHE_PARAMS, 0);
        let l3 = find(&table, LEAF_CACHE_PARAMS, 3);
        assert_eq!(l1.eax >> 26, 3);
        assert_eq!((l1.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(l3.eax & 0x3fff, (3 << 5) | 0x3, "cache type and level kept");
        assert_eq!(find(&table, LEAF_AMD_SIZES, 0).ecx & 0xff, 3);
        assert_eq!((find(&table, LEAF_AMD_SIZES, 0).ecx >> 12) & 0xf, 2);
        assert_eq!(find(&table, LEAF_AMD_EXT_APIC_ID, 0).eax, 1);
    }

    #[test]
    fn kvm_leaves_are_present() {
        let table = build_cpuid(&host_like(), 0, 1);
        let signature = find(&table, LEAF_HYPERVISOR, 0);
        let mut bytes = Vec::new();
        for word in [signature.ebx, signature.ecx, signature.edx] {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        assert_eq!(&bytes, KVM_SIGNATURE);
        assert_eq!(signature.eax, LEAF_KVM_FEATURES);
        find(&table, LEAF_KVM_FEATURES, 0);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }
}

//! Allowed-IPs longest-prefix match with 10 000 prefixes (IPv4 and IPv6).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use wgxdp_dataplane::table::{AllowedIps, IpPrefix};

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn allowed_ips(c: &mut Criterion) {
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for i in 0..10_000u32 {
        let p4 = IpPrefix::new(IpAddr::V4(Ipv4Addr::from(xorshift(&mut rng) as u32)), 8 + (i % 25) as u8).unwrap();
        let p6 = IpPrefix::new(
            IpAddr::V6(Ipv6Addr::from((0xfd00u128 << 112) | u128::from(xorshift(&mut rng)) << 40)),
            24 + (i % 100) as u8,
        )
        .unwrap();
        v4.push((p4, i));
        v6.push((p6, i));
    }
    let t4 = AllowedIps::from_entries(v4.iter().map(|(p, v)| (p, v)));
    let t6 = AllowedIps::from_entries(v6.iter().map(|(p, v)| (p, v)));
    let probes4: Vec<[u8; 4]> = (0..1024).map(|_| (xorshift(&mut rng) as u32).to_be_bytes()).collect();
    let probes6: Vec<[u8; 16]> = (0..1024)
        .map(|i| v6[i * 7 % v6.len()].0.addr())
        .map(|a| if let IpAddr::V6(a) = a { a.octets() } else { unreachable!() })
        .collect();
    let mut g = c.benchmark_group("allowed_ips_10000");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("lookup_v4", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(t4.lookup_v4(black_box(probes4[i])))
        })
    });
    g.bench_function("lookup_v6", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(t6.lookup_v6(black_box(probes6[i])))
        })
    });
    g.finish();
}

criterion_group!(benches, allowed_ips);
criterion_main!(benches);

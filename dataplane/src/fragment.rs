//! IPv4 fragmentation (RFC 791 section 3.2, RFC 1812 section 4.2.2.7): an
//! inner packet larger than the tunnel MTU whose sender allows fragmentation
//! (DF clear) is split into fragments that fit, as a router must; only DF
//! packets are answered with "fragmentation needed". Packets with IP options
//! are refused (dropped, counted) rather than fragmented.

use crate::wire::{Ipv4Packet, WireError};

/// The "more fragments" flag in the flags/fragment-offset word.
const MORE_FRAGMENTS: u16 = 0x2000;

/// Why a packet could not be fragmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FragmentError<E> {
    /// Not a well-formed IPv4 packet, DF set, or an MTU too small.
    Refused(WireError),
    /// `each` refused a fragment (the rest were not produced).
    Emit(E),
}

/// Splits `packet` (a whole IPv4 packet with DF clear) into fragments of at
/// most `mtu` bytes, each built in `scratch` and handed to `each`; returns
/// how many.
pub fn fragment_ipv4<E>(
    packet: &[u8],
    mtu: usize,
    scratch: &mut [u8],
    mut each: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<usize, FragmentError<E>> {
    let ip = Ipv4Packet::new_checked(packet).map_err(FragmentError::Refused)?;
    if ip.dont_fragment() {
        return Err(FragmentError::Refused(WireError::BadLength));
    }
    let header_len = ip.header_len();
    // Options would need per-fragment copying rules (only "copied" options
    // repeat); they are rare enough to refuse instead.
    if header_len != crate::wire::IPV4_HEADER_LEN {
        return Err(FragmentError::Refused(WireError::BadLength));
    }
    let data = ip.payload();
    let chunk = mtu.saturating_sub(header_len) / 8 * 8;
    if chunk == 0 || scratch.len() < header_len + chunk {
        return Err(FragmentError::Refused(WireError::BadLength));
    }
    // Every fragment's offset must fit 13 bits: checked before sending any.
    if (ip.fragment_offset() + data.len().saturating_sub(1)) / 8 > 0x1fff {
        return Err(FragmentError::Refused(WireError::BadLength));
    }
    let header = &packet[..header_len];
    let first_offset = ip.fragment_offset();
    let more_after = ip.more_fragments();
    let mut count = 0;
    let mut at = 0;
    while at < data.len() {
        let len = chunk.min(data.len() - at);
        let last = at + len == data.len();
        let offset_units = (first_offset + at) / 8;
        let offset_units = u16::try_from(offset_units).ok().filter(|&o| o <= 0x1fff);
        let offset_units = offset_units.ok_or(FragmentError::Refused(WireError::BadLength))?;
        let frag = &mut scratch[..header_len + len];
        frag[..header_len].copy_from_slice(header);
        frag[header_len..].copy_from_slice(&data[at..at + len]);
        let flags = if last && !more_after { 0 } else { MORE_FRAGMENTS };
        // The copied header still carries the original total length: fix it first.
        frag[2..4].copy_from_slice(&((header_len + len) as u16).to_be_bytes());
        let mut view = Ipv4Packet::new_checked(&mut *frag).map_err(FragmentError::Refused)?;
        view.set_fragment((header_len + len) as u16, flags | offset_units).map_err(FragmentError::Refused)?;
        each(frag).map_err(FragmentError::Emit)?;
        count += 1;
        at += len;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn packet(payload_len: usize, df: bool) -> Vec<u8> {
        let mut p = vec![0u8; 20 + payload_len];
        Ipv4Packet::emit(&mut p[..], Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 17, 64, payload_len)
            .unwrap();
        for (i, b) in p[20..].iter_mut().enumerate() {
            *b = i as u8;
        }
        if !df {
            p[6] &= !0x40;
            Ipv4Packet::new_checked(&mut p[..]).unwrap().fill_checksum();
        }
        p
    }

    /// Reassembles fragments naively (by offset) for checking.
    fn reassemble(frags: &[Vec<u8>]) -> Vec<u8> {
        let mut data = Vec::new();
        for f in frags {
            let ip = Ipv4Packet::new_checked(&f[..]).unwrap();
            assert!(ip.verify_checksum());
            let off = ip.fragment_offset();
            if data.len() < off + ip.payload().len() {
                data.resize(off + ip.payload().len(), 0);
            }
            data[off..off + ip.payload().len()].copy_from_slice(ip.payload());
        }
        data
    }

    #[test]
    fn splits_into_fitting_fragments_that_reassemble() {
        let p = packet(3000, false);
        let mut scratch = vec![0u8; 2048];
        let mut frags = Vec::new();
        let n = fragment_ipv4(&p, 1420, &mut scratch, |f| {
            frags.push(f.to_vec());
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(n, 3);
        assert!(frags.iter().all(|f| f.len() <= 1420));
        let mf: Vec<bool> = frags.iter().map(|f| Ipv4Packet::new_checked(&f[..]).unwrap().more_fragments()).collect();
        assert_eq!(mf, vec![true, true, false]);
        assert_eq!(reassemble(&frags), p[20..].to_vec());
        assert!(frags.iter().skip(1).all(|f| Ipv4Packet::new_checked(&f[..]).unwrap().fragment_offset() % 8 == 0));
    }

    #[test]
    fn refuses_df_garbage_and_tiny_mtus_and_stops_when_told() {
        let mut scratch = vec![0u8; 2048];
        let ok = |_: &[u8]| Ok::<(), ()>(());
        assert!(matches!(fragment_ipv4(&packet(3000, true), 1420, &mut scratch, ok), Err(FragmentError::Refused(_))));
        assert!(matches!(fragment_ipv4(&packet(100, false), 27, &mut scratch, ok), Err(FragmentError::Refused(_))));
        assert!(matches!(fragment_ipv4(&[0x45, 0, 0], 1420, &mut scratch, ok), Err(FragmentError::Refused(_))));
        let mut with_options = vec![0u8; 24 + 3000];
        with_options[..20].copy_from_slice(&packet(0, false)[..20]);
        with_options[0] = 0x46;
        with_options[2..4].copy_from_slice(&((24 + 3000) as u16).to_be_bytes());
        let r = fragment_ipv4(&with_options, 1420, &mut scratch, ok);
        assert!(matches!(r, Err(FragmentError::Refused(_))), "options are refused, not copied blindly");
        let mut seen = 0;
        let r = fragment_ipv4(&packet(3000, false), 1420, &mut scratch, |_| {
            seen += 1;
            Err("full")
        });
        assert_eq!(r, Err(FragmentError::Emit("full")));
        assert_eq!(seen, 1);
        for len in 0..200 {
            let p = packet(200, false);
            let _ = fragment_ipv4(&p[..len.min(p.len())], 60, &mut scratch, ok);
        }
    }
}

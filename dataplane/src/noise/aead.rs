//! The transport AEAD (ChaCha20-Poly1305, section 5.4.6) behind two backends:
//! `ring` (BoringSSL's assembly) and RustCrypto's `chacha20poly1305`. The
//! criterion bench `aead` compares them; the faster (ring) is the default.

use super::constants::AEAD_TAG_LEN;
use super::crypto::AeadError;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use core::mem::MaybeUninit;
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};

/// Which implementation runs the transport AEAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AeadBackend {
    /// `ring`: measured fastest on x86-64 (see README, "Performance").
    #[default]
    Ring,
    /// RustCrypto `chacha20poly1305`: pure Rust, kept as an alternative.
    RustCrypto,
}

// The ring key is kept in a `MaybeUninit` so that it can be overwritten with
// zeros on drop; that is only sound to skip dropping if it has no drop glue.
const _: () = assert!(!core::mem::needs_drop::<LessSafeKey>());

// Inline, not boxed: the key is read on every packet and one indirection
// costs more than the size difference between the variants.
#[allow(clippy::large_enum_variant)]
enum KeyInner {
    /// Always initialised until `Drop` zeroes it.
    Ring(MaybeUninit<LessSafeKey>),
    RustCrypto(ChaCha20Poly1305),
}

/// One direction's ChaCha20-Poly1305 key, zeroized on drop.
pub struct TransportKey {
    inner: KeyInner,
}

impl core::fmt::Debug for TransportKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("TransportKey(<redacted>)")
    }
}

impl TransportKey {
    pub fn new(backend: AeadBackend, key: &[u8; 32]) -> Self {
        let inner = match backend {
            AeadBackend::Ring => {
                let unbound = UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte ChaCha20 key is always valid");
                KeyInner::Ring(MaybeUninit::new(LessSafeKey::new(unbound)))
            }
            AeadBackend::RustCrypto => KeyInner::RustCrypto(ChaCha20Poly1305::new(key.into())),
        };
        Self { inner }
    }

    fn ring(key: &MaybeUninit<LessSafeKey>) -> &LessSafeKey {
        // SAFETY: `KeyInner::Ring` is created initialised in `new` and only
        // de-initialised (zeroed) in `drop`, after which it is never read.
        unsafe { key.assume_init_ref() }
    }

    /// Encrypts `buf[..len-16]` in place and writes the tag into the last 16 bytes.
    /// `buf.len() >= 16` is the caller's guarantee (wire views ensure it).
    pub fn seal(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) {
        let split = buf.len().saturating_sub(AEAD_TAG_LEN);
        let (plain, tag_out) = buf.split_at_mut(split);
        match &self.inner {
            KeyInner::Ring(k) => {
                let tag = Self::ring(k)
                    .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), plain)
                    .expect("ChaCha20-Poly1305 input is under its length limit");
                tag_out.copy_from_slice(tag.as_ref());
            }
            KeyInner::RustCrypto(c) => {
                let tag = c
                    .encrypt_in_place_detached(nonce.into(), aad, plain)
                    .expect("ChaCha20-Poly1305 input is under its length limit");
                tag_out.copy_from_slice(&tag);
            }
        }
    }

    /// Authenticates and decrypts `buf` (ciphertext then tag) in place and returns
    /// the plaintext, which is `buf[..len-16]`.
    pub fn open<'a>(&self, nonce: &[u8; 12], aad: &[u8], buf: &'a mut [u8]) -> Result<&'a mut [u8], AeadError> {
        let n = self.open_within(nonce, aad, buf, 0)?;
        Ok(&mut buf[..n])
    }

    /// Authenticates and decrypts `buf[src..]` (ciphertext then tag), writing
    /// the plaintext to the start of `buf` (moved left by `src` bytes in the same
    /// pass); returns its length. On failure `buf` holds no plaintext.
    pub fn open_within(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8], src: usize) -> Result<usize, AeadError> {
        let sealed = buf.len().checked_sub(src).filter(|&n| n >= AEAD_TAG_LEN).ok_or(AeadError)?;
        let len = sealed - AEAD_TAG_LEN;
        let split = src + len;
        match &self.inner {
            KeyInner::Ring(k) => {
                let mut tag = [0u8; AEAD_TAG_LEN];
                tag.copy_from_slice(&buf[split..]);
                Self::ring(k)
                    .open_in_place_separate_tag(
                        Nonce::assume_unique_for_key(*nonce),
                        Aad::from(aad),
                        Tag::from(tag),
                        &mut buf[..split],
                        src..,
                    )
                    .map_err(|_| AeadError)?;
            }
            KeyInner::RustCrypto(c) => {
                let (data, tag) = buf.split_at_mut(split);
                c.decrypt_in_place_detached(nonce.into(), aad, &mut data[src..], (&*tag).into())
                    .map_err(|_| AeadError)?;
                data.copy_within(src.., 0);
            }
        }
        Ok(len)
    }
}

impl Drop for TransportKey {
    fn drop(&mut self) {
        if let KeyInner::Ring(k) = &mut self.inner {
            // The key is never read after this. `LessSafeKey` has no drop glue
            // (asserted above), so overwriting instead of dropping it loses nothing.
            // SAFETY: `k` is our own place, and all-zero bytes are a valid `MaybeUninit`.
            unsafe { core::ptr::write_volatile(k, MaybeUninit::zeroed()) };
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        }
        // RustCrypto's cipher zeroizes its key in its own Drop.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    const PLAINTEXT: &[u8] = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";

    /// RFC 8439 section 2.8.2, through both backends.
    #[test]
    fn rfc8439_section_2_8_2() {
        let key: [u8; 32] = core::array::from_fn(|i| 0x80 + i as u8);
        let nonce: [u8; 12] = hex("070000004041424344454647").try_into().unwrap();
        let aad = hex("50515253c0c1c2c3c4c5c6c7");
        let expected = hex("d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6
             3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36
             92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc
             3ff4def08e4b7a9de576d26586cec64b6116 1ae10b594f09e26a7e902ecbd0600691");
        for backend in [AeadBackend::Ring, AeadBackend::RustCrypto] {
            let k = TransportKey::new(backend, &key);
            let mut buf = PLAINTEXT.to_vec();
            buf.extend_from_slice(&[0u8; 16]);
            k.seal(&nonce, &aad, &mut buf);
            assert_eq!(buf, expected, "{backend:?} seal");
            let plain = k.open(&nonce, &aad, &mut buf).unwrap();
            assert_eq!(plain, PLAINTEXT, "{backend:?} open");
            let mut tampered = expected.clone();
            tampered[0] ^= 1;
            assert!(k.open(&nonce, &aad, &mut tampered).is_err());
            let mut tampered = expected.clone();
            *tampered.last_mut().unwrap() ^= 0x80;
            assert!(k.open(&nonce, &aad, &mut tampered).is_err());
        }
    }

    /// RFC 8439 appendix A.5: decryption with a counter-shaped nonce.
    #[test]
    fn rfc8439_appendix_a5_decrypt() {
        let key: [u8; 32] = hex("1c9240a5eb55d38af333888604f6b5f0473917c1402b80099dca5cbc207075c0").try_into().unwrap();
        let nonce: [u8; 12] = hex("000000000102030405060708").try_into().unwrap();
        let aad = hex("f33388860000000000004e91");
        let mut ct = hex("64a0861575861af460f062c79be643bd5e805cfd345cf389f108670ac76c8cb2
             4c6cfc18755d43eea09ee94e382d26b0bdb7b73c321b0100d4f03b7f355894cf
             332f830e710b97ce98c8a84abd0b948114ad176e008d33bd60f982b1ff37c855
             9797a06ef4f0ef61c186324e2b3506383606907b6a7c02b0f9f6157b53c867e4
             b9166c767b804d46a59b5216cde7a4e99040c5a40433225ee282a1b0a06c523e
             af4534d7f83fa1155b0047718cbc546a0d072b04b3564eea1b422273f548271a
             0bb2316053fa76991955ebd63159434ecebb4e466dae5a1073a6727627097a10
             49e617d91d361094fa68f0ff77987130305beaba2eda04df997b714d6c6f2c29
             a6ad5cb4022b02709b eead9d67890cbb22392336fea1851f38");
        let ct_copy = ct.clone();
        for backend in [AeadBackend::Ring, AeadBackend::RustCrypto] {
            ct.copy_from_slice(&ct_copy);
            let k = TransportKey::new(backend, &key);
            let plain = k.open(&nonce, &aad, &mut ct).unwrap();
            assert!(plain.starts_with(b"Internet-Drafts are draft documents valid for a maximum of six months"));
            assert!(plain.ends_with(b"/\xe2\x80\x9cwork in progress./\xe2\x80\x9d"));
        }
    }

    #[test]
    fn backends_agree_on_random_sizes() {
        let key = [0x42u8; 32];
        let a = TransportKey::new(AeadBackend::Ring, &key);
        let b = TransportKey::new(AeadBackend::RustCrypto, &key);
        for len in [0usize, 1, 15, 16, 17, 63, 64, 512, 1420, 1500] {
            let nonce = super::super::crypto::counter_nonce(len as u64);
            let mut x: Vec<u8> = (0..len + 16).map(|i| i as u8).collect();
            let mut y = x.clone();
            a.seal(&nonce, b"", &mut x);
            b.seal(&nonce, b"", &mut y);
            assert_eq!(x, y, "len {len}");
            assert_eq!(b.open(&nonce, b"", &mut x).unwrap().len(), len);
        }
        assert!(a.open(&[0u8; 12], b"", &mut [0u8; 15]).is_err());
    }

    /// Opening with the plaintext moved left (how a worker decrypts a frame so
    /// the inner packet lands behind room for its Ethernet header) gives the
    /// RFC 8439 plaintext at the start, for both backends and any shift.
    #[test]
    fn open_within_moves_the_plaintext_left() {
        let key: [u8; 32] = core::array::from_fn(|i| 0x80 + i as u8);
        let nonce: [u8; 12] = hex("070000004041424344454647").try_into().unwrap();
        let aad = hex("50515253c0c1c2c3c4c5c6c7");
        for backend in [AeadBackend::Ring, AeadBackend::RustCrypto] {
            let k = TransportKey::new(backend, &key);
            let mut sealed = PLAINTEXT.to_vec();
            sealed.extend_from_slice(&[0u8; 16]);
            k.seal(&nonce, &aad, &mut sealed);
            for shift in [0usize, 1, 14, 44, 64, 200] {
                let mut buf = vec![0xeeu8; shift];
                buf.extend_from_slice(&sealed);
                assert_eq!(k.open_within(&nonce, &aad, &mut buf, shift), Ok(PLAINTEXT.len()), "{backend:?} {shift}");
                assert_eq!(&buf[..PLAINTEXT.len()], PLAINTEXT, "{backend:?} shift {shift}");
                let mut tampered = vec![0u8; shift];
                tampered.extend_from_slice(&sealed);
                tampered[shift] ^= 1;
                assert!(k.open_within(&nonce, &aad, &mut tampered, shift).is_err());
            }
            let mut short = vec![0u8; 20];
            assert!(k.open_within(&nonce, &aad, &mut short, 5).is_err(), "15 bytes after the shift: no tag");
            assert!(k.open_within(&nonce, &aad, &mut short, 21).is_err(), "shift past the end");
        }
    }
}

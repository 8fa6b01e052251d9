//! The whitepaper's primitives (section 5.4): HASH, MAC, HMAC, KDF1..3 over
//! BLAKE2s, AEAD (ChaCha20-Poly1305) and XAEAD (XChaCha20-Poly1305) for the
//! handshake and cookies. The transport AEAD lives in `aead.rs`.

use super::constants::{AEAD_TAG_LEN, HASH_LEN, MAC_LEN};
use blake2::digest::{consts::U16, FixedOutput, KeyInit, Mac, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, XChaCha20Poly1305};
use zeroize::Zeroizing;

/// A 32-byte value that must not outlive its use (chaining keys, KDF outputs).
pub type SecretBytes = Zeroizing<[u8; 32]>;

/// HASH(input): BLAKE2s-256 over the concatenation of `parts`.
pub fn hash(parts: &[&[u8]]) -> [u8; HASH_LEN] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

/// MAC(key, input): keyed BLAKE2s with a 16-byte output.
pub fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    // Keys here are 32 bytes (hashes and cookies) or 16 bytes (cookies): both are
    // within BLAKE2s's key limit, so construction cannot fail.
    let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(key).expect("BLAKE2s key is at most 32 bytes");
    for p in parts {
        Mac::update(&mut m, p);
    }
    m.finalize_fixed().into()
}

/// HMAC(key, input) with BLAKE2s-256 (RFC 2104, block size 64).
pub fn hmac(key: &[u8; HASH_LEN], parts: &[&[u8]]) -> SecretBytes {
    const BLOCK: usize = 64;
    let mut ipad = Zeroizing::new([0x36u8; BLOCK]);
    let mut opad = Zeroizing::new([0x5cu8; BLOCK]);
    for i in 0..HASH_LEN {
        ipad[i] ^= key[i];
        opad[i] ^= key[i];
    }
    let mut inner = Blake2s256::new();
    Update::update(&mut inner, &ipad[..]);
    for p in parts {
        Update::update(&mut inner, p);
    }
    let inner_hash = Zeroizing::new(<[u8; HASH_LEN]>::from(inner.finalize()));
    let mut outer = Blake2s256::new();
    Update::update(&mut outer, &opad[..]);
    Update::update(&mut outer, &inner_hash[..]);
    Zeroizing::new(outer.finalize().into())
}

/// KDFn(key, input) from section 5.4: τ0 = HMAC(key, input), τi = HMAC(τ0, τ(i-1) || i).
/// Returns the first `N` of τ1, τ2, τ3.
fn kdf<const N: usize>(key: &[u8; HASH_LEN], input: &[u8]) -> [SecretBytes; N] {
    let tau0 = hmac(key, &[input]);
    let mut out: [SecretBytes; N] = core::array::from_fn(|_| Zeroizing::new([0u8; 32]));
    let mut prev: Option<SecretBytes> = None;
    for (i, slot) in out.iter_mut().enumerate() {
        let counter = [i as u8 + 1];
        let next = match &prev {
            None => hmac(&tau0, &[&counter]),
            Some(p) => hmac(&tau0, &[&p[..], &counter]),
        };
        *slot = next.clone();
        prev = Some(next);
    }
    out
}

pub fn kdf1(key: &[u8; HASH_LEN], input: &[u8]) -> SecretBytes {
    let [a] = kdf::<1>(key, input);
    a
}

pub fn kdf2(key: &[u8; HASH_LEN], input: &[u8]) -> (SecretBytes, SecretBytes) {
    let [a, b] = kdf::<2>(key, input);
    (a, b)
}

pub fn kdf3(key: &[u8; HASH_LEN], input: &[u8]) -> (SecretBytes, SecretBytes, SecretBytes) {
    let [a, b, c] = kdf::<3>(key, input);
    (a, b, c)
}

/// The 96-bit nonce of section 5.4.6: 32 zero bits then the 64-bit little-endian counter.
pub fn counter_nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// Authentication failed (wrong key, tampered data, or wrong associated data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed")]
pub struct AeadError;

/// AEAD(key, counter, plain, aad): encrypts `buf[..len-16]` in place and writes the
/// tag into the last 16 bytes. `buf` must be at least 16 bytes.
pub fn aead_seal(key: &[u8; 32], counter: u64, buf: &mut [u8], aad: &[u8]) {
    let cipher = ChaCha20Poly1305::new(key.into());
    let split = buf.len() - AEAD_TAG_LEN;
    let (plain, tag_out) = buf.split_at_mut(split);
    let tag = cipher
        .encrypt_in_place_detached(&counter_nonce(counter).into(), aad, plain)
        .expect("ChaCha20-Poly1305 cannot fail for messages under 256 GiB");
    tag_out.copy_from_slice(&tag);
}

/// The inverse of `aead_seal`: on success `buf[..len-16]` holds the plaintext.
pub fn aead_open(key: &[u8; 32], counter: u64, buf: &mut [u8], aad: &[u8]) -> Result<(), AeadError> {
    if buf.len() < AEAD_TAG_LEN {
        return Err(AeadError);
    }
    let cipher = ChaCha20Poly1305::new(key.into());
    let split = buf.len() - AEAD_TAG_LEN;
    let (data, tag) = buf.split_at_mut(split);
    cipher.decrypt_in_place_detached(&counter_nonce(counter).into(), aad, data, (&*tag).into()).map_err(|_| AeadError)
}

/// XAEAD(key, nonce, plain, aad) with a 24-byte nonce (section 5.4.7), in place like `aead_seal`.
pub fn xaead_seal(key: &[u8; 32], nonce: &[u8; 24], buf: &mut [u8], aad: &[u8]) {
    let cipher = XChaCha20Poly1305::new(key.into());
    let split = buf.len() - AEAD_TAG_LEN;
    let (plain, tag_out) = buf.split_at_mut(split);
    let tag = cipher
        .encrypt_in_place_detached(nonce.into(), aad, plain)
        .expect("XChaCha20-Poly1305 cannot fail for short messages");
    tag_out.copy_from_slice(&tag);
}

pub fn xaead_open(key: &[u8; 32], nonce: &[u8; 24], buf: &mut [u8], aad: &[u8]) -> Result<(), AeadError> {
    if buf.len() < AEAD_TAG_LEN {
        return Err(AeadError);
    }
    let cipher = XChaCha20Poly1305::new(key.into());
    let split = buf.len() - AEAD_TAG_LEN;
    let (data, tag) = buf.split_at_mut(split);
    cipher.decrypt_in_place_detached(nonce.into(), aad, data, (&*tag).into()).map_err(|_| AeadError)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn blake2s_rfc7693_vectors() {
        // RFC 7693 appendix B: BLAKE2s-256("abc").
        assert_eq!(hash(&[b"abc"]).to_vec(), hex("508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"));
        // BLAKE2s-256 of the empty string.
        assert_eq!(hash(&[]).to_vec(), hex("69217a3079908094e11121d042354a7c1f55b6482ca1a51e1b250dfd1ed0eef9"));
        // Split input hashes like the concatenation.
        assert_eq!(hash(&[b"a", b"bc"]), hash(&[b"abc"]));
    }

    #[test]
    fn hmac_matches_the_generic_hmac_construction() {
        // RustCrypto's `hmac` crate as an independent reference implementation.
        use hmac::SimpleHmac;
        for len in [0usize, 1, 31, 32, 64, 65, 200] {
            let key: [u8; 32] = core::array::from_fn(|i| (i * 7 + len) as u8);
            let msg: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
            let mut reference = <SimpleHmac<Blake2s256> as hmac::Mac>::new_from_slice(&key).unwrap();
            hmac::Mac::update(&mut reference, &msg);
            let expected: [u8; 32] = hmac::Mac::finalize(reference).into_bytes().into();
            assert_eq!(*hmac(&key, &[&msg]), expected, "message length {len}");
        }
    }

    /// Vectors computed independently with Python's hashlib (its own BLAKE2s)
    /// and the `hmac` module, following section 5.4's definitions.
    #[test]
    fn hmac_and_kdf_known_answers() {
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let msg = b"WireGuard HMAC-BLAKE2s known answer";
        assert_eq!(
            hmac(&key, &[msg]).to_vec(),
            hex("e926b86517b738788103c8dbd37ffd1f6156762fd59b5e695feec13e3d5ddad2")
        );
        let (t1, t2, t3) = kdf3(&key, msg);
        assert_eq!(t1.to_vec(), hex("71fcfa45bedb75bef0e86cdfac139d636c06ec4820d90895c47caf52b41a0b16"));
        assert_eq!(t2.to_vec(), hex("c84a1664a9e9f43bd454434a3a0d6d4e40d692a0dc40b977eaa247eca2dd0f14"));
        assert_eq!(t3.to_vec(), hex("ffda8519b6e6150f8cdc55cf8b8ee761a0138426e4b3929d500c8aeccde1358b"));
        // MAC: keyed BLAKE2s-128 under the MAC1 key of the all-zero public key.
        let mac1_key = hash(&[b"mac1----", &[0u8; 32]]);
        assert_eq!(mac1_key.to_vec(), hex("d84d593e94aac535d9107d24b9e4576f12a1d0c96b630c2961edee4259e3e3c5"));
        assert_eq!(mac(&mac1_key, &[b"message"]).to_vec(), hex("05e2974b4b4bf15e2bd16732c457e424"));
    }

    #[test]
    fn kdf_follows_section_5_4() {
        let key = [3u8; 32];
        let input = b"input keying material";
        let t0 = hmac(&key, &[input]);
        let t1 = hmac(&t0, &[&[1]]);
        let t2 = hmac(&t0, &[&t1[..], &[2]]);
        let t3 = hmac(&t0, &[&t2[..], &[3]]);
        assert_eq!(*kdf1(&key, input), *t1);
        let (a, b) = kdf2(&key, input);
        assert_eq!((*a, *b), (*t1, *t2));
        let (a, b, c) = kdf3(&key, input);
        assert_eq!((*a, *b, *c), (*t1, *t2, *t3));
    }

    #[test]
    fn keyed_blake2s_mac_vector() {
        // BLAKE2s reference KAT (blake2s-kat.txt), key 00..1f, empty input, 32-byte
        // output; checks the keyed mode that MAC builds on.
        let key: Vec<u8> = (0u8..32).collect();
        let m = <Blake2sMac<blake2::digest::consts::U32> as KeyInit>::new_from_slice(&key).unwrap();
        assert_eq!(
            FixedOutput::finalize_fixed(m).to_vec(),
            hex("48a8997da407876b3d79c0d92325ad3b89cbb754d86ab71aee047ad345fd2c49")
        );
        // And MAC's 16-byte output differs from a truncated 32-byte one (the length
        // is a BLAKE2 parameter), so it is a genuinely separate function.
        assert_ne!(mac(&key, &[]).to_vec(), hex("48a8997da407876b3d79c0d92325ad3b"));
    }

    #[test]
    fn aead_round_trip_and_tamper() {
        let key = [9u8; 32];
        let mut buf = *b"sixteen byte msg\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
        aead_seal(&key, 5, &mut buf, b"ad");
        let sealed = buf;
        aead_open(&key, 5, &mut buf, b"ad").unwrap();
        assert_eq!(&buf[..16], b"sixteen byte msg");
        let mut t = sealed;
        t[3] ^= 0x80;
        assert_eq!(aead_open(&key, 5, &mut t, b"ad"), Err(AeadError));
        let mut t = sealed;
        assert_eq!(aead_open(&key, 6, &mut t, b"ad"), Err(AeadError));
        let mut t = sealed;
        assert_eq!(aead_open(&key, 5, &mut t, b"da"), Err(AeadError));
        assert_eq!(aead_open(&key, 5, &mut [0u8; 15], b""), Err(AeadError));
    }

    #[test]
    fn xaead_round_trip() {
        let key = [1u8; 32];
        let nonce = [2u8; 24];
        let mut buf = [7u8; 32];
        xaead_seal(&key, &nonce, &mut buf, b"mac1");
        let mut t = buf;
        xaead_open(&key, &nonce, &mut buf, b"mac1").unwrap();
        assert_eq!(&buf[..16], &[7u8; 16]);
        t[20] ^= 1;
        assert!(xaead_open(&key, &nonce, &mut t, b"mac1").is_err());
    }
}

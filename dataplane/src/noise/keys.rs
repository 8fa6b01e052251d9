//! Key types. Private and pre-shared keys print as `<redacted>` and are zeroized
//! on drop; public keys print as base64 like `wg` does.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rand_core::{OsRng, RngCore};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// A key given as text was not 32 bytes of standard base64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a WireGuard key is 32 bytes in standard base64 (44 characters ending in '=')")]
pub struct KeyParseError;

fn decode_key(s: &str) -> Result<zeroize::Zeroizing<[u8; 32]>, KeyParseError> {
    let mut out = zeroize::Zeroizing::new([0u8; 32]);
    let mut decoded = zeroize::Zeroizing::new(BASE64.decode(s.trim()).map_err(|_| KeyParseError)?);
    if decoded.len() != 32 {
        return Err(KeyParseError);
    }
    out.copy_from_slice(&decoded);
    decoded.zeroize();
    Ok(out)
}

/// A Curve25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        BASE64.encode(self.0)
    }
}

impl core::str::FromStr for PublicKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(*decode_key(s)?))
    }
}

impl core::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl core::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// A Curve25519 private key (clamped by X25519 itself on use).
#[derive(Clone)]
pub struct PrivateKey(x25519_dalek::StaticSecret);

impl PrivateKey {
    pub fn generate() -> Self {
        Self(x25519_dalek::StaticSecret::random_from_rng(OsRng))
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(x25519_dalek::StaticSecret::from(bytes))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    /// The key's bytes. The caller owns their secrecy (e.g. `Zeroizing`).
    pub fn as_bytes(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    /// DH(private, public). `None` when the result is all zeros (a low-order
    /// public key), which the protocol must reject.
    pub fn diffie_hellman(&self, public: &PublicKey) -> Option<SharedSecret> {
        let shared = self.0.diffie_hellman(&x25519_dalek::PublicKey::from(public.0));
        if !shared.was_contributory() {
            return None;
        }
        Some(SharedSecret(shared.to_bytes()))
    }

    /// The key as base64, for writing a key file. The caller owns the secrecy
    /// of the returned string.
    pub fn to_base64_secret(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(BASE64.encode(self.0.as_bytes()))
    }
}

impl core::str::FromStr for PrivateKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::from_bytes(*decode_key(s)?))
    }
}

impl core::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// The output of X25519, zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SharedSecret(pub(crate) [u8; 32]);

impl SharedSecret {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl core::fmt::Debug for SharedSecret {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SharedSecret(<redacted>)")
    }
}

/// The optional pre-shared key Q of section 5.4.3 (all zeros when unused).
#[derive(Clone, Default, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct PresharedKey(pub(crate) [u8; 32]);

impl PresharedKey {
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        OsRng.fill_bytes(&mut k);
        Self(k)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn to_base64_secret(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(BASE64.encode(self.0))
    }
}

impl core::str::FromStr for PresharedKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(*decode_key(s)?))
    }
}

impl core::fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_in_debug() {
        let k = PrivateKey::generate();
        let psk = PresharedKey::generate();
        let dbg = format!("{k:?} {psk:?}");
        assert!(!dbg.contains(&*k.to_base64_secret()));
        assert!(!dbg.contains(&*psk.to_base64_secret()));
        assert_eq!(dbg, "PrivateKey(<redacted>) PresharedKey(<redacted>)");
    }

    #[test]
    fn base64_round_trip_and_errors() {
        let k = PrivateKey::generate();
        let parsed: PrivateKey = k.to_base64_secret().parse().unwrap();
        assert_eq!(parsed.public_key(), k.public_key());
        let pk: PublicKey = k.public_key().to_base64().parse().unwrap();
        assert_eq!(pk, k.public_key());
        assert_eq!("abc".parse::<PublicKey>(), Err(KeyParseError));
        assert_eq!("AAAA".parse::<PublicKey>(), Err(KeyParseError));
    }

    #[test]
    fn rfc7748_x25519_vector() {
        // RFC 7748 section 6.1 (Alice's and Bob's keys and their shared secret).
        fn h(s: &str) -> [u8; 32] {
            core::array::from_fn(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        }
        let alice = PrivateKey::from_bytes(h("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"));
        let bob = PrivateKey::from_bytes(h("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"));
        assert_eq!(alice.public_key().0, h("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"));
        let ab = alice.diffie_hellman(&bob.public_key()).unwrap();
        let ba = bob.diffie_hellman(&alice.public_key()).unwrap();
        assert_eq!(ab.as_bytes(), ba.as_bytes());
        assert_eq!(*ab.as_bytes(), h("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"));
    }

    #[test]
    fn low_order_public_key_is_rejected() {
        let k = PrivateKey::generate();
        assert!(k.diffie_hellman(&PublicKey([0u8; 32])).is_none());
    }
}

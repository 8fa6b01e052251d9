//! Noise_IKpsk2 as WireGuard uses it (section 5.4.2 and 5.4.3). Each step below
//! quotes the whitepaper line it implements. MAC1/MAC2 are stamped and checked
//! by `cookie.rs`; this file produces and consumes the message bodies.

use super::aead::AeadBackend;
use super::constants::{CONSTRUCTION, IDENTIFIER, TIMESTAMP_LEN};
use super::crypto::{aead_open, aead_seal, hash, kdf1, kdf2, kdf3, SecretBytes};
use super::keys::{PresharedKey, PrivateKey, PublicKey, SharedSecret};
use super::session::Keypair;
use super::tai64n::Tai64N;
use crate::wire::{HandshakeInitiation, HandshakeResponse};
use std::sync::OnceLock;
use std::time::Instant;
use zeroize::Zeroizing;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("a handshake field failed to decrypt")]
    Decryption,
    #[error("a Diffie-Hellman result was all zeros (low-order point)")]
    LowOrderPoint,
    #[error("the initiation names a peer we do not know")]
    UnknownPeer,
    #[error("the initiation timestamp is not newer than the last one (replay)")]
    ReplayedInitiation,
    #[error("initiations from this peer arrive too fast")]
    Flood,
    #[error("no handshake in progress for this response")]
    UnexpectedResponse,
}

/// Ci = HASH(CONSTRUCTION), Hi = HASH(Ci || IDENTIFIER): the same for every handshake.
fn initial_chain() -> &'static ([u8; 32], [u8; 32]) {
    static INITIAL: OnceLock<([u8; 32], [u8; 32])> = OnceLock::new();
    INITIAL.get_or_init(|| {
        let ck = hash(&[CONSTRUCTION]);
        let h = hash(&[&ck, IDENTIFIER]);
        (ck, h)
    })
}

/// The gateway's own static key and the values derived from it.
pub struct StaticIdentity {
    pub private: PrivateKey,
    pub public: PublicKey,
}

impl core::fmt::Debug for StaticIdentity {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("StaticIdentity").field("public", &self.public).finish_non_exhaustive()
    }
}

impl StaticIdentity {
    pub fn new(private: PrivateKey) -> Self {
        let public = private.public_key();
        Self { private, public }
    }
}

/// What we know about a remote peer for handshakes: its static key, the
/// precomputed DH(S_local, S_remote) and the pre-shared key.
pub struct PeerKeys {
    pub remote_static: PublicKey,
    static_static: SharedSecret,
    pub psk: PresharedKey,
}

impl core::fmt::Debug for PeerKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PeerKeys").field("remote_static", &self.remote_static).finish_non_exhaustive()
    }
}

impl PeerKeys {
    /// Precomputes the static-static DH; refuses a low-order peer key.
    pub fn new(local: &StaticIdentity, remote_static: PublicKey, psk: PresharedKey) -> Result<Self, HandshakeError> {
        let static_static = local.private.diffie_hellman(&remote_static).ok_or(HandshakeError::LowOrderPoint)?;
        Ok(Self { remote_static, static_static, psk })
    }
}

/// Initiator state between sending an initiation and consuming the response.
pub struct InitiatorState {
    pub local_index: u32,
    pub sent_at: Instant,
    chaining_key: SecretBytes,
    hash: [u8; 32],
    ephemeral: PrivateKey,
}

impl core::fmt::Debug for InitiatorState {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("InitiatorState").field("local_index", &self.local_index).finish_non_exhaustive()
    }
}

/// Writes the body of a handshake initiation (everything but the MACs).
pub fn create_initiation(
    local: &StaticIdentity,
    peer: &PeerKeys,
    local_index: u32,
    timestamp: Tai64N,
    now: Instant,
    msg: &mut HandshakeInitiation<&mut [u8]>,
) -> Result<InitiatorState, HandshakeError> {
    let (ck0, h0) = initial_chain();
    // Hi := HASH(Hi || Sr_pub)
    let mut h = hash(&[h0, peer.remote_static.as_bytes()]);
    // (Ei_priv, Ei_pub) := DH-Generate()
    let ephemeral = PrivateKey::generate();
    let e_pub = ephemeral.public_key();
    // msg.sender := Ii
    msg.set_sender(local_index);
    // Ci := KDF1(Ci, Ei_pub); msg.ephemeral := Ei_pub; Hi := HASH(Hi || msg.ephemeral)
    let mut ck = kdf1(ck0, e_pub.as_bytes());
    msg.ephemeral_mut().copy_from_slice(e_pub.as_bytes());
    h = hash(&[&h, e_pub.as_bytes()]);
    // (Ci, κ) := KDF2(Ci, DH(Ei_priv, Sr_pub))
    let es = ephemeral.diffie_hellman(&peer.remote_static).ok_or(HandshakeError::LowOrderPoint)?;
    let (c, key) = kdf2(&ck, es.as_bytes());
    ck = c;
    // msg.static := AEAD(κ, 0, Si_pub, Hi); Hi := HASH(Hi || msg.static)
    let s = msg.encrypted_static_mut();
    s[..32].copy_from_slice(local.public.as_bytes());
    aead_seal(&key, 0, s, &h);
    h = hash(&[&h, msg.encrypted_static()]);
    // (Ci, κ) := KDF2(Ci, DH(Si_priv, Sr_pub))  — precomputed
    let (c, key) = kdf2(&ck, peer.static_static.as_bytes());
    ck = c;
    // msg.timestamp := AEAD(κ, 0, TAI64N(), Hi); Hi := HASH(Hi || msg.timestamp)
    let t = msg.encrypted_timestamp_mut();
    t[..TIMESTAMP_LEN].copy_from_slice(&timestamp.0);
    aead_seal(&key, 0, t, &h);
    h = hash(&[&h, msg.encrypted_timestamp()]);
    Ok(InitiatorState { local_index, sent_at: now, chaining_key: ck, hash: h, ephemeral })
}

/// A received initiation after its static key was decrypted but before the
/// peer's precomputed DH is known (step one of consuming it).
pub struct InitiationStatic {
    pub remote_static: PublicKey,
    pub sender_index: u32,
    remote_ephemeral: PublicKey,
    chaining_key: SecretBytes,
    hash: [u8; 32],
}

impl core::fmt::Debug for InitiationStatic {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("InitiationStatic")
            .field("remote_static", &self.remote_static)
            .field("sender_index", &self.sender_index)
            .finish_non_exhaustive()
    }
}

/// A fully consumed initiation, ready for `create_response`.
pub struct ConsumedInitiation {
    pub remote_static: PublicKey,
    pub sender_index: u32,
    pub timestamp: Tai64N,
    remote_ephemeral: PublicKey,
    chaining_key: SecretBytes,
    hash: [u8; 32],
}

impl core::fmt::Debug for ConsumedInitiation {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ConsumedInitiation")
            .field("remote_static", &self.remote_static)
            .field("sender_index", &self.sender_index)
            .finish_non_exhaustive()
    }
}

/// Responder, step one: recover the initiator's static public key.
pub fn consume_initiation_static(
    local: &StaticIdentity,
    msg: &HandshakeInitiation<&[u8]>,
) -> Result<InitiationStatic, HandshakeError> {
    let (ck0, h0) = initial_chain();
    // Hr := HASH(Hr || Sr_pub)
    let mut h = hash(&[h0, local.public.as_bytes()]);
    let mut e = [0u8; 32];
    e.copy_from_slice(msg.ephemeral());
    let remote_ephemeral = PublicKey(e);
    // Cr := KDF1(Cr, msg.ephemeral); Hr := HASH(Hr || msg.ephemeral)
    let mut ck = kdf1(ck0, &e);
    h = hash(&[&h, &e]);
    // (Cr, κ) := KDF2(Cr, DH(Sr_priv, msg.ephemeral))
    let es = local.private.diffie_hellman(&remote_ephemeral).ok_or(HandshakeError::LowOrderPoint)?;
    let (c, key) = kdf2(&ck, es.as_bytes());
    ck = c;
    // Si_pub := AEAD-Decrypt(κ, 0, msg.static, Hr); Hr := HASH(Hr || msg.static)
    let mut s = Zeroizing::new([0u8; 48]);
    s.copy_from_slice(msg.encrypted_static());
    aead_open(&key, 0, &mut s[..], &h).map_err(|_| HandshakeError::Decryption)?;
    let mut remote = [0u8; 32];
    remote.copy_from_slice(&s[..32]);
    h = hash(&[&h, msg.encrypted_static()]);
    Ok(InitiationStatic {
        remote_static: PublicKey(remote),
        sender_index: msg.sender(),
        remote_ephemeral,
        chaining_key: ck,
        hash: h,
    })
}

impl InitiationStatic {
    /// Responder, step two: with the peer identified, decrypt the timestamp.
    pub fn finish(
        self,
        peer: &PeerKeys,
        msg: &HandshakeInitiation<&[u8]>,
    ) -> Result<ConsumedInitiation, HandshakeError> {
        if peer.remote_static != self.remote_static {
            return Err(HandshakeError::UnknownPeer);
        }
        // (Cr, κ) := KDF2(Cr, DH(Sr_priv, Si_pub))  — precomputed
        let (ck, key) = kdf2(&self.chaining_key, peer.static_static.as_bytes());
        // timestamp := AEAD-Decrypt(κ, 0, msg.timestamp, Hr); Hr := HASH(Hr || msg.timestamp)
        let mut t = Zeroizing::new([0u8; 28]);
        t.copy_from_slice(msg.encrypted_timestamp());
        aead_open(&key, 0, &mut t[..], &self.hash).map_err(|_| HandshakeError::Decryption)?;
        let mut ts = [0u8; TIMESTAMP_LEN];
        ts.copy_from_slice(&t[..TIMESTAMP_LEN]);
        let h = hash(&[&self.hash, msg.encrypted_timestamp()]);
        Ok(ConsumedInitiation {
            remote_static: self.remote_static,
            sender_index: self.sender_index,
            timestamp: Tai64N(ts),
            remote_ephemeral: self.remote_ephemeral,
            chaining_key: ck,
            hash: h,
        })
    }
}

/// Responder: writes the body of the response and derives the new keypair
/// (section 5.4.5: (T_recv, T_send) := KDF2(Cr, ε)).
pub fn create_response(
    init: &ConsumedInitiation,
    peer: &PeerKeys,
    local_index: u32,
    backend: AeadBackend,
    now: Instant,
    msg: &mut HandshakeResponse<&mut [u8]>,
) -> Result<Keypair, HandshakeError> {
    // (Er_priv, Er_pub) := DH-Generate()
    let ephemeral = PrivateKey::generate();
    let e_pub = ephemeral.public_key();
    // msg.sender := Ir; msg.receiver := Ii
    msg.set_sender(local_index);
    msg.set_receiver(init.sender_index);
    // Cr := KDF1(Cr, Er_pub); msg.ephemeral := Er_pub; Hr := HASH(Hr || msg.ephemeral)
    let mut ck = kdf1(&init.chaining_key, e_pub.as_bytes());
    msg.ephemeral_mut().copy_from_slice(e_pub.as_bytes());
    let mut h = hash(&[&init.hash, e_pub.as_bytes()]);
    // Cr := KDF1(Cr, DH(Er_priv, Ei_pub))
    let ee = ephemeral.diffie_hellman(&init.remote_ephemeral).ok_or(HandshakeError::LowOrderPoint)?;
    ck = kdf1(&ck, ee.as_bytes());
    // Cr := KDF1(Cr, DH(Er_priv, Si_pub))
    let se = ephemeral.diffie_hellman(&init.remote_static).ok_or(HandshakeError::LowOrderPoint)?;
    ck = kdf1(&ck, se.as_bytes());
    // (Cr, τ, κ) := KDF3(Cr, Q); Hr := HASH(Hr || τ)
    let (c, tau, key) = kdf3(&ck, peer.psk.as_bytes());
    ck = c;
    h = hash(&[&h, &tau[..]]);
    // msg.empty := AEAD(κ, 0, ε, Hr); Hr := HASH(Hr || msg.empty)
    aead_seal(&key, 0, msg.encrypted_nothing_mut(), &h);
    let _final_hash = hash(&[&h, msg.encrypted_nothing()]);
    // (T_recv, T_send) := KDF2(Cr, ε)
    let (recv, send) = kdf2(&ck, &[]);
    Ok(Keypair::new(backend, local_index, init.sender_index, false, now, &send, &recv))
}

/// Initiator: consumes a response to `state` and derives the new keypair
/// ((T_send, T_recv) := KDF2(Ci, ε)).
pub fn consume_response(
    state: &InitiatorState,
    local: &StaticIdentity,
    peer: &PeerKeys,
    msg: &HandshakeResponse<&[u8]>,
    backend: AeadBackend,
    now: Instant,
) -> Result<Keypair, HandshakeError> {
    if msg.receiver() != state.local_index {
        return Err(HandshakeError::UnexpectedResponse);
    }
    let mut e = [0u8; 32];
    e.copy_from_slice(msg.ephemeral());
    let remote_ephemeral = PublicKey(e);
    // Ci := KDF1(Ci, msg.ephemeral); Hi := HASH(Hi || msg.ephemeral)
    let mut ck = kdf1(&state.chaining_key, &e);
    let mut h = hash(&[&state.hash, &e]);
    // Ci := KDF1(Ci, DH(Ei_priv, Er_pub))
    let ee = state.ephemeral.diffie_hellman(&remote_ephemeral).ok_or(HandshakeError::LowOrderPoint)?;
    ck = kdf1(&ck, ee.as_bytes());
    // Ci := KDF1(Ci, DH(Si_priv, Er_pub))
    let se = local.private.diffie_hellman(&remote_ephemeral).ok_or(HandshakeError::LowOrderPoint)?;
    ck = kdf1(&ck, se.as_bytes());
    // (Ci, τ, κ) := KDF3(Ci, Q); Hi := HASH(Hi || τ)
    let (c, tau, key) = kdf3(&ck, peer.psk.as_bytes());
    ck = c;
    h = hash(&[&h, &tau[..]]);
    // AEAD-Decrypt(κ, 0, msg.empty, Hi) must succeed
    let mut empty = [0u8; 16];
    empty.copy_from_slice(msg.encrypted_nothing());
    aead_open(&key, 0, &mut empty, &h).map_err(|_| HandshakeError::Decryption)?;
    // (T_send, T_recv) := KDF2(Ci, ε)
    let (send, recv) = kdf2(&ck, &[]);
    Ok(Keypair::new(backend, state.local_index, msg.sender(), true, now, &send, &recv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::TransportHeader;
    use std::time::SystemTime;

    fn run_handshake(psk_i: PresharedKey, psk_r: PresharedKey) -> Result<(Keypair, Keypair), HandshakeError> {
        let now = Instant::now();
        let initiator = StaticIdentity::new(PrivateKey::generate());
        let responder = StaticIdentity::new(PrivateKey::generate());
        let i_peer = PeerKeys::new(&initiator, responder.public, psk_i)?;
        let r_peer = PeerKeys::new(&responder, initiator.public, psk_r)?;

        let mut init_buf = [0u8; 148];
        let mut init = HandshakeInitiation::new_zeroed(&mut init_buf[..]).unwrap();
        let ts = Tai64N::from_system_time(SystemTime::now());
        let state = create_initiation(&initiator, &i_peer, 0x1111, ts, now, &mut init)?;

        let init = HandshakeInitiation::new_checked(&init_buf[..]).unwrap();
        let partial = consume_initiation_static(&responder, &init)?;
        assert_eq!(partial.remote_static, initiator.public);
        let consumed = partial.finish(&r_peer, &init)?;
        assert_eq!(consumed.timestamp, ts);
        assert_eq!(consumed.sender_index, 0x1111);

        let mut resp_buf = [0u8; 92];
        let mut resp = HandshakeResponse::new_zeroed(&mut resp_buf[..]).unwrap();
        let r_kp = create_response(&consumed, &r_peer, 0x2222, AeadBackend::Ring, now, &mut resp)?;
        let resp = HandshakeResponse::new_checked(&resp_buf[..]).unwrap();
        let i_kp = consume_response(&state, &initiator, &i_peer, &resp, AeadBackend::Ring, now)?;
        Ok((i_kp, r_kp))
    }

    #[test]
    fn full_handshake_yields_matching_keys() {
        let psk = PresharedKey::generate();
        let (i, r) = run_handshake(psk.clone(), psk).unwrap();
        assert_eq!((i.local_index, i.remote_index), (0x1111, 0x2222));
        assert_eq!((r.local_index, r.remote_index), (0x2222, 0x1111));
        let now = Instant::now();
        let mut buf = [0u8; 64];
        let n = i.encrypt(b"ping", &mut buf, now).unwrap();
        let plain = r.open(TransportHeader::new_checked(&mut buf[..n]).unwrap(), now).unwrap();
        assert_eq!(&plain[..4], b"ping");
        let n = r.encrypt(b"pong", &mut buf, now).unwrap();
        let plain = i.open(TransportHeader::new_checked(&mut buf[..n]).unwrap(), now).unwrap();
        assert_eq!(&plain[..4], b"pong");
    }

    /// Ci and Hi before any key is mixed in: HASH(CONSTRUCTION) and
    /// HASH(Ci || IDENTIFIER). The kernel ships these two values precomputed.
    #[test]
    fn initial_chaining_key_and_hash() {
        let (ck, h) = initial_chain();
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(hex(ck), "60e26daef327efc02ec335e2a025d2d016eb4206f87277f52d38d1988b78cd36");
        assert_eq!(hex(h), "2211b361081ac566691243db458ad5322d9c6c662293e8b70ee19c65ba079ef3");
    }

    #[test]
    fn mismatched_psk_fails_at_the_response() {
        let err = run_handshake(PresharedKey::generate(), PresharedKey::generate()).unwrap_err();
        assert_eq!(err, HandshakeError::Decryption);
    }

    #[test]
    fn initiation_for_someone_else_is_rejected() {
        let now = Instant::now();
        let a = StaticIdentity::new(PrivateKey::generate());
        let b = StaticIdentity::new(PrivateKey::generate());
        let c = StaticIdentity::new(PrivateKey::generate());
        let a_to_b = PeerKeys::new(&a, b.public, PresharedKey::default()).unwrap();
        let mut buf = [0u8; 148];
        let mut init = HandshakeInitiation::new_zeroed(&mut buf[..]).unwrap();
        create_initiation(&a, &a_to_b, 1, Tai64N::default(), now, &mut init).unwrap();
        let init = HandshakeInitiation::new_checked(&buf[..]).unwrap();
        assert_eq!(consume_initiation_static(&c, &init).unwrap_err(), HandshakeError::Decryption);
        let partial = consume_initiation_static(&b, &init).unwrap();
        let wrong_peer = PeerKeys::new(&b, c.public, PresharedKey::default()).unwrap();
        assert_eq!(partial.finish(&wrong_peer, &init).unwrap_err(), HandshakeError::UnknownPeer);
    }

    #[test]
    fn low_order_keys_are_refused() {
        let a = StaticIdentity::new(PrivateKey::generate());
        assert_eq!(
            PeerKeys::new(&a, PublicKey([0; 32]), PresharedKey::default()).unwrap_err(),
            HandshakeError::LowOrderPoint
        );
        let mut buf = [0u8; 148];
        HandshakeInitiation::new_zeroed(&mut buf[..]).unwrap(); // ephemeral all zeros
        let init = HandshakeInitiation::new_checked(&buf[..]).unwrap();
        assert_eq!(consume_initiation_static(&a, &init).unwrap_err(), HandshakeError::LowOrderPoint);
    }
}

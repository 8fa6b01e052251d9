//! Protocol constants, each with the whitepaper section it comes from.

use core::time::Duration;

/// Section 5.4: the Noise construction name, hashed into the initial chaining key.
pub const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
/// Section 5.4: the identifier mixed into the initial hash.
pub const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
/// Section 5.4.4: label for the MAC1 key.
pub const LABEL_MAC1: &[u8] = b"mac1----";
/// Section 5.4.7: label for the cookie encryption key.
pub const LABEL_COOKIE: &[u8] = b"cookie--";

/// Section 6.1: after this many messages a new handshake is initiated.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
/// Section 6.1: 2^64 - 2^13 - 1; no message is sent or accepted at or past this counter.
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
/// Section 6.1: the initiator rekeys a session this old when sending.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// Section 6.1: a session this old is neither used to send nor to receive.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// Section 6.1: give up retrying a handshake after this long.
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
/// Section 6.1: retransmit an unanswered initiation after this long (plus jitter).
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// Section 6.5: jitter added to each REKEY_TIMEOUT (up to a third of a second).
pub const REKEY_TIMEOUT_JITTER_MAX: Duration = Duration::from_millis(333);
/// Section 6.5: send a keepalive if we received data and sent nothing for this long.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Section 6.1: a received cookie, and the responder's cookie secret, live this long.
pub const COOKIE_REFRESH_TIME: Duration = Duration::from_secs(120);
/// Section 6.5: sessions and handshake state are wiped after 3 * REJECT_AFTER_TIME of silence.
pub const ZERO_KEYS_AFTER: Duration = Duration::from_secs(3 * 180);
/// Section 5.1: initiations from one peer closer together than this are dropped
/// (the "flood" protection of the reference implementations).
pub const INITIATIONS_MIN_INTERVAL: Duration = Duration::from_millis(50);

/// Section 5.4.6: plaintext is padded to a multiple of this.
pub const PADDING_MULTIPLE: usize = 16;
/// The Poly1305 authentication tag length.
pub const AEAD_TAG_LEN: usize = 16;
/// X25519 key length.
pub const KEY_LEN: usize = 32;
/// BLAKE2s-256 output.
pub const HASH_LEN: usize = 32;
/// Section 5.4.4: MAC1/MAC2 length (keyed BLAKE2s-128).
pub const MAC_LEN: usize = 16;
/// TAI64N timestamp length.
pub const TIMESTAMP_LEN: usize = 12;
/// XChaCha20 nonce length of a cookie reply.
pub const COOKIE_NONCE_LEN: usize = 24;

/// Replay window (RFC 6479 style): total bitmap size in bits, as in the kernel.
pub const REPLAY_BITMAP_BITS: usize = 8192;

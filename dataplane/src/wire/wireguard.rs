//! The four WireGuard messages (whitepaper section 5.4). Each starts with a
//! little-endian u32 whose low byte is the type and whose upper three bytes are
//! zero; handshake messages have an exact size, transport messages a minimum.

use super::{read_u32_le, write_u32_le, WireError};

/// Bytes covered by each MAC: everything before it.
mod field {
    use super::super::Field;
    pub const TYPE: Field = 0..4;

    pub mod initiation {
        use super::Field;
        pub const SENDER: Field = 4..8;
        pub const EPHEMERAL: Field = 8..40;
        pub const STATIC: Field = 40..88;
        pub const TIMESTAMP: Field = 88..116;
        pub const MAC1: Field = 116..132;
        pub const MAC2: Field = 132..148;
    }

    pub mod response {
        use super::Field;
        pub const SENDER: Field = 4..8;
        pub const RECEIVER: Field = 8..12;
        pub const EPHEMERAL: Field = 12..44;
        pub const EMPTY: Field = 44..60;
        pub const MAC1: Field = 60..76;
        pub const MAC2: Field = 76..92;
    }

    pub mod cookie {
        use super::Field;
        pub const RECEIVER: Field = 4..8;
        pub const NONCE: Field = 8..32;
        pub const COOKIE: Field = 32..64;
    }

    pub mod transport {
        use super::Field;
        pub const RECEIVER: Field = 4..8;
        pub const COUNTER: Field = 8..16;
        pub const PAYLOAD: usize = 16;
    }
}

pub const HANDSHAKE_INITIATION_LEN: usize = field::initiation::MAC2.end;
pub const HANDSHAKE_RESPONSE_LEN: usize = field::response::MAC2.end;
pub const COOKIE_REPLY_LEN: usize = field::cookie::COOKIE.end;
pub const TRANSPORT_HEADER_LEN: usize = field::transport::PAYLOAD;
/// The Poly1305 tag that follows every encrypted payload.
const TAG_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    HandshakeInitiation = 1,
    HandshakeResponse = 2,
    CookieReply = 3,
    Transport = 4,
}

impl MessageType {
    /// Reads the type word; the three reserved bytes must be zero.
    pub fn of(buf: &[u8]) -> Result<Self, WireError> {
        if buf.len() < 4 {
            return Err(WireError::Truncated);
        }
        match read_u32_le(buf, field::TYPE) {
            1 => Ok(Self::HandshakeInitiation),
            2 => Ok(Self::HandshakeResponse),
            3 => Ok(Self::CookieReply),
            4 => Ok(Self::Transport),
            _ => Err(WireError::UnknownType),
        }
    }
}

/// A classified WireGuard message.
#[derive(Debug)]
pub enum Message<T: AsRef<[u8]>> {
    HandshakeInitiation(HandshakeInitiation<T>),
    HandshakeResponse(HandshakeResponse<T>),
    CookieReply(CookieReply<T>),
    Transport(TransportHeader<T>),
}

impl<T: AsRef<[u8]>> Message<T> {
    /// Classifies a UDP payload. Never panics; any malformed input is an error.
    pub fn parse(buf: T) -> Result<Self, WireError> {
        Ok(match MessageType::of(buf.as_ref())? {
            MessageType::HandshakeInitiation => Self::HandshakeInitiation(HandshakeInitiation::new_checked(buf)?),
            MessageType::HandshakeResponse => Self::HandshakeResponse(HandshakeResponse::new_checked(buf)?),
            MessageType::CookieReply => Self::CookieReply(CookieReply::new_checked(buf)?),
            MessageType::Transport => Self::Transport(TransportHeader::new_checked(buf)?),
        })
    }
}

macro_rules! fixed_size_message {
    ($name:ident, $ty:expr, $len:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone)]
        pub struct $name<T: AsRef<[u8]>> {
            buffer: T,
        }

        impl<T: AsRef<[u8]>> $name<T> {
            pub const LEN: usize = $len;

            /// Checks the type word and the exact size.
            pub fn new_checked(buffer: T) -> Result<Self, WireError> {
                if MessageType::of(buffer.as_ref())? != $ty {
                    return Err(WireError::UnknownType);
                }
                if buffer.as_ref().len() != $len {
                    return Err(WireError::BadSize);
                }
                Ok(Self { buffer })
            }

            pub fn as_bytes(&self) -> &[u8] {
                self.buffer.as_ref()
            }

            pub fn into_inner(self) -> T {
                self.buffer
            }
        }

        impl<T: AsRef<[u8]> + AsMut<[u8]>> $name<T> {
            /// Stamps the type word into a buffer of exactly the message's size.
            pub fn new_zeroed(mut buffer: T) -> Result<Self, WireError> {
                let b = buffer.as_mut();
                if b.len() != $len {
                    return Err(WireError::BadSize);
                }
                b.fill(0);
                write_u32_le(b, field::TYPE, $ty as u32);
                Ok(Self { buffer })
            }
        }
    };
}

macro_rules! accessors {
    ($name:ident { $($get:ident, $get_mut:ident: $field:expr;)* } $(u32 { $($iget:ident, $iset:ident: $ifield:expr;)* })?) => {
        impl<T: AsRef<[u8]>> $name<T> {
            $(pub fn $get(&self) -> &[u8] { &self.buffer.as_ref()[$field] })*
            $($(pub fn $iget(&self) -> u32 { read_u32_le(self.buffer.as_ref(), $ifield) })*)?
        }
        impl<T: AsRef<[u8]> + AsMut<[u8]>> $name<T> {
            $(pub fn $get_mut(&mut self) -> &mut [u8] { &mut self.buffer.as_mut()[$field] })*
            $($(pub fn $iset(&mut self, v: u32) { write_u32_le(self.buffer.as_mut(), $ifield, v) })*)?
        }
    };
}

fixed_size_message!(HandshakeInitiation, MessageType::HandshakeInitiation, 148, "Handshake initiation, 148 bytes.");
accessors!(HandshakeInitiation {
    ephemeral, ephemeral_mut: field::initiation::EPHEMERAL;
    encrypted_static, encrypted_static_mut: field::initiation::STATIC;
    encrypted_timestamp, encrypted_timestamp_mut: field::initiation::TIMESTAMP;
    mac1, mac1_mut: field::initiation::MAC1;
    mac2, mac2_mut: field::initiation::MAC2;
} u32 {
    sender, set_sender: field::initiation::SENDER;
});

fixed_size_message!(HandshakeResponse, MessageType::HandshakeResponse, 92, "Handshake response, 92 bytes.");
accessors!(HandshakeResponse {
    ephemeral, ephemeral_mut: field::response::EPHEMERAL;
    encrypted_nothing, encrypted_nothing_mut: field::response::EMPTY;
    mac1, mac1_mut: field::response::MAC1;
    mac2, mac2_mut: field::response::MAC2;
} u32 {
    sender, set_sender: field::response::SENDER;
    receiver, set_receiver: field::response::RECEIVER;
});

fixed_size_message!(CookieReply, MessageType::CookieReply, 64, "Cookie reply, 64 bytes.");
accessors!(CookieReply {
    nonce, nonce_mut: field::cookie::NONCE;
    encrypted_cookie, encrypted_cookie_mut: field::cookie::COOKIE;
} u32 {
    receiver, set_receiver: field::cookie::RECEIVER;
});

/// The MAC-covered prefixes of the two handshake messages (mac1 covers
/// everything before it, mac2 everything before mac2).
pub trait MacCovered {
    fn before_mac1(&self) -> &[u8];
    fn before_mac2(&self) -> &[u8];
}

impl<T: AsRef<[u8]>> MacCovered for HandshakeInitiation<T> {
    fn before_mac1(&self) -> &[u8] {
        &self.buffer.as_ref()[..field::initiation::MAC1.start]
    }
    fn before_mac2(&self) -> &[u8] {
        &self.buffer.as_ref()[..field::initiation::MAC2.start]
    }
}

impl<T: AsRef<[u8]>> MacCovered for HandshakeResponse<T> {
    fn before_mac1(&self) -> &[u8] {
        &self.buffer.as_ref()[..field::response::MAC1.start]
    }
    fn before_mac2(&self) -> &[u8] {
        &self.buffer.as_ref()[..field::response::MAC2.start]
    }
}

/// A transport data message: 16-byte header, then the encrypted payload and its
/// 16-byte tag. `new_checked` guarantees at least header + tag bytes.
#[derive(Debug, Clone)]
pub struct TransportHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> TransportHeader<T> {
    /// The smallest transport message: an encrypted keepalive.
    pub const MIN_LEN: usize = TRANSPORT_HEADER_LEN + TAG_LEN;

    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if MessageType::of(buffer.as_ref())? != MessageType::Transport {
            return Err(WireError::UnknownType);
        }
        if buffer.as_ref().len() < Self::MIN_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }

    pub fn receiver(&self) -> u32 {
        read_u32_le(self.buffer.as_ref(), field::transport::RECEIVER)
    }

    pub fn counter(&self) -> u64 {
        let b = self.buffer.as_ref();
        u64::from_le_bytes(super::array(b, field::transport::COUNTER))
    }

    /// Ciphertext followed by the tag.
    pub fn encrypted(&self) -> &[u8] {
        &self.buffer.as_ref()[field::transport::PAYLOAD..]
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TransportHeader<T> {
    /// Writes a header into the first 16 bytes of `buffer`, which must also have
    /// room for at least a tag after it.
    pub fn emit(mut buffer: T, receiver: u32, counter: u64) -> Result<Self, WireError> {
        let b = buffer.as_mut();
        if b.len() < Self::MIN_LEN {
            return Err(WireError::Truncated);
        }
        write_u32_le(b, field::TYPE, MessageType::Transport as u32);
        write_u32_le(b, field::transport::RECEIVER, receiver);
        b[field::transport::COUNTER].copy_from_slice(&counter.to_le_bytes());
        Ok(Self { buffer })
    }

    pub fn encrypted_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::transport::PAYLOAD..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_paper() {
        assert_eq!(HANDSHAKE_INITIATION_LEN, 148);
        assert_eq!(HANDSHAKE_RESPONSE_LEN, 92);
        assert_eq!(COOKIE_REPLY_LEN, 64);
        assert_eq!(TRANSPORT_HEADER_LEN, 16);
    }

    #[test]
    fn classify_each_type() {
        let mut init = [0u8; 148];
        HandshakeInitiation::new_zeroed(&mut init[..]).unwrap().set_sender(7);
        match Message::parse(&init[..]).unwrap() {
            Message::HandshakeInitiation(m) => assert_eq!(m.sender(), 7),
            other => panic!("{other:?}"),
        }
        let mut resp = [0u8; 92];
        let mut r = HandshakeResponse::new_zeroed(&mut resp[..]).unwrap();
        r.set_sender(1);
        r.set_receiver(2);
        assert!(matches!(Message::parse(&resp[..]), Ok(Message::HandshakeResponse(_))));
        let mut cookie = [0u8; 64];
        CookieReply::new_zeroed(&mut cookie[..]).unwrap().set_receiver(9);
        assert!(matches!(Message::parse(&cookie[..]), Ok(Message::CookieReply(c)) if c.receiver() == 9));
        let mut data = [0u8; 48];
        TransportHeader::emit(&mut data[..], 0xdead_beef, 42).unwrap();
        match Message::parse(&data[..]).unwrap() {
            Message::Transport(t) => {
                assert_eq!((t.receiver(), t.counter(), t.encrypted().len()), (0xdead_beef, 42, 32))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_wrong_sizes_and_reserved_bits() {
        let mut init = [0u8; 149];
        init[0] = 1;
        assert_eq!(Message::parse(&init[..]).unwrap_err(), WireError::BadSize);
        init[1] = 1; // reserved byte set
        assert_eq!(Message::parse(&init[..148]).unwrap_err(), WireError::UnknownType);
        let mut data = [0u8; 31];
        data[0] = 4;
        assert_eq!(Message::parse(&data[..]).unwrap_err(), WireError::Truncated);
        assert_eq!(Message::parse(&[4u8, 0, 0][..]).unwrap_err(), WireError::Truncated);
        assert_eq!(Message::parse(&[5u8, 0, 0, 0][..]).unwrap_err(), WireError::UnknownType);
    }
}

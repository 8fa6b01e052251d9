//! `wgxdp genkey` / `wgxdp pubkey`, compatible with `wg genkey` / `wg pubkey`.

use std::io::{Read, Write};
use wgxdp_dataplane::noise::PrivateKey;

/// Writes a new base64 private key and a newline.
pub fn genkey(out: &mut impl Write) -> anyhow::Result<()> {
    writeln!(out, "{}", &*PrivateKey::generate().to_base64_secret())?;
    Ok(())
}

/// Reads a base64 private key and writes its public key.
pub fn pubkey(input: &mut impl Read, out: &mut impl Write) -> anyhow::Result<()> {
    let mut text = zeroize::Zeroizing::new(String::new());
    input.take(1024).read_to_string(&mut text)?;
    let key: PrivateKey = text.trim().parse().map_err(|e| anyhow::anyhow!("invalid private key on stdin: {e}"))?;
    writeln!(out, "{}", key.public_key())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genkey_then_pubkey_matches_the_library() {
        let mut private = Vec::new();
        genkey(&mut private).unwrap();
        let text = String::from_utf8(private.clone()).unwrap();
        assert_eq!(text.trim().len(), 44);
        let mut public = Vec::new();
        pubkey(&mut &private[..], &mut public).unwrap();
        let expected = text.trim().parse::<PrivateKey>().unwrap().public_key().to_base64();
        assert_eq!(String::from_utf8(public).unwrap().trim(), expected);
    }

    #[test]
    fn rfc7748_key_gives_the_known_public_key() {
        // RFC 7748 section 6.1, Alice: private 77076d0a…, public 8520f009…, in base64.
        let mut public = Vec::new();
        pubkey(&mut &b"dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=\n"[..], &mut public).unwrap();
        assert_eq!(String::from_utf8(public).unwrap().trim(), "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=");
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let err = pubkey(&mut &b"not a key"[..], &mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("invalid private key"), "{err}");
    }
}

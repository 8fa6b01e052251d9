//! The string types of the API as the OpenAPI document names them. Each is
//! a component with the exact rule the server enforces: a `pattern` where a
//! regular expression says it all (names, regions, keys), otherwise a named
//! `format` whose description is the rule (networks, addresses, port ranges;
//! the API fuzzer's hooks generate them). Request fields refer to these, so
//! one rule is written once in the document.
//!
//! What no schema can say (two networks that overlap, a firewall rule whose
//! source and destination are of different IP versions, a port on an `icmp`
//! rule) is in the fields' descriptions; overlaps answer 409.

use utoipa::openapi::{ObjectBuilder, RefOr, Schema, SchemaFormat, SchemaType};

/// Printable text with at least one character that is not white space: no
/// control characters (U+0000-U+001F, U+007F-U+009F).
pub const NAME_PATTERN: &str = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$";

/// Standard base64 of 32 bytes (44 characters, one `=`, canonical last digit).
pub const KEY_PATTERN: &str = "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$";

struct Text {
    description: &'static str,
    format: Option<&'static str>,
    pattern: Option<&'static str>,
    length: Option<(usize, usize)>,
    /// None where a field's own example says it better (an example here is
    /// combined with other fields' examples, which may not fit it).
    example: Option<&'static str>,
}

fn schema(t: Text) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(SchemaType::String)
        .description(Some(t.description))
        .format(t.format.map(|f| SchemaFormat::Custom(f.to_owned())))
        .pattern(t.pattern)
        .min_length(t.length.map(|l| l.0))
        .max_length(t.length.map(|l| l.1))
        .example(t.example.map(serde_json::Value::from))
        .into()
}

macro_rules! string_type {
    ($(#[$doc:meta])* $name:ident, $text:expr) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub struct $name;

        impl<'s> utoipa::ToSchema<'s> for $name {
            fn schema() -> (&'s str, RefOr<Schema>) {
                (stringify!($name), schema($text))
            }
        }
    };
}

string_type!(
    /// A gateway's name.
    GatewayName,
    Text {
        description: "2-40 characters, not all white space, no control characters; kept as given.",
        format: None,
        pattern: Some(NAME_PATTERN),
        length: Some((2, 40)),
        example: Some("site-a-vpn"),
    }
);

string_type!(
    /// A firewall rule's name.
    RuleName,
    Text {
        description: "1-64 characters, not all white space, no control characters; kept as given.",
        format: None,
        pattern: Some(NAME_PATTERN),
        length: Some((1, 64)),
        example: Some("Allow ICMP"),
    }
);

string_type!(
    /// A region identifier.
    Region,
    Text {
        description: "1-64 characters of a-z, 0-9 and `-`.",
        format: None,
        pattern: Some("^[a-z0-9-]+$"),
        length: Some((1, 64)),
        example: Some("us-east"),
    }
);

string_type!(
    /// A WireGuard key (public or pre-shared).
    WireguardKey,
    Text {
        description: "A WireGuard key: standard base64 of 32 bytes, as `wg genkey`, `wg pubkey` and `wg genpsk` \
                      print it.",
        format: None,
        pattern: Some(KEY_PATTERN),
        length: Some((44, 44)),
        example: Some("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="),
    }
);

string_type!(
    /// Any IP network (firewall rule sources and destinations).
    Network,
    Text {
        description: "Format `cidr`: an IPv4 or IPv6 network in CIDR notation with the host bits clear, e.g. \
                      `10.1.0.0/16` or `fd00::/64` (`0.0.0.0/0`: every IPv4 address, `::/0`: every IPv6 one).",
        format: Some("cidr"),
        pattern: None,
        length: None,
        example: None,
    }
);

string_type!(
    /// A network of this site the remote site may reach.
    LocalNetwork,
    Text {
        description: "Format `local-network`: an IPv4 or IPv6 network in CIDR notation with the host bits clear, \
                      not inside a range no tunnel carries: 0.0.0.0/8, \
                      127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/4, 240.0.0.0/4, ::/128, ::1/128, ::ffff:0:0/96, \
                      fe80::/10, ff00::/8, fec0::/10 (a wider network, even 0.0.0.0/0, is accepted).",
        format: Some("local-network"),
        pattern: None,
        length: None,
        example: Some("10.50.0.0/24"),
    }
);

string_type!(
    /// A remote site's network, routed into its tunnel.
    RemoteNetwork,
    Text {
        description: "Format `remote-network`: an IPv4 or IPv6 network in CIDR notation with the host bits \
                      clear, not a default route (prefix length 1 or more) and \
                      overlaps none of 0.0.0.0/8, 127.0.0.0/8, 169.254.0.0/16, 224.0.0.0/4, 240.0.0.0/4, ::/128, \
                      ::1/128, ::ffff:0:0/96, fe80::/10, ff00::/8, fec0::/10. A network that overlaps another remote \
                      network (of this gateway or another), a local network of this gateway, this site's network \
                      or an address of the gateway host is a conflict (409).",
        format: Some("remote-network"),
        pattern: None,
        length: None,
        example: Some("10.0.0.0/16"),
    }
);

string_type!(
    /// Where the remote peer is.
    PeerAddress,
    Text {
        description: "Format `peer-address`: an IPv4 or IPv6 address a peer can have: not unspecified (0.0.0.0, \
                      ::), not multicast, not 255.255.255.255.",
        format: Some("peer-address"),
        pattern: None,
        length: None,
        example: Some("203.0.113.200"),
    }
);

string_type!(
    /// A destination port or range.
    PortRange,
    Text {
        description: "Format `port-range`: a port `N` or a range `N-M` of ports in decimal, 1 <= N <= M <= \
                      65535.",
        format: Some("port-range"),
        pattern: None,
        length: None,
        example: Some("8000-8080"),
    }
);

string_type!(
    /// Where a webhook's deliveries go.
    WebhookUrl,
    Text {
        description: "Format `webhook-url`: an absolute `http` or `https` URL (RFC 3986, as the WHATWG URL \
                      standard parses it) with a host, no user name or password and no fragment; at most 2048 \
                      characters.",
        format: Some("webhook-url"),
        pattern: None,
        length: None,
        example: Some("https://hooks.example.com/wgxdp"),
    }
);

string_type!(
    /// A wg-quick `[Peer]` section.
    WgQuickPeer,
    Text {
        description: "Format `wg-quick-peer`: the text of one wg-quick `[Peer]` section, at most 8192 bytes. Lines \
                      are `Key = Value` (keys case-insensitive; `#` starts a comment): `PublicKey` (a \
                      `WireguardKey`, required), `Endpoint` (`IPv4:port` or `[IPv6]:port`, a `PeerAddress` and a \
                      port 1-65535, required), `AllowedIPs` (comma-separated `RemoteNetwork`s or bare addresses, \
                      repeatable, 1-64 in all), `PresharedKey` (a `WireguardKey`) and `PersistentKeepalive` \
                      (`off` or 0-65535 seconds), each once. No `[Interface]`, no second `[Peer]`, no other keys.",
        format: Some("wg-quick-peer"),
        pattern: None,
        // (Bytes, not characters: stated in the description.)
        length: None,
        example: None,
    }
);

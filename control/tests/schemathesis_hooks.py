"""Schemathesis hooks for the wgxdp API (loaded through SCHEMATHESIS_HOOKS).

They teach the fuzzer what the OpenAPI document states in words but JSON
Schema cannot express:
- the string formats the document names (`cidr`, `local-network`,
  `remote-network`, `peer-address`, `port-range`, `webhook-url`, `wg-quick-peer`), each generated exactly as
  its schema's description defines it;
- a list cursor is opaque: schema-valid data never invents one (an invented
  cursor is a 400 by design; negative cases still send them);
- an `Idempotency-Key` names one request: schema-valid cases get a fresh one
  each (the generator would reuse `0` for different requests, which the
  document answers with 422).
Overlapping networks need no hook: the document answers them with 409.
"""

import base64
import ipaddress
import re
import uuid
from collections.abc import Mapping, MutableMapping

import schemathesis
from hypothesis import strategies as st

SPECIAL = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/128",
        "::1/128",
        "::ffff:0:0/96",
        "fe80::/10",
        "ff00::/8",
        "fec0::/10",
    )
]


def _network(bits, lengths, network):
    """A network of `bits`-bit addresses: a random address, masked to a drawn length."""
    return st.tuples(st.integers(0, 2**bits - 1), lengths).map(
        lambda p: network((p[0] >> (bits - p[1]) << (bits - p[1]), p[1]))
    )


def networks(min_v4=0, min_v6=0):
    return st.one_of(
        _network(32, st.integers(min_v4, 32), ipaddress.IPv4Network),
        _network(128, st.integers(min_v6, 128), ipaddress.IPv6Network),
    )


def inside_special(net):
    return any(s.version == net.version and net.subnet_of(s) for s in SPECIAL)


def overlaps_special(net):
    return any(s.version == net.version and net.overlaps(s) for s in SPECIAL)


cidr = networks().map(str)
local_network = networks().filter(lambda n: not inside_special(n)).map(str)
remote_network = networks(min_v4=8, min_v6=16).filter(lambda n: not overlaps_special(n)).map(str)


def _peer_ok(a):
    return not (a.is_unspecified or a.is_multicast or a == ipaddress.IPv4Address("255.255.255.255"))


peer_address = (
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).filter(_peer_ok).map(str)
)


def _ports(pair):
    a, b = sorted(pair)
    return str(a) if a == b else f"{a}-{b}"


port_range = st.one_of(
    st.integers(1, 65535).map(str),
    st.tuples(st.integers(1, 65535), st.integers(1, 65535)).map(_ports),
)

# Receivers on a documentation network (192.0.2.0/24) that the test's
# namespace has no route to: deliveries fail at once and are retried.
webhook_url = st.builds(
    "{}://192.0.2.{}:{}/{}".format,
    st.sampled_from(["http", "https"]),
    st.integers(1, 254),
    st.integers(1, 65535),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_/", max_size=40),
)


def _endpoint(address, port):
    ip = ipaddress.ip_address(address)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _key(raw):
    return base64.b64encode(raw).decode()


def _section(public, address, port, allowed, psk, keepalive):
    lines = ["[Peer]", f"PublicKey = {_key(public)}", f"Endpoint = {_endpoint(address, port)}"]
    lines.append("AllowedIPs = " + ", ".join(allowed))
    if psk is not None:
        lines.append(f"PresharedKey = {_key(psk)}")
    if keepalive is not None:
        lines.append(f"PersistentKeepalive = {keepalive}")
    return "\n".join(lines) + "\n"


# One wg-quick [Peer] section as `WgQuickPeer` describes it.
wg_quick_peer = st.builds(
    _section,
    st.binary(min_size=32, max_size=32),
    peer_address,
    st.integers(1, 65535),
    st.lists(remote_network, min_size=1, max_size=3),
    st.one_of(st.none(), st.binary(min_size=32, max_size=32)),
    st.one_of(st.none(), st.just("off"), st.integers(0, 65535)),
)

schemathesis.openapi.format("cidr", cidr)
schemathesis.openapi.format("wg-quick-peer", wg_quick_peer)
schemathesis.openapi.format("webhook-url", webhook_url)
schemathesis.openapi.format("local-network", local_network)
schemathesis.openapi.format("remote-network", remote_network)
schemathesis.openapi.format("peer-address", peer_address)
schemathesis.openapi.format("port-range", port_range)


def _positive(case):
    meta = getattr(case, "meta", None)
    return meta is None or not meta.generation.mode.is_negative


@schemathesis.hook
def filter_case(context, case):
    return not (_positive(case) and isinstance(case.query, Mapping) and "cursor" in case.query)


VALID_IDEMPOTENCY_KEY = re.compile(r"^[!-~]{1,255}$")


@schemathesis.hook
def before_call(context, case, kwargs):
    """A fresh valid `Idempotency-Key` for each request that has a valid one.

    Every phase calls this hook. A malformed key stays, so a negative case
    stays negative.
    """
    headers = case.headers
    if not isinstance(headers, MutableMapping):
        return
    for name, value in list(headers.items()):
        if name.lower() == "idempotency-key" and isinstance(value, str) and VALID_IDEMPOTENCY_KEY.match(value):
            headers[name] = str(uuid.uuid4())

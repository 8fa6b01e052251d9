//! Firewall rules in their text form: how API clients write them (the
//! seed-004 shape plus an action), how the store keeps them and how the API
//! and the CLI show them. One parser turns the text into the data plane's
//! `FirewallRule`, with the `FromStr` impls of `wgxdp_dataplane::policy` for
//! every value, so the API, the CLI and the store accept exactly the same
//! rules. `from_rule` gives the normalised text back: parsing it again gives
//! the same rule.

use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::openapi::{RefOr, Schema};
use utoipa::ToSchema;
use wgxdp_dataplane::policy::{FirewallRule, PortRange, RuleAction, RuleProtocol, MAX_RULE_NAME};
use wgxdp_dataplane::table::IpPrefix;

/// A firewall rule on traffic entering from the remote site. Rules are
/// evaluated in order and the first match wins; absent optional fields match
/// everything.
/// Its schema (`rule_schema`) says every rule, across fields too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallRuleText {
    /// What the rule is for (1-64 characters, no control characters). Names
    /// need not be unique: rules are told apart by their position.
    pub name: Option<String>,
    /// `tcp`, `udp`, `icmp` (ICMPv6 for IPv6 packets) or `any`.
    pub protocol: Option<String>,
    /// Destination port `N` or range `N-M` (1-65535), TCP and UDP rules only
    /// (for `icmp` and `any`: absent, or the full range `1-65535`). Absent:
    /// every port. Responses leave it out when the rule has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Source network on the remote side (CIDR, host bits clear). Absent:
    /// any source. An IPv4 network only matches IPv4 packets (and IPv6 only
    /// IPv6): `0.0.0.0/0` means every IPv4 source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Destination network on this side (CIDR, host bits clear). Absent:
    /// any destination inside the gateway's local networks. Of the same IP
    /// version as `source` when both are given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// `allow` (default) or `deny`. Responses always carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
}

/// What a rule does with the traffic it matches (and `firewall_default` with
/// the traffic no rule matches): `allow` (the default) or `deny`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FirewallAction {
    Allow,
    Deny,
}

impl<'s> ToSchema<'s> for FirewallRuleText {
    /// Either of two shapes: a `tcp`/`udp` rule (any port range) or an
    /// `icmp`/`any` rule (no port but the full range): so a schema-valid
    /// rule is a rule the server accepts.
    fn schema() -> (&'s str, RefOr<Schema>) {
        let component = |name: &str| json!({"$ref": format!("#/components/schemas/{name}")});
        // An optional field may also be null (the same as leaving it out).
        let optional = |schema: serde_json::Value| json!({"nullable": true, "allOf": [schema]});
        let no_ports = json!({"type": "string", "enum": ["1-65535"],
            "description": "icmp and any rules match no ports: leave `port` out, or give the full range."});
        let shapes: Vec<_> = [(["tcp", "udp"], component("PortRange")), (["icmp", "any"], no_ports)]
            .into_iter()
            .map(|(protocols, port)| {
                json!({
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["name", "protocol"],
                    "properties": {
                        "name": component("RuleName"),
                        "protocol": {"type": "string", "enum": protocols},
                        "port": optional(port),
                        "source": optional(component("Network")),
                        "destination": optional(component("Network")),
                        "action": optional(component("FirewallAction")),
                    },
                })
            })
            .collect();
        let schema = json!({
            "description": "A firewall rule on traffic entering from the remote site. Rules are evaluated in \
                order and the first match wins; absent optional fields match everything. `name`: what the rule \
                is for (names need not be unique). `protocol`: `tcp`, `udp`, `icmp` (ICMPv6 for IPv6 packets) \
                or `any`. `port`: destination port or range, tcp and udp rules only (absent: every port). \
                `source`: network on the remote side (absent: any); `destination`: network on this side \
                (absent: any inside the gateway's local networks); an IPv4 network only matches IPv4 packets \
                (and IPv6 only IPv6), so a rule whose source and destination are of different versions never \
                matches. `action`: `allow` (default) or `deny`. Responses leave out `port`, \
                `source` and `destination` when a rule has none and always carry `action`.",
            "example": {"name": "ssh from the office", "protocol": "tcp", "port": "22",
                "source": "10.1.0.0/16", "destination": "10.50.0.0/24", "action": "allow"},
            "anyOf": shapes,
        });
        ("FirewallRuleText", serde_json::from_value(schema).unwrap_or_else(|_| RefOr::T(Schema::default())))
    }
}

/// Why a rule is refused: the field of the rule at fault and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// `name`, `protocol`, `port`, `source`, `destination` or `action`.
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn refuse(field: &'static str, message: impl Into<String>) -> RuleError {
    RuleError { field, message: message.into() }
}

/// `allow` or `deny` (a rule's action, a gateway's `firewall_default`).
pub fn parse_action(s: &str) -> Result<RuleAction, String> {
    s.parse()
}

fn parse_name(name: Option<&str>) -> Result<String, RuleError> {
    let name = name.ok_or_else(|| refuse("name", "is required (1-64 characters saying what the rule is for)"))?;
    let chars = name.chars().count();
    if !(1..=MAX_RULE_NAME).contains(&chars) {
        return Err(refuse("name", format!("must be 1-{MAX_RULE_NAME} characters (got {chars})")));
    }
    if name.chars().any(char::is_control) {
        return Err(refuse("name", "must not contain control characters"));
    }
    if name.chars().all(char::is_whitespace) {
        return Err(refuse("name", "must not be all white space"));
    }
    Ok(name.to_owned())
}

fn parse_network(field: &'static str, s: Option<&str>) -> Result<Option<IpPrefix>, RuleError> {
    s.map(|s| {
        s.parse::<IpPrefix>().map_err(|e| {
            refuse(field, format!("`{s}` is not a valid CIDR block ({e}); use e.g. 10.1.0.0/16 or fd00::/64"))
        })
    })
    .transpose()
}

impl FirewallRuleText {
    /// The rule this text describes, or the first field at fault.
    pub fn to_rule(&self) -> Result<FirewallRule, RuleError> {
        let name = parse_name(self.name.as_deref())?;
        let protocol: RuleProtocol = self
            .protocol
            .as_deref()
            .ok_or_else(|| refuse("protocol", "is required: tcp, udp, icmp or any"))?
            .parse()
            .map_err(|e: String| refuse("protocol", e))?;
        let ports = match self.port.as_deref() {
            None => None,
            Some(p) => {
                let range: PortRange = p.parse().map_err(|e: String| refuse("port", e))?;
                if !protocol.has_ports() && range != PortRange::ALL {
                    return Err(refuse(
                        "port",
                        format!(
                            "{} rules match no ports; leave `port` out (or give the full range 1-65535), or use tcp \
                             or udp",
                            protocol.as_str()
                        ),
                    ));
                }
                Some(range)
            }
        };
        let source = parse_network("source", self.source.as_deref())?;
        let destination = parse_network("destination", self.destination.as_deref())?;
        let action = match self.action.as_deref() {
            None => RuleAction::Allow,
            Some(a) => parse_action(a).map_err(|e| refuse("action", e))?,
        };
        Ok(FirewallRule { name, protocol, ports, source, destination, action })
    }

    /// The normalised text of `rule` (every optional field it lacks left out).
    pub fn from_rule(rule: &FirewallRule) -> Self {
        Self {
            name: Some(rule.name.clone()),
            protocol: Some(rule.protocol.as_str().to_owned()),
            port: rule.ports.map(|p| p.to_string()),
            source: rule.source.map(|p| p.to_string()),
            destination: rule.destination.map(|p| p.to_string()),
            action: Some(rule.action.as_str().to_owned()),
        }
    }
}

/// Parses rules in order; on failure, the index of the first bad rule.
pub fn parse_rules(texts: &[FirewallRuleText]) -> Result<Vec<FirewallRule>, (usize, RuleError)> {
    texts.iter().enumerate().map(|(i, t)| t.to_rule().map_err(|e| (i, e))).collect()
}

/// The normalised text of each rule, in order.
pub fn rule_texts(rules: &[FirewallRule]) -> Vec<FirewallRuleText> {
    rules.iter().map(FirewallRuleText::from_rule).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(json: serde_json::Value) -> FirewallRuleText {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn the_seed_example_is_accepted_and_echoed_as_given() {
        let seed = serde_json::json!({"name":"Allow ICMP","protocol":"icmp","port":"1-65535",
            "source":"0.0.0.0/0","destination":"0.0.0.0/0"});
        let rule = text(seed.clone()).to_rule().unwrap();
        assert_eq!(rule.protocol, RuleProtocol::Icmp);
        assert_eq!(rule.ports, Some(PortRange::ALL));
        assert_eq!(rule.action, RuleAction::Allow);
        let mut echoed = serde_json::to_value(FirewallRuleText::from_rule(&rule)).unwrap();
        assert_eq!(echoed["action"], "allow", "the default action is spelled out");
        echoed.as_object_mut().unwrap().remove("action");
        assert_eq!(echoed, seed);
    }

    #[test]
    fn normalised_text_parses_back_to_the_same_rule() {
        for json in [
            serde_json::json!({"name":" ssh ","protocol":"tcp","port":"22","source":"10.1.0.0/16","action":"deny"}),
            serde_json::json!({"name":"web","protocol":"udp","port":"8000-8080","destination":"fd00::/64"}),
            serde_json::json!({"name":"all","protocol":"any"}),
        ] {
            let rule = text(json).to_rule().unwrap();
            let again = FirewallRuleText::from_rule(&rule);
            assert_eq!(again.to_rule().unwrap(), rule);
            let stored = serde_json::to_string(&again).unwrap();
            assert_eq!(serde_json::from_str::<FirewallRuleText>(&stored).unwrap(), again);
        }
        let rule = text(serde_json::json!({"name":" ssh ","protocol":"tcp","port":"22"})).to_rule().unwrap();
        assert_eq!(rule.name, " ssh ", "a name is kept as given");
        // Source and destination of different versions: a rule that never matches, as documented.
        let never =
            text(serde_json::json!({"name":"x","protocol":"tcp","source":"10.0.0.0/8","destination":"fd00::/64"}));
        assert!(never.to_rule().is_ok());
        let absent = serde_json::to_value(FirewallRuleText::from_rule(&rule)).unwrap();
        assert!(absent.get("source").is_none() && absent.get("destination").is_none(), "{absent}");
    }

    #[test]
    fn every_bad_field_is_named_with_what_is_accepted() {
        let long = "n".repeat(65);
        let cases = [
            (serde_json::json!({"protocol":"tcp"}), "name", "required"),
            (serde_json::json!({"name":"","protocol":"tcp"}), "name", "1-64"),
            (serde_json::json!({"name":long,"protocol":"tcp"}), "name", "1-64"),
            (serde_json::json!({"name":"a\u{7}b","protocol":"tcp"}), "name", "control"),
            (serde_json::json!({"name":"x"}), "protocol", "tcp, udp, icmp or any"),
            (serde_json::json!({"name":"x","protocol":"TCP"}), "protocol", "tcp, udp, icmp or any"),
            (serde_json::json!({"name":"x","protocol":"tcp","port":"0"}), "port", "N-M"),
            (serde_json::json!({"name":"x","protocol":"tcp","port":"70000"}), "port", "65535"),
            (serde_json::json!({"name":"x","protocol":"tcp","port":"90-80"}), "port", "above"),
            (serde_json::json!({"name":"x","protocol":"tcp","port":"http"}), "port", "N-M"),
            (serde_json::json!({"name":"x","protocol":"icmp","port":"22"}), "port", "match no ports"),
            (serde_json::json!({"name":"x","protocol":"any","port":"1-1024"}), "port", "1-65535"),
            (serde_json::json!({"name":"x","protocol":"tcp","source":"10.1.2.3/16"}), "source", "10.1.0.0/16"),
            (serde_json::json!({"name":"x","protocol":"tcp","destination":"banana"}), "destination", "CIDR"),
            (serde_json::json!({"name":"  ","protocol":"tcp"}), "name", "white space"),
            (serde_json::json!({"name":"x","protocol":"tcp","action":"drop"}), "action", "allow or deny"),
        ];
        for (json, field, says) in cases {
            let err = text(json.clone()).to_rule().unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
            assert!(err.message.contains(says), "{json}: `{err}` lacks `{says}`");
        }
        let err = parse_rules(&[text(serde_json::json!({"name":"ok","protocol":"any"})), FirewallRuleText::default()])
            .unwrap_err();
        assert_eq!((err.0, err.1.field), (1, "name"));
    }

    #[test]
    fn unknown_rule_fields_are_refused() {
        assert!(serde_json::from_str::<FirewallRuleText>(r#"{"name":"x","protocol":"tcp","ports":"22"}"#).is_err());
    }
}

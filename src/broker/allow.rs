//! Which broker addresses a TaskQueue may name (`run --broker-allow`, the chart's `brokerAllow`)
//! (pure).
//!
//! A broker URL comes from a tenant's Secret, and the operator connects wherever it says: without
//! a limit, anyone who may create a TaskQueue makes the operator dial any address it can reach.
//! Each rule is `HOST:PORT`: HOST an exact name, `*.suffix` (any name under it), an IP address
//! or a CIDR (`10.0.0.0/8`, `[fd00::/8]`), or `*`; PORT a number or `*`. Names are matched as
//! written in the URL, before DNS. The Redis server of a plain URL and every sentinel of a
//! `sentinel://` URL must match a rule. No rule: every address is allowed.

use std::net::IpAddr;

use super::url::bracketed;
use super::BrokerEndpoint;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BrokerAllow(Vec<Rule>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    host: Host,
    port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Host {
    Any,
    Name(String),
    /// `*.example.com`: stored as `.example.com`.
    Suffix(String),
    Net(IpAddr, u8),
}

impl BrokerAllow {
    /// `redis.prod.svc:6379,*.cache.internal:*,10.0.0.0/8:6379` (or empty: everything).
    pub fn parse(list: &str) -> Result<Self, String> {
        let rules = list.split(',').map(str::trim).filter(|r| !r.is_empty()).map(rule).collect::<Result<_, _>>()?;
        Ok(BrokerAllow(rules))
    }

    /// None when every address `endpoint` dials is allowed; else the first that is not.
    pub fn refused(&self, endpoint: &BrokerEndpoint) -> Option<String> {
        if self.0.is_empty() {
            return None;
        }
        let mut addresses = vec![(endpoint.host.as_str(), endpoint.port)];
        addresses.extend(endpoint.sentinels.iter().map(|(h, p)| (h.as_str(), *p)));
        addresses.into_iter().find(|(h, p)| !self.permits(h, *p)).map(|(h, p)| format!("{}:{p}", bracketed(h)))
    }

    fn permits(&self, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let ip: Option<IpAddr> = host.parse().ok();
        self.0.iter().any(|r| {
            r.port.is_none_or(|p| p == port)
                && match &r.host {
                    Host::Any => true,
                    Host::Name(n) => *n == host,
                    Host::Suffix(s) => host.ends_with(s.as_str()) && host.len() > s.len(),
                    Host::Net(net, bits) => ip.is_some_and(|ip| in_net(ip, *net, *bits)),
                }
        })
    }
}

fn rule(text: &str) -> Result<Rule, String> {
    let bad = |why: &str| {
        format!("{text:?} is not a broker rule ({why}); write HOST:PORT, e.g. redis.prod.svc:6379, *.cache.internal:*, 10.0.0.0/8:6379")
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(|| bad("no :PORT"))?;
    let port = match port {
        "*" => None,
        p => Some(p.parse::<u16>().map_err(|_| bad("the port is not a number or *"))?),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let host = if host == "*" {
        Host::Any
    } else if let Some(suffix) = host.strip_prefix("*.") {
        Host::Suffix(format!(".{suffix}"))
    } else if let Some((net, bits)) = host.split_once('/') {
        let net: IpAddr = net.parse().map_err(|_| bad("not an IP network"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits: u8 = bits.parse().ok().filter(|b| *b <= max).ok_or_else(|| bad("bad prefix length"))?;
        Host::Net(net, bits)
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        Host::Net(ip, if ip.is_ipv4() { 32 } else { 128 })
    } else if host.is_empty() || host.contains('*') {
        return Err(bad("a * only as the whole host or as *.suffix"));
    } else {
        Host::Name(host)
    };
    Ok(Rule { host, port })
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - u32::from(bits)) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - u32::from(bits)) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(allow: &str, url: &str) -> Option<String> {
        let endpoint = BrokerEndpoint::resolve(url, Some("mymaster"), None).unwrap();
        BrokerAllow::parse(allow).unwrap().refused(&endpoint)
    }

    #[test]
    fn only_the_addresses_a_rule_names() {
        let allow = "redis.prod.svc:6379, *.cache.internal:*, 10.0.0.0/8:6379, [fd00::/8]:6380";
        for ok in [
            "redis://redis.prod.svc:6379/0",
            "redis://REDIS.prod.svc/1",
            "rediss://a.b.cache.internal:7000/0",
            "redis://10.1.2.3:6379/0",
            "redis://[fd00::1]:6380/0",
            "sentinel://10.0.0.1:6379;sentinel://10.0.0.2:6379",
        ] {
            assert_eq!(refused(allow, ok), None, "{ok}");
        }
        for (no, first) in [
            ("redis://redis.prod.svc:6380/0", "redis.prod.svc:6380"),
            ("redis://cache.internal:6379/0", "cache.internal:6379"),
            ("redis://evil.cache.internal.attacker.io:6379/0", "evil.cache.internal.attacker.io:6379"),
            ("redis://11.0.0.1:6379/0", "11.0.0.1:6379"),
            ("redis://169.254.169.254:80/0", "169.254.169.254:80"),
            ("redis://[fe80::1]:6380/0", "[fe80::1]:6380"),
            ("sentinel://10.0.0.1:6379;sentinel://192.168.0.9:6379", "192.168.0.9:6379"),
        ] {
            assert_eq!(refused(allow, no).as_deref(), Some(first), "{no}");
        }
        assert_eq!(refused("", "redis://anything:1/0"), None, "no rule: everything");
        assert_eq!(refused("*:6379", "redis://anything/0"), None);
    }

    #[test]
    fn bad_rules_say_how_to_write_one() {
        for bad in ["redis.prod.svc", "host:port", "10.0.0.0/33:6379", "red*s:6379", ":6379"] {
            let e = BrokerAllow::parse(bad).unwrap_err();
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
    }
}

//! Command-line values both binaries take: labels, and the coordinator's address with the one
//! environment variable that names it.

use crate::defaults;

/// The environment variable holding the coordinator's URL, read by both binaries.
pub const COORDINATOR_ENV: &str = "KOWALSKI_COORDINATOR";
/// The name the coordinator's client subcommands used before; still accepted.
pub const LEGACY_COORDINATOR_ENV: &str = "COORDINATOR_ADDR";

/// The coordinator URL when neither the flag nor [`COORDINATOR_ENV`] gives one: the legacy
/// variable if set, else the default.
pub fn default_coordinator_url() -> String {
    std::env::var(LEGACY_COORDINATOR_ENV)
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| defaults::COORDINATOR_URL.to_string())
}

/// A coordinator URL: it needs its scheme, which is easy to forget.
pub fn parse_coordinator_url(s: &str) -> Result<String, String> {
    parse_http_url(s)
}

/// An `http://` or `https://` URL (a coordinator, an LLM backend).
pub fn parse_http_url(s: &str) -> Result<String, String> {
    if s.starts_with("http://") || s.starts_with("https://") {
        Ok(s.to_string())
    } else {
        Err(format!("'{s}' has no scheme; write it as http://{s}"))
    }
}

/// The `HOST:PORT` of a URL such as `http://HOST:PORT/path`.
pub fn url_host_port(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

/// True when `HOST:PORT` is reachable from this machine only.
pub fn is_loopback(host_port: &str) -> bool {
    let host = host_port
        .rsplit_once(':')
        .map_or(host_port, |(host, _)| host);
    let host = host.trim_matches(|c| c == '[' || c == ']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A `key=value` label.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label '{s}' is not key=value")),
    }
}

/// A size such as `512M`, `2G`, `64k` or a number of bytes (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let shift = match unit
        .trim()
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        _ => {
            return Err(format!(
                "'{s}' is not a size: write bytes, or a number with k, M or G"
            ));
        }
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size: write bytes, or a number with k, M or G"))?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
    }

    #[test]
    fn a_url_without_scheme_is_refused_with_the_fix() {
        assert_eq!(
            parse_coordinator_url("10.0.0.2:50051").unwrap_err(),
            "'10.0.0.2:50051' has no scheme; write it as http://10.0.0.2:50051"
        );
        assert!(parse_coordinator_url("http://10.0.0.2:50051").is_ok());
    }
}

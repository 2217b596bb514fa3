//! Join tokens: `kx1.SECRET.FINGERPRINT`. The secret lets a device join once; the fingerprint
//! of the cluster's authority lets the device check, before it says anything, that it talks to
//! the real coordinator (as `kubeadm join --discovery-token-ca-cert-hash` does).

use std::fmt;

use subtle::ConstantTimeEq;

use super::random_hex;

const PREFIX: &str = "kx1";

/// A join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub secret: String,
    /// SHA-256 of the cluster authority's certificate, hex.
    pub authority: String,
}

impl JoinToken {
    /// A token with a fresh secret for the authority with `fingerprint`.
    pub fn new(fingerprint: &str) -> JoinToken {
        JoinToken {
            secret: random_hex(16),
            authority: fingerprint.to_string(),
        }
    }

    /// Reads a token as `coordinator token` prints it.
    pub fn parse(text: &str) -> Result<JoinToken, String> {
        let malformed = || {
            "the join token is not one `coordinator token` printed (kx1.SECRET.FINGERPRINT)"
                .to_string()
        };
        let mut parts = text.trim().split('.');
        let (Some(PREFIX), Some(secret), Some(authority), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex(secret, 32) || !hex(authority, 64) {
            return Err(malformed());
        }
        Ok(JoinToken {
            secret: secret.to_ascii_lowercase(),
            authority: authority.to_ascii_lowercase(),
        })
    }

    /// Whether `secret` is this token's, compared in constant time.
    pub fn admits(&self, secret: &str) -> bool {
        self.secret.as_bytes().ct_eq(secret.as_bytes()).into()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}.{}.{}", self.secret, self.authority)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken(kx1.<secret>.{})", self.authority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_as_printed_and_admits_only_its_secret() {
        let token = JoinToken::new(&"ab".repeat(32));
        let read = JoinToken::parse(&format!("  {token}\n")).unwrap();
        assert_eq!(read, token);
        assert!(read.admits(&token.secret));
        assert!(!read.admits(&"0".repeat(32)));
        assert!(!format!("{token:?}").contains(&token.secret));
    }

    #[test]
    fn a_malformed_token_says_what_a_token_looks_like() {
        for bad in [
            "",
            "kx1.abc.def",
            "kx2.0.0",
            &format!("kx1.{}.{}", "g".repeat(32), "0".repeat(64)),
        ] {
            let error = JoinToken::parse(bad).unwrap_err();
            assert!(error.contains("kx1.SECRET.FINGERPRINT"), "{bad}: {error}");
        }
    }
}

//! The one stdout line a `hivemind` process prints once it serves, `listening grpc=ADDR
//! admin=ADDR[ mesh=ADDR]`: what scripts and the test launcher wait for.
//!
//! It lives in this contract crate so that the server binary (which prints it) and
//! `hivemind-testkit` (which parses it) share one type without the launcher depending on the
//! whole server library.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// The addresses a serving process reports on its listening line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListeningLine {
    /// `grpc=ADDR`: where the RLS gRPC service listens.
    pub grpc: SocketAddr,
    /// `admin=ADDR`: where the admin HTTP listens.
    pub admin: SocketAddr,
    /// `mesh=ADDR`: the gossip mesh's UDP address, printed by gossip nodes only.
    pub mesh: Option<SocketAddr>,
}

/// The word the line starts with.
const PREFIX: &str = "listening";

impl fmt::Display for ListeningLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX} grpc={} admin={}", self.grpc, self.admin)?;
        if let Some(mesh) = self.mesh {
            write!(f, " mesh={mesh}")?;
        }
        Ok(())
    }
}

/// Why a line is not a listening line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListeningLineError {
    /// The line does not start with `listening`.
    #[error("not a listening line")]
    NotListening,
    /// A required `grpc=` or `admin=` token is absent.
    #[error("listening line without {0}=")]
    Missing(&'static str),
    /// A known token's value is not a socket address.
    #[error("listening line {key}={value:?} is not a socket address")]
    BadAddress {
        /// The token's key.
        key: &'static str,
        /// What followed the `=`.
        value: String,
    },
}

impl FromStr for ListeningLine {
    type Err = ListeningLineError;

    /// Parses what [`Display`](fmt::Display) prints. Tokens may come in any order and unknown
    /// tokens are ignored, so the server can report more later without breaking readers.
    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let mut tokens = line.split_whitespace();
        if tokens.next() != Some(PREFIX) {
            return Err(ListeningLineError::NotListening);
        }
        let (mut grpc, mut admin, mut mesh) = (None, None, None);
        for token in tokens {
            let Some((key, value)) = token.split_once('=') else {
                continue;
            };
            let (key, slot) = match key {
                "grpc" => ("grpc", &mut grpc),
                "admin" => ("admin", &mut admin),
                "mesh" => ("mesh", &mut mesh),
                _ => continue,
            };
            let addr = value.parse().map_err(|_| ListeningLineError::BadAddress {
                key,
                value: value.to_owned(),
            })?;
            *slot = Some(addr);
        }
        Ok(ListeningLine {
            grpc: grpc.ok_or(ListeningLineError::Missing("grpc"))?,
            admin: admin.ok_or(ListeningLineError::Missing("admin"))?,
            mesh,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn printed_lines_parse_back_with_and_without_mesh() {
        for mesh in [None, Some(addr("127.0.0.1:7946"))] {
            let line = ListeningLine {
                grpc: addr("127.0.0.1:8081"),
                admin: addr("[::1]:6070"),
                mesh,
            };
            let printed = line.to_string();
            assert!(printed.starts_with("listening grpc=127.0.0.1:8081 admin=[::1]:6070"));
            assert_eq!(printed.contains("mesh="), mesh.is_some(), "{printed}");
            assert_eq!(printed.parse::<ListeningLine>(), Ok(line));
        }
    }

    #[test]
    fn tokens_in_any_order_and_unknown_tokens_are_accepted() {
        let l: ListeningLine =
            "listening mesh=127.0.0.1:7000 extra=x admin=127.0.0.1:2 grpc=127.0.0.1:1"
                .parse()
                .unwrap();
        assert_eq!(l.grpc, addr("127.0.0.1:1"));
        assert_eq!(l.admin, addr("127.0.0.1:2"));
        assert_eq!(l.mesh, Some(addr("127.0.0.1:7000")));
    }

    #[test]
    fn other_lines_and_bad_addresses_are_refused() {
        let parse = |s: &str| s.parse::<ListeningLine>();
        assert_eq!(
            parse("hello grpc=127.0.0.1:1 admin=127.0.0.1:2"),
            Err(ListeningLineError::NotListening)
        );
        assert_eq!(
            parse("listening grpc=127.0.0.1:1"),
            Err(ListeningLineError::Missing("admin"))
        );
        assert!(matches!(
            parse("listening grpc=nope admin=127.0.0.1:2"),
            Err(ListeningLineError::BadAddress { key: "grpc", .. })
        ));
    }
}

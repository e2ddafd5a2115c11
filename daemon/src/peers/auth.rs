//! Proving the cluster secret: each side sends a fresh random nonce, and
//! each proves it holds the secret with HMAC-SHA256 over both nonces and
//! both node names, under a label of its own role (so that one side's
//! proof is never valid as the other's). Nothing else is sent before both
//! proofs were checked.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a nonce and of a proof.
pub const NONCE_BYTES: usize = 32;

pub type Nonce = [u8; NONCE_BYTES];
pub type Proof = [u8; 32];

/// The cluster secret; its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Which side of a connection proves: the one that dialed, or the one
/// that accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Dialer,
    Acceptor,
}

/// A fresh random nonce.
pub fn nonce() -> std::io::Result<Nonce> {
    let mut n = [0u8; NONCE_BYTES];
    getrandom::fill(&mut n).map_err(|e| std::io::Error::other(format!("getrandom: {e}")))?;
    Ok(n)
}

fn mac(
    secret: &Secret,
    role: Role,
    dialer: &str,
    acceptor: &str,
    nd: &Nonce,
    na: &Nonce,
) -> Hmac<Sha256> {
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(&secret.0).expect("HMAC takes any key length");
    m.update(match role {
        Role::Dialer => b"ferry-peer-v1 dialer\0",
        Role::Acceptor => b"ferry-peer-v1 acceptor",
    });
    for name in [dialer, acceptor] {
        m.update(&(name.len() as u32).to_le_bytes());
        m.update(name.as_bytes());
    }
    m.update(nd);
    m.update(na);
    m
}

/// `role`'s proof for a connection from node `dialer` (nonce `nd`) to
/// node `acceptor` (nonce `na`).
pub fn prove(
    secret: &Secret,
    role: Role,
    dialer: &str,
    acceptor: &str,
    nd: &Nonce,
    na: &Nonce,
) -> Proof {
    mac(secret, role, dialer, acceptor, nd, na)
        .finalize()
        .into_bytes()
        .into()
}

/// Whether `proof` is `role`'s proof for that connection (compared in
/// constant time).
pub fn check(
    secret: &Secret,
    role: Role,
    dialer: &str,
    acceptor: &str,
    nd: &Nonce,
    na: &Nonce,
    proof: &Proof,
) -> bool {
    mac(secret, role, dialer, acceptor, nd, na)
        .verify_slice(proof)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_secret_role_names_and_nonces() {
        let s = Secret::new(b"0123456789abcdef".to_vec());
        let other = Secret::new(b"0123456789abcdeF".to_vec());
        let (nd, na) = ([1u8; 32], [2u8; 32]);
        let p = prove(&s, Role::Dialer, "a", "b", &nd, &na);
        assert!(check(&s, Role::Dialer, "a", "b", &nd, &na, &p));
        assert!(
            !check(&other, Role::Dialer, "a", "b", &nd, &na, &p),
            "another secret"
        );
        assert!(
            !check(&s, Role::Acceptor, "a", "b", &nd, &na, &p),
            "the other role"
        );
        assert!(
            !check(&s, Role::Dialer, "b", "a", &nd, &na, &p),
            "names swapped"
        );
        assert!(
            !check(&s, Role::Dialer, "ab", "", &nd, &na, &p),
            "names re-split"
        );
        assert!(
            !check(&s, Role::Dialer, "a", "b", &na, &nd, &p),
            "nonces swapped"
        );
        let mut q = p;
        q[31] ^= 1;
        assert!(
            !check(&s, Role::Dialer, "a", "b", &nd, &na, &q),
            "a flipped bit"
        );
        assert_ne!(nonce().unwrap(), nonce().unwrap());
        assert_eq!(format!("{s:?}"), "Secret(16 bytes)");
    }
}

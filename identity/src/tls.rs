//! The deployment's TLS: its own certificate authority and the server's
//! certificate, made by `vmlot admin init` so that every connection is
//! encrypted and every client knows it reached the deployment's server
//! (not whoever answers on the port). Clients are given `tls/ca.pem`
//! (`--tls-ca`, `VMLOT_TLS_CA`); the server's key never leaves the
//! deployment's directory.

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose};

use crate::IdentityError;

/// Names the server's certificate holds unless told otherwise: this
/// machine, and the address QEMU's user network gives the host, which the
/// nested Xen hosts use to reach it.
pub const DEFAULT_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "10.0.2.2"];

/// The PEM texts `init` writes.
pub struct Material {
    pub ca_cert: String,
    pub ca_key: String,
    pub server_cert: String,
    pub server_key: String,
}

fn err(e: rcgen::Error) -> IdentityError {
    IdentityError::Tls(e.to_string())
}

/// A new CA and a server certificate for `hosts` (DNS names or IP
/// addresses) signed by it.
pub fn generate(hosts: &[String]) -> Result<Material, IdentityError> {
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "vmlot deployment CA");
    ca.distinguished_name = name;
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;

    let server_key = KeyPair::generate().map_err(err)?;
    let mut server = CertificateParams::new(hosts.to_vec()).map_err(err)?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "vmlot nats-server");
    server.distinguished_name = name;
    let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key).map_err(err)?;
    Ok(Material {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        server_cert: server_cert.pem(),
        server_key: server_key.serialize_pem(),
    })
}

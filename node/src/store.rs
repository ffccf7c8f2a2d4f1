//! The node's data dir: its private key, certificate, the CA bundle and the last good
//! snapshot. Files holding secrets are written 0600, atomically (temp file + rename).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use quicmesh_protocol::ident::TrustDomain;
use quicmesh_protocol::wire::{self, ControlDown, Snapshot};

/// Errors reading or writing the data dir.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Corrupt { path: String, reason: String },
}

/// What the node keeps between runs.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// The node's enrolled identity.
#[derive(Debug, Clone)]
pub struct StoredIdentity {
    pub trust_domain: TrustDomain,
    pub cert_der: Vec<u8>,
    pub ca_bundle: Vec<Vec<u8>>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

fn pem_encode(tag: &str, ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new(tag, d.clone())))
        .collect()
}

fn pem_decode(path: &Path, text: &str) -> Result<Vec<Vec<u8>>, StoreError> {
    pem::parse_many(text)
        .map(|v| v.into_iter().map(|p| p.into_contents()).collect())
        .map_err(|e| StoreError::Corrupt {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
}

impl DataDir {
    /// Opens (creating with mode 0700) the data dir.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(root).map_err(io_err(root))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(io_err(root))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The data dir path.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The admin socket path.
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join("admin.sock")
    }

    /// The node's private key (PKCS#8 DER), made on first use. It never leaves the host.
    pub fn key(&self) -> Result<rcgen::KeyPair, StoreError> {
        let path = self.root.join("node.key");
        match fs::read_to_string(&path) {
            Ok(pem) => rcgen::KeyPair::from_pem(&pem).map_err(|e| StoreError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = rcgen::KeyPair::generate().map_err(|e| StoreError::Corrupt {
                    path: path.display().to_string(),
                    reason: format!("key generation failed: {e}"),
                })?;
                write_private(&path, key.serialize_pem().as_bytes())?;
                Ok(key)
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The stored identity, if the node has enrolled.
    pub fn identity(&self) -> Result<Option<StoredIdentity>, StoreError> {
        let cert_path = self.root.join("node.crt");
        let ca_path = self.root.join("ca.crt");
        let td_path = self.root.join("trust_domain");
        let cert = match fs::read_to_string(&cert_path) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&cert_path)(e)),
        };
        let cert_der = pem_decode(&cert_path, &cert)?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Corrupt {
                path: cert_path.display().to_string(),
                reason: "no certificate".into(),
            })?;
        let ca = fs::read_to_string(&ca_path).map_err(io_err(&ca_path))?;
        let td = fs::read_to_string(&td_path).map_err(io_err(&td_path))?;
        let trust_domain = TrustDomain::new(td.trim()).map_err(|e| StoreError::Corrupt {
            path: td_path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Some(StoredIdentity {
            trust_domain,
            cert_der,
            ca_bundle: pem_decode(&ca_path, &ca)?,
        }))
    }

    /// Saves the identity (certificate last, so a crash leaves no half identity).
    pub fn save_identity(&self, id: &StoredIdentity) -> Result<(), StoreError> {
        write_private(
            &self.root.join("trust_domain"),
            id.trust_domain.as_str().as_bytes(),
        )?;
        write_private(
            &self.root.join("ca.crt"),
            pem_encode("CERTIFICATE", &id.ca_bundle).as_bytes(),
        )?;
        write_private(
            &self.root.join("node.crt"),
            pem_encode("CERTIFICATE", std::slice::from_ref(&id.cert_der)).as_bytes(),
        )
    }

    /// The WireGuard gateway's private key (`wg.key`, base64 as `wg genkey` writes it,
    /// mode 0600), made on first use. A key file that does not read as a key is an
    /// error: it is never silently replaced (clients' configurations name its public key).
    pub fn wg_key(&self) -> Result<quicmesh_protocol::wg::WgKey, StoreError> {
        let path = self.root.join("wg.key");
        match fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse()
                .map_err(|e: quicmesh_protocol::wg::WgKeyError| StoreError::Corrupt {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = quicmesh_protocol::wg::WgKey(crate::wg::generate_key_pair().0);
                write_private(&path, format!("{key}\n").as_bytes())?;
                Ok(key)
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The WireGuard clients the node last applied (none stored: empty).
    pub fn wg_clients(&self) -> Result<Vec<quicmesh_protocol::wg::WgClient>, StoreError> {
        let path = self.root.join("wg_clients.bin");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        match wire::decode::<ControlDown>(&bytes) {
            Ok(ControlDown::WgClients(c)) => Ok(c),
            Ok(_) => Err(StoreError::Corrupt {
                path: path.display().to_string(),
                reason: "not a list of WireGuard clients".into(),
            }),
            Err(e) => Err(StoreError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
        }
    }

    pub fn save_wg_clients(
        &self,
        clients: &[quicmesh_protocol::wg::WgClient],
    ) -> Result<(), StoreError> {
        let bytes = wire::encode(&ControlDown::WgClients(clients.to_vec()));
        write_private(&self.root.join("wg_clients.bin"), &bytes)
    }

    /// The last snapshot the node applied, if any.
    pub fn snapshot(&self) -> Result<Option<Snapshot>, StoreError> {
        let path = self.root.join("snapshot.bin");
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        match wire::decode::<ControlDown>(&bytes) {
            Ok(ControlDown::Snapshot(s)) => Ok(Some(*s)),
            Ok(_) => Err(StoreError::Corrupt {
                path: path.display().to_string(),
                reason: "not a snapshot".into(),
            }),
            Err(e) => Err(StoreError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
        }
    }

    /// Stores the snapshot the node just applied.
    pub fn save_snapshot(&self, snap: &Snapshot) -> Result<(), StoreError> {
        let bytes = wire::encode(&ControlDown::Snapshot(Box::new(snap.clone())));
        write_private(&self.root.join("snapshot.bin"), &bytes)
    }
}

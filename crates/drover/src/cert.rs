//! `drover cert init|issue`: a development certificate authority and certificates it
//! signs (rcgen), for TLS on the controller's ports. Keys are written with mode 0600.
//!
//! The CA certificate is not parsed back when issuing: its fixed distinguished name and
//! its key are enough to sign, and give the same issuer name and key identifier.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create a development CA (ca.pem, ca.key) in DIR.
    Init {
        /// Where to write the files.
        #[arg(long, default_value = "./drover-certs")]
        dir: PathBuf,
    },
    /// Issue a certificate NAME.pem / NAME.key signed by the CA in DIR.
    Issue {
        /// The certificate's name (its common name and file names).
        name: String,
        /// Where the CA is and the files go.
        #[arg(long, default_value = "./drover-certs")]
        dir: PathBuf,
        /// Subject alternative names (host names or IP addresses clients will use).
        #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
        san: Vec<String>,
    },
}

const CA_NAME: &str = "drover development CA";

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(p)
}

fn write(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if secret { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

pub fn run(cmd: CertCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CertCommand::Init { dir } => {
            std::fs::create_dir_all(&dir)?;
            let key = KeyPair::generate()?;
            let cert = ca_params()?.self_signed(&key)?;
            write(&dir.join("ca.pem"), &cert.pem(), false)?;
            write(&dir.join("ca.key"), &key.serialize_pem(), true)?;
            println!(
                "CA written: {} (give it to nodes and CLIs as --ca) and {}",
                dir.join("ca.pem").display(),
                dir.join("ca.key").display()
            );
        }
        CertCommand::Issue { name, dir, san } => {
            let ca_key = std::fs::read_to_string(dir.join("ca.key"))
                .with_context(|| format!("no CA in {} (run `drover cert init` first)", dir.display()))?;
            let issuer = Issuer::new(ca_params()?, KeyPair::from_pem(&ca_key)?);
            let mut params = CertificateParams::new(san.clone())?;
            params.distinguished_name.push(DnType::CommonName, name.clone());
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            write(&dir.join(format!("{name}.pem")), &cert.pem(), false)?;
            write(&dir.join(format!("{name}.key")), &key.serialize_pem(), true)?;
            println!("{name}.pem / {name}.key written in {} for {}", dir.display(), san.join(", "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

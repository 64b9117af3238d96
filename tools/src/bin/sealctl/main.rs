//! `sealctl`: keys, sealing and inspection of sealed OCI images.

mod image;
mod keys;
mod optimize;
mod pull;
mod sign;
mod transport;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Make keys for, seal, unseal, inspect and re-key sealfs images.
///
/// Images are named with skopeo's transport spelling: oci:DIR[:TAG] for an OCI image layout
/// directory. A sealed image's layers are encrypted, chunk-indexed blobs that the sealfs
/// snapshotter mounts lazily; its config lists each sealed layer's own diff id, derived from
/// its authenticated index, so its snapshots are its own (docs/format.md).
#[derive(Parser)]
#[command(name = "sealctl", version, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Talk plain HTTP to docker:// registries (loopback registries always use it).
    #[arg(long, global = true)]
    insecure: bool,
    /// docker config.json with registry credentials [default: $DOCKER_CONFIG/config.json,
    /// else ~/.docker/config.json].
    #[arg(long, global = true, value_name = "FILE")]
    docker_config: Option<PathBuf>,
    /// Registry mirrors in containerd's layout, DIR/REGISTRY/hosts.toml
    /// [default: /etc/containerd/certs.d if it exists].
    #[arg(long, global = true, value_name = "DIR")]
    hosts_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an X25519 key pair for sealing (public) and opening (private) images.
    Keygen {
        /// Where to write the private key (created with mode 0600).
        #[arg(long, value_name = "FILE")]
        private: PathBuf,
        /// Where to write the public key, to hand to whoever seals images for you.
        #[arg(long, value_name = "FILE")]
        public: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Seal every layer of an image for one or more recipients.
    ///
    /// Each layer gets a fresh random key, wrapped for every recipient in the layer
    /// descriptor's annotations. The source image is not modified.
    Seal {
        /// A recipient (repeat for several): a public key file, or provider:NAME[:ARGS] for a
        /// keyprovider (a KMS, an attestation service) of the ocicrypt keyprovider config
        /// that OCICRYPT_KEYPROVIDER_CONFIG names; ARGS go to the provider as ocicrypt's
        /// `provider:` recipients pass them.
        #[arg(
            long = "recipient",
            short = 'r',
            value_name = "PUB|provider:NAME",
            required = true
        )]
        recipients: Vec<String>,
        /// Chunk size in bytes: a power of two from 65536 to 16777216 (suffixes K and M work).
        #[arg(long, value_name = "N", default_value = "1M", value_parser = image::parse_size)]
        chunk_size: u64,
        /// Largest pack of small files in bytes: a power of two from 64K to the chunk size
        /// [default: 128K, or the chunk size if smaller]. Smaller packs mean a read of one
        /// small file fetches fewer of its neighbours, at the cost of more requests.
        #[arg(long, value_name = "N", value_parser = image::parse_size)]
        pack_size: Option<u64>,
        /// zstd level for chunks (1-19).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
        zstd_level: i32,
        /// A startup profile made elsewhere: a file with one path per line (`/usr/bin/app`),
        /// in the order the container reads them ('#' starts a comment). Those files are
        /// packed together and fetched first, right after mount. `sealctl optimize` records
        /// such a list by running the image.
        #[arg(long, value_name = "FILE")]
        prefetch_list: Option<PathBuf>,
        /// Sign the sealed image's manifest with this cosign private key (`cosign
        /// generate-key-pair`'s cosign.key) once it is pushed, as `sealctl sign` does; needs a
        /// docker:// destination. The key's password comes from COSIGN_PASSWORD or
        /// --password-file.
        #[arg(long, value_name = "COSIGN_KEY")]
        sign: Option<PathBuf>,
        /// File whose first line is the password of the --sign key.
        #[arg(long, value_name = "FILE", requires = "sign")]
        password_file: Option<PathBuf>,
        /// Source image, e.g. oci:./busybox:latest.
        source: String,
        /// Destination image, e.g. oci:./busybox-sealed:latest (created if missing).
        destination: String,
    },
    /// Sign an image in a registry with a cosign key, as `cosign sign --key` does.
    ///
    /// The signature (over the manifest digest; a tag is resolved first) goes into the image's
    /// repository as cosign's signature image (`sha256-HEX.sig`), next to any already there, so
    /// `cosign verify --key cosign.pub` accepts it and nodes whose signature policy trusts the
    /// key open the image. The key's password comes from COSIGN_PASSWORD or --password-file.
    Sign {
        /// cosign private key (`cosign generate-key-pair`'s cosign.key).
        #[arg(long, short = 'k', value_name = "COSIGN_KEY")]
        key: PathBuf,
        /// File whose first line is the key's password.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        /// The image: docker://HOST/REPO[:TAG][@DIGEST].
        image: String,
    },
    /// Check an image's cosign signature as a node's signature policy would.
    ///
    /// Passes if one of the keys signed the image's manifest digest (cosign's key-based
    /// signatures, made by `cosign sign --key` or `sealctl sign`); says why not otherwise.
    Verify {
        /// Trusted public key (cosign.pub; repeat for several).
        #[arg(long = "key", short = 'k', value_name = "COSIGN_PUB", required = true)]
        keys: Vec<PathBuf>,
        /// The image: docker://HOST/REPO[:TAG][@DIGEST].
        image: String,
    },
    /// Record what a sealed image reads at start-up and write a copy that prefetches it.
    ///
    /// Mounts the image's layers with the sealfs FUSE filesystem (recording, per layer, the
    /// order in which files are first read), runs its entrypoint (or --args) in a container
    /// through containerd until it exits or the timeout, then seals every layer again under a
    /// fresh key with that order as its startup profile: the files it read are packed
    /// together, and the snapshotter fetches them first after mounting. The recording stays
    /// in memory and the profile is inside the encrypted index; nothing is written in plain
    /// text. The container runs as root with the image's environment and working directory.
    Optimize {
        #[command(flatten)]
        options: optimize::OptimizeOptions,
        /// Sealed source image (oci:DIR[:TAG] or docker://REF).
        source: String,
        /// Destination image.
        destination: String,
    },
    /// Turn a sealed image back into a plain OCI image with the same file trees.
    Unseal {
        /// Private key file that is a recipient of the image, or provider:NAME (repeat to try
        /// several).
        #[arg(
            long = "key",
            short = 'k',
            value_name = "PRIV|provider:NAME",
            required = true
        )]
        keys: Vec<String>,
        /// Sealed source image.
        source: String,
        /// Plain destination image.
        destination: String,
    },
    /// Show an image's layers, sizes, chunking and recipients; with a key, its files.
    Inspect {
        /// Private key file or provider:NAME; lists each sealed layer's files and checks the
        /// key opens it.
        #[arg(long = "key", short = 'k', value_name = "PRIV|provider:NAME")]
        keys: Vec<String>,
        /// The image to inspect.
        source: String,
    },
    /// Add or remove recipients by rewriting the manifest only; blobs are not touched.
    ///
    /// Removing a recipient stops it from opening the image through the new manifest only: a
    /// recipient that already had the old manifest could unwrap the layer keys then. To revoke
    /// access for real, seal the image again.
    Rewrap {
        /// A current recipient that can unwrap the layer keys: a private key file or
        /// provider:NAME.
        #[arg(
            long = "key",
            short = 'k',
            value_name = "PRIV|provider:NAME",
            required = true
        )]
        keys: Vec<String>,
        /// A recipient to add (repeatable): a public key file or provider:NAME[:ARGS].
        #[arg(long = "add-recipient", value_name = "PUB|provider:NAME")]
        add: Vec<String>,
        /// A recipient to remove (repeatable): its key id (16 hex digits, as `sealctl inspect`
        /// shows) or provider:NAME.
        #[arg(long = "remove-recipient", value_name = "KEYID|provider:NAME")]
        remove: Vec<String>,
        /// Source image.
        source: String,
        /// Destination image (may be the same layout with another tag).
        destination: String,
    },
    /// Pull an image into containerd lazily: sealed layers are mounted by the sealfs
    /// snapshotter and fetched on demand, so `ctr run --snapshotter sealfs REF ID` can start
    /// the container before the image has been downloaded.
    ///
    /// Writes the manifest and config into containerd's content store, prepares each layer
    /// on the snapshotter with the labels a remote snapshotter needs, and creates the image
    /// record. Layers that are not sealed are downloaded and unpacked as `ctr pull` would.
    /// Prints, per layer, whether it was mounted remotely.
    Pull {
        /// containerd's socket.
        #[arg(
            long,
            value_name = "SOCK",
            default_value = "/run/containerd/containerd.sock"
        )]
        address: PathBuf,
        /// containerd namespace.
        #[arg(
            long,
            short = 'n',
            env = "CONTAINERD_NAMESPACE",
            default_value = "default"
        )]
        namespace: String,
        /// The snapshotter (a containerd proxy plugin name).
        #[arg(long, default_value = "sealfs")]
        snapshotter: String,
        /// The image: HOST/REPO[:TAG][@DIGEST] (a docker:// prefix is accepted).
        reference: String,
    },
    /// Split a private key into shares, or combine shares into the key.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Split a private key into N shares of which any K recover it.
    Split {
        /// How many shares are needed to recover the key (at least 2).
        #[arg(long, value_name = "K")]
        threshold: u8,
        /// How many shares to make (at most 255).
        #[arg(long, value_name = "N")]
        shares: u8,
        /// The private key file to split.
        private: PathBuf,
        /// Directory to write share-I-of-N.txt files into (created, mode 0700).
        outdir: PathBuf,
    },
    /// Combine K or more shares into the private key.
    Combine {
        /// Where to write the private key (mode 0600); standard output if omitted.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
        /// Share files.
        #[arg(required = true)]
        shares: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    // `sealctl inspect | head` ends quietly when the reader goes away, as Unix tools do,
    // instead of panicking on a broken pipe.
    // SAFETY: restoring a signal's default disposition before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let transport = transport::Transport::new(
        cli.insecure,
        cli.docker_config.clone(),
        cli.hosts_dir.clone(),
    );
    let t = &transport;
    let result = match cli.command {
        Command::Keygen {
            private,
            public,
            force,
        } => keys::keygen(&private, &public, force),
        Command::Seal {
            recipients,
            chunk_size,
            pack_size,
            zstd_level,
            prefetch_list,
            sign,
            password_file,
            source,
            destination,
        } => image::seal_options(chunk_size, pack_size, zstd_level).and_then(|options| {
            // Opened first: a wrong password must not cost a whole sealing run.
            let signer = match &sign {
                Some(key) if !destination.starts_with("docker://") => anyhow::bail!(
                    "--sign {}: signatures live in a registry next to the image; seal into a                      docker:// destination (or sign later with sealctl sign)",
                    key.display()
                ),
                Some(key) => Some(sign::signing_key(key, password_file.as_deref())?),
                None => None,
            };
            image::seal(
                t,
                &recipients,
                options,
                prefetch_list.as_deref(),
                &source,
                &destination,
                signer.as_ref(),
            )
        }),
        Command::Sign {
            key,
            password_file,
            image,
        } => sign::signing_key(&key, password_file.as_deref())
            .and_then(|signer| sign::sign(t, &signer, &image)),
        Command::Verify { keys, image } => sign::verify(t, &keys, &image),
        Command::Optimize {
            options,
            source,
            destination,
        } => optimize::optimize(t, &options, &source, &destination),
        Command::Unseal {
            keys,
            source,
            destination,
        } => image::unseal(t, &keys, &source, &destination),
        Command::Inspect { keys, source } => image::inspect(t, &keys, &source),
        Command::Rewrap {
            keys,
            add,
            remove,
            source,
            destination,
        } => image::rewrap(t, &keys, &add, &remove, &source, &destination),
        Command::Pull {
            address,
            namespace,
            snapshotter,
            reference,
        } => pull::pull(
            t,
            &reference,
            &pull::PullOptions {
                address,
                namespace,
                snapshotter,
            },
        ),
        Command::Key(KeyCommand::Split {
            threshold,
            shares,
            private,
            outdir,
        }) => keys::split(threshold, shares, &private, &outdir),
        Command::Key(KeyCommand::Combine { output, shares }) => {
            keys::combine(&shares, output.as_deref())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sealctl: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

//! Command line definition (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Manage ferry containers and virtual machines"
)]
pub struct Cli {
    /// Daemon directory (the socket is DIR/unix.socket) [default: /var/lib/ferry]
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "FERRY_DIR",
        value_name = "DIR"
    )]
    pub dir: Option<PathBuf>,

    /// Talk to a remote daemon over HTTPS instead of the local socket
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "https://HOST:PORT"
    )]
    pub remote: Option<String>,

    /// Client certificate for --remote (generated if missing) [default: ~/.config/ferry/client.crt]
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "FILE"
    )]
    pub cert: Option<PathBuf>,

    /// Client key for --remote [default: ~/.config/ferry/client.key]
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "FILE"
    )]
    pub key: Option<PathBuf>,

    /// The server certificate to pin (required with --remote)
    #[arg(
        long = "server-cert",
        global = true,
        help_heading = "Global options",
        env = "FERRY_SERVER_CERT",
        value_name = "FILE"
    )]
    pub server_cert: Option<PathBuf>,

    /// Output format
    #[arg(long, global = true, help_heading = "Global options", value_enum, default_value_t = Format::Table)]
    pub format: Format,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create and start an instance from an image
    Launch(LaunchArgs),
    /// List instances
    List,
    /// Show an instance's details
    Info { name: String },
    /// Start an instance
    Start { name: String },
    /// Stop an instance
    Stop(StopArgs),
    /// Restart an instance
    Restart(RestartArgs),
    /// Delete an instance
    Delete(DeleteArgs),
    /// Run a command in an instance and print its output
    Exec(ExecArgs),
    /// Show an instance's console
    Console(ConsoleArgs),
    /// Manage background operations
    #[command(subcommand)]
    Operation(OperationCommand),
    /// Move an instance to another cluster member (live for a running instance)
    Move(MoveArgs),
    /// Manage the cluster: enable, add, join, list, remove, evacuate, restore
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Server configuration: trusted client certificates
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Image alias
    pub image: String,
    /// Instance name
    pub name: String,
    /// Create a virtual machine instead of a container
    #[arg(long)]
    pub vm: bool,
    /// Config key/value to apply (repeatable)
    #[arg(short = 'c', long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub config: Vec<(String, String)>,
    /// Create the instance without starting it
    #[arg(long)]
    pub no_start: bool,
    /// Cluster member to place the instance on (default: the online member with the most free memory)
    #[arg(long)]
    pub target: Option<String>,
    /// Storage pool: `default` (member-local) or `shared` (a directory every
    /// member sees; moves copy no storage)
    #[arg(short = 's', long = "storage")]
    pub storage: Option<String>,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    pub name: String,
    /// Save the runtime state (checkpoint) so the next start resumes it
    #[arg(long)]
    pub stateful: bool,
    /// Force the stop (kill)
    #[arg(short, long)]
    pub force: bool,
    /// Seconds to wait for a clean shutdown [default: -1, no limit]
    #[arg(long, allow_hyphen_values = true)]
    pub timeout: Option<i64>,
}

#[derive(Debug, Args)]
pub struct RestartArgs {
    pub name: String,
    /// Force the stop part of the restart
    #[arg(short, long)]
    pub force: bool,
    /// Seconds to wait for a clean shutdown [default: -1, no limit]
    #[arg(long, allow_hyphen_values = true)]
    pub timeout: Option<i64>,
}

#[derive(Debug, Args)]
pub struct DeleteArgs {
    pub name: String,
    /// Stop a running instance (forcefully) before deleting it
    #[arg(short, long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    pub name: String,
    /// Environment variable to set (repeatable)
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// The command and its arguments (after --)
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    pub name: String,
    /// Print the console log instead of attaching
    #[arg(long)]
    pub show_log: bool,
}

#[derive(Debug, Subcommand)]
pub enum OperationCommand {
    /// List background operations
    List,
    /// Show one operation
    Show { id: String },
    /// Cancel an operation
    Cancel { id: String },
}

/// Parse `key=value` (the value may be empty and may contain `=`).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn key_value_parsing() {
        assert_eq!(
            parse_key_value("limits.memory=256MiB"),
            Ok(("limits.memory".into(), "256MiB".into()))
        );
        assert_eq!(parse_key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(
            parse_key_value("empty="),
            Ok(("empty".into(), String::new()))
        );
        assert!(parse_key_value("novalue").is_err());
        assert!(parse_key_value("=x").is_err());
    }

    #[test]
    fn cli_is_valid() {
        Cli::command().debug_assert();
    }

    /// `config get`'s KEY is not the global `--key` (a client key file).
    #[test]
    fn parses_config_get() {
        let cli = Cli::try_parse_from(["ferry", "config", "get", "c1", "limits.memory"]).unwrap();
        match cli.command {
            Command::Config(ConfigCommand::Get {
                instance,
                config_key,
            }) => assert_eq!(
                (instance.as_str(), config_key.as_str()),
                ("c1", "limits.memory")
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_launch() {
        let cli = Cli::try_parse_from([
            "ferry",
            "launch",
            "busybox",
            "c1",
            "--vm",
            "-c",
            "limits.memory=256MiB",
            "-c",
            "a=b",
            "--no-start",
        ])
        .unwrap();
        let Command::Launch(a) = cli.command else {
            panic!()
        };
        assert!(a.vm && a.no_start);
        assert_eq!(a.config.len(), 2);
        assert_eq!(a.config[0], ("limits.memory".into(), "256MiB".into()));
    }

    #[test]
    fn parses_exec_with_separator_and_dash_args() {
        let cli = Cli::try_parse_from(["ferry", "exec", "c1", "--", "ls", "-l", "/"]).unwrap();
        let Command::Exec(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.command, ["ls", "-l", "/"]);
        let cli =
            Cli::try_parse_from(["ferry", "--format", "json", "exec", "c1", "cat", "/counter"])
                .unwrap();
        let Command::Exec(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.command, ["cat", "/counter"]);
        assert!(Cli::try_parse_from(["ferry", "exec", "c1"]).is_err());
    }

    #[test]
    fn parses_global_flags_anywhere() {
        let cli =
            Cli::try_parse_from(["ferry", "list", "--format", "json", "--dir", "/tmp/x"]).unwrap();
        assert_eq!(cli.format, Format::Json);
        assert_eq!(cli.dir.as_deref(), Some(std::path::Path::new("/tmp/x")));
        let cli =
            Cli::try_parse_from(["ferry", "stop", "c1", "--timeout", "-1", "--stateful"]).unwrap();
        let Command::Stop(a) = cli.command else {
            panic!()
        };
        assert_eq!(a.timeout, Some(-1));
        assert!(a.stateful);
    }
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Turn this member into the first member of a new cluster
    Enable { name: String },
    /// Print a one-time join token for a new member
    Add { name: String },
    /// Join the cluster a token was issued by (run on the new member)
    Join { token: String },
    /// List the cluster's members
    List,
    /// Remove a member (it must have no instances)
    Remove { name: String },
    /// Move every instance off a member and mark it evacuated (for maintenance)
    Evacuate(EvacuateArgs),
    /// Bring an evacuated member's instances back and clear its evacuated mark
    Restore(RestoreArgs),
}

#[derive(Debug, Args)]
pub struct EvacuateArgs {
    /// The member to evacuate
    pub member: String,
    /// What to do with running instances [default: auto; an instance's own
    /// `cluster.evacuate` other than auto wins]
    #[arg(long, value_enum)]
    pub action: Option<EvacuateAction>,
    /// Don't ask for confirmation
    #[arg(short, long)]
    pub force: bool,
}

/// `--action` of `ferry cluster evacuate` (the request's `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvacuateAction {
    /// Live move where the instance allows it, else stop, move and start
    Auto,
    /// Live move running instances
    LiveMigrate,
    /// Stop running instances, move them, start them again
    Migrate,
    /// Stop running instances in place (restore starts them); nothing moves
    Stop,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The member to restore
    pub member: String,
    /// Only clear the evacuated mark; leave the instances where they are
    #[arg(long)]
    pub skip_instances: bool,
    /// Don't ask for confirmation
    #[arg(short, long)]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Trusted client certificates (replicated to every member)
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Set instance config keys, e.g. `ferry config set c1 limits.memory=128MiB`
    Set {
        instance: String,
        #[arg(required = true, value_name = "KEY=VALUE", value_parser = parse_key_value)]
        pairs: Vec<(String, String)>,
    },
    /// Unset instance config keys
    Unset {
        instance: String,
        #[arg(required = true, value_name = "KEY")]
        keys: Vec<String>,
    },
    /// Print one config key of an instance (an empty line when it is unset)
    Get {
        instance: String,
        #[arg(value_name = "KEY")]
        config_key: String,
    },
    /// Show an instance's config (volatile keys included)
    Show { instance: String },
}

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Trust a client certificate (PEM file)
    Add {
        file: std::path::PathBuf,
        /// A name for it (default: the start of its fingerprint)
        #[arg(long)]
        name: Option<String>,
    },
    /// List trusted client certificates
    List,
    /// Stop trusting a certificate (fingerprint or unique prefix)
    Remove { fingerprint: String },
}

#[derive(Debug, Args)]
pub struct MoveArgs {
    pub name: String,
    /// Member to move the instance to
    #[arg(long)]
    pub target: String,
    /// Stop the instance, move it, start it again (no live state transfer)
    #[arg(long)]
    pub stateless: bool,
    /// Cap the transfer, e.g. 64MiB (per second; default unlimited)
    #[arg(long)]
    pub bandwidth: Option<String>,
    /// VMs: the longest pause QEMU may plan for the switch-over, in ms (default 300)
    #[arg(long)]
    pub max_downtime: Option<u64>,
    /// VMs: the pause to wait for first, in ms, for up to four passes or 1 s before accepting --max-downtime (default 10; equal to --max-downtime: switch over as soon as QEMU allows)
    #[arg(long)]
    pub downtime_target: Option<u64>,
    /// Resume on the target first and pull memory after (a broken link then loses the instance)
    #[arg(long)]
    pub postcopy: bool,
    /// Compression of the memory stream: adaptive (default: each frame zstd-compressed when that saves space; for a VM also acknowledged, so the link holds little at switch-over), zstd or none
    #[arg(long, value_parser = ["adaptive", "zstd", "none"])]
    pub compression: Option<String>,
}

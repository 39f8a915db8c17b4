//! The layered configuration loader: command-line flags win over `DROVER_*`
//! environment variables, which win over a TOML file (`--config FILE`, or
//! `./drover.toml` when it exists), which wins over the built-in defaults.
//!
//! One loader for every role: clap already layers flags over environment variables
//! over defaults, so the file is turned into extra command-line arguments for exactly
//! the settings that neither a flag nor a variable set, and the command line is parsed
//! again. Every setting is therefore parsed and validated by the same code whichever
//! layer it came from, and a file can name only settings that exist (an unknown key is
//! an error naming the file). `--print-config` shows the result, where each value came
//! from, and redacts secrets.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

/// The file read when no `--config` is given, if it exists.
pub const DEFAULT_FILE: &str = "drover.toml";

/// Settings never printed in full.
fn is_secret(id: &str) -> bool {
    ["token", "secret", "password"].iter().any(|s| id.contains(s))
}

/// Settings that are not configuration (they select what to do).
fn is_meta(id: &str) -> bool {
    matches!(id, "help" | "version" | "config" | "print_config")
}

/// The result of layering: the final argument list and which settings came from the file.
pub struct Layered {
    /// The command line with the file's settings added.
    pub argv: Vec<OsString>,
    /// The file read, if any.
    pub file: Option<PathBuf>,
    /// Settings (arg ids) whose value came from the file.
    pub from_file: BTreeSet<String>,
}

/// Adds the configuration file's settings to `argv` where neither a flag nor an
/// environment variable set them. `matches` is `argv` parsed once by `root`.
pub fn layer(root: &Command, matches: &ArgMatches, mut argv: Vec<OsString>) -> anyhow::Result<Layered> {
    let none = |argv| Ok(Layered { argv, file: None, from_file: BTreeSet::new() });
    let Some((name, sub)) = matches.subcommand() else { return none(argv) };
    let Some(cmd) = root.find_subcommand(name) else { return none(argv) };
    if !cmd.get_arguments().any(|a| a.get_id() == "config") {
        return none(argv);
    }
    let path = match sub.get_one::<PathBuf>("config") {
        Some(p) => p.clone(),
        None if Path::new(DEFAULT_FILE).is_file() => PathBuf::from(DEFAULT_FILE),
        None => return none(argv),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read config file {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("config file {} is not valid TOML", path.display()))?;
    let mut extra: Vec<OsString> = Vec::new();
    let mut from_file = BTreeSet::new();
    for (key, value) in &table {
        let id = key.replace('-', "_");
        let Some(arg) = cmd.get_arguments().find(|a| a.get_id() == id.as_str() && !is_meta(&id)) else {
            let known: Vec<String> = cmd
                .get_arguments()
                .filter(|a| a.get_long().is_some() && !is_meta(a.get_id().as_str()))
                .map(|a| a.get_id().as_str().replace('_', "-"))
                .collect();
            bail!("{}: unknown setting `{key}` for `drover {name}` (known: {})", path.display(), known.join(", "));
        };
        if matches!(sub.value_source(&id), Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue;
        }
        let Some(long) = arg.get_long() else {
            bail!("{}: `{key}` is a positional argument and cannot be set in a file", path.display());
        };
        let flag = OsString::from(format!("--{long}"));
        let takes_value = arg.get_action().takes_values();
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    bail!("{}: `{key}` must be a string, number or boolean, not {}", path.display(), other.type_str())
                }
            })
        };
        match value {
            toml::Value::Boolean(b) if !takes_value => {
                if *b {
                    extra.push(flag);
                }
            }
            toml::Value::Array(items) => {
                for item in items {
                    extra.push(flag.clone());
                    extra.push(scalar(item)?.into());
                }
            }
            v => {
                extra.push(flag);
                extra.push(scalar(v)?.into());
            }
        }
        from_file.insert(id);
    }
    // Right after the subcommand's name, so the file's settings never land after a `--`.
    let at = argv.iter().skip(1).position(|a| a == name).map_or(argv.len(), |i| i + 2);
    argv.splice(at..at, extra);
    Ok(Layered { argv, file: Some(path), from_file })
}

/// The effective configuration of the subcommand in `matches`, as TOML that
/// `--config` accepts, with each value's source and secrets redacted.
pub fn render(root: &Command, matches: &ArgMatches, layered: &Layered) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let Some((name, sub)) = matches.subcommand() else { return out };
    let Some(cmd) = root.find_subcommand(name) else { return out };
    let _ = writeln!(out, "# effective configuration of `drover {name}`");
    let _ = writeln!(out, "# layers: flags > DROVER_* environment > config file > defaults");
    if let Some(f) = &layered.file {
        let _ = writeln!(out, "# config file: {}", f.display());
    }
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if is_meta(id) || arg.get_long().is_none() {
            continue;
        }
        let key = id.replace('_', "-");
        let source = if layered.from_file.contains(id) {
            "file"
        } else {
            match sub.value_source(id) {
                Some(ValueSource::CommandLine) => "flag",
                Some(ValueSource::EnvVariable) => "environment",
                Some(ValueSource::DefaultValue) => "default",
                _ => "unset",
            }
        };
        let raw: Vec<String> =
            sub.get_raw(id).map(|vals| vals.map(|v| v.to_string_lossy().into_owned()).collect()).unwrap_or_default();
        let value = if raw.is_empty() {
            let _ = writeln!(out, "# {key} = (unset)");
            continue;
        } else if is_secret(id) {
            "\"<redacted>\"".to_owned()
        } else if !arg.get_action().takes_values() {
            raw[0].clone()
        } else if arg.get_num_args().is_some_and(|n| n.max_values() > 1) || raw.len() > 1 {
            let items: Vec<String> = raw.iter().map(|v| toml::Value::String(v.clone()).to_string()).collect();
            format!("[{}]", items.join(", "))
        } else {
            toml::Value::String(raw[0].clone()).to_string()
        };
        let _ = writeln!(out, "{key} = {value}  # {source}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn root() -> Command {
        Command::new("drover").subcommand(
            Command::new("controller")
                .arg(Arg::new("config").long("config").value_parser(clap::value_parser!(PathBuf)))
                .arg(Arg::new("listen").long("listen").default_value("127.0.0.1:7400"))
                .arg(Arg::new("node_timeout").long("node-timeout").env("DROVER_TEST_NODE_TIMEOUT").default_value("3s"))
                .arg(Arg::new("verbose").long("verbose").action(ArgAction::SetTrue))
                .arg(Arg::new("pairs").long("pairs").action(ArgAction::Append))
                .arg(Arg::new("token").long("token")),
        )
    }

    fn run(args: &[&str], file: &str) -> anyhow::Result<(ArgMatches, Layered)> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("drover.toml");
        std::fs::write(&path, file)?;
        let mut argv: Vec<OsString> = args.iter().map(OsString::from).collect();
        argv.extend([OsString::from("--config"), path.clone().into()]);
        let m = root().try_get_matches_from(&argv)?;
        let layered = layer(&root(), &m, argv)?;
        let m = root().try_get_matches_from(&layered.argv)?;
        Ok((m, layered))
    }

    #[test]
    fn the_file_fills_what_flags_left_at_their_defaults() {
        let file = "listen = \"0.0.0.0:9\"\nnode-timeout = \"7s\"\nverbose = true\npairs = [\"EURUSD\", \"GBPUSD\"]\ntoken = \"dt1.a.b\"\n";
        let (m, layered) = run(&["drover", "controller", "--listen", "127.0.0.1:1"], file).unwrap();
        let sub = m.subcommand_matches("controller").unwrap();
        assert_eq!(sub.get_one::<String>("listen").unwrap(), "127.0.0.1:1", "a flag beats the file");
        assert_eq!(sub.get_one::<String>("node_timeout").unwrap(), "7s");
        assert!(sub.get_flag("verbose"));
        assert_eq!(sub.get_many::<String>("pairs").unwrap().collect::<Vec<_>>(), ["EURUSD", "GBPUSD"]);
        let printed = render(&root(), &m, &layered);
        assert!(printed.contains("listen = \"127.0.0.1:1\"  # flag"), "{printed}");
        assert!(printed.contains("node-timeout = \"7s\"  # file"), "{printed}");
        assert!(printed.contains("token = \"<redacted>\"  # file"), "{printed}");
        assert!(!printed.contains("dt1.a.b"), "{printed}");
        // What it prints is a config file the loader accepts.
        let body: String = printed.lines().filter(|l| !l.starts_with('#')).map(|l| format!("{l}\n")).collect();
        assert!(toml::from_str::<toml::Table>(&body).is_ok(), "{body}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_errors_naming_the_file() {
        let e = run(&["drover", "controller"], "lisen = \"x\"\n").err().unwrap().to_string();
        assert!(e.contains("unknown setting `lisen`") && e.contains("drover.toml") && e.contains("listen"), "{e}");
        let e = run(&["drover", "controller"], "listen = { a = 1 }\n").err().unwrap().to_string();
        assert!(e.contains("must be a string"), "{e}");
        let e = run(&["drover", "controller"], "listen = \n").err().unwrap();
        assert!(format!("{e:#}").contains("not valid TOML"), "{e:#}");
    }
}

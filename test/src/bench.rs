//! What the benchmark binaries (`raft-bench`, `move-bench`,
//! `evacuate-bench`, in `src/bin/`) share: their command-line parsing, the
//! context of a run (build profile, commit, command, machine, load average),
//! figures ("median (min–max)"), the `ferry` CLI under a time limit, and
//! writing a results section between its markers into a doc. What each
//! benchmark measures and the tables it renders stay in its binary.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::Member;

// ---------------------------------------------------------------- arguments

/// A benchmark's command-line arguments, read one by one. Every mistake
/// exits with status 2 after `NAME: <what>` and the usage text.
pub struct Args {
    name: &'static str,
    usage: &'static str,
    rest: std::vec::IntoIter<String>,
}

impl Args {
    /// The process's arguments (without the program name).
    pub fn from_env(name: &'static str, usage: &'static str) -> Args {
        Args::new(name, usage, std::env::args().skip(1))
    }

    pub fn new(
        name: &'static str,
        usage: &'static str,
        args: impl IntoIterator<Item = String>,
    ) -> Args {
        Args {
            name,
            usage,
            rest: args.into_iter().collect::<Vec<_>>().into_iter(),
        }
    }

    /// The next argument, if any.
    pub fn next_arg(&mut self) -> Option<String> {
        self.rest.next()
    }

    /// `NAME: msg`, the usage, exit status 2.
    pub fn bad(&self, msg: impl Display) -> ! {
        eprintln!("{}: {msg}\n{}", self.name, self.usage);
        std::process::exit(2)
    }

    /// The usage on stdout, exit status 0 (`-h`, `--help`).
    pub fn help(&self) -> ! {
        println!("{}", self.usage);
        std::process::exit(0)
    }

    /// An argument the benchmark does not know.
    pub fn unknown(&self, arg: &str) -> ! {
        self.bad(format!("unknown argument {arg:?}"))
    }

    /// The value following `flag`.
    pub fn value(&mut self, flag: &str) -> String {
        match self.rest.next() {
            Some(v) => v,
            None => self.bad(format!("{flag} needs a value")),
        }
    }

    /// The value following `flag`, as a path.
    pub fn path(&mut self, flag: &str) -> PathBuf {
        PathBuf::from(self.value(flag))
    }

    /// The value following `flag`, parsed (`FLAG: <parse error>` otherwise).
    pub fn parsed<T: FromStr>(&mut self, flag: &str) -> T
    where
        T::Err: Display,
    {
        let v = self.value(flag);
        v.parse()
            .unwrap_or_else(|err| self.bad(format!("{flag}: {err}")))
    }

    /// The value following `flag`, a number above zero.
    pub fn positive(&mut self, flag: &str) -> usize {
        let v = self.value(flag);
        positive(&v).unwrap_or_else(|| self.bad(format!("{flag} takes a positive number")))
    }

    /// The value following `flag`, a comma-separated list of numbers above
    /// zero; `example` shows one in the complaint.
    pub fn positive_list(&mut self, flag: &str, example: &str) -> Vec<usize> {
        let v = self.value(flag);
        v.split(',')
            .map(|p| positive(p.trim()))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_else(|| self.bad(format!("{flag} takes positive numbers, e.g. {example}")))
    }
}

fn positive(s: &str) -> Option<usize> {
    s.parse().ok().filter(|n| *n > 0)
}

/// Exit with status 1 and `msg` unless running as root.
pub fn require_root(msg: &str) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("{msg}");
        std::process::exit(1);
    }
}

/// The runtime of the benchmarks that drive several members at once.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------- the run

/// What a results section says about the run besides the figures.
pub struct Run {
    pub started: Instant,
    /// Where `ferryd` and `ferry` are (next to the benchmark binary).
    pub bin: PathBuf,
    /// Build profile of the binaries (`debug`, `release`).
    pub profile: String,
    /// `commit <short hash>`, `+ uncommitted changes` when the tree is dirty.
    pub commit: String,
    /// The command line to record: `--command TEXT`, or this process's.
    pub command: String,
    pub load_before: String,
    /// Set by [`finish`](Run::finish).
    pub date: String,
    pub load_after: String,
    pub took: Duration,
}

impl Run {
    /// Starts the clock; `name` and the arguments make the command unless
    /// `command` is given.
    pub fn start(name: &str, command: Option<String>) -> Run {
        let started = Instant::now();
        let bin = crate::bin_dir();
        let profile = bin
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let command = command.unwrap_or_else(|| {
            let a: Vec<String> = std::env::args().skip(1).collect();
            format!("{name} {}", a.join(" ")).trim().to_string()
        });
        Run {
            started,
            bin,
            profile,
            commit: commit(),
            command,
            load_before: loadavg(),
            date: String::new(),
            load_after: String::new(),
            took: Duration::ZERO,
        }
    }

    /// The date, load average and time taken as of now.
    pub fn finish(&mut self) {
        self.date = sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
        self.load_after = loadavg();
        self.took = self.started.elapsed();
    }

    /// The section's heading line (a blank line follows).
    pub fn heading(&self) -> String {
        format!("### Results: `{}` build, {}\n", self.profile, self.date)
    }

    /// `- load average before / after: …`.
    pub fn load_line(&self) -> String {
        format!(
            "- load average before / after: {} / {}",
            self.load_before, self.load_after
        )
    }
}

/// The workspace's commit: `commit <short hash>[ + uncommitted changes]`.
pub fn commit() -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let ws = workspace.to_str().unwrap();
    let head = sh("git", &["-C", ws, "rev-parse", "--short", "HEAD"]);
    let dirty = !sh(
        "git",
        &["-C", ws, "status", "--porcelain", "--untracked-files=no"],
    )
    .is_empty();
    format!(
        "commit {head}{}",
        if dirty { " + uncommitted changes" } else { "" }
    )
}

/// Stdout of a command, trimmed; empty when it cannot run or fails.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------- machine

/// The CPU's model name (`/proc/cpuinfo`).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|s| s.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default()
}

/// Total memory in GiB (`/proc/meminfo`).
pub fn mem_gib() -> f64 {
    let kb: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0 / 1024.0
}

/// The kernel release (`uname -r`).
pub fn kernel() -> String {
    sh("uname", &["-r"])
}

/// CPU, `nproc`, memory and kernel.
pub struct Host {
    pub cpu: String,
    pub nproc: String,
    pub mem_gib: f64,
    pub kernel: String,
}

impl Host {
    pub fn probe() -> Host {
        Host {
            cpu: cpu_model(),
            nproc: sh("nproc", &[]),
            mem_gib: mem_gib(),
            kernel: kernel(),
        }
    }

    /// `CPU, nproc N, M GiB RAM, Linux K`.
    pub fn describe(&self) -> String {
        format!(
            "{}, nproc {}, {:.0} GiB RAM, Linux {}",
            self.cpu, self.nproc, self.mem_gib, self.kernel
        )
    }
}

/// The first line of `s`, trimmed.
pub fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// `QEMU emulator version …` (empty without QEMU).
pub fn qemu_version() -> String {
    first_line(&sh("qemu-system-x86_64", &["--version"]))
}

/// CRIU's version number (empty without CRIU).
pub fn criu_version() -> String {
    first_line(&sh("criu", &["--version"]))
        .trim_start_matches("Version: ")
        .to_string()
}

/// Why the VMs cannot run here, if they cannot (no KVM, QEMU or nasm).
pub fn skip_vm() -> Option<String> {
    if !Path::new("/dev/kvm").exists() {
        return Some("/dev/kvm is missing".into());
    }
    for tool in ["qemu-system-x86_64", "nasm"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    None
}

// ---------------------------------------------------------------- figures

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `v` in ascending order (no NaN expected).
pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

/// Median of sorted values.
pub fn median(v: &[f64]) -> Option<f64> {
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Sorted values as a table cell: "median (min–max)", the value alone when
/// there is one, "–" when there is none.
pub fn spread(v: &[f64], decimals: usize) -> String {
    match (median(v), v.len()) {
        (None, _) => "–".into(),
        (Some(m), 1) => format!("{m:.decimals$}"),
        (Some(m), n) => format!(
            "{m:.decimals$} ({:.decimals$}–{:.decimals$})",
            v[0],
            v[n - 1]
        ),
    }
}

// ---------------------------------------------------------------- ferry CLI

/// Run the `ferry` CLI against `m`, bounded by `limit`: stdout and the wall
/// time from spawning the client to its exit. When it fails, the message
/// has its stderr and stdout joined by `join`.
pub async fn ferry_cli(
    m: &Member,
    args: &[&str],
    limit: Duration,
    join: &str,
) -> Result<(String, Duration), String> {
    let t0 = Instant::now();
    let child = tokio::process::Command::new(crate::bin_dir().join("ferry"))
        .args(args)
        .env("FERRY_DIR", &m.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| format!("run ferry: {err}"))?;
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| format!("ferry {args:?} did not finish within {limit:?}"))?
        .map_err(|err| format!("ferry: {err}"))?;
    let wall = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "ferry {args:?} failed ({}): {}{join}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.trim()
        ));
    }
    Ok((stdout, wall))
}

// ---------------------------------------------------------------- the doc

/// The doc a benchmark writes its results into, one section per build
/// profile between `<!-- BENCH:PROFILE:begin … -->` and
/// `<!-- BENCH:PROFILE:end -->`.
pub struct Doc {
    /// The binary's name, in the markers.
    pub bench: &'static str,
    /// What a new doc starts with, before the first section.
    pub intro: &'static str,
}

impl Doc {
    /// `old` (a doc's text, empty if there is none) with `profile`'s section
    /// replaced by `section`, or added at the end; the rest is kept.
    pub fn with_section(&self, old: &str, profile: &str, section: &str) -> String {
        let bench = self.bench;
        let begin = format!("<!-- {bench}:{profile}:begin");
        let end = format!("<!-- {bench}:{profile}:end -->");
        let block = format!(
            "{begin} (generated by {bench} --write-doc; do not edit) -->\n{}\n{end}",
            section.trim_end()
        );
        match (old.find(&begin), old.find(&end)) {
            (Some(b), Some(e)) if b < e => {
                format!("{}{}{}", &old[..b], block, &old[e + end.len()..])
            }
            _ if old.is_empty() => format!("{}\n{block}\n", self.intro),
            _ => format!("{}\n\n{block}\n", old.trim_end()),
        }
    }

    /// Replace `profile`'s section in the file at `path`.
    pub fn write(&self, path: &Path, profile: &str, section: &str) -> std::io::Result<()> {
        let old = std::fs::read_to_string(path).unwrap_or_default();
        std::fs::write(path, self.with_section(&old, profile, section))
    }

    /// Print the results and, with `--write-doc PATH`, write them into PATH;
    /// the exit status (1 when the doc cannot be written).
    pub fn publish(&self, path: Option<&Path>, profile: &str, text: &str) -> i32 {
        println!("{text}");
        let Some(p) = path else { return 0 };
        match self.write(p, profile, text) {
            Ok(()) => {
                eprintln!("wrote {}", p.display());
                0
            }
            Err(err) => {
                eprintln!("{}: cannot write {}: {err}", self.bench, p.display());
                1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: Doc = Doc {
        bench: "x-bench",
        intro: "# Intro\n",
    };

    #[test]
    fn median_of_sorted_values() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[1.0, 2.0, 9.0]), Some(2.0));
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), Some(3.0));
        assert_eq!(sorted(vec![9.0, 1.0, 4.0]), vec![1.0, 4.0, 9.0]);
    }

    #[test]
    fn spread_cells() {
        assert_eq!(spread(&[], 0), "–");
        assert_eq!(spread(&[12.4], 0), "12");
        assert_eq!(spread(&[0.714], 2), "0.71");
        assert_eq!(spread(&[10.0, 12.4, 15.6], 0), "12 (10–16)");
        assert_eq!(spread(&[1.0, 2.0], 1), "1.5 (1.0–2.0)");
    }

    #[test]
    fn new_doc_gets_the_intro() {
        let new = DOC.with_section("", "debug", "### Results\n\nfigures\n\n");
        assert_eq!(
            new,
            "# Intro\n\n\
             <!-- x-bench:debug:begin (generated by x-bench --write-doc; do not edit) -->\n\
             ### Results\n\nfigures\n\
             <!-- x-bench:debug:end -->\n"
        );
    }

    #[test]
    fn existing_section_is_replaced_and_the_rest_kept() {
        let old = "# Doc\n\ntext before\n\n\
                   <!-- x-bench:release:begin (generated by x-bench --write-doc; do not edit) -->\n\
                   old release\n\
                   <!-- x-bench:release:end -->\n\n\
                   <!-- x-bench:debug:begin (an older wording) -->\n\
                   old debug\n\
                   <!-- x-bench:debug:end -->\n\ntext after\n";
        let new = DOC.with_section(old, "debug", "new debug\n");
        assert_eq!(
            new,
            "# Doc\n\ntext before\n\n\
             <!-- x-bench:release:begin (generated by x-bench --write-doc; do not edit) -->\n\
             old release\n\
             <!-- x-bench:release:end -->\n\n\
             <!-- x-bench:debug:begin (generated by x-bench --write-doc; do not edit) -->\n\
             new debug\n\
             <!-- x-bench:debug:end -->\n\ntext after\n"
        );
        // Writing the same section again changes nothing.
        assert_eq!(DOC.with_section(&new, "debug", "new debug\n"), new);
    }

    #[test]
    fn absent_section_is_appended() {
        let old = "# Doc\n\n<!-- y-bench:debug:begin -->\nother\n<!-- y-bench:debug:end -->\n\n\n";
        let new = DOC.with_section(old, "debug", "figures");
        assert_eq!(
            new,
            "# Doc\n\n<!-- y-bench:debug:begin -->\nother\n<!-- y-bench:debug:end -->\n\n\
             <!-- x-bench:debug:begin (generated by x-bench --write-doc; do not edit) -->\n\
             figures\n\
             <!-- x-bench:debug:end -->\n"
        );
        // An end marker before the begin marker is no section: appended too.
        let odd = "<!-- x-bench:debug:end -->\n<!-- x-bench:debug:begin -->\n";
        assert!(DOC
            .with_section(odd, "debug", "f")
            .starts_with("<!-- x-bench:debug:end -->\n<!-- x-bench:debug:begin -->\n\n"));
    }

    #[test]
    fn doc_is_written_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.md");
        DOC.write(&p, "release", "one").unwrap();
        DOC.write(&p, "release", "two").unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("# Intro\n\n<!-- x-bench:release:begin"));
        assert!(text.contains("\ntwo\n") && !text.contains("one"));
    }

    #[test]
    fn arguments() {
        let mut a = Args::new(
            "x-bench",
            "usage",
            [
                "--reps",
                "3",
                "--parallel",
                "2, 4",
                "--secs",
                "1.5",
                "--write-doc",
                "d.md",
            ]
            .map(String::from),
        );
        assert_eq!(a.next_arg().as_deref(), Some("--reps"));
        assert_eq!(a.positive("--reps"), 3);
        assert_eq!(a.next_arg().as_deref(), Some("--parallel"));
        assert_eq!(a.positive_list("--parallel", "2,4"), vec![2, 4]);
        assert_eq!(a.next_arg().as_deref(), Some("--secs"));
        assert_eq!(a.parsed::<f64>("--secs"), 1.5);
        assert_eq!(a.next_arg().as_deref(), Some("--write-doc"));
        assert_eq!(a.path("--write-doc"), PathBuf::from("d.md"));
        assert_eq!(a.next_arg(), None);
        assert_eq!(positive("0"), None);
        assert_eq!(positive("-1"), None);
        assert_eq!(positive("7"), Some(7));
    }

    #[test]
    fn host_line() {
        let h = Host {
            cpu: "Some CPU".into(),
            nproc: "2".into(),
            mem_gib: 7.6,
            kernel: "6.1.0".into(),
        };
        assert_eq!(h.describe(), "Some CPU, nproc 2, 8 GiB RAM, Linux 6.1.0");
        assert_eq!(first_line("  a b \nc"), "a b");
    }
}

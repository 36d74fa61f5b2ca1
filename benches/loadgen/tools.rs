//! The outside programs the `warm` scenario compares against (nginx) and measures with
//! (wrk): found on `PATH` (and in the `sbin` directories a user's `PATH` may lack), or
//! installed with `apt-get` when the benchmark runs as root on a Debian-like machine.
//! When neither works, the caller skips what needs the tool and says why; a missing
//! tool is never an error of the benchmark.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A program and the Debian package that ships it.
#[derive(Clone, Copy, Debug)]
pub struct Tool {
    pub binary: &'static str,
    pub package: &'static str,
}

pub const NGINX: Tool = Tool { binary: "nginx", package: "nginx" };
pub const WRK: Tool = Tool { binary: "wrk", package: "wrk" };

/// Where a program is looked for besides `PATH`: nginx lives in `/usr/sbin`, which is not
/// on every user's `PATH`.
const ALSO_IN: [&str; 3] = ["/usr/sbin", "/usr/local/sbin", "/sbin"];

/// What to do about a tool.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Use(PathBuf),
    Install,
    Skip(String),
}

/// The tool's path, installing it first if it is missing and that is possible; otherwise
/// why it is not available.
pub fn find_or_install(tool: Tool) -> std::result::Result<PathBuf, String> {
    match plan(tool, find(tool.binary), is_root(), find("apt-get").is_some()) {
        Plan::Use(path) => Ok(path),
        Plan::Skip(why) => Err(why),
        Plan::Install => {
            println!("  {} is not installed: apt-get install -y {} ...", tool.binary, tool.package);
            install(tool.package)?;
            find(tool.binary)
                .ok_or_else(|| format!("apt-get installed {} but no {} is found", tool.package, tool.binary))
        }
    }
}

fn plan(tool: Tool, found: Option<PathBuf>, root: bool, apt: bool) -> Plan {
    match (found, root, apt) {
        (Some(path), _, _) => Plan::Use(path),
        (None, true, true) => Plan::Install,
        (None, false, _) => Plan::Skip(format!(
            "{} is not installed and this is not root, so it cannot be installed (as root: apt-get install {})",
            tool.binary, tool.package
        )),
        (None, true, false) => {
            Plan::Skip(format!("{} is not installed and there is no apt-get to install it with", tool.binary))
        }
    }
}

/// `apt-get install`; when the package lists are stale or absent (a fresh container),
/// `apt-get update` once and again.
fn install(package: &str) -> std::result::Result<(), String> {
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run apt-get: {e}"))
    };
    let install = ["install", "-y", "--no-install-recommends", package];
    if apt(&install)?.success() {
        return Ok(());
    }
    if !apt(&["update"])?.success() {
        return Err("apt-get update failed".into());
    }
    match apt(&install)? {
        status if status.success() => Ok(()),
        status => Err(format!("apt-get install {package} failed ({status})")),
    }
}

/// The first executable `binary` on `PATH` or in [`ALSO_IN`].
fn find(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(ALSO_IN.iter().map(PathBuf::from))
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether this process runs as root (effective uid 0, from `/proc/self/status`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| effective_uid(&status) == Some(0))
}

/// The effective uid: the second figure of the `Uid:` line (real, effective, saved, fs).
fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_found_tool_is_used_a_missing_one_installed_by_root_with_apt_or_skipped_with_the_reason() {
        let path = PathBuf::from("/usr/sbin/nginx");
        assert_eq!(plan(NGINX, Some(path.clone()), false, false), Plan::Use(path));
        assert_eq!(plan(NGINX, None, true, true), Plan::Install);
        let Plan::Skip(why) = plan(WRK, None, false, true) else { panic!("not root: skipped") };
        assert!(why.contains("not root") && why.contains("apt-get install wrk"), "{why}");
        let Plan::Skip(why) = plan(WRK, None, true, false) else { panic!("no apt: skipped") };
        assert!(why.contains("no apt-get"), "{why}");
    }

    #[test]
    fn the_effective_uid_is_the_second_figure_of_the_uid_line() {
        assert_eq!(effective_uid("Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t1\n"), Some(0));
        assert_eq!(effective_uid("Uid:\t0\t1000\t1000\t1000\n"), Some(1000));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }
}

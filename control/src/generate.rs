//! Manual pages and shell completions generated from the command-line
//! definition (`wgxdp generate man|completions`), so that they never
//! disagree with `--help`. The package (`cargo xtask package`) ships them.

use clap::Command;
use clap_complete::Shell;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Section 8: system administration commands and daemons.
const SECTION: &str = "8";

/// What every page says after the generated sections (roff).
const ENVIRONMENT_AND_FILES: &str = r#".SH ENVIRONMENT
.TP
\fBWGXDP_LOG\fR
Which log events are written to stderr (tracing env-filter syntax, e.g. \fBinfo\fR, \fBdebug\fR, \fBwgxdp_dataplane=debug\fR); default \fBinfo\fR.
.TP
\fBWGXDP_LOG_FORMAT\fR
\fBtext\fR (default) or \fBjson\fR: one JSON object per line, for log shippers. The \fB\-\-log\-format\fR option wins over it.
.SH FILES
.TP
\fI/etc/wgxdp/wgxdp.toml\fR
The configuration of \fBwgxdp serve\fR (an annotated example: \fI/etc/wgxdp/wgxdp.toml.example\fR).
.TP
\fI/var/lib/wgxdp/\fR
The API's database (systemd's StateDirectory of \fBwgxdp.service\fR).
.TP
\fI/run/wireguard/\fR
Userspace WireGuard control sockets, shared with wireguard-go and \fBwg\fR(8).
.SH CAPABILITIES
\fBwgxdp serve\fR needs CAP_NET_ADMIN (XDP attachment, the host TUN interface and its routes), CAP_NET_RAW (AF_XDP sockets), CAP_BPF (the XDP program and its maps) and CAP_PERFMON (the verifier accepts the program's packet\-pointer arithmetic only with it), plus either CAP_IPC_LOCK or an RLIMIT_MEMLOCK large enough for its AF_XDP memory. It names what is missing before it changes anything. \fBwgxdp.service\fR grants exactly these four and sets LimitMEMLOCK=infinity.
"#;

/// The page for `cmd` (the whole program, or one subcommand of a built
/// command): name, synopsis, description, options, subcommands, version,
/// then environment and files.
fn render(cmd: Command, out: &mut dyn Write) -> io::Result<()> {
    let man = clap_mangen::Man::new(cmd).section(SECTION).manual("wgxdp manual");
    man.render(out)?;
    out.write_all(ENVIRONMENT_AND_FILES.as_bytes())
}

/// Writes `wgxdp.8` (every subcommand listed with what it does) to `out`.
pub fn man_page(cmd: Command, out: &mut dyn Write) -> io::Result<()> {
    render(prepare(cmd), out)
}

/// Writes `wgxdp.8` and one page per subcommand, at every depth
/// (`wgxdp-serve.8`, `wgxdp-vpn-create.8`, …), into `dir`; returns their paths.
pub fn man_pages(cmd: Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    fn walk(cmd: Command, dir: &Path, written: &mut Vec<PathBuf>) -> io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            walk(sub, dir, written)?;
        }
        let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name()).to_owned();
        let path = dir.join(format!("{name}.{SECTION}"));
        let mut file = io::BufWriter::new(std::fs::File::create(&path)?);
        render(cmd, &mut file)?;
        file.flush()?;
        written.push(path);
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    walk(prepare(cmd), dir, &mut written)?;
    Ok(written)
}

/// Builds `cmd` (so subcommands get their `wgxdp-…` display names) without
/// clap's `help` subcommand, which is not worth a page.
fn prepare(cmd: Command) -> Command {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: Shell, mut cmd: Command, out: &mut dyn Write) {
    let name = cmd.get_name().to_owned();
    clap_complete::generate(shell, &mut cmd, name, out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn tool() -> Command {
        Command::new("tool")
            .version("1.2.3")
            .about("A tool")
            .arg(Arg::new("verbose").long("verbose").action(clap::ArgAction::SetTrue).help("Say more"))
            .subcommand(Command::new("run").about("Run it").arg(Arg::new("config").long("config").help("Where")))
            .subcommand(Command::new("secret").hide(true).about("Not documented"))
            .subcommand(Command::new("group").about("Grouped").subcommand(Command::new("leaf").about("A leaf")))
    }

    #[test]
    fn the_page_lists_visible_subcommands_in_section_8() {
        let mut out = Vec::new();
        man_page(tool(), &mut out).unwrap();
        let page = String::from_utf8(out).unwrap();
        assert!(page.starts_with(".ie") || page.contains(".TH tool 8"), "{page}");
        assert!(page.contains(".TH tool 8"), "{page}");
        assert!(page.contains("tool\\-run(8)") && page.contains("Run it"), "{page}");
        assert!(page.contains("tool\\-group(8)"), "{page}");
        assert!(!page.contains("secret"), "hidden subcommands stay out of the page: {page}");
        assert!(page.contains(".SH ENVIRONMENT") && page.contains("WGXDP_LOG_FORMAT"), "{page}");
    }

    #[test]
    fn one_page_per_subcommand_at_every_depth() {
        let dir = std::env::temp_dir().join(format!("wgxdp-man-{}", std::process::id()));
        let mut names: Vec<String> = man_pages(tool(), &dir)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["tool-group-leaf.8", "tool-group.8", "tool-run.8", "tool.8"]);
        let run = std::fs::read_to_string(dir.join("tool-run.8")).unwrap();
        assert!(run.contains("\\-\\-config"), "{run}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn completions_name_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            completions(shell, tool(), &mut out);
            let script = String::from_utf8(out).unwrap();
            assert!(script.contains("run") && script.contains("group"), "{shell}: {script}");
        }
    }
}

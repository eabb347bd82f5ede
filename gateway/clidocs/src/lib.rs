//! Man pages and shell completions for the holdfast command-line tools, written from the
//! same clap definitions the tools parse their arguments with, so they never drift. Each
//! tool has a hidden `generate-docs DIR` subcommand that calls [`write`];
//! `scripts/package.sh` runs it for the Debian package. Writes files; nothing else.
#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;

/// Writes, under `out`:
/// - `man/NAME.1`, and `man/NAME-SUB.1` for every visible subcommand;
/// - `completions/NAME.bash`, `completions/_NAME` (zsh) and `completions/NAME.fish`.
///
/// Returns the files written.
pub fn write(cmd: Command, out: &Path) -> io::Result<Vec<PathBuf>> {
    let name = cmd.get_name().to_string();
    let man = out.join("man");
    let completions = out.join("completions");
    fs::create_dir_all(&man)?;
    fs::create_dir_all(&completions)?;
    let mut written = Vec::new();

    // One page for the command and one for each visible subcommand (NAME-SUB.1).
    clap_mangen::generate_to(cmd.clone(), &man)?;
    let mut pages: Vec<PathBuf> = fs::read_dir(&man)?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()?;
    pages.retain(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(name.as_str()) && n.ends_with(".1"))
    });
    pages.sort();
    written.extend(pages);

    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let path = completions.join(file);
        let mut f = fs::File::create(&path)?;
        clap_complete::generate(shell, &mut cmd.clone(), name.clone(), &mut f);
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_for_a_command_and_its_visible_subcommands() {
        let cmd = Command::new("tool")
            .about("does things")
            .subcommand(Command::new("run").about("runs"))
            .subcommand(Command::new("secret").hide(true));
        let out = std::env::temp_dir().join(format!("holdfast-clidocs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&out);
        let files = write(cmd, &out).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.strip_prefix(&out).unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "man/tool-run.1",
                "man/tool.1",
                "completions/tool.bash",
                "completions/_tool",
                "completions/tool.fish"
            ]
        );
        let page = fs::read_to_string(out.join("man/tool.1")).unwrap();
        assert!(
            page.contains(".TH tool 1") && page.contains("does things"),
            "{page}"
        );
        let _ = fs::remove_dir_all(&out);
    }
}

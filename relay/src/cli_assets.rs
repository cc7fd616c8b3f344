//! Shell completions and man pages from the binary's own clap definition, written when
//! `cargo xtask dist` runs the binary with `CLI_ASSETS_DIR=<dir>` (so they always match the
//! flags of the binary being shipped). The workspace's one copy: mqproxy's and udp-over-tcp's
//! binaries include this file by `#[path]`.

use std::path::Path;

use clap_complete::Shell;

/// The environment variable `cargo xtask dist` sets.
pub const ENV: &str = "CLI_ASSETS_DIR";

/// With [`ENV`] set: writes `<name>.bash`, `_<name>` (zsh), `<name>.fish` and `<name>.1` (plus
/// `<name>-<subcommand>.1` per subcommand) into that directory and returns `Ok(true)`; the
/// binary then exits. Without it: `Ok(false)`.
pub fn write_if_asked(cmd: clap::Command) -> std::io::Result<bool> {
    let Some(dir) = std::env::var_os(ENV) else {
        return Ok(false);
    };
    write(cmd, Path::new(&dir))?;
    Ok(true)
}

fn write(mut cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let name = cmd.get_name().to_owned();
    // Man pages from an unbuilt copy: completing builds the command, which adds `help`
    // subcommands that would each get a page.
    clap_mangen::generate_to(cmd.clone(), dir)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, dir)?;
    }
    Ok(())
}

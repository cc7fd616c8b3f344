//! The remote shell scripts `deploy` runs over `ssh`: the shared preamble, start/stop/restart
//! for each service manager, and the prepare, install, swap and restore steps.

use super::*;

impl Deployer {
    /// Variables every remote script starts with; `--start-cmd`/`--stop-cmd` may use them.
    pub(super) fn preamble(&self) -> String {
        let l = &self.layout;
        let p = self.opts.product;
        format!(
            "set -eu\n\
             set -f  # no globbing: ${args_var} is split into words, never expanded as patterns\n\
             # a dynamic user runs the service: directories and the binary must be readable;\n\
             # files holding settings or secrets get 0600 explicitly.\n\
             umask 022\n\
             NAME={name}\n\
             BIN={bin}\n\
             ENV_FILE={env}\n\
             UNIT={unit}\n\
             RUN_DIR={run}\n\
             PIDFILE=\"$RUN_DIR/$NAME.pid\"\n\
             LOG=\"$RUN_DIR/$NAME.log\"\n\
             STATE_DIRECTORY={state}\n\
             CREDENTIALS_DIRECTORY={etc}\n",
            args_var = p.args_var(),
            name = sh_quote(l.name),
            bin = sh_quote(&l.bin()),
            env = sh_quote(&l.env_file()),
            unit = sh_quote(&l.unit()),
            run = sh_quote(&l.run_dir()),
            state = sh_quote(&l.state_dir()),
            etc = sh_quote(&l.etc()),
        )
    }

    pub(super) fn start_snippet(&self) -> String {
        match &self.opts.manager {
            Manager::Systemd => "systemctl daemon-reload\n\
                                 systemctl enable --quiet \"$NAME.service\"\n\
                                 systemctl restart \"$NAME.service\"\n"
                .to_owned(),
            Manager::Shell { start: Some(s), .. } => format!("{s}\n"),
            Manager::Shell { start: None, .. } => format!(
                "mkdir -p \"$RUN_DIR\" \"$STATE_DIRECTORY\"\n\
                 # setsid: the service must survive the end of this ssh session.\n\
                 ( set -a; . \"$ENV_FILE\"; set +a; export STATE_DIRECTORY CREDENTIALS_DIRECTORY\n  \
                   cd \"$RUN_DIR\"; exec setsid nohup \"$BIN\" {fixed} ${var} ) </dev/null >>\"$LOG\" 2>&1 &\n\
                 echo $! > \"$PIDFILE\"\n",
                fixed = self.opts.product.shell_fixed_args(),
                var = self.opts.product.args_var(),
            ),
        }
    }

    pub(super) fn stop_snippet(&self) -> String {
        match &self.opts.manager {
            Manager::Systemd => "systemctl stop \"$NAME.service\" || true\n".into(),
            Manager::Shell { stop: Some(s), .. } => format!("{s}\n"),
            // Waits for the old process to be gone (a zombie counts as gone) so that the new
            // one can bind the port.
            Manager::Shell { stop: None, .. } => "\
if [ -f \"$PIDFILE\" ]; then
  pid=$(cat \"$PIDFILE\")
  kill \"$pid\" 2>/dev/null || true
  i=0
  while [ -e \"/proc/$pid\" ] && ! grep -q '^State:.*Z' \"/proc/$pid/status\" 2>/dev/null && [ \"$i\" -lt 50 ]; do
    sleep 0.1; i=$((i + 1))
  done
  kill -9 \"$pid\" 2>/dev/null || true
  rm -f \"$PIDFILE\"
fi
"
            .into(),
        }
    }

    pub(super) fn restart_snippet(&self) -> String {
        match self.opts.manager {
            Manager::Systemd => self.start_snippet(),
            Manager::Shell { .. } => format!("{}{}", self.stop_snippet(), self.start_snippet()),
        }
    }

    /// Prints the environment file between markers, for the health check's port.
    pub(super) fn print_env_snippet(&self) -> &'static str {
        "echo '--- env ---'\ncat \"$ENV_FILE\" 2>/dev/null || true\necho '--- end ---'\n"
    }

    /// The last log lines of the service, between markers.
    pub(super) fn print_log_snippet(&self) -> &'static str {
        match self.opts.manager {
            Manager::Systemd => "echo '--- log ---'\njournalctl -u \"$NAME.service\" -n 20 --no-pager 2>/dev/null || true\necho '--- end ---'\n",
            Manager::Shell { .. } => "echo '--- log ---'\ntail -n 20 \"$LOG\" 2>/dev/null || true\necho '--- end ---'\n",
        }
    }

    pub(super) fn prepare_script(&self) -> String {
        let mut s = self.preamble();
        if matches!(self.opts.manager, Manager::Systemd) {
            s.push_str(
                "command -v systemctl >/dev/null || { echo \"no systemctl on $(hostname): use --no-systemd or --start-cmd\" >&2; exit 1; }\n",
            );
        }
        s.push_str("mkdir -p \"$(dirname \"$BIN\")\"\n");
        s
    }

    pub(super) fn install_script(&self, uploaded: &str) -> String {
        let p = self.opts.product;
        let mut s = self.preamble();
        s.push_str(&format!(
            "new={}\n\
             [ -f \"$new\" ] || {{ echo \"uploaded binary $new is missing\" >&2; exit 1; }}\n\
             chmod 0755 \"$new\"\n\
             # Keep the running binary as .prev (a hard link: no copy, no window without it).\n\
             if [ -e \"$BIN\" ]; then ln -f \"$BIN\" \"$BIN.prev.tmp\"; mv -f \"$BIN.prev.tmp\" \"$BIN.prev\"; fi\n\
             mv -f \"$new\" \"$BIN\"\n\
             mkdir -p \"$(dirname \"$UNIT\")\" \"$CREDENTIALS_DIRECTORY\"\n\
             cat > \"$UNIT.tmp\" <<'XTASK_UNIT_EOF'\n{unit}XTASK_UNIT_EOF\n\
             chmod 0644 \"$UNIT.tmp\"\n\
             mv -f \"$UNIT.tmp\" \"$UNIT\"\n\
             # The environment file is the user's once created: only the *_ARGS line is ours.\n\
             if [ ! -e \"$ENV_FILE\" ]; then\n\
             cat > \"$ENV_FILE.tmp\" <<'XTASK_ENV_EOF'\n{env}XTASK_ENV_EOF\n\
             chmod 0600 \"$ENV_FILE.tmp\"\n\
             mv -f \"$ENV_FILE.tmp\" \"$ENV_FILE\"\n\
             fi\n",
            sh_quote(uploaded),
            unit = ensure_newline(&self.layout.unit_text(p)),
            env = ensure_newline(p.env_file()),
        ));
        if let Some(args) = &self.opts.args {
            let line = format!("{}=\"{args}\"", p.args_var());
            s.push_str(&format!(
                "grep -v '^{var}=' \"$ENV_FILE\" > \"$ENV_FILE.tmp\" || true\n\
                 printf '%s\\n' {line} >> \"$ENV_FILE.tmp\"\n\
                 chmod 0600 \"$ENV_FILE.tmp\"\n\
                 mv -f \"$ENV_FILE.tmp\" \"$ENV_FILE\"\n",
                var = p.args_var(),
                line = sh_quote(&line),
            ));
        }
        if p == Product::Mqproxy {
            s.push_str(
                "# The token clients present; created once, readable by root only.\n\
                 if [ ! -e \"$CREDENTIALS_DIRECTORY/token\" ]; then\n  \
                   (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > \"$CREDENTIALS_DIRECTORY/token.tmp\")\n  \
                   mv -f \"$CREDENTIALS_DIRECTORY/token.tmp\" \"$CREDENTIALS_DIRECTORY/token\"\n  \
                   echo \"created the client token $CREDENTIALS_DIRECTORY/token\" >&2\n\
                 fi\n",
            );
        }
        s.push_str(&self.restart_snippet());
        s.push_str(self.print_env_snippet());
        s
    }

    /// After a failed health check: keep the failed binary as .failed, put .prev back in
    /// place (a copy, so .prev stays for a later --rollback), restart.
    pub(super) fn restore_script(&self) -> String {
        let mut s = self.preamble();
        s.push_str(self.print_log_snippet());
        s.push_str("if [ ! -e \"$BIN.prev\" ]; then\n");
        s.push_str(&indent(&self.stop_snippet()));
        s.push_str(
            "  echo \"no previous binary $BIN.prev to roll back to (first deploy?): service stopped\" >&2\n  exit 1\nfi\n\
             ln -f \"$BIN\" \"$BIN.failed.tmp\"; mv -f \"$BIN.failed.tmp\" \"$BIN.failed\"\n\
             cp -p \"$BIN.prev\" \"$BIN.rb.tmp\"; mv -f \"$BIN.rb.tmp\" \"$BIN\"\n",
        );
        s.push_str(&self.restart_snippet());
        s.push_str(self.print_env_snippet());
        s
    }

    /// `--rollback`: swap the binary and .prev, so a second rollback goes forward again.
    pub(super) fn swap_script(&self) -> String {
        let mut s = self.preamble();
        s.push_str(
            "[ -e \"$BIN.prev\" ] || { echo \"no previous binary $BIN.prev: nothing to roll back to\" >&2; exit 1; }\n\
             cp -p \"$BIN.prev\" \"$BIN.rb.tmp\"\n\
             ln -f \"$BIN\" \"$BIN.cur.tmp\"\n\
             mv -f \"$BIN.rb.tmp\" \"$BIN\"\n\
             mv -f \"$BIN.cur.tmp\" \"$BIN.prev\"\n",
        );
        s.push_str(&self.restart_snippet());
        s.push_str(self.print_env_snippet());
        s
    }

    /// The preamble plus a snippet that leaves the service's pid in `$pid` (empty when unknown,
    /// e.g. a --start-cmd that keeps no pid file), once that pid runs the installed binary.
    pub(super) fn service_pid_script(&self) -> String {
        let mut script = self.preamble();
        script.push_str(match self.opts.manager {
            Manager::Systemd => {
                "pid=$(systemctl show -p MainPID --value \"$NAME.service\" 2>/dev/null || true)\n"
            }
            Manager::Shell { .. } => "pid=$(cat \"$PIDFILE\" 2>/dev/null || true)\n",
        });
        script.push_str(&format!(
            "[ \"$pid\" != 0 ] || pid=\n\
             if [ -n \"$pid\" ]; then\n\
             # The service may still be exec'ing: wait until the pid runs the binary.\n\
             i=0\n\
             while [ \"$(readlink \"/proc/$pid/exe\" 2>/dev/null)\" != \"$BIN\" ] && [ \"$i\" -lt {polls} ]; do sleep 0.25; i=$((i + 1)); done\n\
             fi\n",
            polls = self.polls()
        ));
        script
    }
}

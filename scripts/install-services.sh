#!/usr/bin/env bash
# Install the real services the integration tests run on loopback: Postfix, BIND 9,
# OpenSSH and Dovecot; and Chromium, the browser the board's test opens the page in.
# Idempotent; needs root (or sudo); Debian/Ubuntu (apt). The tests start their own
# instances in temporary directories; nothing here is left running.
# `--python-only` installs only what `python3 -m venv` needs (the Makefile's setup, which runs
# before anything else on a bare machine).
#
# Postfix is installed with "No configuration": no /etc/postfix/main.cf and no system
# instance. Keep it that way: mailrec and the tests run every Postfix command with `-c DIR`
# of their own instance, and a missing /etc/postfix/main.cf is what proves they do.
set -euo pipefail

# While packages install, no daemon may start (see below); a run killed mid-way may have left
# this file behind, which would keep blocking every service start on the machine.
POLICY=/usr/sbin/policy-rc.d
MARK="# install-services.sh: no daemon starts while it installs"
if [ "$(id -u)" -eq 0 ] && [ -e "$POLICY" ] && grep -qxF "$MARK" "$POLICY"; then
  rm -f "$POLICY"
fi

need=()
if [ "${1:-}" != "--python-only" ]; then
  command -v postfix >/dev/null 2>&1 || [ -x /usr/sbin/postfix ] || need+=(postfix)
  [ -x /usr/sbin/named ] || need+=(bind9)
  command -v tsig-keygen >/dev/null 2>&1 || [ -x /usr/sbin/tsig-keygen ] || need+=(bind9-utils)
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v ssh-keyscan >/dev/null 2>&1 || need+=(openssh-client)
  [ -x /usr/sbin/dovecot ] || need+=(dovecot-core dovecot-imapd)
  # The e2e onprem host's users drain their old mailboxes over POP3 (tests/e2e/topology.py).
  [ -x /usr/lib/dovecot/pop3 ] || need+=(dovecot-pop3d)
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  # The board's browser test (Playwright drives it); a font, as recommends are not installed.
  [ -x /usr/bin/chromium ] || need+=(chromium fonts-dejavu-core)
fi
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need+=(python3-venv)

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-services: not root; missing: ${need[*]} (integration tests will skip)" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# Postfix must not ask which kind of mail system this is, nor start a system instance.
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
echo "postfix postfix/mailname string localhost" | $SUDO debconf-set-selections

# Packages must not start their daemons (system named on :53, dovecot on :143, ...): the tests
# run their own. policy-rc.d (exit 101: "action forbidden") is honoured by invoke-rc.d and
# deb-systemd-invoke; one that is already there (Docker images ship one) is left alone, unless
# it is ours, left behind by a run that was killed.
if [ ! -e "$POLICY" ] || grep -qxF "$MARK" "$POLICY"; then
  printf '#!/bin/sh\n%s\nexit 101\n' "$MARK" | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod 0755 "$POLICY"
  trap '$SUDO rm -f "$POLICY"' EXIT
fi

# A run interrupted earlier may have left packages unconfigured: finish them first. Keep
# changed conffiles of upgraded dependencies (never a prompt, there is no terminal).
APT_OPTS=(-y -qq --no-install-recommends
          -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
$SUDO dpkg --configure -a
$SUDO apt-get update -qq
$SUDO apt-get install "${APT_OPTS[@]}" "${need[@]}" >/dev/null
echo "install-services: installed ${need[*]}"

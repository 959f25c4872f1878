#!/usr/bin/env bash
# Install the real services the integration tests run on loopback: Postfix, BIND 9,
# OpenSSH and Dovecot. Idempotent; needs root (or sudo). The tests start their own
# instances in temporary directories; nothing here is left running.
set -euo pipefail

need=()
command -v postfix >/dev/null 2>&1 || [ -x /usr/sbin/postfix ] || need+=(postfix)
[ -x /usr/sbin/named ] || need+=(bind9)
command -v tsig-keygen >/dev/null 2>&1 || [ -x /usr/sbin/tsig-keygen ] || need+=(bind9-utils)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keyscan >/dev/null 2>&1 || need+=(openssh-client)
[ -x /usr/sbin/dovecot ] || need+=(dovecot-core dovecot-imapd)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
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
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "install-services: installed ${need[*]}"

"""The e2e network: every part on its own loopback address (tests/e2e/README.md).

Addresses 127.0.0.50-.79 are the e2e run's only; the integration tests use others, so both
can run on one machine.
"""

from __future__ import annotations

DOMAIN = "example.co.jp"
INTERNET_DOMAIN = "example.net"  # where outside senders live and replies go

ONPREM = "127.0.0.52"  # onprem Postfix (SMTP, submission from the office), sshd, Dovecot POP/IMAP
DNS = "127.0.0.53"  # BIND 9: the company's zone, RFC 2136 + TSIG
ROUTER = "127.0.0.57"  # the RTX emulator over SSH
RENTAL = "127.0.0.58"  # the rental: Postfix + Dovecot + sshd (the `ssh` provider)
INTERNET_MX = "127.0.0.60"  # example.net's receiving MTA (aiosmtpd, checks SPF)
OFFICE_LINE_A = "127.0.0.61"  # the office line the policy route sends tcp/25 through
OFFICE_LINE_B = "127.0.0.62"  # the other line (the default route before the policy)
OUTSIDE_SENDERS = "127.0.0.70"  # the Internet's senders to the company
OUTSIDER = "127.0.0.71"  # a host outside every whitelist (relay attempts must fail)

ONPREM_MX_NAME = f"mail.{DOMAIN}."
RENTAL_MX_NAME = "mx.rental.test."
RENTAL_SMTP_NAME = "smtp.rental.test"

# Every SMTP server of the run listens on this port (never 25: a system Postfix may hold it);
# the e2e Internet's MTAs deliver to an MX's address on it.
SMTP_PORT = 2525
ONPREM_POP_PORT = 1110
ONPREM_IMAP_PORT = 1143
RENTAL_IMAP_PORT = 1143
E2E_ID_HEADER = "X-E2E-Id"  # every message of the run carries its unique id here

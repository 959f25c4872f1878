"""Malformed state files through the real CLI: exit 1, a message naming file, line and field,
no secret value in any output, and the lab untouched (DESIGN sections 1 and 4)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.lab.layout import LabLayout
from tests.conftest import run_cli, tree_digest

SECRET = "hunter2"  # the sentinel "secret value": it must never be printed

# One valid state in one file; every case below changes one thing. Line numbers (1-based):
#  1 version   11 rental.provider   18 dns:          25 router:         34 users:
#  2 domain    14 relay_port        19 provider      27 connect         35 suga
#  4 connect   16 spf               20 server        28 admin_password  36 tanaka
#  6 mx_host   17 whitelist         21 tsig          31 gateway         37 policy:
#  8 mailbox                        22 mx  23 ttl    32 otherwise       38 max_change_pct
#                                   24 cutover_ttl                      39 quiet_period
BASE = """\
version: 1
domain: example.co.jp
onprem:
  connect: ssh://root@mail.example.co.jp:22
  config_dir: /etc/postfix
  mx_host: mail.example.co.jp.
  public_ip: 198.51.100.10
  mailbox: maildir:~/Maildir
  state: active
rental:
  provider: manual
  mx_host: example.sakura.ne.jp.
  smtp_host: example.sakura.ne.jp
  relay_port: 25
  submission_port: 587
  spf: "include:_spf.example.sakura.ne.jp"
  whitelist: [203.0.113.8/29]
dns:
  provider: rfc2136
  server: 198.51.100.53:53
  tsig: {name: mailrec., algorithm: hmac-sha256, secret: file:/etc/mailrec/tsig}
  mx: onprem
  ttl: 3600
  cutover_ttl: 300
router:
  provider: rtx
  connect: ssh://admin@192.168.0.1
  admin_password: env:RTX_ADMIN
  smtp_route:
    filter: 10
    gateway: 192.168.0.254
    otherwise: tunnel 2
    egress_ip: 203.0.113.9
users:
  suga: {inbound: onprem, outbound: onprem}
  tanaka: {inbound: onprem, outbound: onprem}
policy:
  max_change_pct: 30
  quiet_period: 48h
"""

USERS_BLOCK = """\
users:
  suga: {inbound: onprem, outbound: onprem}
  tanaka: {inbound: onprem, outbound: onprem}
"""


# Hostile YAML (issue "fail closed", finding 10), each appended to BASE from line 40 on.
# A "billion laughs": 9 levels of 9 aliases, 9^9 strings once expanded.
ALIAS_BOMB = "".join(
    f"lol{n}: &lol{n} [{', '.join([f'*lol{n - 1}'] * 9) if n > 1 else ', '.join(['lol'] * 9)}]\n"
    for n in range(1, 10)
)
DEEP_FLOW = "deep: " + "[" * 2000 + "]" * 2000 + "\n"  # ruamel alone takes seconds on this
DEEP_BLOCK = "deep:\n" + "".join(" " * n + f"k{n}:\n" for n in range(1, 100)) + " " * 100 + "x\n"
RECURSIVE_ALIAS = "loop: &loop [*loop]\n"
ARABIC_TEN = "\u0661\u0660"  # Arabic-Indic "10": int() reads it as 10


def edit(old: str, new: str, text: str = BASE) -> str:
    """BASE with exactly one occurrence of `old` replaced."""
    assert text.count(old) == 1, f"{old!r} must occur exactly once"
    return text.replace(old, new)


@dataclass(frozen=True)
class Case:
    id: str
    # A YAML text (written as state.yaml), {name: text} (a state directory), or None (the
    # state path does not exist).
    state: str | dict[str, str] | None
    expect: str  # a substring of the error message
    line: int | None  # the line in file:line:col, or None when no line applies
    field: str = ""  # the field named before the message ("" when none)
    file: str = ""  # the file the message names (default: state.yaml, or the directory)


CASES = [
    # --- YAML itself ---------------------------------------------------------------------
    Case("yaml-syntax", edit("  mx: onprem\n", "  mx: [onprem\n"), "YAML syntax", 23),
    Case("yaml-mapping-in-value", edit("domain: example.co.jp", "domain: example.co.jp: x"),
         "mapping values are not allowed", 2),
    Case("tab-indentation", edit("  ttl: 3600\n", "\tttl: 3600\n"), "tab", 23),
    Case("unclosed-quote-on-a-secret",
         edit("admin_password: env:RTX_ADMIN", f'admin_password: "{SECRET}'),
         "never closed", 28),
    Case("empty-file", "", "empty", 1),
    Case("comments-only", "# nothing here yet\n", "empty", 1),
    Case("top-level-list", "- version: 1\n- domain: example.co.jp\n", "must be a mapping", 1),
    Case("top-level-scalar", "just some text\n", "must be a mapping", 1),
    # --- keys ----------------------------------------------------------------------------
    Case("unknown-top-level-key", edit("policy:\n", "polcy:\n"),
         "unknown key 'polcy' (did you mean 'policy'?)", 37, "polcy"),
    Case("top-level-key-of-a-section", edit("policy:\n", "ttl: 60\npolicy:\n"),
         "did you mean 'dns.ttl'?", 37, "ttl"),
    Case("unknown-nested-key", edit("  cutover_ttl: 300\n", "  cutover-ttl: 300\n"),
         "unknown key 'cutover-ttl' (did you mean 'cutover_ttl'?)", 24, "dns.cutover-ttl"),
    Case("unknown-nested-key-typo", edit("  ttl: 3600\n", "  ttl: 3600\n  tll: 60\n"),
         "did you mean 'ttl'?", 24, "dns.tll"),
    Case("unknown-user-key", edit("  suga: {inbound: onprem,", "  suga: {inbund: onprem,"),
         "unknown key 'inbund' (did you mean 'inbound'?)", 35, "users.suga.inbund"),
    Case("missing-domain", edit("domain: example.co.jp\n", ""),
         "required field is missing", 1, "domain"),
    Case("missing-section", BASE[: BASE.index("rental:")] + BASE[BASE.index("dns:"):],
         "required field is missing", 1, "rental"),
    Case("version-2", edit("version: 1", "version: 2"), "unsupported version 2", 1, "version"),
    Case("duplicate-user",
         edit("  tanaka: {inbound: onprem, outbound: onprem}\n",
              "  tanaka: {inbound: onprem, outbound: onprem}\n"
              "  suga: {inbound: rental, outbound: onprem}\n"),
         "duplicate key 'suga' (first defined at line 35)", 37, "users.suga"),
    Case("duplicate-top-level-key-in-one-file", edit("policy:\n", "domain: example.com\npolicy:\n"),
         "duplicate key 'domain' (first defined at line 2)", 37, "domain"),
    Case("duplicate-secret-key",
         edit("secret: file:/etc/mailrec/tsig}", f"secret: {SECRET}, secret: file:/x}}"),
         "duplicate key 'secret'", 21, "dns.tsig.secret"),
    Case("same-key-in-two-files",
         {"a.yaml": BASE, "b.yaml": "# more people\nusers:\n  sato: {}\n"},
         "defined twice (also in", 2, "users", file="b.yaml"),
    Case("bad-entry-in-second-file",
         {"mailrec.yaml": edit(USERS_BLOCK, ""),
          "users.yaml": "users:\n  suga: {inbound: rental}\n  Tanaka: {}\n"},
         "user name 'Tanaka' is not allowed", 3, "users.Tanaka", file="users.yaml"),
    # --- types and values -----------------------------------------------------------------
    Case("ttl-not-a-number", edit("  ttl: 3600\n", '  ttl: "abc"\n'),
         "valid integer", 23, "dns.ttl"),
    Case("port-out-of-range", edit("relay_port: 25", "relay_port: 70000"),
         "less than or equal to 65535", 14, "rental.relay_port"),
    Case("mx-side-unknown", edit("  mx: onprem\n", "  mx: cloud\n"),
         "'onprem' or 'rental'", 22, "dns.mx"),
    Case("cidr-host-bits", edit("[203.0.113.8/29]", "[203.0.113.9/29]"),
         "did you mean 203.0.113.8/29?", 17, "rental.whitelist.0"),
    Case("whitelist-not-a-cidr", edit("[203.0.113.8/29]", "[203.0.113.8/29, office]"),
         "'office' is not a network", 17, "rental.whitelist.1"),
    Case("user-upper-case", edit("  suga:", "  Suga:"),
         "user name 'Suga' is not allowed", 35, "users.Suga"),
    Case("user-with-space", edit("  suga:", "  a b:"),
         "user name 'a b' is not allowed", 35, "users.a b"),
    Case("user-option-like", edit("  suga:", "  -rf:"),
         "user name '-rf' is not allowed", 35, "users.-rf"),
    Case("user-shell-meta", edit("  suga:", "  x;rm:"),
         "user name 'x;rm' is not allowed", 35, "users.x;rm"),
    Case("user-unicode", edit("  suga:", "  すが:"),
         "user name 'すが' is not allowed", 35, "users.すが"),
    Case("user-read-as-number", edit("  suga:", "  007:"),
         "read as a number", 35, "users.7"),
    Case("users-not-a-mapping", edit(USERS_BLOCK, "users: [suga, tanaka]\n"),
         "valid dictionary", 34, "users"),
    Case("inline-secret", edit("secret: file:/etc/mailrec/tsig", f"secret: {SECRET}"),
         "never written inline", 21, "dns.tsig.secret"),
    Case("inline-router-password",
         edit("admin_password: env:RTX_ADMIN", f"admin_password: {SECRET}"),
         "never written inline", 28, "router.admin_password"),
    Case("secret-env-bad-name", edit("secret: file:/etc/mailrec/tsig", "secret: env:1BAD-NAME"),
         "environment variable name", 21, "dns.tsig.secret"),
    Case("secret-file-relative", edit("secret: file:/etc/mailrec/tsig", "secret: file:tsig"),
         "absolute path", 21, "dns.tsig.secret"),
    Case("password-in-connect-url",
         edit("connect: ssh://admin@192.168.0.1", f"connect: ssh://admin:{SECRET}@192.168.0.1"),
         "no password in the URL", 27, "router.connect"),
    Case("password-with-at-sign-in-connect-url",
         edit("connect: ssh://admin@192.168.0.1",
              f"connect: ssh://admin:{SECRET}@/{SECRET}@192.168.0.1"),
         "ssh://admin:***@192.168.0.1", 27, "router.connect"),
    Case("bad-provider", edit("  provider: manual\n", "  provider: sakura\n"),
         "'sakura' is not a provider", 11, "rental.provider"),
    Case("bad-plugin-syntax", edit("  provider: manual\n", "  provider: my.module.Class\n"),
         "python.module:Class", 11, "rental.provider"),
    Case("cutover-ttl-above-ttl", edit("  cutover_ttl: 300\n", "  cutover_ttl: 7200\n"),
         "cutover_ttl (7200) must not exceed ttl (3600)", 24, "dns.cutover_ttl"),
    Case("rfc2136-without-server", edit("  server: 198.51.100.53:53\n", ""),
         "required with provider rfc2136", 18, "dns.server"),
    Case("rfc2136-without-tsig",
         edit("  tsig: {name: mailrec., algorithm: hmac-sha256, secret: file:/etc/mailrec/tsig}\n",
              ""),
         "required with provider rfc2136", 18, "dns.tsig"),
    Case("bad-connect-url",
         edit("connect: ssh://root@mail.example.co.jp:22", "connect: http://mail.example.co.jp"),
         "is not a connection", 4, "onprem.connect"),
    Case("gateway-bad-address", edit("gateway: 192.168.0.254", "gateway: 999.1.1.1"),
         "'999.1.1.1' is not a gateway", 31, "router.smtp_route.gateway"),
    Case("gateway-linux-interface", edit("gateway: 192.168.0.254", "gateway: eth0"),
         "'eth0' is not a gateway", 31, "router.smtp_route.gateway"),
    Case("gateway-equals-otherwise", edit("gateway: 192.168.0.254", "gateway: tunnel 2"),
         "gateway and otherwise are both 'tunnel 2'", 32, "router.smtp_route.otherwise"),
    Case("bad-duration", edit("quiet_period: 48h", "quiet_period: 2 days"),
         "'2 days' is not a duration", 39, "policy.quiet_period"),
    Case("max-change-pct-zero", edit("max_change_pct: 30", "max_change_pct: 0"),
         "greater than or equal to 1", 38, "policy.max_change_pct"),
    Case("mx-host-without-dot",
         edit("mx_host: mail.example.co.jp.", "mx_host: mail.example.co.jp"),
         "must be a fully qualified name ending in '.'", 6, "onprem.mx_host"),
    Case("bad-spf-term",
         edit('spf: "include:_spf.example.sakura.ne.jp"', 'spf: "v=spf1 include:x -all"'),
         "is not one SPF term", 16, "rental.spf"),
    Case("mbox-without-user", edit("mailbox: maildir:~/Maildir", "mailbox: mbox:/var/mail/spool"),
         "must contain {user}", 8, "onprem.mailbox"),
    # --- paths ---------------------------------------------------------------------------
    Case("directory-without-yaml", {"README.md": "# state goes here\n"},
         "no *.yaml files in this directory", None),
    Case("missing-state-path", None, "no such file or directory", None),
    # --- hostile YAML: rejected before anything is expanded (finding 10) ------------------
    Case("alias-bomb", BASE + ALIAS_BOMB, "YAML aliases expand to more than 1,000,000 nodes",
         46),
    Case("recursive-alias", BASE + RECURSIVE_ALIAS, "refers to the collection it is in", 40),
    Case("deep-flow-nesting", BASE + DEEP_FLOW, "YAML nesting deeper than 64 levels", 40),
    Case("deep-block-nesting", BASE + DEEP_BLOCK, "YAML nesting deeper than 64 levels", 103),
    # --- numbers and router words: ASCII digits only (int() reads ARABIC_TEN as 10) ---------
    Case("filter-non-ascii-digits", edit("filter: 10", f'filter: "{ARABIC_TEN}"'),
         "is not an ASCII digit", 30, "router.smtp_route.filter"),
    Case("otherwise-non-ascii-digit", edit("otherwise: tunnel 2", 'otherwise: "tunnel \u0662"'),
         "'\u0662' (U+0662) is not ASCII", 32, "router.smtp_route.otherwise"),
    Case("gateway-tunnel-zero", edit("otherwise: tunnel 2", "otherwise: tunnel 0"),
         "'tunnel 0' is not a gateway", 32, "router.smtp_route.otherwise"),
    Case("port-non-ascii-digits", edit("relay_port: 25", 'relay_port: "\u0662\u0665"'),
         "is not an ASCII digit", 14, "rental.relay_port"),
    Case("port-fullwidth-digits",
         edit("submission_port: 587", 'submission_port: "\uff15\uff18\uff17"'),
         "is not an ASCII digit", 15, "rental.submission_port"),
    Case("port-true", edit("relay_port: 25", "relay_port: true"),
         "true/false, not a number", 14, "rental.relay_port"),
    Case("ttl-non-ascii-digits", edit("  ttl: 3600\n", '  ttl: "\u0663\u0666\u0660\u0660"\n'),
         "is not an ASCII digit", 23, "dns.ttl"),
    Case("max-change-pct-non-ascii-digits",
         edit("max_change_pct: 30", f'max_change_pct: "{ARABIC_TEN}"'),
         "is not an ASCII digit", 38, "policy.max_change_pct"),
    Case("ssh-port-non-ascii-digits",
         edit("connect: ssh://root@mail.example.co.jp:22",
              'connect: "ssh://root@mail.example.co.jp:\u0662\u0662"'),
         "is not a connection", 4, "onprem.connect"),
    Case("dns-server-port-non-ascii-digits",
         edit("server: 198.51.100.53:53", 'server: "198.51.100.53:\u0665\u0663"'),
         "expected host:port", 20, "dns.server"),
    Case("duration-non-ascii-digits", edit("quiet_period: 48h", 'quiet_period: "\u0664\u0668h"'),
         "is not a duration", 39, "policy.quiet_period"),
    Case("duration-overflow", edit("quiet_period: 48h", "quiet_period: 99999999999w"),
         "longer than 10 years", 39, "policy.quiet_period"),
    Case("filter-zero", edit("filter: 10", "filter: 0"),
         "filter 0 is outside the router's static filter range 1..21474836", 30,
         "router.smtp_route.filter"),
    Case("filter-above-router-range", edit("filter: 10", "filter: 21474837"),
         "filter 21474837 is outside the router's static filter range 1..21474836", 30,
         "router.smtp_route.filter"),
    Case("whitelist-bound-out-of-range",
         edit("  quiet_period: 48h\n", "  quiet_period: 48h\n  whitelist_min_prefix_v4: 0\n"),
         "greater than or equal to 1", 40, "policy.whitelist_min_prefix_v4"),
    # --- the SPF term: strict characters (a backslash failed verification on every run) -----
    Case("spf-backslash",
         edit('spf: "include:_spf.example.sakura.ne.jp"', "spf: 'include:_spf\\x.sakura.ne.jp'"),
         "character U+005C (backslash) is not allowed", 16, "rental.spf"),
    Case("spf-double-quote",
         edit('spf: "include:_spf.example.sakura.ne.jp"', """spf: 'include:"x".sakura.ne.jp'"""),
         "character U+0022 (double quote) is not allowed", 16, "rental.spf"),
    Case("spf-space",
         edit('spf: "include:_spf.example.sakura.ne.jp"', 'spf: "include:_spf.example .jp"'),
         "character U+0020 (space) is not allowed", 16, "rental.spf"),
    Case("spf-non-ascii",
         edit('spf: "include:_spf.example.sakura.ne.jp"', 'spf: "include:\u3055.ne.jp"'),
         "(U+3055, not ASCII) is not allowed", 16, "rental.spf"),
    Case("spf-not-a-domain",
         edit('spf: "include:_spf.example.sakura.ne.jp"', 'spf: "include:sakura"'),
         "is not a domain name", 16, "rental.spf"),
    Case("spf-failing-qualifier",
         edit('spf: "include:_spf.example.sakura.ne.jp"', 'spf: "~include:_spf.sakura.ne.jp"'),
         "does not authorise the rental", 16, "rental.spf"),
    # --- the rental is not onprem (a mail loop; finding 11) ------------------------------
    Case("smtp-host-is-onprem-mx",
         edit("smtp_host: example.sakura.ne.jp", "smtp_host: mail.example.co.jp"),
         "is the onprem host (onprem.mx_host): onprem would forward", 13, "rental.smtp_host"),
    Case("smtp-host-is-onprem-ip",
         edit("smtp_host: example.sakura.ne.jp", "smtp_host: 198.51.100.10"),
         "is the onprem host (onprem.public_ip)", 13, "rental.smtp_host"),
    Case("rental-mx-is-onprem-mx",
         edit("mx_host: example.sakura.ne.jp.", "mx_host: MAIL.example.co.jp."),
         "a mail loop", 12, "rental.mx_host"),
    # --- "$" matched before a trailing newline ---------------------------------------------
    Case("user-trailing-newline", edit("  suga:", '  "suga\\n":'),
         "user name 'suga\\n' is not allowed", 35, "users.suga\\n"),
]

# Safe as YAML and schema, unsafe as policy: a static finding (validate exits 3), not an error.
MR_CASES = [
    ("whitelist-default-routes", edit("[203.0.113.8/29]", '[0.0.0.0/0, "::/0"]'), "MR016",
     ["0.0.0.0/0 (every address: a default route) is wider than /24",
      "::/0 (every address: a default route) is wider than /48"]),
    ("whitelist-a-slash-8", edit("[203.0.113.8/29]", "[203.0.113.8/29, 10.0.0.0/8]"), "MR016",
     ["10.0.0.0/8 (2^24 addresses) is wider than /24", "an open relay"]),
    ("whitelist-ipv4-mapped-everything", edit("[203.0.113.8/29]", '["::ffff:0:0/96"]'), "MR016",
     ["every IPv4 address"]),
    ("spf-plus-all", edit('spf: "include:_spf.example.sakura.ne.jp"', 'spf: "+all"'), "MR017",
     ["'+all' authorises every host on the internet"]),
    ("spf-bare-all", edit('spf: "include:_spf.example.sakura.ne.jp"', 'spf: "all"'), "MR017",
     ["'all' authorises every host on the internet"]),
    ("spf-ip4-everything", edit('spf: "include:_spf.example.sakura.ne.jp"',
                                'spf: "ip4:0.0.0.0/0"'), "MR017",
     ["0.0.0.0/0 (every address: a default route): wider than /24"]),
    ("spf-a-slash-0", edit('spf: "include:_spf.example.sakura.ne.jp"',
                           'spf: "a:smtp.sakura.ne.jp/0"'), "MR017",
     ["a /0 around each IPv4 address"]),
]


def _write_state(root: Path, case: Case) -> tuple[Path, str]:
    """Write the case's state under root; return the --state path and the file the message
    must name."""
    if case.state is None:
        missing = root / "no-such-state"
        return missing, str(missing)
    if isinstance(case.state, str):
        path = root / "state.yaml"
        path.write_text(case.state)
        return path, str(path)
    directory = root / "state"
    directory.mkdir()
    for name, text in case.state.items():
        (directory / name).write_text(text)
    return directory, str(directory / case.file) if case.file else str(directory)


def _assert_rejected(stderr: str, stdout: str, case: Case, named: str) -> None:
    assert case.expect in stderr, stderr
    assert SECRET not in stderr + stdout, "a secret value was printed"
    if case.line is None:
        assert f"{named}: " in stderr, stderr
        return
    where = re.escape(f"{named}:{case.line}:") + r"\d+:"
    if case.field:
        where += " " + re.escape(f"{case.field}:")
    assert re.search(where, stderr), f"expected {named}:{case.line}:COL: {case.field}\n{stderr}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_state_is_rejected_with_place_and_nothing_changes(
    case: Case, lab: LabLayout, tmp_path: Path
) -> None:
    (tmp_path / "bad").mkdir()
    bad_path, named = _write_state(tmp_path / "bad", case)
    before = tree_digest(lab.root)
    for command in ("validate", "plan", "apply"):
        extra = ("--yes",) if command == "apply" else ()
        result = run_cli(command, "--lab", str(lab.root), "--state", str(bad_path), *extra)
        assert result.exit_code == 1, (command, result.output, result.stderr)
        _assert_rejected(result.stderr, result.output, case, named)
        assert tree_digest(lab.root) == before, f"{command} changed the lab"


def test_at_least_24_cases_and_unique_ids() -> None:
    assert len(CASES) >= 24
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("case_id", "text", "code", "expect"), MR_CASES,
                         ids=[c[0] for c in MR_CASES])
def test_unsafe_policy_is_a_static_finding_and_nothing_changes(
    case_id: str, text: str, code: str, expect: list[str], lab: LabLayout, tmp_path: Path
) -> None:
    """An open relay or an SPF term that authorises everyone is valid YAML and schema but
    refused: validate and plan exit 3 naming the rule, and nothing is written anywhere."""
    path = tmp_path / "state.yaml"
    path.write_text(text)
    before = tree_digest(lab.root)
    result = run_cli("validate", "--state", str(path))
    assert result.exit_code == 3, (result.output, result.stderr)
    assert f"{code}: " in result.stderr
    for part in expect:
        assert part in result.stderr, result.stderr
    planned = run_cli("plan", "--lab", str(lab.root), "--state", str(path))
    assert planned.exit_code == 3, (planned.output, planned.stderr)
    assert code in planned.output
    assert tree_digest(lab.root) == before


def test_open_relay_is_never_applied(lab: LabLayout, tmp_path: Path) -> None:
    """Finding 2: `whitelist: [0.0.0.0/0, "::/0"]` used to be applied. The safe prefix (the
    router steps) is applied; the whitelist never gets the default routes."""
    path = tmp_path / "state.yaml"
    path.write_text(MR_CASES[0][1])
    result = run_cli("apply", "--lab", str(lab.root), "--state", str(path), "--yes")
    assert result.exit_code == 3, (result.output, result.stderr)
    assert "MR016" in result.output + result.stderr
    whitelist = lab.rental_whitelist.read_text()
    assert "0.0.0.0/0" not in whitelist and "::/0" not in whitelist


def test_whitelist_bound_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    wide = edit("[203.0.113.8/29]", "[203.0.113.8/29, 10.0.0.0/8]")
    path.write_text(edit("  quiet_period: 48h\n",
                         "  quiet_period: 48h\n  whitelist_min_prefix_v4: 8\n", wide))
    assert run_cli("validate", "--state", str(path)).exit_code == 0
    # ... but never a default route, whatever the bound.
    path.write_text(edit("  quiet_period: 48h\n",
                         "  quiet_period: 48h\n  whitelist_min_prefix_v4: 1\n",
                         edit("[203.0.113.8/29]", "[0.0.0.0/0]")))
    refused = run_cli("validate", "--state", str(path))
    assert refused.exit_code == 3 and "MR016" in refused.stderr


def test_static_findings_say_where(tmp_path: Path) -> None:
    """MR016/MR017 name file:line of the entry (LoadedState.locate)."""
    from reconciler.load import load_state
    from reconciler.static import static_findings

    state = tmp_path / "state"
    state.mkdir()
    (state / "mailrec.yaml").write_text(
        edit('spf: "include:_spf.example.sakura.ne.jp"', 'spf: "+all"',
             edit("[203.0.113.8/29]", "\n    - 203.0.113.8/29\n    - 10.0.0.0/8", BASE)))
    loaded = load_state(state)
    found = {(f.code, f.where) for f in static_findings(loaded.state, locate=loaded.locate)}
    name = str(state / "mailrec.yaml")
    assert found == {("MR016", f"{name}:19"), ("MR017", f"{name}:16")}
    assert loaded.locate("users.suga") == f"{name}:37"
    assert loaded.locate("router.smtp_route.filter") == f"{name}:32"
    assert loaded.locate("nothing.here") is None
    # Without a locator (the planner's call) the text is as before.
    assert all(not f.where for f in static_findings(loaded.state))


def test_oversized_file_is_rejected_without_reading_it(lab: LabLayout, tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    with path.open("w") as handle:
        handle.write(BASE)
        handle.truncate(33 * 1024 * 1024)  # sparse: no disk, and never read
    before = tree_digest(lab.root)
    for command in ("validate", "plan"):
        result = run_cli(command, "--lab", str(lab.root), "--state", str(path))
        assert result.exit_code == 1
        assert f"{path}: the file is 33.0 MiB: a state file may be at most 32 MiB" in result.stderr
    assert tree_digest(lab.root) == before


def test_anchors_aliases_and_merge_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "state.yaml"
    path.write_text(edit(USERS_BLOCK, """\
users:
  suga: &at_onprem {inbound: onprem, outbound: onprem}
  tanaka: *at_onprem
  sato:
    <<: *at_onprem
    inbound: rental
"""))
    result = run_cli("validate", "--state", str(path))
    assert result.exit_code == 0, result.stderr
    assert "(3 users" in result.output
    # A mistake in a merged-in value is still reported (at the entry that merges it).
    path.write_text(edit(USERS_BLOCK, """\
users:
  suga: &at_onprem {inbound: onprem, outbound: cloud}
  sato:
    <<: *at_onprem
    inbound: rental
"""))
    bad = run_cli("validate", "--state", str(path))
    assert bad.exit_code == 1
    assert f"{path}:35:" in bad.stderr and "users.sato.outbound" in bad.stderr


@pytest.mark.parametrize("fmt", ["text", "markdown", "json"])
def test_valid_base_is_accepted(fmt: str, lab: LabLayout, tmp_path: Path) -> None:
    """The base every case edits is itself valid, so each case tests exactly one mistake."""
    path = tmp_path / "state.yaml"
    path.write_text(BASE)
    assert run_cli("validate", "--state", str(path)).exit_code == 0
    result = run_cli("plan", "--lab", str(lab.root), "--state", str(path), "--format", fmt)
    assert result.exit_code in (0, 2), result.stderr


def test_secret_values_never_appear_in_any_output(
    lab: LabLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolved secrets (env and file) are used by drivers only: plan, status, validate and
    schema never print them."""
    tsig_key = "s3cr3t-tsig-key"
    tsig = tmp_path / "tsig"
    tsig.write_text(tsig_key + "\n")
    monkeypatch.setenv("RTX_ADMIN", SECRET)
    monkeypatch.setenv("RTX_LOGIN", SECRET)
    state = lab.root / "state" / "mailrec.yaml"
    state.write_text(state.read_text().replace("file:/etc/mailrec/tsig", f"file:{tsig}"))
    outputs = []
    for args in (("validate",), ("plan",), ("plan", "--format", "json"),
                 ("plan", "--format", "markdown"), ("status", "--format", "json"), ("status",)):
        result = run_cli(*args, "--lab", str(lab.root))
        assert result.exit_code in (0, 2), result.stderr
        outputs.append(result.output + result.stderr)
    outputs.append(run_cli("schema").output)
    for value in (SECRET, tsig_key):
        assert not any(value in out for out in outputs)

"""Parsers of the `ssh` rental provider, on samples of real Postfix/Dovecot/find output.

No daemon needed: these pin down the formats the provider reads and writes on the VPS.
"""

from __future__ import annotations

import ipaddress

from reconciler.drivers.rental.ssh import (
    count_messages,
    map_source_with,
    map_source_without,
    parse_map_source,
    parse_mynetworks,
    parse_passwd_users,
    parse_postconf,
    passwd_with,
    passwd_without,
    render_mynetworks,
    split_list,
)

# `postconf -c /etc/postfix -x virtual_mailbox_domains ... ` on Postfix 3.7 (Debian 12).
POSTCONF = """\
virtual_mailbox_domains = example.co.jp, hash:/etc/postfix/vdomains
virtual_mailbox_maps = proxy:hash:/etc/postfix/vmailbox
virtual_mailbox_base = /var/mail/vhosts
mynetworks = 127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128 /etc/postfix/mynetworks
virtual_uid_maps = static:5000
virtual_gid_maps = static:5000
"""

VMAILBOX = """\
# virtual mailboxes
suga@example.co.jp      example.co.jp/suga/
Tanaka@Example.co.jp    example.co.jp/tanaka/
long@example.co.jp
    example.co.jp/long/
@other.example          catchall
"""


def test_parse_postconf_and_lists() -> None:
    values = parse_postconf(POSTCONF)
    assert values["virtual_mailbox_base"] == "/var/mail/vhosts"
    assert split_list(values["virtual_mailbox_domains"]) == [
        "example.co.jp",
        "hash:/etc/postfix/vdomains",
    ]
    assert split_list(values["mynetworks"])[-1] == "/etc/postfix/mynetworks"


def test_parse_map_source_with_comments_case_and_continuations() -> None:
    assert parse_map_source(VMAILBOX) == {
        "suga@example.co.jp": "example.co.jp/suga/",
        "tanaka@example.co.jp": "example.co.jp/tanaka/",
        "long@example.co.jp": "example.co.jp/long/",
        "@other.example": "catchall",
    }


def test_map_source_edits_keep_other_lines() -> None:
    added = map_source_with(VMAILBOX, "sato@example.co.jp", "example.co.jp/sato/")
    assert added.startswith(VMAILBOX) and added.endswith(
        "sato@example.co.jp\texample.co.jp/sato/\n"
    )
    removed = map_source_without(added, "long@example.co.jp")
    assert "long" not in removed and "# virtual mailboxes" in removed
    assert map_source_without(removed, "TANAKA@example.co.jp").count("tanaka") == 0
    assert map_source_with("", "a@b.c", "b.c/a/") == "a@b.c\tb.c/a/\n"
    assert map_source_with("x y", "a@b.c", "b.c/a/") == "x y\na@b.c\tb.c/a/\n"


def test_passwd_names_only() -> None:
    text = (
        "# dovecot users\n"
        "suga@example.co.jp:{SHA512-CRYPT}$6$salt$hash:5000:5000::/var/mail/vhosts/x::\n"
    )
    assert parse_passwd_users(text) == {"suga@example.co.jp"}
    assert passwd_without(text, "suga@example.co.jp") == "# dovecot users\n"
    assert passwd_with("a:b", "c:d") == "a:b\nc:d\n"


def test_mynetworks_roundtrip_with_ipv6_brackets() -> None:
    networks = {
        ipaddress.ip_network("203.0.113.8/29"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("198.51.100.7/32"),
    }
    text = render_mynetworks(networks)
    assert "[2001:db8::]/32\n" in text and text.startswith("# Managed by mailrec")
    assert text.index("198.51.100.7/32") < text.index("203.0.113.8/29")
    parsed, other = parse_mynetworks(text)
    assert parsed == networks and other == ()
    parsed, other = parse_mynetworks("192.0.2.1, mail.example.net # office\n")
    assert parsed == {ipaddress.ip_network("192.0.2.1/32")} and other == ("mail.example.net",)


def test_count_messages_from_one_find_listing() -> None:
    # find /var/mail/vhosts/example.co.jp -type f ( -path */new/* -o -path */cur/* ) -printf %P\0
    listing = b"\0".join(
        [
            b"suga/new/1700000000.M1P2.vps",
            b"suga/cur/1700000001.M2P3.vps:2,S",
            b"suga/.Sent/cur/1700000002.M3P4.vps:2,S",
            b"tanaka/cur/1700000003.M4P5.vps:2,",
            b"ghost/new/1700000004.M5P6.vps",  # not in the map: ignored
            b"suga/new",  # (a file named like a folder, not inside new/ or cur/)
            b"",
        ]
    )
    maildirs = {"suga@x": "suga/", "tanaka@x": "tanaka/", "empty@x": "empty/"}
    assert count_messages(listing, maildirs) == {"suga@x": 3, "tanaka@x": 1, "empty@x": 0}

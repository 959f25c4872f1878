"""The migration board as HTML (board.py builds its data): one self-contained page, inline
CSS, no JavaScript, every value escaped."""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from reconciler.board import _RENTAL_OUTBOUND, REFRESH_SECONDS, USER_STATUSES

# --- HTML -------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2430;
background:#f5f6f8}
header{background:#1f3a5f;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px;font-weight:600}
header p{margin:4px 0 0;color:#d5deea;font-size:13px}
main{padding:16px 24px 32px}
.banner{padding:10px 14px;border-radius:6px;margin:0 0 14px}
.banner.bad{background:#fdecea;border:1px solid #f1a9a0;color:#7a1f14}
.banner.ok{background:#eaf6ec;border:1px solid #a8d5b0;color:#1d5a2a}
.banner.note{background:#fff7e0;border:1px solid #f0d48a;color:#6a4d00}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:0 0 18px}
.card{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:8px 14px;min-width:92px}
.card b{display:block;font-size:22px}
.card span{color:#5b6573;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
h2{font-size:16px;margin:22px 0 8px}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e7}
th,td{text-align:left;vertical-align:top;padding:6px 8px;border-bottom:1px solid #eceff3}
th{background:#eef1f5;font-size:12px;text-transform:uppercase;letter-spacing:.03em;
color:#3d4756}
td.num{text-align:right}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;overflow-wrap:anywhere}
.st{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;
white-space:nowrap}
.to{white-space:nowrap}.desc{color:#3d4756;font-size:13px}
.st-done{background:#e3f4e6;color:#1d6b2e}.st-moving{background:#e2eefc;color:#1b4f8a}
.st-gated{background:#fff1d1;color:#7a5200}.st-refused{background:#fde2df;color:#8f2418}
.st-ready{background:#e2eefc;color:#1b4f8a}
.side-rental{color:#1b4f8a;font-weight:600}.side-onprem{color:#5b6573}
.side-nowhere,.side-unknown{color:#8f2418;font-weight:600}
.why{margin:0;padding-left:16px;color:#3d4756}
.when{white-space:nowrap;font-weight:600}
.muted{color:#6b7482}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 14px;background:#fff;
border:1px solid #dde1e7;padding:10px 14px;margin:0}
dt{color:#5b6573}dd{margin:0}
ul.plain{margin:0;padding-left:18px}
footer{color:#6b7482;font-size:12px;padding:0 24px 24px}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _when(stamp: str | None) -> str:
    """An ISO-8601 time as people read it (UTC), or the text as given if it is not one."""
    if not stamp:
        return ""
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return stamp
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _side(value: str | None) -> str:
    if value is None:
        return '<span class="muted">-</span>'
    return f'<span class="side-{_e(value)}">{_e(value)}</span>'


def _move(now: str, wanted: str | None, managed: bool) -> str:
    """Where a user is, and where the state wants them when that differs."""
    if not managed:
        return f'{_side(now)} <span class="muted">(not in the state)</span>'
    side = "rental" if now in _RENTAL_OUTBOUND else now  # relay/submission: at the rental
    if wanted is None or wanted == side:
        return _side(now)
    return f'<span class="to">{_side(now)} → {_side(wanted)}</span>'


def _badge(status: str, label: str | None = None) -> str:
    return f'<span class="st st-{_e(status)}">{_e(label or status)}</span>'


def _reasons(reasons: list[str]) -> str:
    if not reasons:
        return ""
    return '<ul class="why">' + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>"


def _earliest_cell(step: Mapping[str, Any]) -> str:
    via = step.get("via") or []
    chain = (f'<br><span class="muted">via {_e(" → ".join(via))}</span>' if via else "")
    if step.get("earliest"):
        return (f'<span class="when">{_e(_when(step["earliest"]))}</span>'
                f'<br><span class="muted">waits for {_e(step["waits_for"])}</span>{chain}')
    return (f'<span class="muted">no time known</span><br>'
            f'<span class="muted">waits for {_e(step["waits_for"])}</span>{chain}')


_USER_LABELS = {"done": "in sync", "moving": "moving", "gated": "gated", "refused": "refused"}


def _user_tr(row: Mapping[str, Any]) -> str:
    step = row["next"]
    if step is None:
        nxt = '<td colspan="3" class="muted">nothing left to do</td>'
    else:
        ready = row["ready_steps"]
        more = (f'<br><span class="muted">{ready} step(s) ready for the next round</span>'
                if ready and step["status"] != "ready" else "")
        badge = "" if step["status"] == row["status"] else " " + _badge(step["status"])
        nxt = (f'<td><code>{_e(step["id"])}</code>{badge}'
               f'<br><span class="desc">{_e(step["description"])}</span>{more}</td>'
               f'<td class="reason">{_reasons(step["reasons"])}</td>'
               f'<td class="earliest">{_earliest_cell(step)}</td>')
    messages = row["onprem_messages"] if row["onprem_account"] else "-"
    return (f'<tr id="user-{_e(row["name"])}" data-status="{_e(row["status"])}">'
            f'<td><b>{_e(row["name"])}</b></td>'
            f'<td>{_badge(row["status"], _USER_LABELS.get(row["status"]))}</td>'
            f'<td class="in">{_move(row["inbound"], row["desired_inbound"], row["managed"])}</td>'
            f'<td class="out">{_move(row["outbound"], row["desired_outbound"], row["managed"])}'
            '</td>'
            f'<td class="num">{_e(messages)}</td>{nxt}</tr>')


def _step_tr(step: Mapping[str, Any]) -> str:
    return (f'<tr id="step-{_e(step["id"])}" data-status="{_e(step["status"])}">'
            f'<td><code>{_e(step["id"])}</code></td><td>{_badge(step["status"])}</td>'
            f'<td>{_e(step["description"])}</td><td>{_reasons(step["reasons"])}</td>'
            f'<td class="earliest">{_earliest_cell(step)}</td></tr>')


def _daemon_banner(data: Mapping[str, Any]) -> str:
    daemon = data.get("daemon") or {}
    last = daemon.get("last_round") or {}
    error = daemon.get("last_error")
    parts: list[str] = []
    if last.get("result") is None:
        parts.append('<div class="banner note">No round has finished yet.</div>')
    elif last.get("succeeded"):
        parts.append(f'<div class="banner ok">Last round: {_e(last["result"])} at '
                     f'{_e(_when(last.get("finished_at")))}.</div>')
    else:
        parts.append(f'<div class="banner bad"><b>Last round did not succeed</b> '
                     f'({_e(last["result"])}, at {_e(_when(last.get("finished_at")))}): the '
                     'board below shows the last round that produced a plan.</div>')
    if error:
        parts.append(f'<div class="banner {"bad" if not last.get("succeeded") else "note"}">'
                     f'Last error, at {_e(_when(error.get("at")))}: '
                     f'<code>{_e(error.get("message"))}</code></div>')
    return "".join(parts)


def _cards(summary: Mapping[str, Any]) -> str:
    total = summary["users"]
    cards = [("users", total), ("in sync", summary["done"]), ("moving", summary["moving"]),
             ("gated", summary["gated"]), ("refused", summary["refused"]),
             ("receive at rental", f'{summary["inbound_rental"]}/{total}'),
             ("send via rental", f'{summary["outbound_rental"]}/{total}')]
    if summary.get("outbound_unknown"):
        cards.append(("sending unknown", summary["outbound_unknown"]))
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{_e(value)}</b><span>{_e(label)}</span></div>'
        for label, value in cards) + "</div>"


def _list(items: Iterable[object], empty: str = "none") -> str:
    shown = [f"<li>{_e(item)}</li>" for item in items]
    if not shown:
        return f'<span class="muted">{_e(empty)}</span>'
    return f'<ul class="plain">{"".join(shown)}</ul>'


def _numbers(numbers: Iterable[int]) -> str:
    return _e(" ".join(map(str, numbers)) or "none")


def _systems(data: Mapping[str, Any]) -> str:
    dns, rental, router = data["dns"], data["rental"], data["router"]
    rows = [
        ("MX", f'{_e(" ".join(dns["mx_hosts"]) or "none")} ({_side(dns["mx"])}), TTL '
               f'{_e(dns["mx_ttl"])}s <span class="muted">wants</span> {_side(dns["desired_mx"])}'),
        ("SPF", f'<code>{_e(" ".join(dns["spf_terms"]) or "none")}</code>'),
        ("Rental relay whitelist",
         f'{_e(", ".join(rental["whitelist"]) or "empty")} '
         + ('<span class="muted">(read from the rental)</span>' if rental["whitelist_verified"]
            else '<span class="side-unknown">(declared, not verified)</span>')
         + (f' <span class="muted">wants</span> {_e(", ".join(rental["desired_whitelist"]))}'
            if rental["desired_whitelist"] else "")),
    ]
    if router is None:
        rows.append(("Router", '<span class="muted">not managed</span>'))
    else:
        route = router["default_route"]
        route_text = ("none" if route is None else "; ".join(
            g["gateway"] + (f' (filter {" ".join(map(str, g["filters"]))})' if g["filters"]
                            else "") for g in route))
        rows += [
            ("tcp/25 leaves through", _e(", ".join(router["smtp_egress"]) or "no route")),
            ("Default route", _e(route_text)),
            ("Router filters", f'mailrec\'s: {_numbers(router["mailrec_filters"])}; '
                               f'others: {_numbers(router["other_filters"])}'),
        ]
    rows += [("Not verified", _list(data["unverified"])),
             ("How each system was read", _list(data["systems"], "not recorded"))]
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def render_board_html(data: Mapping[str, Any]) -> str:
    """The board as one page: inline CSS, no script, no external asset, every value escaped.
    Built once per round (the server keeps the bytes), by joining strings: 10,000 users are
    one pass over the rows."""
    domain = data.get("domain")
    title = f"mailrec migration board: {domain}" if domain else "mailrec migration board"
    round_ = data.get("round") or {}
    daemon = data.get("daemon") or {}
    sub = [f"observed {_e(_when(data.get('observed_at')))}" if data.get("observed_at") else
           "no data yet"]
    if round_.get("commit"):
        by = f' by {_e(round_["author"])}' if round_.get("author") else ""
        sub.append(f"state <code>{_e(round_['commit'])}</code>{by}")
    if round_.get("finished_at"):
        sub.append(f"round finished {_e(_when(round_['finished_at']))}")
    if daemon.get("source"):
        sub.append(f"from {_e(daemon['source'])}")
    out = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{_e(title)}</h1><p>{' · '.join(sub)}</p></header><main>",
        _daemon_banner(data),
    ]
    summary = data.get("summary")
    if summary is not None:
        out.append(_cards(summary))
        if data["findings"]:
            out.append("<h2>Findings</h2>" + _reasons(data["findings"]))
        out.append("<h2>Users</h2><table id=\"users\"><thead><tr><th>user</th><th>status</th>"
                   "<th>receives (now → wanted)</th><th>sends (now → wanted)</th>"
                   "<th>messages in old mailbox</th><th>next step</th>"
                   "<th>waits for</th><th>earliest</th></tr></thead><tbody>")
        order = {status: rank for rank, status in enumerate(USER_STATUSES)}
        rows = sorted(data["users"], key=lambda r: (order.get(r["status"], 9), r["name"]))
        out.extend(_user_tr(row) for row in rows)
        out.append("</tbody></table>")
        if data["domain_steps"]:
            out.append("<h2>Domain-wide steps</h2><table id=\"domain-steps\"><thead><tr>"
                       "<th>step</th><th>status</th><th>what</th><th>waits for</th>"
                       "<th>earliest</th></tr></thead><tbody>")
            out.extend(_step_tr(step) for step in data["domain_steps"])
            out.append("</tbody></table>")
        out.append("<h2>Systems</h2>" + _systems(data))
    out.append("</main><footer>Read-only: this page changes nothing. "
               f"mailrec {_e(daemon.get('version'))}; refreshes every {REFRESH_SECONDS}s; "
               "the same data as JSON: <code>/board.json</code>.</footer></body></html>\n")
    return "".join(out)

"""BOINC statistics export: user.gz, host.gz, team.gz and tables.xml, in the format BOINC's db_dump writes.

Stats sites that read BOINC projects (BOINCstats, Free-DC, ...) fetch these files and match users
across projects by `cpid`. BOINC derives a user's cpid as md5(cross-project id + email). A gpunite user
has no email, only a key, so ours is md5(b"gpunite-cpid:" + raw Ed25519 public key): 32 hex digits like
BOINC's, stable for the identity, and computable by anyone from its public key. `host_cpid` is the same
with the prefix b"gpunite-host-cpid:". Numeric ids, which BOINC takes from its database, are the first 31
bits of sha256 of the peer id (team: of the team name), so they never change between exports.
Each file is written to a temporary name and renamed, so a reader sees a whole old or whole new file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import time
from pathlib import Path
from xml.sax.saxutils import escape

from gpunite.ledger.credits import CreditRow, CreditTable
from gpunite.util import atomic_write_bytes

APPLICATION_NAME = "gpunite"


def cpid(public_key_hex: str, prefix: bytes = b"gpunite-cpid:") -> str:
    """Cross-project id of an identity: md5 of a fixed prefix and the raw public key, hex."""
    return hashlib.md5(prefix + bytes.fromhex(public_key_hex)).hexdigest()


def host_cpid(public_key_hex: str) -> str:
    return cpid(public_key_hex, b"gpunite-host-cpid:")


def numeric_id(text: str) -> int:
    """A stable positive 31-bit id for a peer id or team name (BOINC ids are integers)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF or 1


_NOT_XML_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _text(value: str) -> str:
    """Names come from peers: drop characters XML 1.0 cannot carry, then escape markup."""
    return escape(_NOT_XML_CHARS.sub("", value))


def _xml_document(tag: str, entries: list[str]) -> bytes:
    out = io.StringIO()
    out.write('<?xml version="1.0" encoding="utf-8"?>\n')
    out.write(f"<{tag}>\n")
    for entry in entries:
        out.write(entry)
    out.write(f"</{tag}>\n")
    return out.getvalue().encode("utf-8")


def _gzip(data: bytes) -> bytes:
    # mtime=0: the same table always gives the same bytes
    return gzip.compress(data, compresslevel=6, mtime=0)


def _user_xml(row: CreditRow) -> str:
    lines = [
        "<user>",
        f" <id>{numeric_id(row.id)}</id>",
        f" <name>{_text(row.name)}</name>",
        f" <create_time>{int(row.create_time)}</create_time>",
        f" <total_credit>{row.total_credit:f}</total_credit>",
        f" <expavg_credit>{row.expavg_credit:f}</expavg_credit>",
        f" <expavg_time>{row.expavg_time:f}</expavg_time>",
        f" <cpid>{cpid(row.public_key)}</cpid>",
    ]
    if row.team:
        lines.append(f" <teamid>{numeric_id(row.team)}</teamid>")
    lines.append("</user>\n")
    return "\n".join(lines)


def _host_xml(row: CreditRow) -> str:
    lines = [
        "<host>",
        f"    <id>{numeric_id('host:' + row.id)}</id>",
        f"    <userid>{numeric_id(row.id)}</userid>",
        f"    <total_credit>{row.total_credit:f}</total_credit>",
        f"    <expavg_credit>{row.expavg_credit:f}</expavg_credit>",
        f"    <expavg_time>{row.expavg_time:f}</expavg_time>",
        "    <p_vendor></p_vendor>",
        f"    <p_model>{_text(row.device)}</p_model>",
        "    <os_name></os_name>",
        "    <os_version></os_version>",
        f"    <create_time>{int(row.create_time)}</create_time>",
        f"    <host_cpid>{host_cpid(row.public_key)}</host_cpid>",
        "</host>\n",
    ]
    return "\n".join(lines)


def _team_xml(row: CreditRow, founder: CreditRow | None) -> str:
    lines = [
        "<team>",
        f" <id>{numeric_id(row.id)}</id>",
        " <type>1</type>",
        f" <name>{_text(row.name)}</name>",
        f" <userid>{numeric_id(founder.id) if founder else 0}</userid>",
        f" <total_credit>{row.total_credit:f}</total_credit>",
        f" <expavg_credit>{row.expavg_credit:f}</expavg_credit>",
        f" <expavg_time>{row.expavg_time:f}</expavg_time>",
    ]
    if founder:
        lines.append(f" <founder_name>{_text(founder.name)}</founder_name>")
    lines += [f" <create_time>{int(row.create_time)}</create_time>", " <country>None</country>", "</team>\n"]
    return "\n".join(lines)


def export_boinc_stats(
    table: CreditTable, directory: str | Path, update_time: float | None = None
) -> list[Path]:
    """Write user.gz, host.gz, team.gz and tables.xml for the entities with credit > 0; the paths written."""
    directory = Path(directory)
    users = [row for row in table.users if row.total_credit > 0]
    hosts = [row for row in table.hosts if row.total_credit > 0]
    teams = [row for row in table.teams if row.total_credit > 0]
    founders = {
        team.id: min(
            (row for row in users if row.team == team.id),
            key=lambda row: (row.create_time, row.id),
            default=None,
        )
        for team in teams
    }
    files = {
        "user.gz": _gzip(_xml_document("users", [_user_xml(row) for row in sorted(users, key=_by_id)])),
        "host.gz": _gzip(
            _xml_document(
                "hosts",
                [_host_xml(row) for row in sorted(hosts, key=lambda row: numeric_id("host:" + row.id))],
            )
        ),
        "team.gz": _gzip(
            _xml_document(
                "teams", [_team_xml(row, founders.get(row.id)) for row in sorted(teams, key=_by_id)]
            )
        ),
    }
    total = sum(row.total_credit for row in users)
    tables = [
        f"    <update_time>{int(update_time if update_time is not None else time.time())}</update_time>\n",
        f"    <nusers_total>{len(users)}</nusers_total>\n",
        f"    <nteams_total>{len(teams)}</nteams_total>\n",
        f"    <nhosts_total>{len(hosts)}</nhosts_total>\n",
        f"    <total_credit>{total:f}</total_credit>\n",
        "    <applications>\n        <application>\n"
        f"            <name>{APPLICATION_NAME}</name>\n        </application>\n    </applications>\n",
    ]
    files["tables.xml"] = _xml_document("tables", tables)
    written = []
    for name, data in files.items():
        atomic_write_bytes(directory / name, data)
        written.append(directory / name)
    return written


def _by_id(row: CreditRow) -> int:
    return numeric_id(row.id)

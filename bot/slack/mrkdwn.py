"""The agent's Markdown as Slack mrkdwn, in time linear in the text.

The answer can quote anything a stranger wrote, so no pattern here may rescan
text: every delimited span excludes its own opener and closer (``[^*\\n]``,
``[^\\[\\]\\n]``...), so a match attempt stops at the next delimiter and attempts
never overlap much.  (markdown-to-mrkdwn's lazy ``(.+?)`` spans took seconds on a
few kilobytes of ``[a](`` and blocked the event loop.)
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"```\w*\s*")
_HEADING = re.compile(r"#{1,6} ")
_TASK = re.compile(r"(\s*)- \[([ xX])\] ")
_BULLET = re.compile(r"(\s*)[-*] ")
_RULE = frozenset({"---", "***", "___"})
_TABLE_RULE_CHARS = frozenset("-:| ")
_INLINE = re.compile(
    r"(?P<code>`[^`\n]+`)"
    r"|\*\*\*(?P<bold_italic>[^*\n]+)\*\*\*"
    r"|\*\*(?P<bold>[^*\n]+)\*\*"
    r"|__(?P<underline>[^_\n]+)__"
    r"|(?<!\*)\*(?P<italic>[^*\n]+)\*(?!\*)"
    r"|~~(?P<strike>[^~\n]+)~~"
    r"|!\[[^\[\]\n]*\]\((?P<image>[^()\s]+)\)"
    r"|\[(?P<text>[^\[\]\n]+)\]\((?P<url>[^()\s]+)\)"
)
RULE_LINE = "──────────"


def to_mrkdwn(markdown: str) -> str:
    """Headings and bold as ``*bold*``, italics, strikethrough, links, lists and tables; code left verbatim."""
    lines: list[str] = []
    in_code = False
    for line in markdown.strip().splitlines():
        if _FENCE.fullmatch(line):
            in_code = not in_code
            lines.append("```")
        elif in_code:
            lines.append(line)
        else:
            lines.extend(_block_line(line))
    return "\n".join(lines)


def _block_line(line: str) -> list[str]:
    """One line outside code: zero lines (a table's rule) or one converted line."""
    stripped = line.strip()
    if stripped in _RULE:
        return [RULE_LINE]
    if stripped.startswith("|") and "-" in stripped and set(stripped) <= _TABLE_RULE_CHARS:
        return []  # a table's |---|---| line
    if _HEADING.match(line):
        return [f"*{_inline(line.lstrip('#').strip())}*"]
    if stripped.startswith("|") and stripped.endswith("|") and len(stripped) > 1:
        return [" | ".join(_inline(cell.strip()) for cell in stripped[1:-1].split("|"))]
    task = _TASK.match(line)
    if task:
        box = "☐" if task.group(2) == " " else "☑"
        return [f"{task.group(1)}• {box} {_inline(line[task.end() :])}".rstrip()]
    bullet = _BULLET.match(line)
    if bullet:
        return [f"{bullet.group(1)}• {_inline(line[bullet.end() :])}".rstrip()]
    return [_inline(line).rstrip()]


def _inline(text: str) -> str:
    return _INLINE.sub(_inline_one, text)


def _inline_one(match: re.Match[str]) -> str:
    kind, value = match.lastgroup, match.group(match.lastgroup or 0)
    if kind == "bold_italic":
        return f"*_{value}_*"
    if kind in ("bold", "underline"):
        return f"*{value}*"
    if kind == "italic":
        return f"_{value}_"
    if kind == "strike":
        return f"~{value}~"
    if kind == "image":
        return f"<{value}>"
    if kind == "url":
        return f"<{value}|{match.group('text')}>"
    return match.group(0)  # inline code stays as it is

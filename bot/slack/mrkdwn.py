"""The agent's Markdown as Slack mrkdwn, in time linear in the text.

The answer can quote anything a stranger wrote, so no pattern here may rescan
text: every delimited span excludes its own opener and closer (``[^*\\n]``,
``[^\\[\\]\\n]``...), so a match attempt stops at the next delimiter and attempts
never overlap much.  (markdown-to-mrkdwn's lazy ``(.+?)`` spans took seconds on a
few kilobytes of ``[a](`` and blocked the event loop.)

The text is the agent's, and it can echo a stranger's: nothing in it may reach Slack as
markup.  ``&``, ``<`` and ``>`` are escaped as Slack's docs ask, so ``<!channel>``,
``<!here>``, ``<#C…>`` and ``<!subteam^…>`` show as text; ``<@U…>`` stays a mention
only when the profile allows it (``slack_mentions``); every link shows its real target.
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
    r"|<(?P<angle>[^<>\n]*)>"
    r"|\*\*\*(?P<bold_italic>[^*\n]+)\*\*\*"
    r"|\*\*(?P<bold>[^*\n]+)\*\*"
    r"|__(?P<underline>[^_\n]+)__"
    r"|(?<!\*)\*(?P<italic>[^*\n]+)\*(?!\*)"
    r"|~~(?P<strike>[^~\n]+)~~"
    r"|!\[[^\[\]\n]*\]\((?P<image>[^()\s]+)\)"
    r"|\[(?P<text>[^\[\]\n]+)\]\((?P<url>[^()\s]+)\)"
    r"|(?P<char>[&<>])"
)
_ANGLE_OR_CHAR = re.compile(r"<(?P<angle>[^<>\n]*)>|(?P<char>[&<>])")
_USER_MENTION = re.compile(r"@[UW][A-Z0-9]+")
_SLACK_LINK = re.compile(r"(?P<url>(?:https?://|mailto:)[^|\s]+)(?:\|(?P<label>.*))?")
_URL = re.compile(r"(?:https?://|mailto:)[^<>|\s]+")
_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})
RULE_LINE = "──────────"


def escape(text: str) -> str:
    """Slack's three control characters as entities: the text shows as written, never as markup."""
    return text.translate(_ESCAPES)


def to_mrkdwn(markdown: str, mentions: bool = False) -> str:
    """Headings and bold as ``*bold*``, italics, strikethrough, links, lists and tables; code kept as written.

    ``mentions``: ``<@U…>`` stays a live mention; otherwise it shows as text, like every broadcast.
    """
    return _Converter(mentions).convert(markdown)


class _Converter:
    def __init__(self, mentions: bool) -> None:
        self._mentions = mentions

    def convert(self, markdown: str) -> str:
        lines: list[str] = []
        in_code = False
        for line in markdown.strip().splitlines():
            if _FENCE.fullmatch(line):
                in_code = not in_code
                lines.append("```")
            elif in_code:
                lines.append(escape(line))
            else:
                lines.extend(self._block_line(line))
        return "\n".join(lines)

    def _block_line(self, line: str) -> list[str]:
        """One line outside code: zero lines (a table's rule) or one converted line."""
        stripped, inline = line.strip(), self._inline
        if stripped in _RULE:
            return [RULE_LINE]
        if stripped.startswith("|") and "-" in stripped and set(stripped) <= _TABLE_RULE_CHARS:
            return []  # a table's |---|---| line
        if _HEADING.match(line):
            return [f"*{inline(line.lstrip('#').strip())}*"]
        if stripped.startswith("|") and stripped.endswith("|") and len(stripped) > 1:
            return [" | ".join(inline(cell.strip()) for cell in stripped[1:-1].split("|"))]
        task = _TASK.match(line)
        if task:
            box = "☐" if task.group(2) == " " else "☑"
            return [f"{task.group(1)}• {box} {inline(line[task.end() :])}".rstrip()]
        bullet = _BULLET.match(line)
        if bullet:
            return [f"{bullet.group(1)}• {inline(line[bullet.end() :])}".rstrip()]
        return [inline(line).rstrip()]

    def _inline(self, text: str) -> str:
        return _INLINE.sub(self._inline_one, text)

    def _plain(self, text: str) -> str:
        """Text inside a span (bold, a link's label): Slack markup in it made safe, nothing else converted."""
        return _ANGLE_OR_CHAR.sub(self._inline_one, text)

    def _inline_one(self, match: re.Match[str]) -> str:
        kind, value = match.lastgroup, match.group(match.lastgroup or 0)
        if kind == "code":
            return escape(value)
        if kind == "angle":
            return self.angle(value)
        if kind == "char":
            return escape(value)
        if kind == "image":
            return _link(value, None) if _URL.fullmatch(value) else escape(match.group(0))
        if kind == "url":
            label = self._plain(match.group("text"))
            return _link(value, label) if _URL.fullmatch(value) else escape(match.group(0))
        wrap = {"bold_italic": ("*_", "_*"), "bold": ("*", "*"), "underline": ("*", "*"), "italic": ("_", "_")}
        opener, closer = wrap.get(kind or "", ("~", "~"))
        return f"{opener}{self._plain(value)}{closer}"

    def angle(self, inner: str) -> str:
        """Slack's own markup the agent wrote: a person's mention if allowed, a link with its target, else text."""
        if self._mentions and _USER_MENTION.fullmatch(inner):
            return f"<{inner}>"
        link = _SLACK_LINK.fullmatch(inner)
        if link:
            label = link.group("label")
            return _link(link.group("url"), self._plain(label) if label else None)
        return escape(f"<{inner}>")


def _link(url: str, label: str | None, in_markdown: bool = False) -> str:
    """A link that shows where it goes: ``label (<url>)``, or just ``<url>`` when the label says nothing more."""
    target = f"<{url}>" if in_markdown else f"<{url.replace('&', '&amp;')}>"
    if not label or label.strip() in (url, escape(url)):
        return target
    return f"{label} ({target})"


_MARKDOWN_RISKS = re.compile(
    r"(?P<code>```|`[^`\n]+`)"
    r"|<(?P<angle>[^<>\n]*)>"
    r"|\[(?P<text>[^\[\]\n]+)\]\((?P<url>[^()\s]+)\)"
    r"|(?P<char>[<>])"
)


_SLACK_OPENER = re.compile(r"<(?=[!@#])")


def safe_markdown(markdown: str, mentions: bool = False) -> str:
    """The agent's Markdown for a streamed ``markdown_text``, with the same rules as ``to_mrkdwn``.

    Links show their target (``label (<url>)``) and Slack markup shows as text (``&lt;``, which Markdown
    renders as ``<``); in code only ``<!``, ``<@`` and ``<#`` are escaped.  Callers pass whole lines,
    so no construct is cut in two.
    """
    converter = _Converter(mentions)

    def one(match: re.Match[str]) -> str:
        kind, value = match.lastgroup, match.group(match.lastgroup or 0)
        if kind == "code":
            # Whether Slack's renderer parses markup in code is not documented: the risky openers are escaped.
            return _SLACK_OPENER.sub("&lt;", value)
        if kind == "angle":
            return converter.angle(value)
        if kind == "url":
            label = _MARKDOWN_RISKS.sub(one, match.group("text"))
            return _link(value, label, in_markdown=True) if _URL.fullmatch(value) else escape(match.group(0))
        return escape(value)

    return _MARKDOWN_RISKS.sub(one, markdown)

"""Understanding one raw email: text, quotes, forwards, attachments, and whether it may be answered.

Everything here is pure (bytes in, frozen values out) and never raises on
malformed mail: a broken part becomes a note in the text, not an exception.
"""

from __future__ import annotations

import email
import email.errors
import email.parser
import email.policy
import email.utils
import hashlib
import re
from dataclasses import dataclass, field
from email.message import EmailMessage, Message

import html2text
from mailparser_reply import EmailReplyParser

from bot.files import safe_filename

FALLBACK_CHARSETS = ("utf-8", "cp1252", "latin-1")
# What the stdlib's header registry and MIME accessors raise on malformed input.
_BROKEN = (ValueError, LookupError, UnicodeError, TypeError, AttributeError, email.errors.MessageError)
# Every pattern below is matched against one line (or one header) at a time, never searched across a
# whole body: a ``\s*`` that may span newlines restarts a long scan at every blank line (quadratic).
_INLINE_FORWARD = re.compile(
    r"-+[ \t]*(?:Forwarded message|Original Message)[ \t]*-+|Begin forwarded message:", re.IGNORECASE
)
_ORIGINAL_MESSAGE = re.compile(r"-+[ \t]*Original Message[ \t]*-+", re.IGNORECASE)
# Reply prefixes clients put on subjects (English, German, Nordic, Dutch, French, Italian, Spanish, Portuguese).
_REPLY_SUBJECT = re.compile(r"\s*(re|aw|sv|vs|antw|r[ée]f|r|rif|resp|res)\s*(\[\d+\])?\s*:", re.IGNORECASE)
# An attribution line before a quote ("On <date>, <name> wrote:", in any language): it ends with a colon,
# and a line that continues it carries an address or a date.
_ATTRIBUTION_PART = re.compile(r".*(@|\d{1,4}[./-]\d{1,2}|\d{1,2}:\d{2})")
# A header's name, and any blanks before its colon (the obsolete syntax).
_OBSOLETE_HEADER = re.compile(rb"([!-9;-~]+)[ \t]*:")
_MBOX_FROM = re.compile(rb"From [^ \t:]")
_FORWARD_HEADER = re.compile(r"\**(From|Date|Sent|Subject|To|Cc)\**:[ \t]*(.*)", re.IGNORECASE)
_MESSAGE_ID = re.compile(r"<[^<>\s]+>")
# mail-parser-reply's own patterns are quadratic on some text (blank lines, runs of spaces, "On On On"):
# it only sees the head of the body, where a reply ends and its quote starts in practice.
QUOTE_SCAN_CHARS = 3000
QUOTE_SCAN_LINES = 200
# The stdlib's header registry is quadratic on some values (runs of quotes, thousands of encoded words):
# only the first of the headers we show or read addresses from, and only a short one, goes through it.
# The others keep their raw text, flattened.
_DECODED_HEADERS = frozenset({"from", "to", "cc", "subject", "reply-to", "date"})
HEADER_DECODE_CHARS = 1000
# html2text indents each list item by its nesting depth: deeply nested lists give quadratic output.
# Lists past this many keep their items, as plain blocks.
MAX_HTML_LISTS = 100
# Enough to see a report's parts (a DMARC or abuse report has two or three), bounded for a hostile mail.
MAX_PARTS = 200
_HTML_LIST_TAG = re.compile(r"<(/?)(?:ul|ol)\b", re.IGNORECASE)
# The registry's quoted-string reader copies the rest of the value at each character (quadratic): a 100 KB
# quoted file name took a second.  A MIME header's real content (a type, a 70-character boundary, a file
# name a file system can hold) fits easily; past this much, the rest is cut before the registry sees it.
MIME_HEADER_CHARS = 4000
_MIME_HEADERS = frozenset({"content-type", "content-disposition", "content-transfer-encoding"})


class _BoundedPolicy(email.policy.EmailPolicy):
    """The default policy, with MIME headers cut at MIME_HEADER_CHARS before they are parsed."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        if name.lower() in _MIME_HEADERS and len(value) > MIME_HEADER_CHARS:
            value = value[:MIME_HEADER_CHARS]
        return super().header_fetch_parse(name, value)  # type: ignore[no-any-return]


_POLICY = _BoundedPolicy()


@dataclass(frozen=True)
class Attachment:
    name: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class Forwarded:
    """The original message inside a forward."""

    sender: str
    date: str
    subject: str
    body: str


@dataclass(frozen=True)
class Mail:
    """One inbound message, decoded."""

    message_id: str
    sender: str  # bare address, lower case
    sender_display: str
    subject: str
    date: str
    references: tuple[str, ...]
    in_reply_to: str | None
    text: str  # the new text, quoted reply stripped
    quoted: str  # the stripped quote, as elided context
    forwarded: tuple[Forwarded, ...] = ()
    attachments: tuple[Attachment, ...] = ()
    skipped: tuple[str, ...] = ()  # attachments not kept, with the reason
    headers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    content_type: str = "text/plain"
    part_types: tuple[str, ...] = ()  # every MIME part's content type, the top one first (bounded)
    file_names: tuple[str, ...] = ()  # the attachments' file names as sent (bounded), kept or not

    def header(self, name: str) -> tuple[str, ...]:
        return self.headers.get(name.lower(), ())


def parse(raw: bytes, max_attachments: int, max_attachment_bytes: int) -> Mail:
    msg: Message
    try:
        msg = _message(raw)
        text, html, attachments, forwarded = _walk(msg)
        content_type = msg.get_content_type()
        part_types, file_names = _part_types(msg)
    except (*_BROKEN, RecursionError):
        # A MIME parameter the stdlib chokes on (a lone surrogate, a cut UTF-16 value), or absurd nesting:
        # read the headers alone and keep the raw body as the text.
        msg = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw, headersonly=True)
        rest = raw_body(raw)
        text = _decode_bytes(rest).replace("\r\n", "\n") if rest is not None else ""
        html, attachments, forwarded, content_type, part_types, file_names = "", [], [], "", (), ()
    headers = _headers(msg)
    content_type = content_type or _first(headers, "content-type").partition(";")[0].strip().lower() or "text/plain"
    body = text or _html_to_text(html)
    body, history = split_history(body) if _is_reply(headers) else (body, "")
    note, inline = split_inline_forward(body)
    new_text, quoted = strip_quotes(note)
    new_text, bottom = strip_quote_block(new_text)
    quoted = "\n".join(q for q in (bottom, quoted, history) if q)
    kept, skipped = _cap(attachments, max_attachments, max_attachment_bytes)
    sender_display, sender = next(iter(addresses(_first(headers, "from"))), ("", ""))
    return Mail(
        message_id=message_id(headers, raw),
        sender=sender.lower(),
        sender_display=sender_display,
        subject=_first(headers, "subject"),
        date=_first(headers, "date"),
        references=tuple(_ids(" ".join(headers.get("references", ())))),
        in_reply_to=next(iter(_ids(_first(headers, "in-reply-to"))), None),
        text=new_text,
        quoted=quoted,
        forwarded=tuple(forwarded) + inline,
        attachments=tuple(kept),
        skipped=tuple(skipped),
        headers=headers,
        content_type=content_type,
        part_types=part_types,
        file_names=file_names,
    )


def _message(raw: bytes) -> EmailMessage:
    """The parsed message; compat32's reading where the default policy lost a multipart's boundary.

    Outlook Express writes ``boundary=----=_NextPart_...`` unquoted: the default policy cuts the
    value at the first ``=`` and finds no part, so the raw MIME would become the text. compat32 reads
    it as the clients do.
    """
    msg = email.message_from_bytes(raw, policy=_POLICY)
    assert isinstance(msg, EmailMessage)
    if _needs_repair(msg) and (repaired := repair_headers(raw)) is not None:
        msg = email.message_from_bytes(repaired, policy=_POLICY)
        assert isinstance(msg, EmailMessage)
    if msg.get_content_maintype() != "multipart" or msg.is_multipart():
        return msg
    lenient = email.message_from_bytes(raw, _class=EmailMessage, policy=email.policy.compat32)
    assert isinstance(lenient, EmailMessage)
    return lenient if lenient.is_multipart() else msg


def _needs_repair(msg: Message) -> bool:
    broken = any(isinstance(d, email.errors.MissingHeaderBodySeparatorDefect) for d in msg.defects)
    # Names only: reading the value would run the header registry, quadratic on some From values.
    return broken or "from" not in msg


def repair_headers(raw: bytes) -> bytes | None:
    """The mail with a header section the stdlib can read; None if there is nothing to repair.

    A person's client (or a relay) may leave a stray line without a colon, which ends the stdlib's header
    section there (From, Subject and the rest become body text), or write the obsolete ``From  :`` with
    spaces before the colon (RFC 5322 4.5.8), which it does not read at all. The stray line is dropped;
    the spaces go. Lines after the last header are left to the stdlib (a mail without headers is all body).
    """
    end = min((found for sep in (b"\r\n\r\n", b"\n\n") if (found := raw.find(sep)) >= 0), default=len(raw))
    lines = raw[:end].splitlines(keepends=True)
    headers = [number for number, line in enumerate(lines) if _OBSOLETE_HEADER.match(line)]
    last = headers[-1] if headers else -1
    kept = []
    for number, line in enumerate(lines):
        if number > last or line[:1] in (b" ", b"\t") or (number == 0 and _MBOX_FROM.match(line)):
            kept.append(line)  # text after the last header (the body, as the stdlib reads it), a folded line, mbox
        elif header := _OBSOLETE_HEADER.match(line):
            kept.append(header.group(1) + b":" + line[header.end() :])
    repaired = b"".join(kept)
    return None if repaired == raw[:end] else repaired + raw[end:]


def addresses(value: str) -> list[tuple[str, str]]:
    """(display name, address) pairs of an address header; none if the stdlib's parser gives up on it."""
    try:
        return [pair for pair in email.utils.getaddresses([value]) if pair != ("", "")]
    except RecursionError:  # comments nested thousands deep
        return []


def raw_body(raw: bytes) -> bytes | None:
    """What follows the first empty line (the end of the header section); None if there is none."""
    ends = [(found, len(sep)) for sep in (b"\n\n", b"\n\r\n") if (found := raw.find(sep)) >= 0]
    if not ends:
        return None
    start, length = min(ends)
    return raw[start + length :]


def message_id(headers: dict[str, tuple[str, ...]], raw: bytes) -> str:
    """The Message-ID, or a hash of the raw bytes for mail that has none (so a rescan still dedupes)."""
    found = _ids(_first(headers, "message-id"))
    return found[0] if found else "<sha256-" + hashlib.sha256(raw).hexdigest()[:40] + "@agentd.invalid>"


def _headers(msg: Message) -> dict[str, tuple[str, ...]]:
    headers: dict[str, list[str]] = {}
    for name, value in msg.raw_items():
        seen = headers.setdefault(name.lower(), [])
        decode = name.lower() in _DECODED_HEADERS and not seen and len(str(value)) <= HEADER_DECODE_CHARS
        seen.append(_clean(_header_text(name, str(value)) if decode else str(value)))
    return {k: tuple(v) for k, v in headers.items()}


def _header_text(name: str, value: str) -> str:
    """The header with RFC 2047 encoded words decoded; its raw text if the header registry chokes on it."""
    try:
        return str(email.policy.default.header_fetch_parse(name, value))
    except (*_BROKEN, RecursionError):
        return value


def _clean(text: str) -> str:
    """Undo surrogate escapes of 8-bit header bytes (usually UTF-8), and flatten folding."""
    fixed = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return " ".join(fixed.split())


def _first(headers: dict[str, tuple[str, ...]], name: str) -> str:
    values = headers.get(name)
    return values[0] if values else ""


def _ids(value: str) -> list[str]:
    return _MESSAGE_ID.findall(value)


def _walk(msg: EmailMessage) -> tuple[str, str, list[Attachment], list[Forwarded]]:
    texts: list[str] = []
    htmls: list[str] = []
    attachments: list[Attachment] = []
    forwarded: list[Forwarded] = []
    for part in _parts(msg):
        kind = part.get_content_type()
        if kind == "message/rfc822":
            forwarded += [_forwarded(inner) for inner in _inner_messages(part)]
        elif part.get_filename() or part.get_content_disposition() == "attachment":
            attachments.append(_attachment(part))
        elif kind == "text/plain" or part.get_content_maintype() == "multipart":
            # A multipart leaf is one whose boundary is missing or wrong: its body is all the text there is.
            texts.append(decode_text(part))
        elif kind == "text/html":
            htmls.append(decode_text(part))
    return "\n\n".join(t for t in texts if t.strip()), "\n".join(htmls), attachments, forwarded


def _part_types(msg: Message) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The content types and file names of the first MAX_PARTS parts, attached messages included.

    Walked without recursion: a hostile mail nests thousands deep.
    """
    found: list[str] = []
    names: list[str] = []
    stack: list[Message] = [msg]
    while stack and len(found) < MAX_PARTS:
        part = stack.pop()
        found.append(part.get_content_type())
        if name := part.get_filename():
            names.append(_clean(name)[:255])
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            stack.extend(reversed([child for child in payload[:MAX_PARTS] if isinstance(child, Message)]))
    return tuple(found), tuple(names)


def _parts(msg: Message) -> list[Message]:
    """Leaf parts and attached messages, without descending into attached messages."""
    if msg.get_content_type() == "message/rfc822" or not msg.is_multipart():
        return [msg]
    payload = msg.get_payload()
    children = payload if isinstance(payload, list) else []
    return [leaf for child in children if isinstance(child, Message) for leaf in _parts(child)]


def _inner_messages(part: Message) -> list[Message]:
    payload = part.get_payload()
    return [m for m in payload if isinstance(m, Message)] if isinstance(payload, list) else []


def decode_text(part: Message) -> str:
    """A text part in its declared charset, else utf-8, cp1252, latin-1; an unknown charset never raises."""
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return ""
    return _decode_bytes(data, part.get_content_charset())


def _decode_bytes(data: bytes, declared: str | None = None) -> str:
    for charset in (declared, *FALLBACK_CHARSETS) if declared else FALLBACK_CHARSETS:
        try:
            return data.decode(charset)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("latin-1")


def _html_to_text(html: str) -> str:
    if not html.strip():
        return ""
    converter = html2text.HTML2Text()
    converter.ignore_images = True
    converter.body_width = 0
    return converter.handle(_flatten_deep_lists(html)).strip()


def _flatten_deep_lists(html: str) -> str:
    """Past MAX_HTML_LISTS lists, list tags become divs (their text stays)."""
    opened = 0

    def swap(tag: re.Match[str]) -> str:
        nonlocal opened
        opened += not tag.group(1)
        return tag.group(0) if opened <= MAX_HTML_LISTS else f"<{tag.group(1)}div"

    return _HTML_LIST_TAG.sub(swap, html)


def _forwarded(inner: Message) -> Forwarded:
    headers = _headers(inner)
    text, html, _, _ = _walk(inner) if isinstance(inner, EmailMessage) else ("", "", [], [])
    return Forwarded(
        sender=_first(headers, "from"),
        date=_first(headers, "date"),
        subject=_first(headers, "subject"),
        body=(text or _html_to_text(html)).strip(),
    )


def _is_reply(headers: dict[str, tuple[str, ...]]) -> bool:
    return bool(headers.get("in-reply-to") or _REPLY_SUBJECT.match(_first(headers, "subject")))


def split_history(text: str) -> tuple[str, str]:
    """A reply's text above an "-----Original Message-----" line (AOL, Comcast, Yahoo, old Outlook), and the quote.

    In a reply that line starts the quoted history, not a forward from someone else.
    """
    lines = text.splitlines(keepends=True)
    marker = next((i for i, line in enumerate(lines) if _ORIGINAL_MESSAGE.fullmatch(line.strip())), None)
    if marker is None:
        return text, ""
    return "".join(lines[:marker]).strip(), "".join(lines[marker:]).strip()


def strip_quote_block(text: str) -> tuple[str, str]:
    """The text without its one block of ``>`` lines and that block's attribution; the block apart.

    mail-parser-reply misses a quote above the reply (bottom-posting, Thunderbird) and attribution lines in
    languages it does not know (Android's). Text with several quote blocks is an inline answer: left whole.
    """
    lines = text.splitlines()
    quoted = [i for i, line in enumerate(lines) if line.startswith(">")]
    if not quoted or quoted[-1] - quoted[0] + 1 != len(quoted):
        return text, ""
    start, end = quoted[0], quoted[-1] + 1
    start = _attribution_start(lines, start)
    kept = [*lines[:start], *lines[end:]]
    if not "".join(kept).strip():
        return text, ""
    return "\n".join(kept).strip(), "\n".join(lines[start:end]).strip()


def _attribution_start(lines: list[str], block: int) -> int:
    """Where the attribution above a quote block starts: its line ending in ":" and up to two lines it continues."""
    index = block
    while index > 0 and not lines[index - 1].strip():
        index -= 1
    if index == 0 or not lines[index - 1].rstrip().endswith(":"):
        return block
    index -= 1
    for _ in range(2):
        if index > 0 and lines[index - 1].strip() and _ATTRIBUTION_PART.match(lines[index - 1]):
            index -= 1
    return index


def split_inline_forward(text: str) -> tuple[str, tuple[Forwarded, ...]]:
    """The forwarder's note, and the message forwarded inline below a "Forwarded message" line."""
    lines = text.splitlines(keepends=True)
    marker = next((i for i, line in enumerate(lines) if _INLINE_FORWARD.fullmatch(line.strip())), None)
    if marker is None:
        return text, ()
    note = "".join(lines[:marker]).strip()
    rest = [line.rstrip("\r\n") for line in lines[marker + 1 :]]
    while rest and not rest[0]:
        rest.pop(0)
    fields: dict[str, str] = {}
    index = 0
    while index < len(rest) and (header := _FORWARD_HEADER.fullmatch(rest[index].strip())):
        fields[header.group(1).lower()] = header.group(2).strip()
        index += 1
    original = Forwarded(
        sender=fields.get("from", ""),
        date=fields.get("date") or fields.get("sent", ""),
        subject=fields.get("subject", ""),
        body="\n".join(rest[index:]).strip(),
    )
    return note, (original,)


def strip_quotes(text: str) -> tuple[str, str]:
    """(the new text, the quoted reply below it) using mail-parser-reply on the head of the text.

    When no quote starts within the head, the whole text is the new text, unchanged: a long message
    then keeps its quote, but never loses a word.
    """
    if not text.strip():
        return "", ""
    head, tail = _head(text)
    latest, quoted = _strip_quotes(head)
    if not tail.strip():
        return latest, quoted
    if not quoted:
        return text.strip(), ""
    return latest, (quoted + "\n" + tail).strip()


def _head(text: str) -> tuple[str, str]:
    """At most QUOTE_SCAN_LINES lines and QUOTE_SCAN_CHARS characters, cut at a line end if there is one."""
    cut = min(len(text), QUOTE_SCAN_CHARS)
    newlines = 0
    position = text.find("\n")
    while 0 <= position < cut:
        newlines += 1
        if newlines >= QUOTE_SCAN_LINES:
            cut = position + 1
            break
        position = text.find("\n", position + 1)
    if cut < len(text) and (line_end := text.rfind("\n", 0, cut)) > 0:
        cut = line_end + 1
    return text[:cut], text[cut:]


def _strip_quotes(text: str) -> tuple[str, str]:
    if not text.strip():
        return "", ""
    replies = EmailReplyParser(languages=["en", "de", "fr", "es", "nl"]).read(text=text).replies
    if not replies:
        return text.strip(), ""
    latest = replies[0].body.strip() or text.strip()
    quoted = "\n".join(r.content for r in replies[1:]).strip()
    return latest, quoted


def _attachment(part: Message) -> Attachment:
    data = part.get_payload(decode=True)
    return Attachment(
        name=safe_filename(_clean(part.get_filename() or ""), fallback="attachment"),
        content_type=part.get_content_type(),
        data=data if isinstance(data, bytes) else b"",
    )


def _cap(found: list[Attachment], count: int, size: int) -> tuple[list[Attachment], list[str]]:
    kept: list[Attachment] = []
    skipped: list[str] = []
    for attachment in found:
        if len(attachment.data) > size:
            skipped.append(f"{attachment.name} ({len(attachment.data) / 1e6:.1f} MB, over the size limit)")
        elif len(kept) >= count:
            skipped.append(f"{attachment.name} (over the limit of {count} attachments)")
        else:
            kept.append(attachment)
    return kept, skipped

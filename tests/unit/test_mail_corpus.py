"""Classification and reading measured on real mail nobody here wrote (tests/data/mail-corpus/SOURCES.md)."""

from __future__ import annotations

import re

from bot.mail import compose
from tests.support.mail_corpus import CORPUS, figures, labels, samples

# What raw MIME looks like when it leaks into a prompt: part headers, or a run of base64 lines.
_MIME_HEADER = re.compile(r"^(content-type|content-transfer-encoding|mime-version):", re.IGNORECASE | re.MULTILINE)
_BASE64_RUN = re.compile(r"(?:^[A-Za-z0-9+/=]{60,}\n){3,}", re.MULTILINE)


def test_every_mail_in_the_corpus_is_labelled() -> None:
    assert sorted(labels()) == sorted(p.name for p in CORPUS.glob("*.eml"))
    assert len(labels()) >= 100


def test_machine_mail_is_ignored_and_human_mail_answered() -> None:
    found = samples()
    result = figures(found)
    print("\n" + result.lines())
    missed = [s.name for s in found if s.machine and s.reason is None]
    wrong = [(s.name, s.reason) for s in found if not s.machine and s.reason is not None]
    assert not missed, f"machine mail answered: {missed}"
    assert not wrong, f"human mail ignored: {wrong}"
    assert result.machine_ignored == result.machine_total and result.human_answered == result.human_total


def test_no_prompt_built_from_the_corpus_contains_raw_mime() -> None:
    # Only a person's mail reaches the agent: a bounce's text quotes the bounced headers on purpose.
    for sample in (s for s in samples() if not s.machine):
        text = compose.prompt(sample.mail, 20_000)
        assert not _MIME_HEADER.search(text), f"{sample.name}: MIME headers in the prompt"
        assert not _BASE64_RUN.search(text), f"{sample.name}: base64 in the prompt"


def test_replies_from_every_client_keep_only_the_new_text() -> None:
    """A reply's quote is history, never a forward: AOL, Comcast and Yahoo's "Original Message", Android's
    Russian attribution, Thunderbird's bottom-posted reply."""
    for sample in samples():
        if not sample.name.startswith("talon-") or "share-block" in sample.name:
            continue
        mail = sample.mail
        assert mail.text == "Hello", f"{sample.name}: {mail.text!r}"
        assert mail.quoted and not mail.forwarded, sample.name

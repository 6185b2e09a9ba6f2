"""The mail classifier on the corpus: machine mail ignored out of all machine mail, human mail answered out of all.

Run: .venv/bin/python -m tests.bench.bench_mail_corpus [--misses]

The corpus is other projects' fixture mails (tests/data/mail-corpus/SOURCES.md), labelled by reading
each. Goal: 100 % on both figures.
"""

from __future__ import annotations

import argparse

from tests.support.mail_corpus import figures, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--misses", action="store_true", help="list every mail classified wrong")
    found = samples()
    print(figures(found).lines())
    if parser.parse_args().misses:
        for sample in found:
            if sample.machine == (sample.reason is None):
                print(f"  wrong: {sample.name} ({'machine' if sample.machine else 'human'}, {sample.reason})")


if __name__ == "__main__":
    main()

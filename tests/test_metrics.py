"""The wiki-agent metrics on hand-made answers whose counts are known."""

from __future__ import annotations

import pytest

from swft_lite import metrics as m

PROMPT = """Document the request path of this service.

File: src/app.py
```python
import server

def main():
    server.run(port=8080)
    return 0
```

```python src/server.py
def run(port):
    bind(port)
    loop()
```

==> docs/notes.md <==
```
    40\tThe cache sits in front of the database.
    41\tIt is flushed nightly.
    42\tSee ops.
```
"""

# 5 claims: 3 cite shown source validly, 1 cites a line outside the file shown, 1 cites nothing.
PAGE = """# Request path

## Entry point

- `main()` starts the server on port 8080 (src/app.py:4).
- The server binds its port before looping (`src/server.py:2-3`).
- The cache is flushed nightly, see [notes](docs/notes.md#L41).

## Details

The server also handles shutdown (src/server.py:12). Requests are logged.

```python
print("code is not a claim")
```
"""


def test_sources_are_recognised_with_their_lines():
    files = m.find_sources([PROMPT])
    assert set(files) == {"src/app.py", "src/server.py", "docs/notes.md"}
    assert files["src/app.py"].lines == set(range(1, 6))
    assert files["src/server.py"].lines == {1, 2, 3}
    assert files["docs/notes.md"].lines == {40, 41, 42}  # numbered lines: the numbers shown


def test_page_citing_three_of_five_claims():
    r = m.source_refs(PAGE, [PROMPT])
    assert r["claims"] == 5 and r["cited"] == 3 and r["share"] == pytest.approx(0.6)
    assert r["citations"] == 4
    assert r["uncited_claims"] == ["Requests are logged."]
    assert len(r["invalid_citations"]) == 1 and "line 12 is outside" in r["invalid_citations"][0]


def test_citation_rules():
    ctx = ["<file path=\"pkg/a.go\">\nline1\nline2\n</file>\n\n`lib/b.rs` (lines 10-12)\n```\nx\ny\nz\n```"]
    files = m.find_sources(ctx)
    assert files["pkg/a.go"].lines == {1, 2} and files["lib/b.rs"].lines == {10, 11, 12}
    ok = m.source_refs("- One a.go:2 claim.\n- Two lib/b.rs:10-12.\n- Three lib/b.rs:9.\n- Four x.py:1.\n"
                       "- At 10:30 nothing is cited.", ctx)
    # a.go is an unambiguous suffix of pkg/a.go; b.rs:9 is before the excerpt; x.py is not shown; 10:30 is no path
    assert (ok["claims"], ok["cited"], ok["citations"]) == (5, 2, 4)
    assert not m.find_citations("version 1.2:3 e.g. http://localhost:8080")[1:]  # only '1.2:3'-like noise at most


def test_sentences_bullets_and_tables_are_claims():
    text = ("Intro sentence one, e.g. with an abbreviation. Sentence two!\n\n"
            "1. numbered item\n   - nested item\n\n| a | b |\n|---|---|\n| row one | x |\n| row two | y |\n")
    assert m.extract_claims(text) == ["Intro sentence one, e.g. with an abbreviation.", "Sentence two!",
                                      "numbered item", "nested item", "row one | x", "row two | y"]


def test_markdown_valid():
    assert m.markdown_valid(PAGE)["valid"]
    unclosed = m.markdown_valid("# Title\n\n```python\nprint(1)\n")
    assert not unclosed["valid"] and unclosed["problems"] == ["line 3: code fence ```python is never closed"]
    skipped = m.markdown_valid("# Title\n\n### Too deep\n\n## Fine\n\n# Up is fine\n")
    assert skipped["problems"] == ["line 3: heading level 3 under level 1 (skips level 2)"]
    assert not m.markdown_valid("  \n")["valid"]
    assert m.markdown_valid("~~~\nx\n~~~~\n")["valid"]


BROKEN_EDGE = "```mermaid\nflowchart TD\n  A[Client] --> B[API]\n  B -->\n```\n"
GOOD = "```mermaid\nsequenceDiagram\n  Client->>API: GET /x\n  API-->>Client: 200\n```\n"


def _checker(kind):
    if kind == "mermaid":
        checker, why = m.mermaid_checker("auto")
        if why:
            pytest.skip(f"Mermaid's own parser cannot run here: {why}")
        return checker
    return m.SubsetMermaidChecker()


@pytest.mark.parametrize("kind", ["subset", "mermaid"])
def test_mermaid_valid(kind):
    checker = _checker(kind)
    r = m.mermaid_valid("Text.\n\n" + GOOD + "\n" + BROKEN_EDGE, checker)
    assert (r["blocks"], r["checked"], r["valid_blocks"], r["valid"]) == (2, 2, 1, False)
    assert r["problems"][0].startswith("block at line 9:") and r["checker"] == checker.name
    assert m.mermaid_valid("no diagrams", checker)["valid"] is None


@pytest.mark.parametrize("kind", ["subset", "mermaid"])
def test_checkers_agree_on_statements(kind):
    """The subset check and Mermaid itself give the same verdicts on these."""
    c = _checker(kind)
    good = ["flowchart LR\n  A[Start] --> B{Ok?}\n  B -- yes --> C((Done))\n  B -->|no| D\n  subgraph S\n  D\n  end\n"
            "  classDef x fill:#f00\n", "graph TD;\n A-->B;\n",
            "sequenceDiagram\n participant A\n A->>+B: call\n alt ok\n B-->>-A: fine\n else\n B--xA: err\n end\n"
            " Note over A,B: done\n",
            "classDiagram\n Animal <|-- Dog\n class Dog {\n +bark()\n }\n Dog : +String name\n"]
    assert [ok for ok, _ in c.check(good)] == [True, True, True, True]
    bad = ["flowchart TD\n subgraph S\n A-->B\n", "sequenceDiagram\n A->>B\n", "classDiagram\n class A {\n x\n",
           "flowchart TD\n A -> B\n"]
    assert [ok for ok, _ in c.check(bad)] == [False, False, False, False]
    if kind == "subset":
        assert c.check(["pie\n \"a\": 1\n"])[0][0] is None  # not covered: unchecked, not invalid


def test_format_check():
    good = m.format_check(m.Answer(final="Hello.", reasoning="think a bit"))
    assert good["ok"] and good["reasoning_words"] == 3 and good["leaked_tokens"] == []
    leaked = m.format_check(m.Answer(final="<|channel|>final<|message|>Hello", reasoning=None))
    assert not leaked["ok"] and leaked["leaked_tokens"] == ["<|channel|>", "<|message|>"]
    missing = m.format_check(m.Answer(final=None, reasoning="only thoughts"))
    assert not missing["ok"] and not missing["final_present"] and missing["problems"] == ["no final channel"]


def test_score_and_summarize():
    scores = m.score_answers([(m.Answer(PAGE), [PROMPT]), (m.Answer("Uncited claim.\n\n" + BROKEN_EDGE), [])],
                             m.SubsetMermaidChecker())
    s = m.summarize(scores)
    assert s["rows"] == 2 and s["claims"] == 6 and s["cited_claims"] == 3 and s["source_refs"] == pytest.approx(0.5)
    assert s["markdown_valid"] == 1.0 and s["mermaid_valid"] == 0.0 and s["mermaid_blocks"] == 1
    assert s["format_ok"] == 1.0


def test_fetch_mermaid_without_npm_is_one_error_line(tmp_path):
    from click.testing import CliRunner

    from swft_lite.cli import main

    result = CliRunner().invoke(main, ["eval", "--fetch-mermaid"], env={"PATH": str(tmp_path)})
    assert result.exit_code != 0 and not isinstance(result.exception, RuntimeError), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "npm is not installed" in errors[0] and "subset" in errors[0], result.output

"""The wiki-agent metrics: how good one answer is as an architecture-wiki page, and how good a set of them is.

Pure functions of text (no model): `swft-lite eval` applies them to generated answers and to answers generated
elsewhere (`--predictions`), and they can be used on their own. Each answer is scored against its *context*: every
message before it (system, developer, user, tool).

source_refs  - the share of the answer's claims that cite source shown in the prompt.
    Source in the prompt: every file shown in a context message, recognised in three forms -
      1. a fenced code block (``` or ~~~) whose info string names a path: ```python src/app.py, ```src/app.py,
         ```py path=src/app.py (also file=, title=); a word of the info string is a path if it holds "/" or ".";
      2. a fenced code block right after a line that is only a path label: `src/app.py`, **src/app.py**,
         ### src/app.py, File: src/app.py, Path: ..., Source: ..., ==> src/app.py <== (a trailing ":" is ignored);
      3. <file path="src/app.py"> ... </file> (also <source ...> and <document ...>).
    The lines shown: when most of the block's non-blank lines start with a line number ("12: x", "12 | x",
    "    12\tx", "12  x"), the numbers present; otherwise lines 1..N of the block, or START..START+N-1 when the
    label says where the excerpt starts (src/app.py:40-60, src/app.py (lines 40-60), src/app.py#L40-L60). A path
    shown several times has the union of its lines.
    Claims: the answer parsed as Markdown (markdown-it-py). Every list item is one claim (its own paragraphs, not
    its sub-items, which are claims themselves); every other paragraph (blockquotes included) is split into
    sentences, one claim each; every table body row is one claim. Headings, code blocks and Mermaid blocks are not
    claims; a piece of text without a letter is not a claim.
    Citations: `PATH:LINE`, `PATH:LINE-LINE`, `PATH#LLINE` or `PATH#LLINE-LLINE`, anywhere in the claim (plain,
    in backticks or inside a link), where PATH is made of letters, digits and . _ / - and holds a "." or "/".
    A citation is valid when PATH is a path shown (after dropping a leading ./), or the end of exactly one path
    shown on a "/" boundary (app.py for src/app.py), and every cited line lies within the lines shown of that path.
    A claim counts as cited when at least one of its citations is valid. source_refs = cited claims / claims
    (None for an answer without claims). For a set: all cited claims / all claims.

markdown_valid - the answer parses with markdown-it-py (CommonMark + tables) and: it is not empty; every code
    fence is closed; headings are well nested (going down, no level is skipped: # then ### is an error; going up
    any number of levels is fine; the first heading may be any level). For a set: the share of valid answers.

mermaid_valid - every ```mermaid block parses. Checker: Mermaid itself (`mermaid.parse` of the npm package
    `mermaid`, run by node under jsdom: swft_lite/mermaid_check.mjs) where node and the package are installed
    (`swft-lite eval --fetch-mermaid` installs it into ~/.cache/swft-lite/mermaid); else a stated subset check of
    flowchart/graph, sequenceDiagram and classDiagram syntax (other diagram types are "unchecked" and left out of
    the share). Every result records which checker ran. For a set: valid blocks / checked blocks.

format - a final channel is present and not empty, and no harmony markup (<|channel|>, <|start|>, <|message|>,
    <|end|>, <|return|>, <|call|>, <|constrain|>, <|endoftext|>, <|startoftext|>) leaked into the final answer or the
    reasoning; the reasoning's length (characters, words, tokens when known) is reported. For a set: the share of
    answers with format ok, and the mean reasoning length.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Answer", "SourceFile", "find_sources", "extract_claims", "find_citations", "source_refs",
           "markdown_valid", "mermaid_blocks", "mermaid_valid", "format_check", "score_answer", "score_answers",
           "summarize", "MermaidChecker", "mermaid_checker", "SubsetMermaidChecker", "NodeMermaidChecker",
           "HARMONY_MARKUP", "MERMAID_VERSION", "JSDOM_VERSION", "install_mermaid", "default_mermaid_dir"]

HARMONY_MARKUP = ("<|channel|>", "<|start|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>",
                  "<|endoftext|>", "<|startoftext|>")
MERMAID_VERSION = "11.17.2"
JSDOM_VERSION = "29.1.1"


@dataclass
class Answer:
    """One answer to score. final: the final-channel text (None: the model wrote no final channel). reasoning:
    the analysis channel. reasoning_tokens: its length in tokens where a model generated it. parse_error: why the
    model's output could not be read as harmony (generation only)."""
    final: str | None
    reasoning: str | None = None
    reasoning_tokens: int | None = None
    parse_error: str | None = None


def _md():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table")


# --- source in the prompt --------------------------------------------------------------------------------------------


@dataclass
class SourceFile:
    path: str
    lines: set[int] = field(default_factory=set)

    def span(self) -> str:
        if not self.lines:
            return "no lines"
        return f"lines {min(self.lines)}-{max(self.lines)}" + ("" if len(self.lines) == max(self.lines) - min(
            self.lines) + 1 else " (with gaps)")


_PATH_CHARS = r"[A-Za-z0-9_./-]"
_PATH_RE = re.compile(rf"^(?:\./)?{_PATH_CHARS}*[A-Za-z0-9_]{_PATH_CHARS}*$")
_LABEL_PREFIX = re.compile(r"^(?:#+\s*|>\s*)?(?:(?:file|path|source)\s*:\s*)?", re.I)
_RANGE_SUFFIX = re.compile(r"^(?P<path>.+?)(?::(?P<a>\d+)(?:-(?P<b>\d+))?|#L(?P<ga>\d+)(?:-L?(?P<gb>\d+))?|"
                           r"\s+\(lines?\s+(?P<pa>\d+)(?:\s*[-–]\s*(?P<pb>\d+))?\))$")
_NUMBERED = re.compile(r"^\s*(\d+)(?:\s*[:|]\s?|\t| +)")
_XML_FILE = re.compile(r"<(file|source|document)\s+[^>]*?path\s*=\s*[\"']([^\"']+)[\"'][^>]*>\n?(.*?)</\1>", re.S)


def _is_path(text: str) -> bool:
    return bool(_PATH_RE.match(text)) and ("/" in text or "." in text.strip(".")) and not text.isdigit()


def _norm_path(p: str) -> str:
    while p.startswith("./"):
        p = p[2:]
    return p


def _label_path(label: str) -> tuple[str, int | None] | None:
    """(path, first line) when `label` (a fence's info string word or the line above it) names a file."""
    s = label.strip()
    if s.startswith("==>") and s.endswith("<=="):
        s = s[3:-3].strip()
    s = _LABEL_PREFIX.sub("", s).strip()
    s = s.strip("*_` ").rstrip(":").strip("*_` ")
    start = None
    m = _RANGE_SUFFIX.match(s)
    if m and _is_path(m.group("path").strip("`")):
        s = m.group("path").strip("`")
        start = int(m.group("a") or m.group("ga") or m.group("pa"))
    return (_norm_path(s), start) if _is_path(s) else None


def _info_path(info: str) -> tuple[str, int | None] | None:
    words = info.split()
    for w in words:
        for key in ("path=", "file=", "title=", "filename="):
            if w.lower().startswith(key):
                found = _label_path(w[len(key):].strip("\"'"))
                if found:
                    return found
    for w in words:
        found = _label_path(w)
        if found:
            return found
    return None


def _shown_lines(body: str, start: int | None) -> set[int]:
    lines = body.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    nonblank = [ln for ln in lines if ln.strip()]
    numbered = [int(m.group(1)) for ln in nonblank if (m := _NUMBERED.match(ln))]
    if nonblank and len(numbered) >= max(1, 0.8 * len(nonblank)):
        return set(numbered)
    first = start or 1
    return set(range(first, first + len(lines)))


def find_sources(context_texts: list[str]) -> dict[str, SourceFile]:
    """The files shown in the prompt (see the module docstring): path -> SourceFile with the lines shown."""
    files: dict[str, SourceFile] = {}

    def add(path: str, lines: set[int]):
        files.setdefault(path, SourceFile(path)).lines |= lines

    md = _md()
    for text in context_texts:
        if not text:
            continue
        for m in _XML_FILE.finditer(text):
            found = _label_path(m.group(2))
            if found:
                add(found[0], _shown_lines(m.group(3), found[1]))
        src_lines = text.split("\n")
        for tok in md.parse(text):
            if tok.type != "fence" or tok.map is None:
                continue
            found = _info_path(tok.info)
            if found is None:
                k = tok.map[0] - 1
                while k >= 0 and not src_lines[k].strip():
                    k -= 1
                if k >= 0:
                    found = _label_path(src_lines[k])
            if found:
                add(found[0], _shown_lines(tok.content, found[1]))
    return files


# --- claims and citations --------------------------------------------------------------------------------------------

_ABBREV = re.compile(r"\b(?:e\.g|i\.e|etc|vs|cf|approx|incl|Mr|Ms|Dr|No|Fig|Sec)\.$", re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[`*_]*[A-Z0-9])")
_CITATION = re.compile(rf"(?<![A-Za-z0-9_./-])(?P<path>{_PATH_CHARS}+?)"
                       r"(?::(?P<a>\d+)(?:-(?P<b>\d+))?|#L(?P<ga>\d+)(?:-L?(?P<gb>\d+))?)(?![\d])")


def _sentences(text: str) -> list[str]:
    text = " ".join(text.split())
    out: list[str] = []
    pos = 0
    for m in _SENTENCE_END.finditer(text):
        piece = text[pos:m.start()]
        if _ABBREV.search(piece):
            continue
        out.append(piece)
        pos = m.end()
    out.append(text[pos:])
    return [s.strip() for s in out if s.strip()]


def extract_claims(answer: str) -> list[str]:
    """The claims of a Markdown answer: list items, sentences of other paragraphs, table body rows."""
    claims: list[str] = []
    tokens = _md().parse(answer or "")
    stack: list[str] = []  # open block types
    row: list[str] | None = None
    in_tbody = False
    item_texts: list[list[str]] = []
    slots: list[int] = []
    for tok in tokens:
        t = tok.type
        if t == "list_item_open":
            item_texts.append([])
            slots.append(len(claims))
            claims.append("")  # the item's place, filled when it closes (its sub-items come after it)
        elif t == "list_item_close":
            claims[slots.pop()] = " ".join(" ".join(item_texts.pop()).split())
        elif t == "tbody_open":
            in_tbody = True
        elif t == "tbody_close":
            in_tbody = False
        elif t == "tr_open" and in_tbody:
            row = []
        elif t == "tr_close" and row is not None:
            text = " | ".join(row)
            if re.search(r"[^\W\d_]", text):
                claims.append(text)
            row = None
        elif t.endswith("_open") and t not in ("list_item_open",):
            stack.append(t)
        elif t.endswith("_close"):
            if stack:
                stack.pop()
        elif t == "inline":
            if stack and stack[-1] == "heading_open":
                continue
            if row is not None:
                row.append(tok.content)
            elif stack and stack[-1] == "paragraph_open" and item_texts:
                item_texts[-1].append(tok.content)
            elif stack and stack[-1] == "paragraph_open":
                claims.extend(_sentences(tok.content))
    return [c for c in claims if re.search(r"[^\W\d_]", c)]


@dataclass
class Citation:
    text: str
    path: str
    first: int
    last: int


def find_citations(text: str) -> list[Citation]:
    out = []
    for m in _CITATION.finditer(text or ""):
        path = _norm_path(m.group("path").rstrip("."))
        if not ("/" in path or "." in path) or path.replace(".", "").isdigit():
            continue
        a = int(m.group("a") or m.group("ga"))
        b = m.group("b") or m.group("gb")
        out.append(Citation(m.group(0), path, a, int(b) if b else a))
    return out


def _resolve(path: str, files: dict[str, SourceFile]) -> SourceFile | None:
    if path in files:
        return files[path]
    ends = [f for p, f in files.items() if p.endswith("/" + path)]
    return ends[0] if len(ends) == 1 else None


def check_citation(c: Citation, files: dict[str, SourceFile]) -> str | None:
    """None when the citation is valid, else why not."""
    f = _resolve(c.path, files)
    if f is None:
        return f"{c.path} is not shown in the prompt"
    if c.last < c.first:
        return f"{c.text}: the range ends before it starts"
    missing = [n for n in range(c.first, c.last + 1) if n not in f.lines]
    if missing:
        return f"{c.text}: line {missing[0]} is outside what the prompt shows of {f.path} ({f.span()})"
    return None


def source_refs(answer: str, context_texts: list[str]) -> dict:
    """Score one answer's citations (see the module docstring for what counts)."""
    files = find_sources(context_texts)
    claims = extract_claims(answer or "")
    cited = 0
    uncited: list[str] = []
    invalid: list[str] = []
    n_citations = 0
    for claim in claims:
        cites = find_citations(claim)
        n_citations += len(cites)
        problems = [check_citation(c, files) for c in cites]
        if any(p is None for p in problems):
            cited += 1
        elif cites:
            invalid.extend(p for p in problems if p)
        else:
            uncited.append(claim)
    return {"claims": len(claims), "cited": cited, "share": (cited / len(claims)) if claims else None,
            "citations": n_citations, "invalid_citations": invalid, "uncited_claims": uncited,
            "sources_shown": {p: f.span() for p, f in files.items()}}


# --- Markdown -------------------------------------------------------------------------------------------------------


def markdown_valid(answer: str) -> dict:
    """Parse with markdown-it-py; valid when not empty, every fence is closed and headings are well nested."""
    problems: list[str] = []
    text = answer or ""
    if not text.strip():
        return {"valid": False, "problems": ["the answer is empty"], "headings": 0, "fences": 0}
    lines = text.split("\n")
    tokens = _md().parse(text)
    prev_level = None
    headings = fences = 0
    for tok in tokens:
        if tok.type == "heading_open":
            headings += 1
            level = int(tok.tag[1])
            if prev_level is not None and level > prev_level + 1:
                problems.append(f"line {tok.map[0] + 1}: heading level {level} under level {prev_level} "
                                f"(skips level {prev_level + 1})")
            prev_level = level
        elif tok.type == "fence":
            fences += 1
            start, end = tok.map
            last = lines[end - 1].strip() if end - 1 < len(lines) else ""
            ch = tok.markup[0]
            closed = end - 1 > start and len(last) >= len(tok.markup) and set(last) == {ch}
            if not closed:
                problems.append(f"line {start + 1}: code fence {tok.markup}{tok.info} is never closed")
    return {"valid": not problems, "problems": problems, "headings": headings, "fences": fences}


# --- Mermaid --------------------------------------------------------------------------------------------------------


def mermaid_blocks(answer: str) -> list[tuple[int, str]]:
    """(line number, diagram source) of each ```mermaid fence."""
    out = []
    for tok in _md().parse(answer or ""):
        if tok.type == "fence" and tok.info.strip().split(" ")[0].lower() == "mermaid":
            out.append((tok.map[0] + 1, tok.content))
    return out


class MermaidChecker:
    name = "none"
    description = ""

    def check(self, diagrams: list[str]) -> list[tuple[bool | None, str | None]]:
        """(valid, error) per diagram; valid None: not checked (the checker does not know the diagram type)."""
        raise NotImplementedError


def default_mermaid_dir() -> Path:
    env = os.environ.get("SWFT_MERMAID_DIR")
    return Path(env) if env else Path.home() / ".cache" / "swft-lite" / "mermaid"


class NodeMermaidChecker(MermaidChecker):
    """Mermaid's own parser: `mermaid.parse()` from the npm package, in node under jsdom."""

    def __init__(self, node: str, modules_dir: Path):
        self.node, self.modules_dir = node, modules_dir
        version = "?"
        try:
            version = json.loads((modules_dir / "node_modules" / "mermaid" / "package.json").read_text())["version"]
        except (OSError, ValueError, KeyError):
            pass
        self.name = f"mermaid {version}"
        self.description = f"mermaid.parse() of the npm package mermaid {version} (node, jsdom) in {modules_dir}"

    def check(self, diagrams):
        if not diagrams:
            return []
        script = Path(__file__).with_name("mermaid_check.mjs")
        env = dict(os.environ, NODE_PATH=str(self.modules_dir / "node_modules"))
        proc = subprocess.run([self.node, str(script), str(self.modules_dir / "node_modules")],
                              input=json.dumps(diagrams), capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"the Mermaid checker failed: {proc.stderr.strip()[-500:]}")
        results = json.loads(proc.stdout)
        return [(r["ok"], r.get("error")) for r in results]


_FLOW_HEAD = re.compile(r"^(flowchart|graph)(\s+(TB|TD|BT|RL|LR))?\s*;?$")
_NODE = (r"[A-Za-z0-9_][\w.-]*(?:\s*(?:\[\[[^\]]*\]\]|\[\([^)]*\)\]|\(\([^)]*\)\)|\(\[[^\]]*\]\)|\[\/[^\]]*[\/\\]\]|"
         r"\[\\[^\]]*[\/\\]\]|\[[^\]]*\]|\([^)]*\)|\{\{[^}]*\}\}|\{[^}]*\}|>[^\]]*\]))?(?::::\w+)?")
_LINK = r"(?:<?(?:-{2,}|={2,}|-\.+-)[->ox]?|<?-{2,}[->ox]|--\s[^-]+?\s-->|==\s[^=]+?\s==>|-\.\s[^.]+?\s\.->)"
_FLOW_EDGE = re.compile(rf"^{_NODE}(?:\s*&\s*{_NODE})*(?:\s*{_LINK}\s*(?:\|[^|]*\|\s*)?{_NODE}(?:\s*&\s*{_NODE})*)+\s*;?$")
_FLOW_NODE = re.compile(rf"^{_NODE}\s*;?$")
_FLOW_STMT = re.compile(r"^(classDef|class|style|linkStyle|click|direction)\b")
_SEQ_MSG = re.compile(r"^[^\s:+-][^:]*?\s*(->>|-->>|->|-->|-x|--x|-\)|--\))\s*[+-]?\s*[^:\s][^:]*:.*$")
_SEQ_STMT = re.compile(r"^(?:(participant|actor|autonumber|activate|deactivate|title|box|create|destroy|links?)\b|"
                       r"note\s+(left of|right of|over)\s.*:)", re.I)
_SEQ_BLOCK = re.compile(r"^(loop|alt|opt|par|critical|break|rect)\b")
_SEQ_MID = re.compile(r"^(else|and|option)\b")
_CLASS_REL = re.compile(r"^[\w`~<>]+(\s+\"[^\"]*\")?\s*(<\|--|--\|>|\*--|--\*|o--|--o|-->|<--|--|\.\.>|<\.\.|\.\.\|>|"
                        r"<\|\.\.|\.\.)\s*(\"[^\"]*\"\s+)?[\w`~<>]+(\s*:\s*.*)?$")
_CLASS_STMT = re.compile(r"^(class\s+[\w`~<>]+(\s*\{)?\s*$|[\w`~<>]+\s*:\s*.+$|<<\w+>>\s*\w+$|note\b|direction\b|"
                         r"classDef\b|cssClass\b|style\b|link\b|callback\b|click\b|namespace\s+\w+\s*\{$)")


class SubsetMermaidChecker(MermaidChecker):
    """A line-by-line check of the common statements of flowchart/graph, sequenceDiagram and classDiagram (node and
    edge syntax, arrows, balanced blocks); any other diagram type is reported unchecked. Used when Mermaid itself
    cannot run here (no node, or the npm package not installed)."""

    name = "subset"
    description = ("swft-lite's subset check of flowchart/graph, sequenceDiagram and classDiagram syntax (Mermaid "
                   "itself was not available)")

    def check(self, diagrams):
        return [self._one(d) for d in diagrams]

    def _one(self, text: str):
        lines = [ln.split("%%")[0].strip() for ln in text.split("\n")]
        numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln]
        if not numbered:
            return False, "empty diagram"
        _, head = numbered[0]
        body = numbered[1:]
        if _FLOW_HEAD.match(head):
            return self._flow(body)
        if head == "sequenceDiagram":
            return self._seq(body)
        if head.startswith("classDiagram"):
            return self._class(body)
        return None, f"diagram type {head.split()[0]!r} is not covered by the subset check"

    @staticmethod
    def _flow(body):
        depth = 0
        for n, ln in body:
            if ln.startswith("subgraph"):
                depth += 1
            elif ln == "end":
                depth -= 1
                if depth < 0:
                    return False, f"line {n}: 'end' without a subgraph"
            elif not (_FLOW_EDGE.match(ln) or _FLOW_NODE.match(ln) or _FLOW_STMT.match(ln)):
                return False, f"line {n}: not a node, an edge or a flowchart statement: {ln!r}"
        return (True, None) if depth == 0 else (False, "a subgraph is never closed with 'end'")

    @staticmethod
    def _seq(body):
        depth = 0
        for n, ln in body:
            if _SEQ_BLOCK.match(ln):
                depth += 1
            elif ln == "end":
                depth -= 1
                if depth < 0:
                    return False, f"line {n}: 'end' without loop/alt/opt/par/critical/break/rect"
            elif _SEQ_MID.match(ln):
                if depth == 0:
                    return False, f"line {n}: {ln.split()[0]!r} outside a block"
            elif not (_SEQ_MSG.match(ln) or _SEQ_STMT.match(ln)):
                return False, f"line {n}: not a message (A->>B: text) or a sequence statement: {ln!r}"
        return (True, None) if depth == 0 else (False, "a loop/alt/opt/par block is never closed with 'end'")

    @staticmethod
    def _class(body):
        depth = 0
        for n, ln in body:
            if depth > 0:
                if ln == "}":
                    depth -= 1
                continue  # members inside class X { ... }
            if ln == "}":
                return False, f"line {n}: '}}' without an open class"
            if _CLASS_REL.match(ln) or _CLASS_STMT.match(ln):
                if ln.endswith("{"):
                    depth += 1
                continue
            return False, f"line {n}: not a relation (A <|-- B), a class or a member: {ln!r}"
        return (True, None) if depth == 0 else (False, "a class body is never closed with '}'")


def mermaid_checker(kind: str = "auto") -> tuple[MermaidChecker, str | None]:
    """(checker, why the real one is not used). kind: auto (Mermaid where it can run, else the subset), mermaid
    (Mermaid or an error), subset."""
    if kind == "subset":
        return SubsetMermaidChecker(), "--mermaid-checker subset"
    node = shutil.which("node")
    d = default_mermaid_dir()
    why = None
    if node is None:
        why = "node is not installed"
    elif not (d / "node_modules" / "mermaid" / "package.json").exists() or not (
            d / "node_modules" / "jsdom" / "package.json").exists():
        why = f"the npm packages mermaid and jsdom are not installed in {d} (swft-lite eval --fetch-mermaid)"
    if why is None:
        return NodeMermaidChecker(node, d), None
    if kind == "mermaid":
        raise RuntimeError(f"Mermaid's own parser cannot run: {why}")
    return SubsetMermaidChecker(), why


def install_mermaid(log=print) -> Path:
    """npm install mermaid and jsdom (pinned) into default_mermaid_dir()."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed (Node.js 18 or newer is needed for Mermaid's parser)")
    d = default_mermaid_dir()
    d.mkdir(parents=True, exist_ok=True)
    if not (d / "package.json").exists():
        (d / "package.json").write_text(json.dumps({"name": "swft-lite-mermaid", "private": True}))
    log(f"installing mermaid@{MERMAID_VERSION} and jsdom@{JSDOM_VERSION} into {d} ...")
    proc = subprocess.run([npm, "install", "--no-audit", "--no-fund", f"mermaid@{MERMAID_VERSION}",
                           f"jsdom@{JSDOM_VERSION}"], cwd=d, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"npm install failed: {proc.stderr.strip()[-800:]}")
    return d


def mermaid_valid(answer: str, checker: MermaidChecker | None = None) -> dict:
    """Check each ```mermaid block of one answer."""
    checker = checker or mermaid_checker()[0]
    blocks = mermaid_blocks(answer)
    results = checker.check([b for _, b in blocks])
    return _mermaid_result(blocks, results, checker)


def _mermaid_result(blocks, results, checker) -> dict:
    problems = [f"block at line {line}: {err}" for (line, _), (ok, err) in zip(blocks, results) if ok is False]
    unchecked = [f"block at line {line}: {err}" for (line, _), (ok, err) in zip(blocks, results) if ok is None]
    checked = sum(1 for ok, _ in results if ok is not None)
    valid_n = sum(1 for ok, _ in results if ok)
    return {"blocks": len(blocks), "checked": checked, "valid_blocks": valid_n,
            "valid": (valid_n == checked) if checked else None, "problems": problems, "unchecked": unchecked,
            "checker": checker.name}


# --- format ---------------------------------------------------------------------------------------------------------


def format_check(answer: Answer) -> dict:
    leaked = sorted({tok for text in (answer.final or "", answer.reasoning or "") for tok in HARMONY_MARKUP
                     if tok in text})
    final_present = answer.final is not None and bool(answer.final.strip())
    reasoning = answer.reasoning or ""
    problems = []
    if not final_present:
        problems.append("no final channel" if answer.final is None else "the final answer is empty")
    if leaked:
        problems.append("harmony markup in the text: " + " ".join(leaked))
    if answer.parse_error:
        problems.append(f"not valid harmony: {answer.parse_error}")
    return {"ok": not problems, "final_present": final_present, "leaked_tokens": leaked,
            "reasoning_chars": len(reasoning), "reasoning_words": len(reasoning.split()),
            "reasoning_tokens": answer.reasoning_tokens, "problems": problems}


# --- one answer, a set ----------------------------------------------------------------------------------------------


def score_answers(items: list[tuple[Answer, list[str]]], checker: MermaidChecker | None = None) -> list[dict]:
    """Score (answer, context texts) pairs; the Mermaid blocks of all answers go to the checker in one call."""
    checker = checker or mermaid_checker()[0]
    blocks = [mermaid_blocks(a.final or "") for a, _ in items]
    flat = [b for bs in blocks for _, b in bs]
    results = checker.check(flat) if flat else []
    out, k = [], 0
    for (answer, context), bs in zip(items, blocks):
        res = results[k:k + len(bs)]
        k += len(bs)
        out.append({"source_refs": source_refs(answer.final or "", context),
                    "markdown": markdown_valid(answer.final or ""),
                    "mermaid": _mermaid_result(bs, res, checker),
                    "format": format_check(answer)})
    return out


def score_answer(answer: Answer | str, context_texts: list[str], checker: MermaidChecker | None = None) -> dict:
    if isinstance(answer, str):
        answer = Answer(final=answer)
    return score_answers([(answer, context_texts)], checker)[0]


def summarize(scores: list[dict]) -> dict:
    """The set's figures (see the module docstring)."""
    n = len(scores)
    claims = sum(s["source_refs"]["claims"] for s in scores)
    cited = sum(s["source_refs"]["cited"] for s in scores)
    blocks = sum(s["mermaid"]["checked"] for s in scores)
    valid_blocks = sum(s["mermaid"]["valid_blocks"] for s in scores)
    fmt_ok = sum(1 for s in scores if s["format"]["ok"])
    md_ok = sum(1 for s in scores if s["markdown"]["valid"])
    rtoks = [s["format"]["reasoning_tokens"] for s in scores if s["format"]["reasoning_tokens"] is not None]
    return {
        "rows": n,
        "source_refs": cited / claims if claims else None, "claims": claims, "cited_claims": cited,
        "markdown_valid": md_ok / n if n else None,
        "mermaid_valid": valid_blocks / blocks if blocks else None, "mermaid_blocks": blocks,
        "mermaid_unchecked": sum(s["mermaid"]["blocks"] - s["mermaid"]["checked"] for s in scores),
        "format_ok": fmt_ok / n if n else None,
        "final_present": sum(1 for s in scores if s["format"]["final_present"]) / n if n else None,
        "leaked_markup_rows": sum(1 for s in scores if s["format"]["leaked_tokens"]),
        "reasoning_chars_mean": sum(s["format"]["reasoning_chars"] for s in scores) / n if n else None,
        "reasoning_tokens_mean": sum(rtoks) / len(rtoks) if rtoks else None,
    }

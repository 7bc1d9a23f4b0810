"""Static checks of the book's sources: bilingual prose, glossary links, exercises, stamps.

Used by tests/test_book_sources.py; each check returns a list of problems ("file, cell N: what"),
so one test run names every offending cell at once.

Sources are the markdown cells of ``notebooks/*.ipynb`` (located as "cell N", counted from 0 like
nbformat and JupyterLab's cell list) and the pages ``chapters/*.md`` (located as "line N").
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

from mldeploy.book import notebooks

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN = re.compile(r"[A-Za-z]")
OPEN = re.compile(r'^<div lang="(zh|en)">\s*$')
CLOSE = re.compile(r"^</div>\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^#{1,6}\s")
GLOSSARY_LINK = re.compile(
    r"\[(?P<text>[^\]]*)\]\((?P<path>[^)\s#]*glossary\.md)(?:#(?P<anchor>[^)\s]*))?\)"
)
TERM_ANCHOR = re.compile(r'^<a id="(?P<id>[A-Za-z0-9_-]+)"></a>\s*$')
TERM_HEADING = re.compile(r"^### (?P<zh>.+?) · (?P<en>.+?) (?P<ipa>/[^/]+/)\s*$")
EXERCISES = re.compile(r"^#{2,3}\s.*练习.*Exercises", re.IGNORECASE)
SOLUTION_TAG = notebooks.HIDE_TAG  # myst-nb folds source and outputs: hide-cell


@dataclass
class Source:
    """One markdown source: a notebook's markdown cell or a whole chapter page."""

    path: Path
    where: str  # "cell 3" or "line 1"
    text: str
    first_line: int = 1


@dataclass
class Block:
    """A stretch of markdown: inside a language block (lang 'zh'/'en') or shared (lang None)."""

    lang: str | None
    text: str
    line: int


def markdown_sources(path: Path) -> list[Source]:
    """The markdown a reader sees: every markdown cell of a notebook, or a whole .md page."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return [
            Source(path, f"cell {i}", "".join(c["source"]))
            for i, c in enumerate(cells)
            if c["cell_type"] == "markdown"
        ]
    return [Source(path, "line 1", path.read_text(encoding="utf-8"))]


def _where(source: Source, line: int) -> str:
    if source.where.startswith("cell"):
        return f"{source.path.name}, {source.where} (line {line})"
    return f"{source.path.name}, line {line}"


def split_blocks(source: Source) -> tuple[list[Block], list[str]]:
    """Cut a source into language blocks and shared paragraphs; report malformed markup.

    Code fences, math blocks and MyST front matter are dropped: they belong to both languages.
    """
    lines = source.text.split("\n")
    problems: list[str] = []
    blocks: list[Block] = []
    lang: str | None = None
    start = 0
    buffer: list[str] = []
    fence: str | None = None
    in_math = False
    i = 0
    if lines and lines[0].strip() == "---" and source.path.suffix == ".md":  # front matter
        end = next((k for k in range(1, len(lines)) if lines[k].strip() == "---"), 0)
        i = end + 1

    def flush(upto: int) -> None:
        nonlocal buffer
        if lang is not None:
            blocks.append(Block(lang, "\n".join(buffer), start + 1))
        else:  # shared text: one block per paragraph
            para: list[str] = []
            first = start
            for k, line in enumerate(buffer + [""]):
                if line.strip():
                    if not para:
                        first = start + k
                    para.append(line)
                elif para:
                    blocks.append(Block(None, "\n".join(para), first + 1))
                    para = []
        buffer = []

    def keep_place(line: str) -> None:
        # a dropped line inside a language block leaves spaces of the same length, so that
        # offsets in the block's text still point at the same characters of the source
        # (the linker edits by offset)
        if lang is not None:
            buffer.append(" " * len(line))

    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if fence:
            if stripped.startswith(fence):
                fence = None
            keep_place(line)
            i += 1
            continue
        if in_math:
            in_math = not stripped.endswith("$$")
            keep_place(line)
            i += 1
            continue
        match = FENCE.match(line)
        if match:
            fence = match.group(1)
            keep_place(line)
            i += 1
            continue
        if stripped.startswith("$$"):
            in_math = not (len(stripped) > 2 and stripped.endswith("$$"))
            keep_place(line)
            i += 1
            continue
        opened = OPEN.match(stripped)
        if opened:
            if lang is not None:
                problems.append(
                    f"{_where(source, i + 1)}: <div lang> opened inside another language block"
                )
            flush(i)
            lang, start = opened.group(1), i + 1
            if i + 1 < len(lines) and lines[i + 1].strip():
                problems.append(
                    f'{_where(source, i + 1)}: blank line needed after <div lang="{lang}"> '
                    "(without it JupyterLab and GitHub show the markdown raw)"
                )
            i += 1
            continue
        if CLOSE.match(stripped) and lang is not None:
            if i > 0 and lines[i - 1].strip():
                problems.append(f"{_where(source, i + 1)}: blank line needed before </div>")
            flush(i)
            lang, start = None, i + 1
            i += 1
            continue
        if lang is not None and HEADING.match(line):
            problems.append(
                f'{_where(source, i + 1)}: heading inside a <div lang="{lang}"> block '
                "(Sphinx would close the section inside the div and break the page): "
                "put it before the div, bilingual "
                "(`python tests/bookcheck.py fix-structure FILE` moves it)"
            )
        if "<div lang" in line:
            problems.append(
                f"{_where(source, i + 1)}: "
                'write <div lang="zh"> / <div lang="en"> alone on its line'
            )
        if not buffer and lang is None:
            start = i
        buffer.append(line)
        i += 1
    if lang is not None:
        problems.append(f'{_where(source, start)}: <div lang="{lang}"> is never closed')
    flush(len(lines))
    return blocks, problems


def _shared_is_fine(text: str) -> str | None:
    """Why a paragraph outside the language blocks is wrong, or None if it belongs to both."""
    first = text.lstrip().split("\n")[0]
    if HEADING.match(first):
        heading = "\n".join(line for line in text.split("\n") if HEADING.match(line))
        rest = "\n".join(line for line in text.split("\n") if not HEADING.match(line))
        if not (CJK.search(heading) and LATIN.search(heading)):
            return "heading is not bilingual (write `## 5.N.k 中文 · English`)"
        return _shared_is_fine(rest) if rest.strip() else None
    if first.lstrip().startswith("|"):  # a table: shared, but a Chinese cell needs its English
        for row in text.split("\n"):
            for cell in row.strip().strip("|").split("|"):
                if CJK.search(cell) and not LATIN.search(cell):
                    return f"table cell {cell.strip()!r} has no English (write `中文 · English`)"
        return None
    items = [line for line in text.split("\n") if line.strip()]
    if all(
        re.match(r"\s*([-*+]|\d+\.)\s", line) for line in items
    ):  # a shared list, e.g. of sections
        for line in items:
            words = re.sub(r"\]\([^)]*\)", "]", line)  # a link's target is not its text
            if CJK.search(words) and not LATIN.search(words):
                return f"list item {line.strip()!r} has no English (write `中文 · English`)"
            if not CJK.search(line) and not re.fullmatch(
                r"[^A-Za-z]*\[[^\]]*\]\([^)]*\)[^A-Za-z]*", line.strip()
            ):
                return 'prose outside a <div lang="zh"> / <div lang="en"> block'
        return None
    # a folded answer's label (`<summary>答案 1 · Answer 1</summary>`) names it in both languages
    for label in re.findall(r"<summary>(.*?)</summary>", text):
        if not (CJK.search(label) and LATIN.search(label)):
            return f"summary {label!r} is not bilingual (write `中文 · English`)"
    text = re.sub(r"<summary>.*?</summary>", "", text)
    # images, anchors, rules, MyST targets: no words of their own
    bare = re.sub(
        r"!\[[^\]]*\]\([^)]*\)|<[^>]+>|\(\w[\w-]*\)=|^[-*_]{3,}\s*$", "", text, flags=re.M
    )
    if not (CJK.search(bare) or LATIN.search(bare)):
        return None
    return 'prose outside a <div lang="zh"> / <div lang="en"> block'


def bilingual_problems(path: Path) -> list[str]:
    """Every prose paragraph has a Chinese block followed by its English block."""
    problems: list[str] = []
    for source in markdown_sources(path):
        blocks, malformed = split_blocks(source)
        problems += malformed
        order = []
        for block in blocks:
            if block.lang is None:
                reason = _shared_is_fine(block.text)
                if reason:
                    snippet = block.text.strip().split("\n")[0][:60]
                    problems.append(f"{_where(source, block.line)}: {reason}: {snippet!r}")
                continue
            order.append(block)
            if block.lang == "zh" and not CJK.search(block.text):
                problems.append(f"{_where(source, block.line)}: the zh block has no Chinese text")
            if block.lang == "en" and (
                not LATIN.search(block.text)
                or len(CJK.findall(block.text)) > len(LATIN.findall(block.text))
            ):
                problems.append(f"{_where(source, block.line)}: the en block is not English text")
        langs = [b.lang for b in order]
        for k in range(0, len(langs), 2):
            pair = langs[k : k + 2]
            if pair != ["zh", "en"]:
                line = order[k].line
                missing = "en" if pair[:1] == ["zh"] else "zh"
                problems.append(
                    f"{_where(source, line)}: a {pair[0]} block without its {missing} partner "
                    "(each paragraph: Chinese block, then English block)"
                )
                break
    return problems


# --- glossary --------------------------------------------------------------------------------


@dataclass
class Term:
    """One glossary entry, as written in chapters/glossary.md."""

    anchor: str
    zh: str
    en: str
    ipa: str

    def names(self, lang: str) -> list[str]:
        """What counts as a use of the term in a block of that language."""
        english = re.sub(r"\s*\(([^)]*)\)", "", self.en).strip()
        abbreviation = re.findall(r"\(([^)]*)\)", self.en)
        proper = [n for n in [english, *abbreviation] if _is_proper(n)]
        if lang == "zh":
            return ([self.zh] if CJK.search(self.zh) else []) + proper
        return [english, *abbreviation]


def _is_proper(name: str) -> bool:
    """Names written the same in both languages (ONNX, INT8, torch.export)."""
    return bool(re.search(r"[A-Z0-9.]", name))


def glossary_terms(glossary: Path) -> list[Term]:
    """Entries: an ``<a id>`` line, then ``### 中文 · English /IPA/``."""
    lines = glossary.read_text(encoding="utf-8").split("\n")
    terms = []
    for i, line in enumerate(lines):
        anchor = TERM_ANCHOR.match(line)
        if not anchor:
            continue
        heading = next((l for l in lines[i + 1 : i + 4] if l.strip()), "")
        match = TERM_HEADING.match(heading)
        if match:
            terms.append(
                Term(anchor.group("id"), match.group("zh"), match.group("en"), match.group("ipa"))
            )
        else:
            terms.append(Term(anchor.group("id"), "", "", ""))
    return terms


def glossary_problems(glossary: Path) -> list[str]:
    """Each entry: a unique anchor, both names, IPA, and a definition in each language."""
    problems = []
    terms = glossary_terms(glossary)
    seen: set[str] = set()
    for term in terms:
        if term.anchor in seen:
            problems.append(f"glossary: anchor #{term.anchor} is used twice")
        seen.add(term.anchor)
        if not term.zh:
            problems.append(
                f"glossary: #{term.anchor} must be followed by `### 中文 · English /IPA/`"
            )
    text = glossary.read_text(encoding="utf-8")
    for term, nxt in zip(terms, terms[1:] + [None]):
        start = text.index(f'<a id="{term.anchor}">')
        end = text.index(f'<a id="{nxt.anchor}">') if nxt else len(text)
        entry = text[start:end]
        if not (
            re.search(r'<div lang="zh">\s*\n\s*\S', entry)
            and re.search(r'<div lang="en">\s*\n\s*\S', entry)
        ):
            problems.append(
                f"glossary: #{term.anchor} needs a one-line definition in both languages"
            )
    return problems


def glossary_links(source: Source) -> list[tuple[str, str | None, str]]:
    """(path, anchor, text) of every glossary link in a source."""
    return [
        (m.group("path"), m.group("anchor"), m.group("text"))
        for m in GLOSSARY_LINK.finditer(source.text)
    ]


def link_problems(path: Path, glossary: Path, folder: Path | None = None) -> list[str]:
    """Every link to the glossary points at the real file and at an existing anchor.

    ``folder`` is where the file sits in the book (default: where it is), for test fixtures.
    """
    anchors = {t.anchor for t in glossary_terms(glossary)}
    problems = []
    for source in markdown_sources(path):
        for target, anchor, text in glossary_links(source):
            where = f"{path.name}, {source.where}" if path.suffix == ".ipynb" else path.name
            if ((folder or path.parent) / target).resolve() != glossary.resolve():
                problems.append(
                    f"{where}: [{text}]({target}) does not lead to chapters/glossary.md"
                )
            elif anchor is not None and anchor not in anchors:
                problems.append(f"{where}: [{text}](…#{anchor}): no such glossary entry")
    return problems


def mislinks(source: Source) -> list[re.Match]:
    """Glossary links whose words are part of a longer word that means something else (运行时间)."""
    bad = []
    for m in GLOSSARY_LINK.finditer(source.text):
        a, b = m.start("text"), m.end("text")
        for x, y in _not_uses(m.group("anchor") or "", source.text):
            if x < b and a < y:
                bad.append(m)
                break
    return bad


def mislink_problems(path: Path) -> list[str]:
    problems = []
    for source in markdown_sources(path):
        for m in mislinks(source):
            problems.append(
                f"{path.name}, {source.where}: {m.group(0)!r} links part of a longer word "
                "that means something else (`python tests/bookcheck.py relink FILE` fixes it)"
            )
    return problems


def unlink_mislinks(path: Path) -> int:
    """Replace each mislink by its plain words, in place; return how many."""
    count = 0
    if path.suffix == ".ipynb":
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type != "markdown":
                continue
            bad = mislinks(Source(path, "", cell.source))
            for m in sorted(bad, key=lambda m: -m.start()):
                cell.source = cell.source[: m.start()] + m.group("text") + cell.source[m.end() :]
            count += len(bad)
        if count:
            nbformat.write(nb, path)
    else:
        text = path.read_text(encoding="utf-8")
        bad = mislinks(Source(path, "", text))
        for m in sorted(bad, key=lambda m: -m.start()):
            text = text[: m.start()] + m.group("text") + text[m.end() :]
        count = len(bad)
        if count:
            path.write_text(text, encoding="utf-8")
    return count


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    chars = list(text)
    for a, b in spans:
        chars[a:b] = " " * (b - a)
    return "".join(chars)


def _pattern(name: str, lang: str) -> re.Pattern:
    if CJK.search(name):
        return re.compile(re.escape(name))
    stem = re.escape(name)
    plural = r"(?:s|es)?" if not name.endswith("y") else ""
    if name.endswith("y") and not _is_proper(name):
        stem = re.escape(name[:-1]) + r"(?:y|ies)"
    flags = 0 if _is_proper(name) else re.IGNORECASE
    return re.compile(rf"(?<![\w.-]){stem}{plural}(?![\w-])", flags)


ANY_LINK = re.compile(r"!?\[[^\]]*\]\([^)]*\)")

# Longer words that contain a glossary name but mean something else: never a use of the term, and a
# glossary link inside one is a mislink. Chinese has no spaces between words, so 运行时 (runtime) is
# also found inside 运行时间 (run time); English compounds name other things (shape inference is the
# ONNX checker's, a container runtime is Docker's, Percentile is a calibration method).
NOT_USES: dict[str, list[str]] = {
    "runtime": [r"运行时间", r"容器运行时", r"[Cc]ontainer runtimes?"],
    "inference": [r"[Ss]hape inference", r"[Tt]ype inference"],
    "percentile": [
        r"(?<=[\w,，、] )Percentile",
        r"(?<=[,，、])Percentile",
        r"Percentile(?= calibration| 校准)",
        r"百分位校准",
    ],
    "batch": [r"[Ll]azy batch(?:es)?"],
}


def _not_uses(anchor: str, text: str) -> list[tuple[int, int]]:
    """Spans of ``text`` in compounds, not uses of the term (glossary links read as their words)."""
    plain, index = [], []
    last = 0
    for m in GLOSSARY_LINK.finditer(text):
        plain.append(text[last : m.start()])
        index += range(last, m.start())
        plain.append(m.group("text"))
        index += range(m.start("text"), m.end("text"))
        last = m.end()
    plain.append(text[last:])
    index += range(last, len(text) + 1)
    joined = "".join(plain)
    spans = []
    for pattern in NOT_USES.get(anchor, []):
        for m in re.finditer(pattern, joined):
            spans.append((index[m.start()], index[m.end() - 1] + 1))
    return spans


NOT_PROSE = re.compile(r"`[^`]*`|<[^>]+>|https?://\S+")


@dataclass
class Unlinked:
    """The first use of a term in one language that does not link to the glossary."""

    source: Source
    index: int  # position in markdown_sources(path)
    lang: str
    term: Term
    offset: int  # in source.text
    word: str


def _block_offset(source: Source, block: Block) -> int:
    return sum(len(line) + 1 for line in source.text.split("\n")[: block.line - 1])


def first_unlinked_uses(path: Path, glossary: Path) -> list[Unlinked]:
    """The first use of each glossary term in each language's prose links to its entry.

    A use is the term's name in a block of that language (zh: the Chinese name and names written
    the same in both languages such as ONNX; en: the English name or abbreviation, any case, plural
    allowed). Not uses: inline code, text inside any link, HTML tags, URLs, and longer glossary
    names that contain the name (动态量化 is not a use of 量化).
    """
    terms = glossary_terms(glossary)
    found = []
    sources = markdown_sources(path)
    for lang in ("zh", "en"):
        texts: list[tuple[int, Source, Block]] = []
        for index, source in enumerate(sources):
            blocks, _ = split_blocks(source)
            texts += [(index, source, b) for b in blocks if b.lang == lang]
        for term in terms:
            names = term.names(lang)
            longer = [
                n
                for t in terms
                if t is not term
                for n in t.names(lang)
                if any(m in n and m != n for m in names)
            ]
            for index, source, block in texts:
                text = block.text
                links = [m for m in GLOSSARY_LINK.finditer(text)]
                masked = _mask(
                    text,
                    [m.span() for m in ANY_LINK.finditer(text)]
                    + [m.span() for m in NOT_PROSE.finditer(text)],
                )
                masked = _mask(
                    masked, [m.span() for n in longer for m in _pattern(n, lang).finditer(masked)]
                )
                masked = _mask(masked, _not_uses(term.anchor, text))
                uses = sorted(
                    (m.start(), m.group())
                    for n in names
                    for m in _pattern(n, lang).finditer(masked)
                )
                linked = [m.start() for m in links if m.group("anchor") == term.anchor]
                if not uses and not linked:
                    continue
                if uses and (not linked or uses[0][0] < linked[0]):
                    offset = _block_offset(source, block) + uses[0][0]
                    found.append(Unlinked(source, index, lang, term, offset, uses[0][1]))
                break  # only the first block that mentions the term matters
    return found


def first_use_problems(path: Path, glossary: Path) -> list[str]:
    """Messages for :func:`first_unlinked_uses`."""
    problems = []
    for u in first_unlinked_uses(path, glossary):
        where = f"{path.name}, {u.source.where}" if path.suffix == ".ipynb" else path.name
        context = u.source.text[u.offset : u.offset + 30].split("\n")[0]
        problems.append(
            f"{where}: first {u.lang} use of {u.term.en!r} ({context!r}…) should be "
            f"[{u.word}]({_relative(glossary, path)}#{u.term.anchor})"
        )
    return problems


def _relative(glossary: Path, path: Path) -> str:
    return Path(os.path.relpath(glossary.resolve(), path.resolve().parent)).as_posix()


def link_first_uses(path: Path, glossary: Path) -> int:
    """Turn each first unlinked use into a glossary link, in place; return how many were linked."""
    count = 0
    for _ in range(1000):  # each pass links one use; positions move after every edit
        found = first_unlinked_uses(path, glossary)
        if not found:
            break
        u = found[0]
        text = u.source.text
        start, end, word = u.offset, u.offset + len(u.word), u.word
        if text[start - 2 : start] == "**" and text[end : end + 2] == "**":
            # `**[x](…)**之` would not close the bold (CommonMark flanking rules):
            # link the bold text instead
            start, end, word = start - 2, end + 2, f"**{word}**"
        linked = f"[{word}]({_relative(glossary, path)}#{u.term.anchor})"
        text = text[:start] + linked + text[end:]
        if path.suffix == ".ipynb":
            nb = nbformat.read(path, as_version=4)
            cells = [c for c in nb.cells if c.cell_type == "markdown"]
            cells[u.index].source = text
            nbformat.write(nb, path)
        else:
            path.write_text(text, encoding="utf-8")
        count += 1
    return count


# --- one vocabulary, one accent, no talk of drafts ---------------------------------------------

# Words that drift from the glossary's headwords (and so lose their links): variant -> headword.
VARIANTS: dict[str, str] = {
    r"批大小": "批次大小 (batch size, headword 批次)",
    r"批量(?!化)": "批次 (batch)",
    r"两月牙|双月牙": "双月 (two moons)",
    r"(?<!百)分位数": "百分位数 (percentile)",
    r"脚本(?=（scripting|\(scripting| · scripting)": "脚本化 (scripting)",
    r"(?<![\w-])[Rr]un-time(?![\w-])": "run time (English prose) / runtime (the glossary term)",
    r"保留集": "留出集 (held-out set)",
    r"(?<![超子])小块(?=的|，|。|有|各|只|参数|缩放)": "子块 (sub-block, the k-quant word)",
    r"\b[Ss]mall[- ]blocks?\b": "sub-block (the k-quant word)",
    r"存活检查|就绪检查": "存活探针 / 就绪探针 (liveness / readiness probe)",
}
# British spellings: the book writes American English, as its glossary's IPA does.
BRITISH = re.compile(
    r"\b(?:behaviours?|honour(?:s|ed|ing)?|organis(?:e|ed|es|ing|ation)"
    r"|specialis(?:e|ed|es|ing|ation)|optimis(?:e|ed|es|ing|ation)|neighbours?|colours?|favour\w*"
    r"|centres?|grey|maths|analyse[sd]?|modelled|modelling|labelled|labelling)\b"
)
# British vowels in an IPA transcription: the glossary uses American English throughout.
BRITISH_IPA = re.compile(r"ɒ|əʊ|eə(?!r)|ɪə(?!r)|ʊə(?!r)")
IPA = re.compile(r"/[^/\s`][^/`\n]{0,40}?/")
DRAFT = re.compile(r"\bdrafts?\b|草稿", re.IGNORECASE)


def _prose(path: Path) -> list[tuple[Source, str]]:
    """(source, text) of the prose a reader sees, without code fences, inline code, link targets."""
    out = []
    for source in markdown_sources(path):
        blocks, _ = split_blocks(source)
        text = "\n".join(b.text for b in blocks)
        text = re.sub(r"`[^`]*`", " ", text)
        text = re.sub(r"\]\([^)]*\)", "]", text)
        out.append((source, text))
    return out


def terminology_problems(path: Path) -> list[str]:
    """Chinese terms as the glossary writes them; IPA in American English; no mention of drafts."""
    problems = []
    for source, text in _prose(path):
        where = f"{path.name}, {source.where}" if path.suffix == ".ipynb" else path.name
        for pattern, headword in VARIANTS.items():
            for m in re.finditer(pattern, text):
                problems.append(f"{where}: {m.group(0)!r} — the glossary's word is {headword}")
        for m in IPA.finditer(text):
            if re.search(r"[ˈˌəɪʊʃʒθðŋæɑɔɛʌː]", m.group(0)) and BRITISH_IPA.search(m.group(0)):
                problems.append(
                    f"{where}: IPA {m.group(0)} is British; write the American pronunciation"
                )
        for m in BRITISH.finditer(text):
            problems.append(f"{where}: {m.group(0)!r} is British; write the American spelling")
        for m in DRAFT.finditer(text):
            problems.append(
                f"{where}: {text[max(0, m.start() - 30) : m.end() + 10]!r} "
                "mentions a draft the reader never saw"
            )
    return problems


# --- numbers in prose agree with the outputs ---------------------------------------------------

NUMBER = re.compile(
    r"(?<![\w.\-/])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?:\s?(KiB|MiB|KB|MB|ms|µs|s|%|×|x|倍|秒|毫秒|微秒|req/s))?(?!\w|\.\d)"
)


def _numbers_in_outputs(cells: list[dict]) -> list[float]:
    values = []
    for cell in cells:
        for out in cell.get("outputs", []):
            texts = [out.get("text", "")] + [
                out.get("data", {}).get(m, "") for m in ("text/plain", "text/html", "text/markdown")
            ]
            for t in texts:
                t = "".join(t) if isinstance(t, list) else t
                for m in re.finditer(r"-?\d[\d,]*\.?\d*(?:e[-+]?\d+)?", t):
                    try:
                        values.append(float(m.group(0).replace(",", "").rstrip(".")))
                    except ValueError:
                        pass
    return values


def quoted_numbers(text: str) -> list[tuple[str, float, int]]:
    """Numbers quoted as measurements: with decimals or a unit (12.3 ms, 3.9×; not 2338 个参数)."""
    found = []
    for m in NUMBER.finditer(text):
        whole, decimals, unit = m.group(1), m.group(2), m.group(3)
        before = text[max(0, m.start() - 12) : m.start()]
        if re.search(
            r"(?:\d\.|\b(?:PyTorch|Python|torch|onnxruntime|Runtime|opset|ONNX|Sphinx|FastAPI|uvicorn|Pydantic|NumPy|gguf|v|version|节|section|Section|§)\s*)$",
            before,
        ):
            continue  # a version or a section number
        if (
            re.match(r"\d+\.\d+[a-z]?(?:\.\d+)?$", m.group(0))
            and not unit
            and re.search(r"(节|section|Section|见|see)\s*$", before)
        ):
            continue
        if (
            re.match(r"\s*[×x]?\s*\d", text[m.end() : m.end() + 4])
            and unit in ("×", "x", None)
            or re.search(r"\d\s*[×x]\s*$", before)
        ):
            continue  # a shape such as 2 × 3
        if not unit and re.fullmatch(r"5\.\d", m.group(0)):
            continue  # a section of this chapter
        if decimals is None and unit not in (
            "KiB",
            "MiB",
            "KB",
            "MB",
            "%",
            "×",
            "x",
            "倍",
            "req/s",
            "ms",
            "µs",
            "毫秒",
            "微秒",
        ):
            continue  # counts, and durations quoted as rough run times ("about 15 s")
        if re.search(r"(?:arXiv:?\s*|abs/)$", before) or (
            decimals and len(whole) == 4 and len(decimals) == 5
        ):
            continue  # a paper's arXiv number
        value = float(whole.replace(",", "") + ("." + decimals if decimals else ""))
        found.append((m.group(0), value, len(decimals or "")))
    return found


# A sourced figure: a paper, a pull request, or a README/benchmark the sentence names as its source.
CITATION = re.compile(
    r"arXiv:\d{4}\.\d{4,5}|PR #\d+|(?:measured by|cited from|source:|来源：|出自|摘自)"
    r"|(?:README|make bench-serve)\S*\s*(?:的|'s)?\s*(?:table|表|benchmark|基准)"
)


def number_problems(path: Path) -> list[str]:
    """Each measured-looking number in a notebook's prose is in its outputs, rounded as quoted,
    unless its line cites a source; each comparison stands next to a printed verdict."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    outputs = _numbers_in_outputs(cells)
    problems = comparison_problems(path) + word_number_problems(path)
    for source, text in _prose(path):
        text = "\n".join(line for line in text.split("\n") if not HEADING.match(line))
        # a cited result (a paper's own numbers) is sourced, not measured here
        text = "\n".join(line for line in text.split("\n") if not CITATION.search(line))
        text = re.sub(
            r"\d+(?:\.\d+)+[a-z]?\s*(?:节|section)|(?:section|Section|§)\s*\d+(?:\.\d+)*[a-z]?",
            " ",
            text,
        )
        text = re.sub(r"\b\d+\.\d+\.\d+\b", " ", text)  # version numbers
        for shown, value, digits in quoted_numbers(text):
            candidates = [value, value / 100] if shown.endswith("%") else [value]
            ok = any(
                abs(round(o, digits) - c) < 1e-9 or abs(round(o * f, digits) - c) < 1e-9
                for o in outputs
                for c in candidates
                for f in (1, 1 / 1024, 1024, 1e3, 1e-3)
            )
            if not ok:
                problems.append(
                    f"{path.name}, {source.where}: "
                    f"{shown!r} in the prose matches no number in the outputs"
                )
    return problems


# Comparisons a reader takes as measured ("keeps falling", "about the same", "far below", "an order
# of magnitude"): each must stand next to a cell that prints a computed verdict.
COMPARISON = re.compile(
    r"keeps? (?:falling|rising|growing|dropping|improving)|about the same|roughly the same"
    r"|far (?:below|above|smaller|larger|better|worse)|an order of magnitude"
    r"|barely (?:moves|shrinks)|nearly enough|持续(?:下降|上升)|继续(?:下降|上升)|差不多"
    r"|远低于|远高于|一个数量级|几乎不再变化|(?:better|worse) than|[略更远](?:好|差)于"
    r"|several times|(?:much|far) (?:faster|slower)|no (?:faster|slower)|好几倍|快得多|慢得多"
    r"|并不更[快慢]|远不及|falls? well short",
    re.IGNORECASE,
)
# What a printed verdict looks like: a named winner or none, a trend, a yes/no test, a ratio.
VERDICT = re.compile(
    r"in every run|no winner|falls|rises|分不出|每一步|总体|\d\.\d+[x×]"
    r"|(?:faster|slower|smaller|larger|lower|higher) than"
)


def _verdict_near(cells: list[dict], i: int) -> bool:
    """A code cell among the three before cell ``i`` or the one after prints a verdict."""
    code = [j for j in range(len(cells)) if cells[j]["cell_type"] == "code"]
    near = [j for j in code if j < i][-3:] + [j for j in code if j > i][:1]
    for j in near:
        for out in cells[j].get("outputs", []):
            text = out.get("text", "") or out.get("data", {}).get("text/plain", "")
            if VERDICT.search("".join(text) if isinstance(text, list) else text):
                return True
    return False


def comparison_problems(path: Path) -> list[str]:
    """Each comparison in a notebook's prose is printed as a computed verdict by a cell next to it,
    or its line cites a source."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    problems = []
    for source, text in _prose(path):
        index = int(source.where.split()[-1])
        for line in text.split("\n"):
            if CITATION.search(line):
                continue
            for m in COMPARISON.finditer(line):
                if not _verdict_near(cells, index):
                    problems.append(
                        f"{path.name}, {source.where}: the comparison {m.group(0)!r} has no "
                        "computed verdict printed next to it (print one, or cite the source)"
                    )
    return problems


# --- what JupyterLab and the book show of a section ---------------------------------------------


def solution_visibility_problems(path: Path) -> list[str]:
    """Solutions (source and outputs) and answers stay closed until asked, in JupyterLab and in
    the book (`python -m mldeploy.book.notebooks hide-answers FILE` closes them)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    problems = [f"{path.name}, {p}" for p in notebooks.visible_answers(nb)]
    problems += [
        f"{path.name}, cell {i}: tagged {SOLUTION_TAG!r} but not folded in JupyterLab"
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code"
        and SOLUTION_TAG in c.get("metadata", {}).get("tags", [])
        and not c.get("metadata", {}).get("jupyter", {}).get("source_hidden")
    ]
    if problems:
        problems.append("(`python -m mldeploy.book.notebooks hide-answers FILE` closes them)")
    return problems


def figure_problems(path: Path) -> list[str]:
    """Every plot has alt text and a numbered caption in both languages (mystnb.image/figure)."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    problems = []
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code" or not any(
            "image/png" in o.get("data", {}) for o in cell.get("outputs", [])
        ):
            continue
        mystnb = cell.get("metadata", {}).get("mystnb", {})
        alt = mystnb.get("image", {}).get("alt", "")
        caption = mystnb.get("figure", {}).get("caption", "")
        name = mystnb.get("figure", {}).get("name", "")
        for what, text in (("image.alt", alt), ("figure.caption", caption)):
            if not re.search(r"[\u4e00-\u9fff].* · [^\u4e00-\u9fff]*[A-Za-z]", text):
                problems.append(
                    f"{path.name}, cell {i}: "
                    f"a figure needs metadata mystnb.{what} as `中文 · English`"
                )
        if not name:
            problems.append(
                f"{path.name}, cell {i}: "
                "a figure needs metadata mystnb.figure.name (numbers and links it)"
            )
    return problems


# What a figure may print in its axis labels, titles and legends: symbols and units, named in the
# caption in both languages (the guide: "axis labels in both languages or neutral symbols").
FIGURE_WORDS = {"B", "KiB", "MiB", "MB", "ms", "s", "req", "token", "bit", "w", "log", "KV"}
FIGURE_WORDS |= {"cache", "CDF", "PPL", "INT8", "GPTQ", "block_q4_K", "FP32", "Q4_K"}
FIGURE_WORDS |= {"MLDEPLOY_BATCHING"}  # a setting, as the reader types it
_LABEL = re.compile(
    r"""(?:set_[xy]label|set_title|\b[xy]label\s*=|\btitle\s*=|\blabel\s*=)\(?\s*f?(["'])(.*?)\1"""
)


def figure_text_problems(name: str, source: str) -> list[str]:
    """Literal axis labels, titles and legend labels in ``source`` that hold a word other than a
    symbol or unit (``FIGURE_WORDS``; one-letter names are symbols); f-string fields are skipped."""
    problems = []
    for match in _LABEL.finditer(source):
        text = re.sub(r"\{[^}]*\}", "", match.group(2))
        words = [w for w in re.findall(r"[A-Za-z][A-Za-z0-9_]+", text) if w not in FIGURE_WORDS]
        if words:
            problems.append(f"{name}: figure text {match.group(2)!r} has words {words}")
    return problems


def lift_headings(text: str) -> str:
    """Move every heading found inside a language block to just before that block (idempotent)."""
    out: list[str] = []
    opened: int | None = None
    fence: str | None = None
    lifted = False
    for line in text.split("\n"):
        stripped = line.strip()
        if fence:
            fence = None if stripped.startswith(fence) else fence
            out.append(line)
            continue
        match = FENCE.match(line)
        if match:
            fence = match.group(1)
        elif OPEN.match(stripped):
            opened = len(out)
        elif CLOSE.match(stripped) and opened is not None:
            opened = None
        elif opened is not None and HEADING.match(line):
            out[opened:opened] = [line, ""]
            opened += 2
            lifted = True
            continue
        if lifted and not stripped and out and not out[-1].strip():
            continue  # the blank line that followed the lifted heading
        lifted = False
        out.append(line)
    return "\n".join(out)


def fix_structure(path: Path) -> list[str]:
    """Idempotent repairs any section can take after a merge: headings out of language blocks,
    solutions folded in JupyterLab, mislinked glossary words unlinked and first uses relinked."""
    changes = []
    nb = nbformat.read(path, as_version=4)
    dirty = False
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            lifted = lift_headings(cell.source)
            if lifted != cell.source:
                cell.source, dirty = lifted, True
                changes.append(f"cell {i}: heading moved out of a language block")
        elif SOLUTION_TAG in cell.metadata.get("tags", []) and not cell.metadata.get(
            "jupyter", {}
        ).get("source_hidden"):
            cell.metadata.setdefault("jupyter", {})["source_hidden"] = True
            dirty = True
            changes.append(f"cell {i}: solution folded in JupyterLab")
    hidden = notebooks.hide_answers(nb)
    changes += hidden
    dirty = dirty or bool(hidden)
    if dirty:
        nbformat.write(nb, path)
    glossary = Path(__file__).resolve().parents[1] / "chapters" / "glossary.md"
    unlinked = unlink_mislinks(path)
    if unlinked:
        changes.append(f"{unlinked} mislinked glossary words unlinked")
    linked = link_first_uses(path, glossary)
    if linked:
        changes.append(f"{linked} first uses linked")
    return changes


# --- code cells ----------------------------------------------------------------------------------

MAX_CODE_LINES = 15  # a cell a reader takes in at a glance; longer ones are split or shortened
CUT_SOURCE = re.compile(r"inspect\.getsource\(")


def code_cell_problems(path: Path) -> list[str]:
    """Code cells of at most ``MAX_CODE_LINES`` lines (as ruff formats them), and library source
    shown whole by ``mldeploy.book.source.show``, never printed or cut from ``inspect.getsource``
    text (``show`` also refuses private names)."""
    problems = []
    for i, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        lines = len(source.rstrip().splitlines())
        if lines > MAX_CODE_LINES:
            problems.append(
                f"{path.name}, cell {i}: {lines} lines of code (at most {MAX_CODE_LINES}); split "
                "the cell at a step the prose can name, or move the detail into the library"
            )
        if CUT_SOURCE.search(source):
            problems.append(
                f"{path.name}, cell {i}: library source through inspect.getsource; "
                "show the whole function, method or class with show(...)"
            )
    return problems


# --- exercises and stamps --------------------------------------------------------------------


def exercise_problems(path: Path) -> list[str]:
    """An exercises section (`## 5.N.k 练习 · Exercises`) followed by runnable solution cells."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    start = next(
        (
            i
            for i, c in enumerate(cells)
            if c["cell_type"] == "markdown"
            and any(EXERCISES.match(line) for line in "".join(c["source"]).split("\n"))
        ),
        None,
    )
    if start is None:
        return [f"{path.name}: no exercises section (a heading `## 5.N.k 练习 · Exercises`)"]
    solutions = [
        (i, c)
        for i, c in enumerate(cells[start:], start)
        if c["cell_type"] == "code" and SOLUTION_TAG in c.get("metadata", {}).get("tags", [])
    ]
    if not solutions:
        return [
            f"{path.name}: exercises (cell {start}) "
            f"have no solution code cell tagged {SOLUTION_TAG!r}"
        ]
    problems = []
    for i, cell in solutions:
        source = "".join(cell["source"])
        if "NBVAL_SKIP" in source or "raises-exception" in cell.get("metadata", {}).get("tags", []):
            problems.append(
                f"{path.name}, cell {i}: a solution must run under nbval, not be skipped"
            )
        if not source.strip():
            problems.append(f"{path.name}, cell {i}: empty solution cell")
    return problems


def stamp_problems(path: Path, pins: dict[str, str]) -> list[str]:
    """`make refresh` wrote a verified-with stamp matching the pinned versions."""
    verified = (
        json.loads(path.read_text(encoding="utf-8"))["metadata"].get("mldeploy", {}).get("verified")
    )
    if not verified:
        return [f"{path.name}: no verified-with stamp in its metadata: run `make refresh` on it"]
    problems = []
    for key in ("python", "torch", "onnxruntime", "date"):
        if not verified.get(key):
            problems.append(f"{path.name}: stamp lacks {key!r}")
    for package, pinned in pins.items():
        produced = str(verified.get(package, "")).split("+")[0]
        if produced and produced != pinned:
            problems.append(
                f"{path.name}: outputs were produced with {package} {produced}, "
                f"the pin is {pinned}: run `make refresh`"
            )
    if verified.get("date") and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", verified["date"]):
        problems.append(f"{path.name}: stamp date {verified['date']!r} is not YYYY-MM-DD")
    return problems


def pinned_versions(
    requirements: Path, packages: tuple[str, ...] = ("torch", "onnxruntime")
) -> dict[str, str]:
    """`name==version` pins of the given packages."""
    pins = dict(
        re.findall(
            r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", requirements.read_text(encoding="utf-8"), re.M
        )
    )
    return {p: pins[p] for p in packages if p in pins}


def main(argv: list[str]) -> int:
    """Repair commands, each idempotent (safe to re-run after a merge):

    python tests/bookcheck.py link-first-uses FILE...
        link each glossary term's first use
    python tests/bookcheck.py relink FILE...
        unlink mislinks (运行时间), then link first uses
    python tests/bookcheck.py fix-structure FILE...
        headings out of language blocks, solutions folded in JupyterLab, then relink
    """
    commands = {"link-first-uses", "relink", "fix-structure"}
    if len(argv) < 2 or argv[0] not in commands:
        print(main.__doc__, file=sys.stderr)
        return 2
    glossary = Path(__file__).resolve().parents[1] / "chapters" / "glossary.md"
    for name in argv[1:]:
        path = Path(name)
        if argv[0] == "link-first-uses":
            print(f"{name}: linked {link_first_uses(path, glossary)} first uses")
        elif argv[0] == "relink":
            unlinked = unlink_mislinks(path)
            linked = link_first_uses(path, glossary)
            print(f"{name}: unlinked {unlinked} mislinks, linked {linked} first uses")
        else:
            print(f"{name}: " + ("; ".join(fix_structure(path)) or "nothing to change"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# --- numbers written as words -------------------------------------------------------------------

EN_WORDS = {
    "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "twenty": 20,
}  # fmt: skip
ZH_DIGITS = {
    "一": 1,
    "二": 2,
    "两": 2,
    "三": 3,
    "四": 4,
    "五": 5,
    "六": 6,
    "七": 7,
    "八": 8,
    "九": 9,
}
# A number word that carries a unit or a ratio is a measurement: write it in digits, which the
# check above compares with the outputs ("five times", "a dozen KiB", "五倍", "约大一成").
MEASURE_IN_WORDS = re.compile(
    r"\b(?:one|two|three|four|five|six|seven|eight|nine|ten|twenty|a dozen|a hundred|a thousand"
    r"|half)(?:\s+and\s+a\s+half)?\s+(?:times|percent|KiB|MiB|GiB|KB|MB|GB|bytes|bits"
    r"|milliseconds?|seconds?|minutes?|hours?|GPU hours)\b"
    r"|\bparts? in a (?:hundred|thousand|million)\b"
    r"|\babout (?:a|one) (?:tenth|quarter|third|fifth|seventh|millisecond|second|minute)\b"
    r"|\ba (?:tenth|quarter|third) (?:more|less|smaller|larger)\b"
    r"|(?<!翻)[一二两三四五六七八九十百千]+(?:倍|成(?![为本功立员])|个百分点|毫秒|秒钟|分钟)"
    r"|[一二两三四五六七八九十]位半|[十百千]几\s*(?:KiB|MiB|GiB|KB|MB|GB|倍|毫秒|秒)|好几倍"
    r"|[二三四五六七八九十百千万]+分之[一二三四五六七八九]",
    re.IGNORECASE,
)
EN_COUNT = re.compile(r"\b(" + "|".join(EN_WORDS) + r")\s+[a-zA-Z][\w-]*", re.IGNORECASE)
ZH_COUNT = re.compile(
    r"(?<![一二两三四五六七八九十百千第])([三四五六七八九]|十[一二三四五六七八九]?)\s*[个种条项份行步层块组类]"
)


def _zh_number(word: str) -> int:
    if word.startswith("十"):
        return 10 + (ZH_DIGITS[word[1]] if len(word) > 1 else 0)
    return ZH_DIGITS[word]


def _integers(cells: list[dict]) -> set[int]:
    """Every integer the notebook's code or outputs write in digits."""
    found: set[int] = set()
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        texts = ["".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]]
        for out in cell.get("outputs", []):
            for t in [out.get("text", "")] + [out.get("data", {}).get("text/plain", "")]:
                texts.append("".join(t) if isinstance(t, list) else t)
        for t in texts:
            found.update(int(m) for m in re.findall(r"(?<![\d.])\d{1,3}(?![\d.]\d)", t))
    return found


def word_number_problems(path: Path) -> list[str]:
    """A measurement is written in digits (so the outputs can check it); a count written as a
    word (three to twenty) names a number the notebook's code or outputs also write."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    integers = _integers(cells)
    problems = []
    for source, text in _prose(path):
        text = "\n".join(line for line in text.split("\n") if not CITATION.search(line))
        for m in MEASURE_IN_WORDS.finditer(text):
            problems.append(
                f"{path.name}, {source.where}: {m.group(0)!r} is a measurement in words; "
                "write the digits the outputs print"
            )
        counts = [(m.group(0), EN_WORDS[m.group(1).lower()]) for m in EN_COUNT.finditer(text)]
        counts += [(m.group(0), _zh_number(m.group(1))) for m in ZH_COUNT.finditer(text)]
        for shown, value in counts:
            if value not in integers:
                problems.append(
                    f"{path.name}, {source.where}: {shown!r} counts {value}, a number neither "
                    "the code nor the outputs write"
                )
    return problems

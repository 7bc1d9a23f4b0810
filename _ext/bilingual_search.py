"""Search in both languages: Chinese by overlapping character pairs, English by stemmed words.

Sphinx's Chinese search cuts the pages into words with jieba, but the browser cuts a query only at
spaces and punctuation, so a query of several words (推理服务, 微批处理) matched no indexed word.
Here the page text and the query are cut the same way: every run of Chinese characters becomes
its overlapping pairs (推理服务 → 推理 理服 服务; a single character stays itself), and a page
matches when it holds every pair of the query, as in Lucene's CJK analyzer. English words are
stemmed (Porter), as Sphinx's English search does.
"""

from __future__ import annotations

import re

from sphinx.application import Sphinx
from sphinx.search.zh import SearchChinese

CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
LATIN_WORD = re.compile(r"[a-zA-Z0-9_]+")


def cjk_terms(run: str) -> list[str]:
    """Overlapping pairs of a run of Chinese characters; one character stays itself."""
    if len(run) < 2:
        return [run]
    return [run[i : i + 2] for i in range(len(run) - 1)]


# The same cut in the browser (language_data.js): Chinese runs to pairs, then Sphinx's own split.
JS_SPLITTER = r"""
var splitQuery = function (query) {
  var spaced = query.replace(/[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+/g, function (run) {
    if (run.length < 2) return " " + run + " ";
    var pairs = [];
    for (var i = 0; i + 1 < run.length; i++) pairs.push(run.slice(i, i + 2));
    return " " + pairs.join(" ") + " ";
  });
  return spaced
    .split(/[^\p{Letter}\p{Number}_\p{Emoji_Presentation}]+/gu)
    .filter(function (term) { return term; });
};
"""


class BilingualSearch(SearchChinese):
    """Chinese pairs plus stemmed English words, the same cut for pages and queries."""

    lang = "zh"
    language_name = "Chinese and English"
    js_splitter_code = JS_SPLITTER

    def split(self, input: str) -> list[str]:
        chinese = [term for run in CJK_RUN.findall(input) for term in cjk_terms(run)]
        latin = LATIN_WORD.findall(input)
        self.latin_terms.extend(latin)
        return chinese + latin

    def word_filter(self, stemmed_word: str) -> bool:
        # a single Chinese character is a word; a single Latin letter is not
        return len(stemmed_word) > 1 or bool(CJK_RUN.fullmatch(stemmed_word))

    def stem(self, word: str) -> str:
        return word if CJK_RUN.match(word) else super().stem(word)


def setup(app: Sphinx) -> dict:
    app.add_search_language(BilingualSearch)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

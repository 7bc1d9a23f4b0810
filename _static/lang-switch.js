/* 中文 / English / 双语: show one language's text or both.
 * Prose sits in <div lang="zh"> / <div lang="en"> blocks. Shared text written `中文 · English`
 * (headings, navigation, table cells, list items, figure captions and alt text, toggle labels) is
 * cut here into <span lang="zh"> / <span lang="en"> halves, so that each mode shows one language
 * everywhere; the page title and the theme's own words follow too. Code, outputs and glossary
 * headwords stay whole. The choice is kept in localStorage and can be forced with ?lang=zh|en|both
 * (for sharing one-language links). Loaded from <head>, so the mode is set before the body paints. */
(function () {
  "use strict";
  var KEY = "mldeploy-book-lang";
  var MODES = [
    { mode: "zh", label: "中文", lang: "zh", title: "只显示中文 · Chinese only" },
    { mode: "en", label: "English", lang: "en", title: "只显示英文 · English only" },
    { mode: "both", label: "双语", lang: "zh", title: "中文 + English（双语 · both）" },
  ];
  var root = document.documentElement;
  // The page language set by the book (`language` in _config.yml) is used for the bilingual mode.
  var bookLang = root.getAttribute("lang") || "en";
  var PAGE_LANG = { zh: "zh-CN", en: "en", both: bookLang };

  function valid(mode) {
    return mode === "zh" || mode === "en" || mode === "both";
  }
  function fromUrl() {
    var value = new URLSearchParams(window.location.search).get("lang");
    return valid(value) ? value : null;
  }
  function load() {
    try { return window.localStorage.getItem(KEY); } catch (e) { return null; }  // storage may be blocked
  }
  function save(mode) {
    try { window.localStorage.setItem(KEY, mode); } catch (e) { /* the choice then lasts one page */ }
  }

  // --- `中文 · English` pairs ------------------------------------------------------------------
  var CJK = /[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]/;
  var LATIN = /[A-Za-z]/;
  var SEPARATOR = /\s*·\s*/g;
  var NUMBER = /^(\s*\d+(?:\.\d+)*[a-z]?\s+)(?=\S)/;  // "5.1.2 " belongs to both languages
  var IPA = /\/[^\/]+\/\s*$/;  // glossary headwords (`部署 · deployment /dɪˈplɔɪmənt/`) stay whole
  var SKIP = "pre, code, kbd, script, style, textarea, .cell_output, .output, .lang-switch, [data-lang-keep], .MathJax, mjx-container";

  // Where a string divides: the first separator with Chinese before it and only non-Chinese after.
  function cut(before, text, after) {
    SEPARATOR.lastIndex = 0;
    var m;
    while ((m = SEPARATOR.exec(text))) {
      var left = before + text.slice(0, m.index), right = text.slice(m.index + m[0].length) + after;
      if (CJK.test(left) && !CJK.test(right) && LATIN.test(right)) return { at: m.index, length: m[0].length };
    }
    return null;
  }

  function pick(text, mode) {
    if (mode === "both") return text;
    var c = cut("", text, "");
    if (!c) return text;
    var number = (text.match(NUMBER) || [""])[0];
    var zh = text.slice(0, c.at), en = text.slice(c.at + c.length);
    return mode === "zh" ? zh : (number && zh.indexOf(number) === 0 ? number : "") + en;
  }

  function span(lang, nodes) {
    var el = document.createElement("span");
    el.setAttribute("lang", lang);
    el.className = "lang-part";
    nodes.forEach(function (n) { el.appendChild(n); });
    return el;
  }

  function pairNodes(zhNodes, enNodes) {
    var sep = document.createElement("span");
    sep.className = "lang-sep";
    sep.setAttribute("aria-hidden", "true");
    sep.textContent = " · ";
    return [span("zh", zhNodes), sep, span("en", enNodes)];
  }

  // Split one element whose direct text holds the separator into language halves.
  function splitElement(el) {
    // a figure caption is split even inside a cell output (myst-nb renders figures there)
    if (el.querySelector("[lang]") || (el.closest(SKIP) && !el.closest("figcaption"))) return;
    var kids = Array.prototype.slice.call(el.childNodes);
    var tail = kids.filter(function (k) { return k.nodeType === 1 && k.classList.contains("headerlink"); });
    kids = kids.filter(function (k) { return tail.indexOf(k) < 0; });
    if (/^H[1-6]$/.test(el.tagName) && IPA.test(kids.map(function (k) { return k.textContent; }).join(""))) return;
    for (var i = 0; i < kids.length; i++) {
      if (kids[i].nodeType !== 3) continue;
      var before = kids.slice(0, i).map(function (k) { return k.textContent; }).join("");
      var after = kids.slice(i + 1).map(function (k) { return k.textContent; }).join("");
      var c = cut(before, kids[i].data, after);
      if (!c) continue;
      var text = kids[i].data;
      var zhNodes = kids.slice(0, i).concat([document.createTextNode(text.slice(0, c.at))]);
      var enNodes = [document.createTextNode(text.slice(c.at + c.length))].concat(kids.slice(i + 1));
      var first = zhNodes[0], prefix = null;
      if (first.nodeType === 3) {
        var number = first.data.match(NUMBER);
        if (number) {
          prefix = document.createTextNode(number[1]);
          first.data = first.data.slice(number[1].length);
        }
      }
      el.removeChild(kids[i]);
      var parts = pairNodes(zhNodes, enNodes);
      var anchor = tail[0] || null;
      if (prefix) el.insertBefore(prefix, anchor);
      parts.forEach(function (p) { el.insertBefore(p, anchor); });
      return;
    }
  }

  function splitPairs(scope) {
    var walker = document.createTreeWalker(scope, NodeFilter.SHOW_TEXT, {
      acceptNode: function (n) { return n.data.indexOf("·") >= 0 ? NodeFilter.FILTER_ACCEPT : NodeFilter.FILTER_SKIP; },
    });
    var parents = [];
    while (walker.nextNode()) {
      var parent = walker.currentNode.parentElement;
      if (parent && parents.indexOf(parent) < 0 && !parent.closest("[lang]:not(html)")) parents.push(parent);
    }
    parents.forEach(splitElement);
  }

  // The theme's own words (written in English by Sphinx and its theme) in both languages.
  var CHROME = {
    "Contents": "目录", "Skip to main content": "跳到正文", "Back to top": "回到顶部",
    "previous": "上一页", "next": "下一页", "Search": "搜索", "Search…": "搜索…", "Search...": "搜索…",
    "Ctrl": "Ctrl", "Fig.": "图", "Table": "表",
  };
  function translateChrome() {
    var selectors = "#pst-skip-link a, #pst-back-to-top, .onthispage, .page-toc .tocsection, " +
      ".prev-next-subtitle, .search-button__default-text, .sidebar-secondary-items .onthispage";
    Array.prototype.forEach.call(document.querySelectorAll(selectors), function (el) {
      Array.prototype.slice.call(el.childNodes).forEach(function (n) {
        var text = n.nodeType === 3 ? n.data.trim() : "";
        if (!text || !CHROME[text] || CHROME[text] === text) return;
        var parts = pairNodes([document.createTextNode(CHROME[text])], [document.createTextNode(text)]);
        parts.forEach(function (p) { el.insertBefore(p, n); });
        el.removeChild(n);
      });
    });
    // the search button's visible words name it now (axe: label-content-name-mismatch)
    Array.prototype.forEach.call(document.querySelectorAll(".search-button__button[aria-label]"), function (el) {
      if (el.textContent.trim()) el.removeAttribute("aria-label");  // an icon-only button keeps its name
    });
    // figure and table numbers: "Fig. 3 " -> 图 3 · Fig. 3
    Array.prototype.forEach.call(document.querySelectorAll(".caption-number"), function (el) {
      var m = el.textContent.match(/^(Fig\.|Table)\s*(\S+?)\s*$/);
      if (!m || el.querySelector("[lang]")) return;
      el.textContent = "";
      pairNodes([document.createTextNode(CHROME[m[1]] + " " + m[2])], [document.createTextNode(m[1] + " " + m[2])])
        .forEach(function (p) { el.appendChild(p); });
      el.appendChild(document.createTextNode(" "));
    });
    // the footer's "By <author>"
    Array.prototype.forEach.call(document.querySelectorAll(".footer-item p, .component-author"), function (el) {
      var first = el.firstChild;
      if (first && first.nodeType === 3 && /^\s*By\s/.test(first.data)) {
        first.data = first.data.replace(/^\s*By\s+/, "");
        el.insertBefore(span("en", [document.createTextNode("By ")]), first);
        splitElement(el);
      }
    });
  }

  var originalTitle = document.title;
  function localize(mode) {
    document.title = originalTitle.split(/\s+[—–]\s+/).map(function (t) { return pick(t, mode); }).join(" — ");
    Array.prototype.forEach.call(document.querySelectorAll("img[alt]"), function (img) {
      if (!img.hasAttribute("data-alt-both")) img.setAttribute("data-alt-both", img.getAttribute("alt"));
      img.setAttribute("alt", pick(img.getAttribute("data-alt-both"), mode));
    });
    Array.prototype.forEach.call(document.querySelectorAll("input[type=search]"), function (input) {
      if (!input.hasAttribute("data-placeholder-en")) input.setAttribute("data-placeholder-en", input.placeholder || "Search");
      input.placeholder = mode === "zh" ? "搜索…" : mode === "en" ? input.getAttribute("data-placeholder-en") : "搜索 · " + input.getAttribute("data-placeholder-en");
    });
  }

  function apply(mode) {
    root.setAttribute("data-lang-mode", mode);
    root.setAttribute("lang", PAGE_LANG[mode]);
    localize(mode);
    var buttons = document.querySelectorAll(".lang-switch button");
    for (var i = 0; i < buttons.length; i++) {
      buttons[i].setAttribute("aria-pressed", String(buttons[i].getAttribute("data-mode") === mode));
    }
  }

  function choose(mode) {
    apply(mode);
    save(mode);
    // A shared ?lang= link must not override a later choice on reload: keep the URL in step.
    var url = new URL(window.location.href);
    if (url.searchParams.has("lang")) {
      url.searchParams.set("lang", mode);
      window.history.replaceState(null, "", url.toString());
    }
  }

  function build() {
    splitPairs(document.body);
    translateChrome();
    var group = document.createElement("div");
    group.className = "lang-switch";
    group.setAttribute("role", "group");
    group.setAttribute("aria-label", "语言 · Language");
    MODES.forEach(function (m) {
      var button = document.createElement("button");
      button.type = "button";
      button.className = "btn lang-switch__button";
      button.textContent = m.label;
      button.title = m.title;
      button.setAttribute("data-mode", m.mode);
      button.setAttribute("data-lang-keep", "");  // the switch itself never hides
      button.setAttribute("lang", m.lang);
      button.addEventListener("click", function () { choose(m.mode); });
      group.appendChild(button);
    });
    var header = document.querySelector(".article-header-buttons") || document.querySelector(".bd-header-article");
    if (header) {
      header.insertBefore(group, header.firstChild);
    } else {
      group.classList.add("lang-switch--floating");
      document.body.appendChild(group);
    }
    apply(root.getAttribute("data-lang-mode"));
    // search result snippets: the text of the reader's language only (Sphinx cuts them from the
    // whole fetched page, which begins with the Chinese block)
    if (typeof Search !== "undefined" && Search.htmlToText) {
      var pageText = Search.htmlToText;
      Search.htmlToText = function (html, anchor) {
        var other = { zh: "en", en: "zh" }[root.getAttribute("data-lang-mode")];
        if (!other) return pageText(html, anchor);
        var doc = new DOMParser().parseFromString(html, "text/html");
        splitPairs(doc.body);
        Array.prototype.forEach.call(doc.querySelectorAll('body [lang="' + other + '"]'), function (el) { el.remove(); });
        return pageText(doc.documentElement.outerHTML, anchor);
      };
    }
    // search results arrive after the page loads: their `中文 · English` titles are cut as they come
    var results = document.getElementById("search-results");
    if (results && window.MutationObserver) {
      new MutationObserver(function () { splitPairs(results); }).observe(results, { childList: true, subtree: true });
    }
  }

  var initial = fromUrl();
  if (initial) {
    save(initial);
  } else {
    initial = load();
    if (!valid(initial)) initial = "both";
  }
  apply(initial);
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", build);
  } else {
    build();
  }
  // For the PDF printer (tests/bookpdf.py): cut pairs in content added later, and switch modes.
  window.bookLanguage = {
    refresh: function (scope) { splitPairs(scope); apply(root.getAttribute("data-lang-mode")); },
    apply: apply,
  };
  // Another tab changed the language: follow it.
  window.addEventListener("storage", function (event) {
    if (event.key === KEY && valid(event.newValue)) apply(event.newValue);
  });
})();

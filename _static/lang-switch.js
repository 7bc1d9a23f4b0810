/* 中文 / English / 双语: show one language's prose blocks or both.
 * Prose sits in <div lang="zh"> / <div lang="en"> blocks; headings, code, outputs, tables and
 * figures carry no lang attribute and always stay. The choice is kept in localStorage and can be
 * forced with ?lang=zh|en|both (for sharing one-language links).
 * Loaded from <head>, so the mode is set before the body paints: no flash of the hidden language. */
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

  function apply(mode) {
    root.setAttribute("data-lang-mode", mode);
    root.setAttribute("lang", PAGE_LANG[mode]);
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
  // Another tab changed the language: follow it.
  window.addEventListener("storage", function (event) {
    if (event.key === KEY && valid(event.newValue)) apply(event.newValue);
  });
})();

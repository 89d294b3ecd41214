// MathJax 3 for pymdownx.arithmatex (generic mode): \( \) inline, \[ \] display. Each page is a
// full load (the theme's instant navigation is off), so MathJax typesets it once at start-up.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

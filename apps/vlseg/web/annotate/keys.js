// Keyboard shortcuts (listed for the user in index.html's help overlay, and in apps/vlseg/README.md).

/** Install the shortcuts; `actions` maps action names to functions. Keys typed into a text field stay there, except
 * Enter in the prompt box (segment), Esc and Ctrl+S / Ctrl+Z. */
export function installShortcuts(actions) {
  const help = document.getElementById("help");
  const toggleHelp = (show) => { help.hidden = show === undefined ? !help.hidden : !show; };
  document.getElementById("help-button").addEventListener("click", () => toggleHelp(true));
  document.getElementById("help-close").addEventListener("click", () => toggleHelp(false));
  help.addEventListener("click", (e) => { if (e.target === help) toggleHelp(false); });

  document.addEventListener("keydown", (e) => {
    const typing = e.target.matches("textarea, select, input:not([type=range]):not([type=checkbox])");
    if (e.target.matches("input[type=range]") && e.key.startsWith("Arrow")) return;  // the slider's own keys
    const ctrl = e.ctrlKey || e.metaKey;
    if (e.key === "Escape") { toggleHelp(false); if (typing) e.target.blur(); return; }
    if (ctrl && e.key.toLowerCase() === "s") { e.preventDefault(); actions.submit(); return; }
    if (ctrl && e.key.toLowerCase() === "z" && !typing) { e.preventDefault(); actions.undo(); return; }
    if (typing) {
      if (e.target.id === "prompt" && e.key === "Enter" && !e.shiftKey) { e.preventDefault(); actions.segment(); }
      return;
    }
    if (ctrl || e.altKey) return;
    const map = {
      b: () => actions.tool("brush"), e: () => actions.tool("eraser"), f: () => actions.tool("fill"),
      "[": () => actions.brushSize(-1), "]": () => actions.brushSize(+1),
      z: actions.undo, m: () => actions.toggle("mask"), u: () => actions.toggle("heat"),
      s: actions.submit, n: actions.next, "?": () => toggleHelp(),
      "/": () => document.getElementById("prompt").focus(),
      ArrowUp: () => actions.slice(-1), PageUp: () => actions.slice(-1),
      ArrowDown: () => actions.slice(+1), PageDown: () => actions.slice(+1),
    };
    const fn = map[e.key] || map[e.key.toLowerCase()];
    if (fn) { e.preventDefault(); fn(); }
  });
}

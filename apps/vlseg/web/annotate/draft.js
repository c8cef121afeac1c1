// Unsubmitted work survives a failed request, a stopped server and a page reload: each image's working mask (with its
// prompt) is kept in memory and in localStorage until its label is submitted. Recent prompts live there too.

const PREFIX = "vlseg-annotate:";

/** Run-length code of a label array: "value*count,value*count,...". */
export function rleEncode(a) {
  const runs = [];
  let i = 0;
  while (i < a.length) {
    let j = i + 1;
    while (j < a.length && a[j] === a[i]) j++;
    runs.push(`${a[i]}*${j - i}`);
    i = j;
  }
  return runs.join(",");
}

export function rleDecode(s, n) {
  const out = new Uint8Array(n);
  let o = 0;
  for (const run of s ? s.split(",") : []) {
    const [v, k] = run.split("*").map(Number);
    out.fill(v, o, o + k);
    o += k;
  }
  if (o !== n) throw new Error(`draft holds ${o} pixels, the image ${n}`);
  return out;
}

export class Drafts {
  constructor(server) {
    this.key = (id) => `${PREFIX}draft:${server}:${id}`;
    this.memory = new Map();
  }

  /** Keep `draft` ({mask, shape, prompt}) for image `id`; returns false when localStorage refused it (then it is
   * kept in this page's memory only). */
  save(id, draft) {
    const entry = {...draft, ts: Date.now()};
    this.memory.set(id, entry);
    try {
      localStorage.setItem(this.key(id), JSON.stringify({shape: entry.shape, prompt: entry.prompt, ts: entry.ts,
                                                          rle: rleEncode(entry.mask)}));
      return true;
    } catch (_) {
      return false;
    }
  }

  load(id) {
    if (this.memory.has(id)) return this.memory.get(id);
    try {
      const s = JSON.parse(localStorage.getItem(this.key(id)) || "null");
      if (!s) return null;
      const n = s.shape.reduce((a, b) => a * b, 1);
      return {shape: s.shape, prompt: s.prompt, ts: s.ts, mask: rleDecode(s.rle, n)};
    } catch (_) {
      return null;
    }
  }

  clear(id) {
    this.memory.delete(id);
    try { localStorage.removeItem(this.key(id)); } catch (_) { /* nothing stored */ }
  }

  has(id) {
    if (this.memory.has(id)) return true;
    try { return localStorage.getItem(this.key(id)) !== null; } catch (_) { return false; }
  }
}

export function recentPrompts() {
  try { return JSON.parse(localStorage.getItem(`${PREFIX}recent`) || "[]"); } catch (_) { return []; }
}

export function rememberPrompt(text, limit = 8) {
  const list = [text, ...recentPrompts().filter((p) => p !== text)].slice(0, limit);
  try { localStorage.setItem(`${PREFIX}recent`, JSON.stringify(list)); } catch (_) { /* memory only */ }
  return list;
}

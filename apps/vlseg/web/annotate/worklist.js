// The work list: the datastore's images in active-learning order. The order is the one the app's `uncertainty`
// strategy serves (apps/vlseg/lib/activelearning): unlabelled images by their stored score, highest first.

/** The image-info key of the score the strategies rank by (`--conf scoring_score`, shown in /info under scoring). */
export function scoreKey(info) {
  const score = Object.values(info?.scoring || {}).find((m) => m && m.score)?.score || "top5";
  return `vlseg_uncertainty_${score}`;
}

/** [{id, score, labelled}] from GET /datastore/?output=all: unlabelled scored images by score (highest first), then
 * unlabelled unscored ones, then labelled ones (each by id). */
export function orderImages(objects, key = scoreKey(null)) {
  const rows = Object.entries(objects || {}).map(([id, o]) => {
    const score = o?.image?.info?.[key];
    return {id, score: typeof score === "number" ? score : null, labelled: !!o?.labels?.final};
  });
  const group = (r) => (r.labelled ? 2 : r.score === null ? 1 : 0);
  return rows.sort((a, b) => group(a) - group(b) || (group(a) === 0 ? b.score - a.score : 0) ||
                             (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
}

/** Draw the list into `ol`; clicking an entry calls `open(id)`. */
export function renderWorklist(ol, rows, {key, current, hasDraft, open}) {
  ol.replaceChildren(...rows.map((r, i) => {
    const li = document.createElement("li");
    li.dataset.id = r.id;
    li.dataset.rank = String(i);
    if (r.score !== null) li.dataset.score = String(r.score);
    li.classList.toggle("labelled", r.labelled);
    li.classList.toggle("current", r.id === current);
    li.classList.toggle("draft", !r.labelled && hasDraft(r.id));
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = r.id;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = r.score === null ? (r.labelled ? "labelled" : "not scored") : r.score.toFixed(3);
    score.title = r.score === null ? "" : `${key} = ${r.score}`;
    li.append(id, score);
    li.addEventListener("click", () => open(r.id));
    return li;
  }));
}

// cam-caffe report: reads each part of the run that CAM_PARTS names (one folder,
// or one per --shard): its CAM_RUN (run.js) and the cards of its data-NNNN.js
// chunks; then shows one page of cards at a time, sorted and filtered.
// No network, no library: it runs from file://.
"use strict";
(function () {
  const PAGE = 48;                       // cards per page
  const CONTROLS = ["search", "sort", "class", "pmin", "pmax", "failed"];
  const parts = window.CAM_PARTS || ["_report"];
  let run = null;                        // the parts' headers, merged
  let chunks = [];                       // the part being loaded: its cards by chunk
  let all = [];
  let view = [];
  let page = 0;
  let painted = false;
  const $ = (id) => document.getElementById(id);

  // A DOM element; text only ever goes in as text, never as HTML.
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children) if (child !== null && child !== undefined) node.append(child);
    return node;
  }
  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    return node;
  }
  const fmt = (p) => (p >= 0.001 || p === 0 ? Number(p).toFixed(3) : Number(p).toExponential(1));
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
  const topProb = (card) => (card.top && card.top.length ? card.top[0][2] : null);
  const topLabel = (card) => (card.top && card.top.length ? card.top[0][1] : null);

  window.CAM_CHUNK = function (n, cards) { chunks[n] = cards; };

  // A <script> of the report; ``done(ok)`` when it ran or failed to load.
  function script(src, done) {
    const node = document.createElement("script");
    node.src = src;
    node.onload = node.onerror = (event) => done(event.type !== "error");
    document.body.append(node);
  }

  // The parts one after another (each one's run.js sets CAM_RUN, its chunks call
  // CAM_CHUNK with numbers of their own), then the page.
  function load() {
    const runs = [];
    const missing = [];
    let cards = [];
    const next = (index) => {
      if (index === parts.length) return finish(runs, missing, cards);
      window.CAM_RUN = null;
      script(parts[index] + "/run.js", (ok) => {
        const part = ok ? window.CAM_RUN : null;
        if (!part) {
          missing.push(parts[index] + "/run.js");
          return next(index + 1);
        }
        runs.push(part);
        chunks = [];
        let pending = part.chunks;
        if (!pending) return next(index + 1);
        for (let n = 0; n < part.chunks; n++) {
          const src = parts[index] + "/data-" + String(n).padStart(4, "0") + ".js";
          script(src, (loaded) => {
            if (!loaded) missing.push(src);
            if (--pending === 0) {
              cards = cards.concat(chunks.flat().filter(Boolean));
              next(index + 1);
            }
          });
        }
      });
    };
    next(0);
  }

  function finish(runs, missing, cards) {
    if (!runs.length) {
      $("status").textContent = `No run data: ${parts[0]}/run.js is missing.`;
      return;
    }
    run = merged(runs);
    header();
    ready(missing, cards);
  }

  // One header for the parts: counts added up, the longest wall time, finished
  // when every part is there and finished.
  function merged(runs) {
    const sum = (key) => runs.reduce((total, r) => total + (r[key] || 0), 0);
    const wall = Math.max(...runs.map((r) => r.wall_s || 0));
    return {
      ...runs[0],
      images: sum("images"), done: sum("done"), skipped: sum("skipped"),
      failed: runs.flatMap((r) => r.failed || []),
      wall_s: wall, images_per_s: parts.length === 1 ? runs[0].images_per_s
        : Number(sum("images_per_s").toFixed(2)),
      started: runs.map((r) => r.started).sort()[0],
      finished: runs.length === parts.length && runs.every((r) => r.finished),
      parts: `${runs.length} of ${parts.length}`,
    };
  }

  function header() {
    const seconds = run.wall_s || 0;
    const facts = [
      ["Model", run.model], ["Backend", run.backend],
      ["Methods", (run.methods || []).join(", ")],
      ["Images", `${run.images} — ${run.done} done, ${run.skipped} skipped (earlier run), ` +
                 `${run.failed.length} failed`],
      ["Wall time", `${seconds.toFixed(1)} s, ${run.images_per_s} images/s`],
      ["Started", run.started],
      ...(parts.length > 1 ? [["Shards", `${run.parts} have written their part`]] : []),
      ["Status", run.finished ? "finished" : "incomplete: interrupted, or still running " +
                                              "(reload to see more)"],
    ];
    const dl = $("facts");
    for (const [term, value] of facts) dl.append(el("dt", {text: term}), el("dd", {text: value}));
    if (run.failed.length) {
      const box = $("failures");
      box.hidden = false;
      box.querySelector("summary").textContent =
        `${plural(run.failed.length, "failed image")}, and why`;
      const list = box.querySelector("ul");
      for (const f of run.failed) list.append(el("li", {}, el("code", {text: f.image}),
                                                       ": " + f.error));
    }
  }

  // Names are shown without the folder that all images share (kept in the tooltip).
  let shared = "";
  function commonFolder(names) {
    if (!names.length) return "";
    let prefix = names[0].slice(0, names[0].lastIndexOf("/") + 1);
    for (const name of names) {
      while (prefix && !name.startsWith(prefix)) {
        prefix = prefix.slice(0, prefix.lastIndexOf("/", prefix.length - 2) + 1);
      }
    }
    return prefix;
  }
  const shortName = (card) => card.name.slice(shared.length);

  function ready(missing, cards) {
    all = cards;
    shared = commonFolder(all.map((card) => card.name));
    const labels = [...new Set(all.map(topLabel).filter((l) => l !== null))].sort();
    const select = $("class");
    for (const label of labels) select.append(el("option", {value: label, text: label}));
    const maps = Math.max(1, ...all.map((c) => (c.maps || []).length));
    $("cards").style.setProperty("--maps", maps);
    // "input" as one types; "change" for selects and check boxes set otherwise
    for (const id of CONTROLS) {
      for (const type of ["input", "change"]) {
        $(id).addEventListener(type, changed);
      }
    }
    $("boxes").addEventListener("change", () =>
      document.body.classList.toggle("hide-boxes", !$("boxes").checked));
    $("controls").addEventListener("submit", (event) => event.preventDefault());
    $("viewer-close").addEventListener("click", () => $("viewer").close());
    if (missing.length) console.warn("report data files missing: " + missing.join(", "));
    changed();
  }

  // Redraw when a control's value changed (a "change" after "input" changes nothing,
  // and redrawing then would take the focus away from the card it moved to).
  let state = null;
  function changed() {
    const now = CONTROLS.map(
      (id) => ($(id).type === "checkbox" ? $(id).checked : $(id).value)).join("\n");
    if (now === state) return;
    state = now;
    page = 0;
    apply();
  }

  function apply() {
    const query = $("search").value.trim().toLowerCase();
    const label = $("class").value;
    const low = parseFloat($("pmin").value);
    const high = parseFloat($("pmax").value);
    const ranged = (low > 0) || (high < 1);
    const failedOnly = $("failed").checked;
    view = all.filter((card) => {
      if (query && !shortName(card).toLowerCase().includes(query)) return false;
      if (failedOnly && !card.failed) return false;
      if (label && topLabel(card) !== label) return false;
      const p = topProb(card);
      if (ranged && (p === null || !(p >= (low || 0) && p <= (isNaN(high) ? 1 : high)))) {
        return false;
      }
      return true;
    });
    const [key, order] = $("sort").value.split("-");
    const sign = order === "asc" ? 1 : -1;
    const names = new Intl.Collator(undefined, {numeric: true});
    view.sort((a, b) => {
      if (key === "name") return sign * names.compare(shortName(a), shortName(b));
      const pa = topProb(a), pb = topProb(b);
      if (pa === null || pb === null) return (pa === null) - (pb === null);   // failed last
      return sign * (pa - pb) || names.compare(a.name, b.name);
    });
    render();
  }

  function render() {
    const pages = Math.max(1, Math.ceil(view.length / PAGE));
    page = Math.min(page, pages - 1);
    const first = page * PAGE;
    const shown = view.slice(first, first + PAGE);
    $("cards").replaceChildren(...shown.map(cardNode));
    $("status").textContent = view.length
      ? `Showing ${first + 1}–${first + shown.length} of ${view.length} images` +
        (view.length < all.length ? ` (${all.length} in the run)` : "")
      : `No image matches (${all.length} in the run).`;
    for (const nav of document.querySelectorAll(".pager")) {
      const previous = el("button", {type: "button", text: "← Previous", disabled: page === 0});
      const next = el("button", {type: "button", text: "Next →", disabled: page >= pages - 1});
      previous.addEventListener("click", () => { page -= 1; render(); });
      next.addEventListener("click", () => { page += 1; render(); });
      nav.replaceChildren(previous, el("span", {text: `Page ${page + 1} of ${pages}`}), next);
    }
    if (!painted) {
      painted = true;
      performance.mark("cam-cards");
    }
  }

  function cardNode(card) {
    const title = el("h2", {text: shortName(card), title: card.name});
    if (card.failed) {
      return el("article", {class: "card failed"}, title,
                el("p", {class: "error"}, el("strong", {text: "Failed: "}), card.error),
                el("p", {class: "links"}, el("a", {href: card.src, text: "original"})));
    }
    const figures = el("div", {class: "maps"}, ...(card.maps || []).map((m) => mapNode(card, m)));
    const top = el("ol", {class: "top", "aria-label": "Top classes"},
                   ...(card.top || []).map(([, label, p]) => el("li", {},
                     el("span", {class: "label", text: label}),
                     el("span", {class: "bar", "aria-hidden": "true"},
                        el("span", {style: `width: ${(100 * p).toFixed(1)}%`})),
                     el("span", {class: "p", text: fmt(p)}))));
    return el("article", {class: "card"}, title, figures, top,
              card.note ? el("p", {class: "note", text: card.note}) : null,
              el("p", {class: "links"}, el("a", {href: card.src, text: "original image"})));
  }

  function mapNode(card, m) {
    const caption = `${m.method} · ${m.label} ${fmt(m.prob)}`;
    const alt = `${m.method} map of “${m.label}” (p = ${fmt(m.prob)}) over ${card.name}`;
    const [width, height] = card.size;
    const boxes = svg("svg", {class: "boxes", viewBox: `0 0 ${width} ${height}`,
                              preserveAspectRatio: "xMidYMid meet", "aria-hidden": "true"});
    for (const [x, y, w, h] of m.boxes) {
      boxes.append(svg("rect", {x, y, width: w, height: h, "vector-effect": "non-scaling-stroke"}));
    }
    const button = el("button", {type: "button", class: "thumb",
                                 "aria-label": `Open full size: ${alt}`},
                      m.thumb ? el("img", {src: m.thumb, alt, loading: "lazy"})
                              : el("span", {text: "no thumbnail"}),
                      boxes);
    button.addEventListener("click", () => openViewer(card, m, caption));
    return el("figure", {class: "map"}, button,
              el("figcaption", {text: caption + (m.boxes.length ? ` · ${m.boxes.length} box` +
                                                 (m.boxes.length > 1 ? "es" : "") : "")}));
  }

  function openViewer(card, m, caption) {
    $("viewer-title").textContent = `${card.name} — ${caption}`;
    const views = [["overlay", m.overlay], ["heatmap", m.heatmap], ["original image", card.src]];
    $("viewer-body").replaceChildren(...views.filter(([, src]) => src).map(([what, src]) =>
      el("figure", {}, el("a", {href: src, target: "_blank"},
                          el("img", {src, alt: `${what} of ${card.name}`})),
         el("figcaption", {text: what}))));
    $("viewer").showModal();
  }

  load();
})();

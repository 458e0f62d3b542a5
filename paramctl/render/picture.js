/* paramctl's picture page: a zoomable treemap and a filterable table, from the JSON in
   #data. The layout is paramctl/render/treemap.py's, step for step (keep them in step).
   Names come from untrusted files: they reach the page through textContent only. */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("data").textContent);
  var L = D.layout, LIST = D.kind === "list", W = D.width, LABELS = D.labels, KINDS = D.kinds;
  var MAX_ROWS = 2000;
  var STATES = ["none", "trainable", "frozen", "partial"];
  var STATE_FILL = {none: "#d9d9d9", trainable: "#8fd19e", frozen: "#9ecae1", partial: "#fdc086"};
  var STATE_FRAME = {none: "#f3f3f3", trainable: "#eef8f0", frozen: "#edf5fb", partial: "#fff3e6"};
  var STAT = D.statuses || [];
  var DIFF_FILL = {same: "#e3e3e3", present: "#cfd6da", dtype: "#80cbc4", shape: "#6baed6",
                   added: "#74c476", removed: "#b4a7d6"};
  var $ = function (id) { return document.getElementById(id); };

  // -- the tree ---------------------------------------------------------------------------
  function mk(label, parent, kind) {
    return {label: label, name: "", parent: parent, kind: kind, kids: [], w: 0, numel: 0,
            n: 0, bits: 0, item: -1, on: false, sb: null, rel: -1, fl: 0};
  }
  var root = mk("", null, "module");
  root.on = true;
  var mods = [root];
  for (var i = 0; i < D.mods.length; i += 2) {
    var parent = mods[D.mods[i]], m = mk(LABELS[D.mods[i + 1]], parent, "module");
    m.name = parent === root ? m.label : parent.name + "." + m.label;
    mods.push(m);
  }
  function attach(m) {  // a module joins its parent when its first tensor appears (as in Python)
    var chain = [];
    while (!m.on) { chain.push(m); m = m.parent; }
    for (var k = chain.length - 1; k >= 0; k--) { chain[k].parent.kids.push(chain[k]); chain[k].on = true; }
  }
  var N = D.t.length / W, leaves = new Array(N), TIED = {}, MET = {};
  (D.tied || []).forEach(function (e) { TIED[e[0]] = e[1]; });
  (D.metrics || []).forEach(function (e) {
    MET[e[0]] = e.slice(1).map(function (v) { return typeof v === "string" ? Number(v) : v; });
  });
  for (var t = 0; t < N; t++) {
    var b = t * W, par = mods[D.t[b]];
    if (!par.on) attach(par);
    var leaf = mk(LABELS[D.t[b + 1]], par, "tensor");
    leaf.name = par === root ? leaf.label : par.name + "." + leaf.label;
    leaf.item = t;
    leaf.n = 1;
    if (LIST) {
      var kd = KINDS[D.t[b + 2]], f = D.t[b + 3];
      leaf.bits = f & 3;
      if (f & 4) { leaf.w = kd[3]; leaf.numel = kd[2]; }
    } else {
      var s = D.t[b + 2], ba = bytesOf(D.t[b + 3]), bb = bytesOf(D.t[b + 4]), g = D.t[b + 5];
      leaf.w = Math.max(ba, bb);
      leaf.numel = Math.max(numelOf(D.t[b + 3]), numelOf(D.t[b + 4]));
      leaf.sb = [0, 0, 0, 0, 0, 0, 0];
      leaf.sb[s] = leaf.w;
      if (STAT[s] === "changed") {
        var rel = MET[t] ? MET[t][1] : null;
        leaf.rel = rel === null || isNaN(rel) ? Infinity : rel;
      }
      leaf.fl = (g & 3) && (g >> 2) && (g & 3) !== (g >> 2) ? 1 : 0;
    }
    par.kids.push(leaf);
    leaves[t] = leaf;
  }
  function bytesOf(k) { return k < 0 ? 0 : KINDS[k][3]; }
  function numelOf(k) { return k < 0 ? 0 : KINDS[k][2]; }
  function addTo(target, node) {
    target.w += node.w; target.numel += node.numel; target.n += node.n; target.bits |= node.bits;
    if (!LIST) {
      if (!target.sb) target.sb = [0, 0, 0, 0, 0, 0, 0];
      for (var k = 0; k < 7; k++) target.sb[k] += node.sb[k];
      target.rel = Math.max(target.rel, node.rel);
      target.fl += node.fl;
    }
  }
  leaves.forEach(function (lf) { addTo(lf.parent, lf); });
  for (var j = mods.length - 1; j > 0; j--) if (mods[j].on) addTo(mods[j].parent, mods[j]);
  // Fold single-child modules into their child, as treemap._finish does.
  for (j = mods.length - 1; j >= 0; j--) {
    var node = mods[j];
    for (var c = 0; c < node.kids.length; c++) {
      var kid = node.kids[c];
      if (kid.kind === "module" && kid.kids.length === 1) {
        var only = kid.kids[0];
        only.label = kid.label + "." + only.label;
        only.parent = node;
        node.kids[c] = only;
      }
    }
  }

  // -- the layout (treemap.py) ----------------------------------------------------------
  function worst(s, lo, hi, side) {
    var s2 = s * s, q = side * side;
    return Math.max(q * hi / s2, s2 / (q * lo));
  }
  function squarify(ws, x, y, w, h) {
    var out = ws.map(function () { return [x, y, 0, 0]; });
    var order = [];
    for (var i = 0; i < ws.length; i++) if (ws[i] > 0) order.push(i);
    order.sort(function (a, b) { return ws[b] - ws[a] || a - b; });
    var total = 0;
    order.forEach(function (k) { total += ws[k]; });
    if (!order.length || w <= 0 || h <= 0) return out;
    var scale = w * h / total, areas = order.map(function (k) { return ws[k] * scale; });
    var n = areas.length;
    i = 0;
    while (i < n) {
      var side = Math.min(w, h), s = areas[i], lo = s, hi = s, wr = worst(s, lo, hi, side), j = i + 1;
      while (j < n) {
        var a = areas[j], cand = worst(s + a, Math.min(lo, a), Math.max(hi, a), side);
        if (cand > wr) break;
        s = s + a; lo = Math.min(lo, a); hi = Math.max(hi, a); wr = cand; j++;
      }
      var last = j === n, k;
      if (w >= h) {
        var cw = last ? w : s / h, yy = y;
        for (k = i; k < j; k++) {
          var rh = k === j - 1 ? y + h - yy : areas[k] / cw;
          out[order[k]] = [x, yy, cw, rh];
          yy += rh;
        }
        x += cw; w = Math.max(w - cw, 0);
      } else {
        var rh2 = last ? h : s / w, xx = x;
        for (k = i; k < j; k++) {
          var rw = k === j - 1 ? x + w - xx : areas[k] / rh2;
          out[order[k]] = [xx, y, rw, rh2];
          xx += rw;
        }
        y += rh2; h = Math.max(h - rh2, 0);
      }
      i = j;
    }
    return out;
  }
  function innerRect(r) {
    if (r[2] < 2 * L.header || r[3] < 2 * L.header) return null;
    return {r: [r[0] + L.pad, r[1] + L.header, r[2] - 2 * L.pad, r[3] - L.header - L.pad], header: L.header};
  }
  function merge(parent, rest) {
    var block = mk("(" + rest.length + " smaller)", parent, "more");
    block.name = parent.name;
    block.kids = rest;
    rest.forEach(function (nd) { addTo(block, nd); });
    return block;
  }
  // A binary heap of tiles: the largest area first, then the earliest drawn.
  function before(a, b) { return a.area > b.area || (a.area === b.area && a.seq < b.seq); }
  function push(heap, e) {
    heap.push(e);
    for (var i = heap.length - 1; i > 0;) {
      var p = (i - 1) >> 1;
      if (!before(heap[i], heap[p])) break;
      var tmp = heap[i]; heap[i] = heap[p]; heap[p] = tmp; i = p;
    }
  }
  function pop(heap) {
    var top = heap[0], end = heap.pop();
    if (heap.length) {
      heap[0] = end;
      for (var i = 0; ;) {
        var l = 2 * i + 1, r = l + 1, m = i;
        if (l < heap.length && before(heap[l], heap[m])) m = l;
        if (r < heap.length && before(heap[r], heap[m])) m = r;
        if (m === i) break;
        var tmp = heap[i]; heap[i] = heap[m]; heap[m] = tmp; i = m;
      }
    }
    return top;
  }
  function layout(view, width, height) {
    var floor = Math.max(L.minArea, width * height / L.budget), tiles = [], heap = [];
    function expand(node, r, depth, force) {
      var kids = node.kids.filter(function (k) { return k.w > 0; });
      kids.sort(function (a, b) { return b.w - a.w; });
      if (!kids.length) return false;
      var total = 0;
      kids.forEach(function (k) { total += k.w; });
      var room = L.budget - tiles.length, area = r[2] * r[3], shown = 0;
      while (shown < kids.length && shown < room && kids[shown].w / total * area >= floor) shown++;
      if (shown < kids.length) {
        if (kids.length - shown === 1 && shown + 1 <= room) shown++;
        else shown = Math.max(Math.min(shown, room - 1), 0);
      }
      if (shown === 0 && !force) return false;
      var drawn = kids.slice(0, shown), rest = kids.slice(shown);
      if (rest.length) {
        var groups = 1;
        if (shown === 0 && rest.length > 1) {
          groups = Math.max(1, Math.min(rest.length, Math.floor(area / floor), room));
        }
        var size = Math.ceil(rest.length / groups);
        for (var g = 0; g < rest.length; g += size) drawn.push(merge(node, rest.slice(g, g + size)));
      }
      var rects = squarify(drawn.map(function (d) { return d.w; }), r[0], r[1], r[2], r[3]);
      drawn.forEach(function (child, k) {
        var tile = {node: child, r: rects[k], depth: depth + 1, leaf: true, header: 0};
        tiles.push(tile);
        if (child.kind === "module") {
          push(heap, {area: rects[k][2] * rects[k][3], seq: tiles.length, tile: tile});
        }
      });
      return true;
    }
    expand(view, [0, 0, width, height], 0, true);
    while (heap.length) {
      var tile = pop(heap).tile, spot = innerRect(tile.r);
      if (spot && expand(tile.node, spot.r, tile.depth, false)) {
        tile.leaf = false;
        tile.header = spot.header;
      }
    }
    var aggT = 0, aggB = 0;
    tiles.forEach(function (tl) { if (tl.leaf && tl.node.kind !== "tensor") { aggT += tl.node.n; aggB++; } });
    return {tiles: tiles, aggT: aggT, aggB: aggB};
  }

  // -- words and numbers -------------------------------------------------------------------
  function human(n) {  // render.common.human_bytes, ties rounded to even as Python does
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], v = n;
    for (var k = 0; k < units.length; k++) {
      if (v < 1024 || k === units.length - 1) {
        if (k === 0) return Math.round(v) + " B";
        var c = v * 100, r = Math.round(c);
        if (r - c === 0.5 && r % 2 !== 0) r -= 1;
        return (r / 100).toFixed(2) + " " + units[k];
      }
      v /= 1024;
    }
  }
  function num(n) { return n.toLocaleString("en-US"); }
  function metric(v) {
    if (v === null || v === undefined) return "";
    if (isNaN(v)) return "nan";
    if (!isFinite(v)) return v > 0 ? "inf" : "-inf";
    return Math.abs(v) >= 1e-3 && Math.abs(v) < 1e4 || v === 0 ? String(Number(v.toPrecision(6))) : v.toExponential(3);
  }
  function kindOf(t, side) { return KINDS[D.t[t * W + (LIST ? 2 : 3 + side)]] || null; }
  function grad(code) { return code === 0 ? "-" : code === 2 ? "true" : "false"; }
  function trainWord(t) {
    var f = D.t[t * W + 3];
    return f & 8 ? "buffer" : (f & 3) === 1 ? "yes" : (f & 3) === 2 ? "no" : "-";
  }
  function status(t) { return STAT[D.t[t * W + 2]]; }
  function ramp(rel) {  // rel_l2 on a log scale, 1e-8 .. 1: pale yellow, orange, dark red
    var x = !isFinite(rel) ? 1 : rel <= 0 ? 0 : Math.min(1, Math.max(0, (Math.log10(rel) + 8) / 8));
    var stops = [[255, 255, 178], [253, 141, 60], [189, 0, 38]];
    var k = x < 0.5 ? 0 : 1, u = x < 0.5 ? x * 2 : (x - 0.5) * 2;
    var c = stops[k].map(function (v, q) { return Math.round(v + (stops[k + 1][q] - v) * u); });
    return "rgb(" + c.join(",") + ")";
  }
  function dominant(node) {  // the status holding the most bytes, differences first
    var best = -1, most = 0;
    for (var k = 2; k < 7; k++) if (node.sb[k] > most) { best = k; most = node.sb[k]; }
    return best >= 0 ? STAT[best] : node.sb[1] > 0 ? "present" : "same";
  }
  function fill(node) {
    if (LIST) return STATE_FILL[STATES[node.bits]];
    var d = dominant(node);
    return d === "changed" ? ramp(node.rel) : DIFF_FILL[d];
  }
  function frameFill(node) { return LIST ? STATE_FRAME[STATES[node.bits]] : "#f6f6f6"; }
  function darkText(node) { return !LIST && dominant(node) === "changed" && node.rel >= 1e-2; }
  function items(node) {  // listing indices under a node
    var out = [], todo = [node];
    while (todo.length) {
      var nd = todo.pop();
      if (nd.item >= 0) out.push(nd.item);
      for (var k = 0; k < nd.kids.length; k++) todo.push(nd.kids[k]);
    }
    return out;
  }
  function tipLines(node) {
    var lines = [], t = node.item;
    if (node.kind === "tensor") {
      lines.push(node.name);
      if (LIST) {
        var kd = kindOf(t, 0);
        lines.push(kd[0] + "  " + kd[1]);
        lines.push(human(kd[3]) + " (" + num(kd[3]) + " bytes), " + num(kd[2]) + " params");
        lines.push("trainable: " + trainWord(t));
        if (TIED[t] !== undefined) {
          lines.push("tied with " + TIED[t] + (node.w > 0 ? " (drawn here, counted once)" : " (counted there)"));
        }
      } else {
        var ka = kindOf(t, 0), kb = kindOf(t, 1), g = D.t[t * W + 5], mt = MET[t];
        lines.push("status: " + status(t));
        lines.push("shape: " + (ka ? ka[0] : "-") + " \u2192 " + (kb ? kb[0] : "-"));
        lines.push("dtype: " + (ka ? ka[1] : "-") + " \u2192 " + (kb ? kb[1] : "-"));
        lines.push(human(node.w) + ", " + num(node.numel) + " params");
        if (mt) lines.push("max_abs " + metric(mt[0]) + ", rel_l2 " + metric(mt[1]) + ", cosine " + metric(mt[2]));
        lines.push("requires_grad: " + grad(g & 3) + " \u2192 " + grad(g >> 2));
      }
      return lines;
    }
    lines.push(node.kind === "more" ? node.label + " in " + (node.name || "(all)") : (node.name || "(all)"));
    lines.push(human(node.w) + " (" + num(node.w) + " bytes), " + num(node.numel) + " params, " + num(node.n) + " tensors");
    var under = items(node);
    if (LIST) {
      var mix = {};
      under.forEach(function (k) {
        var f = D.t[k * W + 3], kd2 = KINDS[D.t[k * W + 2]];
        if (f & 4) mix[kd2[1]] = (mix[kd2[1]] || 0) + kd2[3];
      });
      lines.push(Object.keys(mix).sort().map(function (d) { return d + " " + human(mix[d]); }).join(", "));
      lines.push("state: " + STATES[node.bits]);
    } else {
      var counts = {};
      under.forEach(function (k) { var s = status(k); counts[s] = (counts[s] || 0) + 1; });
      lines.push(STAT.filter(function (s) { return counts[s]; }).map(function (s) { return num(counts[s]) + " " + s; }).join(", "));
      if (node.fl) lines.push("requires_grad changed on " + num(node.fl));
    }
    lines.push("click to zoom in");
    return lines;
  }

  // -- drawing -----------------------------------------------------------------------------
  var map = $("map"), tip = $("tip"), note = $("note"), view = root, shown = [];
  function mapHeight(width) { return Math.round(Math.max(320, Math.min(760, width * 0.56))); }
  function draw() {
    var width = map.clientWidth, height = mapHeight(width);
    map.style.height = height + "px";
    var res = layout(view, width, height);
    shown = res.tiles;
    var frag = document.createDocumentFragment();
    shown.forEach(function (tile, k) {
      var nd = tile.node, r = tile.r, el = document.createElement("div");
      var x0 = Math.round(r[0]), y0 = Math.round(r[1]);
      var x1 = Math.round(r[0] + r[2]), y1 = Math.round(r[1] + r[3]);
      el.className = "tile " + (tile.leaf ? nd.kind : "frame") + (tile.leaf && nd.fl ? " flag" : "");
      el.style.left = x0 + "px"; el.style.top = y0 + "px";
      el.style.width = (x1 - x0) + "px"; el.style.height = (y1 - y0) + "px";
      if (tile.leaf) {
        el.style.backgroundColor = fill(nd);
        if (darkText(nd)) el.style.color = "#fff";
      } else {
        el.style.backgroundColor = frameFill(nd);
        el.style.borderColor = fill(nd);
      }
      el.dataset.i = k;
      el.dataset.depth = tile.depth;
      el.dataset.kind = nd.kind;
      el.dataset.name = nd.name;
      var roomy = tile.leaf ? (x1 - x0 >= 24 && y1 - y0 >= 14) : tile.header > 0;
      if (roomy) {
        var lab = document.createElement("span");
        lab.className = "lab";
        lab.textContent = nd.label;
        el.appendChild(lab);
        // A size cut short reads as another number: show it whole or not at all.
        var size = human(nd.w), chars = size.length + (tile.leaf ? 0 : nd.label.length + 1);
        if ((!tile.leaf || y1 - y0 >= 28) && x1 - x0 >= chars * 6.5 + 8) {
          var sz = document.createElement("span");
          sz.className = "sz";
          sz.textContent = size;
          el.appendChild(sz);
        }
      }
      frag.appendChild(el);
    });
    map.textContent = "";
    map.appendChild(frag);
    var msg = [];
    if (res.aggT) {
      var side = Math.round(Math.sqrt(L.minArea));
      msg.push(num(res.aggT) + " tensors in " + num(res.aggB) + " hatched blocks are shown " +
               "aggregated: modules too small to show their parts, and \u201c(N smaller)\u201d " +
               "groups of parts under " + side + "\u00d7" + side + " px or 1/" + num(L.budget) +
               " of the picture. Click a block to zoom in.");
    }
    var none = items(view).filter(function (k) { return leaves[k].w <= 0; });
    if (none.length) {
      var ex = none.slice(0, 3).map(function (k) { return leaves[k].name; }).join(", ");
      msg.push(num(none.length) + (none.length > 1 ? " tensors take" : " tensor takes") + " no area: " + ex +
               (none.length > 3 ? ", \u2026" : "") + " (tied names, drawn once at the first name, or empty).");
    }
    note.textContent = msg.join(" ");
    crumbs();
  }
  function crumbs() {
    var nav = $("crumbs"), chain = [];
    for (var nd = view; nd; nd = nd.parent) chain.unshift(nd);
    nav.textContent = "";
    chain.forEach(function (nd, k) {
      if (k) nav.appendChild(document.createTextNode(" \u203a "));
      var el = document.createElement(k === chain.length - 1 ? "span" : "button");
      el.textContent = nd === root ? "all" : nd.label;
      if (k === chain.length - 1) el.className = "here";
      else el.addEventListener("click", function () { zoom(nd); });
      nav.appendChild(el);
    });
    var hint = document.createElement("span");
    hint.className = "hint";
    hint.textContent = view === root ? "  (click a module to zoom in)" : "  (Esc or a name on the left to zoom out)";
    nav.appendChild(hint);
  }
  function zoom(nd) {
    view = nd;
    hideTip();
    draw();
    scope = view === root ? null : items(view);
    refresh();
  }
  map.addEventListener("click", function (e) {
    var el = e.target.closest(".tile");
    if (!el) return;
    var nd = shown[+el.dataset.i].node;
    if (nd.kind === "tensor") nd = nd.parent;
    if (nd && nd !== view && nd.kids.length) zoom(nd);
  });
  document.addEventListener("keydown", function (e) {
    if (e.key === "Escape" && view.parent && document.activeElement !== $("filter")) zoom(view.parent);
  });
  function hideTip() { tip.hidden = true; }
  map.addEventListener("mousemove", function (e) {
    var el = e.target.closest(".tile");
    if (!el) { hideTip(); return; }
    var k = +el.dataset.i;
    if (tip.dataset.i !== String(k) || tip.hidden) {
      tip.textContent = "";
      tipLines(shown[k].node).forEach(function (line, q) {
        var div = document.createElement("div");
        if (q === 0) div.className = "n";
        div.textContent = line;
        tip.appendChild(div);
      });
      tip.dataset.i = k;
      tip.hidden = false;
    }
    var x = e.clientX + 14, y = e.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth - 4) x = Math.max(4, e.clientX - tip.offsetWidth - 14);
    if (y + tip.offsetHeight > window.innerHeight - 4) y = Math.max(4, e.clientY - tip.offsetHeight - 14);
    tip.style.left = x + "px"; tip.style.top = y + "px";
  });
  map.addEventListener("mouseleave", hideTip);

  // -- the legend ---------------------------------------------------------------------------
  function legend() {
    document.title = D.title + ": " + D.source;
    $("title").textContent = D.title;
    $("source").textContent = D.source + (D.format ? "  (" + D.format + ")" : "");
    var box = $("legend"), lines = document.createElement("div");
    lines.className = "lines";
    D.legend.forEach(function (line) {
      var div = document.createElement("div");
      div.textContent = line;
      lines.appendChild(div);
    });
    box.appendChild(lines);
    var keys = document.createElement("div");
    keys.className = "keys";
    var sw = LIST ? ["trainable", "frozen", "partial", "none"].map(function (s) {
      return [s === "none" ? "not trainable (buffer, integer)" : s, STATE_FILL[s]];
    }) : ["added", "removed", "shape", "dtype", "same", "present"].map(function (s) {
      return [s, DIFF_FILL[s]];
    });
    sw.forEach(function (e) {
      var span = document.createElement("span"), box2 = document.createElement("i");
      span.className = "sw";
      box2.style.backgroundColor = e[1];
      span.appendChild(box2);
      span.appendChild(document.createTextNode(e[0]));
      keys.appendChild(span);
    });
    if (!LIST) {
      var rampBox = document.createElement("span"), bar = document.createElement("i");
      rampBox.className = "sw";
      bar.className = "ramp";
      bar.style.backgroundImage = "linear-gradient(to right," + ramp(1e-8) + "," + ramp(1e-4) + "," + ramp(1) + ")";
      rampBox.appendChild(document.createTextNode("changed: rel_l2 1e-8 "));
      rampBox.appendChild(bar);
      rampBox.appendChild(document.createTextNode(" 1"));
      keys.appendChild(rampBox);
      var fl = document.createElement("span");
      fl.className = "sw";
      var flb = document.createElement("i");
      flb.className = "flagkey";
      fl.appendChild(flb);
      fl.appendChild(document.createTextNode("requires_grad changed"));
      keys.appendChild(fl);
    }
    box.appendChild(keys);
  }

  // -- the table ----------------------------------------------------------------------------
  var NAMES = leaves.map(function (lf) { return lf.name; });
  function col(h, value, key, numeric) { return {h: h, v: value, k: key || value, num: !!numeric}; }
  var COLS = LIST ? [
    col("name", function (t) { return NAMES[t]; }),
    col("shape", function (t) { return kindOf(t, 0)[0]; }, function (t) { return kindOf(t, 0)[2]; }, true),
    col("dtype", function (t) { return kindOf(t, 0)[1]; }),
    col("params", function (t) { return num(kindOf(t, 0)[2]); }, function (t) { return kindOf(t, 0)[2]; }, true),
    col("bytes", function (t) { return human(kindOf(t, 0)[3]); }, function (t) { return kindOf(t, 0)[3]; }, true),
    col("trainable", trainWord),
    col("tied with", function (t) { return TIED[t] || ""; })
  ] : [
    col("name", function (t) { return NAMES[t]; }),
    col("status", status),
    col("shape", function (t) { return side(t, 0) + (same(t, 0) ? "" : " \u2192 " + side(t, 1, 0)); },
        function (t) { return leaves[t].numel; }),
    col("dtype", function (t) { return side(t, 0, 1) + (same(t, 1) ? "" : " \u2192 " + side(t, 1, 1)); }),
    col("bytes", function (t) { return human(leaves[t].w); }, function (t) { return leaves[t].w; }, true),
    col("max_abs", function (t) { return metric(metricAt(t, 0)); }, function (t) { return metricAt(t, 0); }, true),
    col("rel_l2", function (t) { return metric(metricAt(t, 1)); }, function (t) { return metricAt(t, 1); }, true),
    col("cosine", function (t) { return metric(metricAt(t, 2)); }, function (t) { return metricAt(t, 2); }, true),
    col("requires_grad", function (t) {
      var g = D.t[t * W + 5];
      return (g & 3) === (g >> 2) ? grad(g & 3) : grad(g & 3) + " \u2192 " + grad(g >> 2);
    })
  ];
  function side(t, s, field) { var kd = kindOf(t, s); return kd ? kd[field || 0] : "-"; }
  function same(t, field) { var a = kindOf(t, 0), b = kindOf(t, 1); return a && b && a[field] === b[field]; }
  function metricAt(t, k) { var v = MET[t]; return v ? v[k] : null; }

  var sortCol = -1, sortDir = 1, order = null, scope = null, timer = 0;
  var thead = document.querySelector("#tensors thead tr"), tbody = document.querySelector("#tensors tbody");
  COLS.forEach(function (c, k) {
    var th = document.createElement("th");
    th.textContent = c.h;
    if (c.num) th.className = "num";
    th.setAttribute("aria-sort", "none");
    th.addEventListener("click", function () {
      if (sortCol === k) sortDir = -sortDir;
      else { sortCol = k; sortDir = c.num ? -1 : 1; }
      order = null;
      thead.querySelectorAll("th").forEach(function (h, q) {
        h.setAttribute("aria-sort", q !== sortCol ? "none" : sortDir > 0 ? "ascending" : "descending");
      });
      refresh();
    });
    thead.appendChild(th);
  });
  function sorted() {
    if (order) return order;
    order = new Array(N);
    for (var k = 0; k < N; k++) order[k] = k;
    if (sortCol >= 0) {
      var key = COLS[sortCol].k, keys = new Array(N);
      for (k = 0; k < N; k++) keys[k] = key(k);
      order.sort(function (a, b) {
        var x = keys[a], y = keys[b];
        if (x === y) return a - b;
        if (x === null || x === undefined || (typeof x === "number" && isNaN(x))) return 1;
        if (y === null || y === undefined || (typeof y === "number" && isNaN(y))) return -1;
        return (x < y ? -1 : 1) * sortDir;
      });
    }
    return order;
  }
  function globRegex(glob) {  // the CLI's globs: * crosses dots; a module name matches its tensors
    var out = "", k = 0;
    while (k < glob.length) {
      var ch = glob[k++];
      if (ch === "*") out += ".*";
      else if (ch === "?") out += ".";
      else if (ch === "[") {
        var end = glob.indexOf("]", k + (glob[k] === "!" || glob[k] === "]" ? 1 : 0));
        if (end < 0) { out += "\\["; continue; }
        var body = glob.slice(k, end).replace(/\\/g, "\\\\");
        if (body[0] === "!") body = "^" + body.slice(1);
        else if (body[0] === "^") body = "\\" + body;
        out += "[" + body + "]";
        k = end + 1;
      } else out += ch.replace(/[.+^${}()|\\\]]/g, "\\$&");
    }
    return new RegExp("^(?:" + out + ")(?:\\.|$)");
  }
  function matcher(text) {
    if (!text) return function () { return true; };
    if (text.slice(0, 3) === "re:") {
      try { var re = new RegExp(text.slice(3)); } catch (err) { return null; }
      return function (name) { return re.test(name); };
    }
    if (/[*?[]/.test(text)) {
      var g = globRegex(text);
      return function (name) { return g.test(name); };
    }
    var low = text.toLowerCase();
    return function (name) { return name.toLowerCase().indexOf(low) >= 0; };
  }
  function refresh() {
    var text = $("filter").value.trim(), test = matcher(text), list = sorted(), rows = [], total = 0;
    var inScope = null;
    if (scope) { inScope = new Uint8Array(N); scope.forEach(function (k) { inScope[k] = 1; }); }
    if (test) {
      for (var k = 0; k < N; k++) {
        var t = list[k];
        if (inScope && !inScope[t]) continue;
        if (!test(NAMES[t])) continue;
        total++;
        if (rows.length < MAX_ROWS) rows.push(t);
      }
    }
    var frag = document.createDocumentFragment();
    rows.forEach(function (t) {
      var tr = document.createElement("tr");
      COLS.forEach(function (c) {
        var td = document.createElement("td");
        td.textContent = c.v(t);
        if (c.num) td.className = "num";
        tr.appendChild(td);
      });
      frag.appendChild(tr);
    });
    tbody.textContent = "";
    tbody.appendChild(frag);
    var where = scope ? " under " + (view.kind === "more" ? view.label + " in " + (view.name || "(all)") : view.name) : "";
    var of = scope ? scope.length : N;
    var msg = !test ? "invalid regular expression" :
      rows.length < total ? "showing " + num(rows.length) + " of " + num(total) + " matching tensors" + where + " (refine the filter to see the rest)" :
      num(total) + " of " + num(of) + " tensors" + where;
    $("count").textContent = msg;
  }
  $("filter").addEventListener("input", function () {
    clearTimeout(timer);
    timer = setTimeout(refresh, N > 20000 ? 150 : 30);
  });
  var resizeTimer = 0;
  window.addEventListener("resize", function () { clearTimeout(resizeTimer); resizeTimer = setTimeout(draw, 100); });

  legend();
  draw();
  refresh();
  document.body.dataset.ready = "1";
})();

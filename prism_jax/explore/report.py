"""The explorer's self-contained HTML report: inline CSS, JS and SVG; no network access.

Sections: a summary, the 2-D prototype map coloured by category, a prompt view where each
generated token's logit is a stacked bar of its prototype contributions (positive to the
right of zero, negative to the left; the bar's net end is the logit), and searchable
prototype cards (label, category, usage, top tokens, salient n-grams, neighbourhood
snippets with the predicted token highlighted).
"""

from __future__ import annotations

import html
import re
from typing import Sequence

from prism_jax.explore.taxonomy import CATEGORIES, COLORS

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#fafafa;color:#222}
header{background:#223;color:#fff;padding:12px 20px}
header h1{font-size:20px;margin:0}
section{padding:12px 20px}
h2{font-size:17px;border-bottom:1px solid #ccc;padding-bottom:4px}
.stats span{display:inline-block;margin-right:18px}
.legend span{display:inline-block;margin-right:12px}
.swatch{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:4px}
#map circle{cursor:pointer;stroke:#fff;stroke-width:.5}
#map circle:hover{stroke:#000;stroke-width:1.5}
.token-row{display:flex;align-items:center;gap:8px;margin:2px 0}
.token-row .tok{width:120px;font-family:monospace;text-align:right;white-space:pre}
.token-row .logit{width:70px;font-family:monospace;font-size:12px}
.prompt{font-family:monospace;background:#fff;border:1px solid #ddd;padding:8px;white-space:pre-wrap}
.prompt .gen{background:#e6f0ff}
#search{font-size:14px;padding:4px 8px;width:320px}
#cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:10px;margin-top:10px}
.card{background:#fff;border:1px solid #ddd;border-left:5px solid #999;padding:8px;border-radius:4px}
.card h3{font-size:14px;margin:0 0 4px}
.card .cat{font-size:11px;color:#fff;padding:1px 6px;border-radius:8px}
.chip{display:inline-block;background:#eef;border-radius:3px;padding:0 4px;margin:1px;font-family:monospace;font-size:12px;white-space:pre}
.snip{font-family:monospace;font-size:12px;color:#444;border-top:1px dotted #ddd;white-space:pre-wrap}
.snip mark{background:#ffe08a}
.muted{color:#888;font-size:12px}
.hidden{display:none}
"""

_JS = """
(function(){
  var search=document.getElementById('search');
  var category=document.getElementById('category');
  var cards=Array.prototype.slice.call(document.querySelectorAll('.card'));
  var count=document.getElementById('shown');
  function apply(){
    var q=search.value.toLowerCase().trim();
    var c=category.value;
    var n=0;
    cards.forEach(function(card){
      var ok=(!q||card.getAttribute('data-text').indexOf(q)>=0||('p'+card.getAttribute('data-id'))===q)
             &&(!c||card.getAttribute('data-category')===c);
      card.classList.toggle('hidden',!ok);
      if(ok){n++;}
    });
    count.textContent=String(n);
  }
  search.addEventListener('input',apply);
  category.addEventListener('change',apply);
  Array.prototype.slice.call(document.querySelectorAll('[data-goto]')).forEach(function(el){
    el.addEventListener('click',function(){
      search.value='p'+el.getAttribute('data-goto');
      category.value='';
      apply();
      document.getElementById('cards-section').scrollIntoView();
    });
  });
  apply();
})();
"""


def _e(text) -> str:
  return html.escape(str(text), quote=True)


def _snippet(span: str) -> str:
  """A neighbourhood span with its predicted [[token]] highlighted."""
  parts = re.split(r"\[\[(.*?)\]\]", span, flags=re.S)
  out = []
  for i, part in enumerate(parts):
    out.append(f"<mark>{_e(part)}</mark>" if i % 2 else _e(part))
  return "".join(out)


def map_svg(coords, cards: Sequence[dict], width: int = 640, height: int = 420) -> str:
  """Prototypes as dots at their 2-D coordinates, coloured by category; click: its card."""
  if len(coords) == 0:
    return "<p class='muted'>no prototypes</p>"
  xs, ys = [float(c[0]) for c in coords], [float(c[1]) for c in coords]
  pad = 16
  span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
  dots = []
  for (x, y), card in zip(zip(xs, ys), cards):
    px = pad + (x - min(xs)) / span_x * (width - 2 * pad)
    py = pad + (1.0 - (y - min(ys)) / span_y) * (height - 2 * pad)
    r = 3.0 + 5.0 * min(1.0, 20.0 * card.get("usage", 0.0))
    dots.append(f"<circle cx='{px:.1f}' cy='{py:.1f}' r='{r:.1f}' "
                f"fill='{COLORS.get(card['category'], '#999')}' data-goto='{card['id']}'>"
                f"<title>p{card['id']} [{_e(card['category'])}] {_e(card['label'])}</title>"
                "</circle>")
  return (f"<svg id='map' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
          f"style='background:#fff;border:1px solid #ddd'>{''.join(dots)}</svg>")


def contribution_bar(step: dict, cards: Sequence[dict], scale: float, width: int = 560) -> str:
  """One token's logit as stacked prototype contributions (SVG): positives right of the zero
  line, negatives left, a black tick at the logit (= their sum)."""
  height, zero = 18, width / 2
  pos, neg, rects = zero, zero, []
  for p in step.get("prototypes", []):
    c = float(p["contribution"])
    w = abs(c) * scale
    if c >= 0:
      x, pos = pos, pos + w
    else:
      neg -= w
      x = neg
    card = cards[p["id"]] if p["id"] < len(cards) else {"category": "", "label": ""}
    rects.append(f"<rect class='seg' x='{x:.2f}' y='2' width='{max(w, 0.5):.2f}' height='14' "
                 f"fill='{COLORS.get(card['category'], '#999')}' stroke='#fff' stroke-width='.5'"
                 f" data-goto='{p['id']}'><title>p{p['id']} {c:+.3f} (a={p['activation']:.3f}) "
                 f"{_e(card['label'])}</title></rect>")
  logit_x = zero + float(step.get("contribution_sum", step["logit"])) * scale
  return (f"<svg class='bar' width='{width}' height='{height}'>"
          f"<line x1='{zero}' x2='{zero}' y1='0' y2='{height}' stroke='#aaa'/>{''.join(rects)}"
          f"<line x1='{logit_x:.2f}' x2='{logit_x:.2f}' y1='0' y2='{height}' stroke='#000' "
          f"stroke-width='2'/></svg>")


def prompt_view(generation: dict | None, cards: Sequence[dict]) -> str:
  if not generation or not generation.get("tokens"):
    return "<p class='muted'>no generation (run with --prompt)</p>"
  steps = generation["tokens"]
  reach = max([max(sum(max(p["contribution"], 0) for p in s.get("prototypes", [])),
                   sum(-min(p["contribution"], 0) for p in s.get("prototypes", [])))
               for s in steps] + [1e-6])
  scale = 270.0 / reach
  rows = []
  for s in steps:
    rows.append(f"<div class='token-row'><span class='tok'>{_e(repr(s['text'])[1:-1])}</span>"
                f"<span class='logit'>{s['logit']:+.2f}</span>"
                f"{contribution_bar(s, cards, scale)}</div>")
  # Newlines shown as a mark, so a run of generated newlines does not push the bars away.
  text = (f"{_e(generation['prompt'])}<span class='gen'>"
          f"{_e(generation['completion'].replace(chr(10), '⏎'))}</span>")
  return (f"<div class='prompt'>{text}</div><p class='muted'>Each bar: the token's logit as the "
          "sum of its active prototypes' contributions c_j = a_j &lt;U_j, E_y&gt; (right of the "
          "grey zero line positive, left negative; the black tick is the logit). Hover for the "
          "prototype, click for its card.</p>" + "".join(rows))


def card_html(card: dict) -> str:
  color = COLORS.get(card["category"], "#999")
  tokens = "".join(f"<span class='chip'>{_e(t['text'])}</span>" for t in card["top_tokens"])
  ngrams = ", ".join(_e(g["text"]) for g in card.get("ngrams", [])) or "<i>none</i>"
  snippets = "".join(f"<div class='snip'>{_snippet(s)}</div>" for s in card.get("snippets", []))
  usage = (f"used at {100 * card['usage']:.2f}% of positions" if "usage" in card else "")
  search_text = " ".join([card["label"], card["category"], ngrams]
                         + [t["text"] for t in card["top_tokens"]]
                         + card.get("snippets", [])).lower()
  llm = f"<div>LLM label: {_e(card['llm_label'])}</div>" if card.get("llm_label") else ""
  return (f"<div class='card' id='card-{card['id']}' data-id='{card['id']}' "
          f"data-category='{_e(card['category'])}' data-text='{_e(search_text)}' "
          f"style='border-left-color:{color}'>"
          f"<h3>p{card['id']} <span class='cat' style='background:{color}'>"
          f"{_e(card['category'])}</span> {_e(card['label'])}</h3>"
          f"<div class='muted'>{usage}</div>{llm}<div>top tokens: {tokens}</div>"
          f"<div>n-grams: {ngrams}</div>{snippets}</div>")


def render(summary: dict, cards: Sequence[dict], coords, generation: dict | None) -> str:
  """The whole report as one HTML string."""
  stats = "".join(f"<span><b>{_e(k)}</b>: {_e(v)}</span>" for k, v in summary.items())
  legend = "".join(f"<span><span class='swatch' style='background:{COLORS[c]}'></span>{c}"
                   "</span>" for c in CATEGORIES)
  options = "".join(f"<option value='{c}'>{c}</option>" for c in CATEGORIES)
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>PRISM prototypes: {_e(summary.get('experiment', ''))}</title>
<style>{_CSS}</style></head>
<body>
<header><h1>PRISM prototype explorer: {_e(summary.get('experiment', ''))}</h1></header>
<section class="stats">{stats}</section>
<section><h2>Prototype map ({_e(summary.get('projection', ''))} of the prototype keys)</h2>
<div class="legend">{legend}</div>{map_svg(coords, cards)}</section>
<section id="prompt-section"><h2>Prompt: per-token prototype contributions</h2>
{prompt_view(generation, cards)}</section>
<section id="cards-section"><h2>Prototypes (<span id="shown">{len(cards)}</span> shown)</h2>
<input id="search" type="search" placeholder="search labels, tokens, snippets, or p17">
<select id="category"><option value="">all categories</option>{options}</select>
<div id="cards">{''.join(card_html(c) for c in cards)}</div></section>
<script>{_JS}</script>
</body></html>
"""

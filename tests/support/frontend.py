"""The real ComfyUI frontend in headless Chromium (Debian's /usr/bin/chromium driven by playwright from PyPI; no
browser download), for the browser tests of the shipped workflows.

FrontendPage opens the server's page, loads a template through the template browser as a user does, and reads
back what the frontend made of it: node sizes as drawn, widget values, graphToPrompt(), dialogs, console errors.
The checks (overlaps, cut-off text, the saved view) are functions of that state, so a test can also run them on a
deliberately broken graph and see them fail.
"""
import json
import os
import shutil
import time

CHROMIUM = os.environ.get("LIKENESS_CHROMIUM", "/usr/bin/chromium")
READY_JS = "() => window.app && app.graph && app.canvas && LiteGraph.registered_node_types['LikenessPrompt']"

# What the frontend reports about the loaded graph. Widget text widths are measured with the canvas's own font
# settings, as the widgets draw them (label + gap + value against the node width less the widget's padding).
STATE_JS = """async () => {
  const g = app.graph, c = app.canvas, ctx = c.canvas.getContext('2d');
  const measure = (t, font) => { const f = ctx.font; ctx.font = font; const w = ctx.measureText(String(t)).width; ctx.font = f; return w; };
  const widgetFont = `${LiteGraph.NODE_SUBTEXT_SIZE}px ${LiteGraph.NODE_FONT}`;
  const padding = {combo: 85, number: 85, text: 60};
  const nodes = g.nodes.map(n => {
    const widgets = (n.widgets || []).map(w => {
      const shown = w._displayValue !== undefined ? w._displayValue : w.value;
      const label = w.displayName || w.label || w.name;
      let cut = false;
      if (padding[w.type] !== undefined && !w.computedDisabled && shown !== undefined && shown !== null)
        cut = measure(label, widgetFont) + 5 + measure(shown, widgetFont) > n.size[0] - padding[w.type];
      const el = w.element || w.inputEl;
      const overflow = el ? el.scrollHeight > el.clientHeight + 2 : false;
      return {name: w.name, type: w.type, value: (w.value !== null && typeof w.value === 'object') ? String(w.value) : w.value,
              serialize: w.serialize !== false && (!w.options || w.options.serialize !== false), cut, overflow,
              inlist: w.type === 'combo' && w.options && Array.isArray(w.options.values) ? w.options.values.includes(w.value) : null};
    });
    return {id: Number(n.id), type: n.type, title: n.title, registered: !!LiteGraph.registered_node_types[n.type],
            has_errors: !!n.has_errors, pos: [n.pos[0], n.pos[1]], size: [n.size[0], n.size[1]],
            title_cut: measure(n.title, `${LiteGraph.NODE_TEXT_SIZE}px ${LiteGraph.NODE_FONT}`) + 40 > n.size[0], widgets};
  });
  const ser = g.serialize();
  let prompt = null, prompt_error = null;
  try { prompt = (await app.graphToPrompt()).output; } catch (e) { prompt_error = String(e); }
  const rect = c.canvas.getBoundingClientRect();
  const ds = c.ds;
  const toScreen = (x, y) => [(x + ds.offset[0]) * ds.scale + rect.left, (y + ds.offset[1]) * ds.scale + rect.top];
  // A node is in view when the canvas (or one of its nodes' text boxes) is what the page shows at its corners and
  // centre: no top bar, side bar, toolbar or minimap over it, and inside the window.
  const hidden = g.nodes.map(n => {
    const [a, b] = toScreen(n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT), [e, f] = toScreen(n.pos[0] + n.size[0], n.pos[1] + n.size[1]);
    const pts = [[a + 2, b + 2], [e - 2, b + 2], [a + 2, f - 2], [e - 2, f - 2], [(a + e) / 2, (b + f) / 2]];
    const shown = (el) => el === c.canvas || (el && el.closest('.dom-widget'));  // text boxes float over the canvas
    return pts.filter(([x, y]) => !shown(document.elementFromPoint(x, y))).map(([x, y]) => [Math.round(x), Math.round(y)]);
  });
  return {nodes, title_h: LiteGraph.NODE_TITLE_HEIGHT, prompt, prompt_error,
          serialized: ser.nodes.map(n => ({id: Number(n.id), widgets_values: n.widgets_values || []})),
          groups: g.groups.map(gr => ({title: gr.title, bounding: [...gr._bounding]})),
          hidden,
          dialogs: [...document.querySelectorAll('.p-dialog')].filter(d => d.offsetParent !== null).map(d => d.innerText.slice(0, 400))};
}"""


def browser_available() -> str | None:
    """None when the browser test can run here, else why not."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (bash scripts/setup_browser.sh)"
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (bash scripts/setup_browser.sh)"
    return None


class FrontendPage:
    def __init__(self, url: str, viewport=(1920, 1080)):
        self.url, self.viewport = url, viewport
        self.console = []

    def __enter__(self):
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self._launch()
        return self

    def _launch(self):
        self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        self.crashed = False
        self.page = self.browser.new_context(viewport={"width": self.viewport[0], "height": self.viewport[1]}).new_page()
        self.page.on("crash", lambda _: setattr(self, "crashed", True))
        self.page.on("console", lambda m: self.console.append(("console." + m.type, m.text[:500]))
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console.append(("pageerror", str(e)[:500])))
        self.page.on("response", lambda r: self.console.append((f"http {r.status}", r.url)) if r.status >= 400 else None)
        self.page.set_default_timeout(60000)  # a busy machine: the frontend's first load can take a minute
        self.page.goto(self.url, wait_until="commit", timeout=240000)
        self.page.wait_for_function(READY_JS, timeout=600000)
        time.sleep(1.5)

    def recover(self):
        """A fresh browser when the last one crashed (on a shared machine the kernel's OOM killer may end it)."""
        if self.crashed or not self.browser.is_connected():
            try:
                self.browser.close()
            except Exception:  # noqa: BLE001  the crashed browser may be gone already
                pass
            self._launch()

    def __exit__(self, *exc):
        self.browser.close()
        self._pw.stop()

    def open_template(self, module: str, name: str, node_count: int, timeout: float = 240.0):
        """Open a template from the template browser: Templates, the pack's category, the card. The card is clicked
        again while it is still shown half a minute later (a click can land beside a card that thumbnails are
        still moving, or beside it on another card); the template counts as open when the browser has closed and the
        graph has the file's nodes."""
        pg = self.page
        selector = f'[data-testid="template-workflow-{name}"]'
        card = pg.locator(selector)
        probe = "(s) => [app.graph.nodes.length, !!document.querySelector(s)]"
        deadline = time.time() + timeout
        while True:
            if not card.count():
                category = pg.get_by_text(module, exact=True)
                if not category.count():
                    pg.get_by_role("button", name="Templates").first.click()
                    category.first.wait_for(timeout=60000)
                category.first.click()
                card.first.wait_for(timeout=60000)
            card.first.click()
            clicked = time.time()
            while time.time() < min(deadline, clicked + 30):
                nodes, shown = pg.evaluate(probe, selector)
                if nodes == node_count and not shown:
                    self.settle()
                    return
                time.sleep(0.5)
            if time.time() >= deadline:
                nodes, shown = pg.evaluate(probe, selector)
                raise AssertionError(f"template {name!r} did not open within {timeout:.0f} s: the graph has {nodes} "
                                     f"nodes (the file {node_count}), the template card is "
                                     f"{'still' if shown else 'no longer'} shown")

    def load_graph(self, ui: dict, name: str = "check"):
        self.page.evaluate("([w, n]) => app.loadGraphData(w, true, true, n)", [ui, name])
        self.settle()

    def settle(self):
        """Let images load and the DOM widgets lay out (two animation frames after the network is quiet)."""
        self.page.wait_for_load_state("networkidle")
        self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        time.sleep(0.8)

    def state(self) -> dict:
        return self.page.evaluate(STATE_JS)

    def screenshot(self, path: str):
        self.page.screenshot(path=path)

    def close_dialogs(self):
        for _ in range(3):
            if not self.page.locator(".p-dialog:visible").count():
                return
            self.page.keyboard.press("Escape")
            time.sleep(0.3)

    def set_widgets(self, changes: dict) -> list:
        """changes: {(node type, widget name): value}, set as a user does (value, then the widget's callback)."""
        return self.page.evaluate("""(changes) => { const done = [];
          for (const n of app.graph.nodes) for (const w of (n.widgets || [])) {
            const key = n.type + '|' + w.name;
            if (key in changes && w.value !== changes[key]) {
              w.value = changes[key]; if (w.callback) w.callback(w.value, app.canvas, n); done.push(key); } }
          app.graph.setDirtyCanvas(true, true); return done; }""", {f"{t}|{w}": v for (t, w), v in changes.items()})

    def run_from_ui(self, timeout: float = 300.0) -> dict:
        """Click Run and wait for the prompt to finish; returns the execution events and the images the output
        nodes show."""
        pg = self.page
        pg.evaluate("""() => { window.__likeness_events = [];
          for (const k of ['execution_start', 'executed', 'execution_error', 'execution_success'])
            app.api.addEventListener(k, e => window.__likeness_events.push([k, JSON.stringify(e.detail || null).slice(0, 500)])); }""")
        pg.get_by_role("button", name="Run").first.click()
        deadline = time.time() + timeout
        events = []
        while time.time() < deadline:
            events = pg.evaluate("() => window.__likeness_events")
            if any(k in ("execution_success", "execution_error") for k, _ in events):
                break
            time.sleep(0.5)
        if any(k == "execution_success" for k, _ in events):
            pg.wait_for_function("() => app.graph.nodes.filter(n => n.type === 'SaveImage')"
                                 ".every(n => (n.imgs || []).length && n.imgs[0].complete)", timeout=30000)
        images = pg.evaluate("""() => app.graph.nodes.filter(n => n.type === 'SaveImage').map(n =>
            (n.imgs || []).map(i => ({src: i.src, width: i.naturalWidth, height: i.naturalHeight})))""")
        return {"events": events, "images": images}


# --- checks on a state ---------------------------------------------------------------------------------------
def overlaps(state: dict) -> list:
    th = state["title_h"]
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - th, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in state["nodes"]]
    out = []
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if min(a[3], b[3]) - max(a[1], b[1]) > 0 and min(a[4], b[4]) - max(a[2], b[2]) > 0:
                out.append((a[0], b[0]))
    return out


def cut_off(state: dict) -> list:
    """Widgets whose text the frontend truncates, text boxes that scroll, titles wider than their node."""
    out = [(n["id"], n["type"], w["name"], "cut" if w["cut"] else "overflows")
           for n in state["nodes"] for w in n["widgets"] if w["cut"] or w["overflow"]]
    return out + [(n["id"], n["type"], "title", "cut") for n in state["nodes"] if n["title_cut"]]


def outside_view(state: dict) -> list:
    """Nodes the saved view does not show whole: outside the window, or under the top bars, side bar, toolbars
    or minimap."""
    return [(n["id"], n["type"], pts) for n, pts in zip(state["nodes"], state["hidden"]) if pts]


def grown(state: dict, ui: dict) -> list:
    """Nodes the frontend drew larger than the file says: the generator under-estimated their size."""
    saved = {n["id"]: n["size"] for n in ui["nodes"]}
    return [(n["id"], n["type"], saved.get(n["id"]), [round(v) for v in n["size"]]) for n in state["nodes"]
            if n["id"] in saved and (n["size"][0] > saved[n["id"]][0] + 0.5 or n["size"][1] > saved[n["id"]][1] + 0.5)]


def widget_mismatches(state: dict, ui: dict) -> list:
    """Widget values the frontend holds (serialized) that differ from the file's widgets_values."""
    live = {n["id"]: n["widgets_values"] for n in state["serialized"]}
    out = []
    for node in ui["nodes"]:
        if list(live.get(node["id"], [])) != list(node.get("widgets_values", [])):
            out.append((node["id"], node["type"], node.get("widgets_values"), live.get(node["id"])))
    return out


def unknown_or_errored(state: dict) -> list:
    return [(n["id"], n["type"]) for n in state["nodes"] if not n["registered"] or n["has_errors"]]


# Console lines that are not the pack's: the machines are offline (the frontend calls out to comfy.org, and the
# missing-model dialog asks Hugging Face for file sizes), and a failed load is judged by its URL below.
NOISE = ("ERR_NAME_NOT_RESOLVED", "ERR_INTERNET_DISCONNECTED", "net::ERR_", "Error fetching file size",
         "Failed to load resource")
# Local URLs that answer 404 on any fresh host (user settings files that do not exist yet).
HOST_404 = ("/api/userdata/", "/user.css")


def pack_console_errors(lines: list, origin: str) -> list:
    out = []
    for kind, text in lines:
        if kind.startswith("http"):
            if text.startswith(origin) and not any(h in text for h in HOST_404):
                out.append((kind, text))
        elif not any(n in text for n in NOISE):
            out.append((kind, text))
    return out


def problems(state: dict, ui: dict, api: dict, console: list, origin: str) -> dict:
    """Everything the browser test refuses, by check; an empty dict is a clean load."""
    from workflow_tools import canonical

    def number(v):  # JavaScript has one number type: 1.0 comes back as 1
        return int(v) if isinstance(v, float) and v.is_integer() else v

    def strip(prompt):
        return {k: {"class_type": v["class_type"], "inputs": {i: x if isinstance(x, list) else number(x)
                                                               for i, x in v["inputs"].items()}}
                for k, v in prompt.items()}

    found = {
        "dialogs (missing nodes or models)": state["dialogs"],
        "unknown or errored nodes": unknown_or_errored(state),
        "widget values differ from the file": widget_mismatches(state, ui),
        "overlapping nodes at the drawn sizes": overlaps(state),
        "nodes the frontend drew larger than saved": grown(state, ui),
        "cut-off text": cut_off(state),
        "nodes outside the saved view": outside_view(state),
        "console errors": pack_console_errors(console, origin),
    }
    if state["prompt"] is None:
        found["graphToPrompt failed"] = [state["prompt_error"]]
    elif canonical(strip(state["prompt"])) != canonical(strip(api)):
        found["graphToPrompt differs from the API twin"] = [_prompt_diff(strip(state["prompt"]), strip(api))]
    return {k: v for k, v in found.items() if v}


def _prompt_diff(got: dict, want: dict) -> str:
    def key(p):
        return sorted(json.dumps([n["class_type"], {k: v for k, v in n["inputs"].items() if not isinstance(v, list)}],
                                 sort_keys=True) for n in p.values())
    a, b = key(got), key(want)
    return f"only in the page: {[x for x in a if x not in b][:3]}; only in the API file: {[x for x in b if x not in a][:3]}"

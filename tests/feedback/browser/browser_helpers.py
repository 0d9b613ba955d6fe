"""Helpers for the browser tests: a page that screenshots every page it lands on, logins, checks, projects
made on the admin pages, and pairwise labelling by keyboard.

`Visitor.goto` and `Visitor.navigate` are the only ways the tests move between pages, and both save a
full-page screenshot of where they landed (numbered in visit order, named by user and path); `close()`
asserts that no page was reached without one.
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PASSWORD = "browser-test-password"
# The cheapest Argon2id costs the server accepts from the environment (OWASP's minimum).
ARGON2_ENV = {"ALIGNLOOP_APP_ARGON2_MEMORY_KIB": "19456", "ALIGNLOOP_APP_ARGON2_TIME_COST": "2",
              "ALIGNLOOP_APP_ARGON2_PARALLELISM": "1"}
# Set on the page before any of its scripts run: every CSP violation is recorded.
RECORD_CSP_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.__cspViolations.push(e.violatedDirective + " " + (e.blockedURI || "") + " " + (e.sample || ""));
});
"""

# Every inline script must carry the response's CSP nonce; none of these may exist in our pages, and no
# attribute may be an event handler or a javascript: URL.
DOM_AUDIT = """
(nonce) => {
  const bad = [];
  for (const el of document.querySelectorAll("*")) {
    for (const a of el.attributes) {
      if (/^on/i.test(a.name)) bad.push(el.tagName + " has handler " + a.name);
      if (["href", "src", "action", "formaction", "data", "xlink:href", "srcdoc", "content"].includes(a.name.toLowerCase())
          && /^\\s*(javascript|data|vbscript):/i.test(a.value)) bad.push(el.tagName + " " + a.name + "=" + a.value);
    }
  }
  for (const el of document.querySelectorAll("iframe, frame, object, embed, base, meta[http-equiv], link[rel=import]"))
    bad.push("unexpected <" + el.tagName.toLowerCase() + ">");
  for (const s of document.scripts) if (s.nonce !== nonce || s.src) bad.push("script without our nonce: " + s.outerHTML.slice(0, 80));
  return {bad: bad, scripts: document.scripts.length, x: window.__x === undefined ? null : String(window.__x),
          violations: window.__cspViolations || [], text: document.documentElement.textContent};
}
"""


@dataclass
class Shots:
    """Screenshots of one test, numbered in the order pages were visited."""

    folder: Path
    taken: list[Path] = field(default_factory=list)

    def path(self, who: str, url: str) -> Path:
        parts = urlsplit(url)
        slug = re.sub(r"[^A-Za-z0-9]+", "_", parts.path + ("_" + parts.query if parts.query else "")).strip("_") or "root"
        out = self.folder / f"{len(self.taken) + 1:03d}-{who}-{slug[:60]}.png"
        self.taken.append(out)
        return out


class Visitor:
    """One user's browser tab on the live server; every page it lands on is screenshotted."""

    def __init__(self, browser: Any, base_url: str, shots: Shots, who: str) -> None:
        self.context = browser.new_context(base_url=base_url, accept_downloads=True, viewport={"width": 1200, "height": 800})
        self.page = self.context.new_page()
        self.page.add_init_script(RECORD_CSP_VIOLATIONS)
        self.page.set_default_timeout(15_000)
        self.base_url, self.shots, self.who = base_url, shots, who
        self.unshot: list[str] = []
        self.page.on("framenavigated", lambda frame: self.unshot.append(frame.url) if frame == self.page.main_frame else None)

    def shot(self) -> Path:
        path = self.shots.path(self.who, self.page.url)
        self.page.screenshot(path=str(path), full_page=True)
        self.unshot.clear()
        return path

    def goto(self, path: str) -> Any:
        """Open `path`; returns the main document's Response."""
        response = self.page.goto(path)
        self.shot()
        return response

    def navigate(self, action: Callable[[], None]) -> Any:
        """Do something that loads a new page (press a key, click); returns that page's Response."""
        with self.page.expect_navigation() as nav:
            action()
        response = nav.value
        self.shot()
        return response

    def login(self, username: str, password: str = PASSWORD) -> Any:
        self.goto("/login")
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", password)
        return self.navigate(lambda: self.page.press("input[name=password]", "Enter"))

    def path(self) -> str:
        return urlsplit(self.page.url).path

    def audit(self, response: Any) -> dict[str, Any]:
        """The DOM audit of the current page, given the CSP nonce of the response that rendered it."""
        self.page.wait_for_timeout(50)  # let an image's onerror (if any had got in) fire
        return dict(self.page.evaluate(DOM_AUDIT, csp_nonce(response.headers.get("content-security-policy", ""))))

    def close(self) -> None:
        assert not self.unshot, f"pages visited without a screenshot: {self.unshot}"
        self.context.close()


# ---------------------------------------------------------------------------------------------------------
# Content-Security-Policy


def parse_csp(header: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            directives[words[0].lower()] = words[1:]
    return directives


def csp_nonce(header: str) -> str:
    found = re.search(r"'nonce-([A-Za-z0-9+/_=-]+)'", header)
    return found.group(1) if found else ""


def assert_strict_csp(header: str) -> None:
    """No inline code but the nonce'd, no eval, nothing loaded from elsewhere, no framing, no <base>."""
    csp = parse_csp(header)
    assert csp.get("default-src") == ["'none'"], header
    for name, sources in csp.items():
        lowered = [s.lower() for s in sources]
        for bad in ("'unsafe-inline'", "'unsafe-eval'", "'unsafe-hashes'", "'wasm-unsafe-eval'", "*", "data:", "http:",
                    "https:", "blob:", "filesystem:"):
            assert bad not in lowered, f"{name} allows {bad}: {header}"
    scripts = csp.get("script-src", csp["default-src"])
    assert all(s.startswith("'nonce-") or s == "'none'" for s in scripts), f"script-src is not nonce-only: {header}"
    assert csp.get("object-src", csp["default-src"]) == ["'none'"], header
    assert csp.get("base-uri") in (["'none'"], ["'self'"]), header
    assert csp.get("frame-ancestors") == ["'none'"], header


# ---------------------------------------------------------------------------------------------------------
# Raw HTTP (paths sent exactly as written: no client-side dot-segment or percent normalisation)


def raw_get(base_url: str, path: str, cookie: str = "") -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=15)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        if cookie:
            conn.putheader("Cookie", cookie)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def cookie_header(context: Any) -> str:
    return "; ".join(f"{c['name']}={c['value']}" for c in context.cookies())


# ---------------------------------------------------------------------------------------------------------
# Pairwise labelling by keyboard, and downloads

N_ITEMS = 14
LABELS_EACH = 10
# Keys by strength (docs/feedback.md): the good answer on the left is 1-3, on the right 7-5.
LEFT_KEYS = {"much better": "1", "better": "2", "slightly better": "3"}
RIGHT_KEYS = {"much better": "7", "better": "6", "slightly better": "5"}
MARGINS = {"much better": 3, "better": 2, "slightly better": 1}


def write_items(path: Path) -> Path:
    """Items whose good answer says so, at position a or b by turns (the page shuffles them anyway)."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(N_ITEMS):
            good = {"text": f"good answer to q{i:02d}: boil it for 8 minutes", "model": "policy", "version": "step-400"}
            poor = {"text": f"poor answer to q{i:02d}: eggs are laid by hens", "model": "sft", "version": "v1"}
            row = {"id": f"q{i:02d}", "prompt": f"Question q{i:02d}: how long do I boil an egg?",
                   "responses": [good, poor] if i % 2 else [poor, good], "meta": {"source": "browser test"}}
            f.write(json.dumps(row) + "\n")
    return path


def shown_item(v: Visitor) -> tuple[str, str]:
    """(item id, side of the good answer) of the pair on the page."""
    prompt = v.page.inner_text("h2:has-text('Prompt') + .text")
    item = re.search(r"q\d\d", prompt)
    assert item, prompt
    left = v.page.inner_text("#left")
    right = v.page.inner_text("#right")
    assert ("good answer" in left) != ("good answer" in right), (left, right)
    return item.group(0), "left" if "good answer" in left else "right"


def press(v: Visitor, key: str) -> Any:
    response = v.navigate(lambda: v.page.keyboard.press(key))
    assert response.status == 200, (key, response.status, v.page.url)
    return response


def label_by_keyboard(v: Visitor, project_id: int, undo_at: int, skip_at: int,
                      tie_on: Callable[[str], bool] = lambda item: False) -> dict[str, str]:
    """Label LABELS_EACH pairs with keys only: at step `undo_at` first answer wrongly, undo with `u`
    (the same item must come back) and answer again; at step `skip_at` skip with `s` and a reason; an item
    for which `tie_on(item id)` is true gets a tie (`4`). Returns {item id: strength of the vote that
    stands, or "tie"}."""
    v.goto(f"/annotate/{project_id}")
    votes: dict[str, str] = {}
    strengths = list(MARGINS)
    step = 0
    while len(votes) < LABELS_EACH:
        item, good = shown_item(v)
        assert item not in votes, f"{item} was given twice"
        if step == skip_at:
            v.page.keyboard.press("s")
            assert v.page.evaluate("document.activeElement.id") == "skip-reason"
            v.page.keyboard.type("I do not know how eggs are cooked.")
            press(v, "Enter")
            assert shown_item(v)[0] != item
            step += 1
            continue
        if step == undo_at:
            wrong = (RIGHT_KEYS if good == "left" else LEFT_KEYS)["much better"]
            press(v, wrong)
            assert shown_item(v)[0] != item
            press(v, "u")
            assert shown_item(v)[0] == item, "undo did not bring the item back"
        if tie_on(item):
            press(v, "4")
            votes[item] = "tie"
        else:
            strength = strengths[step % 3]
            press(v, (LEFT_KEYS if good == "left" else RIGHT_KEYS)[strength])
            votes[item] = strength
        step += 1
    text = v.page.inner_text("body")
    assert f"You have labelled {LABELS_EACH} and skipped 1" in text, text
    return votes


def download(v: Visitor, link_text: str, out: Path) -> Any:
    with v.page.expect_download() as info:
        v.page.click(f"a:text-is('{link_text}')")
    info.value.save_as(str(out))
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def create_project(admin: Visitor, name: str, task: str, items: Path, members: tuple[str, ...], overlap_k: int = 2,
                   guidelines: str = "") -> int:
    """As the admin, from /admin: create a project, add its annotators and upload its items; returns its id."""
    admin.goto("/admin")
    admin.page.fill("input[name=name]", name)
    admin.page.fill("input[name=overlap_k]", str(overlap_k))
    admin.page.select_option("select[name=task]", task)
    admin.page.fill("textarea[name=guidelines]", guidelines)
    admin.navigate(lambda: admin.page.click("button:text-is('Create')"))
    for member in members:
        admin.page.fill("form[action$='/members'] input[name=username]", member)
        admin.navigate(lambda: admin.page.click("form[action$='/members'] button"))
    admin.page.set_input_files("input[type=file]", str(items))
    admin.navigate(lambda: admin.page.click("form[enctype='multipart/form-data'] button"))
    assert admin.page.inner_text("h1") == name
    return int(admin.path().rsplit("/", 1)[1])

"""W7: text from users never runs as code. A corpus of payloads, each of which would set `window.__x`
if it ran, goes into prompts, responses, model tags, project names, guidelines, skip reasons, upload
file names, user names and URLs; an admin and an annotator then visit every page reachable by links
(so pages added later are covered too) and each page is audited in the browser:

- `window.__x` is never set and no Content-Security-Policy violation is reported (so nothing was even
  attempted: escaping works on its own, the CSP is the second wall);
- no element carries an event-handler attribute or a javascript:/data: URL, no frame, object, <base>
  or meta refresh exists, and every <script> carries the response's nonce;
- the payloads are shown as the literal text they are;
- the CSP header is strict (nonce-only scripts, no unsafe-inline or unsafe-eval), its nonce is new on
  every response, and every download (export) is an attachment with `nosniff` and a non-HTML type.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from browser_helpers import Shots, Visitor, assert_strict_csp, csp_nonce

pytestmark = pytest.mark.browser

PAYLOADS = [
    '<script>window.__x="script"</script>',
    '<img src=x onerror="window.__x=\'img\'">',
    '<svg onload="window.__x=\'svg\'"></svg>',
    '<svg><script>window.__x="svg-script"</script></svg>',
    "javascript:window.__x='js-url'",
    '<a href="javascript:window.__x=\'a-href\'">click me</a>',
    '" autofocus onfocus="window.__x=\'attr-dq\'" x="',
    "' autofocus onfocus='window.__x=\"attr-sq\"' x='",
    '"><script>window.__x="break-dq"</script>',
    "'><img src=x onerror=window.__x='break-sq'>",
    '</textarea><script>window.__x="textarea"</script>',
    '</title><script>window.__x="title"</script>',
    '</script><script>window.__x="script-close"</script>',
    '<iframe srcdoc="<script>parent.__x=\'srcdoc\'</script>"></iframe>',
    '<details open ontoggle="window.__x=\'details\'">x</details>',
    '<body onload="window.__x=\'body\'">',
    '<meta http-equiv="refresh" content="0;url=javascript:window.__x=\'meta\'">',
    '<base href="javascript:window.__x=\'base\'//">',
    '<object data="javascript:window.__x=\'object\'"></object>',
    '<math><mtext><table><mglyph><style><img src=x onerror=window.__x="mxss">',
    "{{7*7}}",
    '{{ "<img src=x onerror=window.__x=\'jinja\'>"|safe }}',
    "{% raw %}<script>window.__x='jinja-raw'</script>{% endraw %}",
    "${window.__x='template-literal'}",
    '<div style="background:url(javascript:window.__x=\'css\')">css</div>',
]
# User names are letters, digits and . - _ only: these must be refused, wherever they are typed.
BAD_USERNAMES = ['<script>window.__x="user"</script>', '"><img src=x onerror=window.__x=1>', "{{7*7}}"]


def item_row(i: int, payload: str) -> dict[str, Any]:
    return {"id": f"x{i}:{payload}", "prompt": f"Prompt {i}: {payload}",
            "responses": [{"text": f"First {i}: {payload}", "model": payload, "version": payload},
                          {"text": f"Second {i}: {payload}", "model": f"m{i}", "version": "v1"}],
            "meta": {"note": payload}}


def api(server: Any, token: str, path: str, body: dict[str, Any]) -> Any:
    import urllib.request

    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def make_projects(server: Any, admin: Visitor, tmp_path: Path) -> None:
    """One project per payload (named by it): the first through the admin's browser, the second with
    the CLI, the rest through the JSON API."""
    page = admin.page
    admin.goto("/admin")
    page.fill("input[name=name]", PAYLOADS[0])
    page.fill("textarea[name=guidelines]", f"Guideline 0: {PAYLOADS[0]}")
    admin.navigate(lambda: page.click("button:text-is('Create')"))
    page.fill("input[name=username]", "ann")
    admin.navigate(lambda: page.click("form[action$='/members'] button"))
    page.set_input_files("input[type=file]", files={"name": "items.jsonl", "mimeType": "application/x-ndjson",
                                                    "buffer": (json.dumps(item_row(0, PAYLOADS[0])) + "\n").encode()})
    admin.navigate(lambda: page.click("form[enctype='multipart/form-data'] button"))
    assert page.inner_text("h1") == PAYLOADS[0]

    guidelines, items = tmp_path / "guidelines.txt", tmp_path / "items.jsonl"
    guidelines.write_text(f"Guideline 1: {PAYLOADS[1]}", encoding="utf-8")
    items.write_text(json.dumps(item_row(1, PAYLOADS[1])) + "\n", encoding="utf-8")
    server.cli("project", "add", PAYLOADS[1], "--guidelines-file", str(guidelines), "--annotator", "ann")
    server.cli("import", PAYLOADS[1], str(items))

    token = server.cli("token", "add", "ada").stdout.strip()
    for i, payload in enumerate(PAYLOADS[2:], 2):
        project = api(server, token, "/api/v1/projects", {"name": payload, "guidelines": f"Guideline {i}: {payload}",
                                                          "overlap_k": 1, "annotators": ["ann"]})
        api(server, token, f"/api/v1/projects/{project['id']}/items", {"items": [item_row(i, payload)]})


class Auditor:
    """Visits pages as one user, following every same-origin link, and audits each one."""

    def __init__(self, visitor: Visitor, nonces: set[str]) -> None:
        self.v, self.nonces = visitor, nonces
        self.pages: dict[str, str] = {}  # path -> text
        self.downloads: list[str] = []

    def check(self, response: Any, expect_text: tuple[str, ...] = ()) -> str:
        headers = response.headers
        where = self.v.page.url
        assert headers.get("x-content-type-options") == "nosniff", where
        assert_strict_csp(headers.get("content-security-policy", ""))
        nonce = csp_nonce(headers["content-security-policy"])
        assert nonce not in self.nonces, f"CSP nonce reused at {where}"
        self.nonces.add(nonce)
        if "text/html" not in headers.get("content-type", ""):
            assert self.v.page.evaluate("window.__x === undefined"), where
            return ""
        audit = self.v.audit(response)
        assert audit["x"] is None, f"a payload ran at {where}: window.__x = {audit['x']}"
        assert audit["violations"] == [], f"CSP violations at {where}: {audit['violations']}"
        assert audit["bad"] == [], f"dangerous markup at {where}: {audit['bad']}"
        for text in expect_text:
            assert text in audit["text"], f"{text!r} is not shown literally at {where}"
        return str(audit["text"])

    def visit(self, path: str, expect_text: tuple[str, ...] = ()) -> str:
        response = self.v.goto(path)
        text = self.check(response, expect_text)
        self.pages[urlsplit(self.v.page.url).path] = text
        return text

    def links(self) -> list[str]:
        hrefs = self.v.page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
        origin = self.v.base_url
        return [h.split("#")[0] for h in hrefs if h.startswith(origin + "/")]

    def crawl(self, start: str, expect: dict[str, tuple[str, ...]], limit: int = 400,
              then: Callable[[str], None] | None = None) -> None:
        """Every page reachable from `start` by links; downloads are checked, not opened. `then(path)`
        runs after each page's audit (and may move on to another page)."""
        queue, seen = [start], {start}
        while queue:
            url = queue.pop(0)
            path = url.removeprefix(self.v.base_url)
            assert len(seen) <= limit, "too many pages: is a link generating new URLs?"
            head = self.v.context.request.get(url, max_redirects=0)
            if "attachment" in head.headers.get("content-disposition", "") or "/export" in path:
                check_download(head, path)
                self.downloads.append(path)
                continue
            assert head.status < 400, f"{path} answers {head.status}"
            self.visit(path, expect.get(urlsplit(url).path, ()))
            if then is not None:
                then(urlsplit(url).path)
            for link in self.links():
                if link not in seen and "/logout" not in link:
                    seen.add(link)
                    queue.append(link)


def check_download(response: Any, path: str) -> None:
    headers = response.headers
    assert response.status == 200, path
    assert headers.get("content-disposition", "").startswith("attachment"), f"{path} is not an attachment"
    assert headers.get("x-content-type-options") == "nosniff", path
    assert "html" not in headers.get("content-type", "") and "xml" not in headers.get("content-type", ""), path


def project_ids(admin: Visitor) -> dict[str, int]:
    admin.goto("/admin")
    rows = admin.page.eval_on_selector_all("a[href^='/admin/projects/']",
                                           "els => els.map(e => [e.textContent, e.getAttribute('href')])")
    return {name: int(href.rsplit("/", 1)[1]) for name, href in rows}


def test_payloads_never_run_on_any_page(live_server: Any, browser: Any, artifacts: Path, tmp_path: Path) -> None:
    live_server.add_user("ada", admin=True)
    live_server.add_user("ann")
    shots, nonces = Shots(artifacts), set[str]()
    admin = Visitor(browser, live_server.url, shots, "ada")
    admin.login("ada")
    make_projects(live_server, admin, tmp_path)
    ids = project_ids(admin)
    assert set(ids) == set(PAYLOADS), "every project is listed under its literal name"

    # The annotator: the home page lists every project by name; each project page shows its item.
    annotator = Visitor(browser, live_server.url, shots, "ann")
    annotator.login("ann")
    ann = Auditor(annotator, nonces)
    expect: dict[str, tuple[str, ...]] = {
        f"/annotate/{ids[p]}": (p, f"Guideline {i}: {p}", f"Prompt {i}: {p}", f"First {i}: {p}", f"Second {i}: {p}")
        for i, p in enumerate(PAYLOADS)}
    expect["/annotate"] = tuple(PAYLOADS)
    by_path = {f"/annotate/{ids[p]}": (i, p) for i, p in enumerate(PAYLOADS)}

    def answer(path: str) -> None:  # vote on half the items; skip the rest giving the payload as the reason
        if path not in by_path:
            return
        i, payload = by_path[path]
        if i % 2:
            annotator.page.keyboard.press("s")
            annotator.page.keyboard.type(payload)
            ann.check(annotator.navigate(lambda: annotator.page.keyboard.press("Enter")))
        else:
            ann.check(annotator.navigate(lambda: annotator.page.keyboard.press("2")))
        assert "Nothing left for you" in annotator.page.inner_text("body")

    ann.crawl(live_server.url + "/annotate", expect, then=answer)
    assert set(expect) <= set(ann.pages), f"pages not reached: {set(expect) - set(ann.pages)}"
    annotator.close()

    # The admin: every page by links, now with votes and skip reasons in the database.
    adm = Auditor(admin, nonces)
    expect = {f"/admin/projects/{ids[p]}": (p, f"Guideline {i}: {p}") for i, p in enumerate(PAYLOADS)}
    expect["/admin"] = tuple(PAYLOADS)
    adm.crawl(live_server.url + "/admin", expect)
    assert set(expect) <= set(adm.pages), f"pages not reached: {set(expect) - set(adm.pages)}"
    assert len(adm.downloads) >= len(PAYLOADS), "every project page links its exports"

    # A download opens as a file, not a page; it holds the payloads as JSON data.
    admin.goto(f"/admin/projects/{ids[PAYLOADS[0]]}")
    with admin.page.expect_download() as info:
        admin.page.click("a:text-is('votes')")
    assert info.value.suggested_filename.endswith(".jsonl")
    votes = [json.loads(line) for line in Path(info.value.path()).read_text(encoding="utf-8").splitlines()]
    assert [v["response_a"] for v in votes] == [f"First 0: {PAYLOADS[0]}"]

    # Error pages that echo what was sent: a taken project name, a bad upload's file name, an id
    # already in the project, user names that are refused.
    page = admin.page
    admin.goto("/admin")
    page.fill("input[name=name]", PAYLOADS[2])
    response = admin.navigate(lambda: page.click("button:text-is('Create')"))
    assert response.status == 409
    adm.check(response)
    admin.goto(f"/admin/projects/{ids[PAYLOADS[3]]}")
    for name, body in ((PAYLOADS[1] + ".jsonl", b"not json\n"),
                       ("items.jsonl", (json.dumps(item_row(3, PAYLOADS[3])) + "\n").encode())):
        page.set_input_files("input[type=file]", files={"name": name, "mimeType": "application/x-ndjson", "buffer": body})
        response = admin.navigate(lambda: page.click("form[enctype='multipart/form-data'] button"))
        assert response.status == 400
        adm.check(response)
        admin.goto(f"/admin/projects/{ids[PAYLOADS[3]]}")
    for bad in BAD_USERNAMES:
        assert live_server.cli("user", "add", bad, "--password-stdin", stdin="x" * 20 + "\n", check=False).returncode == 2
        admin.goto("/admin")
        page.fill("form[action='/admin/users'] input[name=username]", bad)
        page.fill("form[action='/admin/users'] input[name=password]", "long enough password")
        response = admin.navigate(lambda: page.click("form[action='/admin/users'] button"))
        assert response.status == 400
        adm.check(response)
    admin.goto("/admin")
    users = page.eval_on_selector_all("h2:text-is('Users') + table td:first-child", "els => els.map(e => e.textContent)")
    assert sorted(users) == ["ada", "ann"]

    # Payloads in URLs (paths and query strings) are not reflected into running code either.
    for payload in (PAYLOADS[0], PAYLOADS[1], PAYLOADS[6], PAYLOADS[9]):
        for path in (f"/annotate/{quote(payload, safe='')}", f"/no-such-page/{quote(payload, safe='')}",
                     f"/admin?q={quote(payload, safe='')}", f"/login?next={quote(payload, safe='')}"):
            adm.check(admin.goto(path))
    admin.close()

    # Logged out: the login page with a payload as the user name.
    visitor = Visitor(browser, live_server.url, shots, "anonymous")
    response = visitor.login(BAD_USERNAMES[0], "wrong password 12345")
    assert response.status == 401
    Auditor(visitor, nonces).check(response)
    visitor.close()

"""Open every page of the built book in headless Chromium and check what a reader sees.

    python tests/browser/check_site.py [SITE] [--screenshots DIR]

SITE (default ``_build/html``) is served on 127.0.0.1 and each of its HTML
pages is opened in Debian's chromium, driven by chromedriver through
selenium. A page passes when

- math: MathJax started, every math element of the page holds typeset math
  (an ``mjx-container``), no formula holds a TeX error (an unknown macro
  included), and no TeX delimiter is left in the text outside code;
- images: every image served by the site itself has loaded (its natural width
  is not zero); an image from elsewhere is allowed only when it is listed in
  ``EXTERNAL_IMAGES`` (the Colab badge, which the offline check cannot load);
- links: every link into the site leads to a file of the site and, when it
  has a fragment, to an element of that page with that id;
- resources: the browser's console reports nothing that failed to load from
  the site itself (scripts, styles, fonts, MathJax) and no uncaught error in
  the site's scripts.

Prints a line for each page, ends with ``browser: N passed, M failed``, and
exits non-zero when a page failed. ``--screenshots DIR`` also saves every
page as PNGs, one per screen, as a reader scrolling through it sees it.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import tempfile
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# As root and with no network: no sandbox, and none of Chromium's own traffic.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,900",
]
EXTERNAL_IMAGES = {"https://colab.research.google.com/assets/colab-badge.svg"}
TIMEOUT_S = 30
MAX_REPORTED = 12  # problems printed for one page

# Resolves once MathJax has typeset the page; pages without math answer at once.
WAIT_FOR_MATHJAX = """
const done = arguments[arguments.length - 1];
if (!document.querySelector('.math')) { done('no math'); return; }
const start = Date.now();
(function poll() {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => document.fonts.ready).then(() => done('ok'), e => done('error: ' + e));
  } else if (Date.now() - start > 20000) {
    done('MathJax did not start');
  } else {
    setTimeout(poll, 100);
  }
})();
"""

# Makes every image load now (a lazy one would wait to be scrolled to) and waits until each is settled.
WAIT_FOR_IMAGES = """
const done = arguments[arguments.length - 1];
const images = [...document.images];
images.forEach(img => { img.loading = 'eager'; });
const start = Date.now();
(function poll() {
  if (images.every(img => img.complete) || Date.now() - start > 15000) {
    done(images.map(img => ({src: img.currentSrc || img.src, loaded: img.complete && img.naturalWidth > 0})));
  } else {
    setTimeout(poll, 100);
  }
})();
"""

# A TeX error is an merror node, or, for an undefined macro, the red mtext that
# MathJax's noundefined extension puts in its place.
READ_PAGE = """
const math = [...document.querySelectorAll('.math')];
const texErrors = [];
for (const item of (window.MathJax && MathJax.startup && MathJax.startup.document
                    ? MathJax.startup.document.math : [])) {
  item.root.walkTree(node => {
    if (node.isKind('merror') || (node.isKind('mtext') && node.attributes.get('mathcolor') === 'red')) {
      texErrors.push(item.math.slice(0, 60));
    }
  });
}
const article = (document.querySelector('article') || document.body).cloneNode(true);
article.querySelectorAll('pre, code, .highlight, mjx-container, script, style').forEach(e => e.remove());
return {
  math: math.length,
  untypeset: math.filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 60)),
  tex_errors: texErrors,
  text: article.textContent,
  links: [...document.querySelectorAll('a[href]')].map(a => a.href),
};
"""

# Delimiters that MathJax would have replaced: \( \) \[ \] $$, or a $...$ pair.
RAW_TEX = re.compile(r"\\[()\[\]]|\$\$|\$[^$\s][^$]*\$")


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids.update(value for name, value in attrs if name in ("id", "name") and value)


@functools.cache
def page_ids(path: Path) -> frozenset[str]:
    """The ids (and anchor names) of the elements of an HTML file."""
    parser = _Ids()
    parser.feed(path.read_text(encoding="utf-8"))
    return frozenset(parser.ids)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(site: Path) -> ThreadingHTTPServer:
    """Serve ``site`` on a free port of 127.0.0.1, in a background thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_browser(profile: str) -> webdriver.Chrome:
    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(TIMEOUT_S)
    driver.set_script_timeout(TIMEOUT_S)
    return driver


def link_problem(url: str, origin: str, site: Path) -> str | None:
    """Why a link into the site is broken, or None when it is fine (or leads elsewhere)."""
    if not url.startswith(origin + "/"):
        return None
    parts = urlsplit(url)
    target = site / unquote(parts.path).lstrip("/")
    if target.is_dir():
        target = target / "index.html"
    if not target.is_file():
        return f"broken link {url.removeprefix(origin)}"
    if parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in page_ids(target):
        return f"missing anchor {url.removeprefix(origin)}"
    return None


def check_page(driver: webdriver.Chrome, url: str, origin: str, site: Path) -> tuple[list[str], str]:
    """Open ``url`` and return what is wrong with it, and a one-line summary."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(url)
    problems = []

    mathjax = driver.execute_async_script(WAIT_FOR_MATHJAX)
    if mathjax not in ("ok", "no math"):
        problems.append(f"MathJax: {mathjax}")
    page = driver.execute_script(READ_PAGE)
    problems += [f"math not typeset: {tex!r}" for tex in page["untypeset"]]
    problems += [f"TeX error: {err!r}" for err in page["tex_errors"]]
    problems += [f"raw TeX in the text: {m.group()[:60]!r}" for m in RAW_TEX.finditer(page["text"])]

    images = driver.execute_async_script(WAIT_FOR_IMAGES)
    for image in images:
        local = image["src"].startswith(origin + "/")
        if local and not image["loaded"]:
            problems.append(f"image did not load: {image['src'].removeprefix(origin)}")
        elif not local and image["src"] not in EXTERNAL_IMAGES:
            problems.append(f"image from outside the site: {image['src']}")

    internal = [link for link in page["links"] if link.startswith(origin + "/")]
    problems += sorted({p for p in (link_problem(link, origin, site) for link in internal) if p})

    for entry in driver.get_log("browser"):
        message = entry["message"]
        # What the site failed to load, and errors its scripts did not catch; not the
        # browser's own request for /favicon.ico, nor what a script logs on purpose.
        if (origin in message and "/favicon.ico" not in message
                and ("Failed to load resource" in message or "Uncaught" in message)):
            problems.append(f"console: {message.replace(origin, '')[:160]}")

    summary = f"{page['math']} math, {len(images)} images, {len(internal)} internal links"
    return problems, summary


def screenshots(driver: webdriver.Chrome, stem: Path) -> None:
    """Save the page as the reader scrolls through it: one window-sized PNG per screen."""
    height = driver.execute_script("return window.innerHeight")
    total = driver.execute_script("return document.documentElement.scrollHeight")
    for n, top in enumerate(range(0, total, height)):
        driver.execute_script("window.scrollTo(0, arguments[0])", top)
        driver.save_screenshot(str(stem.with_name(f"{stem.name}-{n:02d}.png")))
    driver.execute_script("window.scrollTo(0, 0)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", nargs="?", default="_build/html", type=Path, help="the built site")
    parser.add_argument("--screenshots", type=Path, help="save PNGs of every page, screen by screen, here")
    args = parser.parse_args()

    site = args.site.resolve()
    pages = sorted(p for p in site.rglob("*.html") if not p.relative_to(site).parts[0].startswith("_"))
    if not pages:
        print(f"no HTML pages under {args.site}: build the book first (bash scripts/build_book.sh)")
        return 1
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)

    server = serve(site)
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    failed = 0
    with tempfile.TemporaryDirectory() as profile:
        driver = start_browser(profile)
        try:
            for path in pages:
                name = path.relative_to(site).as_posix()
                problems, summary = check_page(driver, f"{origin}/{name}", origin, site)
                print(f"{'FAIL' if problems else 'ok  '} {name}: {summary}")
                for problem in problems[:MAX_REPORTED]:
                    print(f"       {problem}")
                if len(problems) > MAX_REPORTED:
                    print(f"       ... and {len(problems) - MAX_REPORTED} more")
                failed += bool(problems)
                if args.screenshots:
                    screenshots(driver, args.screenshots / name.replace("/", "__").removesuffix(".html"))
        finally:
            driver.quit()
            server.shutdown()
    print(f"browser: {len(pages) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""A screenshot of the web page of a running vae-serve, in headless Chromium (Debian's `chromium`).

    python scripts/ui_screenshot.py URL OUT.png IMAGE.png [IMAGE.png ...] [--key KEY] [--model NAME/VERSION]

Opens URL/ui, chooses the model version, uploads the images (score, flag, map, reconstruction), draws 16
prior samples and saves the whole page. `make screenshot` takes docs/images/ui.png through tests/ui instead
(against the shipped model); this script is for any service, e.g. one serving a version with anomaly maps.
"""

from __future__ import annotations

import argparse
import os
import shutil

from playwright.sync_api import sync_playwright


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url")
    p.add_argument("out")
    p.add_argument("images", nargs="+")
    p.add_argument("--key", help="the service's API key, if it needs one")
    p.add_argument("--model", help="NAME/VERSION to choose (default: the page's choice)")
    p.add_argument("--width", type=int, default=1100)
    args = p.parse_args()
    browser = os.environ.get("VAE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("no chromium found: apt-get install chromium, or set VAE_CHROMIUM")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=browser, headless=True)
        page = b.new_page(viewport={"width": args.width, "height": 900})
        page.goto(args.url.rstrip("/") + "/ui")
        if args.key:
            page.fill("#apikey", args.key)
            page.dispatch_event("#apikey", "change")
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        if args.model:
            page.select_option("#model", args.model)
        page.set_input_files("#files", args.images)
        n = len(args.images)
        page.wait_for_function(f"document.querySelectorAll('#results .card[data-state]').length == {n}", timeout=120000)
        page.click("#sample")
        page.wait_for_function("document.querySelectorAll('#samples canvas').length > 0")
        page.screenshot(path=args.out, full_page=True)
        b.close()
    print(args.out)


if __name__ == "__main__":
    main()

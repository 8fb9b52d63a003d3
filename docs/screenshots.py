"""The pictures of the documentation, from a store with a sweep (and a UI running on it for the screenshots):
- docs/ui-runs-table.png: the latest sweep's runs in the MLflow UI, best best_val_acc first;
- docs/ui-parent-run.png: its parent run's page (the sweep's grid as its name, the leaderboard as its description);
- docs/sweep-pareto.png, docs/sweep-importance.png: the Pareto front and what mattered, as the parent run carries them
  (the report draws them again; a sweep has them once 3 of its runs learned);
- docs/report-test-acc.png, docs/report-loss.png: the figures `python -m fashioncnn report SWEEP_ID` draws.
Run it again after anything changes what the UI or the figures show.

    make sweep SWEEP="conv=1,2,3 lin=2,3 subset=2000 epochs=2 model.filter_in=8" && (make ui &)
    .venv/bin/python docs/screenshots.py      # --tracking-uri URI --base http://127.0.0.1:5001 --out DIR
    .venv/bin/python docs/screenshots.py --no-browser   # only the figures: no UI, no Chromium needed

It drives headless Chromium (Debian's `chromium`; `make chromium` installs it) over the DevTools
protocol, because the command line's --screenshot cannot click. Three clicks are needed: one closes the
MLflow Assistant panel, which opens on a browser's first visit and covers a third of the page. One
selects the sort column again in the Sort menu, which adds best_val_acc as a table column (a URL can
set the sort order but cannot add the column). One unfolds the parent run's description ("Show more"),
which shows only its first lines otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp  # a dependency of MLflow
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from fashioncnn.tracking.links import run_url, sweep_url, ui_base_for
from fashioncnn.tracking.names import ROLE_TAG
from fashioncnn.tracking.stores import default_tracking_uri

WIDTH, HEIGHT = 1600, 900
PARENT_HEIGHT = 1050  # the parent run's page: its leaderboard, metrics and params
METRIC = "best_val_acc"  # the runs' selection metric: sweep_url's default sort
CLOSE_ASSISTANT = '[data-component-id="mlflow.assistant.chat_panel.close"]'


class Page:
    """One browser tab, driven by DevTools protocol commands."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.last_id = ws, 0

    async def call(self, method: str, **params: object) -> dict:
        self.last_id += 1
        await self.ws.send_json({"id": self.last_id, "method": method, "params": params})
        async for message in self.ws:  # events in between are not needed
            reply = json.loads(message.data)
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
        raise RuntimeError("Chromium closed the connection")

    async def js(self, expression: str) -> object:
        return (await self.call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not await self.js(f"!!({expression})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never showed {what}")
            await asyncio.sleep(0.25)

    async def wait_for_text(self, *texts: str) -> None:
        await self.wait_for(" && ".join(f"document.body.innerText.includes({json.dumps(t)})" for t in texts), f"{texts}")

    async def click(self, selector: str) -> None:
        """A real mouse click: the UI's menus open on pointer events, which element.click() does not send."""
        rect = await self.js(f"(r => r && [r.x + r.width / 2, r.y + r.height / 2])"
                             f"(document.querySelector({json.dumps(selector)})?.getBoundingClientRect())")
        if rect is None:
            raise LookupError(f"nothing on the page matches {selector}")
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=rect[0], y=rect[1], button="left", clickCount=1)

    async def click_button(self, starts_with: str) -> None:
        """Click the button whose text starts with `starts_with`, once there is one."""
        find = f"[...document.querySelectorAll('button')].find(b => b.innerText.startsWith({json.dumps(starts_with)}))"
        await self.wait_for(find, f"a button {starts_with!r}")
        await self.js(f"{find}.dataset.clickMe = 1")
        await self.click("[data-click-me]")
        await self.js("document.querySelector('[data-click-me]')?.removeAttribute('data-click-me')")

    async def close_assistant(self) -> None:
        await asyncio.sleep(1)  # it opens a moment after the page
        if await self.js(f"!!document.querySelector({json.dumps(CLOSE_ASSISTANT)})"):
            await self.click(CLOSE_ASSISTANT)

    async def open(self, url: str) -> None:
        # Through a blank page: a new #... on the same page would only be a step inside the running app.
        await self.call("Page.navigate", url="about:blank")
        await self.call("Page.navigate", url=url)

    async def screenshot(self, path: Path) -> None:
        await self.js("document.activeElement?.blur()")  # no focus ring on the last control clicked
        await asyncio.sleep(1)  # let the last rendering settle
        path.write_bytes(base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"]))
        print(path)


async def shoot(chromium: str, base: str, experiment_id: str, sweep_id: str, parent_id: str, names: list[str], out: Path) -> None:
    with tempfile.TemporaryDirectory() as profile:
        # A fresh profile: the UI starts as a first-time user sees it.
        browser = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                    f"--user-data-dir={profile}", "--remote-debugging-port=0",
                                    f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port_file = Path(profile) / "DevToolsActivePort"  # Chromium writes the port it chose here
            deadline = time.monotonic() + 60
            while not port_file.exists() or not port_file.read_text().strip():
                if time.monotonic() > deadline or browser.poll() is not None:
                    raise RuntimeError("Chromium did not start its DevTools server")
                await asyncio.sleep(0.2)
            port = port_file.read_text().split()[0]
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                    target = next(t for t in await response.json() if t["type"] == "page")
                async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    page = Page(ws)
                    await page.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

                    await page.open(sweep_url(base, experiment_id, sweep_id, METRIC))
                    await page.wait_for_text("Run Name", *names[1:])  # the jobs, listed flat (the parent is not among them)
                    await page.close_assistant()
                    await page.click_button("Sort:")
                    await page.wait_for(f"document.querySelector('[data-testid=\"sort-select-{METRIC}\"]')", f"{METRIC} in the Sort menu")
                    await page.click(f'[data-testid="sort-select-{METRIC}"]')
                    await page.call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
                    await page.wait_for(f"[...document.querySelectorAll('[role=columnheader]')].some(h => h.innerText.includes('{METRIC}'))",
                                        f"the {METRIC} column")
                    await page.screenshot(out / "ui-runs-table.png")

                    # Taller, so that the whole leaderboard shows above the metrics and params.
                    await page.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=PARENT_HEIGHT, deviceScaleFactor=1, mobile=False)
                    await page.open(run_url(base, experiment_id, parent_id))
                    await page.wait_for_text("Child runs", "Leaderboard", *names)
                    await page.close_assistant()
                    await page.click_button("Show more")  # the description opens folded after its first lines
                    await page.screenshot(out / "ui-parent-run.png")
        finally:
            browser.terminate()
            browser.wait(timeout=30)


def copy_figures(client: MlflowClient, tracking_uri: str, parent, out: Path) -> None:
    """The report's figures of the sweep, as files in `out`: its per-epoch curves, and the Pareto front and what
    mattered (the same pictures the parent run carries, drawn by the code as it is now)."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report"
        subprocess.run([sys.executable, "-m", "fashioncnn", "report", parent.data.tags["sweep_id"], "-o", str(report),
                        "--tracking-uri", tracking_uri, "--no-artifacts"], check=True, stdout=subprocess.DEVNULL)
        for name, target in (("test_acc.png", "report-test-acc.png"), ("loss.png", "report-loss.png"),
                             ("pareto.png", "sweep-pareto.png"), ("importance.png", "sweep-importance.png")):
            if not (report / name).exists():  # the answers need 3 runs that learned
                print(f"no {name} in the report of sweep {parent.data.tags['sweep_id']}: it needs 3 runs that learned", file=sys.stderr)
                continue
            shutil.copyfile(report / name, out / target)
            print(out / target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri())
    parser.add_argument("--base", help="the running UI (default: as fashioncnn.tracking.links chooses, http://127.0.0.1:5000 for a local store)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--no-browser", action="store_true", help="only the figures from the store: no screenshots of the UI")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None and not args.no_browser:
        sys.exit("needs Chromium: make chromium (Debian's chromium package), or --no-browser for the figures only")
    client = MlflowClient(args.tracking_uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(experiment_ids, f"tags.`{ROLE_TAG}` = 'parent'", order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        sys.exit(f"no sweep in {args.tracking_uri}: run one first (make sweep)")
    parent = parents[0]
    jobs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    names = [parent.info.run_name, *(job.info.run_name for job in jobs)]
    copy_figures(client, args.tracking_uri, parent, args.out)
    if not args.no_browser:
        base = (args.base or ui_base_for(args.tracking_uri)).rstrip("/")
        asyncio.run(shoot(chromium, base, parent.info.experiment_id, parent.data.tags["sweep_id"], parent.info.run_id, names, args.out))


if __name__ == "__main__":
    main()

"""Screenshots of the web UI for docs/OPERATIONS.md (``make airflow-screenshots``).

Starts an :class:`~cpjump1.airflow.embedded.EmbeddedAirflow` in a temporary folder, runs the
``cpjump1_2020_11_04_CPJUMP1`` DAG on two synthetic plates (load_data stage only, so it takes a
minute), and drives headless Chromium (Debian package ``chromium``) over the DevTools protocol
to capture the grid view and the trigger form as PNG files.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from cpjump1.settings import get_settings, repo_root

BATCH = "2020_11_04_CPJUMP1"
PLATES = ("BR00117010", "BR00117011")
DAG_ID = f"cpjump1_{BATCH}"


class Browser:
    """Headless Chromium driven through the Chrome DevTools protocol (websocket-client)."""

    def __init__(self, width: int = 1500, height: int = 1000):
        import websocket

        exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if not exe:
            raise SystemExit("chromium not found: apt-get install chromium")
        from cpjump1.airflow.embedded import free_port

        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="cpjump1-chromium-")
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--remote-debugging-port={self.port}", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json") as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("chromium did not start")
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60)
        self._id = 0
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def goto(self, url: str, settle: float = 3.0, wait_for: str | None = None, timeout: float = 120) -> None:
        """Open ``url``; wait until the page text contains ``wait_for`` (the UI renders late)."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while wait_for and time.monotonic() < deadline:
            text = self.js("document.body ? document.body.innerText : ''") or ""
            if wait_for in text:
                break
            time.sleep(1)
        time.sleep(settle)

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True).get("result", {}).get("value")

    def click_text(self, text: str, selector: str = "button, a, [role=button], [role=tab], summary",
                   exact: bool = False) -> bool:
        """Click the last matching element whose visible text starts with (or is) ``text``."""
        cond = f"e.innerText.trim() === {json.dumps(text)}" if exact else f"e.innerText.trim().startsWith({json.dumps(text)})"
        return bool(self.js(
            f"(() => {{ const els = [...document.querySelectorAll({json.dumps(selector)})];"
            f" const hits = els.filter(e => e.innerText && {cond});"
            " if (hits.length) { hits[hits.length - 1].click(); return true; } return false; })()"
        ))

    def resize(self, width: int, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"wrote {path}")

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)


def capture(base: str, run_id: str, out: Path) -> None:
    """Grid view of ``run_id`` and the trigger form of the batch DAG, from a running Airflow
    whose simple auth manager logs everybody in as admin (``all_admins``)."""
    browser = Browser()
    try:
        browser.goto(f"{base}/auth/token/login?next={base}/dags/{DAG_ID}", wait_for="Trigger")
        browser.goto(f"{base}/dags/{DAG_ID}/runs/{run_id}", wait_for="Task Instances")
        time.sleep(5)
        browser.screenshot(out / "airflow-grid.png")
        browser.goto(f"{base}/dags/{DAG_ID}", wait_for="Trigger")
        if not browser.click_text("Trigger"):
            print("warning: no Trigger button found")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "What to run" not in (browser.js("document.body.innerText") or ""):
            time.sleep(1)
        time.sleep(4)
        browser.screenshot(out / "airflow-trigger-form.png")
    finally:
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(repo_root() / "docs" / "img"))
    parser.add_argument("--url", help="use this running Airflow (all_admins auth) instead of starting one")
    parser.add_argument("--run-id", help="with --url: the run to show (default: the latest)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from cpjump1.airflow.embedded import EmbeddedAirflow

    if args.url:
        with urllib.request.urlopen(f"{args.url}/auth/token") as r:
            token = json.load(r)["access_token"]
        req = urllib.request.Request(f"{args.url}/api/v2/dags/{DAG_ID}/dagRuns?order_by=-start_date&limit=1",
                                     headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req) as r:
            run_id = args.run_id or json.load(r)["dag_runs"][0]["dag_run_id"]
        capture(args.url, run_id, out)
        return 0

    from cpjump1.synthetic import run_synthesize

    with tempfile.TemporaryDirectory(prefix="cpjump1-screens-") as tmp:
        af = EmbeddedAirflow(tmp)
        for plate in PLATES:
            run_synthesize(BATCH, plate, get_settings(storage_root=af.storage_root), wells=4, sites=2,
                           size=128, seed=0, progress=False)
        with af:
            af.wait_dag(DAG_ID)
            run = af.trigger_like_the_ui(DAG_ID, {"plates": list(PLATES), "stages": ["load_data"], "shards": 2})
            af.wait_run(DAG_ID, run["dag_run_id"])
            capture(af.base, run["dag_run_id"], out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

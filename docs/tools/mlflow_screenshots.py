"""Regenerate the MLflow UI screenshots of docs/mlflow.md from a fresh tiny run, in a throwaway store.

    python docs/tools/mlflow_screenshots.py                 # writes docs/mlflow-*.png (about 3 minutes on 2 CPUs)
    python docs/tools/mlflow_screenshots.py --store /tmp/s  # keep the store (and reuse its runs when they are there)

The jobs as a user runs them: a factorized model trained for 12 steps on 16 px synthetic scenes (sample grids and
validation every 4 steps, registered as `tiny16-seg`), an evaluation of it, and `jobs/promote.py` pointing the alias
`champion` at version 1. Then `mlflow ui` on a free 127.0.0.1 port and headless Chromium (Playwright) shoot:

- docs/mlflow-image-chart.png: the training run's `val/masks` image chart at its last step (Model metrics tab);
- docs/mlflow-eval-datasets.png: the evaluation run's Overview, with the data set it scored (context evaluation);
- docs/mlflow-registry.png: the registered model's page, version 1 with its alias `@champion`.

Needs the test extras (playwright) and a Chromium: --chromium (default /usr/bin/chromium, Debian's), else the one
`playwright install chromium` downloads. Each shot is checked for what its caption says before it is written.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
MODEL = "tiny16-seg"  # the registered model the shots show
TRAIN = [
    "jobs/train_factorized.py", "--config", "factorized_tiny16.yaml", "loop.num_steps=12", "loop.sample_every=4",
    "loop.eval_every=4", "tracking.enabled=true", "tracking.system_metrics=false", f"tracking.register_as={MODEL}",
]  # fmt: skip
EVAL_YAML = """\
name: eval-tiny16
output_dir: {store}/runs/eval
methods: [all_foreground, centred_box, factorized]
datasets:
  - name: synthetic16
    protocol: foreground
    data: {{name: synthetic, image_size: 16, num_images: 48, num_test: 8}}
    split: test
    factorized: {store}/runs/factorized-tiny16/checkpoint.pt
num_figure_images: 4
tracking: {{system_metrics: false}}
"""
MAX_BYTES = 300_000  # each PNG stays small (the repository carries them)


def job(store: Path, args: list[str]) -> None:
    """A job of jobs/ as a user types it, writing into `store` (its runs, its MLflow store)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / args[0]), *args[1:]]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=store, env=env, check=True)


def make_runs(store: Path) -> None:
    """Train, evaluate and promote (each skipped when the store has it from an earlier call)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    if not (store / "runs" / "factorized-tiny16" / "checkpoint.pt").is_file():
        job(store, [*TRAIN, f"output_dir={store}/runs"])
    if not (store / "runs" / "eval" / "eval-tiny16" / "table.md").is_file():
        (store / "eval.yaml").write_text(EVAL_YAML.format(store=store))
        job(store, ["jobs/evaluate.py", "--config", str(store / "eval.yaml")])
    if "champion" not in client.get_registered_model(MODEL).aliases:
        job(store, ["jobs/promote.py", f"name={MODEL}", "alias=champion", "version=1", "redeploy=false"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(store: Path) -> Iterator[str]:
    """`mlflow ui` on the store (one worker), on a free loopback port; its address once it answers."""
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{store}/mlflow.db", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]  # fmt: skip
    log = open(store / "ui.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=store, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # seconds: the server imports MLflow, then starts its job runner
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow ui did not start: {(store / 'ui.log').read_text()[-2000:]}") from None
                time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own session: its workers and job runner with it
        proc.wait(timeout=60)
        log.close()


def save(page, path: Path, clip: dict[str, float] | None = None, element=None) -> None:
    shot = element.screenshot(path=str(path)) if element is not None else page.screenshot(path=str(path), clip=clip)
    if len(shot) > MAX_BYTES:  # a palette of 256 colours: the UI's flat colours survive it
        from PIL import Image

        Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
    print(f"{path.relative_to(REPO)}: {path.stat().st_size // 1000} KB", flush=True)


def close_assistant(page) -> None:
    """The MLflow Assistant panel (open on a first visit) takes a third of the width."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()
        page.wait_for_timeout(500)


def shoot(url: str, store: Path, chromium: str | None) -> None:
    from mlflow import MlflowClient
    from playwright.sync_api import expect, sync_playwright

    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name("diffseg")
    train = client.search_runs([exp.experiment_id], "attributes.run_name = 'factorized-tiny16'")[0]
    evaluation = client.search_runs([exp.experiment_id], "attributes.run_name = 'eval-tiny16'")[0]
    ml = "workflowType=machine_learning"  # the UI's model-training mode (it opens in GenAI mode)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium) if chromium else p.chromium.launch()
        page = browser.new_page(viewport={"width": 1280, "height": 900})

        # (a) an image chart: the card lists the run's params (its non-default keys), then the image at the step
        page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{train.info.run_id}/model-metrics?{ml}")
        search = page.get_by_placeholder("Search metric charts").first
        search.wait_for(timeout=120_000)
        close_assistant(page)
        search.fill("val/masks")
        title = page.get_by_text("val/masks", exact=True).first  # the card's title
        card = title.locator("xpath=ancestor::div[.//*[@role='slider']][1]")
        image = card.locator("img").first
        expect(image).to_be_visible(timeout=60_000)  # step 0 has an image: no "No image logged at this step"
        card.get_by_role("slider").focus()
        for _ in range(3):  # steps 0, 4, 8, 12: the last one
            page.keyboard.press("ArrowRight")
        page.wait_for_timeout(1500)
        expect(card.locator("input").last).to_have_value("12")
        expect(card.get_by_text("No image logged at this step")).to_have_count(0)
        image.scroll_into_view_if_needed()  # the image below the params, inside the card
        page.wait_for_timeout(1000)
        save(page, DOCS / "mlflow-image-chart.png", element=card)

        # (b) the evaluation run's data set
        page.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{evaluation.info.run_id}?{ml}")
        heading = page.get_by_text("Datasets", exact=True).first  # the Overview's section
        heading.wait_for(timeout=120_000)
        close_assistant(page)
        expect(page.get_by_text("evaluation", exact=True).first).to_be_visible()  # the data set's context
        page.wait_for_timeout(1000)
        bottom = heading.bounding_box()["y"] + 70  # About this run, then the Datasets section
        save(page, DOCS / "mlflow-eval-datasets.png", clip={"x": 200, "y": 0, "width": 1080, "height": bottom})

        # (c) the registered model, its version and alias
        page.goto(f"{url}/#/models/{MODEL}?{ml}")
        page.get_by_text("champion", exact=False).first.wait_for(timeout=120_000)
        close_assistant(page)
        page.wait_for_timeout(1000)
        save(page, DOCS / "mlflow-registry.png", clip={"x": 200, "y": 0, "width": 1080, "height": 480})
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, help="the store's folder (default: a new temporary one, deleted)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="a Chromium binary ('' = Playwright's own)")
    args = parser.parse_args()
    chromium = args.chromium if args.chromium and Path(args.chromium).exists() else None
    with contextlib.ExitStack() as stack:
        if args.store is None:
            store = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="diffseg-mlflow-shots-")))
        else:
            store = args.store.resolve()
            store.mkdir(parents=True, exist_ok=True)
        make_runs(store)
        with mlflow_ui(store) as url:
            shoot(url, store, chromium)


if __name__ == "__main__":
    main()

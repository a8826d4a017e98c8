"""The Serve application on a local Ray instance: every endpoint round-trips, bad input always gets a 4xx JSON error,
valid requests interleaved with it all succeed, and the replicas are the same processes at the end.

One module-scoped app (starting Ray and Serve is most of the cost); random-init tiny checkpoints in tmp_path.
"""

import base64
import importlib
import importlib.util
import io
import json
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_serving import jpeg_bytes, png_bytes, png_with_declared_size, tiny_checkpoint, tiny_pixel_bundle

requests = pytest.importorskip("requests")

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
MAX_BODY = 200_000
ARGS = {
    "device": "cpu",
    "batching": {"enabled": True, "max_batch_size": 8, "batch_wait_timeout_s": 0.05},
    "expose_internals": True,  # the tests compare replica pids
    "limits": {"max_body_bytes": MAX_BODY, "max_image_pixels": 512 * 512, "max_image_side": 1024,
               "max_num_images": 4, "max_steps": 20, "max_sample_cost": 40, "max_inflight_cost": 400,
               "request_timeout_s": 60},
    "use_gpu": "no",
}  # fmt: skip
DEPLOYMENTS = [  # the entries of a Serve config's `deployments:` section
    *({"name": n, "max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": 0.5}}
      for n in ("FactorizedSegmenter", "PixelSegmenter", "Sampler")),
    {"name": "Ingress", "max_ongoing_requests": 128, "ray_actor_options": {"num_cpus": 0.25}},
]  # fmt: skip


SERVED: dict[str, Path] = {}  # what the app serves, for the tests that compare it with the jobs


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    import ray
    from ray import serve

    import diffseg
    from diffseg.core.runtime import serve_env

    sys.path.insert(0, str(REPO))  # the `serve` package at the repository root
    build_app = importlib.import_module("serve.app").build_application
    folder = tmp_path_factory.mktemp("serve")
    ckpt, bundle = tiny_checkpoint(folder / "checkpoint.pt"), tiny_pixel_bundle(folder)
    SERVED.update(checkpoint=ckpt, pixel=bundle)
    serve_env()  # Serve's start-up checks tolerant of a loaded machine, as jobs/serve_app.py sets them
    ray.init(
        address="local",
        num_cpus=4,
        num_gpus=0,
        include_dashboard=False,
        object_store_memory=256 * 1024**2,
        runtime_env={"py_modules": [str(Path(diffseg.__file__).parent), str(REPO / "serve")]},
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({**ARGS, "segmenter": str(ckpt), "pixel": str(bundle)}, deployments=DEPLOYMENTS)
        serve.run(app, name="diffseg", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        sys.path.remove(str(REPO))


def _pids(url):
    info = requests.get(f"{url}/v1/info", timeout=30).json()
    return info["ingress"]["pid"], {name: m["pid"] for name, m in info["models"].items()}, info


def _png(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_endpoints_round_trip(app_url):
    models = ["factorized", "pixel", "sampler"]
    assert requests.get(f"{app_url}/healthz", timeout=30).json() == {"status": "ok", "models": models}
    _, pids, info = _pids(app_url)
    assert list(pids) == models and len(set(pids.values())) == 3  # one replica process per model
    assert info["models"]["factorized"]["num_components"] == 3 and info["limits"]["max_body_bytes"] == MAX_BODY

    # raw bytes -> JSON with areas, uncertainty and a class-id mask at the upload's size
    r = requests.post(f"{app_url}/v1/segment?t=20&seed=3", data=png_bytes(40, 24), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"], body["t"], body["seed"]) == (40, 24, 20, 3)
    assert sum(c["area_px"] for c in body["classes"]) == 40 * 24 and len(body["classes"]) == 3
    assert 0 <= body["uncertainty"]["mean"] <= 1 and "overlay_png" not in body
    mask = np.asarray(_png(body["mask_png"]))
    assert mask.shape == (24, 40) and mask.max() < 3
    again = requests.post(f"{app_url}/v1/segment?t=20&seed=3", data=png_bytes(40, 24), timeout=60).json()
    assert again["mask_png"] == body["mask_png"]  # same seed, same answer

    # multipart JPEG upload with form fields -> JSON with an overlay; and the PNG-only outputs
    files = {"image": ("x.jpg", jpeg_bytes(30, 30), "image/jpeg")}
    r = requests.post(f"{app_url}/v1/segment", files=files, data={"overlay": "true", "t": "5"}, timeout=60)
    assert r.status_code == 200, r.text
    assert _png(r.json()["overlay_png"]).size == (30, 30) and r.json()["t"] == 5
    for output in ("mask", "color", "overlay"):
        r = requests.post(f"{app_url}/v1/segment?output={output}", data=png_bytes(17, 9), timeout=60)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (17, 9)

    # the pixel ensemble (DDPM features + MLPs): class names from its bundle, the ensemble's uncertainty
    r = requests.post(f"{app_url}/v1/segment?method=pixel&overlay=1", data=png_bytes(20, 20), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["name"] for c in body["classes"]] == ["background", "horse"] and body["t"] is None
    assert body["model"]["kind"] == "pixel-ensemble" and _png(body["overlay_png"]).size == (20, 20)

    # sampler: images and masks, deterministic per seed; a grid
    r = requests.post(f"{app_url}/v1/sample", json={"num_images": 2, "steps": 4, "seed": 11}, timeout=60)
    assert r.status_code == 200, r.text
    samples = r.json()["samples"]
    assert len(samples) == 2 and _png(samples[0]["image_png"]).size == (16, 16)
    assert np.asarray(_png(samples[0]["mask_png"])).max() < 3
    again = requests.post(f"{app_url}/v1/sample", json={"num_images": 1, "steps": 4, "seed": 11}, timeout=60)
    assert again.json()["samples"][0]["image_png"] == samples[0]["image_png"]
    r = requests.post(f"{app_url}/v1/sample", json={"num_images": 3, "steps": 2, "output": "grid"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"

    r = requests.get(f"{app_url}/", timeout=30)
    assert r.status_code == 200 and '<form id="segment-form">' in r.text


def _job(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_jobs_and_serve_answer_bit_for_bit_alike(app_url, tmp_path):
    """Over HTTP: the same seed gives the same images from jobs/sample.py and POST /v1/sample, and the same image
    gets the same mask from jobs/segment.py and POST /v1/segment (one seeding rule, one resize policy)."""
    ckpt = SERVED["checkpoint"]
    _job("sample").main([f"checkpoint={ckpt}", f"output_dir={tmp_path}", "name=s", "seed=5", "steps=4",
                         "num_images=2", "device=cpu"])  # fmt: skip
    r = requests.post(f"{app_url}/v1/sample", json={"num_images": 2, "steps": 4, "seed": 5}, timeout=60)
    assert r.status_code == 200, r.text
    for i, sample in enumerate(r.json()["samples"]):
        job_image = np.asarray(Image.open(tmp_path / "s" / "images" / f"{i:05d}.png"))
        np.testing.assert_array_equal(np.asarray(_png(sample["image_png"])), job_image)
        job_mask = np.asarray(Image.open(tmp_path / "s" / "masks" / f"{i:05d}.png"))
        np.testing.assert_array_equal(np.asarray(_png(sample["mask_png"])), job_mask)

    folder = tmp_path / "photos"
    (folder / "images").mkdir(parents=True)
    (folder / "dataset.json").write_text('{"name": "photos", "classes": ["region"], "ignore_index": 255}')
    upload = png_bytes(37, 21, seed=9)
    (folder / "images" / "photo.png").write_bytes(upload)
    _job("segment").main([f"checkpoint={ckpt}", f"data.root={folder}", f"output_dir={tmp_path}", "name=g", "t=20",
                          "seed=3", "device=cpu"])  # fmt: skip
    r = requests.post(f"{app_url}/v1/segment?t=20&seed=3&output=mask", data=upload, timeout=60)
    assert r.status_code == 200, r.text
    served = np.asarray(Image.open(io.BytesIO(r.content)))
    np.testing.assert_array_equal(served, np.asarray(Image.open(tmp_path / "g" / "masks" / "photo.png")))


def test_concurrent_requests_are_batched(app_url):
    def post(i):
        return requests.post(f"{app_url}/v1/segment?seed={i}", data=png_bytes(16, 16, seed=i), timeout=60)

    with ThreadPoolExecutor(8) as pool:
        codes = [r.status_code for r in pool.map(post, range(16))]
    assert codes == [200] * 16
    assert _pids(app_url)[2]["models"]["factorized"]["largest_batch"] >= 2


def _bad_requests(url):
    """(name, method, url, kwargs, expected status) for one of each way to get a request wrong."""
    seg, smp = f"{url}/v1/segment", f"{url}/v1/sample"
    good = png_bytes(20, 20)

    def chunked_oversize():
        for _ in range(30):
            yield b"\x89PNG\r\n\x1a\n" + b"x" * 10_000

    return [
        ("text bytes", "post", seg, {"data": b"hello, world"}, 415),
        ("random bytes", "post", seg, {"data": os.urandom(500)}, 415),
        ("empty body", "post", seg, {"data": b""}, 400),
        ("truncated png", "post", seg, {"data": good[: len(good) // 2]}, 400),
        ("png magic only", "post", seg, {"data": good[:8]}, 400),
        ("corrupt header", "post", seg, {"data": good[:16] + os.urandom(64)}, 400),
        ("truncated jpeg", "post", seg, {"data": jpeg_bytes(64, 64)[:300]}, 400),
        ("huge dims", "post", seg, {"data": png_with_declared_size(100_000, 100_000)}, 413),
        ("tall dims", "post", seg, {"data": png_with_declared_size(2000, 10)}, 413),
        ("gif", "post", seg, {"data": b"GIF89a" + b"\0" * 64}, 415),
        ("oversize body", "post", seg, {"data": b"\x89PNG\r\n\x1a\n" + b"\0" * (MAX_BODY + 1)}, 413),
        ("oversize chunked", "post", seg, {"data": chunked_oversize}, 413),
        ("text/plain", "post", seg, {"data": good, "headers": {"Content-Type": "text/plain"}}, 415),
        ("json to segment", "post", seg, {"json": {"image": "x"}}, 415),
        ("t too big", "post", f"{seg}?t=100", {"data": good}, 422),
        ("t negative", "post", f"{seg}?t=-1", {"data": good}, 422),
        ("t not int", "post", f"{seg}?t=abc", {"data": good}, 422),
        ("seed float", "post", f"{seg}?seed=1.5", {"data": good}, 422),
        ("bad method", "post", f"{seg}?method=grabcut", {"data": good}, 422),
        ("bad output", "post", f"{seg}?output=gif", {"data": good}, 422),
        ("bad alpha", "post", f"{seg}?alpha=7", {"data": good}, 422),
        ("unknown param", "post", f"{seg}?k=5", {"data": good}, 422),
        ("form no image", "post", seg, {"files": {"other": ("a.png", good, "image/png")}}, 422),
        ("form text image", "post", seg, {"files": {"image": (None, "not a file")}}, 422),
        ("form bad image", "post", seg, {"files": {"image": ("a.png", b"nope", "image/png")}}, 415),
        ("get segment", "get", seg, {}, 405),
        ("no route", "post", f"{url}/v1/nothing", {"data": good}, 404),
        ("sample zero", "post", smp, {"json": {"num_images": 0}}, 422),
        ("sample many", "post", smp, {"json": {"num_images": 1000}}, 422),
        ("sample str", "post", smp, {"json": {"num_images": "2"}}, 422),
        ("sample bool", "post", smp, {"json": {"steps": True}}, 422),
        ("sample steps", "post", smp, {"json": {"steps": 10_000}}, 422),
        ("sample seed", "post", smp, {"json": {"seed": -5}}, 422),
        ("sample label", "post", smp, {"json": {"label": 1}}, 422),
        ("sample extra", "post", smp, {"json": {"prompt": "a horse"}}, 422),
        ("sample array", "post", smp, {"json": [1, 2]}, 422),
        (
            "sample bad json",
            "post",
            smp,
            {"data": b"{num_images:", "headers": {"Content-Type": "application/json"}},
            400,
        ),
        ("sample form", "post", smp, {"data": {"num_images": "2"}}, 415),  # application/x-www-form-urlencoded
        ("sample no type", "post", smp, {"data": b"num_images=2"}, 400),  # read as JSON, which it is not
        ("sample oversize", "post", smp, {"json": {"x": "y" * 70_000}}, 413),
        ("sample output", "post", smp, {"json": {"output": "tiff"}}, 422),
        ("sample cost", "post", smp, {"json": {"num_images": 4, "steps": 20}}, 422),  # 80 image-steps > 40
        ("sample giant int", "post", smp, {"data": b'{"seed": 1' + b"0" * 5000 + b"}", "headers": JSON}, 422),
        ("sample surrogate key", "post", smp, {"data": b'{"\\ud800": 1}', "headers": JSON}, 400),
        ("sample surrogate value", "post", smp, {"data": b'{"output": "\\udfff"}', "headers": JSON}, 400),
        ("t giant", "post", f"{seg}?t={'9' * 5000}", {"data": good}, 422),
    ]


JSON = {"Content-Type": "application/json"}


def _send(method, url, kwargs):
    kwargs = dict(kwargs)
    if callable(kwargs.get("data")):
        kwargs["data"] = kwargs["data"]()
    return getattr(requests, method)(url, timeout=60, **kwargs)


def test_malformed_requests_get_4xx_and_replicas_survive(app_url):
    ingress_pid, pids, _ = _pids(app_url)
    bad = _bad_requests(app_url)
    jpg = {"file": ("a.jpg", jpeg_bytes(), "image/jpg")}
    valid = [
        ("valid segment", "post", f"{app_url}/v1/segment?t=10", {"data": png_bytes(24, 24)}, 200),
        ("valid multipart", "post", f"{app_url}/v1/segment", {"files": jpg}, 200),
        ("valid pixel", "post", f"{app_url}/v1/segment?method=pixel", {"data": png_bytes(24, 24)}, 200),
        ("valid sample", "post", f"{app_url}/v1/sample", {"json": {"num_images": 1, "steps": 2}}, 200),
    ]  # fmt: skip
    plan = []
    for i in range(6):  # 6 x 46 kinds = 276 bad requests, one valid one after every 8
        for j, case in enumerate(bad):
            plan.append(case)
            if j % 8 == 7:
                plan.append(valid[(i + j) % len(valid)])
    assert sum(c[-1] >= 400 for c in plan) >= 200

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda c: _send(c[1], c[2], c[3]), plan))
    wrong = []
    for (name, *_, expected), r in zip(plan, responses):
        if r.status_code != expected:
            wrong.append((name, expected, r.status_code, r.text[:200]))
        elif expected >= 400:
            err = r.json()["error"]  # every error is JSON and says what is wrong
            assert err["status"] == expected and err["message"], (name, err)
    assert not wrong, wrong

    ingress_after, pids_after, info = _pids(app_url)
    assert (ingress_after, pids_after) == (ingress_pid, pids)  # no replica crashed or was replaced
    assert all(m["failures"] == 0 for m in info["models"].values())
    assert requests.get(f"{app_url}/healthz", timeout=30).status_code == 200


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_web_page_in_headless_chromium(app_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    upload = tmp_path / "upload.png"
    upload.write_bytes(png_bytes(48, 32))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(app_url + "/")
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            assert "factorized" in page.inner_text("#models")
            assert page.locator("#segment-method option").all_inner_texts() == ["factorized", "pixel"]
            page.set_input_files("#segment-file", str(upload))
            page.click("#segment-submit")
            page.wait_for_selector("#segment-result img[alt='overlay']", timeout=30_000)
            assert page.locator("#segment-table tr").count() == 4  # header + 3 regions
            page.fill("#sample-n", "2")
            page.fill("#sample-steps", "3")
            page.click("#sample-submit")
            page.wait_for_selector("#sample-result img[alt='mask 1']", timeout=30_000)
            assert page.locator("#sample-result img").count() == 4  # 2 images + 2 masks
            page.fill("#sample-steps", "5000")  # out of range: the page shows the server's error
            page.click("#sample-submit")
            page.wait_for_function("document.getElementById('sample-error').textContent.includes('422')")
            assert "steps" in page.inner_text("#sample-error")
            assert not errors, errors
        finally:
            browser.close()


def _raw(url, head: bytes, body: bytes = b"") -> tuple[int, bytes, bytes]:
    """Send bytes as they are (a client that writes its own headers) -> (status, headers, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + b"\r\n\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                headers, _, rest = data.partition(b"\r\n\r\n")
                m = [h for h in headers.split(b"\r\n") if h.lower().startswith(b"content-length:")]
                if m and len(rest) >= int(m[0].split(b":")[1]):
                    break
    status = int(data.split(b" ", 2)[1])
    headers, _, rest = data.partition(b"\r\n\r\n")
    return status, headers, rest


def test_bad_content_length_gets_4xx(app_url):
    """Content-Lengths that reach the app get its JSON 400; framing the HTTP server itself cannot parse is answered
    by it (Serve's uvicorn proxy) with a 400 before the app sees the request: a 4xx either way, never a 500."""
    png = png_bytes(8, 8)
    for value in (b"\xc2\xb2", b"1" * 30, b"12 34"):  # reach the app or not: each is a 4xx, never a 500 or a hang
        status, headers, body = _raw(
            app_url, b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: image/png\r\n"
            b"Content-Length: " + value, png,
        )  # fmt: skip
        assert 400 <= status < 500, (value, status, body[:200])
        if b"application/json" in headers.lower():
            assert json.loads(body)["error"]["status"] == status


@pytest.fixture(scope="module")
def slow_sampler_url(app_url, tmp_path_factory):
    """A second app on the same Serve instance: a sampler whose 16-image x 100-step request takes seconds, a 1 s model
    timeout, and the default (closed) info."""
    from ray import serve

    build_app = importlib.import_module("serve.app").build_application
    ckpt = tiny_checkpoint(tmp_path_factory.mktemp("slow") / "checkpoint.pt", image_size=64)
    args = {
        "sampler": str(ckpt), "device": "cpu",
        "limits": {"max_num_images": 16, "max_steps": 100, "max_sample_cost": 1600, "max_inflight_cost": 1600,
                   "request_timeout_s": 1.0},
        "use_gpu": "no",
    }  # fmt: skip
    serve.run(build_app(args), name="slow", route_prefix="/slow")
    yield f"{app_url}/slow"
    serve.delete("slow")


def test_timed_out_sampling_is_cancelled_in_the_replica(slow_sampler_url):
    """A request that outlives the model timeout gets a 504 JSON, and its work stops in the replica: the budget it
    held is free again (a second large request is admitted, not refused as busy) and a small one is answered."""
    url = slow_sampler_url
    r = requests.post(f"{url}/v1/sample", json={"num_images": 16, "steps": 100}, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["status"] == 504, r.text

    def scheduler():
        return requests.get(f"{url}/v1/info", timeout=30).json()["models"]["sampler"]["scheduler"]

    deadline = time.time() + 30
    while (stats := scheduler())["active_runs"] and time.time() < deadline:
        time.sleep(0.2)
    assert stats["cancelled"] == 1 and stats["active_runs"] == 0 and stats["inflight_cost"] == 0, stats
    assert stats["steps"] < 100 and stats["completed"] == 0, stats  # it stopped early, with no answer to give
    steps = stats["steps"]
    time.sleep(1.0)
    assert scheduler()["steps"] == steps  # nothing keeps running for nobody
    r = requests.post(f"{url}/v1/sample", json={"num_images": 1, "steps": 2}, timeout=60)
    assert r.status_code == 200, r.text
    assert "source" not in r.json()["model"]


def test_info_is_closed_by_default(slow_sampler_url):
    info = requests.get(f"{slow_sampler_url}/v1/info", timeout=30).json()
    text = json.dumps(info)
    assert "pid" not in info["ingress"] and "pid" not in info["models"]["sampler"]
    assert "source" not in info["models"]["sampler"] and "checkpoint.pt" not in text


def test_a_failed_deploy_names_the_file_and_healthz_answers_503(app_url, tmp_path_factory):
    """A bad model file used to fail the deploy as "Failed to update the deployments ['Sampler']" (the error naming
    the file only in the replica logs, once per retry), and /healthz then hung for more than 10 s. Now a local file
    that does not verify fails the build, once, naming it; one that fails in the replicas anyway (changed after the
    build, or a URI's download) makes /healthz answer 503 at once with Serve's message, which names the file."""
    import torch
    from ray import serve

    from diffseg.models.integrity import INTEGRITY_KEY, CheckpointError

    build_app = importlib.import_module("serve.app").build_application
    folder = tmp_path_factory.mktemp("broken")
    ckpt = tiny_checkpoint(folder / "checkpoint.pt")
    raw = torch.load(ckpt, weights_only=True)
    raw["integritx"] = raw.pop(INTEGRITY_KEY)  # the report's one flipped bit in the record's key
    bad = folder / "bad.pt"
    torch.save(raw, bad)
    with pytest.raises(CheckpointError, match=rf"segmenter: {bad}: has no integrity record"):
        build_app({**ARGS, "segmenter": str(bad)})
    app = build_app({**ARGS, "segmenter": str(ckpt), "use_sampler": False}, deployments=DEPLOYMENTS[:1])
    torch.save(raw, ckpt)  # changed after the build: the replicas meet it
    try:
        with pytest.raises(RuntimeError, match="Deploying application broken failed") as failed:
            serve.run(app, name="broken", route_prefix="/broken")
        # jobs/serve_app.py's exit line for it: one line, naming the deployment and the file
        line = importlib.import_module("serve.launch")._deploy_failure("broken", failed.value)
        assert "\n" not in line and line.startswith("application broken did not deploy: FactorizedSegmenter is ")
        assert str(ckpt) in line and "integrity record" in line, line
        t0 = time.perf_counter()
        answer = requests.get(f"{app_url}/broken/healthz", timeout=30)
        elapsed = time.perf_counter() - t0
        message = answer.json()["error"]["message"]
        # within the probe's own 5 s deadline (HEALTH_TIMEOUT_S; measured 0.11 s beside two trainings)
        assert answer.status_code == 503 and elapsed < 5.5, (answer.status_code, elapsed, message)
        assert "FactorizedSegmenter is" in message and str(ckpt) in message and "integrity record" in message
    finally:
        serve.delete("broken")
    assert requests.get(f"{app_url}/healthz", timeout=30).status_code == 200  # the other app is untouched

"""The web demo, as a user reaches it: `python -m cid_jax.app` on the demo checkpoint, driven by a
real headless Chromium (Debian's chromium + chromedriver through selenium) and by gradio_client.

The browser test skips only when no chromium/chromedriver is installed (.ci/run installs them),
and says so."""
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import REPO

gradio = pytest.importorskip("gradio", reason="the `app` extra (gradio) is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("app_photos")
    Image.fromarray(skimage.data.astronaut()).save(root / "astronaut.png")
    Image.fromarray(skimage.data.coffee()).save(root / "coffee.png")  # a cup: no face
    Image.fromarray(skimage.data.astronaut()[:, ::-1]).save(root / "astronaut_flipped.png")  # a second person
    return root


@pytest.fixture(scope="module")
def server(demo_workdir, tmp_path_factory):
    """The app on a free localhost port, offering a (tiny, random) ControlNet; yields its URL once it
    serves."""
    pytest.importorskip("diffusers")
    from tests.helpers import write_tiny_controlnet

    port = _free_port()
    root = tmp_path_factory.mktemp("app")
    write_tiny_controlnet(root / "tiny-canny", seed=3)
    log_path = root / "app.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "cid_jax.app", f"--checkpoint={demo_workdir[0]}", "--steps=2",
                             f"--port={port}", f"--controlnet={root / 'tiny-canny'}"], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT,
                            env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if "serving on" in log_path.read_text():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                pass
        time.sleep(1)
    else:
        proc.kill()
        pytest.fail(f"the app did not start in 10 minutes:\n{log_path.read_text()[-3000:]}")
    yield url, log_path
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def test_start_up_logs_each_stage(server):
    _, log_path = server
    text = log_path.read_text()
    for stage in ("loaded in", "compiling the sampler", "ready: compiled in", "serving on http://127.0.0.1:"):
        assert stage in text, stage
    assert "share" not in text.lower() or "gradio.live" not in text  # no public link


def test_gradio_client_predict_returns_images(server, photos):
    from gradio_client import Client, handle_file
    from PIL import Image

    url, _ = server
    client = Client(url, verbose=False)
    gallery, seen, facial, took = client.predict(handle_file(str(photos / "astronaut.png")), "a portrait", "", 2,
                                                 5.0, 0, 1.0, 7, 2, api_name="/generate")
    assert len(gallery) == 2
    first = Image.open(gallery[0]["image"])
    assert first.size == (64, 64)
    assert Image.open(seen).size == (512, 512)  # the photo with the face box and the region masks
    assert facial.count("<|facial|>") == 5 and "2 image(s)" in took
    with pytest.raises(Exception, match="no face found"):
        client.predict(handle_file(str(photos / "coffee.png")), "a portrait", "", 2, 5.0, 0, 1.0, 7, 1,
                       api_name="/generate")
    # The HTTP API takes any number: a 30-digit seed is refused as the CLI refuses it (gradio_client
    # cannot send NaN, which test_request_numbers_are_checked covers at the same check).
    with pytest.raises(Exception, match="seed=1000000000000000000000000000000 must be between"):
        client.predict(handle_file(str(photos / "astronaut.png")), "a portrait", "", 2, 5.0, 0, 1.0, 10**30, 1,
                       api_name="/generate")


def test_gradio_client_repaints_with_a_controlnet(server, photos, tmp_path):
    """The edit panels through the HTTP API: the astronaut repainted under a painted box with the
    ControlNet on canny edges differs from the plain image of the same seed.
    A picture with nothing painted, or an 'inpaint' control without a mask, is a message."""
    from gradio_client import Client, handle_file
    from PIL import Image

    url, _ = server
    client = Client(url, verbose=False)
    strokes = np.zeros((512, 512, 4), np.uint8)
    strokes[30:230, 140:330] = 255
    Image.fromarray(strokes).save(tmp_path / "strokes.png")
    nothing = tmp_path / "nothing.png"
    Image.fromarray(np.zeros((512, 512, 4), np.uint8)).save(nothing)
    photo = handle_file(str(photos / "astronaut.png"))

    def edit(layer):
        return dict(background=handle_file(str(photos / "astronaut.png")), layers=[handle_file(str(layer))],
                    composite=None)

    args = (photo, "a portrait", "", 2, 5.0, 0, 1.0, 7, 1)
    gallery, *_ = client.predict(*args, edit(tmp_path / "strokes.png"), 1.0, control_mode_0="canny",
                                 control_scale_0=0.8, api_name="/generate")
    repainted = np.asarray(Image.open(gallery[0]["image"]).convert("RGB")).astype(int)
    gallery, *_ = client.predict(*args, api_name="/generate")
    before = np.asarray(Image.open(gallery[0]["image"]).convert("RGB")).astype(int)
    assert repainted.shape == before.shape == (64, 64, 3) and np.abs(repainted - before).max() > 8
    with pytest.raises(Exception, match="nothing painted"):
        client.predict(*args, edit(nothing), 1.0, api_name="/generate")
    with pytest.raises(Exception, match="'inpaint' needs a picture to repaint"):
        client.predict(*args, None, 1.0, control_mode_0="inpaint", api_name="/generate")


def test_gradio_client_draws_two_people(server, photos, tmp_path):
    """The "Two people" panel through the HTTP API: a second photo, areas drawn in red and blue on the
    canvas (or none: halves); both identities' facial words are in the prompt; the page shows the
    areas it used. Areas without a second photo are a message."""
    from gradio_client import Client, handle_file
    from PIL import Image

    url, _ = server
    client = Client(url, verbose=False)
    strokes = np.zeros((64, 64, 4), np.uint8)
    strokes[8:56, 2:26] = (255, 0, 0, 255)
    strokes[8:56, 38:62] = (0, 0, 255, 255)
    Image.fromarray(strokes).save(tmp_path / "areas.png")
    canvas = Image.fromarray(np.full((64, 64, 3), 255, np.uint8))
    canvas.save(tmp_path / "canvas.png")
    areas = dict(background=handle_file(str(tmp_path / "canvas.png")), layers=[handle_file(str(tmp_path / "areas.png"))],
                 composite=None)
    args = (handle_file(str(photos / "astronaut.png")), "two friends", "", 2, 5.0, 0, 1.0, 7, 1)
    second = handle_file(str(photos / "astronaut_flipped.png"))
    gallery, seen, facial, took = client.predict(*args, second_photo=second, areas=areas, api_name="/generate")
    assert Image.open(gallery[0]["image"]).size == (64, 64) and facial.count("<|facial|>") == 10
    red, blue = np.array([255, 0, 0]), np.array([0, 0, 255])
    close = lambda a, b: np.abs(a.astype(int) - b).max() < 8  # noqa: E731  (the page's image encoding is lossy)
    shown = np.asarray(Image.open(seen).convert("RGB"))
    assert close(shown[30, 10], red) and close(shown[30, 50], blue) and close(shown[4, 10], 255) and "two people" in took
    gallery, seen, *_ = client.predict(*args, second_photo=second, api_name="/generate")  # halves
    shown = np.asarray(Image.open(seen).convert("RGB"))
    assert close(shown[4, 10], red) and close(shown[60, 60], blue)
    with pytest.raises(Exception, match="add the second person's photo"):
        client.predict(*args, areas=areas, api_name="/generate")


def test_a_port_in_use_is_one_line_before_loading(demo_workdir, capsys):
    from cid_jax import app

    workdir, _ = demo_workdir
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc = app.main([f"--checkpoint={workdir}", f"--port={port}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"--port={port} on 127.0.0.1 cannot be used" in err and "loaded" not in err, err


def test_request_numbers_are_checked():
    from cid_jax import app

    ok = dict(steps=30, guidance=5.0, merge_step=20, ip_scale=1.0, seed=2024, num_images=2)
    assert app.request_problems(**ok) == []
    for name, bad in (("guidance", float("nan")), ("guidance", float("inf")), ("steps", 2.5), ("seed", -1), ("num_images", 99), ("ip_scale", "x")):
        problems = app.request_problems(**{**ok, name: bad})
        assert len(problems) == 1 and problems[0].startswith(f"{name}="), problems


def _chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return browser, driver


def test_a_real_browser_generates_and_shows_the_no_face_error(server, photos, tmp_path):
    browser, driver_path = _chromium()
    if not (browser and driver_path):
        pytest.skip("no chromium + chromedriver on this machine (apt-get install chromium chromium-driver); "
                    "the browser test did not run")
    pytest.importorskip("selenium", reason="selenium (the dev extra) is not installed")
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 300)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#photo input[type=file]")))
        upload.send_keys(str(photos / "astronaut.png"))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#photo img")))
        prompt = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
        prompt.clear()
        prompt.send_keys("a portrait of an astronaut")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#gallery img")))
        wait.until(lambda d: "<|facial|>" in d.find_element(By.CSS_SELECTOR, "#facial_prompt textarea")
                   .get_attribute("value"))
        driver.save_screenshot(str(tmp_path / "generated.png"))
        assert (tmp_path / "generated.png").stat().st_size > 10_000
        # A photo without a face: the message in the page, no traceback.
        driver.find_element(By.CSS_SELECTOR, "#photo button[aria-label='Remove Image']").click()
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#photo input[type=file]")))
        upload.send_keys(str(photos / "coffee.png"))
        time.sleep(1)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: "no face found" in d.page_source)
        assert "Traceback" not in driver.page_source
        driver.save_screenshot(str(tmp_path / "no_face.png"))
    finally:
        driver.quit()
